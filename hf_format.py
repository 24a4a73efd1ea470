"""[interchange] The Hugging Face format: a model folder as `transformers` writes it, read and written here.

export_hf.py writes a checkpoint as such a folder; train.py --init_from and generate.py
--checkpoint DIR read one (an export, or a folder transformers saved). A GPT-2 checkpoint becomes
what `save_pretrained` writes for a GPT2LMHeadModel, a Llama one (arch "llama") a LlamaForCausalLM:
    config.json              GPT2Config: vocab_size, n_positions (our max_seq_len), n_embd (d_model),
                             n_layer, n_head, n_inner (d_ff), activation_function ("gelu_new", the tanh
                             GELU, "relu" or "relu2"), layer_norm_epsilon, tie_word_embeddings, bos/eos ids;
                             or LlamaConfig: hidden_size, intermediate_size (d_ff), num_hidden_layers,
                             num_attention_heads, num_key_value_heads, head_dim, hidden_act "silu",
                             rms_norm_eps, rope_theta, max_position_embeddings, no biases, ...; in both,
                             "numpy_gpt": our own config, step and tokenizer, for the record
    model.safetensors        float32 tensors (layout below)
    vocab.json, merges.txt   the byte-level BPE in GPT-2's spelling (gpt2_files.write_vocab_merges)
    tokenizer_config.json, special_tokens_map.json    <|endoftext|> as bos/eos/unk
    README.md                the model card (model_card.py), when the writer gives one

GPT-2: our parameters already have GPT-2's names and layouts: HF's Conv1D keeps its weight as (in,
out), as we do, so no array is transposed; the safetensors names are transformer.<our name>:
transformer.wte.weight (V, C), transformer.h.{i}.attn.c_attn.weight (C, 3C), ..., and lm_head.weight
(V, C) if untied. Every variant maps onto GPT-2's function: sinusoidal positions become a fixed wpe
table (read back as sinusoidal when it still is that table), ReLU and ReLU^2 are activation_function
"relu" and "relu2", an untied head keeps its own lm_head.weight.

Llama: HF's nn.Linear keeps its weight as (out, in), so each of our block matrices is the
transpose of one HF tensor or of several side by side: attn.c_attn = [q_proj | k_proj | v_proj]^T,
attn.c_proj = o_proj^T, mlp.c_fc = [gate_proj | up_proj]^T, mlp.c_proj = down_proj^T; ln_1, ln_2 and
ln_f are input_layernorm, post_attention_layernorm and model.norm, wte is model.embed_tokens. No
rotary permutation: llama.py pairs dimensions i and i + hs/2 as HF's rotate_half does.

Neither class computes QK-norm or soft-capped logits (ModelConfig.qk_norm, logit_softcap): a model
with either is refused (check_exportable), since its export would load there and compute another function.

What differs between architectures is in two places: config.json <-> ModelConfig (a writer and a
reader per model_type, CONFIG_WRITERS and MODEL_TYPES) and the tensors (layout: which HF tensors
make each of our parameters). Reading trusts nothing in the folder: the tensors' names, shapes and
dtypes in the safetensors headers are checked against config.json before a model is built from
its numbers.

safetensors is an optional extra (`pip install safetensors`): only this interchange needs it.
"""
import json
import os
import re
import secrets
import shutil

import numpy as np

from atomic import atomic_write
from config import FIELD_RANGES, GPT2_VOCAB_SIZE, LN_EPS, ROPE_THETA, ModelConfig, name_mismatch, param_shapes
from embeddings import sinusoidal_positions
from errors import HFError
from gpt2_files import write_vocab_merges
from language_model import LanguageModel
from pretokens import ENDOFTEXT
from tokenizer import load_bpe, load_tiktoken
from untrusted import read_json, regular_file

EXPORT_FORMAT = "numpy-gpt hf export"
EXPORT_VERSION = 1
GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # HF's names for GPT-2's tanh GELU; "gelu" is erf
# Files an export writes; a re-export into the same folder replaces the whole folder.
EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json", "README.md")
# Largest config values accepted on import (checked before anything is allocated): GPT2Config's names,
# then LlamaConfig's for the same sizes.
# config.json's keys -> the ModelConfig field each one is: its range is that field's (config.FIELD_RANGES), the
# same as train.py's flags, so that every model the project trains can be read back, and nothing else
FIELDS = {"vocab_size": "vocab_size", "n_positions": "max_seq_len", "n_embd": "d_model", "n_layer": "n_layers",
          "n_head": "n_heads", "n_inner": "d_ff", "max_position_embeddings": "max_seq_len", "hidden_size": "d_model",
          "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
          "head_dim": "d_model", "intermediate_size": "d_ff", "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"}
