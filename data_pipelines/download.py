"""Robust PixMo image downloader: bounded retries, capped Retry-After, deadlines, a shared cache.

    python -m data_pipelines.download --data-dir DATA --cache-dir IMAGES [--sets pixmo-points,...]

`DATA` holds the Hugging Face parquet folders of the PixMo sets as published (`DATA/pixmo-cap/data/
train-*.parquet`, ...). Images are cached as `IMAGES/<sha256 of the URL>` (raw bytes, no extension), the
layout of the official Molmo downloader, so an existing Molmo image folder (PIXMO_IMAGE_DIR) is reused.

Why not the official loop: one in five PixMo-Cap URLs is dead, some servers answer 429 with a
Retry-After days in the future (which the official retry adapter honours, so runs hang near the end),
and others drip bytes forever. Here every image has one total deadline covering connect, body and
retries; Retry-After above a cap fails fast; bodies are size-capped; only http(s) is followed, with a
bounded number of redirects. Every URL ends in exactly one outcome:

    downloaded, cached                 -> the image is in the cache (and matches image_sha256 if known)
    http_<code>                        -> final HTTP status (404, 403, 500 after retries, 429 after retries...)
    retry_after_too_long               -> 429/503 whose Retry-After exceeds the cap
    timeout, truncated, too_large, too_many_redirects, connection_error, unsupported_scheme
    html, not_image, undecodable       -> the body is a web page / not an image / an image PIL cannot open
    sha_mismatch                       -> bytes differ from the dataset's image_sha256
    cached_failure                     -> an old official cache file that holds an error text

Failures are recorded in `IMAGES/failed/<key>.json` and not retried on the next run unless
`--retry-failed` is given. Writes are atomic (temporary file + rename), so a killed run leaves no
partial image behind, and a resumed run refetches nothing that is already cached.
"""
import argparse
import collections
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import http.client
import io
import itertools
import json
import os
import random
import socket
import ssl
import sys
import time
import urllib.parse
import warnings
from typing import Iterable

import PIL.Image

from data_pipelines.image_cache import ImageCache, atomic_write, sniff_image
from data_pipelines.sources import pixmo

REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUSES = (429, 500, 502, 503, 504)
FOUND = ("downloaded", "cached")


