"""Hugging Face interchange: a checkpoint as a GPT-2 folder for `transformers`, and such folders read back.

Export a checkpoint (weights, config and tokenizer):

    python3 export_hf.py checkpoints_small/checkpoint_final.npz hf_small

then, where transformers and torch are installed:

    from transformers import AutoTokenizer, GPT2LMHeadModel
    model, tok = GPT2LMHeadModel.from_pretrained("hf_small"), AutoTokenizer.from_pretrained("hf_small")
    print(tok.decode(model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=50)[0]))

Import a GPT-2-format folder (config.json + model.safetensors: an export, or GPT-2's own files):

    python3 train.py --init_from hf_small --train_data ... --val_data ...    # fine-tune from its weights
    python3 generate.py --checkpoint hf_small --prompt "Once upon a time"

The folder (what `save_pretrained` writes for a GPT2LMHeadModel):
    config.json              GPT2Config: vocab_size, n_positions (our max_seq_len), n_embd (d_model),
                             n_layer, n_head, n_inner (d_ff), activation_function ("gelu_new", the tanh
                             GELU, or "relu"), layer_norm_epsilon, tie_word_embeddings, bos/eos ids; plus
                             "numpy_gpt": our own config, step and tokenizer, for the record
    model.safetensors        float32 tensors named transformer.<our name>.weight: transformer.wte.weight
                             (V, C), transformer.wpe.weight (T_max, C), transformer.h.{i}.attn.c_attn.weight
                             (C, 3C), ..., transformer.ln_f.bias, and lm_head.weight (V, C) if untied
    vocab.json, merges.txt   the byte-level BPE in GPT-2's spelling (bpe.write_vocab_merges)
    tokenizer_config.json, special_tokens_map.json    <|endoftext|> as bos/eos/unk

Our parameters already have GPT-2's names and layouts: HF's Conv1D keeps its weight as (in, out),
as we do, so no array is transposed. Every variant maps onto GPT-2's function: sinusoidal
positions become a fixed wpe table (read back as sinusoidal when it still is that table), ReLU
is activation_function "relu", an untied head keeps its own lm_head.weight.

safetensors is an optional extra (`pip install safetensors`): only this interchange needs it.
"""
import argparse
import json
import os
import re
import secrets
import shutil
import sys

import numpy as np

from atomic import atomic_write
from checkpoint import CheckpointError, load_checkpoint
from config import MAX_SEQ_LEN, ModelConfig, param_shapes
from untrusted import read_json, regular_file

EXPORT_FORMAT = "numpy-gpt hf export"
EXPORT_VERSION = 1
GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # HF's names for GPT-2's tanh GELU; "gelu" is erf
# Files an export writes; a re-export into the same folder replaces the whole folder.
EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json")
# Largest config values accepted on import (checked before anything is allocated).
LIMITS = {"vocab_size": 1 << 22, "n_positions": MAX_SEQ_LEN, "n_embd": 1 << 16, "n_layer": 1 << 10,
          "n_head": 1 << 12, "n_inner": 1 << 18}
BUFFER_RE = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")  # old files keep the causal mask: not a weight


class HFError(CheckpointError):
    """A folder or checkpoint that cannot be exported or imported; the message says what to do."""


def safetensors_numpy():
    """The safetensors package's NumPy API, or a one-line error naming the pip command."""
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError("the Hugging Face interchange needs the safetensors package: pip install safetensors") from None
    return safetensors.numpy


# ----------------------------------------------------------------------------- export

def hf_config(config, eot_id, record):
    """GPT2Config fields (config.json) describing our ModelConfig; `record` goes under "numpy_gpt"."""
    from transformer import LN_EPS
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": "gelu_new" if config.activation == "gelu" else "relu",
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


def hf_tensors(config, params):
    """Our parameters under HF's GPT2LMHeadModel names, float32; the sinusoidal table becomes wpe."""
    from embeddings import sinusoidal_positions
    tensors = {}
    for name, p in params.items():
        key = name if name == "lm_head.weight" else f"transformer.{name}.weight" if name in ("wte", "wpe") \
            else f"transformer.{name}"
        tensors[key] = np.ascontiguousarray(p, dtype=np.float32)
    if not config.use_learned_pos:
        tensors["transformer.wpe.weight"] = sinusoidal_positions(config.max_seq_len, config.d_model, np.float32)
    return tensors


