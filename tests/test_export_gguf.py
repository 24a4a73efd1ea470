"""export_gguf.py: checkpoints and Hugging Face folders to GGUF files for llama.cpp.

Without extras: the rotary reordering of the query and key rows keeps attention's scores. With the
gguf package (scripts/test.sh installs it): the file reads back with gguf's own reader, every key and
tensor as written, and what llama.cpp cannot compute or what must not be written is refused in one
line. With llama-cpp-python (slow; it builds llama.cpp from source): for a tiny model of each block
and each tokenizer kind, llama.cpp's tokens, logits and greedy continuation are ours."""
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

import export_gguf
import generate
import transformer
from bpe import train_bpe
from checkpoint import save_checkpoint
from config import GPT2_VOCAB_SIZE, ModelConfig
from decoding import generate as decode
from errors import GGUFError
from language_model import LanguageModel
from llama import rope_forward
from pretokens import ENDOFTEXT
from tokenizer import BPETokenizer, load_tiktoken

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "TinyStoriesV2-GPT4-train.sample.txt"
TEXTS = ["Once upon a time, there was a little dog named Max.",
         "It's 12:30 - they'll see.  Two  spaces\n\nand\tabs ",
         "Ünïcödé café, naïve résumé; 日本語 🐶!",
         "I'm, you're, we've, he'd, she'll, 'quoted' ''   trailing \n"]
BLOCKS = {"llama": dict(arch="llama", n_kv_heads=2, tie_embeddings=False),
          "llama-tied": dict(arch="llama", n_kv_heads=4, rope_theta=500.0),
          "gpt2-learned": dict(use_learned_pos=True, tie_embeddings=False),
          "gpt2-sinusoidal": dict(use_learned_pos=False)}


def quiet(message):
    pass


def tiny_model(vocab_size, seed=0, d_model=32, **block):
    """A tiny model whose weights (norms and biases included) are drawn large enough that its logits
    spread over several units: greedy decoding then does not hang on rounding."""
    cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_heads=4, d_ff=48, n_layers=2, max_seq_len=64,
                      **block)
    model = LanguageModel(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    for name in sorted(model.params):
        p = model.params[name]
        norm = (".ln_" in name or name.startswith("ln_")) and name.endswith("weight")
        p[...] = (1.0 if norm else 0.0) + (0.1 if norm else 0.3) * rng.standard_normal(p.shape)
    return model


def save(tmp_path, model, tok, name="ck.npz", **meta):
    path = str(tmp_path / name)
    record = dict({"step": 7, "tokenizer": tok.identity(), "tokenizer_model_json": tok.model_json()}, **meta)
    save_checkpoint(path, model.config, model.params, record)
    return path


@pytest.fixture(scope="module")
def bpe_tok():
    """Our BPE, 400 tokens, trained on the bundled sample."""
    model = train_bpe(SAMPLE.read_text(encoding="utf-8")[:200_000], 400)
    return BPETokenizer(model, model.to_json())


@pytest.fixture(scope="module")
def gpt2_tok():
    return load_tiktoken("gpt2", verbose=False)


def need_gguf():
    return pytest.importorskip("gguf", reason="the GGUF export needs the gguf package (scripts/test.sh installs it)")


# ----------------------------------------------------------------------------- the rotary layout (no extras)

def rotate_adjacent_pairs(x, theta):
    """llama.cpp's rotary positions for "llama" (its NORM mode): dimensions (2i, 2i + 1) of each head
    turn by the angle t * theta^(-2i/hs). x (T, n, hs)."""
    T, n, hs = x.shape
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, hs, 2) / hs)  # (T, hs/2)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def test_reordered_query_and_key_rows_give_llama_cpps_rotation_our_scores():
    rng = np.random.default_rng(0)
    T, C, H, hs, theta = 5, 12, 3, 8, 500.0
    x = rng.standard_normal((T, C))
    w_q, w_k = rng.standard_normal((H * hs, C)), rng.standard_normal((H * hs, C))  # HF's (out, in) rows
    ours_q = rope_forward((x @ w_q.T).reshape(1, T, H, hs), theta=theta)[0][0]  # (T, H, hs)
    ours_k = rope_forward((x @ w_k.T).reshape(1, T, H, hs), theta=theta)[0][0]
    theirs_q = rotate_adjacent_pairs((x @ export_gguf.rope_interleave(w_q, H).T).reshape(T, H, hs), theta)
    theirs_k = rotate_adjacent_pairs((x @ export_gguf.rope_interleave(w_k, H).T).reshape(T, H, hs), theta)
    np.testing.assert_allclose(np.einsum("thd,shd->hts", theirs_q, theirs_k),
                               np.einsum("thd,shd->hts", ours_q, ours_k), rtol=1e-10, atol=1e-10)
    # and the rotated vectors themselves are ours with each head's dimensions reordered alike
    np.testing.assert_allclose(theirs_q, export_gguf.rope_interleave(ours_q.reshape(T, H * hs).T, H).T
                               .reshape(T, H, hs), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- the file, read back by gguf

def read_back(path):
    """({key: (type, value)} as export_gguf spells types, {name: (dtype, shape, data)}) of a GGUF file."""
    gguf = need_gguf()
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header: version, counts
            continue
        kind = "ARRAY:" + field.types[-1].name if field.types[0] == gguf.GGUFValueType.ARRAY else field.types[0].name
        meta[key] = (kind, field.contents())
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), np.array(t.data))
               for t in reader.tensors}
    return meta, tensors


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_the_file_reads_back_every_key_and_tensor_as_written(tmp_path, bpe_tok, block, dtype):
    need_gguf()
    path = save(tmp_path, tiny_model(400, **BLOCKS[block]), bpe_tok,
                train_args={"learning_rate": 2e-3, "batch_size": 8, "decay_embeddings": False})
    out = str(tmp_path / "model.gguf")
    metadata, tensors = export_gguf.export(path, out, dtype, log=quiet)
    meta, back = read_back(out)
    assert meta.keys() == metadata.keys()
    for key, (kind, value) in metadata.items():
        assert meta[key][0] == kind, key
        if kind in ("FLOAT32",):
            assert meta[key][1] == np.float32(value), key
        else:
            assert meta[key][1] == value, key
    assert meta["numpy_gpt.train.learning_rate"] == ("FLOAT64", 2e-3)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        kind, shape, data = back[name]
        assert kind == ("F16" if dtype == "float16" and t.ndim == 2 else "F32"), name
        assert shape == t.shape, name
        np.testing.assert_array_equal(data.reshape(shape), t, err_msg=name)


