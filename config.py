"""The model's hyperparameters, its parameters' names and shapes, and the size presets.

    cfg = ModelConfig(vocab_size=50257, d_model=128, n_heads=4, d_ff=512, n_layers=2, max_seq_len=128)
    shapes = param_shapes(cfg)              # {"wte": (50257, 128), ..., "ln_f.bias": (128,)}
    cfg = config_from_flags(PRESETS["small"])   # the same model, from train.py's flag names

ModelConfig is saved inside every checkpoint (checkpoint.py), so generate.py needs nothing
else. A checkpoint written before a field existed still loads: the field takes its default.

PRESETS is the one table of the model sizes: train.py --preset, benchmark.py (--all, --sizes),
generate.py --benchmark and the README's table of sizes read it. A preset holds train.py flag
values; flags given on the command line win over a preset's (train.py applies it only to flags
left out), so a preset may set any flag, the optimizer's too.
"""
from dataclasses import asdict, dataclass, fields

import numpy as np

GPT2_VOCAB_SIZE = 50257  # GPT-2's tiktoken encoding: 50,256 merged tokens, then <|endoftext|>
GPT2_EOT_ID = 50256
# The longest context (max_seq_len) this code builds a model for, whether from flags, a checkpoint or a
# Hugging Face folder: the sinusoidal table and generation's key/value cache are sized by it, not by any
# array in a file, so an untrusted number must not choose it freely.
MAX_SEQ_LEN = 1 << 17


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
    activation: str = "gelu"  # "gelu" (tanh form, as GPT-2) or "relu"
    dropout: float = 0.0  # drop probability while training (dropout.py), 0: none; never in evaluation or generation

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ValueError(f"ModelConfig.max_seq_len {self.max_seq_len} is above the {MAX_SEQ_LEN} this code "
                             "supports")
        for name in ("use_learned_pos", "tie_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self):
        return asdict(self)

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
    """{name: shape} of every parameter, in GPT-2's names and layouts."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"wte": (V, C)}
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
# on our BPE of 4,096 tokens (first values, from 15 minutes on 3.5 MB of TinyStories; scripts/quality.py
# measures what a change of them gives).
PRESETS = {
    "tiny": dict(d_model=64, n_heads=2, d_ff=256, n_layers=2, batch_size=32, seq_len=128),
    "small": dict(d_model=128, n_heads=4, d_ff=512, n_layers=2, batch_size=32, seq_len=128),
    "medium": dict(d_model=256, n_heads=8, d_ff=1024, n_layers=4, batch_size=16, seq_len=256),
    "large": dict(d_model=512, n_heads=16, d_ff=2048, n_layers=6, batch_size=16, seq_len=256),
    "laptop": dict(vocab_size=4096, d_model=256, n_heads=8, d_ff=1024, n_layers=4, seq_len=128,
                   use_learned_pos=False, no_tie_embeddings=False, activation="gelu",
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
            "no_tie_embeddings": not config.tie_embeddings, "activation": config.activation}