def bpe_model_from_ranks(ranks, specials):
    """tiktoken's ranks ({token bytes: id}) as a BPEModel with explicit merges.

    A token's merge is the pair that byte-level BPE reaches when only lower ranks may merge:
    for a well-formed table that leaves exactly two parts, the two tokens it was made from.
    """
    from bpe import GPT2_PATTERN, BPEModel, TokenizerError
    vocab = [None] * (len(ranks) + len(specials))
    for token, rank in ranks.items():
        vocab[rank] = token
    merges, merge_ids = [], []
    for rank, token in sorted((r, t) for t, r in ranks.items() if len(t) > 1):
        parts = [token[i:i + 1] for i in range(len(token))]
        while True:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
        merge_ids.append(rank)
    return BPEModel(vocab, merges, specials, GPT2_PATTERN, merge_ids)


def gpt2_bpe_model():
    """GPT-2's BPE (from the bundled r50k_base ranks, sha256 checked) as a BPEModel."""
    from tiktoken.load import load_tiktoken_bpe
    from bpe import ENDOFTEXT, TokenizerError
    from tokenizer import BUNDLED_R50K, R50K_SHA256
    try:
        ranks = load_tiktoken_bpe(str(BUNDLED_R50K), expected_hash=R50K_SHA256)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{BUNDLED_R50K}: {e}; restore data/sample/r50k_base.tiktoken from the repository") from None
    model = bpe_model_from_ranks(ranks, {ENDOFTEXT: len(ranks)})
    model.check(str(BUNDLED_R50K))
    return model


def tokenizer_to_export(meta, config):
    """(BPEModel, note): the tokenizer the checkpoint was trained with, or (None, why not)."""
    from bpe import GPT2_PATTERN, BPEModel
    identity = meta.get("tokenizer") or {}
    kind, name = identity.get("type"), identity.get("name")
    if (kind, name) == ("tiktoken", "gpt2") or (not identity and config.vocab_size == 50257):  # as generate.py assumes
        return gpt2_bpe_model(), "GPT-2's BPE (tiktoken gpt2)"
    if kind == "lecture2_bpe":
        text = meta.get("tokenizer_model_json")
        if text is None:
            return None, "the checkpoint does not embed its BPE model"
        model = BPEModel.from_json(text, "the checkpoint's embedded BPE model")
        if model.pattern != GPT2_PATTERN:
            return None, "its BPE splits text with another pattern than GPT-2's, which transformers' GPT-2 tokenizer uses"
        return model, f"our BPE ({model.vocab_size} tokens)"
    if not identity:
        return None, f"the checkpoint names no tokenizer and vocab_size {config.vocab_size} is not GPT-2's 50257"
    return None, f"tokenizer {kind} {name} has no GPT-2 style vocab.json/merges.txt"


def write_tokenizer(bpe, out_dir, max_len):
    """vocab.json + merges.txt, and the two small files that make <|endoftext|> transformers' bos/eos/unk."""
    from bpe import ENDOFTEXT, write_vocab_merges
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


