"""The model's hyperparameters, its parameters' names and shapes, and the size presets.

    cfg = ModelConfig(vocab_size=50257, d_model=128, n_heads=4, d_ff=512, n_layers=2, max_seq_len=128)
    shapes = param_shapes(cfg)              # {"wte": (50257, 128), ..., "ln_f.bias": (128,)}
    cfg = config_from_flags(PRESETS["small"])   # the same model, from train.py's flag names
    cfg = ModelConfig(arch="llama", d_model=128, n_heads=4, n_kv_heads=2, d_ff=384)   # Llama's block (llama.py)

Two architectures share the embedding, the head and the parameter names: "gpt2" (transformer.py:
layer norm, learned or sinusoidal position table, GELU/ReLU MLP, biases) and "llama" (llama.py:
RMSNorm, rotary positions, SwiGLU, no biases, no position table). The fields only one of them
uses (use_learned_pos, activation for GPT-2; rope_theta, n_kv_heads for Llama) must keep their
GPT-2 values for "gpt2" and Llama's for "llama", so that one model has one config.

ModelConfig is saved inside every checkpoint (checkpoint.py), so generate.py needs nothing
else. A checkpoint written before a field existed still loads: the field takes its default.

PRESETS is the one table of the model sizes: train.py --preset, benchmark.py (--all, --sizes),
generate.py --benchmark and the README's table of sizes read it. A preset holds train.py flag
values; flags given on the command line win over a preset's (train.py applies it only to flags
left out), so a preset may set any flag, the optimizer's too.
"""
from dataclasses import asdict, dataclass, fields

import numpy as np

from flag_types import Number
from llama import RMS_EPS, ROPE_THETA, llama_block_shapes
from transformer import LN_EPS

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
                "dropout": Number(float, 0, 1, high_open=True)}


