"""Downloader against a real HTTP server on 127.0.0.1 that serves good images and every failure."""
import collections
import email.utils
import hashlib
import http.server
import io
import os
import socket
import threading
import time

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import download as dl

GOOD = {}


def png(seed: int) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", (4 + seed % 5, 3), (seed % 256, 7, 9)).save(out, format="PNG")
    return out.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    hits = collections.Counter()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with self.lock:
            self.hits[self.path] += 1
            n = self.hits[self.path]
        path = self.path
        if path.startswith("/good/"):
            self.send(200, GOOD[path], [("Content-Type", "image/png")])
        elif path == "/404":
            self.send(404, b"not found")
        elif path == "/500":
            self.send(500, b"oops")
        elif path == "/429-once":
            self.send(429, b"", [("Retry-After", "0")]) if n == 1 else self.send(200, GOOD["/good/0"])
        elif path == "/429-seconds":
            self.send(429, b"slow down", [("Retry-After", "1")])
        elif path == "/429-date":
            later = email.utils.formatdate(time.time() + 3 * 86400, usegmt=True)
            self.send(429, b"come back in 3 days", [("Retry-After", later)])
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(600):  # a byte every 50 ms: each read is fast, the whole body never ends
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(GOOD["/good/1"][:50])
            self.close_connection = True
        elif path == "/html":
            self.send(200, b"<!DOCTYPE html><html><body>Image removed</body></html>", [("Content-Type", "text/html")])
        elif path == "/text":
            self.send(200, b"\x00\x01binary but not an image")
        elif path == "/corrupt":
            self.send(200, b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        elif path in ("/loop-a", "/loop-b"):
            self.send(302, b"", [("Location", "/loop-b" if path == "/loop-a" else "/loop-a")])
        elif path == "/moved":
            self.send(301, b"", [("Location", "/good/2")])
        elif path == "/big":
            self.send(200, b"", [("Content-Length", str(50 * 2**20))])
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                chunk = b"\xff\xd8\xff" + b"x" * 65533
                for _ in range(40):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        else:
            self.send(404)


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # 16 workers connect at once
    daemon_threads = True


@pytest.fixture(scope="module")
def server():
    for i in range(6):
        GOOD[f"/good/{i}"] = png(i)
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


CONFIG = dl.FetchConfig(connect_timeout=1.0, read_timeout=0.5, deadline=2.5, max_bytes=2**20, max_redirects=3,
                        max_attempts=2, backoff=0.05, max_retry_after=5.0)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def failure_matrix(base):
    """(request, expected outcome) for every case of the issue's matrix and then some."""
    wrong = hashlib.sha256(b"another image").hexdigest()
    return [
        (dl.ImageRequest(f"{base}/good/0", hashlib.sha256(GOOD["/good/0"]).hexdigest()), "downloaded"),
        (dl.ImageRequest(f"{base}/good/1"), "downloaded"),
        (dl.ImageRequest(f"{base}/moved"), "downloaded"),
        (dl.ImageRequest(f"{base}/429-once"), "downloaded"),
        (dl.ImageRequest(f"{base}/404"), "http_404"),
        (dl.ImageRequest(f"{base}/500"), "http_500"),
        (dl.ImageRequest(f"{base}/429-seconds"), "http_429"),
        (dl.ImageRequest(f"{base}/429-date"), "retry_after_too_long"),
        (dl.ImageRequest(f"{base}/slow"), "timeout"),
        (dl.ImageRequest(f"{base}/truncated"), "truncated"),
        (dl.ImageRequest(f"{base}/good/3", wrong), "sha_mismatch"),
        (dl.ImageRequest(f"{base}/html"), "html"),
        (dl.ImageRequest(f"{base}/text"), "not_image"),
        (dl.ImageRequest(f"{base}/corrupt"), "undecodable"),
        (dl.ImageRequest(f"{base}/loop-a"), "too_many_redirects"),
        (dl.ImageRequest(f"{base}/big"), "too_large"),
        (dl.ImageRequest(f"{base}/big-chunked"), "too_large"),
        (dl.ImageRequest("ftp://127.0.0.1/x.png"), "unsupported_scheme"),
        (dl.ImageRequest(f"http://127.0.0.1:{closed_port()}/x.png"), "connection_error"),
    ]


def test_failure_matrix_counted_by_cause_and_resume(server, tmp_path):
    matrix = failure_matrix(server)
    cache = dl.ImageCache(str(tmp_path / "cache"))
    start = time.monotonic()
    report = dl.download({"mixed": [r for r, _ in matrix]}, cache, CONFIG, workers=16, progress=False)
    assert time.monotonic() - start < 10  # the slow drip and the far-future Retry-After did not hang it
    assert report["mixed"] == collections.Counter(expected for _, expected in matrix)
    for request, expected in matrix:
        assert (cache.lookup(request.url) is not None) == (expected == "downloaded"), request.url
        if expected != "downloaded":
            assert cache.failure(request.url)["cause"] == expected
    assert not [f for f in os.listdir(cache.root) if f.startswith(".tmp")]  # atomic writes leave nothing
    assert Handler.hits["/429-seconds"] == 2 and Handler.hits["/429-date"] == 1

    # Resumed run: nothing cached or failed is requested again.
    before = Handler.hits.copy()
    again = dl.download({"mixed": [r for r, _ in matrix]}, cache, CONFIG, workers=16, progress=False)
    assert Handler.hits == before
    assert again["mixed"]["cached"] == 4 and again["mixed"]["http_404"] == 1
    # --retry-failed asks the failed URLs again, still not the cached ones.
    dl.download({"mixed": [r for r, _ in matrix]}, cache, CONFIG, workers=16, retry_failed=True, progress=False)
    assert Handler.hits["/404"] == before["/404"] + 1 and Handler.hits["/good/1"] == before["/good/1"]


def test_official_cache_is_reused(server, tmp_path):
    cache = dl.ImageCache(str(tmp_path))
    good, dead = f"{server}/good/4", f"{server}/good/5"
    with open(os.path.join(tmp_path, hashlib.sha256(good.encode()).hexdigest()), "wb") as f:
        f.write(GOOD["/good/4"])
    with open(os.path.join(tmp_path, hashlib.sha256(dead.encode()).hexdigest()), "w") as f:
        f.write("404 Client Error: Not Found for url")  # how the official downloader records failures
    report = dl.download({"set": [dl.ImageRequest(good), dl.ImageRequest(dead)]}, cache, CONFIG, progress=False)
    assert report["set"] == {"cached": 1, "cached_failure": 1}
    assert Handler.hits["/good/4"] == 0 and Handler.hits["/good/5"] == 0
    assert cache.lookup(dead) is None


def test_retry_after_forms():
    assert dl.parse_retry_after("120") == 120.0
    assert dl.parse_retry_after(email.utils.formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30)
    assert dl.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=2e9) == 0.0
    assert dl.parse_retry_after("soon") is None and dl.parse_retry_after(None) is None


