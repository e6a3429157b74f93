"""PixMo data path throughput: image downloader against a local HTTP server, ArrayRecord read rate.

    python benchmarks/download.py [--images 2000] [--workers 16]

1. Serves `--images` distinct URLs (JPEGs of about 30 kB) from a ThreadingHTTPServer on 127.0.0.1
   and fetches them all into an empty cache with `data_pipelines.download` (`--workers` threads,
   sha256 + full pixel decode on). The rate is bounded by this machine's CPUs (server and client share
   them), not by the network: a lower bound on the per-host client overhead.
2. A resumed run over the same URLs (everything cached: reads, hashes and decodes the files).
3. `--dead` URLs to a closed port (refused connections, the default FetchConfig).
4. Writes them as a PixMo-AMA-shaped set to ArrayRecord with the TFDS builder and reads every
   example back in random order through `prepared_source` (what a grain worker does).
Prints one table.
"""
import argparse
import contextlib
import hashlib
import http.server
import io
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import download as dl  # noqa: E402
from data_pipelines.tfds import builders  # noqa: E402


def jpegs(n: int, size: int = 160) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def serve(bodies: list[bytes]):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = bodies[int(self.path.rsplit("/", 1)[1].split(".")[0])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--dead", type=int, default=1000, help="URLs to a closed port")
    args = parser.parse_args()
    tfds.disable_progress_bar()
    # Distinct bytes per URL (a suffix after the JPEG end marker) so every sha256 differs.
    base = jpegs(32)
    bodies = [base[i % len(base)] + i.to_bytes(4, "little") for i in range(args.images)]
    httpd = serve(bodies)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    rows = [{"image_url": f"{url}/{i}.jpg", "image_sha256": hashlib.sha256(b).hexdigest(),
             "question": f"What is shown in image {i}?", "answer": "Noise."} for i, b in enumerate(bodies)]
    requests = [dl.ImageRequest(r["image_url"], r["image_sha256"]) for r in rows]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = dl.ImageCache(os.path.join(tmp, "images"))
        start = time.perf_counter()
        report = dl.download({"bench": requests}, cache, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        assert report["bench"]["downloaded"] == args.images, report
        mb = sum(map(len, bodies)) / 2**20
        table.append(("download, empty cache", f"{args.images / seconds:,.0f}", "images/s",
                      f"{args.workers} workers, {mb / seconds:.1f} MiB/s, {args.images} images"))
        start = time.perf_counter()
        report = dl.download({"bench": requests}, cache, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        assert report["bench"]["cached"] == args.images, report
        table.append(("resume, all cached", f"{args.images / seconds:,.0f}", "images/s",
                      "read + sha256 + full decode, 0 requests"))
        httpd.shutdown()

        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there now: every connection is refused
        dead = [dl.ImageRequest(f"http://127.0.0.1:{port}/{i}.jpg") for i in range(args.dead)]
        start = time.perf_counter()
        report = dl.download({"dead": dead}, dl.ImageCache(os.path.join(tmp, "dead")), workers=args.workers,
                             progress=False)
        seconds = time.perf_counter() - start
        assert report["dead"]["connection_refused"] == args.dead, report
        table.append(("closed port", f"{seconds:.2f}", "s", f"{args.dead} URLs refused, {args.workers} workers"))

        data = os.path.join(tmp, "data", "pixmo-ask-model-anything", "data")
        os.makedirs(data)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(data, "train-00000-of-00001.parquet"))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its own progress lines
            builders.prepare("pixmo_ask_model_anything", os.path.join(tmp, "tfds"), os.path.join(tmp, "data"),
                             cache.root, n_val=0)
        table.append(("ArrayRecord write", f"{args.images / (time.perf_counter() - start):,.0f}", "examples/s",
                      "TFDS builder, image bytes included"))
        source = builders.prepared_source("pixmo_ask_model_anything", "train", os.path.join(tmp, "tfds"))
        order = np.random.default_rng(0).permutation(len(source))
        start = time.perf_counter()
        n_bytes = sum(len(source[int(i)]["image"]) for i in order)
        seconds = time.perf_counter() - start
        table.append(("ArrayRecord read", f"{len(order) / seconds:,.0f}", "examples/s",
                      f"random order, decoded to example dicts, {n_bytes / 2**20 / seconds:.1f} MiB/s"))
    widths = [max(len(r[i]) for r in table + [("measure", "value", "unit", "notes")]) for i in range(4)]
    for row in [("measure", "value", "unit", "notes")] + table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
