"""[data & text] GPT-2's files: its spelling of a byte-level BPE (vocab.json + merges.txt) and its own BPE, bundled.

GPT-2 (and Hugging Face's GPT2Tokenizer) keeps a BPE as two text files:
    vocab.json    {token: id}, every token's bytes spelled as printable characters by
                  bytes_to_unicode (a space is "Ġ"); special tokens as themselves ("<|endoftext|>")
    merges.txt    "#version: 0.2", then one merge "left right" per line, in rank order
model_from_vocab_merges reads such a pair into our BPEModel, write_vocab_merges writes one (its strings:
gpt2_spelling, which export_gguf.py writes too).

GPT-2's own BPE is tiktoken's r50k_base encoding, bundled as data/sample/r50k_base.tiktoken (its
sha256 checked) so that it works offline: r50k_ranks() reads it once per process, gpt2_encoding()
makes tiktoken's encoding of it, and gpt2_bpe_model() turns its ranks into a BPEModel with explicit
merges (what export_hf.py writes as vocab.json + merges.txt).

    from gpt2_files import gpt2_bpe_model, model_from_vocab_merges, write_vocab_merges
    model = model_from_vocab_merges("hf_small/vocab.json", "hf_small/merges.txt")
    write_vocab_merges(gpt2_bpe_model(), "vocab.json", "merges.txt")
"""
import functools
import json
import os
import tempfile
from pathlib import Path

import tiktoken

from atomic import atomic_write
from bpe import MAX_MODEL_BYTES, BPEModel, ints_below
from config import GPT2_EOT_ID, GPT2_VOCAB_SIZE
from errors import TokenizerError
from pretokens import ENDOFTEXT, GPT2_PATTERN
from untrusted import open_regular, read_json

BUNDLED_R50K = Path(__file__).resolve().parent / "data" / "sample" / "r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Where tiktoken keeps the two files it downloads for get_encoding("gpt2") (cache name = sha1(url)).
GPT2_CACHE_KEYS = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")


# ----------------------------------------------------------------------------------------------
# vocab.json + merges.txt

def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters, used by vocab.json / merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def model_from_vocab_merges(vocab_path, merges_path):
    """A BPEModel from GPT-2 style vocab.json ({token string: id}) + merges.txt ("a b" per line, by rank)."""
    dec = {c: b for b, c in bytes_to_unicode().items()}
    try:
        tok2id = read_json(vocab_path, "vocab.json", MAX_MODEL_BYTES, TokenizerError)
        if not isinstance(tok2id, dict) or not tok2id or not ints_below(list(tok2id.values()), len(tok2id)) \
                or len(set(tok2id.values())) != len(tok2id):
            raise TokenizerError(f"{vocab_path} is not a vocab.json: a {{token: id}} object whose ids are 0 to "
                                 "its size - 1, each once")
        n = len(tok2id)
        lines = []
        with open_regular(merges_path, "r", "merges.txt", MAX_MODEL_BYTES, TokenizerError, encoding="utf-8") as f:
            for ln in f:  # each merge makes a token, so a vocabulary of n ids holds at most n - 256 of them
                lines.append(ln.rstrip("\n"))
                if len(lines) > n - 256 + 1:  # + 1: the "#version" line
                    raise TokenizerError(f"{merges_path} has more merges than the {n} tokens of {vocab_path} "
                                         f"allow (at most {n - 256}): are they a pair?")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {vocab_path} / {merges_path}: {e}") from None
    vocab, specials = [None] * n, {}
    for s, i in tok2id.items():
        if all(c in dec for c in s) and not (s.startswith("<|") and s.endswith("|>")):
            vocab[i] = bytes(dec[c] for c in s)
        else:
            specials[s] = i
    merges, merge_ids = [], []
    for lineno, ln in enumerate(lines, 1):
        if not ln.strip() or (lineno == 1 and ln.startswith("#version")):
            continue
        parts = ln.split(" ")
        if len(parts) != 2 or parts[0] not in tok2id or parts[1] not in tok2id or parts[0] + parts[1] not in tok2id:
            raise TokenizerError(f"{merges_path} line {lineno}: {ln!r} is not a merge of two tokens of {vocab_path}")
        merges.append((tok2id[parts[0]], tok2id[parts[1]]))
        merge_ids.append(tok2id[parts[0] + parts[1]])
    if ENDOFTEXT not in specials:  # GPT-2 style models end with it; add one if missing
        specials[ENDOFTEXT] = n
        vocab.append(None)
    model = BPEModel(vocab, merges, specials, GPT2_PATTERN, merge_ids,
                     {"converted_from": [os.path.basename(vocab_path), os.path.basename(merges_path)]})
    model.check(f"{vocab_path} + {merges_path}")
    return model



