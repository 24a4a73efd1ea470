"""export_hf.py: checkpoints to Hugging Face GPT-2 folders and back, their tokenizer files, and the
import paths (train.py --init_from, generate.py --checkpoint DIR). Where transformers and torch are
installed, the export is also loaded with transformers and its logits compared with ours."""
import io
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import export_hf
import generate
import train
from bpe import train_bpe
from checkpoint import load_checkpoint, save_checkpoint
from config import ModelConfig
from errors import HFError
from export_hf import export
from gpt2_files import gpt2_bpe_model, model_from_vocab_merges, write_vocab_merges
from hf_format import load_hf_model
from language_model import LanguageModel
from pretokens import ENDOFTEXT
from tokenizer import get_tokenizer, load_bpe, load_tiktoken

pytest.importorskip("safetensors", reason="the interchange needs safetensors (scripts/test.sh installs it)")
import safetensors.numpy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "TinyStoriesV2-GPT4-train.sample.txt"
# Text that exercises the pre-tokenisation: contractions, digits, runs of spaces and newlines,
# punctuation, non-ASCII letters, an emoji (bytes split across tokens), the special token.
TRICKY = ["Once upon a time, there was a little dog named Max.", "It's 12:30 - they'll see.  Two  spaces\n\nand\tabs ",
          "Ünïcödé café, naïve résumé; 日本語 テキスト 🐶!", "   leading spaces", "trailing \n",
          f"The end.{ENDOFTEXT}Once again", "I'm, you're, we've, he'd, she'll, 'quoted' ''", ""]
VARIANTS = [dict(use_learned_pos=lp, activation=act, tie_embeddings=tie)
             for lp, act, tie in itertools.product((True, False), ("gelu", "relu", "relu2"), (True, False))] + \
    [dict(arch="llama", n_kv_heads=kv, tie_embeddings=tie, rope_theta=theta)
     for kv, tie, theta in ((None, True, None), (2, False, None), (1, True, 500.0))]


def variant_id(v):
    if v.get("arch") == "llama":
        return "-".join(("llama", f"kv{v['n_kv_heads'] or 'all'}", "tied" if v["tie_embeddings"] else "untied",
                         f"theta{v['rope_theta'] or 'default'}"))
    return "-".join(("learned" if v["use_learned_pos"] else "sinusoidal", v["activation"],
                     "tied" if v["tie_embeddings"] else "untied"))


def llama_config(**changes):
    return ModelConfig(**dict(dict(arch="llama", vocab_size=97, d_model=16, n_heads=4, n_kv_heads=2, d_ff=40,
                                   n_layers=2, max_seq_len=12), **changes))


def random_model(cfg, seed=0):
    """Weights drawn here, biases and layer norms included, so every parameter shapes the output."""
    model = LanguageModel(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    for name in sorted(model.params):
        p = model.params[name]
        base = 1.0 if (".ln_" in name or name.startswith("ln_")) and name.endswith("weight") else 0.0
        p[...] = base + 0.1 * rng.standard_normal(p.shape)
    return model


def checkpoint(tmp_path, cfg, tokenizer=None, seed=0, step=7):
    model = random_model(cfg, seed)
    meta = {"step": step}
    if tokenizer is not None:
        meta.update(tokenizer=tokenizer.identity(), tokenizer_model_json=tokenizer.model_json())
    path = str(tmp_path / f"ck{seed}.npz")
    save_checkpoint(path, cfg, model.params, meta)
    return path, model


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """Our BPE, 400 tokens, trained on the bundled sample."""
    text = SAMPLE.read_text(encoding="utf-8")[:200_000]
    model = train_bpe(text, 400)
    path = tmp_path_factory.mktemp("bpe") / "bpe400.json"
    path.write_text(model.to_json(), encoding="utf-8")
    return get_tokenizer("lecture2_bpe", model_file=str(path), verbose=False)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """GPT-2's vocab.json + merges.txt as export_hf writes them (from the bundled ranks)."""
    d = tmp_path_factory.mktemp("gpt2")
    write_vocab_merges(gpt2_bpe_model(), d / "vocab.json", d / "merges.txt")
    return d


def sample_lines(n=300):
    with open(SAMPLE, encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(n), f)]


