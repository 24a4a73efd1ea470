"""Dropout's masks (dropout.py): a function of (seed, step, global row) alone, with the drop rate asked
for; the model drops only in training, on both devices; the flag, the checkpoint and the export."""
import numpy as np
import pytest

import fake_cupy
from config import ModelConfig
from device import to_host, whole_array_mode
from dropout import LEVELS, DropoutKey, draw_masks, drop_threshold, mask_shapes, row_numbers
from language_model import LanguageModel
from loss import count_targets
from optimizer import AdamW, clip_grad_norm

CFG = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=12, dropout=0.25)


def all_masks(masks):
    """Every mask of a ModelMasks in drawing order, as (keep, scale)."""
    out = [masks.embedding]
    for block in masks.layers:
        out += [block.att, block.attn_out, block.mlp_out]
    return [(to_host(m.keep), m.scale) for m in out]


def batch(seed=0, B=6, T=12, V=50):
    tokens = np.random.default_rng(seed).integers(0, V, (B, T + 1))
    return tokens[:, :-1], tokens[:, 1:].copy()


@pytest.mark.parametrize("n", [1, 3, 4, 5, 4097])
@pytest.mark.parametrize("seed", [[0, 2, 0, 0], [7, 2, 3, 5], [2**40, 2, 10**6, 31]])
def test_row_numbers_are_the_generators_uint16_draws(seed, n):
    """The masks' numbers read from the generator's raw outputs are the ones Generator.integers draws
    (the masks of every run so far), including a count that leaves part of the last output unread."""
    expected = np.random.default_rng(seed).integers(0, LEVELS, n, dtype=np.uint16)
    got = row_numbers(seed, n)
    assert got.dtype == np.uint16 and got.shape == (n,)
    np.testing.assert_array_equal(got, expected)


def test_masks_have_the_shapes_of_what_they_drop():
    masks = draw_masks(DropoutKey(0, 0), CFG, 3, 5)
    assert masks.embedding.keep.shape == (3, 5, 16) and len(masks.layers) == 2
    for block in masks.layers:
        assert block.att.keep.shape == (3, 2, 5, 5)  # (B, H, T, T)
        assert block.attn_out.keep.shape == block.mlp_out.keep.shape == (3, 5, 16)
    assert [m.keep.dtype for m in (masks.embedding, *masks.layers[0])] == [np.bool_] * 4
    assert all(m.keep.flags.c_contiguous for m in (masks.embedding, *masks.layers[1]))  # the blocked passes need it
    assert mask_shapes(5, 16, 2, 2) == [(5, 16)] + [(2, 5, 5), (5, 16), (5, 16)] * 2


