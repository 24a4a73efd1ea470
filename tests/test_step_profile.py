"""step_profile.py and benchmark.py --profile: every row of a step is there for both blocks, the times add up
to no more than the step, the FLOP per row are the benchmark's, and the timed stand-ins leave no trace."""
import threading
import time

import numpy as np
import pytest

import benchmark
import language_model
import llama
import parallel
import step_profile
import transformer
from config import ModelConfig
from language_model import LanguageModel
from optimizer import AdamW
from step_profile import BACKWARD, BOTH, FORWARD, StepProfiler, random_batches, training_step

CFGS = {
    "gpt2": ModelConfig(vocab_size=64, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=8),
    "llama": ModelConfig(vocab_size=64, d_model=16, n_heads=4, n_layers=2, max_seq_len=8, arch="llama",
                         n_kv_heads=2),
}
EXPECTED = {  # (row, direction) every step of the block has
    "gpt2": {("batch", ""), ("zero_grad", ""), ("embedding", FORWARD), ("norms", FORWARD), ("attention", FORWARD),
             ("softmax", FORWARD), ("feed_forward", FORWARD), ("block", FORWARD), ("final_norm", FORWARD),
             ("head", BOTH), ("final_norm", BACKWARD), ("block", BACKWARD), ("feed_forward", BACKWARD),
             ("norms", BACKWARD), ("attention", BACKWARD), ("softmax", BACKWARD), ("embedding", BACKWARD),
             ("model", BOTH), ("grad_sum", ""), ("clip", ""), ("optimizer", "")},
}
EXPECTED["llama"] = EXPECTED["gpt2"] | {("rope", FORWARD), ("rope", BACKWARD)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_profile_has_every_row_and_they_fit_in_the_step(arch):
    cfg, B, T = CFGS[arch], 4, 8
    r = benchmark.profile(cfg, B, T, steps=2, warmup=1)
    rows = {(x["row"], x["direction"]): x for x in r["rows"]}
    assert set(rows) == EXPECTED[arch]
    assert all(x["seconds"] >= 0 for x in r["rows"])
    assert sum(x["seconds"] for x in r["rows"]) <= r["step_s"] * 1.001
    assert r["step_s"] > 0 and r["plain_step_s"] > 0 and r["peak_gflops"] > 0
    # each block calls its norms twice per layer in each direction, the attention and the feed-forward once
    L = cfg.n_layers
    assert rows["norms", FORWARD]["calls"] == 2 * L * r["threads"]
    assert rows["attention", BACKWARD]["calls"] == L * r["threads"]
    assert rows["optimizer", ""]["calls"] == 1 and not rows["optimizer", ""]["sharded"]
    assert rows["feed_forward", FORWARD]["sharded"]
    # the products' FLOP split over the rows that run them, adding up to the benchmark's count
    flops = benchmark.MatmulsOnly(cfg, B, T).flops
    assert sum(x["flops"] for x in r["rows"]) == flops
    assert rows["head", BOTH]["flops"] == 3 * 2 * B * T * cfg.d_model * cfg.vocab_size
    assert rows["attention", BACKWARD]["flops"] == 2 * rows["attention", FORWARD]["flops"]
    assert rows["softmax", FORWARD]["flops"] == 0


def test_profiling_leaves_the_model_and_the_functions_as_they_were():
    cfg = CFGS["llama"]
    owners = (transformer, llama, language_model, parallel, step_profile, language_model.LanguageModel, AdamW,
              step_profile.RandomBatches)
    before = {(owner, name): value for owner in owners for name, value in vars(owner).items()}

    def run(profiled):
        model = LanguageModel(cfg, seed=0)
        optimizer = AdamW(model.params)
        batches = random_batches(cfg.vocab_size, 4, 8)
        for _ in range(2):
            if profiled:
                with StepProfiler(model, optimizer):
                    training_step(model, optimizer, batches)
            else:
                training_step(model, optimizer, batches)
        x, _ = batches.next()
        return model, model.forward(x)

    model, logits = run(profiled=False)
    model_p, logits_p = run(profiled=True)
    np.testing.assert_array_equal(model_p.params.flat, model.params.flat)  # bit-identical weights after 2 steps
    np.testing.assert_array_equal(logits_p, logits)
    assert model_p.block is language_model.BLOCKS[cfg.arch]
    after = {(owner, name): value for owner in owners for name, value in vars(owner).items()}
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_an_inherited_method_is_put_back_by_removing_the_stand_in():
    class Base:
        def step(self, grads, lr):
            return "base"

    class Child(Base):
        pass

    model = LanguageModel(CFGS["gpt2"], seed=0)
    with StepProfiler(model, Child()):
        assert "step" in vars(Child) and Child().step(None, 0) == "base"
    assert "step" not in vars(Child)


def test_self_time_leaves_out_the_timed_calls_inside_and_threads_add_up(monkeypatch):
    """A stand-in model pass in each of two threads: attention (10 ms of its own) calls the softmax (20 ms),
    the final norm (opaque) calls a block norm (10 ms); a shard's rows are the threads' seconds / 2."""
    model = LanguageModel(CFGS["gpt2"], seed=0)

    def softmax(att):
        time.sleep(0.02)

    def attention_forward():
        time.sleep(0.01)
        transformer.causal_softmax_inplace(None)

    def layernorm_forward():
        time.sleep(0.01)

    def final_norm_forward(x, p, cfg):
        transformer.layernorm_forward()

    def shard(self):
        transformer.attention_forward()
        self.block.final_norm_forward(None, None, None)

    monkeypatch.setattr(transformer, "causal_softmax_inplace", softmax)
    monkeypatch.setattr(transformer, "attention_forward", attention_forward)
    monkeypatch.setattr(transformer, "layernorm_forward", layernorm_forward)
    monkeypatch.setattr(language_model.LanguageModel, "_loss_and_backward", shard)
    model.block = model.block._replace(final_norm_forward=final_norm_forward)
    with StepProfiler(model, AdamW(model.params)) as prof:
        threads = [threading.Thread(target=model._loss_and_backward) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    rows = {(r["row"], r["direction"]): r for r in prof.rows(steps=1)}
    assert set(rows) == {("softmax", FORWARD), ("attention", FORWARD), ("final_norm", FORWARD), ("model", BOTH)}
    assert prof.shards == 2 and all(r["sharded"] and r["calls"] == 2 for r in rows.values())
    assert 0.02 <= rows["softmax", FORWARD]["seconds"] < 0.03  # 2 x 20 ms of thread time / 2 threads
    assert 0.01 <= rows["attention", FORWARD]["seconds"] < 0.02  # the softmax's 20 ms left out
    assert 0.01 <= rows["final_norm", FORWARD]["seconds"] < 0.02  # the norm inside is its own
    assert rows["model", BOTH]["seconds"] < 0.01  # the stand-in pass itself does nothing


def test_benchmark_prints_the_profile(capsys):
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "4", "--seq_len", "8", "--steps", "1", "--min_seconds", "0", "--profile"])
    out = capsys.readouterr().out
    for label in step_profile.LABELS.values():
        if "RoPE" not in label and "threads' gradients" not in label:
            assert label[:40] in out, label
    assert "rest: in no row" in out and "the whole step" in out and "GFLOP/s" in out


def test_profile_on_the_gpu_path_waits_for_the_gpu_at_every_clock(monkeypatch):
    """With the stand-in CuPy: one worker does the batch, and every timed call waits for the GPU before it
    starts its clock and before it reads it."""
    import fake_cupy
    waits = []
    monkeypatch.setattr(step_profile, "synchronize", lambda xp: waits.append(xp))
    with fake_cupy.installed() as cupy:
        r = benchmark.profile(CFGS["gpt2"], 2, 8, steps=1, warmup=1, device="cuda")
    rows = {(x["row"], x["direction"]): x for x in r["rows"]}
    assert r["threads"] == 1 and set(rows) == EXPECTED["gpt2"]
    assert len(waits) == 2 * sum(x["calls"] for x in r["rows"]) and all(xp is cupy for xp in waits)
    assert sum(x["seconds"] for x in r["rows"]) <= r["step_s"] * 1.001