# ----------------------------------------------------------------------------- weights and config

@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_export_then_import_gives_back_the_same_model(tmp_path, variant):
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=12, **variant)
    path, model = checkpoint(tmp_path, cfg)
    out = tmp_path / "hf"
    files = export(path, str(out), log=lambda m: None)
    assert files == ["README.md", "config.json", "model.safetensors"]  # vocab 97, no tokenizer named: no tokenizer files
    back, record = load_hf_model(str(out))
    assert back.config == cfg
    assert record["step"] == 7
    assert back.params.keys() == model.params.keys()
    for name, p in model.params.items():
        assert back.params[name].dtype == np.float32
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)
    idx = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_array_equal(back.forward(idx), model.forward(idx))


def test_the_llama_folder_has_llamas_names_layouts_and_config_fields(tmp_path):
    cfg = llama_config(tie_embeddings=False, rope_theta=500.0)
    path, model = checkpoint(tmp_path, cfg)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    tensors = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    C, hs, F, p = 16, 4, 40, model.params
    one = "model.layers.1."
    layer = {name[len(one):]: t.shape for name, t in tensors.items() if name.startswith(one)}
    assert layer == {"input_layernorm.weight": (C,), "self_attn.q_proj.weight": (4 * hs, C),
                     "self_attn.k_proj.weight": (2 * hs, C), "self_attn.v_proj.weight": (2 * hs, C),
                     "self_attn.o_proj.weight": (C, C), "post_attention_layernorm.weight": (C,),
                     "mlp.gate_proj.weight": (F, C), "mlp.up_proj.weight": (F, C), "mlp.down_proj.weight": (C, F)}
    assert {n for n in tensors if not n.startswith("model.layers.")} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    # HF's Linear is (out, in): our (in, out) columns [q | k | v] and [gate | up], each transposed
    w_attn = p["h.1.attn.c_attn.weight"]
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"], w_attn[:, :C].T)
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.k_proj.weight"], w_attn[:, C:C + 2 * hs].T)
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.v_proj.weight"], w_attn[:, C + 2 * hs:].T)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate_proj.weight"], p["h.1.mlp.c_fc.weight"][:, :F].T)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.up_proj.weight"], p["h.1.mlp.c_fc.weight"][:, F:].T)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.weight"], p["h.1.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.o_proj.weight"], p["h.1.attn.c_proj.weight"].T)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], p["wte"])
    np.testing.assert_array_equal(tensors["model.norm.weight"], p["ln_f.weight"])
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert {k: hf[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                               "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                               "attention_bias", "mlp_bias", "tie_word_embeddings")} == {
        "model_type": "llama", "vocab_size": 97, "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "hidden_act": "silu",
        "max_position_embeddings": 12, "rms_norm_eps": 1e-5, "rope_theta": 500.0, "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}


def test_old_llama_files_with_rotary_buffers_and_transformers_5s_rope_parameters_are_read(tmp_path):
    cfg = llama_config(rope_theta=500.0)
    path, model = checkpoint(tmp_path, cfg)
    out = tmp_path / "hf"
    export(path, str(out), log=lambda m: None)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)  # a buffer, not a weight
    (out / "model.safetensors").write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    hf = json.loads((out / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "numpy_gpt"):
        del hf[key]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    (out / "config.json").write_text(json.dumps(hf))
    back, _ = load_hf_model(str(out))
    assert back.config == cfg
    idx = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_array_equal(back.forward(idx), model.forward(idx))


def test_the_folder_has_gpt2_names_layouts_and_config_fields(tmp_path):
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=12,
                      use_learned_pos=False, tie_embeddings=False, activation="relu")
    path, model = checkpoint(tmp_path, cfg)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    tensors = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    C = 16
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D: (in, out), as ours
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (C, 24)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (24, C)
    assert tensors["transformer.wpe.weight"].shape == (12, C)  # the sinusoidal table, written out
    np.testing.assert_array_equal(tensors["lm_head.weight"], model.params["lm_head.weight"])
    np.testing.assert_array_equal(tensors["transformer.wpe.weight"], model.positions())
    assert all(t.dtype == np.float32 for t in tensors.values())
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: hf[k] for k in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                               "activation_function", "layer_norm_epsilon", "tie_word_embeddings")} == {
        "model_type": "gpt2", "vocab_size": 97, "n_positions": 12, "n_embd": 16, "n_layer": 2, "n_head": 2,
        "n_inner": 24, "activation_function": "relu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False}
    assert hf["architectures"] == ["GPT2LMHeadModel"]


def test_gpt2s_own_file_layout_is_read_too(tmp_path):
    """openai-community/gpt2's model.safetensors: names without "transformer.", the causal-mask
    buffers h.{i}.attn.bias, and no numpy_gpt record in config.json."""
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=64, n_layers=2, max_seq_len=12,
                      use_learned_pos=True)
    path, model = checkpoint(tmp_path, cfg)
    out = tmp_path / "hf"
    export(path, str(out), log=lambda m: None)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    plain = {k[len("transformer."):]: v for k, v in tensors.items()}
    for i in range(2):
        plain[f"h.{i}.attn.bias"] = np.tril(np.ones((12, 12), np.float32))[None, None]
    plain["lm_head.weight"] = plain["wte.weight"]  # some files keep the tied head as well
    (out / "model.safetensors").write_bytes(safetensors.numpy.save(plain, metadata={"format": "pt"}))
    hf = json.loads((out / "config.json").read_text())
    for key in ("numpy_gpt", "n_inner", "activation_function", "tie_word_embeddings"):  # GPT-2's defaults
        del hf[key]
    (out / "config.json").write_text(json.dumps(hf))
    back, record = load_hf_model(str(out))
    assert back.config == cfg
    assert record.get("step") is None  # not our export: no record
    for name, p in model.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)