def gpt2_spelling(model):
    """(tok2id, merge_lines): a BPEModel in GPT-2's spelling, what vocab.json ({token string: id}) and
    merges.txt ("left right" per merge, in rank order) hold, and the GGUF export's token list and merges.

    A token is spelled with bytes_to_unicode (a space is "Ġ"), a special token as its own string; ids
    the model leaves empty are left out. There is no field for a pre-tokenisation pattern, so only
    models that split text with GPT-2's pattern can be spelled; TokenizerError says why not.
    """
    def cannot(why):
        return TokenizerError(f"cannot write this BPE model as vocab.json + merges.txt: {why}")
    if model.pattern != GPT2_PATTERN:
        raise cannot("it splits text with another pattern than GPT-2's, which the pair implies")
    enc = bytes_to_unicode()
    spelled = [None if v is None else "".join(enc[b] for b in v) for v in model.vocab]
    tok2id = {}
    for i, s in enumerate(spelled):
        if s is None:
            continue
        if s.startswith("<|") and s.endswith("|>"):  # would read back as a special token
            raise cannot(f"token {i} spells {s!r}, which reads as a special token")
        if s in tok2id:
            raise cannot(f"tokens {tok2id[s]} and {i} have the same bytes")
        tok2id[s] = i
    for s, i in model.specials.items():
        if s in tok2id or not (0 <= i < len(spelled)) or spelled[i] is not None:
            raise cannot(f"special token {s!r} (id {i}) collides with another token")
        tok2id[s] = i
    merge_lines = []
    for (a, b), t in zip(model.merges, model.merge_ids):
        if spelled[t] != spelled[a] + spelled[b]:
            raise cannot(f"merge ({a}, {b}) does not make token {t}")
        merge_lines.append(f"{spelled[a]} {spelled[b]}")
    return dict(sorted(tok2id.items(), key=lambda kv: kv[1])), merge_lines


def write_vocab_merges(model, vocab_path, merges_path):
    """Write a BPEModel as GPT-2 style vocab.json + merges.txt (gpt2_spelling): the inverse of
    model_from_vocab_merges."""
    tok2id, merge_lines = gpt2_spelling(model)
    with atomic_write(vocab_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(tok2id, ensure_ascii=False) + "\n")
    with atomic_write(merges_path, "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + merge_lines) + "\n")


# ----------------------------------------------------------------------------------------------
# GPT-2's BPE: the bundled r50k_base ranks

@functools.lru_cache(maxsize=1)
def r50k_ranks(path=BUNDLED_R50K):
    """GPT-2's ranks {token bytes: id} from the bundled r50k_base file (sha256 verified), read once per
    process; no network."""
    from tiktoken.load import load_tiktoken_bpe
    if not os.path.exists(path):
        raise TokenizerError(f"bundled GPT-2 ranks not found at {path}; restore data/sample/ from the repository")
    try:
        return load_tiktoken_bpe(str(path), expected_hash=R50K_SHA256)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: {e}; restore data/sample/r50k_base.tiktoken from the repository") from None


def gpt2_encoding():
    """tiktoken's gpt2 encoding built from the bundled ranks."""
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=r50k_ranks(),
                             special_tokens={ENDOFTEXT: GPT2_EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def in_tiktoken_cache():
    """Whether tiktoken's cache holds the files get_encoding("gpt2") would download."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return cache_dir != "" and all(os.path.exists(os.path.join(cache_dir, k)) for k in GPT2_CACHE_KEYS)


def bpe_model_from_ranks(ranks, specials):
    """tiktoken's ranks ({token bytes: id}) as a BPEModel with explicit merges.

    A token's merge is the pair that byte-level BPE reaches when only lower ranks may merge:
    for a well-formed table that leaves exactly two parts, the two tokens it was made from.
    """
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
    """GPT-2's BPE (the bundled r50k_base ranks) as a BPEModel."""
    ranks = r50k_ranks()
    model = bpe_model_from_ranks(ranks, {ENDOFTEXT: len(ranks)})
    model.check(str(BUNDLED_R50K))
    return model
