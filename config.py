"""[model] The model's record: its hyperparameters, each block kind's fixed facts, and the names
and shapes of its parameters. A leaf: it imports no layer, so every room may import it.

    cfg = ModelConfig(vocab_size=50257, d_model=128, n_heads=4, d_ff=512, n_layers=2, max_seq_len=128)
    shapes = param_shapes(cfg)              # {"wte": (50257, 128), ..., "ln_f.bias": (128,)}
    cfg = ModelConfig(arch="llama", d_model=128, n_heads=4, n_kv_heads=2)   # Llama's block, d_ff 384

Two kinds of block share the embedding, the head and the parameter names (ARCHS, one row each):
"gpt2" (transformer.py: layer norm, learned or sinusoidal position table, GELU/ReLU MLP, biases)
and "llama" (llama.py: RMSNorm, rotary positions, SwiGLU or a relu2 MLP, no biases, no position
table). The fields only one of them uses (use_learned_pos for GPT-2; rope_theta, n_kv_heads for
Llama) must keep their GPT-2 values for "gpt2" and Llama's for "llama", so that one model has one
config. The activation chooses the block's feed-forward (its row of feed_forwards: the shapes and the
default width). d_ff left out (None) is that feed-forward's own width: 4 d_model for a two-matrix MLP
(GPT-2's, Llama's relu2), SwiGLU's swiglu_hidden(d_model). language_model.BLOCKS holds each kind's math.

ModelConfig is saved inside every checkpoint (checkpoint.py), so generate.py needs nothing
else. A checkpoint written before a field existed still loads: the field takes its default.
The training recipes (--preset) and the flag names live with train.py's flags (train_flags.py).
"""
from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple

import numpy as np

from flag_types import Number

GPT2_VOCAB_SIZE = 50257  # GPT-2's tiktoken encoding: 50,256 merged tokens, then <|endoftext|>
GPT2_EOT_ID = 50256
# The longest context (max_seq_len) this code builds a model for, whether from flags, a checkpoint or a
# Hugging Face folder: the sinusoidal table and generation's key/value cache are sized by it, not by any
# array in a file, so an untrusted number must not choose it freely.
MAX_SEQ_LEN = 1 << 17
# The range of each numeric field: the one rule for train.py's flags, the auxiliary scripts' model flags, a
# checkpoint's config and a Hugging Face config.json (hf_format.py), so that whatever one of them accepts the
# others read. The upper bounds are far beyond what trains on a CPU; they keep a number in a file from
# sizing an allocation freely.
FIELD_RANGES = {"vocab_size": Number(int, 1, 1 << 22), "d_model": Number(int, 1, 1 << 16),
                "n_heads": Number(int, 1, 1 << 12), "d_ff": Number(int, 1, 1 << 18),
                "n_layers": Number(int, 1, 1 << 10), "max_seq_len": Number(int, 1, MAX_SEQ_LEN),
                "n_kv_heads": Number(int, 1, 1 << 12), "rope_theta": Number(float, 1, 1e12, low_open=True),
                "norm_eps": Number(float, 0, 1, low_open=True, high_open=True),
                "dropout": Number(float, 0, 1, high_open=True),
                "logit_softcap": Number(float, 0, 1000)}

LN_EPS = 1e-5  # GPT-2's layer norm
# llama2.c's TinyStories models and Llama 2 use 1e-5 (so does our layer norm); HF's LlamaConfig
# defaults to Llama 1's 1e-6, so the export must write rms_norm_eps (and rope_theta) explicitly.
RMS_EPS = 1e-5
ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------- the blocks' shapes