@dataclass
class ModelConfig:
    vocab_size: int = GPT2_VOCAB_SIZE
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 2
    max_seq_len: int = 128  # length of the positional table: the longest context
    use_learned_pos: bool = False  # learned wpe (GPT-2) instead of the fixed sinusoidal table
    tie_embeddings: bool = True  # the head projects with wte instead of its own lm_head.weight
    # GPT-2's MLP: "gelu" (tanh form, as GPT-2), "relu" or "relu2" (relu(x)^2); Llama's is "swiglu", its only
    # one. None (the default): the architecture's own, "gelu" or "swiglu"
    activation: str = None
    arch: str = "gpt2"  # "gpt2" (transformer.py's block) or "llama" (llama.py's)
    rope_theta: float = None  # llama: the base of the rotary frequencies, None: ROPE_THETA (10000); gpt2: None
    n_kv_heads: int = None  # llama: key/value heads (fewer: grouped-query attention), None: n_heads; gpt2: None
    norm_eps: float = RMS_EPS  # the eps of the norms: RMSNorm's for llama; GPT-2's layer norm has LN_EPS, the same
    dropout: float = 0.0  # drop probability while training (dropout.py), 0: none; never in evaluation or generation

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            FIELD_RANGES[name].check(getattr(self, name), f"ModelConfig.{name}")
        for name in ("use_learned_pos", "tie_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"ModelConfig.arch must be 'gpt2' or 'llama', got {self.arch!r}")
        if self.arch == "llama":
            self._check_llama()
        else:
            self._check_gpt2()
        for name in ("dropout", "norm_eps"):
            FIELD_RANGES[name].check(getattr(self, name), f"ModelConfig.{name}")

    def _check_gpt2(self):
        if self.activation is None:
            self.activation = "gelu"
        if self.activation not in ("gelu", "relu", "relu2"):
            raise ValueError(f"activation must be 'gelu', 'relu' or 'relu2', got {self.activation!r}")
        for name in ("rope_theta", "n_kv_heads"):
            if getattr(self, name) is not None:
                raise ValueError(f"ModelConfig.{name} is the Llama block's (arch 'llama'); GPT-2's has none, got "
                                 f"{getattr(self, name)!r}")
        if self.norm_eps != LN_EPS:
            raise ValueError(f"ModelConfig.norm_eps {self.norm_eps!r}: GPT-2's layer norm uses {LN_EPS}")

    def _check_llama(self):
        if self.activation is None:
            self.activation = "swiglu"
        if self.activation != "swiglu":
            raise ValueError(f"activation {self.activation!r}: the Llama block's feed-forward is SwiGLU ('swiglu')")
        if self.use_learned_pos:
            raise ValueError("use_learned_pos: the Llama block has no position table (its positions are rotary)")
        if self.rope_theta is None:
            self.rope_theta = ROPE_THETA
        self.rope_theta = float(FIELD_RANGES["rope_theta"].check(self.rope_theta, "ModelConfig.rope_theta"))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        k = FIELD_RANGES["n_kv_heads"].check(self.n_kv_heads, "ModelConfig.n_kv_heads")
        llama_block_shapes(self.d_model, self.n_heads, k, self.d_ff)  # its ValueError: heads that do not fit

    def to_dict(self):
        return asdict(self)

    def describe(self):
        """One line for people: the block and its sizes."""
        head = "tied head" if self.tie_embeddings else "untied head"
        layers = f"{self.n_layers} layer" + "s" * (self.n_layers != 1)
        if self.arch == "llama":
            kv = f" ({self.n_kv_heads} key/value head{'s' * (self.n_kv_heads != 1)})" \
                if self.n_kv_heads != self.n_heads else ""
            return (f"llama: {layers}, d_model {self.d_model}, {self.n_heads} heads{kv}, RMSNorm, "
                    f"rotary positions (theta {self.rope_theta:g}), SwiGLU d_ff {self.d_ff}, no biases, {head}")
        pos = "learned" if self.use_learned_pos else "sinusoidal"
        return (f"gpt2: {layers}, d_model {self.d_model}, {self.n_heads} heads, layer norm, {pos} "
                f"positions, {self.activation} MLP d_ff {self.d_ff}, {head}")

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
    """{name: shape} of every parameter, in GPT-2's names and layouts. Llama's blocks take the names
    llama.llama_block_shapes gives, without the biases; it has no wpe and no ln_f.bias."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"wte": (V, C)}
    if cfg.arch == "llama":
        block = llama_block_shapes(C, cfg.n_heads, cfg.n_kv_heads, F)
        for i in range(cfg.n_layers):
            shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
        shapes["ln_f.weight"] = (C,)
        if not cfg.tie_embeddings:
            shapes["lm_head.weight"] = (V, C)
        return shapes
    if cfg.use_learned_pos:
        shapes["wpe"] = (cfg.max_seq_len, C)
    for i in range(cfg.n_layers):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, F), f"h.{i}.mlp.c_fc.bias": (F,),
            f"h.{i}.mlp.c_proj.weight": (F, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)  # same layout as wte
    return shapes


def name_mismatch(expected, found):
    """How two collections of parameter names differ, "missing [...], unexpected [...]" (four of each at
    most), or None when they hold the same names."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return f"missing {missing[:4]}, unexpected {extra[:4]}" if missing or extra else None


# The guide's model sizes, with the batch benchmark.py times each at (train.py flag values); and laptop,
# a whole recipe: every model and optimizer flag, for --time_budget minutes on a 2-core laptop, trained
# on our BPE of 4,096 tokens: the Llama block, which scored best of the recipes tried with
# scripts/quality.py (15 minutes on 3.5 MB of TinyStories; the README's table). With --arch gpt2 its
# block's flags give way to GPT-2's (d_ff 4 d_model, gelu): the GPT-2 recipe that was tried beside it.
PRESETS = {
    "tiny": dict(d_model=64, n_heads=2, d_ff=256, n_layers=2, batch_size=32, seq_len=128),
    "small": dict(d_model=128, n_heads=4, d_ff=512, n_layers=2, batch_size=32, seq_len=128),
    "medium": dict(d_model=256, n_heads=8, d_ff=1024, n_layers=4, batch_size=16, seq_len=256),
    "large": dict(d_model=512, n_heads=16, d_ff=2048, n_layers=6, batch_size=16, seq_len=256),
    "laptop": dict(vocab_size=4096, d_model=256, n_heads=8, d_ff=704, n_layers=4, seq_len=128,
                   arch="llama", rope_theta=10000.0, n_kv_heads=8,
                   use_learned_pos=False, no_tie_embeddings=False, activation="swiglu",
                   batch_size=32, grad_accum=1, optimizer="adamw", learning_rate=2e-3, min_lr=2e-4,
                   warmup_steps=100, lr_schedule="cosine", weight_decay=0.01, decay_embeddings=False,
                   beta1=0.9, beta2=0.999, grad_clip=1.0, dropout=0.0, time_budget=15),
}


def config_from_flags(flags):
    """The ModelConfig that train.py's flags describe ({flag name: value}; those left out take
    ModelConfig's defaults). --seq_len is the model's max_seq_len."""
    renamed = {"seq_len": "max_seq_len"}
    known = {f.name for f in fields(ModelConfig)}
    values = {renamed.get(k, k): v for k, v in flags.items() if renamed.get(k, k) in known}
    if "no_tie_embeddings" in flags:
        values["tie_embeddings"] = not flags["no_tie_embeddings"]
    return ModelConfig(**values)


def flags_from_config(config):
    """The values of train.py's architecture flags that describe config (--seq_len aside: a run may
    use a shorter context than the model's max_seq_len)."""
    return {"vocab_size": config.vocab_size, "d_model": config.d_model, "n_heads": config.n_heads,
            "d_ff": config.d_ff, "n_layers": config.n_layers, "use_learned_pos": config.use_learned_pos,
            "no_tie_embeddings": not config.tie_embeddings, "activation": config.activation, "arch": config.arch,
            "rope_theta": config.rope_theta, "n_kv_heads": config.n_kv_heads}