def test_mirror_import_and_cli_report(server, tmp_path, capsys):
    data = tmp_path / "data" / "pixmo-ask-model-anything" / "data"
    data.mkdir(parents=True)
    rows = [{"image_url": f"{server}/good/{i}", "image_sha256": hashlib.sha256(GOOD[f"/good/{i}"]).hexdigest(),
             "question": "q", "answer": "a"} for i in (1, 2)] + [
            {"image_url": f"{server}/404", "image_sha256": "0" * 64, "question": "q", "answer": "a"}]
    pq.write_table(pa.Table.from_pylist(rows), data / "train-00000-of-00001.parquet")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    pq.write_table(pa.Table.from_pylist([{"image_url": f"{server}/good/1", "image_sha256": rows[0]["image_sha256"],
                                          "image": {"bytes": GOOD["/good/1"], "path": "1.png"}}]),
                   mirror / "train-0.parquet")
    before = Handler.hits.copy()
    rc = dl.main(["--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
                  "--mirror", str(mirror), "--workers", "4",
                  "--report", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "imported" in out
    line = next(l for l in out.splitlines() if l.startswith("pixmo-ask-model-anything"))
    assert line.split()[1:4] == ["3", "2", "66.67"] and "http_404=1" in line
    assert Handler.hits["/good/1"] == before["/good/1"]  # came from the mirror
    with pytest.raises(SystemExit):
        dl.main(["--data-dir", "x", "--cache-dir", str(tmp_path), "--sets", "pixmo-nope"])