# Our arch -> {our activation: transformers' name for it}, the feed-forwards transformers computes; a model with
# another is not exported (check_exportable). transformers' Llama MLP is always gated, down(act(gate) * up):
# the Llama block's SwiGLU exports as hidden_act "silu", its two-matrix relu2 MLP cannot.
HF_ACTIVATIONS = {"gpt2": {"gelu": "gelu_new", "relu": "relu", "relu2": "relu2"}, "llama": {"swiglu": "silu"}}
# Not weights: old GPT-2 files keep the causal mask, old Llama files the rotary frequencies.
BUFFER_RE = re.compile(r"h\.\d+\.attn\.(masked_)?bias$|\.rotary_emb\.inv_freq$")


def safetensors_numpy():
    """The safetensors package's NumPy API, or a one-line error naming the pip command."""
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError("the Hugging Face interchange needs the safetensors package: pip install safetensors") from None
    return safetensors.numpy


# ----------------------------------------------------------------------------- config.json <-> ModelConfig

def check_feed_forward(config, source):
    """HFError in one line for a feed-forward transformers does not compute: one not in HF_ACTIVATIONS (the
    Llama block's relu2 MLP: transformers' Llama MLP is always gated). export_gguf checks its own."""
    known = HF_ACTIVATIONS[config.arch]
    if config.activation not in known:
        raise HFError(f"{source}: --arch {config.arch} with --activation {config.activation} cannot be exported: "
                      f"transformers' {config.arch} model takes --activation {' or '.join(known)} only (its Llama MLP "
                      "is always gated, SwiGLU); nothing was written")


def check_exportable(config, source, error=HFError, reader="transformers' GPT2LMHeadModel and LlamaForCausalLM"):
    """Refuse, in one line, a model with an option that `reader` does not compute (QK-norm, soft-capped
    logits): its export would load there without complaint and compute another function."""
    lacks = []
    if config.qk_norm:
        lacks.append("QK-norm (--qk_norm)")
    if config.logit_softcap:
        lacks.append(f"soft-capped logits (--logit_softcap {config.logit_softcap:g})")
    if lacks:
        raise error(f"{source}: the model has {' and '.join(lacks)}, which {reader} do not compute, so the export "
                    "would be another model; use it with generate.py here, or train without it to export")


def gpt2_config_json(config, eot_id, record):
    """GPT2Config fields (config.json) describing our ModelConfig; `record` goes under "numpy_gpt"."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": HF_ACTIVATIONS["gpt2"][config.activation],
        "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
        "use_cache": True,
        "numpy_gpt": record,
    }


def _field(value, key, source):
    """value, checked against the range of the ModelConfig field that config.json's key is (FIELDS)."""
    try:
        return FIELD_RANGES[FIELDS[key]].check(value, key)
    except ValueError as e:
        raise HFError(f"{source}: {e}") from None


def _int_field(hf, key, source):
    return _field(hf.get(key), key, source)


