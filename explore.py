"""See inside a trained model in the browser: tokens and their surprise, next-token odds, attention, the logit lens.

    python3 explore.py --checkpoint demo_out/checkpoints/checkpoint_final.npz     # then open the printed address
    python3 explore.py --checkpoint hf_small --port 8080                          # a Hugging Face folder
    python3 explore.py --checkpoint ck.npz --port 0                               # any free port
    python3 explore.py --checkpoint ck.npz --host 0.0.0.0                         # reachable from other machines

Serves one page (explore_page/: plain HTML, CSS and JavaScript, nothing fetched from the network) and
the JSON API it uses, on 127.0.0.1 unless --host says otherwise; Ctrl-C stops it. The numbers come
from the model's own forward pass (model_views.py); the next-token odds under temperature, top-k and
top-p are sampling.py's, the code generate.py samples with. The checkpoint is loaded as generate.py
loads it (its open_source), tokenizer included. The API and what each number means: docs/explore.md.

    POST /api/analyze  {"text": "Once upon a time"}
        -> {"tokens", "loss_bits", "bits_per_byte", "attention", "top", "lens", "truncated"}
    POST /api/next     {"text": ..., "temperature": 0.8, "top_k": 50, "top_p": null, "seed": 1, "position": null}
        -> {"token", "seed", "position", "distribution", "kept", "text"}
    GET  /api/model    -> the model card (architecture, sizes, tokenizer, step, loss curves)

A request that is wrong gets a 4xx and {"error": "one line"}; the server goes on serving.
"""
import json
import math
import os
import sys
import threading
import traceback
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from errors import UserError
from flag_types import Number, Parser
from generate import open_source
from model_views import kv_head_of, logit_lens, look_inside
from parallel import blas_controller
from sampling import check_sampling, kept_tokens, sample_next
from tokenizer import KINDS
from untrusted import open_regular, parse_json

PORT = Number(int, 0, 65535)  # --port

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore_page")
PAGE_FILES = {"/": ("index.html", "text/html"), "/index.html": ("index.html", "text/html"),
              "/explore.js": ("explore.js", "text/javascript"), "/explore.css": ("explore.css", "text/css")}
MAX_BODY_BYTES = 1 << 20  # a request's JSON: text far longer than any model's context fits in 1 MB
MAX_DISCARD_BYTES = 16 << 20  # a refused body up to this size is read (and dropped) before the answer
MAX_METRICS_BYTES = 64 << 20  # a metrics.jsonl bigger than this is not drawn
MAX_CURVE_POINTS = 2000  # points per loss curve sent to the page (evenly thinned)
TOP_N = 10  # candidates per position in "top"
LENS_N = 5  # candidates per position and depth in "lens"
DISTRIBUTION_N = 20  # candidates in /api/next's "distribution"
MAX_TEMPERATURE = 100.0
MAX_SEED = 2 ** 63 - 1
ATTENTION_DECIMALS = 6  # attention weights are sent rounded to this many decimals (rows sum to 1 within 1e-5)
CACHED_TEXTS = 2  # forward passes kept, so that /api/next after /api/analyze of the same text runs none