def test_llama_tensors_are_llama_cpps_names_and_layouts(tmp_path, bpe_tok):
    need_gguf()
    model = tiny_model(400, **BLOCKS["llama"])
    _, tensors = export_gguf.export(save(tmp_path, model, bpe_tok), str(tmp_path / "m.gguf"), log=quiet)
    C, F, hs, p = 32, 48, 8, model.params
    assert {n[len("blk.1."):]: t.shape for n, t in tensors.items() if n.startswith("blk.1.")} == {
        "attn_norm.weight": (C,), "attn_q.weight": (4 * hs, C), "attn_k.weight": (2 * hs, C),
        "attn_v.weight": (2 * hs, C), "attn_output.weight": (C, C), "ffn_norm.weight": (C,),
        "ffn_gate.weight": (F, C), "ffn_up.weight": (F, C), "ffn_down.weight": (C, F)}
    assert {n for n in tensors if not n.startswith("blk.")} == {"token_embd.weight", "output_norm.weight",
                                                                "output.weight"}
    w = p["h.1.attn.c_attn.weight"]  # (C, [q | k | v]): q and k reordered per head, v as it is
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], export_gguf.rope_interleave(w[:, :C].T, 4))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"],
                                  export_gguf.rope_interleave(w[:, C:C + 2 * hs].T, 2))
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], w[:, C + 2 * hs:].T)
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate.weight"], p["h.1.mlp.c_fc.weight"][:, :F].T)
    np.testing.assert_array_equal(tensors["output.weight"], p["lm_head.weight"])


