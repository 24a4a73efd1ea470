"""explore.py: the API's numbers are the model's own (against an independent NumPy forward pass, both blocks,
grouped-query attention included), its sampling is generate.py's, bad requests get a 4xx while the server
goes on serving, Ctrl-C ends it, and a real browser (headless Chromium) shows what the API says."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import explore
from bpe import train_bpe
from checkpoint import save_checkpoint
from config import ModelConfig
from decoding import generate
from explore import Explorer, make_server
from language_model import LanguageModel
from loss import IGNORE_INDEX
from model_views import logit_lens, look_inside
from sampling import next_token_probs
from tokenizer import get_tokenizer

REPO = Path(explore.__file__).resolve().parent
TEXT = "Once upon a time, there was a little girl named Lily. She saw a big red ball in the park."
ARCHES = {
    "gpt2": ModelConfig(vocab_size=300, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=64,
                        use_learned_pos=True, tie_embeddings=False),
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama": ModelConfig(arch="llama", vocab_size=300, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, n_layers=2,
                         max_seq_len=64, rope_theta=50.0),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A 300-token BPE of the bundled stories (the first 20,000 characters)."""
    text = (REPO / "data" / "sample" / "TinyStories-valid.sample.txt").read_text(encoding="utf-8")[:20000]
    path = tmp_path_factory.mktemp("bpe") / "bpe300.json"
    path.write_text(train_bpe(text, 300).to_json(), encoding="utf-8")
    return get_tokenizer("bpe", model_file=str(path), verbose=False)


def fixed_model(cfg, seed=3, scale=0.4, dtype=np.float64):
    """Weights from this test's own generator (not init_params), large enough for peaked attention."""
    model = LanguageModel(cfg, seed=0, dtype=dtype, for_training=False)
    rng = np.random.default_rng(seed)
    for name in sorted(model.params):
        p = model.params[name]
        if ".ln_" in name or name.startswith("ln_"):
            p[...] = name.endswith("weight") + 0.1 * rng.standard_normal(p.shape)
        else:
            p[...] = scale * rng.standard_normal(p.shape)
    return model


class Client:
    """Requests to the server at base (its address, "http://127.0.0.1:PORT/")."""

    def __init__(self, base):
        self.base = base

    def request(self, method, path, data=None, headers=None):
        """(status, body bytes) of a request; data: bytes, or an object sent as JSON."""
        if data is not None and not isinstance(data, bytes):
            data = json.dumps(data).encode("utf-8")
        req = urllib.request.Request(self.base + path.lstrip("/"), data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method, path, data=None):
        status, body = self.request(method, path, data)
        return status, json.loads(body)

    def post(self, path, data):
        status, answer = self.json("POST", path, data)
        assert status == 200, answer
        return answer



class Served(Client):
    """A server for explorer on a free port, in a thread."""

    def __init__(self, explorer):
        self.server = make_server(explorer, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.explorer = explorer
        super().__init__(explore.address(self.server))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=sorted(ARCHES))
def served(request, tok):
    model = fixed_model(ARCHES[request.param])
    s = Served(Explorer(model, tok, step=5, source=None))
    yield s
    s.close()


# ----------------------------------------------------------------------------- an independent forward pass