class ApiError(Exception):
    """A request the API refuses: its HTTP status and a one-line message for the client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- the model's side

class Explorer:
    """The model, its tokenizer and the API's answers (dicts ready for JSON). One forward pass at a time
    (a lock): the model's arrays are shared by the server's threads."""

    def __init__(self, model, tokenizer, step=None, source=None):
        self.model, self.tok, self.step, self.source = model, tokenizer, step, source
        self.n_valid = min(tokenizer.n_vocab, model.config.vocab_size)  # ids the tokenizer can decode
        self.lock = threading.Lock()
        self.views = OrderedDict()  # tuple(ids) -> model_views.Views, the last CACHED_TEXTS texts
        self.texts = {}  # token id -> its text, decoded once

    # ------------------------------------------------------------------ requests
    def token_text(self, i):
        """A token's text; bytes that are only part of a character (a byte-level BPE splits some) as \\xNN."""
        if i not in self.texts:
            self.texts[i] = self.tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace")
        return self.texts[i]

    def token_bytes(self, i):
        """The UTF-8 bytes a token stands for; end-of-text counts one, as in training's bits per byte."""
        return 1 if i == self.tok.eot_id else len(self.tok.decode_bytes([i]))

    def encode(self, body):
        """The request's text as (ids of the window the model sees, how many tokens were dropped before it)."""
        text = body.get("text")
        if not isinstance(text, str):
            raise ApiError(400, '"text" must be a string')
        if not text:
            raise ApiError(400, '"text" is empty: type some text to look at')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, '"text" holds a lone surrogate (\\ud800-\\udfff): not valid Unicode') from None
        ids = self.tok.encode(text)
        if not ids:
            raise ApiError(400, '"text" has no tokens')
        window = self.model.config.max_seq_len
        return ids[-window:], max(0, len(ids) - window)

    def truncated(self, dropped, n):
        if not dropped:
            return None
        return {"dropped_tokens": dropped, "message": f"the text has {dropped + n} tokens, more than the model's "
                                                     f"context of {n}: only its last {n} are analyzed"}

    def look(self, ids):
        """model_views.look_inside for ids, cached for the last few texts."""
        key = tuple(ids)
        with self.lock:
            if key in self.views:
                self.views.move_to_end(key)
                return self.views[key]
            views = look_inside(self.model, ids)
            self.views[key] = views
            while len(self.views) > CACHED_TEXTS:
                self.views.popitem(last=False)
            return views

    def candidates(self, ids, logits, lse):
        """[{"id", "text", "p"}] of ids, p = softmax(logits)[id] = exp(logit - lse), lse the row's log normalizer."""
        return [{"id": int(i), "text": self.token_text(int(i)), "p": math.exp(float(logits[i]) - lse)} for i in ids]

    def most_likely(self, logits, n):
        """(T, V) logits -> (T, n) the ids of each row's n most likely tokens (decodable ones), most likely first.
        Ranked by logit, as softmax keeps the order: no (T, V) probabilities are made for it."""
        z = logits[:, : self.n_valid]
        V = z.shape[1]
        n = min(n, V)
        ids = np.argpartition(z, V - n, axis=1)[:, V - n:]  # (T, n) the n largest, unordered
        order = np.argsort(-np.take_along_axis(z, ids, axis=1), axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1)

    def analyze(self, body):
        ids, dropped = self.encode(body)
        views = self.look(ids)
        T = len(ids)
        lse = log_normalizer(views.logits)  # (T,): probabilities at temperature 1 are exp(logit - lse)
        loss_bits = [None] + [(lse[t - 1] - float(views.logits[t - 1, ids[t]])) / math.log(2) for t in range(1, T)]
        n_bytes = sum(self.token_bytes(i) for i in ids[1:])
        bpb = sum(loss_bits[1:]) / n_bytes if n_bytes else None
        top = self.most_likely(views.logits, TOP_N)
        lens = [[None] * len(views.residual) for _ in range(T)]  # [position][depth]
        for d in range(len(views.residual)):
            with self.lock:  # the arrays are the model's: one thread at a time
                z = logit_lens(self.model, views.residual[d])  # (T, V)
            lse_d = log_normalizer(z)
            best = self.most_likely(z, LENS_N)
            for t in range(T):
                p_next = math.exp(float(z[t, ids[t + 1]]) - lse_d[t]) if t + 1 < T else None
                lens[t][d] = {"top": self.candidates(best[t], z[t], lse_d[t]), "p_next": p_next}
        return {"tokens": [{"id": int(i), "text": self.token_text(int(i)), "bytes": self.token_bytes(int(i))}
                           for i in ids],
                "loss_bits": loss_bits, "bits_per_byte": bpb,
                "attention": np.round(views.attention.astype(np.float64), ATTENTION_DECIMALS).tolist(),
                "top": [self.candidates(top[t], views.logits[t], lse[t]) for t in range(T)],
                "lens": lens, "truncated": self.truncated(dropped, len(ids))}

    def next_token(self, body):
        ids, dropped = self.encode(body)
        temperature = number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
        top_k = integer(body, "top_k", None, 1, self.n_valid)
        top_p = number(body, "top_p", None, 0.0, 1.0, low_open=True)
        seed = integer(body, "seed", None, 0, MAX_SEED)
        position = integer(body, "position", len(ids) - 1, 0, len(ids) - 1)
        try:
            check_sampling(temperature, top_k, top_p)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2 ** 32)
        logits = self.look(ids).logits[position, : self.n_valid]  # (V,) the model's, as generate.py samples from
        kept, p = kept_tokens(logits, temperature, top_k, top_p)  # the distribution sample_next draws from
        token = sample_next(logits, np.random.default_rng(seed), temperature, top_k, top_p)
        order = np.argsort(-p, kind="stable")[:DISTRIBUTION_N]
        probs = dict(zip(kept.tolist(), p.tolist()))
        out = {"token": {"id": token, "text": self.token_text(token)}, "seed": seed, "position": position,
               "distribution": [{"id": int(kept[j]), "text": self.token_text(int(kept[j])), "p": float(p[j])}
                                for j in order],
               "kept": int(kept.size), "p": probs[token], "truncated": self.truncated(dropped, len(ids))}
        if position == len(ids) - 1:
            added = body["text"].encode("utf-8") + self.tok.decode_bytes([token])
            out["text"] = added.decode("utf-8", errors="replace")
        return out

    def card(self):
        cfg, tok = self.model.config, self.tok
        return {"checkpoint": self.source, "step": self.step, "arch": cfg.arch, "description": cfg.describe(),
                "config": cfg.to_dict(), "parameters": int(self.model.num_parameters()),
                "parameters_without_embeddings": int(self.model.num_parameters(include_embeddings=False)),
                "tokenizer": {"name": tok.name, "type": tok.type, "n_vocab": tok.n_vocab, "eot_id": tok.eot_id},
                "kv_head_of": kv_head_of(cfg), "metrics": read_curves(self.source)}