def config_from_gpt2_json(hf, source):
    """Our ModelConfig (learned positions) from GPT2Config fields; errors for what we do not compute."""
    C = _int_field(hf, "n_embd", source)
    d_ff = hf.get("n_inner")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_NAMES + ("relu", "relu2"):
        raise HFError(f"{source}: activation_function {act!r} is not computed here; numpy-gpt has GPT-2's tanh "
                      f"GELU ({' / '.join(GELU_NAMES)}), relu and relu2")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or abs(eps - LN_EPS) > 1e-12:
        raise HFError(f"{source}: layer_norm_epsilon {eps!r}; numpy-gpt's layer norm uses {LN_EPS}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise HFError(f"{source}: {key} is {hf.get(key)!r}; numpy-gpt computes GPT-2 with {key} = {want}")
    tie = hf.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise HFError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")
    try:
        return ModelConfig(vocab_size=_int_field(hf, "vocab_size", source), d_model=C,
                           n_heads=_int_field(hf, "n_head", source), n_layers=_int_field(hf, "n_layer", source),
                           d_ff=None if d_ff is None else _int_field(hf, "n_inner", source),  # None: 4 C
                           max_seq_len=_int_field(hf, "n_positions", source), use_learned_pos=True,
                           tie_embeddings=tie, activation="gelu" if act in GELU_NAMES else act)
    except ValueError as e:
        raise HFError(f"{source}: {e}") from None


def llama_config_json(config, eot_id, record):
    """LlamaConfig fields (config.json) describing our ModelConfig of arch "llama"; `record` goes under
    "numpy_gpt". The fields whose LlamaConfig defaults are not ours are all written (rms_norm_eps:
    Llama 1's 1e-6 there; tie_word_embeddings: false there)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.d_model // config.n_heads,
        "hidden_act": HF_ACTIVATIONS["llama"][config.activation],
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
        "use_cache": True,
        "numpy_gpt": record,
    }


def _rope_theta(hf, source):
    """The rotary base of a LlamaConfig: rope_theta with no rope_scaling (transformers 4), or
    rope_parameters {"rope_type": "default", "rope_theta": ...} (transformers 5)."""
    rope = hf.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise HFError(f"{source}: rope_parameters {rope!r}; numpy-gpt computes the plain rotary embedding "
                          "(rope_type 'default')")
        theta = rope.get("rope_theta", ROPE_THETA)
    else:
        if hf.get("rope_scaling") is not None:
            raise HFError(f"{source}: rope_scaling {hf.get('rope_scaling')!r}; numpy-gpt computes the plain rotary "
                          "embedding (rope_scaling null)")
        theta = hf.get("rope_theta", ROPE_THETA)
    return float(_field(theta, "rope_theta", source))


def config_from_llama_json(hf, source):
    """Our ModelConfig of arch "llama" from LlamaConfig fields; errors for what we do not compute."""
    C = _int_field(hf, "hidden_size", source)
    H = _int_field(hf, "num_attention_heads", source)
    Hkv = _int_field(hf, "num_key_value_heads", source) if hf.get("num_key_value_heads") is not None else H
    if hf.get("head_dim") is not None and _int_field(hf, "head_dim", source) * H != C:
        raise HFError(f"{source}: head_dim {hf['head_dim']} times num_attention_heads {H} is not hidden_size {C}; "
                      "numpy-gpt's heads split the model width")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(f"{source}: hidden_act {act!r}; numpy-gpt's Llama block is SwiGLU (hidden_act 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False) is not False:
            raise HFError(f"{source}: {key} is {hf.get(key)!r}; numpy-gpt's Llama block has no biases")
    eps = _field(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", source)  # the default: LlamaConfig's
    tie = hf.get("tie_word_embeddings", False)  # LlamaConfig's default
    if not isinstance(tie, bool):
        raise HFError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")
    try:
        return ModelConfig(arch="llama", vocab_size=_int_field(hf, "vocab_size", source), d_model=C, n_heads=H,
                           n_kv_heads=Hkv, n_layers=_int_field(hf, "num_hidden_layers", source),
                           d_ff=_int_field(hf, "intermediate_size", source),
                           max_seq_len=_int_field(hf, "max_position_embeddings", source),
                           rope_theta=_rope_theta(hf, source), norm_eps=float(eps), tie_embeddings=tie)
    except ValueError as e:
        raise HFError(f"{source}: {e}") from None


# Our arch -> its config.json writer; config.json's model_type -> the ModelConfig it describes.
CONFIG_WRITERS = {"gpt2": gpt2_config_json, "llama": llama_config_json}
MODEL_TYPES = {"gpt2": config_from_gpt2_json, "llama": config_from_llama_json}


def config_from_json(hf, source):
    """Our ModelConfig from a config.json's fields (its model_type says which architecture)."""
    if not isinstance(hf, dict):
        raise HFError(f"{source} is not a JSON object")
    kind = hf.get("model_type", "gpt2")
    if kind not in MODEL_TYPES:
        raise HFError(f"{source}: model_type {kind!r}; numpy-gpt reads model_type 'gpt2' (GPT2LMHeadModel) or "
                      "'llama' (LlamaForCausalLM)")
    return MODEL_TYPES[kind](hf, source)


# ----------------------------------------------------------------------------- tensors

def hf_key(name):
    """The safetensors name of our parameter `name` in a GPT2LMHeadModel."""
    if name == "lm_head.weight":
        return name
    return f"transformer.{name}.weight" if name in ("wte", "wpe") else f"transformer.{name}"


def our_name(key):
    """Our parameter name for a GPT-2 safetensors name, with or without the "transformer." prefix."""
    name = key[len("transformer."):] if key.startswith("transformer.") else key
    return name[:-len(".weight")] if name in ("wte.weight", "wpe.weight") else name


def gpt2_layout(config):
    """{our name: (False, [(HF name, shape)])}: each parameter is one HF tensor, as it is; with the
    sinusoidal table as transformer.wpe.weight (written out, compared on reading, then dropped)."""
    shapes = param_shapes(config)
    if not config.use_learned_pos:
        shapes["wpe"] = (config.max_seq_len, config.d_model)
    return {name: (False, [(hf_key(name), shape)]) for name, shape in shapes.items()}


def llama_layout(config):
    """{our name: (transposed, [(HF name, HF shape), ...])}: our (in, out) block matrices are HF's (out, in)
    tensors transposed and set side by side along our columns, in the order listed."""
    V, C, F, H, Hkv = config.vocab_size, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads
    hs = C // H
    layout = {"wte": (False, [("model.embed_tokens.weight", (V, C))])}
    for i in range(config.n_layers):
        ours, hf = f"h.{i}.", f"model.layers.{i}."
        layout.update({
            ours + "ln_1.weight": (False, [(hf + "input_layernorm.weight", (C,))]),
            ours + "attn.c_attn.weight": (True, [(hf + "self_attn.q_proj.weight", (H * hs, C)),
                                                 (hf + "self_attn.k_proj.weight", (Hkv * hs, C)),
                                                 (hf + "self_attn.v_proj.weight", (Hkv * hs, C))]),
            ours + "attn.c_proj.weight": (True, [(hf + "self_attn.o_proj.weight", (C, C))]),
            ours + "ln_2.weight": (False, [(hf + "post_attention_layernorm.weight", (C,))]),
            ours + "mlp.c_fc.weight": (True, [(hf + "mlp.gate_proj.weight", (F, C)),
                                              (hf + "mlp.up_proj.weight", (F, C))]),
            ours + "mlp.c_proj.weight": (True, [(hf + "mlp.down_proj.weight", (C, F))]),
        })
    layout["ln_f.weight"] = (False, [("model.norm.weight", (C,))])
    if not config.tie_embeddings:
        layout["lm_head.weight"] = (False, [("lm_head.weight", (V, C))])
    return layout


# Our arch -> (its layout, the canonical spelling of a safetensors name in its files: GPT-2's own files
# leave out "transformer.", our exports and transformers' keep it)
LAYOUTS = {"gpt2": (gpt2_layout, lambda key: hf_key(our_name(key))), "llama": (llama_layout, lambda key: key)}


def layout(config):
    """{our name: (transposed, [(HF name, HF shape), ...])} of config's architecture."""
    return LAYOUTS[config.arch][0](config)


def hf_tensors(config, params):
    """Our parameters as HF's tensors, float32, by their HF names; GPT-2's sinusoidal table becomes wpe."""
    tensors = {}
    for name, (transposed, parts) in layout(config).items():
        sinusoidal = name == "wpe" and not config.use_learned_pos
        p = sinusoidal_positions(config.max_seq_len, config.d_model, np.float32) if sinusoidal else params[name]
        start = 0
        for key, shape in parts:
            piece = p[:, start:start + shape[0]].T if transposed else p
            tensors[key] = np.ascontiguousarray(piece, dtype=np.float32)
            start += shape[0]
    return tensors


# ----------------------------------------------------------------------------- writing a folder

def write_tokenizer(bpe, out_dir, max_len):
    """vocab.json + merges.txt, and the two small files that make <|endoftext|> transformers' bos/eos/unk."""
    write_vocab_merges(bpe, os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"))
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    tok_config = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=max_len, add_prefix_space=False,
                      add_bos_token=False, errors="replace", clean_up_tokenization_spaces=False,
                      added_tokens_decoder={str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                                     "normalized": True, "single_word": False}
                                            for s, i in sorted(bpe.specials.items(), key=lambda kv: kv[1])})
    for name, record in (("tokenizer_config.json", tok_config), ("special_tokens_map.json", special)):
        with atomic_write(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2) + "\n")