def reference_forward(cfg, p, ids):
    """The model's function in plain float64 NumPy, from the weights: (logits (T, V), attention (L, H, T, T),
    residual (L + 1, T, C)). GPT-2: layer norm, learned positions, GELU (tanh form); Llama: RMSNorm, rotary
    positions (HF's rotate_half pairs), SwiGLU or relu2's MLP, query head j reading key/value head j // (H / Hkv)."""
    T, C, H = len(ids), cfg.d_model, cfg.n_heads
    hs, Hkv = C // H, cfg.n_kv_heads or H
    llama = cfg.arch == "llama"

    def norm(x, name):
        if llama:
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * p[name + ".weight"]
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * p[name + ".weight"] + p[name + ".bias"]

    def rotate(x):  # (n, T, hs) at positions 0 .. T-1
        freq = cfg.rope_theta ** (-np.arange(0, hs, 2) / hs)
        angle = np.arange(T)[:, None] * freq  # (T, hs/2)
        cos, sin = np.cos(np.concatenate([angle, angle], -1)), np.sin(np.concatenate([angle, angle], -1))
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    x = p["wte"][ids] + (0 if llama else p["wpe"][:T])
    residual, attention = [x], []
    for i in range(cfg.n_layers):
        w = {k[len(f"h.{i}."):]: v for k, v in p.items() if k.startswith(f"h.{i}.")}
        h = norm(x, f"h.{i}.ln_1")
        qkv = h @ w["attn.c_attn.weight"] + (0 if llama else w["attn.c_attn.bias"])
        q = qkv[:, :C].reshape(T, H, hs).transpose(1, 0, 2)  # (H, T, hs)
        k = qkv[:, C: C + Hkv * hs].reshape(T, Hkv, hs).transpose(1, 0, 2)  # (Hkv, T, hs)
        v = qkv[:, C + Hkv * hs:].reshape(T, Hkv, hs).transpose(1, 0, 2)
        if llama:
            q, k = rotate(q), rotate(k)
        k, v = np.repeat(k, H // Hkv, axis=0), np.repeat(v, H // Hkv, axis=0)  # (H, T, hs)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hs)
        scores[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        attention.append(att)
        y = (att @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + y @ w["attn.c_proj.weight"] + (0 if llama else w["attn.c_proj.bias"])
        h = norm(x, f"h.{i}.ln_2")
        if llama and cfg.activation == "relu2":  # two matrices, relu(u)^2, no biases
            u = h @ w["mlp.c_fc.weight"]
            x = x + np.maximum(u, 0) ** 2 @ w["mlp.c_proj.weight"]
        elif llama:
            F = w["mlp.c_proj.weight"].shape[0]
            u = h @ w["mlp.c_fc.weight"]
            gate, up = u[:, :F], u[:, F:]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp.c_proj.weight"]
        else:
            u = h @ w["mlp.c_fc.weight"] + w["mlp.c_fc.bias"]
            a = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            x = x + a @ w["mlp.c_proj.weight"] + w["mlp.c_proj.bias"]
        residual.append(x)
    out = p["wte"] if cfg.tie_embeddings else p["lm_head.weight"]
    lens = [norm(r, "ln_f") @ out.T for r in residual]
    return lens[-1], np.stack(attention), lens


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- the numbers

def test_model_views_logits_are_language_models(served):
    model = served.explorer.model
    ids = served.explorer.tok.encode(TEXT)
    views = look_inside(model, ids)
    np.testing.assert_array_equal(views.logits, model.forward(np.array([ids]))[0])
    assert views.attention.shape == (2, model.config.n_heads, len(ids), len(ids))


def test_model_views_follow_the_llama_blocks_relu2_mlp():
    """look_inside runs the block's own code: a Llama model with the two-matrix relu2 MLP shows its own logits,
    attention and residual stream, as the independent forward pass computes them."""
    cfg = ModelConfig(**dict(ARCHES["llama"].to_dict(), activation="relu2", d_ff=None))
    assert cfg.d_ff == 4 * cfg.d_model
    model = fixed_model(cfg)
    ids = [5, 17, 3, 250, 42, 8, 99, 5]
    views = look_inside(model, ids)
    ref_logits, ref_att, ref_lens = reference_forward(cfg, model.params, ids)
    np.testing.assert_array_equal(views.logits, model.forward(np.array([ids]))[0])
    np.testing.assert_allclose(views.logits, ref_logits, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(views.attention, ref_att, atol=1e-9)
    np.testing.assert_allclose(logit_lens(model, views.residual), np.stack(ref_lens), rtol=1e-9, atol=1e-9)


def test_analyze_numbers_are_the_models_own(served):
    model, tok = served.explorer.model, served.explorer.tok
    cfg = model.config
    a = served.post("/api/analyze", {"text": TEXT})
    ids = tok.encode(TEXT)
    T = len(ids)
    assert [t["id"] for t in a["tokens"]] == ids and a["truncated"] is None
    assert "".join(t["text"] for t in a["tokens"]) == TEXT
    ref_logits, ref_att, ref_lens = reference_forward(cfg, model.params, ids)

    # top: the softmax of LanguageModel's logits, the 10 most likely, most likely first
    probs = softmax(model.forward(np.array([ids]))[0])  # (T, V)
    np.testing.assert_allclose(probs, softmax(ref_logits), rtol=1e-9, atol=1e-12)
    for t in range(T):
        top = a["top"][t]
        assert [c["id"] for c in top] == list(np.argsort(-probs[t], kind="stable")[:10])
        np.testing.assert_allclose([c["p"] for c in top], probs[t, [c["id"] for c in top]], rtol=1e-12)
        assert [c["text"] for c in top] == [tok.decode_bytes([c["id"]]).decode("utf-8", "backslashreplace")
                                            for c in top]

    # attention: every head, query head order, rows sum to 1, nothing above the diagonal, the reference's
    att = np.array(a["attention"])
    assert att.shape == (cfg.n_layers, cfg.n_heads, T, T)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=T * 1e-6)
    assert (att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    np.testing.assert_allclose(att, ref_att, atol=1e-6)
    if cfg.arch == "llama":  # the heads that share a key/value head still differ: their queries do
        assert np.abs(att[:, 0] - att[:, 1]).max() > 1e-3

    # the logit lens: each depth through ln_f and the output layer; the last is the model's output
    for t in (0, T // 2, T - 1):
        lens = a["lens"][t]
        assert len(lens) == cfg.n_layers + 1
        for d, depth in enumerate(lens):
            p_d = softmax(ref_lens[d][t])
            assert [c["id"] for c in depth["top"]] == list(np.argsort(-p_d, kind="stable")[:5])
            np.testing.assert_allclose([c["p"] for c in depth["top"]], p_d[[c["id"] for c in depth["top"]]],
                                       rtol=1e-9)
            assert depth["p_next"] is None if t == T - 1 else math.isclose(depth["p_next"], p_d[ids[t + 1]],
                                                                           rel_tol=1e-9)
        assert [(c["id"], c["p"]) for c in lens[-1]["top"]] == [(c["id"], c["p"]) for c in a["top"][t][:5]]

    # loss_bits: the per-token loss the evaluation computes (model.evaluate with one counted target), in bits
    assert a["loss_bits"][0] is None and len(a["loss_bits"]) == T
    for t in range(1, T):
        targets = np.full((1, T - 1), IGNORE_INDEX)
        targets[0, t - 1] = ids[t]
        loss, _ = model.evaluate(np.array([ids[:-1]]), targets)
        assert math.isclose(a["loss_bits"][t], float(loss) / math.log(2), rel_tol=1e-9)
    n_bytes = len(TEXT.encode("utf-8")) - len(tok.decode_bytes(ids[:1]))
    assert math.isclose(a["bits_per_byte"], sum(a["loss_bits"][1:]) / n_bytes, rel_tol=1e-12)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.3, top_p=0.6), dict(temperature=0.5, top_k=20, top_p=0.9)])
def test_next_token_is_generate_pys(served, settings):
    """The distribution is sampling.py's for the model's logits; the token, generate.py's first with that seed."""
    model, tok = served.explorer.model, served.explorer.tok
    ids = tok.encode(TEXT)
    for seed in (0, 1, 2, 3):
        a = served.post("/api/next", {"text": TEXT, "seed": seed, **settings})
        logits = model.forward(np.array([ids]))[0, -1]
        want = next_token_probs(logits, settings["temperature"], settings.get("top_k"), settings.get("top_p"))
        assert a["kept"] == np.count_nonzero(want) and a["seed"] == seed and a["position"] == len(ids) - 1
        got = {c["id"]: c["p"] for c in a["distribution"]}
        assert list(got) == list(np.argsort(-want, kind="stable")[: len(got)])
        np.testing.assert_allclose(list(got.values()), want[list(got)], rtol=1e-12)
        first = next(generate(model, ids, 1, np.random.default_rng(seed), **settings), None)  # None: end-of-text
        if first is not None:
            assert a["token"]["id"] == first
        assert a["text"] == TEXT + tok.decode([a["token"]["id"]])
        assert served.post("/api/next", {"text": TEXT, "seed": seed, **settings})["token"] == a["token"]


def test_greedy_and_an_earlier_position(served):
    model, tok = served.explorer.model, served.explorer.tok
    ids = tok.encode(TEXT)
    logits = model.forward(np.array([ids]))[0]
    a = served.post("/api/next", {"text": TEXT, "temperature": 0})
    assert a["token"]["id"] == int(np.argmax(logits[-1])) and a["kept"] == 1 and a["distribution"][0]["p"] == 1.0
    b = served.post("/api/next", {"text": TEXT, "position": 3, "top_k": 1})
    assert b["token"]["id"] == int(np.argmax(logits[3])) and b["position"] == 3 and "text" not in b
    assert isinstance(served.post("/api/next", {"text": TEXT})["seed"], int)  # a fresh seed, said


def test_text_longer_than_the_context_is_cut_to_its_last_window(served):
    tok = served.explorer.tok
    text = TEXT * 4
    ids = tok.encode(text)
    n = served.explorer.model.config.max_seq_len
    assert len(ids) > n
    a = served.post("/api/analyze", {"text": text})
    assert [t["id"] for t in a["tokens"]] == ids[-n:]
    assert a["truncated"]["dropped_tokens"] == len(ids) - n and str(n) in a["truncated"]["message"]
    assert np.array(a["attention"]).shape[-1] == n
    assert served.post("/api/next", {"text": text, "seed": 1})["truncated"]["dropped_tokens"] == len(ids) - n


# ----------------------------------------------------------------------------- what is refused

BAD = [  # (method, path, body, headers, status, a word of the message)
    ("POST", "/api/analyze", {"text": ""}, None, 400, "empty"),
    ("POST", "/api/analyze", {"words": "Once"}, None, 400, "text"),
    ("POST", "/api/analyze", {"text": 42}, None, 400, "string"),
    ("POST", "/api/analyze", ["Once"], None, 400, "object"),
    ("POST", "/api/analyze", b"Once upon a time", None, 400, "JSON"),
    ("POST", "/api/analyze", b'{"text": "Once upon a time"', None, 400, "JSON"),
    ("POST", "/api/analyze", b'{"text": "caf\xe9"}', None, 400, "UTF-8"),
    ("POST", "/api/analyze", b'{"text": "\\ud800"}', None, 400, "surrogate"),
    ("POST", "/api/analyze", b"[" * 100000, None, 400, "JSON"),
    ("POST", "/api/analyze", b"x" * (explore.MAX_BODY_BYTES + 1), None, 413, "bytes"),
    ("POST", "/api/next", {"text": "Once", "temperature": -1}, None, 400, "temperature"),
    ("POST", "/api/next", {"text": "Once", "temperature": "hot"}, None, 400, "temperature"),
    ("POST", "/api/next", {"text": "Once", "temperature": 1e9}, None, 400, "temperature"),
    ("POST", "/api/next", b'{"text": "Once", "temperature": NaN}', None, 400, "JSON"),
    ("POST", "/api/next", {"text": "Once", "top_k": 0}, None, 400, "top_k"),
    ("POST", "/api/next", {"text": "Once", "top_k": 2.5}, None, 400, "top_k"),
    ("POST", "/api/next", {"text": "Once", "top_k": 10 ** 6}, None, 400, "top_k"),
    ("POST", "/api/next", {"text": "Once", "top_p": 0}, None, 400, "top_p"),
    ("POST", "/api/next", {"text": "Once", "top_p": 1.5}, None, 400, "top_p"),
    ("POST", "/api/next", {"text": "Once", "seed": -1}, None, 400, "seed"),
    ("POST", "/api/next", {"text": "Once", "seed": True}, None, 400, "seed"),
    ("POST", "/api/next", {"text": "Once", "position": 99}, None, 400, "position"),
    ("GET", "/api/nothing", None, None, 404, "no such"),
    ("GET", "/../explore.py", None, None, 404, "no such"),
    ("POST", "/api/nothing", {"text": "Once"}, None, 404, "no such"),
    ("GET", "/api/analyze", None, None, 405, "POST"),
    ("POST", "/api/model", {}, None, 405, "POST"),
    ("DELETE", "/api/model", None, None, 405, "DELETE"),
    ("POST", "/api/analyze", b'{"text": "Once"}', {"Content-Length": "lots"}, 400, "Content-Length"),
]


@pytest.mark.parametrize("method,path,body,headers,status,word", BAD, ids=[f"{b[0]} {b[1]} {b[4]} {b[5]}" for b in BAD])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(served, method, path, body, headers, status, word):
    got, data = served.request(method, path, body, headers)
    assert got == status, data[:300]
    answer = json.loads(data)
    assert list(answer) == ["error"] and word.lower() in answer["error"].lower()
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"] and len(answer["error"]) < 300
    assert served.json("GET", "/api/model")[0] == 200
    assert served.post("/api/next", {"text": "Once", "temperature": 0})["kept"] == 1


def test_no_content_length_is_refused(served):
    import http.client
    host, port = served.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/api/analyze")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    conn.close()


def test_several_clients_at_once_get_the_same_answers(served):
    texts = [TEXT, TEXT[:30], "The dog", TEXT[10:]] * 3
    expected = {t: served.post("/api/analyze", {"text": t}) for t in set(texts)}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda t: served.post("/api/analyze", {"text": t}), texts))
    assert all(a == expected[t] for a, t in zip(answers, texts))