def test_half_precision_is_widened_and_bfloat16_refused_with_a_hint(tmp_path):
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_seq_len=12, use_learned_pos=True)
    path, model = checkpoint(tmp_path, cfg)
    out = tmp_path / "hf"
    export(path, str(out), log=lambda m: None)
    half = {k: v.astype(np.float16) for k, v in safetensors.numpy.load_file(str(out / "model.safetensors")).items()}
    data = safetensors.numpy.save(half, metadata={"format": "pt"})
    (out / "model.safetensors").write_bytes(data)
    back, _ = load_hf_model(str(out))
    assert back.params["wte"].dtype == np.float32
    np.testing.assert_array_equal(back.params["wte"], model.params["wte"].astype(np.float16).astype(np.float32))
    # the same bytes labelled bfloat16 (NumPy has no such type): rewrite the header's dtypes, re-pad it to 8 bytes
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].rstrip(b" ").replace(b'"F16"', b'"BF16"')
    header += b" " * (-len(header) % 8)
    (out / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])
    with pytest.raises(HFError, match="is BF16, which NumPy cannot read: save the model in float32"):
        load_hf_model(str(out))


def test_weights_sharded_over_several_files_are_read(tmp_path):
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=12, use_learned_pos=True)
    path, model = checkpoint(tmp_path, cfg)
    out = tmp_path / "hf"
    export(path, str(out), log=lambda m: None)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    os.unlink(out / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for i, (key, value) in enumerate(sorted(tensors.items())):
        shards[sorted(shards)[i % 2]][key] = value
    for name, part in shards.items():
        safetensors.numpy.save_file(part, str(out / name), metadata={"format": "pt"})
    weight_map = {key: name for name, part in shards.items() for key in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    back, _ = load_hf_model(str(out))
    for name, p in model.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)
    weight_map["transformer.wte.weight"] = "../elsewhere.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(HFError, match="outside the folder"):
        load_hf_model(str(out))


def test_a_sinusoidal_table_changed_elsewhere_comes_back_as_learned_positions(tmp_path):
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_seq_len=12)
    path, model = checkpoint(tmp_path, cfg)
    out = tmp_path / "hf"
    export(path, str(out), log=lambda m: None)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    tensors["transformer.wpe.weight"][3, 5] += 0.5  # fine-tuned in transformers, say
    (out / "model.safetensors").write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    back, _ = load_hf_model(str(out))
    assert back.config.use_learned_pos
    np.testing.assert_array_equal(back.params["wpe"], tensors["transformer.wpe.weight"])