def export(checkpoint_path, out_dir, log=print):
    """Write checkpoint_path as a Hugging Face GPT-2 folder out_dir; returns the files written.

    The folder is built beside out_dir under a temporary name and renamed into place only when
    complete, so a failure (a full disk, a tokenizer that vocab.json/merges.txt cannot spell) leaves
    an earlier export in out_dir as it was."""
    st = safetensors_numpy()
    ck = load_checkpoint(checkpoint_path)
    check_out_dir(out_dir)
    bpe, what = tokenizer_to_export(ck.meta, ck.config)
    from bpe import ENDOFTEXT, TokenizerError
    eot = bpe.specials[ENDOFTEXT] if bpe is not None else (ck.meta.get("tokenizer") or {}).get("eot_id")
    record = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
              "positions": "learned" if ck.config.use_learned_pos else "sinusoidal",
              "config": ck.config.to_dict(), "step": ck.meta.get("step"), "tokenizer": ck.meta.get("tokenizer"),
              "checkpoint": os.path.basename(str(checkpoint_path))}
    data = st.save(hf_tensors(ck.config, ck.params), metadata={"format": "pt"})  # "pt": what transformers 4 asks for
    final = os.path.realpath(out_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    new = f"{final}.{secrets.token_hex(4)}.tmp"
    os.mkdir(new)
    try:
        with atomic_write(os.path.join(new, "model.safetensors"), "wb") as f:
            f.write(data)
        if bpe is not None:
            try:
                write_tokenizer(bpe, new, ck.config.max_seq_len)
            except TokenizerError as e:
                raise HFError(f"{checkpoint_path}: {e}; nothing was written to {out_dir}") from None
        with atomic_write(os.path.join(new, "config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(hf_config(ck.config, eot, record), indent=2) + "\n")
        files = sorted(os.listdir(new))
        swap_in(new, final)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    log(f"tokenizer: {what} -> vocab.json + merges.txt" if bpe is not None else
        f"note: no tokenizer files written: {what}")
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


# ----------------------------------------------------------------------------- import

def _int_field(hf, key, source):
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= LIMITS[key]:
        raise HFError(f"{source}: {key} must be an integer from 1 to {LIMITS[key]}, got {value!r}")
    return value


def _config_from_hf(hf, source):
    """Our ModelConfig (learned positions) from GPT2Config fields; errors for what we do not compute."""
    from transformer import LN_EPS
    if not isinstance(hf, dict):
        raise HFError(f"{source} is not a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFError(f"{source}: model_type {hf.get('model_type')!r}; numpy-gpt reads GPT-2 models (model_type gpt2)")
    C = _int_field(hf, "n_embd", source)
    d_ff = hf.get("n_inner")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_NAMES + ("relu",):
        raise HFError(f"{source}: activation_function {act!r} is not computed here; numpy-gpt has GPT-2's tanh "
                      f"GELU ({' / '.join(GELU_NAMES)}) and relu")
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
                           d_ff=4 * C if d_ff is None else _int_field(hf, "n_inner", source),
                           max_seq_len=_int_field(hf, "n_positions", source), use_learned_pos=True,
                           tie_embeddings=tie, activation="relu" if act == "relu" else "gelu")
    except ValueError as e:
        raise HFError(f"{source}: {e}") from None


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
    raise HFError(f"{path} has no model.safetensors: a GPT-2 folder holds config.json and model.safetensors")


class _Weights:
    """The tensors of a folder's safetensors files by our names, read only when asked for."""

    def __init__(self, path):
        safetensors_numpy()
        from safetensors import SafetensorError, safe_open
        self.where = {}
        for file in _weight_files(path):
            try:
                regular_file(file, "safetensors file", error=HFError)  # a FIFO would hang safe_open
                f = safe_open(file, framework="np")
            except (OSError, SafetensorError) as e:
                raise HFError(f"{file} is not a readable safetensors file ({e})") from None
            for key in f.keys():
                name = key[len("transformer."):] if key.startswith("transformer.") else key
                name = name[:-len(".weight")] if name in ("wte.weight", "wpe.weight") else name
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


def read_hf_config(path):
    """(ModelConfig, config.json's dict) of a GPT-2 folder. Positions are sinusoidal only when the
    folder is our export of a sinusoidal model and its wpe is still exactly that table."""
    from embeddings import sinusoidal_positions
    if not os.path.isdir(path):
        raise HFError(f"{path} is not a folder (a Hugging Face GPT-2 folder holds config.json + model.safetensors)")
    source = os.path.join(path, "config.json")
    try:
        hf = read_json(source, "config.json", error=HFError)
    except FileNotFoundError:
        raise HFError(f"{path} has no config.json: not a Hugging Face model folder") from None
    except OSError as e:
        raise HFError(f"cannot read {source}: {e.strerror}") from None
    _weight_files(path)  # first: a folder of pickled weights is refused whatever its config says
    config = _config_from_hf(hf, source)
    weights = _Weights(path)
    record = hf.get("numpy_gpt") if isinstance(hf.get("numpy_gpt"), dict) else {}
    if record.get("positions") == "sinusoidal":
        want = (config.max_seq_len, config.d_model)
        if "wpe" in weights.where and weights.shape("wpe") == want and \
                np.array_equal(weights.get("wpe"), sinusoidal_positions(*want, np.float32)):
            config.use_learned_pos = False
    check_hf_weights(path, config, weights)  # before anyone allocates a model from config.json's numbers
    return config, hf


def check_hf_weights(path, config, weights):
    """{our name: shape} of what the folder must hold for config; errors unless the tensors' headers (names,
    shapes, dtypes) are exactly that, read before anything is allocated (safe_open checked the offsets)."""
    want = param_shapes(config)
    if not config.use_learned_pos:
        want["wpe"] = (config.max_seq_len, config.d_model)  # read, compared with the table, then dropped
    have = {n for n in weights.where if not BUFFER_RE.match(n)}
    if config.tie_embeddings:
        have.discard("lm_head.weight")  # tied: transformers ignores it too; the head is wte
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing or extra:
        raise HFError(f"{path}: the weights do not match config.json: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in want.items():
        if weights.shape(name) != shape:
            raise HFError(f"{path}: {name} has shape {weights.shape(name)}, config.json implies {shape}")
        weights.check_dtype(name)
    return want


def load_hf_params(path, config):
    """{our name: float32 array} for config from the folder; every name and shape checked before reading."""
    weights = _Weights(path)
    want = check_hf_weights(path, config, weights)
    params = {name: weights.get(name) for name in want}
    if not config.use_learned_pos:
        del params["wpe"]
    return params


def load_hf_model(path, dtype=np.float32, device="cpu"):
    """A LanguageModel (for generation: no gradients) with the folder's weights; returns (model, meta)
    like checkpoint.load_model."""
    from language_model import LanguageModel
    config, hf = read_hf_config(path)
    params = {k: v.astype(dtype, copy=False) for k, v in load_hf_params(path, config).items()}
    model = LanguageModel(config, params=params, for_training=False, device=device)
    record = hf.get("numpy_gpt") if isinstance(hf.get("numpy_gpt"), dict) else {}
    # no "tokenizer" identity: the folder's own tokenizer files say (load_hf_tokenizer)
    return model, {"step": record.get("step"), "tokenizer": None, "hf_dir": path, "vocab_size": config.vocab_size}


def load_hf_tokenizer(path, vocab_size):
    """The folder's tokenizer: its vocab.json + merges.txt, else tiktoken's gpt2 for a 50257-token model."""
    from tokenizer import load_bpe, load_tiktoken
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.exists(vocab) and os.path.exists(merges):
        return load_bpe(vocab, merges, verbose=False)
    if vocab_size == 50257:
        return load_tiktoken("gpt2", verbose=False)
    raise HFError(f"{path} has no vocab.json + merges.txt and vocab_size {vocab_size} is not GPT-2's 50257: "
                  "pass the tokenizer with --tokenizer_type lecture2_bpe --model_file FILE")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(
        description="Export a numpy-gpt checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors, "
                    "vocab.json + merges.txt) that transformers' GPT2LMHeadModel and AutoTokenizer load.",
        epilog="Example: python3 export_hf.py checkpoints_small/checkpoint_final.npz hf_small")
    p.add_argument("checkpoint", help="a .npz checkpoint written by train.py")
    p.add_argument("out_dir", help="folder to write (new, empty, or an earlier export, which is replaced)")
    args = p.parse_args(argv)
    from bpe import TokenizerError
    try:
        files = export(args.checkpoint, args.out_dir)
    except (CheckpointError, TokenizerError) as e:  # HFError is a CheckpointError
        p.exit(1, f"error: {e}\n")
    except OSError as e:  # a folder we may not write to, a full disk
        p.exit(1, f"error: cannot write {args.out_dir}: {e.strerror} ({e.filename or args.out_dir})\n")
    print(f"wrote {args.out_dir}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