def gpt2_block_shapes(d_model, d_ff):
    """{name: shape} of one GPT-2 block's parameters (GPT-2's names and (in, out) layouts)."""
    C, F = d_model, d_ff
    return {"ln_1.weight": (C,), "ln_1.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,),
            "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,)}


def swiglu_hidden(d_model, multiple_of=64):
    """The usual SwiGLU width when none is given: 2/3 of 4 d_model, rounded up to a multiple of 64
    (Llama's formula: 11008 for d_model 4096 with multiple_of 256; llama2.c's 768 for 288)."""
    hidden = 8 * d_model // 3
    return multiple_of * -(-hidden // multiple_of)


def four_times(d_model):
    """The width of a two-matrix MLP when none is given: 4 d_model, GPT-2's."""
    return 4 * d_model


class FeedForward(NamedTuple):
    """One feed-forward a block can have, chosen by ModelConfig.activation."""
    d_ff: Callable  # (d_model) -> the hidden width F when none is given
    fc_columns: int  # mlp.c_fc's columns per hidden unit: 2 for a gated one ([gate | up]), else 1
    words: str  # for people (describe)


# The Llama block's feed-forwards, its default first: SwiGLU, three matrices (gate and up side by side in
# mlp.c_fc), or relu2, out = relu(x @ mlp.c_fc)^2 @ mlp.c_proj, two (modded-nanogpt's; no biases either way)
LLAMA_FEED_FORWARDS = {"swiglu": FeedForward(swiglu_hidden, 2, "SwiGLU"),
                       "relu2": FeedForward(four_times, 1, "relu2 MLP")}


def llama_block_shapes(d_model, n_heads, n_kv_heads=None, d_ff=None, activation="swiglu"):
    """{name: shape} of one Llama block's parameters, in GPT-2's names where the role is the same, so
    that a model's per-layer dict looks alike for both blocks. For HF's LlamaForCausalLM (weights there
    (out, in)): ln_1 = input_layernorm, ln_2 = post_attention_layernorm, attn.c_attn's columns
    [:C | C:C+Hkv hs | C+Hkv hs:] transposed = q_proj, k_proj, v_proj, attn.c_proj.T = o_proj,
    mlp.c_fc's [:F | F:] transposed = gate_proj, up_proj, mlp.c_proj.T = down_proj. With activation
    "relu2" mlp.c_fc is (C, F), one matrix (LLAMA_FEED_FORWARDS)."""
    C, H = d_model, n_heads
    Hkv = n_kv_heads or H
    if C % H or H % Hkv or (C // H) % 2:
        raise ValueError(f"the Llama block needs d_model ({C}) divisible by n_heads ({H}), an even head size "
                         f"and n_heads divisible by n_kv_heads ({Hkv})")
    ffn = LLAMA_FEED_FORWARDS[activation]
    hs, F = C // H, d_ff or ffn.d_ff(C)
    return {"ln_1.weight": (C,), "attn.c_attn.weight": (C, (H + 2 * Hkv) * hs), "attn.c_proj.weight": (C, C),
            "ln_2.weight": (C,), "mlp.c_fc.weight": (C, ffn.fc_columns * F), "mlp.c_proj.weight": (F, C)}


# ----------------------------------------------------------------------------- the block table

class Arch(NamedTuple):
    """What one kind of block fixes about the model's record (language_model.BLOCKS holds its math)."""
    feed_forwards: dict  # activation -> its FeedForward (default width, shapes, words), the default first
    block_shapes: Callable  # (config) -> {name: shape} of one block's parameters
    final_norm: tuple  # the names of the final norm's parameters
    rotary: bool  # positions turned inside attention (no position table)
    norm: str  # words for people (describe)

    @property
    def activations(self):
        """The feed-forward's activations, its default first."""
        return tuple(self.feed_forwards)

    def d_ff(self, d_model, activation):
        """The feed-forward width when none is given: that of the activation's feed-forward."""
        return self.feed_forwards[activation].d_ff(d_model)


# GPT-2's MLP is two matrices with biases whatever its activation
GPT2_FEED_FORWARDS = {name: FeedForward(four_times, 1, f"{name} MLP") for name in ("gelu", "relu", "relu2")}


def _check_gpt2(cfg):
    for name in ("rope_theta", "n_kv_heads"):
        if getattr(cfg, name) is not None:
            raise ValueError(f"{name} {getattr(cfg, name)!r}: a field of the Llama block (arch llama); GPT-2's block "
                             "has none")
    if cfg.norm_eps != LN_EPS:
        raise ValueError(f"ModelConfig.norm_eps {cfg.norm_eps!r}: GPT-2's layer norm uses {LN_EPS}")


def _check_llama(cfg):
    if cfg.use_learned_pos:
        raise ValueError("use_learned_pos: the Llama block has no position table (its positions are rotary)")
    if cfg.rope_theta is None:
        cfg.rope_theta = ROPE_THETA
    cfg.rope_theta = float(FIELD_RANGES["rope_theta"].check(cfg.rope_theta, "ModelConfig.rope_theta"))
    if cfg.n_kv_heads is None:
        cfg.n_kv_heads = cfg.n_heads
    k = FIELD_RANGES["n_kv_heads"].check(cfg.n_kv_heads, "ModelConfig.n_kv_heads")
    llama_block_shapes(cfg.d_model, cfg.n_heads, k, cfg.d_ff, cfg.activation)  # its ValueError: heads that do not fit


ARCHS = {
    "gpt2": Arch(feed_forwards=GPT2_FEED_FORWARDS,
                 block_shapes=lambda cfg: gpt2_block_shapes(cfg.d_model, cfg.d_ff),
                 final_norm=("ln_f.weight", "ln_f.bias"), rotary=False, norm="layer norm"),
    "llama": Arch(feed_forwards=LLAMA_FEED_FORWARDS,
                  block_shapes=lambda cfg: llama_block_shapes(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
                                                              cfg.activation),
                  final_norm=("ln_f.weight",), rotary=True, norm="RMSNorm"),
}
CHECKS = {"gpt2": _check_gpt2, "llama": _check_llama}  # each block's own fields: defaults filled in, then checked


# ----------------------------------------------------------------------------- the record

@dataclass
class ModelConfig:
    vocab_size: int = GPT2_VOCAB_SIZE
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = None  # the feed-forward width; None: the feed-forward's own (4 d_model, or SwiGLU's)
    n_layers: int = 2
    max_seq_len: int = 128  # length of the positional table: the longest context
    use_learned_pos: bool = False  # learned wpe (GPT-2) instead of the fixed sinusoidal table
    tie_embeddings: bool = True  # the head projects with wte instead of its own lm_head.weight
    # GPT-2's MLP: "gelu" (tanh form, as GPT-2), "relu" or "relu2" (relu(x)^2); Llama's: "swiglu" or "relu2" (a
    # two-matrix MLP without biases). None (the default): the architecture's own, "gelu" or "swiglu"
    activation: str = None
    arch: str = "gpt2"  # a row of ARCHS: "gpt2" (transformer.py's block) or "llama" (llama.py's)
    rope_theta: float = None  # llama: the base of the rotary frequencies, None: ROPE_THETA (10000); gpt2: None
    n_kv_heads: int = None  # llama: key/value heads (fewer: grouped-query attention), None: n_heads; gpt2: None
    norm_eps: float = RMS_EPS  # the eps of the norms: RMSNorm's for llama; GPT-2's layer norm has LN_EPS, the same
    dropout: float = 0.0  # drop probability while training (dropout.py), 0: none; never in evaluation or generation
    qk_norm: bool = False  # each head's query and key divided by its root mean square (eps norm_eps), no gain
    logit_softcap: float = 0.0  # the logits z become c tanh(z / c) before the softmax, c > 0; 0: off

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        arch = ARCHS[self.arch]
        self._check_activation(arch)  # first: it chooses the default width
        if self.d_ff is None and isinstance(self.d_model, (int, np.integer)) and not isinstance(self.d_model, bool):
            self.d_ff = arch.d_ff(self.d_model, self.activation)
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            FIELD_RANGES[name].check(getattr(self, name), f"ModelConfig.{name}")
        for name in ("use_learned_pos", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        CHECKS[self.arch](self)
        for name in ("dropout", "norm_eps", "logit_softcap"):
            FIELD_RANGES[name].check(getattr(self, name), f"ModelConfig.{name}")

    def _check_activation(self, arch):
        """The activation, None: the block's default; one the block has not is a ValueError."""
        if self.activation is None:
            self.activation = arch.activations[0]
        if self.activation not in arch.activations:
            choices = " or ".join(map(repr, arch.activations))
            default = arch.feed_forwards[arch.activations[0]].words
            raise ValueError(f"activation {self.activation!r}: the {self.arch} block's feed-forward "
                             f"({default}) takes {choices}")

    @property
    def positions(self):
        """How the model knows where a token is: "rotary" (q and k turned inside attention), or the
        position table added to the embeddings, "learned" (wpe) or "sinusoidal" (fixed)."""
        if ARCHS[self.arch].rotary:
            return "rotary"
        return "learned" if self.use_learned_pos else "sinusoidal"

    def to_dict(self):
        return asdict(self)

    def describe(self):
        """One line for people: the block and its sizes."""
        arch = ARCHS[self.arch]
        head = "tied head" if self.tie_embeddings else "untied head"
        layers = f"{self.n_layers} layer" + "s" * (self.n_layers != 1)
        kv = f" ({self.n_kv_heads} key/value head{'s' * (self.n_kv_heads != 1)})" \
            if self.n_kv_heads not in (None, self.n_heads) else ""
        pos = f"{self.positions} positions" + (f" (theta {self.rope_theta:g})" if arch.rotary else "")
        biases = "" if "ln_f.bias" in arch.final_norm else ", no biases"
        qk_norm = ", QK-norm" if self.qk_norm else ""
        softcap = f", logits soft-capped at {self.logit_softcap:g}" if self.logit_softcap else ""
        return (f"{self.arch}: {layers}, d_model {self.d_model}, {self.n_heads} heads{kv}{qk_norm}, {arch.norm}, "
                f"{pos}, {arch.feed_forwards[self.activation].words} d_ff {self.d_ff}{biases}, {head}{softcap}")

    @classmethod
    def from_dict(cls, d):
        """The config a checkpoint holds; fields it lacks (it was written before they existed) take
        their defaults, and a field this code does not know is an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}: written by a newer version?")
        return cls(**d)


def param_shapes(cfg):
    """{name: shape} of every parameter, in GPT-2's names and layouts, in the order of the flat buffer:
    the token table, the position table (learned positions only), the blocks, the final norm (without
    a bias in the Llama block's model), the output layer when untied."""
    C, V = cfg.d_model, cfg.vocab_size
    arch = ARCHS[cfg.arch]
    shapes = {"wte": (V, C)}
    if cfg.positions == "learned":
        shapes["wpe"] = (cfg.max_seq_len, C)
    block = arch.block_shapes(cfg)
    for i in range(cfg.n_layers):
        shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({name: (C,) for name in arch.final_norm})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)  # same layout as wte
    return shapes


def name_mismatch(expected, found):
    """How two collections of parameter names differ, "missing [...], unexpected [...]" (four of each at
    most), or None when they hold the same names."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return f"missing {missing[:4]}, unexpected {extra[:4]}" if missing or extra else None
