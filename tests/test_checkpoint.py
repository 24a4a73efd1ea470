"""checkpoint.py: round trips, atomic writes, and clear errors for files that are not checkpoints."""
import json
import os

import numpy as np
import pytest

import checkpoint
from checkpoint import load_checkpoint, load_model, read_meta, save_checkpoint
from config import ModelConfig
from errors import CheckpointError
from language_model import LanguageModel

CFG = ModelConfig(vocab_size=32, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_seq_len=8)


def test_round_trip_keeps_weights_optimizer_state_and_meta(tmp_path):
    model = LanguageModel(CFG, seed=1)
    arrays = {"t": np.array(7), "m/wte": np.full((32, 8), 0.5, np.float32)}
    meta = {"step": 7, "data": {"state": 2**100 + 3}, "tokenizer": {"type": "tiktoken", "name": "gpt2"},
            "tokenizer_model_json": None}
    path = save_checkpoint(tmp_path / "ck.npz", CFG, model.params, meta, arrays)
    ck = load_checkpoint(path)
    assert ck.config == CFG
    assert ck.params.keys() == model.params.keys()
    for k, v in model.params.items():
        assert ck.params[k].dtype == v.dtype
        np.testing.assert_array_equal(ck.params[k], v)
    assert int(ck.arrays["t"]) == 7 and ck.arrays["m/wte"][3, 4] == 0.5
    assert ck.meta["step"] == 7 and ck.meta["data"]["state"] == 2**100 + 3   # big ints survive
    assert ck.meta["format"] == "numpy-gpt checkpoint" and ck.meta["version"] == checkpoint.VERSION
    assert read_meta(path)["config"] == CFG.to_dict()
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask   # not mkstemp's private 0600
    loaded, meta2 = load_model(path)
    x = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert meta2["step"] == 7


def test_write_is_atomic_a_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = LanguageModel(CFG, seed=1)
    path = save_checkpoint(tmp_path / "ck.npz", CFG, model.params, {"step": 1})
    before = open(path, "rb").read()

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill in the middle of writing
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, CFG, model.params, {"step": 2})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ck.npz"]    # no temp file left behind
    assert load_checkpoint(path).meta["step"] == 1


def test_refuses_to_save_non_finite_weights(tmp_path):
    model = LanguageModel(CFG, seed=1)
    model.params["h.0.mlp.c_fc.weight"][0, 0] = np.nan
    with pytest.raises(CheckpointError, match="c_fc.weight.*NaN"):
        save_checkpoint(tmp_path / "ck.npz", CFG, model.params, {"step": 1})
    assert not os.listdir(tmp_path)


