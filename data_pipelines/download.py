"""Robust PixMo image downloader: bounded retries, capped Retry-After, deadlines, a shared cache.

    python -m data_pipelines.download --data-dir DATA --cache-dir IMAGES [--sets pixmo-points,...]

`DATA` holds the Hugging Face parquet folders of the PixMo sets as published (`DATA/pixmo-cap/data/
train-*.parquet`, ...). Images are cached as `IMAGES/<sha256 of the URL>` (raw bytes, no extension), the
layout of the official Molmo downloader, so an existing Molmo image folder (PIXMO_IMAGE_DIR) is reused.

Why not the official loop: one in five PixMo-Cap URLs is dead, some servers answer 429 with a
Retry-After days in the future (which the official retry adapter honours, so runs hang near the end),
and others drip bytes forever. Here (`data_pipelines.fetch`) every image has one total deadline covering
the whole exchange and the retries; Retry-After above a cap fails fast; a refused connection is not
retried; bodies are size-capped and refused from their first bytes when they are no image; only http(s)
is followed, with a bounded number of redirects; URLs are percent-encoded as the official downloader
sends them. An image counts only when its pixels decode, as `images.load_image` decodes them for training.
No URL can stop the run: every URL ends in exactly one outcome:

    downloaded, cached                 -> the image is in the cache (and matches image_sha256 if known)
    http_<code>                        -> final HTTP status (404, 403, 500 after retries, 429 after retries...)
    retry_after_too_long               -> 429/503 whose Retry-After exceeds the cap
    timeout, truncated, too_large, too_many_redirects, connection_error, connection_refused
    bad_url, unsupported_scheme        -> the URL cannot be sent (bad port, host or IPv6 literal; not http)
    bad_header                         -> a header that cannot be parsed (a Content-Length of non-digits)
    html, not_image, undecodable       -> the body is a web page / not an image / an image PIL cannot open
    corrupt_image, too_many_pixels     -> pixels do not decode (truncated, broken data) / over load_image's limit
    sha_mismatch                       -> bytes differ from the dataset's image_sha256
    cached_failure                     -> an old official cache file that holds an error text
    unexpected_error                   -> anything else (type and message in the failure record)

Molmo2: `--sets Molmo2-MultiImageQA` fetches the images of its `image_urls` lists the same way, and
`--video-manifest MANIFEST --video-cache VIDEOS` the videos of a manifest (`{video_id: url}` JSON or JSONL
rows with video_id, url, sha256; see `sources.molmo2_media`): same limits with `--video-max-mb`, a body
counts only when its first bytes are a video container and PyAV finds frames in it (`not_video`,
`bad_video` otherwise), stored as `VIDEOS/<sha256 of the URL>`.

Failures are recorded in `IMAGES/failed/<key>.json` and not retried on the next run unless
`--retry-failed` is given; a cached file that fails the checks is set aside as `failed/<key>.body`. Writes are atomic (temporary file + rename), so a killed run leaves no
partial image behind, and a resumed run refetches nothing that is already cached.
"""
import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import tempfile
import warnings
from typing import Callable, Iterable

from data_pipelines import images
from data_pipelines.fetch import FetchConfig, FetchError, fetch
from data_pipelines.image_cache import (SNIFF_BYTES, ImageCache, atomic_write, refuse_non_image, refuse_non_video,
                                        sniff_image, sniff_video)
from data_pipelines.sources import molmo2_media, pixmo

FOUND = ("downloaded", "cached")
URL_SETS = pixmo.URL_SETS + ("Molmo2-MultiImageQA",)  # image URL lists of Molmo2 (column image_urls)
# ImageDecodeError names its cause in the message (see its docstring); the rest is "undecodable".
DECODE_CAUSES = (("decompression bomb", "too_many_pixels"), ("truncated or corrupt data", "corrupt_image"))


def check_image_bytes(body: bytes, expected_sha256: str | None = None) -> str | None:
    """None when `body` is an image whose pixels decode within `images.load_image`'s pixel limit (and
    matches `expected_sha256`), else the failure cause: a truncated JPEG or a PNG with broken compressed
    data have a valid header, so only a full decode tells (the same one training will do)."""
    if expected_sha256 and hashlib.sha256(body).hexdigest() != expected_sha256.lower():
        return "sha_mismatch"
    if (cause := refuse_non_image(body)) is not None:
        return cause
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings of web images
            images.load_image(body)
    except images.ImageDecodeError as e:
        return next((cause for phrase, cause in DECODE_CAUSES if phrase in str(e)), "undecodable")
    return None


def check_video_bytes(body: bytes, expected_sha256: str | None = None) -> str | None:
    """None when `body` is a video that `video.probe` accepts (and matches `expected_sha256`), else the
    cause: "sha_mismatch", "html" / "not_video", or "bad_video" (no stream, zero frames, truncated...)."""
    if expected_sha256 and hashlib.sha256(body).hexdigest() != expected_sha256.lower():
        return "sha_mismatch"
    if (cause := refuse_non_video(body)) is not None:
        return cause
    from data_pipelines import video  # PyAV (the "video" extra) only when videos are fetched
    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(body)
        f.flush()
        try:
            video.probe(f.name)
        except video.VideoDecodeError:
            return "bad_video"
    return None