def log_normalizer(logits):
    """(T, V) logits -> (T,) float64 log-sum-exp of each row: softmax(logits)[t, i] = exp(logits[t, i] - lse[t])."""
    z = logits.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)  # (T, 1)
    z -= m
    np.exp(z, out=z)
    return m[:, 0] + np.log(z.sum(axis=-1))


def number(body, name, default, low, high, low_open=False):
    """body[name], a JSON number in [low, high] ((low, high] with low_open); default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f'"{name}" must be a number, got {json.dumps(value)[:40]}')
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f'"{name}" must be in {bracket}{low:g}, {high:g}], got {value:g}')
    return float(value)


def integer(body, name, default, low, high):
    """body[name], a JSON integer in [low, high]; default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f'"{name}" must be an integer, got {json.dumps(value)[:40]}')
    if not low <= value <= high:
        raise ApiError(400, f'"{name}" must be in [{low}, {high}], got {value}')
    return value


def metrics_path(source):
    """The metrics.jsonl beside a checkpoint file, or in (else beside) a Hugging Face folder; None if there is none."""
    if not source:
        return None
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    for path in (os.path.join(folder, "metrics.jsonl"), os.path.join(os.path.dirname(os.path.abspath(folder)),
                                                                     "metrics.jsonl")):
        if os.path.isfile(path):
            return path
        if not os.path.isdir(source):
            return None  # a checkpoint file: only its own folder
    return None


def read_curves(source):
    """{"path", "train": [[step, loss]], "eval": [[step, val_loss]]} from the metrics.jsonl train.py wrote beside
    the checkpoint (lines it cannot read are passed over: a run may be writing it), or None."""
    path = metrics_path(source)
    if path is None:
        return None
    train, evals = [], []
    try:
        with open_regular(path, "rb", "metrics log", MAX_METRICS_BYTES, UserError) as f:
            for line in f:
                try:
                    rec = parse_json(line, path)
                except ValueError:
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    continue
                if rec.get("type") == "train" and is_number(rec.get("loss")):
                    train.append([rec["step"], rec["loss"]])
                elif rec.get("type") == "eval" and is_number(rec.get("val_loss")):
                    evals.append([rec["step"], rec["val_loss"]])
    except (OSError, UserError) as e:
        return {"path": path, "train": [], "eval": [], "note": str(e)}
    return {"path": path, "train": thin(train), "eval": thin(evals)}


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def thin(points, most=MAX_CURVE_POINTS):
    """At most `most` points, evenly spaced, the last one always kept."""
    if len(points) <= most:
        return points
    stride = math.ceil(len(points) / most)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