def test_gpt2_tensors_are_transposed_and_a_tied_head_writes_no_output(tmp_path, bpe_tok):
    need_gguf()
    model = tiny_model(400, **BLOCKS["gpt2-sinusoidal"])
    _, tensors = export_gguf.export(save(tmp_path, model, bpe_tok), str(tmp_path / "m.gguf"), log=quiet)
    p = model.params
    assert "output.weight" not in tensors
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], p["h.0.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.bias"], p["h.0.attn.c_attn.bias"])
    np.testing.assert_array_equal(tensors["blk.1.ffn_up.weight"], p["h.1.mlp.c_fc.weight"].T)
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], p["h.1.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(tensors["position_embd.weight"], model.positions())


def test_gpt2s_own_tokenizer_is_written_with_its_50257_tokens(tmp_path, gpt2_tok):
    need_gguf()
    model = tiny_model(GPT2_VOCAB_SIZE, d_model=8, arch="llama")
    out = str(tmp_path / "m.gguf")
    export_gguf.export(save(tmp_path, model, gpt2_tok), out, log=quiet)
    meta, _ = read_back(out)
    tokens, types = meta["tokenizer.ggml.tokens"][1], meta["tokenizer.ggml.token_type"][1]
    assert len(tokens) == len(types) == GPT2_VOCAB_SIZE
    assert tokens[:3] == ["!", '"', "#"] and tokens[50256] == "<|endoftext|>" and tokens[262] == "Ġthe"
    assert types[50256] == 3 and set(types[:50256]) == {1}  # control, normal
    assert meta["tokenizer.ggml.merges"][1][:2] == ["Ġ t", "Ġ a"] and len(meta["tokenizer.ggml.merges"][1]) == 50000
    assert meta["tokenizer.ggml.eos_token_id"] == ("UINT32", 50256)


def test_a_vocabulary_larger_than_the_tokenizer_is_padded_with_unused_tokens(tmp_path, bpe_tok):
    need_gguf()
    out = str(tmp_path / "m.gguf")
    export_gguf.export(save(tmp_path, tiny_model(403, arch="llama"), bpe_tok), out, log=quiet)
    meta, _ = read_back(out)
    assert meta["tokenizer.ggml.tokens"][1][-4:] == ["<|endoftext|>", "[PAD400]", "[PAD401]", "[PAD402]"]
    assert meta["tokenizer.ggml.token_type"][1][-4:] == [3, 5, 5, 5]


def test_a_hugging_face_folder_gives_the_checkpoints_file(tmp_path, bpe_tok):
    need_gguf()
    pytest.importorskip("safetensors", reason="reading a Hugging Face folder needs safetensors")
    import export_hf
    for block in ("llama", "gpt2-sinusoidal"):
        path = save(tmp_path, tiny_model(400, **BLOCKS[block]), bpe_tok, name=f"{block}.npz")
        export_hf.export(path, str(tmp_path / block), log=quiet)
        meta_ck, tensors_ck = export_gguf.export(path, str(tmp_path / "a.gguf"), log=quiet)
        meta_hf, tensors_hf = export_gguf.export(str(tmp_path / block), str(tmp_path / "b.gguf"), log=quiet)
        assert meta_hf == meta_ck
        assert tensors_hf.keys() == tensors_ck.keys()
        for name in tensors_ck:
            np.testing.assert_array_equal(tensors_hf[name], tensors_ck[name], err_msg=name)


def test_no_path_user_or_host_name_is_written(tmp_path, bpe_tok):
    need_gguf()
    model = tiny_model(400, arch="llama")
    tok_identity = dict(bpe_tok.identity(), model_file="/home/alice-secret/bpe.json")
    path = save(tmp_path, model, bpe_tok, tokenizer=tok_identity, run_id="alice-secret@laptop-secret",
                train_args={"train_data": "/home/alice-secret/train.jsonl", "save_dir": "/home/alice-secret/ck",
                            "learning_rate": 1e-3, "optimizer": "adamw-secret"})
    out = tmp_path / "m.gguf"
    metadata, _ = export_gguf.export(path, str(out), log=quiet)
    assert b"secret" not in out.read_bytes() and str(tmp_path).encode() not in out.read_bytes()
    assert {k for k in metadata if k.startswith("numpy_gpt.")} == {"numpy_gpt.step", "numpy_gpt.train.learning_rate"}


# ----------------------------------------------------------------------------- refusals, each one line

@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_gpt2s_block_with_relu_is_refused_naming_it(tmp_path, bpe_tok, activation):
    need_gguf()
    path = save(tmp_path, tiny_model(400, activation=activation), bpe_tok)
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFError, match=f"^activation {activation}: llama.cpp's gpt2 architecture computes only"):
        export_gguf.export(path, str(out), log=quiet)
    assert not out.exists()