# ----------------------------------------------------------------------------- the command line and the card

def write_run(folder, tok, arch="llama", step=40):
    """A checkpoint as train.py leaves one (its tokenizer embedded) and a metrics.jsonl beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = fixed_model(ARCHES[arch], dtype=np.float32)
    ck = folder / "checkpoint_final.npz"
    save_checkpoint(ck, model.config, model.params, {"step": step, "tokenizer": tok.identity(),
                                                     "tokenizer_model_json": tok.model_json()})
    lines = [json.dumps({"type": "train", "step": s, "loss": 5.5 - s / 20}) for s in range(0, step + 1, 10)]
    lines += [json.dumps({"type": "eval", "step": 20, "val_loss": 4.9}), "not json", '{"type": "train", "step"']
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return ck, model


class Running(Client):
    """explore.main(argv) in a thread, until close()."""

    def __init__(self, argv):
        servers = []
        self.thread = threading.Thread(target=explore.main, args=(argv, servers.append), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not servers:
            assert self.thread.is_alive() and time.monotonic() < deadline, "explore.main did not start serving"
            time.sleep(0.02)
        self.server = servers[0]
        super().__init__(explore.address(self.server))

    def get(self, path):
        status, body = self.request("GET", path)
        assert status == 200, body[:300]
        return body

    def close(self):
        self.server.shutdown()
        self.thread.join(30)


def test_checkpoint_card_curves_and_page(tmp_path, tok):
    ck, model = write_run(tmp_path / "run", tok)
    run = Running(["--checkpoint", str(ck), "--port", "0"])
    try:
        card = json.loads(run.get("/api/model"))
        assert card["step"] == 40 and card["arch"] == "llama" and card["parameters"] == model.num_parameters()
        assert card["kv_head_of"] == [0, 0, 1, 1] and card["config"]["n_kv_heads"] == 2
        assert card["tokenizer"]["n_vocab"] == tok.n_vocab and card["tokenizer"]["type"] == "bpe"
        assert card["metrics"]["train"] == [[s, 5.5 - s / 20] for s in range(0, 41, 10)]
        assert card["metrics"]["eval"] == [[20, 4.9]]
        page = run.get("/").decode("utf-8")
        assert "<textarea" in page and "explore.js" in page
        for name in ("explore.js", "explore.css"):
            assert len(run.get(name)) > 1000
    finally:
        run.close()


def test_a_hugging_face_folder(tmp_path, tok):
    """A folder export_hf.py wrote is explored as generate.py reads it: the same numbers as its checkpoint."""
    pytest.importorskip("safetensors")
    import export_hf
    ck, model = write_run(tmp_path / "run", tok)
    assert export_hf.main([str(ck), str(tmp_path / "run" / "hf")]) == 0
    run = Running(["--checkpoint", str(tmp_path / "run" / "hf"), "--port", "0"])
    try:
        card = json.loads(run.get("/api/model"))
        assert card["step"] == 40 and card["config"]["n_kv_heads"] == 2
        assert card["metrics"]["eval"] == [[20, 4.9]]  # the metrics.jsonl beside the folder
        a = run.post("/api/analyze", {"text": TEXT})
        assert [t["id"] for t in a["tokens"]] == tok.encode(TEXT)
        probs = softmax(model.forward(np.array([tok.encode(TEXT)]))[0].astype(np.float64))
        np.testing.assert_allclose([c["p"] for c in a["top"][-1]], probs[-1, [c["id"] for c in a["top"][-1]]],
                                   rtol=1e-5)
    finally:
        run.close()


def test_page_needs_no_network():
    for path in (REPO / "explore_page").iterdir():
        text = path.read_text(encoding="utf-8")
        for needle in ('src="http', "src='http", 'href="http', "url(http", "@import", "//cdn", "fetch(\"http"):
            assert needle not in text, f"{path.name} reaches the network: {needle}"


def test_command_line_errors_are_one_line(tmp_path, tok, capsys):
    assert explore.main(["--checkpoint", str(tmp_path / "missing.npz")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    ck, _ = write_run(tmp_path / "run", tok)
    taken = make_server(None, "127.0.0.1", 0)  # a port in use
    try:
        assert explore.main(["--checkpoint", str(ck), "--port", str(taken.server_address[1])]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: cannot listen") and "--port 0" in err and err.count("\n") == 1
    finally:
        taken.server_close()
    with pytest.raises(SystemExit) as e:  # the range, from flag_types.Parser: one line, exit 1
        explore.main(["--checkpoint", str(ck), "--port", "70000"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: argument --port: must be an integer from 0 to 65535") and err.count("\n") == 1


def test_ctrl_c_stops_the_server_cleanly(tmp_path, tok):
    ck, _ = write_run(tmp_path / "run", tok)
    proc = subprocess.Popen([sys.executable, str(REPO / "explore.py"), "--checkpoint", str(ck), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith("open http://127.0.0.1:"):
                url = line.split()[1]
                break
        with urllib.request.urlopen(url + "api/model", timeout=60) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in out and "Traceback" not in err, err


# ----------------------------------------------------------------------------- a real browser

def browser():
    """A headless Chromium driven by Selenium, or pytest.skip with what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install selenium; scripts/test.sh installs it)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if binary is None or not os.path.exists(driver_path):
        pytest.skip("needs Chromium and its driver (apt-get install chromium chromium-driver; scripts/test.sh "
                    "installs them where it runs as root with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def wait_for(driver, what, condition, timeout=60):
    """Poll condition() (with the page idle: no request in flight) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.05)
        if driver.execute_script("return document.body.dataset.busy") == "0" and condition():
            return
        assert time.monotonic() < deadline, f"the page did not show {what} within {timeout} s"


@pytest.mark.slow
def test_the_page_in_a_real_browser(tmp_path, tok):
    """Types a text, selects a token, a layer and a head, moves the temperature and adds a token; checks what the
    page shows against the API; saves a screenshot (also to $EXPLORE_SCREENSHOT when set, e.g. docs/explore.png;
    $EXPLORE_CHECKPOINT: a checkpoint to show instead of the test's tiny one)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser()
    ck = os.environ.get("EXPLORE_CHECKPOINT") or str(write_run(tmp_path / "run", tok)[0])
    run = Running(["--checkpoint", ck, "--port", "0"])
    try:
        driver.get(run.base)
        find, find_all = driver.find_element, driver.find_elements
        wait_for(driver, "the first analysis", lambda: find_all(By.CSS_SELECTOR, "#tokens .tok"))
        card = json.loads(run.get("/api/model"))

        text = "Once upon a time, there was a little dog named Max. Max liked to"
        box = find(By.ID, "text")
        box.clear()
        box.send_keys(text)
        find(By.ID, "analyze").click()
        a = run.post("/api/analyze", {"text": text})
        shown = lambda: [int(s.text) for s in find_all(By.CSS_SELECTOR, "#tokens .tok .i")]  # noqa: E731
        wait_for(driver, "the typed text's tokens", lambda: shown() == [t["id"] for t in a["tokens"]])
        spans = find_all(By.CSS_SELECTOR, "#tokens .tok")
        for span, bits in zip(spans[1:], a["loss_bits"][1:]):
            assert abs(float(span.get_attribute("data-bits")) - bits) < 1e-4
        assert f"{a['bits_per_byte']:.3f} bits per byte" in find(By.ID, "summary").text

        # select a token, a layer and a head: the heat map and the token's row are the API's
        pos = 5
        spans[pos].click()
        Select(find(By.ID, "layer")).select_by_value("1")
        head = Select(find(By.ID, "head"))
        head.select_by_value("2")
        if card["config"]["n_kv_heads"] not in (None, card["config"]["n_heads"]):
            assert f"key/value head {card['kv_head_of'][2] + 1}" in head.first_selected_option.text
        wait_for(driver, "the selected token", lambda: "selected" in spans[pos].get_attribute("class"))
        T = len(a["tokens"])
        cells = find_all(By.CSS_SELECTOR, "#heatmap .cell")
        assert len(cells) == T * T
        weights = driver.execute_script(
            "return Array.from(document.querySelectorAll('#heatmap .cell')).map(c => Number(c.dataset.w))")
        np.testing.assert_allclose(np.array(weights).reshape(T, T), a["attention"][1][2], rtol=0, atol=1e-12)
        row = find_all(By.CSS_SELECTOR, "#att-row .tok")
        assert len(row) == pos + 1
        for span, w in zip(row, a["attention"][1][2][pos]):
            assert abs(float(span.get_attribute("data-w")) - w) < 1e-12
        spans[2].click()  # another token: the same map, its frame on that row
        wait_for(driver, "the new selection", lambda: len(find_all(By.CSS_SELECTOR, "#att-row .tok")) == 3)
        framed = find_all(By.CSS_SELECTOR, "#heatmap .row-selected")
        assert len(framed) == T and {c.get_attribute("data-q") for c in framed} == {"2"}
        spans[pos].click()
        wait_for(driver, "the selection back", lambda: len(find_all(By.CSS_SELECTOR, "#att-row .tok")) == pos + 1)
        lens_rows = find_all(By.CSS_SELECTOR, "#lens tr[data-depth]")
        assert len(lens_rows) == card["config"]["n_layers"] + 1

        # move the temperature: the bars are /api/next's distribution at that temperature
        slider = find(By.ID, "temperature")
        slider.click()  # the middle of a 0..2 slider: 1
        for _ in range(10):
            slider.send_keys(Keys.ARROW_LEFT)
        temperature = float(slider.get_attribute("value"))
        assert temperature < 1
        seed = int(find(By.ID, "seed").get_attribute("value"))
        want = run.post("/api/next", {"text": text, "position": pos, "temperature": temperature, "seed": seed})

        def bars():
            return [(int(b.get_attribute("data-id")), float(b.get_attribute("data-p")))
                    for b in find_all(By.CSS_SELECTOR, "#bars .bar")]
        expected = [(c["id"], c["p"]) for c in want["distribution"]]
        time.sleep(0.3)  # the page waits 120 ms after the last move before it asks
        wait_for(driver, "the bars at the new temperature", lambda: bars() == expected)

        # add the next token: the one /api/next draws with this seed, appended to the text
        seed_box = find(By.ID, "seed")
        seed_box.clear()
        seed_box.send_keys("7")
        nxt = run.post("/api/next", {"text": text, "temperature": temperature, "seed": 7})
        find(By.ID, "add-token").click()
        wait_for(driver, "the added token", lambda: find(By.ID, "added").get_attribute("data-id") == str(nxt["token"]["id"]))
        assert box.get_attribute("value") == nxt["text"]
        after = run.post("/api/analyze", {"text": nxt["text"]})
        wait_for(driver, "the longer text's tokens", lambda: shown() == [t["id"] for t in after["tokens"]])
        if after["tokens"][-1]["id"] == nxt["token"]["id"]:
            assert "added" in find_all(By.CSS_SELECTOR, "#tokens .tok")[-1].get_attribute("class")
        assert not find(By.ID, "error").is_displayed()

        for _ in range(2):  # the whole page in the window (the window's frame, if any, added)
            height, frame = driver.execute_script("return [document.documentElement.scrollHeight, "
                                                  "window.outerHeight - window.innerHeight]")
            driver.set_window_size(1400, min(height + frame + 4, 4000))
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(0.2)
        shot = tmp_path / "explore.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20000
        if os.environ.get("EXPLORE_SCREENSHOT"):
            shutil.copy(shot, os.environ["EXPLORE_SCREENSHOT"])
    finally:
        driver.quit()
        run.close()
