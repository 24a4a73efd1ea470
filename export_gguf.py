"""Export a checkpoint as one GGUF file for llama.cpp and what is built on it (llama-server, ollama,
LM Studio, llama-cpp-python): the Llama block as llama.cpp's "llama" architecture, GPT-2's as
its "gpt2", with the tokenizer inside the file.

    python3 export_gguf.py checkpoints_laptop/checkpoint_final.npz laptop.gguf
    python3 export_gguf.py hf_small small-f16.gguf --dtype float16     # a Hugging Face folder we read

then, with llama.cpp through llama-cpp-python (or its own llama-completion -m laptop.gguf -p ...):

    from llama_cpp import Llama
    llm = Llama("laptop.gguf", n_ctx=128, verbose=False)
    print(llm("Once upon a time", max_tokens=100, temperature=0)["choices"][0]["text"])

Why not export_hf.py and llama.cpp's convert_hf_to_gguf.py: that converter knows a BPE tokenizer only
by a hash of how it encodes a test string, and refuses any vocabulary it has not seen, our own BPE
included. We know ours is GPT-2's byte-level BPE with GPT-2's pre-tokenizer, and say so in the file:
tokenizer.ggml.model "gpt2", tokenizer.ggml.pre "gpt-2", the tokens in GPT-2's spelling
(gpt2_files.gpt2_spelling, as vocab.json), the merges in rank order, the token types and the
end-of-text token (eos, bos and eot; llama.cpp adds no BOS: add_bos_token false). That holds for
tiktoken's GPT-2 encoding and for our BPE alike.

The tensors are the Hugging Face export's (hf_format.hf_tensors), renamed and laid out as llama.cpp's
converter does to such a folder:
    llama   model.layers.{i}.self_attn.q_proj.weight -> blk.{i}.attn_q.weight, ..., mlp.gate_proj ->
            ffn_gate, embed_tokens -> token_embd, norm -> output_norm, lm_head -> output; the query and
            key rows of each head reordered for llama.cpp's rotary layout (rope_interleave below)
    gpt2    transformer.h.{i}.attn.c_attn.weight -> blk.{i}.attn_qkv.weight, ..., wte -> token_embd,
            wpe -> position_embd (the sinusoidal table written out, as the HF export writes it); the
            (in, out) matrices transposed to llama.cpp's (out, in)
A tied head writes no output.weight: llama.cpp then projects with token_embd, as we do. Float32 by
default; --dtype float16 stores the matrices in float16 and keeps the 1-D tensors (norms, biases) in
float32, as the converter's f16 does. What llama.cpp cannot compute is refused, naming it: GPT-2's
block with relu or relu2 (llama.cpp's gpt2 has only the tanh GELU), QK-norm and soft-capped logits (its gpt2
and llama have neither: hf_format.check_exportable), a model without a tokenizer llama.cpp can read.

The metadata holds the architecture, its sizes and the recipe's numbers (step, learning rate,
batch size, ...) and nothing else: no path, user or host name. The file is written atomically; an
output that is one of the inputs, a folder or another kind of file is refused. `gguf` (llama.cpp's
own Python writer) is an optional extra, `pip install gguf`, imported here only.
"""
import os
import re
import sys

import numpy as np

from atomic import atomic_write, refuse_inputs
from checkpoint import load_checkpoint
from config import GPT2_VOCAB_SIZE
from errors import GGUFError, TokenizerError, UserError
from flag_types import Parser
from export_hf import tokenizer_to_export
from gpt2_files import gpt2_bpe_model, gpt2_spelling, model_from_vocab_merges
from hf_format import check_exportable, hf_tensors, load_hf_params, our_record, read_hf_config
from pretokens import ENDOFTEXT
from untrusted import open_regular

GGUF_MAGIC = b"GGUF"
# --dtype: (the matrices' NumPy dtype, general.file_type: llama.cpp's ALL_F32 or MOSTLY_F16)
DTYPES = {"float32": (np.float32, 0), "float16": (np.float16, 1)}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # llama.cpp's token types (gguf.TokenType)
# The training flags whose numbers the file records (train.py's names), the run's recipe.
RECIPE_FLAGS = ("batch_size", "seq_len", "grad_accum", "max_steps", "time_budget", "learning_rate", "min_lr",
                "warmup_steps", "weight_decay", "decay_embeddings", "beta1", "beta2", "momentum", "grad_clip",
                "dropout", "seed", "muon_momentum", "cooldown")