def check_image_bytes(body: bytes, expected_sha256: str | None = None) -> str | None:
    """None when `body` is a usable image (and matches `expected_sha256`), else the failure cause."""
    if expected_sha256 and hashlib.sha256(body).hexdigest() != expected_sha256.lower():
        return "sha_mismatch"
    if sniff_image(body[:16]) is None:
        return "html" if body[:512].lstrip().startswith(b"<") else "not_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PIL.Image.open(io.BytesIO(body)) as image:
                if min(image.size) <= 0:
                    return "undecodable"
                image.verify()
    except Exception:  # PIL raises many types for corrupt files; all mean the same here
        return "undecodable"
    return None


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """Limits of one image fetch. `deadline` bounds everything (connect, body, retries, waits)."""
    connect_timeout: float = 10.0
    read_timeout: float = 20.0  # longest silence between two chunks of the body
    deadline: float = 90.0  # total seconds per image, so a slow-drip body cannot hang a worker
    max_bytes: int = 64 * 2**20
    max_redirects: int = 5
    max_attempts: int = 3
    backoff: float = 1.0  # first retry waits about this long, doubling, jittered
    max_backoff: float = 30.0
    max_retry_after: float = 60.0  # a longer Retry-After fails the URL now instead of sleeping
    verify_tls: bool = True
    user_agent: str = "molmo-jax-image-downloader/0.1"

    def __post_init__(self):
        for name in ("connect_timeout", "read_timeout", "deadline", "max_bytes", "max_attempts"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be positive, got {getattr(self, name)!r}")


class FetchError(Exception):
    def __init__(self, cause: str, detail: str = "", retryable: bool = False, retry_after: float | None = None):
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail, self.retryable, self.retry_after = cause, detail, retryable, retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def fetch(url: str, config: FetchConfig) -> bytes:
    """GET `url` with retries on 429/5xx/timeouts/resets; raises FetchError(cause) on failure."""
    deadline = time.monotonic() + config.deadline
    for attempt in range(config.max_attempts):
        try:
            return _fetch_once(url, config, deadline)
        except FetchError as e:
            if e.retry_after is not None and e.retry_after > config.max_retry_after:
                raise FetchError("retry_after_too_long", f"server asks to wait {e.retry_after:.0f}s "
                                 f"(cap {config.max_retry_after:.0f}s)") from e
            if not e.retryable or attempt + 1 == config.max_attempts:
                raise
            wait = e.retry_after if e.retry_after is not None else (
                min(config.backoff * 2**attempt, config.max_backoff) * random.uniform(0.5, 1.0))
            if time.monotonic() + wait >= deadline:
                raise FetchError(e.cause, e.detail + "; no time left in the deadline to retry") from e
            time.sleep(wait)
    raise AssertionError("the last attempt always returns or raises")


def _fetch_once(url: str, config: FetchConfig, deadline: float) -> bytes:
    seen = {url}
    for _ in range(config.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("unsupported_scheme", url[:200])
        status, headers, body = _request(parts, config, deadline)
        if status in REDIRECTS and headers.get("location"):
            url = urllib.parse.urljoin(url, headers["location"])
            if url in seen:
                raise FetchError("too_many_redirects", f"redirect loop back to {url[:200]}")
            seen.add(url)
            continue
        if status in RETRY_STATUSES:
            raise FetchError(f"http_{status}", "", retryable=True,
                             retry_after=parse_retry_after(headers.get("retry-after")))
        if status != 200:
            raise FetchError(f"http_{status}")
        return body
    raise FetchError("too_many_redirects", f"more than {config.max_redirects} redirects")


def _request(parts, config: FetchConfig, deadline: float) -> tuple[int, dict, bytes]:
    """One GET; returns (status, lower-cased headers, body). The body is read only for status 200."""
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timeout", "deadline exceeded", retryable=True)
        return left

    if parts.scheme == "https":
        context = ssl.create_default_context()
        if not config.verify_tls:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=context,
                                           timeout=min(config.connect_timeout, remaining()))
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                          timeout=min(config.connect_timeout, remaining()))
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        conn.connect()
        sock = conn.sock  # kept: http.client drops conn.sock once the response owns the connection
        sock.settimeout(min(config.read_timeout, remaining()))
        conn.request("GET", path, headers={"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.8"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status != 200:
            return response.status, headers, b""
        length = int(headers["content-length"]) if headers.get("content-length", "").isdigit() else None
        if length is not None and length > config.max_bytes:
            raise FetchError("too_large", f"Content-Length {length} > {config.max_bytes}")
        chunks, size = [], 0
        while True:
            sock.settimeout(min(config.read_timeout, remaining()))
            chunk = response.read1(1 << 16)  # read1: returns after one socket read, so deadlines hold
            if not chunk:
                break
            size += len(chunk)
            if size > config.max_bytes:
                raise FetchError("too_large", f"body exceeds {config.max_bytes} bytes")
            chunks.append(chunk)
        if length is not None and size < length:
            raise FetchError("truncated", f"got {size} of {length} bytes", retryable=True)
        return response.status, headers, b"".join(chunks)
    except FetchError:
        raise
    except (socket.timeout, TimeoutError) as e:
        raise FetchError("timeout", str(e), retryable=True) from e
    except http.client.IncompleteRead as e:
        raise FetchError("truncated", repr(e), retryable=True) from e
    except (OSError, http.client.HTTPException) as e:
        raise FetchError("connection_error", f"{type(e).__name__}: {e}", retryable=True) from e
    finally:
        conn.close()


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    url: str
    sha256: str | None = None


def get_image(request: ImageRequest, cache: ImageCache, config: FetchConfig, retry_failed: bool = False,
              check_sha: bool = True) -> str:
    """Makes sure the image of `request` is cached; returns its outcome ("downloaded", "cached" or a cause)."""
    expected = request.sha256 if check_sha else None
    path = cache.path(request.url)
    if os.path.exists(path):
        with open(path, "rb") as f:
            body = f.read()
        cause = check_image_bytes(body, expected)
        if cause is None:
            return "cached"
        os.remove(path)  # never leave a bad body where sources would pick it up
        if sniff_image(body[:16]) is None and not body.lstrip().startswith(b"<"):
            cause = "cached_failure"  # official downloader wrote its exception text into the file
        cache.record_failure(request.url, cause, body[:200].decode("utf-8", "replace"))
        if not retry_failed:
            return cause
    elif not retry_failed and (record := cache.failure(request.url)) is not None:
        return record["cause"]
    try:
        body = fetch(request.url, config)
    except FetchError as e:
        cache.record_failure(request.url, e.cause, e.detail)
        return e.cause
    cause = check_image_bytes(body, expected)
    if cause is not None:
        cache.record_failure(request.url, cause, f"{len(body)} bytes starting {body[:40]!r}")
        return cause
    cache.store(request.url, body)
    cache.clear_failure(request.url)
    return "downloaded"


def download(datasets: dict[str, list[ImageRequest]], cache: ImageCache, config: FetchConfig = FetchConfig(),
             workers: int = 16, retry_failed: bool = False, check_sha: bool = True,
             progress: bool = True) -> dict[str, collections.Counter]:
    """Fetches every image of every dataset once (URLs shared by datasets are fetched once).

    Returns {dataset: Counter(outcome -> number of unique URLs)}; see the module docstring for outcomes.
    """
    unique: dict[str, ImageRequest] = {}
    for requests in datasets.values():
        for request in requests:
            unique.setdefault(request.url, request)
    outcomes: dict[str, str] = {}
    bar = _progress_bar(len(unique), progress)
    tally = collections.Counter()
    todo = iter(unique.values())
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict = {}
        while True:
            # A bounded window of submitted URLs: 700k futures at once would cost gigabytes.
            for request in itertools.islice(todo, 4 * workers - len(pending)):
                pending[pool.submit(get_image, request, cache, config, retry_failed, check_sha)] = request.url
            if not pending:
                break
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                outcome = outcomes[pending.pop(future)] = future.result()
                tally["ok" if outcome in FOUND else "failed"] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tally, refresh=False)
    if bar is not None:
        bar.close()
    return {name: collections.Counter(outcomes[url] for url in {r.url for r in requests})
            for name, requests in datasets.items()}


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    import tqdm
    return tqdm.tqdm(total=total, unit="img", desc="images", file=sys.stderr)


def import_mirror(folder: str, cache: ImageCache, check_sha: bool = True) -> collections.Counter:
    """Fills the cache from an image-embedded parquet mirror (columns image_url + image, optional
    image_sha256), so those URLs are never fetched. `image` is bytes or a HF Image struct {bytes, path}."""
    import pyarrow.parquet as pq
    tally = collections.Counter()
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files under mirror folder {folder}")
    for file in files:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        for column in ("image_url", "image"):
            if column not in names:
                raise ValueError(f"mirror {file}: column {column!r} missing (columns: {names})")
        columns = ["image_url", "image"] + (["image_sha256"] if "image_sha256" in names else [])
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                if cache.lookup(row["image_url"]):
                    tally["already_cached"] += 1
                    continue
                body = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
                cause = "missing" if not body else check_image_bytes(
                    body, row.get("image_sha256") if check_sha else None)
                if cause is None:
                    cache.store(row["image_url"], body)
                    cache.clear_failure(row["image_url"])
                tally[cause or "imported"] += 1
    return tally


def format_report(report: dict[str, collections.Counter]) -> str:
    """One table: dataset, unique URLs, available, %, failures by cause."""
    rows = [("dataset", "urls", "available", "%", "failed by cause")]
    for name, counts in report.items():
        total, found = sum(counts.values()), sum(counts[k] for k in FOUND)
        causes = ", ".join(f"{k}={v}" for k, v in counts.most_common() if k not in FOUND) or "-"
        rows.append((name, str(total), str(found), f"{100 * found / max(total, 1):.2f}", causes))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding the HF parquet folders (pixmo-cap/, ...)")
    parser.add_argument("--cache-dir", required=True, help="image cache; an existing PIXMO_IMAGE_DIR is reused")
    parser.add_argument("--sets", help="comma-separated; default: every URL-based set found in --data-dir")
    parser.add_argument("--mirror", action="append", default=[], help="image-embedded parquet folder (repeatable)")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--retry-failed", action="store_true", help="refetch URLs that failed on earlier runs")
    parser.add_argument("--no-check-sha", action="store_true", help="do not compare bytes with image_sha256")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--deadline", type=float, default=FetchConfig.deadline, help="seconds per image, total")
    parser.add_argument("--max-retry-after", type=float, default=FetchConfig.max_retry_after)
    parser.add_argument("--max-mb", type=float, default=FetchConfig.max_bytes / 2**20)
    parser.add_argument("--report", help="also write the availability report as JSON here")
    args = parser.parse_args(argv)

    sets = args.sets.split(",") if args.sets else [
        s for s in pixmo.URL_SETS if os.path.isdir(os.path.join(args.data_dir, s))]
    unknown = sorted(set(sets) - set(pixmo.URL_SETS))
    if unknown or not sets:
        parser.error(f"unknown --sets {unknown}" if unknown else f"no PixMo parquet folders in {args.data_dir}"
                     + f"; URL-based sets are {list(pixmo.URL_SETS)}")
    cache = ImageCache(args.cache_dir)
    for mirror in args.mirror:
        print(f"mirror {mirror}: {dict(import_mirror(mirror, cache, not args.no_check_sha))}")
    datasets = {name: [ImageRequest(url, sha) for url, sha in pixmo.image_urls(os.path.join(args.data_dir, name))]
                for name in sets}
    config = FetchConfig(deadline=args.deadline, max_retry_after=args.max_retry_after,
                         max_bytes=int(args.max_mb * 2**20), verify_tls=not args.insecure)
    report = download(datasets, cache, config, args.workers, args.retry_failed, not args.no_check_sha)
    print(format_report(report))
    if args.report:
        atomic_write(args.report, json.dumps({k: dict(v) for k, v in report.items()}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