def test_a_rows_masks_depend_only_on_seed_step_and_its_global_row():
    """Rows 2..5 drawn as a part (first row 2) are those rows of the whole batch of 6: whichever rank,
    worker or micro-batch draws them. Another step, seed or row gives other masks."""
    whole = all_masks(draw_masks(DropoutKey(7, 3), CFG, 6, 12))
    part = all_masks(draw_masks(DropoutKey(7, 3, row=2), CFG, 4, 12))
    for (w, scale), (p, s) in zip(whole, part):
        np.testing.assert_array_equal(p, w[2:6])
        assert s == scale
    for other in (DropoutKey(7, 4), DropoutKey(8, 3), DropoutKey(7, 3, row=1)):
        masks = all_masks(draw_masks(other, CFG, 6, 12))
        assert all(not np.array_equal(m, w) for (m, _), (w, _) in zip(masks, whole))
    assert DropoutKey(7, 3).offset(2).offset(3) == DropoutKey(7, 3, row=5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_the_rate_asked_for_and_keep_the_mean(p):
    cfg = ModelConfig(**{**CFG.to_dict(), "dropout": p, "d_model": 64, "n_heads": 4})
    masks = all_masks(draw_masks(DropoutKey(1, 2), cfg, 8, 12))
    keep = np.concatenate([m.ravel() for m, _ in masks])  # about 100,000 elements
    scale = masks[0][1]
    assert abs(keep.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / keep.size)  # 5 standard deviations
    assert scale * (1 - drop_threshold(p) / LEVELS) == pytest.approx(1, rel=1e-15)  # E[keep * scale] = 1 exactly
    assert abs(drop_threshold(p) / LEVELS - p) <= 0.5 / LEVELS


def test_without_dropout_a_key_changes_nothing_and_nothing_is_drawn(monkeypatch):
    import language_model
    drawn = []
    monkeypatch.setattr(language_model, "draw_masks", lambda *a: drawn.append(a))
    idx, targets = batch()
    n = count_targets(targets)
    grads = []
    for key in (None, DropoutKey(0, 9)):
        model = LanguageModel(ModelConfig(**{**CFG.to_dict(), "dropout": 0.0}), seed=1, workers=2)
        sums = model.forward_backward(idx, targets, n, key)
        grads.append((sums, model.grads.flat.copy()))
    assert drawn == []
    assert grads[0][0] == grads[1][0] and np.array_equal(grads[0][1], grads[1][1])


def test_dropout_changes_training_only_never_evaluation_or_generation():
    idx, targets = batch(1)
    n = count_targets(targets)
    plain = LanguageModel(ModelConfig(**{**CFG.to_dict(), "dropout": 0.0}), seed=2, workers=2)
    dropping = LanguageModel(CFG, seed=2, workers=2)
    assert dropping.config.dropout == 0.25
    np.testing.assert_array_equal(dropping.forward(idx), plain.forward(idx))
    assert [float(v) for v in dropping.evaluate(idx, targets)] == [float(v) for v in plain.evaluate(idx, targets)]
    kv = dropping.new_kv_cache(len(idx))
    np.testing.assert_array_equal(dropping.forward(idx[:, :4], kv_cache=kv), plain.forward(idx[:, :4]))
    key = DropoutKey(0, 0)
    trained = float(dropping.forward_backward(idx, targets, n, key)[0])
    assert trained != float(plain.forward_backward(idx, targets, n, key)[0])
    assert trained == float(LanguageModel(CFG, seed=2, workers=1).forward_backward(idx, targets, n, key)[0])


def test_a_gpu_step_with_dropout_still_reads_one_value_and_computes_what_numpy_does(monkeypatch):
    """With fake_cupy: the masks are drawn on the host and copied once, and the step computes what
    the whole-array path computes with NumPy (up to the stand-in's shuffled scatter-add)."""
    idx, targets = batch(3)
    n, key = count_targets(targets), DropoutKey(4, 11)
    with whole_array_mode():
        cpu = LanguageModel(CFG, seed=4)
        cpu.zero_grad()
        loss_cpu, _ = cpu.forward_backward(idx, targets, n, key)
        norm_cpu = clip_grad_norm(cpu.grads, 0.5)
    with fake_cupy.installed() as cupy:
        gpu = LanguageModel(CFG, seed=4, device="cuda")
        opt = AdamW(gpu.params)
        uploads, real_asarray = [], cupy.asarray

        def counting_asarray(a, *args, **kw):
            if isinstance(a, np.ndarray) and a.dtype == np.bool_:
                uploads.append(a.shape)
            return real_asarray(a, *args, **kw)

        monkeypatch.setattr(cupy, "asarray", counting_asarray)
        syncs, copies = fake_cupy.counts.syncs, fake_cupy.counts.host_copies
        gpu.zero_grad()
        loss, _ = gpu.forward_backward(idx, targets, n, key)
        norm = clip_grad_norm(gpu.grads, 0.5)
        opt.step(gpu.grads, lr=1e-3)
        assert fake_cupy.counts.syncs == syncs + 1  # the gradient norm, read once
        assert fake_cupy.counts.host_copies == copies
        B, T, C, H, L = 6, 12, 16, 2, 2
        assert uploads == [(B * (T * C + L * (H * T * T + 2 * T * C)),)]  # every mask of the pass, in one copy
        assert float(loss) == pytest.approx(float(loss_cpu), rel=1e-6)
        assert norm == pytest.approx(norm_cpu, rel=1e-6)


def test_the_flag_is_checked_recorded_in_the_checkpoint_and_a_changed_p_is_noted(tmp_path, capsys):
    import train
    from checkpoint import load_checkpoint
    from helpers import tiny_flags, write_data
    data = write_data(tmp_path / "train.jsonl", 100, seed=1), write_data(tmp_path / "valid.jsonl", 20, seed=2)
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_flags(data, str(tmp_path / "bad"), dropout=bad))
        assert "--dropout must be in [0, 1)" in str(e.value.code)
    weights = {}
    for p in (0.0, 0.2):
        d = str(tmp_path / f"p{p}")
        assert train.main(tiny_flags(data, d, max_steps=6, eval_interval=0, save_interval=3, dropout=p)) == 0
        ck = load_checkpoint(f"{d}/checkpoint_final.npz")
        assert ck.config.dropout == p and ck.meta["train_args"]["dropout"] == p
        weights[p] = ck.params["wte"]
    assert not np.array_equal(weights[0.0], weights[0.2])  # the loop did drop
    capsys.readouterr()
    assert train.main(tiny_flags(data, str(tmp_path / "more"), max_steps=6, eval_interval=0, dropout=0.1,
                                 resume=f"{tmp_path}/p0.2/checkpoint_step_3.npz")) == 0
    out = capsys.readouterr().out
    assert "--dropout 0.2 -> 0.1" in out and "will not repeat" in out


def test_the_export_writes_the_pdrop_values():
    from hf_format import gpt2_config_json
    hf = gpt2_config_json(CFG, 49, {})
    assert hf["embd_pdrop"] == hf["attn_pdrop"] == hf["resid_pdrop"] == 0.25
    assert gpt2_config_json(ModelConfig(), 0, {})["attn_pdrop"] == 0.0


def test_bad_dropout_in_a_config_is_refused():
    for bad in (1.0, -0.5, True, "0.1"):
        with pytest.raises(ValueError, match="dropout"):
            ModelConfig(dropout=bad)