# Hugging Face tensor names (hf_format's layout) -> llama.cpp's (its llama-arch.cpp, gguf-py's
# tensor_mapping.py). Per-layer names: the part after model.layers.{i}. / transformer.h.{i}.
GGUF_NAMES = {
    "llama": {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"},
    "gpt2": {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"},
}
GGUF_LAYER_NAMES = {
    "llama": {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
}
LAYER_RE = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)$")
# Whether a layer's matrices are (in, out) in the Hugging Face layout: GPT-2's Conv1D keeps them so, and
# llama.cpp wants (out, in), as its converter transposes them; Llama's nn.Linear is (out, in) already.
IN_OUT_LAYERS = {"gpt2": True, "llama": False}


def gguf_package():
    """The gguf package (llama.cpp's writer), or a one-line error naming the pip command."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("the GGUF export needs the gguf package: pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- tensors

def rope_interleave(w, n_heads):
    """(n_heads * hs, C) query or key rows -> the same rows in llama.cpp's rotary layout.

    Our rotary positions (and HF's rotate_half) turn the pair of dimensions (i, i + hs/2) of each
    head; llama.cpp's "llama" turns adjacent pairs (2i, 2i + 1), with the same angle for pair i. So
    each head's row i moves to 2i and row i + hs/2 to 2i + 1: the scores q.k are unchanged, as both
    are reordered alike. This is llama.cpp's converter's permute (convert_hf_to_gguf.py)."""
    rows, C = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, 2, hs // 2, C).swapaxes(1, 2).reshape(rows, C)  # (H, 2, hs/2, C) -> (H, hs/2, 2, C)


def gguf_name(arch, hf_name):
    """llama.cpp's name for a Hugging Face tensor name of arch."""
    m = LAYER_RE.match(hf_name)
    if m is None:
        return GGUF_NAMES[arch][hf_name]
    layer, part, kind = m.groups()
    return f"blk.{layer}.{GGUF_LAYER_NAMES[arch][part]}.{kind}"


def gguf_tensors(config, params, dtype=np.float32):
    """{llama.cpp name: array} for our model, each array as ggml reads it (NumPy's (out, in) is ggml's
    {in, out}); matrices in dtype, 1-D tensors in float32."""
    tensors = {}
    for hf_name, t in hf_tensors(config, params).items():
        if IN_OUT_LAYERS[config.arch] and LAYER_RE.match(hf_name) and t.ndim == 2:
            t = t.T  # (in, out) -> (out, in)
        elif hf_name.endswith("q_proj.weight"):
            t = rope_interleave(t, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rope_interleave(t, config.n_kv_heads)
        if t.ndim == 2 and dtype == np.float16 and np.abs(t).max() > np.finfo(np.float16).max:
            raise GGUFError(f"tensor {hf_name} has weights beyond float16's range ({np.abs(t).max():.3g}): "
                            "export with --dtype float32")
        tensors[gguf_name(config.arch, hf_name)] = np.ascontiguousarray(t, dtype=dtype if t.ndim == 2 else np.float32)
    return tensors


# ----------------------------------------------------------------------------- metadata

def model_metadata(config, dtype_name):
    """{key: (GGUF type, value)}: the architecture and its sizes under llama.cpp's keys."""
    arch = config.arch
    meta = {
        "general.architecture": ("STRING", arch),
        "general.name": ("STRING", f"numpy-gpt {arch} {config.n_layers}x{config.d_model}"),
        "general.file_type": ("UINT32", DTYPES[dtype_name][1]),
        "general.quantization_version": ("UINT32", 2),  # GGML_QNT_VERSION, as the converter writes it
        f"{arch}.vocab_size": ("UINT32", config.vocab_size),
        f"{arch}.context_length": ("UINT32", config.max_seq_len),
        f"{arch}.embedding_length": ("UINT32", config.d_model),
        f"{arch}.feed_forward_length": ("UINT32", config.d_ff),
        f"{arch}.block_count": ("UINT32", config.n_layers),
        f"{arch}.attention.head_count": ("UINT32", config.n_heads),
    }
    return {**meta, **BLOCK_METADATA[arch](config)}


def llama_metadata(config):
    """The Llama block's own keys: grouped-query heads, RMSNorm's eps, the rotary positions; a feed-forward llama.cpp
    cannot compute (the relu2 MLP: its llama architecture's is always gated, SwiGLU) is refused in one line."""
    if config.activation != "swiglu":
        raise GGUFError(f"activation {config.activation}: llama.cpp's llama architecture computes only the gated "
                        "SwiGLU feed-forward (ffn_gate, ffn_up, ffn_down); nothing was written")
    return {"llama.attention.head_count_kv": ("UINT32", config.n_kv_heads),
            "llama.attention.layer_norm_rms_epsilon": ("FLOAT32", config.norm_eps),
            "llama.rope.freq_base": ("FLOAT32", config.rope_theta),
            "llama.rope.dimension_count": ("UINT32", config.d_model // config.n_heads)}


def gpt2_metadata(config):
    """GPT-2's block's own key, its layer norm's eps; a feature llama.cpp cannot compute is refused in one line."""
    if config.activation != "gelu":
        raise GGUFError(f"activation {config.activation}: llama.cpp's gpt2 architecture computes only GPT-2's "
                        "tanh GELU in its MLP; nothing was written")
    return {"gpt2.attention.layer_norm_epsilon": ("FLOAT32", config.norm_eps)}


BLOCK_METADATA = {"gpt2": gpt2_metadata, "llama": llama_metadata}  # config.arch -> its block's own keys


def tokenizer_metadata(bpe, vocab_size):
    """{key: (GGUF type, value)}: bpe (a BPEModel with GPT-2's pattern) as llama.cpp's "gpt2" tokenizer,
    its list padded to the model's vocab_size with unused "[PAD<id>]" tokens, as the converter does."""
    try:
        tok2id, merges = gpt2_spelling(bpe)
    except TokenizerError as e:
        raise GGUFError(f"{e}; llama.cpp's gpt2 tokenizer needs the same") from None
    if bpe.vocab_size > vocab_size:
        raise GGUFError(f"the tokenizer has {bpe.vocab_size} tokens but the model only {vocab_size}: the "
                        "checkpoint was not trained with this tokenizer")
    if not merges:
        raise GGUFError("the BPE has no merges, and llama.cpp reads no gpt2 tokenizer without them")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for s, i in tok2id.items():
        tokens[i] = s
        types[i] = TOKEN_CONTROL if s in bpe.specials else TOKEN_NORMAL
    if len(set(tokens)) != vocab_size:
        raise GGUFError("a token of the BPE spells the name of a padding token ([PAD<id>]); llama.cpp needs "
                        "every token's text once")
    eot = bpe.specials[ENDOFTEXT]
    return {
        "tokenizer.ggml.model": ("STRING", "gpt2"),
        "tokenizer.ggml.pre": ("STRING", "gpt-2"),
        "tokenizer.ggml.tokens": ("ARRAY:STRING", tokens),
        "tokenizer.ggml.token_type": ("ARRAY:INT32", types),
        "tokenizer.ggml.merges": ("ARRAY:STRING", merges),
        "tokenizer.ggml.bos_token_id": ("UINT32", eot),
        "tokenizer.ggml.eos_token_id": ("UINT32", eot),
        "tokenizer.ggml.eot_token_id": ("UINT32", eot),
        "tokenizer.ggml.add_bos_token": ("BOOL", False),
    }


def recipe_metadata(step, train_args):
    """{key: (GGUF type, value)}: the step and the numbers of the training flags in RECIPE_FLAGS,
    under numpy_gpt.*; strings (paths among them) are never written."""
    meta = {}
    if isinstance(step, int) and step >= 0:
        meta["numpy_gpt.step"] = ("UINT64", step)
    for flag in RECIPE_FLAGS:
        value = (train_args or {}).get(flag)
        if isinstance(value, bool):
            meta[f"numpy_gpt.train.{flag}"] = ("BOOL", value)
        elif isinstance(value, int):
            meta[f"numpy_gpt.train.{flag}"] = ("INT64", value)
        elif isinstance(value, float):
            meta[f"numpy_gpt.train.{flag}"] = ("FLOAT64", value)
    return meta


# ----------------------------------------------------------------------------- what is read, what is written

def read_source(path):
    """(config, params, bpe, what, record) of a .npz checkpoint or a Hugging Face folder: bpe is the
    tokenizer as a BPEModel (None: what says why not), record {"step", "train_args"}."""
    if os.path.isdir(path):
        config, hf = read_hf_config(path)
        params = load_hf_params(path, config)
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.exists(vocab) and os.path.exists(merges):
            bpe, what = model_from_vocab_merges(vocab, merges), "the folder's vocab.json + merges.txt"
        elif config.vocab_size == GPT2_VOCAB_SIZE:
            bpe, what = gpt2_bpe_model(), "GPT-2's BPE (tiktoken gpt2)"
        else:
            bpe, what = None, f"the folder has no vocab.json + merges.txt and {config.vocab_size} tokens, not GPT-2's"
        record = our_record(hf)
        return config, params, bpe, what, {"step": record.get("step")}
    ck = load_checkpoint(path)
    bpe, what = tokenizer_to_export(ck.meta, ck.config)
    return ck.config, ck.params, bpe, what, {"step": ck.meta.get("step"), "train_args": ck.meta.get("train_args")}


def check_output(out_path, source):
    """Refuse an output that is a folder, one of the inputs, or a file other than a GGUF file."""
    inputs = [source]
    if os.path.isdir(source):
        inputs = [os.path.join(source, name) for name in sorted(os.listdir(source))]
    if os.path.isdir(out_path):
        raise GGUFError(f"{out_path} is a folder: name the .gguf file to write")
    refuse_inputs([out_path], [("input", path) for path in inputs], error=GGUFError)
    if os.path.exists(out_path):
        try:
            with open_regular(out_path, "rb", "GGUF file") as f:  # a FIFO is refused, not waited on
                ours = f.read(4) == GGUF_MAGIC
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise GGUFError(f"{out_path} exists and is not a GGUF file: choose another output")


def write_gguf(out_path, arch, metadata, tensors):
    """Write metadata ({key: (type, value)}, types "UINT32", "ARRAY:STRING", ...) and tensors ({name:
    array}) as a GGUF file, atomically."""
    gguf = gguf_package()
    with atomic_write(out_path, "wb") as f:
        writer = gguf.GGUFWriter(f.name, arch)  # writes general.architecture itself
        try:
            for key, (kind, value) in metadata.items():
                if key == "general.architecture":
                    continue
                vtype, _, sub = kind.partition(":")
                writer.add_key_value(key, value, gguf.GGUFValueType[vtype],
                                     sub_type=gguf.GGUFValueType[sub] if sub else None)
            for name, array in tensors.items():
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def export(source, out_path, dtype="float32", log=print):
    """Write the checkpoint or Hugging Face folder `source` as the GGUF file out_path; returns
    (metadata, tensors) as written."""
    gguf_package()  # first: without it nothing can be written
    check_output(out_path, source)
    config, params, bpe, what, record = read_source(source)
    check_exportable(config, source, GGUFError, reader="llama.cpp's gpt2 and llama architectures")
    metadata = model_metadata(config, dtype)  # first: a feature llama.cpp cannot compute is refused
    if bpe is None:
        raise GGUFError(f"{source}: llama.cpp needs the tokenizer inside the file, and {what}; nothing was written")
    metadata.update(tokenizer_metadata(bpe, config.vocab_size))
    metadata.update(recipe_metadata(record.get("step"), record.get("train_args")))
    tensors = gguf_tensors(config, params, DTYPES[dtype][0])
    write_gguf(out_path, config.arch, metadata, tensors)
    log(f"tokenizer: {what} -> llama.cpp's gpt2 tokenizer, pre-tokenizer gpt-2")
    return metadata, tensors


def main(argv=None):
    p = Parser(
        description="Export a numpy-gpt checkpoint (or a Hugging Face folder it reads) as a GGUF file for llama.cpp: "
                    "the Llama block as its llama architecture, GPT-2's as gpt2, the tokenizer inside.",
        epilog="Example: python3 export_gguf.py checkpoints_laptop/checkpoint_final.npz laptop.gguf")
    p.add_argument("checkpoint", help="a .npz checkpoint written by train.py, or a Hugging Face folder "
                                      "(config.json + model.safetensors) as export_hf.py writes")
    p.add_argument("out", help="the .gguf file to write (new, or an earlier GGUF file, which is replaced)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="how the matrices are stored: float32 (default, exact) or float16 (half the size); "
                        "norms and biases stay float32")
    args = p.parse_args(argv)
    try:
        _, tensors = export(args.checkpoint, args.out, args.dtype)
    except UserError as e:
        p.exit(1, f"error: {e}\n")
    except OSError as e:  # a folder we may not write to, a full disk
        p.exit(1, f"error: cannot write {args.out}: {e.strerror} ({e.filename or args.out})\n")
    size = sum(t.nbytes for t in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {size / 1e6:.1f} MB of weights in {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