def test_files_that_are_not_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable numpy-gpt checkpoint"):
        load_checkpoint(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="no 'meta'"):
        load_checkpoint(tmp_path / "other.npz")
    np.savez(tmp_path / "newer.npz", meta=np.array(json.dumps({"format": "numpy-gpt checkpoint", "version": 99})))
    with pytest.raises(CheckpointError, match="version 99.*update"):
        load_checkpoint(tmp_path / "newer.npz")
    # truncated file (e.g. copied while a write was in progress)
    model = LanguageModel(CFG, seed=1)
    good = save_checkpoint(tmp_path / "good.npz", CFG, model.params, {"step": 1})
    data = open(good, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.npz")


def test_command_line_prints_a_summary(tmp_path, capsys):
    model = LanguageModel(CFG, seed=1)
    path = save_checkpoint(tmp_path / "ck.npz", CFG, model.params, {"step": 3, "run_id": "20261125-a1"})
    assert checkpoint.main([path]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "run 20261125-a1" in out and f"{sum(p.size for p in model.params.values()):,} parameters" in out
    assert "model: gpt2: 1 layer, d_model 8, 2 heads, layer norm, sinusoidal positions, gelu MLP d_ff 16" in out


def test_a_llama_checkpoint_round_trips_and_a_checkpoint_from_before_it_loads_as_gpt2(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=32, d_model=8, n_heads=2, n_kv_heads=1, d_ff=12, n_layers=2, max_seq_len=8,
                      arch="llama", rope_theta=1e6, tie_embeddings=False)
    model = LanguageModel(cfg, seed=1)
    path = save_checkpoint(tmp_path / "llama.npz", cfg, model.params, {"step": 3})
    loaded, _ = load_model(path)
    assert loaded.config == cfg and read_meta(path)["config"]["arch"] == "llama"
    x = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert checkpoint.main([path]) == 0
    assert ("model: llama: 2 layers, d_model 8, 2 heads (1 key/value head), RMSNorm, rotary positions (theta 1e+06), "
            "SwiGLU d_ff 12, no biases, untied head") in capsys.readouterr().out
    # written before the Llama block: no arch, rope_theta, n_kv_heads or norm_eps in its config
    old = {k: v for k, v in CFG.to_dict().items() if k not in ("arch", "rope_theta", "n_kv_heads", "norm_eps")}
    gpt2 = LanguageModel(CFG, seed=1)
    path = save_checkpoint(tmp_path / "old.npz", old, gpt2.params, {"step": 1})
    loaded, _ = load_model(path)
    assert loaded.config == CFG and loaded.config.arch == "gpt2"
    np.testing.assert_array_equal(loaded.forward(x), gpt2.forward(x))
    # a llama config over GPT-2's arrays (or the reverse) is refused before anything is read
    mixed = dict(old, arch="llama", activation="swiglu")
    path = save_checkpoint(tmp_path / "mixed.npz", mixed, gpt2.params, {"step": 1})
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_checkpoint(path)


def test_load_model_builds_from_the_file_without_random_weights_or_gradients(tmp_path, monkeypatch):
    import language_model
    model = LanguageModel(CFG, seed=1)
    path = save_checkpoint(tmp_path / "ck.npz", CFG, model.params, {"step": 3})

    def no_init(*a, **k):
        raise AssertionError("random weights drawn before the checkpoint's were copied in")
    monkeypatch.setattr(language_model, "init_params", no_init)
    loaded, meta = load_model(path)
    assert loaded.grads is None and meta["step"] == 3
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    assert list(loaded.params) == list(model.params)            # the model's own order
    with pytest.raises(ValueError, match="for_training=False"):
        loaded.forward_backward(np.array([[1, 2]]), np.array([[2, 3]]), 2)
    x = np.array([[1, 2, 3, 4]] * 3)
    np.testing.assert_array_equal(loaded.evaluate(x, x)[0], model.evaluate(x, x)[0])


def write_npz(path, arrays, headers=None):
    """An .npz as np.savez writes it, where headers may replace an array's .npy header (shape, dtype)."""
    import io
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            if headers and key in headers:
                np.lib.format.write_array_header_1_0(buf, headers[key])
                buf.write(arr.tobytes())
            else:
                np.lib.format.write_array(buf, arr)
            z.writestr(key + ".npy", buf.getvalue())


def test_values_from_a_hostile_checkpoint_are_checked_before_anything_is_allocated(tmp_path):
    model = LanguageModel(CFG, seed=1)
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    meta = {"format": "numpy-gpt checkpoint", "version": 1, "step": 1, "config": CFG.to_dict()}

    def load(meta, headers=None, name="bad.npz"):
        write_npz(tmp_path / name, dict(arrays, meta=np.array(json.dumps(meta))), headers)
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
        return str(e.value)
    # a config asking for a vocabulary of 10^10 or 10^9 layers: refused without allocating either
    assert "wte" in load(dict(meta, config=dict(CFG.to_dict(), vocab_size=10**6)))  # in range, not the file's
    assert "vocab_size must be an integer from 1 to" in load(dict(meta, config=dict(CFG.to_dict(), vocab_size=10**10)))
    assert "layers" in load(dict(meta, config=dict(CFG.to_dict(), n_layers=10**9)))
    assert "max_seq_len" in load(dict(meta, config=dict(CFG.to_dict(), max_seq_len=10**12)))
    assert "vocab_size" in load(dict(meta, config=dict(CFG.to_dict(), vocab_size=1e10)))
    assert "step" in load(dict(meta, step=-5)) and "step" in load(dict(meta, step="7"))
    # an array header claiming 10^12 floats, backed by 1 KB of data
    huge = {"param/wte": {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}}
    assert "does not fit" in load(meta, huge)
    pickled = {"param/wte": {"descr": "|O", "fortran_order": False, "shape": (32, 8)}}
    assert "does not fit" in load(meta, pickled)


def test_a_member_whose_name_was_damaged_is_refused_not_left_unread(tmp_path):
    """A flipped byte in "opt/v/..." made "optTv/...": that array went unread and the checkpoint loaded
    without it (found by scripts/fault_test.py)."""
    model = LanguageModel(CFG, seed=1)
    meta = {"format": "numpy-gpt checkpoint", "version": 1, "step": 1, "config": CFG.to_dict()}
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    arrays.update({"meta": np.array(json.dumps(meta)), "opt/t": np.array(1), "optTv/wte": np.zeros((32, 8))})
    write_npz(tmp_path / "renamed.npz", arrays)
    with pytest.raises(CheckpointError, match=r"renamed.npz is not a readable.*unexpected member 'optTv/wte.npy'"):
        load_checkpoint(tmp_path / "renamed.npz")
    del arrays["optTv/wte"]
    write_npz(tmp_path / "fine.npz", arrays)
    assert load_checkpoint(tmp_path / "fine.npz").arrays.keys() == {"t"}