def edit_config(folder, **changes):
    path = Path(folder) / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


# config.json edits that describe a model the weights do not hold, or one we do not compute
REFUSED = {"gpt2": [
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"n_embd": 10**9}, "n_embd must be an integer from 1 to"),
    ({"n_layer": -1}, "n_layer must be"),
    ({"vocab_size": "50257"}, "vocab_size must be"),
    ({"n_head": 3}, "divisible"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"n_layer": 3}, "missing ['transformer.h.2."),
    ({"n_inner": 32}, "h.0.mlp.c_fc.weight has shape (16, 24), config.json implies (16, 32)"),
], "llama": [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'default'"),
    ({"rope_theta": 0.5}, "rope_theta must be a number in (1, 1e+12]"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 8}, "head_dim 8 times num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "divisible by n_kv_heads"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be"),
    ({"hidden_size": 10**9}, "hidden_size must be an integer from 1 to"),
    ({"num_hidden_layers": 3}, "missing ['model.layers.2."),
    ({"intermediate_size": 48}, "model.layers.0.mlp.gate_proj.weight has shape (40, 16), config.json implies (48, 16)"),
    ({"tie_word_embeddings": False}, "missing ['lm_head.weight']"),
]}


@pytest.mark.parametrize("arch, changes, says", [(arch, c, s) for arch, cases in REFUSED.items() for c, s in cases])
def test_folders_we_cannot_compute_exactly_are_refused_before_allocating(tmp_path, arch, changes, says):
    cfg = llama_config() if arch == "llama" else \
        ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=12)
    path, _ = checkpoint(tmp_path, cfg)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(HFError) as e:
        load_hf_model(str(tmp_path / "hf"))
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_pickled_pytorch_weights_and_missing_files_are_refused(tmp_path, capsys):
    binonly = tmp_path / "gpt2-bin"
    binonly.mkdir()
    (binonly / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (binonly / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    with pytest.raises(HFError, match="pytorch_model.bin .* convert it to model.safetensors"):
        load_hf_model(str(binonly))
    assert generate.main(["--checkpoint", str(binonly), "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "safetensors" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="pytorch_model.bin .* convert it to model.safetensors"):
        train.main(["--init_from", str(binonly), "--train_data", "unused.jsonl"])
    with pytest.raises(HFError, match="no config.json"):
        load_hf_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFError, match="no model.safetensors"):
        load_hf_model(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{]")
    with pytest.raises(HFError, match="config.json: malformed JSON"):
        load_hf_model(str(broken))


def test_without_safetensors_export_says_what_to_install(tmp_path, monkeypatch, capsys):
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_seq_len=12)
    path, _ = checkpoint(tmp_path, cfg)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(SystemExit) as e:
        export_hf.main([path, str(tmp_path / "hf")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: the Hugging Face interchange needs the safetensors package: pip install safetensors\n"
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("feature, says", [({"qk_norm": True}, "QK-norm (--qk_norm)"),
                                           ({"logit_softcap": 30.0}, "soft-capped logits (--logit_softcap 30)")])
def test_qk_norm_and_soft_capped_logits_are_refused_in_one_line(tmp_path, capsys, arch, feature, says):
    """transformers' GPT-2 and Llama compute neither: such an export would load there as another model."""
    cfg = ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_seq_len=12, arch=arch, **feature)
    path, _ = checkpoint(tmp_path, cfg)
    with pytest.raises(SystemExit) as e:
        export_hf.main([path, str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: the model has {says}, which transformers' GPT2LMHeadModel and "
                          "LlamaForCausalLM do not compute")
    assert "train without it to export" in err
    assert not (tmp_path / "hf").exists() and os.listdir(tmp_path) == [os.path.basename(path)]


def test_export_never_writes_over_other_files_but_replaces_its_own(tmp_path, bpe_tok):
    cfg = ModelConfig(vocab_size=bpe_tok.n_vocab, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_seq_len=12)
    path, _ = checkpoint(tmp_path, cfg, bpe_tok)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(HFError, match="not empty"):
        export(path, str(other), log=lambda m: None)
    out = tmp_path / "hf"
    assert "vocab.json" in export(path, str(out), log=lambda m: None)
    plain, _ = checkpoint(tmp_path, ModelConfig(vocab_size=97, d_model=16, n_heads=2, d_ff=24, n_layers=1,
                                                max_seq_len=12), seed=1)
    assert export(plain, str(out), log=lambda m: None) == ["README.md", "config.json", "model.safetensors"]  # no vocab
    (out / "tokenizer.json").write_text("{}")  # transformers would prefer it to vocab.json
    with pytest.raises(HFError, match="tokenizer.json"):
        export(plain, str(out), log=lambda m: None)


# ----------------------------------------------------------------------------- tokenizer files

def test_our_bpe_survives_vocab_json_and_merges_txt(tmp_path, bpe_tok):
    write_vocab_merges(bpe_tok.model, tmp_path / "vocab.json", tmp_path / "merges.txt")
    back = model_from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert back.vocab == bpe_tok.model.vocab
    assert back.merges == bpe_tok.model.merges and back.merge_ids == bpe_tok.model.merge_ids
    assert back.specials == bpe_tok.model.specials
    tok = load_bpe(str(tmp_path / "vocab.json"), verbose=False)
    for text in TRICKY + sample_lines(100):
        ids = bpe_tok.encode(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids) == bpe_tok.decode(ids) == text
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + len(bpe_tok.model.merges)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Ġ"] == ord(" ") and vocab["Ċ"] == ord("\n") and vocab[ENDOFTEXT] == bpe_tok.eot_id  # GPT-2's spelling


def test_write_vocab_merges_refuses_what_the_pair_cannot_say(tmp_path, bpe_tok):
    from bpe import BPEModel
    from errors import TokenizerError
    m = bpe_tok.model
    other_pattern = BPEModel(m.vocab, m.merges, m.specials, pattern=r"\S+|\s+", merge_ids=m.merge_ids)
    with pytest.raises(TokenizerError, match="pattern"):
        write_vocab_merges(other_pattern, tmp_path / "v.json", tmp_path / "m.txt")
    vocab = list(m.vocab)
    vocab[300] = b"<|x|>"  # would read back as a special token
    with pytest.raises(TokenizerError, match="special"):
        write_vocab_merges(BPEModel(vocab, m.merges, m.specials, merge_ids=m.merge_ids), tmp_path / "v.json",
                           tmp_path / "m.txt")
    assert not (tmp_path / "v.json").exists()


def test_gpt2_vocab_and_merges_encode_exactly_as_tiktoken(gpt2_pair):
    vocab = json.loads((gpt2_pair / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab[ENDOFTEXT] == 50256 and vocab["Ġthe"] == 262
    merges = (gpt2_pair / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(merges) == 1 + 50000 and merges[1:3] == ["Ġ t", "Ġ a"]  # GPT-2's first merges
    ours = load_bpe(str(gpt2_pair / "vocab.json"), verbose=False)
    tiktok = load_tiktoken("gpt2", verbose=False)
    text = "\n".join(sample_lines(300))
    assert ours.encode(text) == tiktok.encode(text)
    for t in TRICKY:
        assert ours.encode(t) == tiktok.encode(t), t
        assert ours.decode(tiktok.encode(t)) == t


# ----------------------------------------------------------------------------- import paths

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_from_the_folder_matches_generate_from_the_checkpoint(tmp_path, bpe_tok, capsys, arch):
    cfg = ModelConfig(vocab_size=bpe_tok.n_vocab, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=32,
                      tie_embeddings=False, arch=arch)
    path, _ = checkpoint(tmp_path, cfg, bpe_tok)
    assert export_hf.main([path, str(tmp_path / "hf")]) == 0
    assert "vocab.json" in capsys.readouterr().out
    flags = ["--prompt", "Once upon a time", "--max_length", "12", "--temperature", "0"]
    outs = []
    for source in (path, str(tmp_path / "hf")):
        out, err = io.StringIO(), io.StringIO()
        assert generate.main(["--checkpoint", source] + flags, out=out, err=err) == 0, err.getvalue()
        outs.append(out.getvalue())
    assert outs[0] == outs[1] and outs[0].count("Once upon a time") == 1
    out, err = io.StringIO(), io.StringIO()
    assert generate.main(["--checkpoint", str(tmp_path / "hf"), "--d_model", "32"] + flags, out=out, err=err) == 1
    assert "--d_model 32 (checkpoint: 16)" in err.getvalue()


def test_gpt2_folder_without_tokenizer_files_samples_with_tiktoken(tmp_path):
    cfg = ModelConfig(vocab_size=50257, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_seq_len=16)
    path, _ = checkpoint(tmp_path, cfg)
    out_dir = tmp_path / "hf"
    export(path, str(out_dir), log=lambda m: None)
    for name in ("vocab.json", "merges.txt"):
        os.unlink(out_dir / name)
    out, err = io.StringIO(), io.StringIO()
    args = ["--prompt", "Once upon a time", "--max_length", "5", "--temperature", "0"]
    assert generate.main(["--checkpoint", str(out_dir)] + args, out=out, err=err) == 0, err.getvalue()
    assert "tokenizer gpt2" in err.getvalue()
    ref = io.StringIO()
    assert generate.main(["--checkpoint", path] + args, out=ref, err=io.StringIO()) == 0
    assert out.getvalue() == ref.getvalue()


def write_counting_data(path, n_docs, seed, vocab=64):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            start, length = rng.integers(0, vocab - 4), rng.integers(10, 30)
            f.write(json.dumps([int((start + i) % (vocab - 4)) for i in range(length)] + [vocab - 1]) + "\n")
    return str(path)


def one_step_from_export(tmp_path, cfg):
    """A random model of cfg exported to tmp_path/hf, and train.py's flags for one step from that folder at
    a learning rate too small to move a float32 weight: the final weights are the folder's."""
    path, model = checkpoint(tmp_path, cfg)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    data = write_counting_data(tmp_path / "train.jsonl", 200, 1), write_counting_data(tmp_path / "val.jsonl", 20, 2)
    base = ["--init_from", str(tmp_path / "hf"), "--train_data", data[0], "--val_data", data[1], "--batch_size", "4",
            "--max_steps", "1", "--learning_rate", "1e-30", "--min_lr", "0", "--warmup_steps", "0",
            "--eval_batches", "1", "--no_progress"]
    return model, base


def test_train_init_from_takes_the_folders_weights_and_architecture(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=24,
                      use_learned_pos=True, tie_embeddings=False, activation="relu")
    model, base = one_step_from_export(tmp_path, cfg)
    assert train.main(base + ["--save_dir", str(tmp_path / "a")]) == 0
    ck = load_checkpoint(str(tmp_path / "a" / "checkpoint_final.npz"))
    assert ck.config == cfg
    assert ck.meta["train_args"]["seq_len"] == 24  # n_positions, as no --seq_len was given
    for name, p in model.params.items():
        np.testing.assert_array_equal(ck.params[name], p, err_msg=name)
    assert "initialised from" in capsys.readouterr().out
    # flags that agree, and a shorter window, are fine; a different architecture is an error
    assert train.main(base + ["--save_dir", str(tmp_path / "b"), "--d_model", "16", "--activation", "relu",
                              "--seq_len", "8"]) == 0
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint_final.npz")).config == cfg
    for wrong, says in ((["--d_model", "32"], "--d_model 32 (folder: 16)"),
                        (["--seq_len", "48"], "--seq_len 48 (folder's context: 24)"),
                        (["--activation", "gelu"], "--activation gelu (folder: relu)"),
                        (["--vocab_size", "50257"], "--vocab_size 50257 (folder: 64)"),
                        (["--qk_norm"], "--qk_norm True (folder: False)"),
                        (["--logit_softcap", "30"], "--logit_softcap 30.0 (folder: 0.0)")):
        with pytest.raises(SystemExit) as e:
            train.main(base + ["--save_dir", str(tmp_path / "c")] + wrong)
        assert says in str(e.value) and "Leave the model flags out" in str(e.value)
    with pytest.raises(SystemExit, match="has no config.json"):
        train.main(base[:1] + [str(tmp_path)] + base[2:] + ["--save_dir", str(tmp_path / "d")])


def test_train_init_from_a_llama_folder_takes_its_weights_and_architecture(tmp_path):
    cfg = llama_config(vocab_size=64, max_seq_len=24, rope_theta=500.0, tie_embeddings=False)
    model, base = one_step_from_export(tmp_path, cfg)
    assert train.main(base + ["--save_dir", str(tmp_path / "a")]) == 0
    ck = load_checkpoint(str(tmp_path / "a" / "checkpoint_final.npz"))
    assert ck.config == cfg
    for name, p in model.params.items():
        np.testing.assert_array_equal(ck.params[name], p, err_msg=name)
    with pytest.raises(SystemExit) as e:
        train.main(base + ["--save_dir", str(tmp_path / "c"), "--arch", "gpt2"])
    assert "--arch gpt2 (folder: llama)" in str(e.value)
    with pytest.raises(SystemExit) as e:  # the folder gives the initial weights: zeroing them would be lost
        train.main(base + ["--save_dir", str(tmp_path / "z"), "--zero_init_proj"])
    assert "--zero_init_proj sets the initial weights, and --init_from" in str(e.value)
    assert not (tmp_path / "z").exists()


def test_given_flags_sees_flags_set_to_their_default_values():
    import train_flags
    parser = train_flags.build_parser()
    given = train_flags.given_flags(parser, ["--train_data", "x", "--d_model", "128", "--use_learned_pos"])
    assert {"train_data", "d_model", "use_learned_pos"} <= given
    assert not given & {"n_heads", "seq_len", "no_tie_embeddings", "vocab_size"}


# ----------------------------------------------------------------------------- transformers as the oracle

def import_transformers():
    pytest.importorskip("torch", reason="comparing with transformers needs torch (not a numpy-gpt dependency)")
    return pytest.importorskip("transformers", reason="comparing with transformers needs transformers installed")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_transformers_loads_the_export_and_computes_the_same_logits(tmp_path, variant, capfd):
    transformers = import_transformers()
    import torch
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=4, d_ff=48, n_layers=2, max_seq_len=16, **variant)
    path, model = checkpoint(tmp_path, cfg)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    capfd.readouterr()
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert type(hf_model).__name__ == ("LlamaForCausalLM" if cfg.arch == "llama" else "GPT2LMHeadModel")
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    err = capfd.readouterr().err  # transformers 5 prints a LOAD REPORT of such keys, 4 "weights ... were not ..."
    assert not any(word in err for word in ("LOAD REPORT", "MISSING", "UNEXPECTED", "were not", "newly initialized")), err
    idx = np.random.default_rng(1).integers(0, 97, (2, 16))
    with torch.no_grad():
        theirs = hf_model.eval()(torch.tensor(idx)).logits.numpy()
    ours = model.forward(idx)
    diff = float(np.abs(theirs - ours).max())
    print(f"{variant_id(variant)}: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_greedy_text_is_ours(tmp_path, bpe_tok, arch):
    """The export's tokenizer and model in transformers continue a prompt greedily as generate.py does."""
    transformers = import_transformers()
    import torch
    cfg = ModelConfig(vocab_size=bpe_tok.n_vocab, d_model=32, n_heads=4, d_ff=48, n_layers=2, max_seq_len=64,
                      arch=arch, tie_embeddings=False)
    path, _ = checkpoint(tmp_path, cfg, bpe_tok)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    out, err = io.StringIO(), io.StringIO()
    assert generate.main(["--checkpoint", path, "--prompt", "Once upon a time", "--max_length", "20",
                          "--temperature", "0", "--num_samples", "1"], out=out, err=err) == 0, err.getvalue()
    ours = out.getvalue().split("-----\n", 1)[1].strip()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    prompt = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        ids = hf_model.generate(**prompt, max_new_tokens=20, do_sample=False, eos_token_id=bpe_tok.eot_id,
                                pad_token_id=bpe_tok.eot_id)
    theirs = tok.decode(ids[0], skip_special_tokens=True).strip()
    print(f"{arch}: {ours!r}")
    assert len(ours) > len("Once upon a time") and theirs == ours


def test_transformers_tokenizer_encodes_as_ours(tmp_path, bpe_tok):
    transformers = import_transformers()
    tiktok = load_tiktoken("gpt2", verbose=False)
    for name, tok in (("bpe", bpe_tok), ("gpt2", tiktok)):
        cfg = ModelConfig(vocab_size=tok.n_vocab, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_seq_len=512)
        path, _ = checkpoint(tmp_path, cfg, tok)
        out = tmp_path / name
        export(path, str(out), log=lambda m: None)
        theirs = transformers.AutoTokenizer.from_pretrained(str(out))
        assert theirs.eos_token_id == tok.eot_id
        for text in TRICKY + sample_lines(50):
            ids = tok.encode(text)
            assert theirs(text)["input_ids"] == ids, (name, text)
            assert theirs.decode(ids) == text


def test_a_folder_saved_by_transformers_imports_with_the_same_logits(tmp_path):
    transformers = import_transformers()
    import torch
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=101, n_positions=20, n_embd=32, n_layer=2, n_head=4)
    hf_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # GPT-2's initialisation leaves biases at zero and gains at one: move them all
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    model, _ = load_hf_model(str(tmp_path / "hf"))
    assert model.config == ModelConfig(vocab_size=101, d_model=32, n_heads=4, d_ff=128, n_layers=2, max_seq_len=20,
                                       use_learned_pos=True, tie_embeddings=True, activation="gelu")
    idx = np.random.default_rng(2).integers(0, 101, (2, 20))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(idx)).logits.numpy()
    assert float(np.abs(model.forward(idx) - theirs).max()) < 1e-4


def test_a_llama_folder_saved_by_transformers_imports_with_the_same_logits(tmp_path):
    transformers = import_transformers()
    import torch
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=20,
                                      rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # the gains start at one: move them all
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    model, _ = load_hf_model(str(tmp_path / "hf"))
    assert model.config == ModelConfig(arch="llama", vocab_size=101, d_model=32, n_heads=4, n_kv_heads=2, d_ff=80,
                                       n_layers=2, max_seq_len=20, rope_theta=500.0, norm_eps=1e-6,
                                       tie_embeddings=False)
    idx = np.random.default_rng(2).integers(0, 101, (2, 20))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(idx)).logits.numpy()
    assert float(np.abs(model.forward(idx) - theirs).max()) < 1e-4


def test_a_folder_without_tokenizer_files_or_gpt2s_vocabulary_asks_for_one(tmp_path):
    cfg = ModelConfig(vocab_size=300, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_seq_len=16)
    path, _ = checkpoint(tmp_path, cfg)
    export(path, str(tmp_path / "hf"), log=lambda m: None)
    err = io.StringIO()
    assert generate.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "Hi"], out=io.StringIO(), err=err) == 1
    assert "no vocab.json + merges.txt and vocab_size 300" in err.getvalue() and "--model_file" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    bpe = train_bpe(SAMPLE.read_text(encoding="utf-8")[:20_000], 300)  # a tokenizer of that size, given by flags
    (tmp_path / "bpe.json").write_text(bpe.to_json(), encoding="utf-8")
    assert generate.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "Hi", "--max_length", "3",
                          "--tokenizer_type", "lecture2_bpe", "--model_file", str(tmp_path / "bpe.json")],
                         out=out, err=err) == 0, err.getvalue()
    assert out.getvalue().splitlines()[1].startswith("Hi")


def test_a_llama_model_with_the_relu2_mlp_is_refused_in_one_line(tmp_path, capsys):
    """transformers' Llama MLP is always gated: a two-matrix relu2 MLP has no Hugging Face form."""
    path, _ = checkpoint(tmp_path, llama_config(activation="relu2"))
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as e:
        export_hf.main([path, str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: --arch llama with --activation relu2 cannot be exported: ")
    assert err.count("\n") == 1 and "nothing was written" in err and not out.exists()