def check_out_dir(out_dir):
    """Write into a new or empty folder, or over an earlier export; never over someone else's files."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"{out_dir} exists and is not a folder: choose another OUT_DIR")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        try:
            ours = (read_json(os.path.join(out_dir, "config.json")).get("numpy_gpt") or {}).get("format") \
                == EXPORT_FORMAT
        except (OSError, ValueError, AttributeError):  # ValueError: not a regular file, not JSON
            ours = False
        if not ours:
            raise HFError(f"{out_dir} is not empty and not an earlier export of export_hf.py: choose a new OUT_DIR")
        others = sorted(set(os.listdir(out_dir)) - set(EXPORT_FILES))
        if others:
            raise HFError(f"{out_dir} holds files an export does not write ({', '.join(others[:4])}), which "
                          "transformers might load instead: remove them or choose a new OUT_DIR")


def write_folder(out_dir, config, params, bpe, eot_id, record, card=None):
    """Write a Hugging Face folder out_dir: the model (config, params), the tokenizer files of bpe (a
    BPEModel; None: none), `record` as config.json's "numpy_gpt", the text `card` as README.md (None:
    none); returns the files written.

    The folder is built beside out_dir under a temporary name and renamed into place only when
    complete, so a failure (a full disk, a tokenizer that vocab.json/merges.txt cannot spell) leaves
    an earlier export in out_dir as it was; TokenizerError says why bpe cannot be written."""
    st = safetensors_numpy()
    check_out_dir(out_dir)
    data = st.save(hf_tensors(config, params), metadata={"format": "pt"})  # "pt": what transformers 4 asks for
    final = os.path.realpath(out_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    new = f"{final}.{secrets.token_hex(4)}.tmp"
    os.mkdir(new)
    try:
        with atomic_write(os.path.join(new, "model.safetensors"), "wb") as f:
            f.write(data)
        if bpe is not None:
            write_tokenizer(bpe, new, config.max_seq_len)
        if card is not None:
            with atomic_write(os.path.join(new, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
        with atomic_write(os.path.join(new, "config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(CONFIG_WRITERS[config.arch](config, eot_id, record), indent=2) + "\n")
        files = sorted(os.listdir(new))
        swap_in(new, final)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return files


def swap_in(new, final):
    """Rename the complete folder new to final; an earlier folder there is removed only after that."""
    if not os.path.isdir(final):
        os.rename(new, final)
        return
    old = f"{new[:-len('.tmp')]}.old"
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading a folder

def _weight_files(path):
    """The folder's safetensors files; an error that says what to do for pickled or missing weights."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        try:
            names = sorted(set(read_json(index, "safetensors index", error=HFError)["weight_map"].values()))
        except (OSError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"{index} is not a safetensors index ({e})") from None
        if not all(isinstance(n, str) and n == os.path.basename(n) and n.endswith(".safetensors") for n in names):
            raise HFError(f"{index} names weight files outside the folder or not .safetensors: {names[:4]}")
        return [os.path.join(path, n) for n in names]
    if any(n.endswith(".bin") for n in os.listdir(path)):
        raise HFError(f"{path} has only pytorch_model.bin (pickled PyTorch, which numpy-gpt never loads): convert it "
                      "to model.safetensors first, e.g. GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR)")
    raise HFError(f"{path} has no model.safetensors: a Hugging Face model folder holds config.json and "
                  "model.safetensors")


