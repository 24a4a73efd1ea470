"""A misbehaving-on-purpose HTTP file server on 127.0.0.1 for the download tests.

URL: http://127.0.0.1:PORT/<mode>/<name>, serving server.files[name] (bytes). Modes:
    ok         Range supported (206 / 416), Content-Length always set
    drop       the first request sends half of its body, then the connection is cut
    trunc      the first request announces the full length but sends 2/3 of it and closes
    alltrunc   every request is truncated like that (a download can never finish)
    error      always 500
    flaky      the first request gets 503, the next ones work
    norange    Range is ignored (always 200 and the whole file); the first request is cut halfway
    corrupt    serves the file with its first byte changed (a checksum mismatch)
Every request is logged as (mode, name, Range header) in server.log; bytes actually written per
request go to server.sent.
"""
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        mode, _, name = self.path.lstrip("/").partition("/")
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((mode, name, rng))
            nth = sum(1 for m, n, _ in srv.log if (m, n) == (mode, name))
        data = srv.files.get(name)
        if data is None:
            return self._plain(404, b"not found")
        if mode == "error" or (mode == "flaky" and nth == 1):
            return self._plain(500 if mode == "error" else 503, b"server trouble")
        if mode == "corrupt":
            data = bytes([data[0] ^ 1]) + data[1:]
        start = 0
        m = re.match(r"bytes=(\d+)-$", rng or "")
        if m and mode != "norange":
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "none" if mode == "norange" else "bytes")
        self.end_headers()
        cut = None
        if (mode in ("drop", "norange") and nth == 1):
            cut = len(body) // 2
        elif (mode == "trunc" and nth == 1) or mode == "alltrunc":
            cut = len(body) * 2 // 3
        self._send_body(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)  # SHUT_RDWR: the client sees the body end early

    def _send_body(self, body, block=1 << 14):
        sent = 0
        try:
            for i in range(0, len(body), block):
                self.wfile.write(body[i:i + block])
                sent += len(body[i:i + block])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        with self.server.lock:
            self.server.sent.append(sent)

    def _plain(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FileServer:
    """Context manager: start the server in a thread on an ephemeral port; .url is its base URL."""

    def __init__(self, files):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.files = dict(files)
        self.httpd.log = []
        self.httpd.sent = []
        self.httpd.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    @property
    def log(self):
        return self.httpd.log

    @property
    def sent(self):
        return self.httpd.sent

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