def test_the_llama_blocks_relu2_mlp_is_refused_naming_it(tmp_path, bpe_tok):
    need_gguf()
    path = save(tmp_path, tiny_model(400, arch="llama", activation="relu2"), bpe_tok)
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFError, match="^activation relu2: llama.cpp's llama architecture computes only the gated"):
        export_gguf.export(path, str(out), log=quiet)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("feature, says", [({"qk_norm": True}, r"QK-norm \(--qk_norm\)"),
                                           ({"logit_softcap": 30.0}, r"soft-capped logits \(--logit_softcap 30\)")])
def test_qk_norm_and_soft_capped_logits_are_refused_naming_them(tmp_path, bpe_tok, capsys, arch, feature, says):
    need_gguf()
    path = save(tmp_path, tiny_model(400, arch=arch, **feature), bpe_tok)
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFError, match=f"^{re.escape(path)}: the model has {says}, which llama.cpp's gpt2 and llama "
                                        "architectures do not compute"):
        export_gguf.export(path, str(out), log=quiet)
    with pytest.raises(SystemExit) as e:
        export_gguf.main([path, str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"error: {path}: the model has") and err.count("\n") == 1
    assert not out.exists()


def test_a_model_without_a_tokenizer_llama_cpp_can_read_is_refused(tmp_path):
    need_gguf()
    model = tiny_model(97, arch="llama")
    path = str(tmp_path / "ck.npz")
    save_checkpoint(path, model.config, model.params, {"step": 1})  # names no tokenizer, not GPT-2's vocabulary
    with pytest.raises(GGUFError, match="llama.cpp needs the tokenizer inside the file, and the checkpoint names no "
                                        "tokenizer and vocab_size 97"):
        export_gguf.export(path, str(tmp_path / "m.gguf"), log=quiet)


def test_a_bpe_that_splits_text_with_another_pattern_is_refused(tmp_path):
    need_gguf()
    model = train_bpe(SAMPLE.read_text(encoding="utf-8")[:50_000], 300, pattern=r"\S+|\s+")
    tok = BPETokenizer(model, model.to_json())
    with pytest.raises(GGUFError, match="its BPE splits text with another pattern than GPT-2's"):
        export_gguf.export(save(tmp_path, tiny_model(300, arch="llama"), tok), str(tmp_path / "m.gguf"), log=quiet)


def test_outputs_that_are_inputs_folders_or_other_files_are_refused(tmp_path, bpe_tok):
    need_gguf()
    path = save(tmp_path, tiny_model(400, arch="llama"), bpe_tok)
    before = Path(path).read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    os.symlink(path, tmp_path / "link.gguf")
    os.mkfifo(tmp_path / "fifo.gguf")  # read, it would wait for a writer
    for out, why in ((path, "is the input"), (str(tmp_path / "link.gguf"), "is the input"),
                     (str(tmp_path), "is a folder"), (str(tmp_path / "notes.txt"), "is not a GGUF file"),
                     (str(tmp_path / "fifo.gguf"), "is not a GGUF file")):
        with pytest.raises(GGUFError, match=why):
            export_gguf.export(path, out, log=quiet)
    assert Path(path).read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    out = tmp_path / "m.gguf"
    export_gguf.export(path, str(out), log=quiet)
    export_gguf.export(path, str(out), "float16", log=quiet)  # an earlier GGUF file is replaced
    assert read_back(str(out))[0]["general.file_type"] == ("UINT32", 1)


def test_a_failed_write_leaves_the_earlier_file(tmp_path, bpe_tok, monkeypatch):
    gguf = need_gguf()
    path = save(tmp_path, tiny_model(400, arch="llama"), bpe_tok)
    out = tmp_path / "m.gguf"
    export_gguf.export(path, str(out), log=quiet)
    before = out.read_bytes()

    def full_disk(self, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError):
        export_gguf.export(path, str(out), "float16", log=quiet)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.npz", "m.gguf"]  # no temporary file left


def test_the_command_line_says_each_refusal_in_one_line(tmp_path, bpe_tok, capsys, monkeypatch):
    need_gguf()
    path = save(tmp_path, tiny_model(400, activation="relu"), bpe_tok)
    with pytest.raises(SystemExit) as e:
        export_gguf.main([path, str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: activation relu:") and err.count("\n") == 1
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if it were not installed
    with pytest.raises(SystemExit):
        export_gguf.main([path, str(tmp_path / "m.gguf")])
    assert capsys.readouterr().err == "error: the GGUF export needs the gguf package: pip install gguf\n"


# ----------------------------------------------------------------------------- llama.cpp itself (slow)

def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as e:  # an OSError too, where its library was built for another machine
        pytest.skip(f"llama.cpp is not at hand: llama_cpp cannot be imported ({e}); `pip install llama-cpp-python` "
                    "builds it (scripts/test.sh)")
    return llama_cpp


def ggml_gelu(x, bias=None):
    """llama.cpp's GELU on the CPU (ggml-cpu/vec.h, GGML_GELU_FP16): the input rounded to float16, the
    tanh GELU read from a float16 table; 0 below -10, x above 10. For comparing its GPT-2 logits."""
    if bias is not None:
        x += bias  # as transformer.gelu_forward, which this stands in for, adds the bias in place
    h = x.astype(np.float16).astype(np.float32)
    table = 0.5 * h * (1 + np.tanh(transformer.GELU_K * (h + 0.044715 * h ** 3)))
    out = np.where(x <= -10, 0, np.where(x >= 10, x, table.astype(np.float16)))
    return out.astype(x.dtype), None


def greedy_text(path, prompt, n):
    """generate.py's greedy continuation of prompt, as it prints it."""
    out = io.StringIO()
    assert generate.main(["--checkpoint", path, "--prompt", prompt, "--temperature", "0", "--max_length", str(n)],
                         out=out, err=io.StringIO()) == 0
    return out.getvalue().split("-----\n", 1)[1][:-1]  # after the sample's header, less the final newline


# each block with each kind of tokenizer: our BPE and tiktoken's GPT-2 (its 50257 tokens: a narrower model)
CASES = [("llama", "bpe"), ("llama-tied", "gpt2"), ("gpt2-learned", "gpt2"), ("gpt2-sinusoidal", "bpe")]


@pytest.mark.slow
@pytest.mark.parametrize("block,kind", CASES)
def test_llama_cpp_tokenizes_computes_and_continues_as_we_do(tmp_path, bpe_tok, gpt2_tok, monkeypatch, block, kind):
    llama_cpp = llama_cpp_module()
    need_gguf()
    tok = bpe_tok if kind == "bpe" else gpt2_tok
    model = tiny_model(tok.n_vocab, d_model=32 if kind == "bpe" else 16, **BLOCKS[block])
    path = save(tmp_path, model, tok)
    out = str(tmp_path / "m.gguf")
    export_gguf.export(path, out, log=quiet)
    llm = llama_cpp.Llama(out, n_ctx=model.config.max_seq_len, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # its cache in float32

    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text), text
    special = f"The end.{ENDOFTEXT}Once again"
    assert llm.tokenize(special.encode(), add_bos=False, special=True) == tok.encode(special)

    ids = tok.encode(TEXTS[0])
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    ours = model.forward(np.array([ids]))[0]
    scale = ours.max() - ours.min()
    if model.config.arch == "gpt2":  # its GELU rounds through float16: 1.2e-4 to 3.2e-4 of the range measured
        assert np.abs(theirs - ours).max() <= 1e-3 * scale
        with monkeypatch.context() as m:
            m.setattr(transformer, "gelu_forward", ggml_gelu)
            ours = model.forward(np.array([ids]))[0]  # then up to 7e-5 (a pre-activation rounded the other way)
    assert np.abs(theirs - ours).max() <= 1e-4 * scale

    prompt, n = TEXTS[0], 30
    mine = list(decode(model, tok.encode(prompt), n, temperature=0, eot_id=tok.eot_id))  # what generate.py runs
    theirs = []
    for token in llm.generate(tok.encode(prompt), temp=0.0):  # llama.cpp's greedy sampler
        if token == tok.eot_id or len(theirs) == n:
            break
        theirs.append(token)
    assert theirs == mine
    assert greedy_text(path, prompt, n) == (prompt.encode() + llm.detokenize(theirs)).decode("utf-8", "replace")