class _Weights:
    """The tensors of a folder's safetensors files by their canonical names (LAYOUTS), read only when
    asked for."""

    def __init__(self, path, arch):
        safetensors_numpy()
        canonical = LAYOUTS[arch][1]
        from safetensors import SafetensorError, safe_open
        self.where = {}
        for file in _weight_files(path):
            try:
                regular_file(file, "safetensors file", error=HFError)  # a FIFO would hang safe_open
                f = safe_open(file, framework="np")
            except (OSError, SafetensorError) as e:
                raise HFError(f"{file} is not a readable safetensors file ({e})") from None
            for key in f.keys():
                name = canonical(key)
                if name in self.where:
                    raise HFError(f"{file}: tensor {key!r} appears twice (with and without 'transformer.')")
                self.where[name] = (f, key, file)

    def shape(self, name):
        f, key, _ = self.where[name]
        return tuple(f.get_slice(key).get_shape())

    def check_dtype(self, name):
        f, key, file = self.where[name]
        kind = f.get_slice(key).get_dtype()
        if kind not in ("F32", "F16", "F64"):
            raise HFError(f"{file}: tensor {key!r} is {kind}, which NumPy cannot read: save the model in float32 "
                          "(model.float().save_pretrained(DIR))")

    def get(self, name):
        f, key, file = self.where[name]
        self.check_dtype(name)
        tensor = f.get_tensor(key).astype(np.float32, copy=False)
        if not np.isfinite(tensor).all():
            raise HFError(f"{file}: the weights are not finite: tensor {key!r} holds NaN or inf")
        return tensor