@dataclasses.dataclass(frozen=True)
class Media:
    """What a cache holds: the full check of a body, the check of its first bytes, the file sniffer."""
    check: Callable[[bytes, str | None], str | None]
    head_check: Callable[[bytes], str | None]
    sniff: Callable[[bytes], str | None]


IMAGES = Media(check_image_bytes, refuse_non_image, sniff_image)
VIDEOS = Media(check_video_bytes, refuse_non_video, sniff_video)


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    url: str
    sha256: str | None = None


def get_image(request: ImageRequest, cache: ImageCache, config: FetchConfig, retry_failed: bool = False,
              check_sha: bool = True, media: Media = IMAGES) -> str:
    """Makes sure the image (or video, with `media=VIDEOS`) of `request` is cached; returns its outcome
    ("downloaded", "cached" or a cause)."""
    if not isinstance(request.url, str):
        return "bad_url"  # a null image_url in a parquet row: nothing to fetch and no key to record it under
    expected = request.sha256 if check_sha else None
    path = cache.path(request.url)
    if os.path.exists(path):
        with open(path, "rb") as f:
            body = f.read()
        cause = media.check(body, expected)
        if cause is None:
            return "cached"
        kept = cache.set_aside(request.url)  # never left where sources would pick it up, never deleted
        if media.sniff(body[:SNIFF_BYTES]) is None and not body.lstrip().startswith(b"<"):
            cause = "cached_failure"  # official downloader wrote its exception text into the file
        cache.record_failure(request.url, cause, f"set aside as {kept}: {body[:200].decode('utf-8', 'replace')}")
        if not retry_failed:
            return cause
    elif not retry_failed and (record := cache.failure(request.url)) is not None:
        return record["cause"]
    try:
        body = fetch(request.url, config, media.head_check)
        cause = media.check(body, expected)
        detail = f"{len(body)} bytes starting {body[:40]!r}"
    except FetchError as e:
        cause, detail = e.cause, e.detail
    except Exception as e:  # noqa: BLE001 (an input no rule above foresaw costs this URL, not the run)
        cause, detail = "unexpected_error", f"{type(e).__name__}: {e}"
    if cause is not None:
        cache.record_failure(request.url, cause, detail)
        return cause
    cache.store(request.url, body)
    cache.clear_failure(request.url)
    return "downloaded"


def download(datasets: dict[str, list[ImageRequest]], cache: ImageCache, config: FetchConfig = FetchConfig(),
             workers: int = 16, retry_failed: bool = False, check_sha: bool = True,
             progress: bool = True, media: Media = IMAGES) -> dict[str, collections.Counter]:
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
                pending[pool.submit(get_image, request, cache, config, retry_failed, check_sha, media)] = request.url
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
    parser.add_argument("--video-manifest", action="append", default=[],
                        help="Molmo2 videos to fetch: {video_id: url} JSON or JSONL rows (repeatable)")
    parser.add_argument("--video-cache", help="where the videos of --video-manifest go")
    parser.add_argument("--video-max-mb", type=float, default=512.0,
                        help="size cap of one video (a body is held in memory until it is checked: "
                             "workers x this must fit)")
    args = parser.parse_args(argv)

    if bool(args.video_manifest) != bool(args.video_cache):
        parser.error("--video-manifest and --video-cache go together")
    sets = args.sets.split(",") if args.sets else [
        s for s in URL_SETS if os.path.isdir(os.path.join(args.data_dir, s))]
    unknown = sorted(set(sets) - set(URL_SETS))
    if unknown or not (sets or args.video_manifest):
        parser.error(f"unknown --sets {unknown}" if unknown else f"no PixMo parquet folders in {args.data_dir}"
                     + f"; URL-based sets are {list(URL_SETS)}")
    cache = ImageCache(args.cache_dir)
    for mirror in args.mirror:
        print(f"mirror {mirror}: {dict(import_mirror(mirror, cache, not args.no_check_sha))}")
    datasets = {name: [ImageRequest(url, sha) for url, sha in pixmo.image_urls(os.path.join(args.data_dir, name))]
                for name in sets}
    config = FetchConfig(deadline=args.deadline, max_retry_after=args.max_retry_after,
                         max_bytes=int(args.max_mb * 2**20), verify_tls=not args.insecure)
    report = download(datasets, cache, config, args.workers, args.retry_failed, not args.no_check_sha)
    if args.video_manifest:
        videos = {os.path.basename(m): [ImageRequest(url, sha) for url, sha in molmo2_media.read_manifest(m).values()]
                  for m in args.video_manifest}
        report.update(download(videos, ImageCache(args.video_cache, sniff=sniff_video),
                               dataclasses.replace(config, max_bytes=int(args.video_max_mb * 2**20)), args.workers,
                               args.retry_failed, not args.no_check_sha, media=VIDEOS))
    print(format_report(report))
    if args.report:
        atomic_write(args.report, json.dumps({k: dict(v) for k, v in report.items()}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
