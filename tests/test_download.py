"""Downloader against a real HTTP server on 127.0.0.1 that serves good images and every failure."""
import collections
import dataclasses
import email.utils
import hashlib
import http.server
import io
import itertools
import json
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import download as dl
from data_pipelines import fetch

GOOD = {}
BROKEN = {}  # bodies whose header reads but whose pixels do not decode, built by the server fixture
ENDLESS = {"written": 0, "done": threading.Event()}  # what /endless-text managed to send


def png(seed: int) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", (4 + seed % 5, 3), (seed % 256, 7, 9)).save(out, format="PNG")
    return out.getvalue()


def noise(fmt: str) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(out, format=fmt)
    return out.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return chunks


def png_from_chunks(chunks) -> bytes:
    """A PNG with valid CRCs, so that only what the chunks hold is wrong."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)


def broken_images() -> dict[str, bytes]:
    jpeg, chunks = noise("JPEG"), png_chunks(noise("PNG"))
    return {
        "/truncated-jpeg": jpeg[:len(jpeg) * 6 // 10],  # served whole (Content-Length fits): only pixels tell
        "/broken-png": png_from_chunks([(t, d[:10] + bytes(255 - x for x in d[10:60]) + d[60:])
                                        if t == b"IDAT" else (t, d) for t, d in chunks]),
        # 12000 x 12000 = 144 megapixels announced by the header, over load_image's limit
        "/bomb-png": png_from_chunks([(t, struct.pack(">II", 12000, 12000) + d[8:]) if t == b"IHDR" else (t, d)
                                      for t, d in chunks]),
    }


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

    def raw(self, head: bytes, body: bytes = b""):
        """Status line and headers as given bytes: what send_header cannot write (non-latin-1 values)."""
        self.wfile.write(head + b"\r\n\r\n" + body)
        self.close_connection = True

    def drip(self, data: bytes):
        """One byte every 0.2 s: each read returns well inside any read timeout, the whole never ends."""
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                time.sleep(0.2)
        except OSError:  # the client gave up
            pass
        self.close_connection = True

    def do_GET(self):
        with self.lock:
            self.hits[self.path] += 1
            n = self.hits[self.path]
        path = self.path
        if path.startswith("/good/"):
            self.send(200, GOOD[path], [("Content-Type", "image/png")])
        elif path in BROKEN:
            self.send(200, BROKEN[path], [("Content-Type", "image/jpeg")])
        elif path == "/cl-superscript":  # latin-1 "¹²": str.isdigit() says yes, int() raises
            self.raw(b"HTTP/1.0 200 OK\r\nContent-Length: \xb9\xb2", GOOD["/good/0"])
        elif path == "/cl-arabic":
            self.raw(b"HTTP/1.0 200 OK\r\nContent-Length: " + "١٢".encode(), GOOD["/good/0"])
        elif path == "/ra-superscript":
            self.raw(b"HTTP/1.0 429 Too Many Requests\r\nContent-Length: 0\r\nRetry-After: \xb2")
        elif path == "/ra-arabic":
            self.raw(b"HTTP/1.0 429 Too Many Requests\r\nContent-Length: 0\r\nRetry-After: " + "١".encode())
        elif path == "/redirect-utf8":  # a Location sent as UTF-8 bytes, as servers do
            self.raw(b"HTTP/1.0 302 Found\r\nContent-Length: 0\r\nLocation: " + "/good/é x.png?q=ä b".encode())
        elif path == "/redirect-bad":
            self.send(302, b"", [("Location", "http://[::1/x")])
        elif path == "/drip-status":
            self.drip(b"HTTP/1.0 200 OK\r\nX-Pad: " + b"a" * 150)
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self.drip(b"X-Pad: " + b"a" * 150)
        elif path == "/drip-chunks":  # one good chunk of image bytes, then a chunk-size line that never ends
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                             b"10\r\n" + GOOD["/good/0"][:16] + b"\r\n")
            self.drip(b"0" * 150)
        elif path == "/endless-text":  # up to 1 GiB of text, as fast as the client takes it
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            try:
                for _ in range(2**14):
                    self.wfile.write(b"x" * 2**16)
                    ENDLESS["written"] += 2**16
            except OSError:
                pass
            finally:
                ENDLESS["done"].set()
                self.close_connection = True
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
                self.wfile.write(GOOD["/good/0"][:16])  # an image's first bytes pass the sniffing
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
        elif path == "/unidentified":  # an ICO signature PIL cannot make sense of
            self.send(200, b"\x00\x00\x01\x00" + b"garbage" * 20)
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
    # Paths as the downloader must send them for URLs with spaces, non-ASCII and a stray "%".
    GOOD["/good/%C3%A9%20x.png?q=%C3%A4%20b"] = png(6)
    GOOD["/good/already%20escaped%25"] = png(7)
    BROKEN.update(broken_images())
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
        (dl.ImageRequest(f"{base}/corrupt"), "corrupt_image"),
        (dl.ImageRequest(f"{base}/unidentified"), "undecodable"),
        (dl.ImageRequest(f"{base}/loop-a"), "too_many_redirects"),
        (dl.ImageRequest(f"{base}/big"), "too_large"),
        (dl.ImageRequest(f"{base}/big-chunked"), "too_large"),
        (dl.ImageRequest("ftp://127.0.0.1/x.png"), "unsupported_scheme"),
        (dl.ImageRequest(f"http://127.0.0.1:{closed_port()}/x.png"), "connection_refused"),
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
    assert fetch.parse_retry_after("120") == 120.0
    assert fetch.parse_retry_after(email.utils.formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30)
    assert fetch.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=2e9) == 0.0
    assert fetch.parse_retry_after("soon") is None and fetch.parse_retry_after(None) is None
    # Digits other than ASCII: "²" passes str.isdigit() and makes float() raise, "١" float() would take.
    assert fetch.parse_retry_after("²") is None and fetch.parse_retry_after("١") is None


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


# Case 6: no URL and no header can raise out of download(); each is counted by cause and the run goes on.
BAD_INPUTS = {
    "non_ascii_path": ("{base}/good/é x.png?q=ä b", "downloaded"),  # sent percent-encoded (case 8)
    "stray_percent": ("{base}/good/already%20escaped%", "downloaded"),
    "port_out_of_range": ("http://127.0.0.1:99999/x.png", "bad_url"),
    "port_not_a_number": ("http://127.0.0.1:abc/x.png", "bad_url"),
    "empty_host_label": ("http://a..b/x.png", "bad_url"),
    "space_in_host": ("http://exa mple.com/x.png", "bad_url"),
    "no_host": ("http:///x.png", "bad_url"),
    "bad_ipv6_literal": ("http://[::1/x", "bad_url"),
    "redirect_to_non_ascii_path": ("{base}/redirect-utf8", "downloaded"),
    "redirect_to_bad_url": ("{base}/redirect-bad", "bad_url"),
    "content_length_superscript_digits": ("{base}/cl-superscript", "bad_header"),
    "content_length_arabic_digits": ("{base}/cl-arabic", "bad_header"),
    "retry_after_superscript_digits": ("{base}/ra-superscript", "http_429"),  # treated as absent: back-off
    "retry_after_arabic_digits": ("{base}/ra-arabic", "http_429"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_url_or_header_is_counted_and_the_run_goes_on(server, tmp_path, name):
    template, expected = BAD_INPUTS[name]
    url, good = template.format(base=server), f"{server}/good/2"
    cache = dl.ImageCache(str(tmp_path))
    report = dl.download({"set": [dl.ImageRequest(url), dl.ImageRequest(good)]}, cache, CONFIG, progress=False)
    assert report["set"] == ({"downloaded": 2} if expected == "downloaded" else {expected: 1, "downloaded": 1})
    assert cache.lookup(good) is not None
    if expected == "downloaded":
        assert cache.lookup(url) is not None  # the cache key stays sha256 of the URL as the dataset spells it
    else:
        assert cache.failure(url)["cause"] == expected and cache.lookup(url) is None


def test_urls_are_percent_encoded_as_the_official_downloader_sends_them(server, tmp_path):
    assert fetch.encode_url_part("/a b/é.png") == "/a%20b/%C3%A9.png"
    assert fetch.encode_url_part("/x%20y%zz%") == "/x%20y%25zz%25"  # escapes kept, stray "%" encoded
    assert fetch.encode_url_part("/p;q=1,2&r=[~]!*'()$@:+") == "/p;q=1,2&r=[~]!*'()$@:+"  # RFC 3986 delimiters
    assert fetch.parse_url("http://bücher.example/ü").host == "xn--bcher-kva.example"
    assert fetch.parse_url("http://[::1]:8080/").host == "[::1]"
    before = Handler.hits.copy()
    dl.download({"set": [dl.ImageRequest(f"{server}/good/é x.png?q=ä b")]}, dl.ImageCache(str(tmp_path)), CONFIG,
                progress=False)
    assert Handler.hits["/good/%C3%A9%20x.png?q=%C3%A4%20b"] == before["/good/%C3%A9%20x.png?q=%C3%A4%20b"] + 1


def test_an_unforeseen_error_costs_one_url(server, tmp_path, monkeypatch):
    real = fetch._request

    def request(target, *args):
        if target.path == "/good/3":
            raise KeyError("something no rule names")
        return real(target, *args)

    monkeypatch.setattr(fetch, "_request", request)
    cache = dl.ImageCache(str(tmp_path))
    bad, good = f"{server}/good/3", f"{server}/good/4"
    report = dl.download({"set": [dl.ImageRequest(bad), dl.ImageRequest(good)]}, cache, CONFIG, progress=False)
    assert report["set"] == {"unexpected_error": 1, "downloaded": 1}
    assert "KeyError" in cache.failure(bad)["detail"]


def test_mixed_batch_cli_downloads_every_good_url_and_writes_its_report(server, tmp_path, capsys):
    good = [f"{server}/good/{i}" for i in range(6)]
    bad = [template.format(base=server) for template, expected in BAD_INPUTS.values() if expected != "downloaded"]
    urls = [u for pair in itertools.zip_longest(good, bad) for u in pair if u] + [None]  # interleaved; a null
    data = tmp_path / "data" / "pixmo-cap" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"image_url": u, "caption": "c", "transcripts": []} for u in urls]),
                   data / "train-00000-of-00001.parquet")
    rc = dl.main(["--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--workers", "4",
                  "--deadline", "2.5", "--report", str(tmp_path / "report.json")])
    capsys.readouterr()
    counts = json.loads((tmp_path / "report.json").read_text())["pixmo-cap"]
    assert rc == 0 and counts == {"downloaded": 6, "bad_url": 8, "bad_header": 2, "http_429": 2}
    cache = dl.ImageCache(str(tmp_path / "cache"))
    assert all(cache.lookup(u) for u in good) and all(cache.failure(u) for u in bad)


# Case 7: the deadline bounds the whole exchange, not only the body.
def test_deadline_bounds_status_line_headers_and_chunk_sizes(server, tmp_path):
    urls = [f"{server}/drip-status", f"{server}/drip-headers", f"{server}/drip-chunks"]
    start = time.monotonic()
    report = dl.download({"drip": [dl.ImageRequest(u) for u in urls]}, dl.ImageCache(str(tmp_path)), CONFIG,
                         workers=3, progress=False)
    elapsed = time.monotonic() - start
    assert report["drip"] == {"timeout": 3}
    # Each drip lasts 30 s, and a read timeout (0.5 s) never fires between bytes 0.2 s apart.
    assert elapsed < CONFIG.deadline + 3.0, elapsed


# Case 8: a refused connection is final for that URL, not retried with back-off.
def test_closed_port_is_not_retried(tmp_path):
    port = closed_port()
    requests = [dl.ImageRequest(f"http://127.0.0.1:{port}/{i}.png") for i in range(200)]
    config = dl.FetchConfig()  # the defaults: 3 attempts, back-off from 1 s
    start = time.monotonic()
    report = dl.download({"dead": requests}, dl.ImageCache(str(tmp_path)), config, workers=16, progress=False)
    assert report["dead"] == {"connection_refused": 200}
    # Back-off alone would take >= 200 / 16 workers x (0.5 + 1.0) s = 18.75 s.
    assert time.monotonic() - start < 6.0


# Case 9: an image counts only when its pixels decode; a non-image body is refused from its first bytes.
@pytest.mark.parametrize("path, cause", [("/truncated-jpeg", "corrupt_image"), ("/broken-png", "corrupt_image"),
                                         ("/bomb-png", "too_many_pixels")])
def test_image_counts_only_when_its_pixels_decode(server, tmp_path, path, cause):
    cache = dl.ImageCache(str(tmp_path))
    report = dl.download({"set": [dl.ImageRequest(server + path)]}, cache, CONFIG, progress=False)
    assert report["set"] == {cause: 1} and cache.failure(server + path)["cause"] == cause
    assert cache.lookup(server + path) is None
    # The same bytes already in the cache (e.g. an official image folder) are refused too, and set aside
    # where sources do not look, not deleted: the URL may be dead by now.
    with open(cache.path(server + path), "wb") as f:
        f.write(BROKEN[path])
    assert dl.get_image(dl.ImageRequest(server + path), cache, CONFIG) == cause
    assert cache.lookup(server + path) is None and not os.path.exists(cache.path(server + path))
    with open(os.path.join(cache.failed_dir, os.path.basename(cache.path(server + path)) + ".body"), "rb") as f:
        assert f.read() == BROKEN[path]


def test_non_image_body_is_refused_from_its_first_bytes(server, tmp_path):
    config = dataclasses.replace(CONFIG, max_bytes=2**31)  # only the sniffing can stop this body
    report = dl.download({"set": [dl.ImageRequest(f"{server}/endless-text")]}, dl.ImageCache(str(tmp_path)), config,
                         progress=False)
    assert report["set"] == {"not_image": 1}
    assert ENDLESS["done"].wait(10)
    # The server stops when the client hangs up: what it wrote fits in the two sockets' buffers.
    assert ENDLESS["written"] < 32 * 2**20, ENDLESS["written"]