def our_record(hf):
    """The "numpy_gpt" record of a config.json our export wrote ({} for other folders)."""
    return hf.get("numpy_gpt") if isinstance(hf.get("numpy_gpt"), dict) else {}


def read_hf_config(path):
    """(ModelConfig, config.json's dict) of a Hugging Face folder. Positions are sinusoidal only when the
    folder is our export of a sinusoidal model and its wpe is still exactly that table."""
    if not os.path.isdir(path):
        raise HFError(f"{path} is not a folder (a Hugging Face model folder holds config.json + "
                      "model.safetensors)")
    source = os.path.join(path, "config.json")
    try:
        hf = read_json(source, "config.json", error=HFError)
    except FileNotFoundError:
        raise HFError(f"{path} has no config.json: not a Hugging Face model folder") from None
    except OSError as e:
        raise HFError(f"cannot read {source}: {e.strerror}") from None
    _weight_files(path)  # first: a folder of pickled weights is refused whatever its config says
    config = config_from_json(hf, source)
    weights = _Weights(path, config.arch)
    wpe = hf_key("wpe")
    if config.positions == "learned" and our_record(hf).get("positions") == "sinusoidal":
        want = (config.max_seq_len, config.d_model)
        if wpe in weights.where and weights.shape(wpe) == want and \
                np.array_equal(weights.get(wpe), sinusoidal_positions(*want, np.float32)):
            config.use_learned_pos = False
    check_hf_weights(path, config, weights)  # before anyone allocates a model from config.json's numbers
    return config, hf


def check_hf_weights(path, config, weights):
    """The folder's layout for config; errors unless the tensors' headers (names, shapes, dtypes) are
    exactly what it lists, read before anything is allocated (safe_open checked the offsets)."""
    parts = layout(config)
    want = {key: shape for _, pieces in parts.values() for key, shape in pieces}
    have = {key for key in weights.where if not BUFFER_RE.search(key)}
    if config.tie_embeddings:
        have.discard("lm_head.weight")  # tied: transformers ignores it too; the head is the token table
    mismatch = name_mismatch(want, have)
    if mismatch:
        raise HFError(f"{path}: the weights do not match config.json: {mismatch}")
    for key, shape in want.items():
        if weights.shape(key) != shape:
            raise HFError(f"{path}: {key} has shape {weights.shape(key)}, config.json implies {shape}")
        weights.check_dtype(key)
    return parts


def load_hf_params(path, config):
    """{our name: float32 array} for config from the folder; every name and shape checked before reading."""
    weights = _Weights(path, config.arch)
    params = {}
    for name, (transposed, pieces) in check_hf_weights(path, config, weights).items():
        arrays = [weights.get(key) for key, _ in pieces]
        params[name] = np.ascontiguousarray(np.concatenate([a.T for a in arrays], axis=1)) if transposed \
            else arrays[0]
    if not config.use_learned_pos:
        params.pop("wpe", None)  # GPT-2's sinusoidal table: not a parameter
    return params


def load_hf_model(path, dtype=np.float32, device="cpu"):
    """A LanguageModel (for generation: no gradients) with the folder's weights, and config.json's
    "numpy_gpt" record ({} for a folder our export did not write)."""
    config, hf = read_hf_config(path)
    params = {k: v.astype(dtype, copy=False) for k, v in load_hf_params(path, config).items()}
    return LanguageModel(config, params=params, for_training=False, device=device), our_record(hf)


def load_hf_tokenizer(path, vocab_size):
    """The folder's tokenizer: its vocab.json + merges.txt, else tiktoken's gpt2 for a 50257-token model."""
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.exists(vocab) and os.path.exists(merges):
        return load_bpe(vocab, merges, verbose=False)
    if vocab_size == GPT2_VOCAB_SIZE:
        return load_tiktoken("gpt2", verbose=False)
    raise HFError(f"{path} has no vocab.json + merges.txt and vocab_size {vocab_size} is not GPT-2's "
                  f"{GPT2_VOCAB_SIZE}: pass the tokenizer with --tokenizer_type bpe --model_file FILE")