# ----------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    """The page's files and the JSON API; every answer is complete (Content-Length) and the connection closes."""

    server_version = "numpy-gpt-explore"
    timeout = 30  # seconds a client may take to send its request

    def log_message(self, fmt, *args):  # requests that went well are not logged
        pass

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:
            sys.stderr.write(f"{self.command} {self.path[:200]} -> {code}\n")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/api/model":
            return self.answer(lambda: self.server.explorer.card())
        if path in ("/api/analyze", "/api/next"):
            return self.send_json(405, {"error": f"{path} takes a POST with a JSON body"})
        if path in PAGE_FILES:
            return self.send_page_file(*PAGE_FILES[path])
        if path == "/favicon.ico":  # browsers ask for one; there is none
            return self.send_bytes(204, b"", "image/x-icon")
        self.send_json(404, {"error": f"no such page: {path[:200]}"})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        routes = {"/api/analyze": self.server.explorer.analyze, "/api/next": self.server.explorer.next_token}
        if path not in routes:
            return self.send_json(404 if path not in ("/api/model",) else 405,
                                  {"error": f"no such API: POST {path[:200]}"})
        self.answer(lambda: routes[path](self.read_body()))

    def other_method(self):
        self.send_json(405, {"error": f"{self.command} is not supported: GET the page and /api/model, POST the API"})

    do_PUT = do_DELETE = do_PATCH = other_method

    def answer(self, compute):
        try:
            self.send_json(200, compute())
        except ApiError as e:
            self.send_json(e.status, {"error": str(e)})
        except Exception as e:  # a bug: the client gets one line, the server's terminal the traceback
            traceback.print_exc()
            self.send_json(500, {"error": f"internal error ({type(e).__name__}): {e}"[:300]})

    def read_body(self):
        """The request's JSON object (a dict); ApiError for a body that is missing, too big, not UTF-8 or not JSON."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "the request needs a Content-Length header")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length is not a number: {length[:40]!r}") from None
        if length < 0:
            raise ApiError(400, f"Content-Length is negative: {length}")
        if length > MAX_BODY_BYTES:
            self.discard(length)
            raise ApiError(413, f"the request body is {length:,} bytes; at most {MAX_BODY_BYTES:,} are taken")
        data = self.rfile.read(length)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
        body = parse_json(text, "the request body", bad_request)
        if not isinstance(body, dict):
            raise ApiError(400, 'the request body must be a JSON object, such as {"text": "Once upon a time"}')
        return body

    def discard(self, length):
        """Read and drop a body that is refused, so that the client reads the answer rather than a reset
        connection (closing a socket with unread data resets it); one far too big is not waited for."""
        left = length if length <= MAX_DISCARD_BYTES else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def send_json(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self.send_bytes(status, data, "application/json")

    def send_page_file(self, name, kind):
        try:
            with open(os.path.join(PAGE_DIR, name), "rb") as f:
                data = f.read()
        except OSError as e:
            return self.send_json(500, {"error": f"cannot read the page's file {name}: {e.strerror}"})
        self.send_bytes(200, data, kind)

    def send_bytes(self, status, data, kind):
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def bad_request(message):
    """An ApiError 400 with message (parse_json's error for a body that is not JSON)."""
    return ApiError(400, message)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for a slow client


def make_server(explorer, host="127.0.0.1", port=0):
    """A server for explorer on host:port (port 0: any free one), not yet serving: call serve_forever()."""
    try:
        server = Server((host, port), Handler)
    except OSError as e:
        hint = ": pass another --port, or --port 0 for any free one" if port else ""
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}){hint}") from None
    server.explorer = explorer
    return server


def serve(server):
    """server.serve_forever(), NumPy's BLAS held to one thread: a request's matrix products are small, and a
    second thread costs more than it saves (the forward pass of 128 tokens through the laptop preset's model,
    measured on the 2-core machine busy with other work: 60-100 ms on one thread, 0.2-2 s on two)."""
    with blas_controller().limit(limits=1, user_api="blas"):
        server.serve_forever()


def address(server):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = Parser(description="Serve a web page that shows what a numpy-gpt model computes.")
    p.add_argument("--checkpoint", required=True,
                   help="a .npz checkpoint written by train.py, or a Hugging Face GPT-2 or Llama folder")
    p.add_argument("--port", type=PORT, default=8000, help=f"TCP port, 0 for any free one: {PORT} (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; default 127.0.0.1 (this machine only); 0.0.0.0: every interface")
    t = p.add_argument_group("tokenizer (normally taken from the checkpoint, as generate.py takes it)")
    t.add_argument("--tokenizer_type", choices=list(KINDS), default=None,
                   help="tiktoken or bpe; used only if the checkpoint names no tokenizer")
    t.add_argument("--encoding", default="gpt2", help="tiktoken encoding (default gpt2), if the checkpoint names none")
    t.add_argument("--model_file", default=None, help="BPE model .json, if the checkpoint lacks its embedded one")
    # what generate.open_source reads besides: no architecture flags to check, the CPU
    p.set_defaults(vocab_size=None, d_model=None, n_heads=None, d_ff=None, n_layers=None, device="cpu")
    return p


def main(argv=None, ready=None):
    """ready: called with the server once it listens (tests use it to learn the port and to stop it)."""
    args = build_parser().parse_args(argv)
    try:
        model, tok, step = open_source(args.checkpoint, args)
        server = make_server(Explorer(model, tok, step, args.checkpoint), args.host, args.port)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.checkpoint}: {model.config.describe()}, step {step}, tokenizer {tok.name}")
    print(f"open {address(server)} in a browser (Ctrl-C stops the server)", flush=True)
    if ready is not None:
        ready(server)
    try:
        serve(server)
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
