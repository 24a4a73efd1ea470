"""train.py end to end on a tiny model: learning, metrics, checkpoints, exact resume, failures."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from checkpoint import load_checkpoint, load_model, read_meta
from data_loader import load_dataset
from helpers import IDENTITY, REPO, V, metrics, stop_at, tiny_flags, write_data
from helpers import data  # noqa: F401  (a fixture)
from evaluation import evaluate


def test_tiny_model_learns_and_everything_is_recorded(data, tmp_path, capsys):
    save_dir = str(tmp_path / "ck")
    assert train.main(tiny_flags(data, save_dir, profile=True)) == 0
    out = capsys.readouterr().out
    assert "val perplexity" in out and "bits/byte" in out and "the loop adds" in out
    recs = metrics(save_dir)
    tr = [r for r in recs if r["type"] == "train"]
    ev = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in tr] == list(range(10, 151, 10))
    assert tr[-1]["loss"] < 0.5 * tr[0]["loss"]          # it learns to count
    assert tr[-1]["accuracy"] > 0.5
    for r in tr:
        assert r["lr"] > 0 and r["steps_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["steps_per_s"] * 128)
    assert [r["step"] for r in ev] == [50, 100, 150]
    assert ev[-1]["val_loss"] < ev[0]["val_loss"]
    for r in ev:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        # bits per byte: the toy stories have 4 bytes per token, plus a newline per story
        val = load_dataset(data[1], vocab_size=V)
        bytes_per_token = (4 * (len(val) - val.num_documents) + val.num_documents) / len(val)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / bytes_per_token, rel=1e-9)
    assert sorted(os.listdir(save_dir)) == ["checkpoint_final.npz", "checkpoint_step_100.npz",
                                            "checkpoint_step_50.npz", "metrics.jsonl", "run.json", "train.lock"]
    ck = load_checkpoint(os.path.join(save_dir, "checkpoint_final.npz"))
    assert ck.meta["step"] == 150 and ck.meta["version"] == 1 and ck.meta["tokenizer"] == IDENTITY
    assert ck.meta["data"]["batches_drawn"] == 150 and ck.meta["train_args"]["d_model"] == 16
    assert int(ck.arrays["t"]) == 150 and ck.arrays["m/wte"].shape == (V, 16)
    model, _ = load_model(os.path.join(save_dir, "checkpoint_final.npz"))
    logits = model.forward(np.arange(10, 20)[None])
    assert (logits[0, -1].argmax()) == 20                # ... 18, 19 -> 20


def test_evaluation_uses_token_sums_and_scales_bits_per_byte(data, tmp_path):
    from config import ModelConfig
    from language_model import LanguageModel
    model = LanguageModel(ModelConfig(vocab_size=V, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=16))
    val = load_dataset(data[1], vocab_size=V)
    full = evaluate(model, val, batch_size=7, seq_len=16)
    n_windows = (len(val.tokens) - 1) // 16
    assert full["val_tokens"] == n_windows * 16
    sums = [model.evaluate(x, y) for x, y in __import__("data_loader").eval_batches(val, 7, 16)]
    total = sum(float(s) for s, _ in sums)
    assert full["val_loss"] == pytest.approx(total / full["val_tokens"])
    assert full["val_perplexity"] == pytest.approx(math.exp(total / full["val_tokens"]))
    # capped: the bytes are scaled to the part evaluated, so bits/byte stays comparable
    part = evaluate(model, val, batch_size=7, seq_len=16, max_batches=2)
    assert part["val_tokens"] == 2 * 7 * 16
    bytes_per_token = (4 * (len(val) - val.num_documents) + val.num_documents) / len(val)
    assert part["val_bpb"] == pytest.approx(part["val_loss"] / math.log(2) / bytes_per_token, rel=1e-9)
    no_bytes = load_dataset(write_data(tmp_path / "plain.jsonl", 20, seed=3, identity=None), vocab_size=V)
    assert evaluate(model, no_bytes, 4, 16)["val_bpb"] is None


def test_bits_per_byte_counts_the_byte_of_each_story_separator(tmp_path):
    # one byte per token, the end-of-text token standing for the newline between stories:
    # bits per byte must equal bits per token
    from config import ModelConfig
    from language_model import LanguageModel
    model = LanguageModel(ModelConfig(vocab_size=V, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=16))
    val = load_dataset(write_data(tmp_path / "bytes.jsonl", 60, seed=4, bytes_per_token=1), vocab_size=V)
    assert val.num_bytes == len(val.tokens)
    res = evaluate(model, val, batch_size=8, seq_len=16)
    assert res["val_bpb"] == pytest.approx(res["val_loss"] / math.log(2), rel=1e-12)


def run_cli(argv, **kw):
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(predicate, proc, timeout=60):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_exactly_the_same_weights(data, tmp_path):
    """With dropout on: a resumed run draws the masks the uninterrupted one drew (those of its steps)."""
    steps = 600
    ref_dir, dir_b = str(tmp_path / "ref"), str(tmp_path / "b")
    common = dict(max_steps=steps, save_interval=20, log_interval=50, eval_interval=200, eval_batches=2, dropout=0.1)
    assert train.main(tiny_flags(data, ref_dir, **common)) == 0

    def checkpoints():
        return sorted(int(p[len("checkpoint_step_"):-4]) for p in os.listdir(dir_b)
                      if p.startswith("checkpoint_step_") and p.endswith(".npz")) if os.path.isdir(dir_b) else []

    # 1. SIGKILL (no chance to clean up) some time after the first checkpoint
    proc = run_cli(tiny_flags(data, dir_b, **common))
    wait_for(lambda: len(checkpoints()) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(checkpoints())
    assert not os.path.exists(os.path.join(dir_b, "checkpoint_final.npz")), "killed too late to test anything"

    with open(os.path.join(dir_b, "metrics.jsonl"), "a") as f:
        f.write('{"type": "train", "step": 4')   # as if killed in the middle of writing a record

    # 2. resume the newest checkpoint, then Ctrl-C: it saves where it stopped and exits 130
    proc = run_cli(tiny_flags(data, dir_b, resume=True, **common))
    wait_for(lambda: max(checkpoints()) >= killed_at + 40, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in out and "resumed from" in out
    stopped_at = max(checkpoints())
    assert stopped_at < steps and "Traceback" not in err

    # 3. resume to the end: bit-for-bit the uninterrupted run
    assert train.main(tiny_flags(data, dir_b, resume=True, **common)) == 0
    ref = load_checkpoint(os.path.join(ref_dir, "checkpoint_final.npz"))
    got = load_checkpoint(os.path.join(dir_b, "checkpoint_final.npz"))
    assert got.meta["step"] == steps and got.meta["data"] == ref.meta["data"] and got.config.dropout == 0.1
    for k, v in ref.params.items():
        assert np.array_equal(got.params[k], v), k
    for k, v in ref.arrays.items():
        assert np.array_equal(got.arrays[k], v), k
    # the metrics file reads as one run: each train step logged once, in order
    steps_logged = [r["step"] for r in metrics(dir_b) if r["type"] == "train"]
    assert steps_logged == list(range(50, steps + 1, 50))


def test_nan_loss_stops_names_the_step_and_keeps_the_good_checkpoint(data, tmp_path, monkeypatch):
    from language_model import LanguageModel
    real = LanguageModel.forward_backward
    calls = []

    def flaky(self, idx, targets, n_targets, dropout=None):
        calls.append(1)
        loss_sum, n_correct = real(self, idx, targets, n_targets, dropout)
        return (float("nan"), n_correct) if len(calls) == 13 else (loss_sum, n_correct)
    monkeypatch.setattr(LanguageModel, "forward_backward", flaky)
    save_dir = str(tmp_path / "ck")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(data, save_dir, max_steps=30, save_interval=5))
    msg = str(e.value.code)
    assert "loss is nan at step 13" in msg
    assert "checkpoint_step_10.npz" in msg and "--learning_rate" in msg
    assert sorted(p for p in os.listdir(save_dir) if p.endswith(".npz")) == \
        ["checkpoint_step_10.npz", "checkpoint_step_5.npz"]
    assert read_meta(os.path.join(save_dir, "checkpoint_step_10.npz"))["step"] == 10
    assert metrics(save_dir)[-1]["type"] == "error"


def test_one_worker_or_several_train_the_same_model(data, tmp_path, monkeypatch):
    import parallel
    shard_counts, real_split = [], parallel.split_rows

    def counting_split(n_rows, parts):  # as parallel.Shards cuts a batch among the workers
        shard_counts.append(parts)
        return real_split(n_rows, parts)

    monkeypatch.setattr(parallel, "split_rows", counting_split)
    weights = {}
    for workers in (1, 3):
        d = str(tmp_path / f"w{workers}")
        # SGD: Adam would blow roundoff in gradients that are zero in exact arithmetic (the keys'
        # bias) up into steps of the learning rate's size
        assert train.main(tiny_flags(data, d, max_steps=20, eval_interval=0, workers=workers, optimizer="sgd")) == 0
        weights[workers] = load_model(os.path.join(d, "checkpoint_final.npz"))[0].params
    assert set(shard_counts) == {1, 3}  # the batch of 8 really was split in 3
    for name, w in weights[1].items():  # the same sums in another order: float32 roundings apart
        np.testing.assert_allclose(weights[3][name], w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_bad_input_gives_clear_errors(data, tmp_path):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        return str(e.value.code)

    d = str(tmp_path / "ck")
    assert "not found" in error(tiny_flags((str(tmp_path / "nope.jsonl"), data[1]), d))
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in error(tiny_flags((str(tmp_path / "empty.jsonl"), data[1]), d))
    (tmp_path / "bad.jsonl").write_text("[1, 2, 63]\n[1, 2,\n")
    assert "bad.jsonl:2: malformed JSON" in error(tiny_flags((str(tmp_path / "bad.jsonl"), data[1]), d))
    msg = error(tiny_flags(data, d, vocab_size=32))
    assert "token id 63" in msg and "--vocab_size 64" in msg
    short = tmp_path / "short.jsonl"
    short.write_text("[1, 2, 3, 63]\n")
    assert "fewer than one window" in error(tiny_flags((data[0], str(short)), d))
    other = write_data(tmp_path / "other.jsonl", 30, seed=5, identity=dict(IDENTITY, sha256="1" * 64))
    assert "tokenized differently" in error(tiny_flags((data[0], other), d))
    assert "divisible" in error(tiny_flags(data, d, n_heads=3))
    assert "--max_time" in error(tiny_flags(data, d, max_time=-1))
    assert "--workers must be at least 1" in error(tiny_flags(data, d, workers=0))
    assert "no checkpoint" in error(tiny_flags(data, d, resume=True))
    # a checkpoint of another architecture
    assert train.main(tiny_flags(data, d, max_steps=3, eval_interval=0)) == 0
    msg = error(tiny_flags(data, d, d_model=32, resume=True))
    assert "different architecture" in msg and "d_model=16 (flags give 32)" in msg


def test_cli_errors_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--train_data", str(tmp_path / "missing.jsonl"),
                           "--save_dir", str(tmp_path / "ck")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: data file not found") and "Traceback" not in proc.stderr


def test_plot_metrics_draws_a_png(data, tmp_path):
    pytest.importorskip("matplotlib")
    import plot_metrics
    save_dir = str(tmp_path / "ck")
    train.main(tiny_flags(data, save_dir, max_steps=20, eval_interval=10))
    out = str(tmp_path / "loss.png")
    assert plot_metrics.main([os.path.join(save_dir, "metrics.jsonl"), "--out", out]) == 0
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_max_time_stops_with_a_checkpoint_to_resume_from(data, tmp_path, capsys):
    save_dir = str(tmp_path / "ck")
    os.makedirs(save_dir)
    stale = os.path.join(save_dir, "checkpoint_step_7.npz.x1y2.tmp")  # as a kill mid-write leaves it
    open(stale, "wb").write(b"PK half a file")
    # save_interval 0: the only checkpoint is the one --max_time writes, however fast the steps run
    assert train.main(tiny_flags(data, save_dir, max_steps=100000, max_time=0.002, save_interval=0)) == 0  # 0.12 s
    assert not os.path.exists(stale)
    out = capsys.readouterr().out
    assert "--max_time" in out and "--resume" in out
    saved = [p for p in os.listdir(save_dir) if p.startswith("checkpoint_step_")]
    assert len(saved) == 1 and not os.path.exists(os.path.join(save_dir, "checkpoint_final.npz"))
    step = read_meta(os.path.join(save_dir, saved[0]))["step"]
    assert 0 < step < 100000
    # --resume PATH continues from that file (here with more steps: a note says it is not the same run)
    path = os.path.join(save_dir, saved[0])
    assert train.main(tiny_flags(data, str(tmp_path / "more"), max_steps=step + 3, resume=path)) == 0
    out = capsys.readouterr().out
    assert f"resumed from {path} at step {step}" in out and "--max_steps 100000 -> " in out
    assert read_meta(str(tmp_path / "more" / "checkpoint_final.npz"))["step"] == step + 3


def test_checkpoint_embeds_the_bpe_model_so_generation_needs_nothing_else(data, tmp_path, monkeypatch):
    seen = []

    class FakeBPE:
        def model_json(self):
            return '{"merges": "the exact model file text"}'
    monkeypatch.setattr(train, "tokenizer_from_identity",
                        lambda identity, model_json=None: seen.append(identity) or FakeBPE())
    save_dir = str(tmp_path / "ck")
    assert train.main(tiny_flags(data, save_dir, max_steps=2, eval_interval=0)) == 0
    meta = read_meta(os.path.join(save_dir, "checkpoint_final.npz"))
    assert seen == [IDENTITY] and meta["tokenizer"] == IDENTITY
    assert meta["tokenizer_model_json"] == '{"merges": "the exact model file text"}'


def test_progress_bar_with_eta_on_a_terminal(data, tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        isatty = staticmethod(lambda: True)  # stderr looks like a terminal, so the bar is drawn
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    flags = [f for f in tiny_flags(data, str(tmp_path / "ck"), max_steps=20, eval_interval=0) if f != "--no_progress"]
    assert train.main(flags) == 0
    bar = err.getvalue()
    assert "20/20 [" in bar and "step/s" in bar and "<" in bar   # elapsed<remaining, rate


def test_resume_continues_the_interrupted_run_not_a_newer_checkpoint_of_an_older_run(data, tmp_path, monkeypatch,
                                                                                    capsys):
    d, ref = str(tmp_path / "ck"), str(tmp_path / "ref")
    common = dict(max_steps=60, save_interval=20, eval_interval=0, log_interval=20)
    # an earlier run in the folder ends with checkpoint_final.npz at step 60 (and checkpoint_step_40.npz)
    assert train.main(tiny_flags(data, d, seed=7, **common)) == 0
    old_id = read_meta(os.path.join(d, "checkpoint_final.npz")).get("run_id")
    # a fresh run there (--overwrite: it was asked to start over) is interrupted at step 25; resumed, it
    # must go on from its own step 25
    with monkeypatch.context() as m:
        stop_at(25, m)
        assert train.main(tiny_flags(data, d, overwrite=True, **common)) == 130
    capsys.readouterr()
    assert train.main(tiny_flags(data, d, resume=True, **common)) == 0
    out = capsys.readouterr().out
    assert f"resumed from {os.path.join(d, 'checkpoint_step_25.npz')} at step 25" in out
    assert "nothing to train" not in out
    # ... and ends where the same run uninterrupted ends, bit for bit
    assert train.main(tiny_flags(data, ref, **common)) == 0
    got, want = (load_checkpoint(os.path.join(p, "checkpoint_final.npz")) for p in (d, ref))
    for k, v in want.params.items():
        assert np.array_equal(got.params[k], v), k
    ids = {r.get("run_id") for r in metrics(d) if r["type"] in ("config", "resume")}
    assert ids == {got.meta["run_id"]}                       # the metrics name the run too
    assert got.meta["run_id"] != old_id


def test_a_second_run_on_the_same_save_dir_is_refused_naming_the_first(data, tmp_path):
    d = str(tmp_path / "ck")
    first = run_cli(tiny_flags(data, d, max_steps=100000, save_interval=0, eval_interval=0))
    try:
        wait_for(lambda: os.path.exists(os.path.join(d, "metrics.jsonl")), first)
        second = subprocess.run([sys.executable, "train.py", *tiny_flags(data, d, max_steps=5)], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.startswith(f"error: {d} is in use by another training run (pid {first.pid} ")
        assert "--save_dir" in second.stderr
        assert first.poll() is None                          # the first run goes on undisturbed
        assert sorted(os.listdir(d)) == ["metrics.jsonl", "run.json", "train.lock"]
    finally:
        first.kill()
        first.wait()
    # the kernel drops the lock with the process, kill -9 included: the folder is free again
    assert train.main(tiny_flags(data, d, max_steps=2, eval_interval=0)) == 0


def test_resuming_with_another_number_of_workers_says_so(data, tmp_path, capsys):
    d = str(tmp_path / "ck")
    assert train.main(tiny_flags(data, d, max_steps=4, eval_interval=0, workers=1)) == 0
    assert train.main(tiny_flags(data, d, max_steps=6, eval_interval=0, workers=2, resume=True)) == 0
    out = capsys.readouterr().out
    assert "over 1 MPI rank(s) x 2 worker(s) x 1 micro-batch(es), the checkpoint's run over 1 x 1 x 1" in out
    assert "last bits" in out and "--workers 1 --grad_accum 1" in out
    assert train.main(tiny_flags(data, d, max_steps=8, eval_interval=0, workers=2, resume=True)) == 0
    assert "workers" not in capsys.readouterr().out


def test_a_full_disk_while_logging_stops_with_one_line(data, tmp_path, monkeypatch):
    import errno
    real, calls = train.MetricsLog.record, []

    def record(self, **fields):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, **fields)
    monkeypatch.setattr(train.MetricsLog, "record", record)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(data, str(tmp_path / "ck"), max_steps=100, eval_interval=0))
    msg = str(e.value.code)
    assert msg.startswith("error: the disk is full (No space left on device)") and "--resume" in msg


def test_grad_accum_micro_steps_give_the_update_of_one_full_step():
    """nanoGPT's gradient accumulation: the gradients of N micro-batches of B/N rows, added up, are those
    of one batch of B. Bit for bit where the additions are the same: 2 micro-batches of one worker
    against one pass over the batch split between 2 workers (the second adds into a zeroed buffer of
    its own, then into the first's), as long as every gradient gets one addition a pass: an untied head
    in one chunk of rows, and no token twice in a micro-batch (the embedding's scatter-add then adds
    each row once). Otherwise the sums differ in order: float32 rounding apart."""
    from threadpoolctl import threadpool_limits

    from config import ModelConfig
    from language_model import LanguageModel
    from loss import count_targets
    rng = np.random.default_rng(0)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=8, tie_embeddings=False)
    idx = np.concatenate([rng.permutation(V)[:16].reshape(2, 8) for _ in range(2)])  # 16 ids in each 2 rows
    targets = rng.integers(0, V, idx.shape)
    n = count_targets(targets)
    with threadpool_limits(1, user_api="blas"):  # every product computed alike, in one BLAS thread
        one_step = LanguageModel(cfg, seed=1, workers=2)
        one_step.zero_grad()
        want = one_step.forward_backward(idx, targets, n)
        micro = LanguageModel(cfg, seed=1, workers=1)
        micro.zero_grad()
        got = train.accumulate_gradients(micro, idx, targets, n, 2)
    assert [float(v) for v in got] == [float(v) for v in want]
    for name, g in one_step.grads.items():
        np.testing.assert_array_equal(micro.grads[name], g, err_msg=name)

    # tied embeddings, tokens repeated within a micro-batch, 4 micro-batches against one worker's pass
    cfg = ModelConfig(vocab_size=V, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=8)
    idx, targets = rng.integers(0, 6, (8, 8)), rng.integers(0, V, (8, 8))
    one_step, micro = LanguageModel(cfg, seed=1, workers=1), LanguageModel(cfg, seed=1, workers=1)
    one_step.zero_grad()
    want = one_step.forward_backward(idx, targets, 64)
    micro.zero_grad()
    got = train.accumulate_gradients(micro, idx, targets, 64, 4)
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6) and int(got[1]) == int(want[1])
    assert not np.array_equal(micro.grads["wte"], one_step.grads["wte"])  # summed in another order here
    for name, g in one_step.grads.items():
        np.testing.assert_allclose(micro.grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_grad_accum_with_dropout_draws_the_masks_of_one_full_step():
    """Each micro-batch draws the masks of its rows' places in the whole batch: bit for bit the update of one
    pass where the additions are the same (as above: 2 micro-batches of one worker against 2 workers), and
    float32 rounding apart where they are not (4 micro-batches); another step's masks are another update."""
    from threadpoolctl import threadpool_limits

    from config import ModelConfig
    from dropout import DropoutKey
    from language_model import LanguageModel
    from loss import count_targets
    rng = np.random.default_rng(3)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=8, tie_embeddings=False,
                      dropout=0.3)
    idx = np.concatenate([rng.permutation(V)[:16].reshape(2, 8) for _ in range(2)])  # 16 ids in each 2 rows
    targets = rng.integers(0, V, idx.shape)
    n, key = count_targets(targets), DropoutKey(seed=5, step=17)

    def grads(workers, micro_batches, key):
        model = LanguageModel(cfg, seed=1, workers=workers)
        model.zero_grad()
        sums = train.accumulate_gradients(model, idx, targets, n, micro_batches, key)
        return [float(v) for v in sums], model.grads

    with threadpool_limits(1, user_api="blas"):
        (want_sums, want), (got_sums, got) = grads(2, 1, key), grads(1, 2, key)
        _, other_step = grads(2, 1, DropoutKey(seed=5, step=18))
        (four_sums, four), (plain_sums, _) = grads(1, 4, key), grads(2, 1, None)
    assert got_sums == want_sums != plain_sums  # dropout was on
    for name, g in want.items():
        np.testing.assert_array_equal(got[name], g, err_msg=name)
        np.testing.assert_allclose(four[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    assert four_sums[0] == pytest.approx(want_sums[0], rel=1e-6)
    assert not np.allclose(other_step["h.0.mlp.c_fc.weight"], want["h.0.mlp.c_fc.weight"], rtol=1e-3)


def test_a_run_with_grad_accum_is_checkpointed_and_resumed_exactly(data, tmp_path, monkeypatch, capsys):
    from language_model import LanguageModel
    rows, real = [], LanguageModel.forward_backward

    def recording(self, idx, targets, n_targets, dropout=None):
        rows.append(len(idx))
        return real(self, idx, targets, n_targets, dropout)
    monkeypatch.setattr(LanguageModel, "forward_backward", recording)
    common = dict(max_steps=30, save_interval=10, eval_interval=10, log_interval=5, grad_accum=4, workers=1)
    ref, d = str(tmp_path / "ref"), str(tmp_path / "ck")
    assert train.main(tiny_flags(data, ref, **common)) == 0
    assert set(rows) == {2} and len(rows) == 4 * 30  # micro-batches of 8 / 4 rows, 4 a step
    with monkeypatch.context() as m:
        stop_at(17, m)
        assert train.main(tiny_flags(data, d, **common)) == 130
    capsys.readouterr()
    assert train.main(tiny_flags(data, d, resume=True, **common)) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 17" in out and "last bits" not in out
    got, want = (load_checkpoint(os.path.join(p, "checkpoint_final.npz")) for p in (d, ref))
    assert got.meta["grad_accum"] == 4 and got.meta["data"] == want.meta["data"]
    for tree in ("params", "arrays"):
        for k, v in getattr(want, tree).items():
            assert np.array_equal(getattr(got, tree)[k], v), k
    # another --grad_accum sums the same gradients in another order: it goes on, and says so
    more = str(tmp_path / "more")
    assert train.main(tiny_flags(data, more, resume=os.path.join(d, "checkpoint_step_20.npz"),
                                 **dict(common, grad_accum=2))) == 0
    assert "x 2 micro-batch(es), the checkpoint's run over 1 x 1 x 4" in capsys.readouterr().out


def test_sgd_with_grad_accum_trains_what_one_pass_a_step_trains(data, tmp_path):
    """The same updates, the gradients added in another order: float32 roundings apart (SGD: Adam would
    blow up the roundoff of gradients that are zero in exact arithmetic)."""
    weights = {}
    for grad_accum in (1, 4):
        d = str(tmp_path / f"a{grad_accum}")
        flags = tiny_flags(data, d, max_steps=20, eval_interval=0, workers=1, optimizer="sgd", grad_accum=grad_accum)
        assert train.main(flags) == 0
        weights[grad_accum] = load_checkpoint(os.path.join(d, "checkpoint_final.npz")).params
    for name, w in weights[1].items():
        np.testing.assert_allclose(weights[4][name], w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_preset_sets_the_model_and_the_batch_and_flags_given_win(data, tmp_path, monkeypatch):
    import config
    import train_flags

    def parse(argv, init=None):
        parser = train_flags.build_parser()
        args = parser.parse_args(argv)
        train_flags.apply_defaults(args, train_flags.given_flags(parser, argv), init)
        return args
    args = parse(["--train_data", "x", "--preset", "medium", "--d_model", "128", "--n_heads", "4"])
    assert (args.d_model, args.n_heads, args.d_ff, args.n_layers, args.batch_size, args.seq_len) == \
        (128, 4, 512, 4, 16, 256)  # d_ff, left out: the block's own width for the d_model given, 4 * 128
    assert (args.learning_rate, args.max_steps) == (3e-4, 5000)  # what the preset leaves alone: the defaults
    # a preset may set any flag, the optimizer's too; given flags still win
    monkeypatch.setitem(train_flags.PRESETS, "laptop",
                        dict(train_flags.PRESETS["tiny"], learning_rate=1e-3, weight_decay=0.1))
    args = parse(["--train_data", "x", "--preset", "laptop", "--weight_decay", "0"])
    assert (args.d_model, args.learning_rate, args.weight_decay) == (64, 1e-3, 0.0)
    # --init_from's folder gives the architecture; the preset what the folder does not say
    folder = config.ModelConfig(vocab_size=V, d_model=32, n_heads=2, d_ff=48, n_layers=1, max_seq_len=64)
    args = parse(["--train_data", "x", "--preset", "small", "--init_from", "dir"], init=(folder, {}))
    assert (args.d_model, args.d_ff, args.seq_len, args.batch_size) == (32, 48, 64, 32)
    # a whole run: the checkpoint has the preset's model
    d = str(tmp_path / "ck")
    assert train.main(tiny_flags(data, d, preset="tiny", d_model=None, n_heads=None, d_ff=None, n_layers=None,
                                 batch_size=None, seq_len=None, max_steps=2, eval_interval=0)) == 0
    ck = load_checkpoint(os.path.join(d, "checkpoint_final.npz"))
    assert (ck.config.d_model, ck.config.n_layers, ck.config.max_seq_len) == (64, 2, 128)
    assert ck.meta["train_args"]["batch_size"] == 32 and ck.meta["train_args"]["preset"] == "tiny"


def test_a_checkpoint_written_before_the_run_state_record_resumes_exactly(data, tmp_path):
    """Older checkpoints carry an "rng" key (the batch order's state, again), no "grad_accum", from one
    process no "ranks", and in their config none of the Llama block's fields: they still resume to the
    uninterrupted run's weights."""
    from checkpoint import save_checkpoint
    d = str(tmp_path / "ck")
    assert train.main(tiny_flags(data, d, max_steps=6, save_interval=3, eval_interval=0, workers=1)) == 0
    path = os.path.join(d, "checkpoint_step_3.npz")
    ck = load_checkpoint(path)
    assert "rng" not in ck.meta and ck.meta["ranks"] == 1 and ck.meta["grad_accum"] == 1
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "version", "config", "ranks", "grad_accum")}
    meta["rng"] = ck.meta["data"]["bit_generator"]
    old = str(tmp_path / "old.npz")
    config = {k: v for k, v in ck.config.to_dict().items() if k not in ("arch", "rope_theta", "n_kv_heads", "norm_eps")}
    save_checkpoint(old, config, ck.params, meta, ck.arrays)
    more = str(tmp_path / "more")
    assert train.main(tiny_flags(data, more, max_steps=6, save_interval=3, eval_interval=0, workers=1,
                                 resume=old)) == 0
    got, want = (load_checkpoint(os.path.join(p, "checkpoint_final.npz")) for p in (more, d))
    for k, v in want.params.items():
        assert np.array_equal(got.params[k], v), k


def test_a_llama_run_learns_is_interrupted_and_resumes_bit_for_bit(data, tmp_path, capsys):
    """--arch llama end to end: the checkpoint records the architecture (d_ff defaults to SwiGLU's width),
    a Ctrl-C at step 17 resumed gives the uninterrupted run's weights, optimizer state and metrics, and the
    checkpoint prints as such and generates the same tokens with the key/value cache as without."""
    import checkpoint
    import generate
    common = dict(arch="llama", n_heads=4, n_kv_heads=2, rope_theta=500.0, d_ff=None, max_steps=30,
                  save_interval=10, eval_interval=10, log_interval=5, workers=2)
    ref, d = str(tmp_path / "ref"), str(tmp_path / "ck")
    assert train.main(tiny_flags(data, ref, **common)) == 0
    with pytest.MonkeyPatch.context() as m:
        stop_at(17, m)
        assert train.main(tiny_flags(data, d, **common)) == 130
    assert train.main(tiny_flags(data, d, resume=True, **common)) == 0
    assert "resumed from" in capsys.readouterr().out
    got, want = (load_checkpoint(os.path.join(p, "checkpoint_final.npz")) for p in (d, ref))
    assert want.config.to_dict() == dict(vocab_size=V, d_model=16, n_heads=4, d_ff=64, n_layers=1, max_seq_len=16,
                                         use_learned_pos=False, tie_embeddings=True, activation="swiglu",
                                         arch="llama", rope_theta=500.0, n_kv_heads=2, norm_eps=1e-5, dropout=0.0,
                                         qk_norm=False, logit_softcap=0.0)
    assert "h.0.attn.c_attn.bias" not in want.params and "ln_f.bias" not in want.params
    for tree in ("params", "arrays"):
        for k, v in getattr(want, tree).items():
            assert np.array_equal(getattr(got, tree)[k], v), k
    losses = [r["loss"] for r in metrics(ref) if r["type"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns the counting stories
    def after_20(save_dir):  # the resumed run's log of steps 18-20 averages fewer steps than the whole run's
        return [(r["type"], r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in metrics(save_dir)
                if r["type"] in ("train", "eval") and r["step"] > 20]
    assert after_20(d) == after_20(ref) and len(after_20(ref)) == 3  # steps 25 and 30, the evaluation at 30
    checkpoint.main([os.path.join(ref, "checkpoint_final.npz")])
    assert "model: llama: 1 layer, d_model 16, 4 heads (2 key/value heads)" in capsys.readouterr().out
    model, _ = load_model(os.path.join(ref, "checkpoint_final.npz"))
    greedy = [list(generate.generate(model, [5, 6, 7], 40, temperature=0, use_cache=c)) for c in (True, False)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == 40  # past the context of 16: the window slid


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qk_norm_and_the_soft_cap_are_trained_recorded_and_needed_to_resume(data, tmp_path, arch):
    """--qk_norm and --logit_softcap reach the model, its checkpoint records them, and resuming without
    them is another architecture, refused; the soft cap's range is checked and in --help."""
    import train_flags
    d = str(tmp_path / "ck")
    common = dict(arch=arch, max_steps=4, save_interval=2, eval_interval=2, workers=1)
    assert train.main(tiny_flags(data, d, qk_norm=True, logit_softcap=30, **common)) == 0
    ck = load_checkpoint(os.path.join(d, "checkpoint_final.npz"))
    assert (ck.config.qk_norm, ck.config.logit_softcap) == (True, 30.0)
    assert [r for r in metrics(d) if r["type"] == "eval"]  # evaluated on the way
    for dropped in ({"qk_norm": None}, {"logit_softcap": None}):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_flags(data, d, resume=True, **dict(dict(qk_norm=True, logit_softcap=30), **dropped),
                                  **common))
        assert "different architecture" in str(e.value.code)
    for bad in ("-1", "nan", "1e4"):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_flags(data, str(tmp_path / "bad"), logit_softcap=bad, **common))
        assert "--logit_softcap must be a number from 0 to 1000" in str(e.value.code)
    assert "a number from 0 to 1000" in train_flags.build_parser().format_help()


def test_llama_flags_are_checked_and_take_the_llama_defaults():
    import train_flags

    def parse(argv):
        parser = train_flags.build_parser()
        args = parser.parse_args(["--train_data", "x", *argv])
        train_flags.apply_defaults(args, train_flags.given_flags(parser, ["--train_data", "x", *argv]))
        train_flags.check_args(args)
        return args

    args = parse(["--arch", "llama", "--preset", "small"])  # the preset's d_ff 512 is GPT-2's 4 d_model
    assert (args.d_model, args.d_ff, args.activation, args.rope_theta, args.n_kv_heads) == \
        (128, 384, "swiglu", None, None)
    assert parse(["--arch", "llama", "--d_model", "256", "--n_heads", "8"]).d_ff == 704  # 8 * 256 / 3 rounded up to 64s
    assert parse(["--arch", "llama", "--d_ff", "100"]).d_ff == 100  # given: wins
    laptop = parse(["--preset", "laptop"])  # a Llama recipe: theta and the key/value heads the block's own
    assert (laptop.arch, laptop.d_model, laptop.d_ff, laptop.activation, laptop.rope_theta, laptop.n_kv_heads,
            laptop.vocab_size) == ("llama", 256, 704, "swiglu", None, None, 4096)
    cfg = train_flags.config_from_flags(vars(laptop))
    assert (cfg.d_ff, cfg.rope_theta, cfg.n_kv_heads) == (704, 10000.0, 8)
    # with GPT-2's block, the block's own flags are GPT-2's (4 d_model, gelu, no rotary, no kv heads)
    laptop = parse(["--arch", "gpt2", "--preset", "laptop"])
    assert (laptop.d_model, laptop.d_ff, laptop.activation, laptop.rope_theta, laptop.n_kv_heads,
            laptop.vocab_size, laptop.learning_rate) == (256, 1024, "gelu", None, None, 4096, 2e-3)
    assert parse(["--arch", "gpt2", "--preset", "laptop", "--activation", "relu2"]).activation == "relu2"
    assert (parse([]).arch, parse([]).d_ff, parse([]).activation) == ("gpt2", 512, "gelu")  # GPT-2's, as before
    assert parse(["--activation", "relu2"]).activation == "relu2"
    # the model's numbers are checked once, by ModelConfig (config.py), in words naming its fields as the flags do
    for argv, message in ((["--arch", "llama", "--use_learned_pos"], "use_learned_pos: the Llama block has no position"),
                          (["--arch", "llama", "--activation", "gelu"], "activation 'gelu': the llama block's"),
                          (["--arch", "llama", "--n_kv_heads", "3"], r"n_heads divisible by n_kv_heads \(3\)"),
                          (["--arch", "llama", "--rope_theta", "1"], r"--rope_theta must be a number in \(1, 1e\+12\]"),
                          (["--arch", "llama", "--d_model", "24", "--n_heads", "8"], "even head size"),
                          (["--rope_theta", "500"], "rope_theta 500.0: a field of the Llama block"),
                          (["--n_kv_heads", "2"], "n_kv_heads 2: a field of the Llama block"),
                          (["--activation", "swiglu"], "activation 'swiglu': the gpt2 block's feed-forward"),
                          (["--d_model", "30", "--n_heads", "4"], "the model flags: d_model 30 is not divisible by n_heads 4")):
        with pytest.raises(train_flags.TrainError, match=message):
            parse(argv)


def test_story_starts_and_the_wsd_and_linear_to_zero_schedules_train_and_are_recorded(data, tmp_path):
    from optimizer import LRSchedule
    runs = {"plain": {}, "stories": dict(story_starts=True), "wsd": dict(lr_schedule="wsd", cooldown=0.5),
            "zero": dict(lr_schedule="linear", min_lr=0)}
    logged = {}
    for name, over in runs.items():
        d = str(tmp_path / name)
        flags = dict(max_steps=8, warmup_steps=2, log_interval=1, eval_interval=0, save_interval=0, **over)
        assert train.main(tiny_flags(data, d, **flags)) == 0
        logged[name] = [(r["loss"], r["lr"]) for r in metrics(d) if r["type"] == "train"]
        args = read_meta(os.path.join(d, "checkpoint_final.npz"))["train_args"]
        assert args["story_starts"] == (name == "stories") and args["lr_schedule"] == over.get("lr_schedule", "cosine")
    # other windows, the same rates
    assert [lr for _, lr in logged["stories"]] == [lr for _, lr in logged["plain"]]
    assert [loss for loss, _ in logged["stories"]] != [loss for loss, _ in logged["plain"]]
    # wsd: 6 steps after warmup, the last half of them the cooldown (from step 5); linear to zero ends at 0
    wsd, zero = LRSchedule(1e-2, 2, 8, 1e-3, "wsd", 0.5), LRSchedule(1e-2, 2, 8, 0.0, "linear")
    assert [lr for _, lr in logged["wsd"]] == [wsd(s) for s in range(8)] and wsd(5) == 1e-2 > wsd(6)
    assert [lr for _, lr in logged["zero"]] == [zero(s) for s in range(8)] and zero(8) == 0.0
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_flags(data, str(tmp_path / "bad"), lr_schedule="wsd", cooldown=bad))
        assert str(e.value.code) == f"error: --cooldown must be a number in (0, 1] (got {float(bad)})"


def test_zero_init_proj_starts_the_projections_at_zero_records_the_flag_and_resumes_exactly(data, tmp_path):
    """--zero_init_proj: after one step at a learning rate of 1e-6 every block's output projections are
    within about 1e-6 of zero (the seed's own would be about 0.01) and no longer zero; the flag is in the
    checkpoint's train_args; a run interrupted after step 1 and resumed with the flag continues from the
    checkpoint's weights and ends with the uninterrupted run's, bit for bit."""
    from language_model import OUTPUT_PROJECTIONS
    common = dict(zero_init_proj=True, max_steps=3, learning_rate=1e-6, min_lr=0, warmup_steps=0,
                  save_interval=0, eval_interval=0, log_interval=1, n_layers=2)
    ref, d = str(tmp_path / "ref"), str(tmp_path / "ck")
    with pytest.MonkeyPatch.context() as m:
        stop_at(1, m)
        assert train.main(tiny_flags(data, d, **common)) == 130
    first = load_checkpoint(os.path.join(d, "checkpoint_step_1.npz"))
    assert first.meta["train_args"]["zero_init_proj"] is True
    projections = [f"h.{i}.{name}" for i in range(2) for name in OUTPUT_PROJECTIONS]
    for name in projections:
        p = first.params[name]
        assert np.abs(p).max() < 3e-6 and p.any(), name
    assert np.abs(first.params["h.0.attn.c_attn.weight"]).max() > 0.01  # the other weights: the seed's
    assert train.main(tiny_flags(data, d, resume=True, **common)) == 0
    assert train.main(tiny_flags(data, ref, **common)) == 0
    got, want = (load_checkpoint(os.path.join(p, "checkpoint_final.npz")) for p in (d, ref))
    for name, p in want.params.items():
        assert np.array_equal(got.params[name], p), name


def test_a_run_with_qk_norm_soft_capped_logits_and_relu2_resumes_bit_for_bit(data, tmp_path):
    """Issue 29's model options on (the Llama block with QK-norm, soft-capped logits and the relu2 MLP):
    a run interrupted after step 2 and resumed ends with the uninterrupted run's weights, bit for bit."""
    common = dict(arch="llama", qk_norm=True, logit_softcap=5.0, activation="relu2", max_steps=5,
                  save_interval=0, eval_interval=0, log_interval=1)
    ref, d = str(tmp_path / "ref"), str(tmp_path / "ck")
    with pytest.MonkeyPatch.context() as m:
        stop_at(2, m)
        assert train.main(tiny_flags(data, d, **common)) == 130
    assert os.path.exists(os.path.join(d, "checkpoint_step_2.npz"))
    assert train.main(tiny_flags(data, d, resume=True, **common)) == 0
    assert train.main(tiny_flags(data, ref, **common)) == 0
    got, want = (load_checkpoint(os.path.join(p, "checkpoint_final.npz")) for p in (d, ref))
    assert got.config.qk_norm and got.config.logit_softcap == 5.0 and got.config.activation == "relu2"
    for name, p in want.params.items():
        assert np.array_equal(got.params[name], p), name
