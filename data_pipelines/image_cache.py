"""The image cache shared by the downloader (writer) and the PixMo sources (readers).

A flat folder of raw image bytes named by sha256(URL), the layout of the official Molmo downloader, so an
existing Molmo image folder (PIXMO_IMAGE_DIR) is reused as is, plus `failed/<key>.json` records of URLs
that failed. This module sits below both `download` and `sources.pixmo`, so imports run one way.
The Molmo2 video cache is the same layout with `sniff_video` (`sources.molmo2_media`).
"""
import hashlib
import json
import os
import tempfile
import time

IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"\x00\x00\x01\x00", "ico"),
)
SNIFF_BYTES = 16  # enough for every signature above, WebP and HEIF included


def url_key(url: str) -> str:
    """Cache key of an image URL: sha256 of the URL string (the official Molmo layout)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def sniff_image(head: bytes) -> str | None:
    """Image format from the first bytes, or None. WebP and HEIF/AVIF carry their tag at offset 4-8."""
    for magic, name in IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"heic", b"heix", b"mif1"):
        return "heif"
    return None


def sniff_video(head: bytes) -> str | None:
    """Video container from the first bytes, or None: MP4/MOV (an ISO box type at offset 4), Matroska /
    WebM (the EBML magic), AVI (RIFF....AVI)."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def refuse_non_video(head: bytes) -> str | None:
    """"html" or "not_video" when the first bytes of a body are no video container, else None."""
    if sniff_video(head[:SNIFF_BYTES]) is None:
        return "html" if head[:512].lstrip().startswith(b"<") else "not_video"
    return None


def refuse_non_image(head: bytes) -> str | None:
    """"html" or "not_image" when the first bytes of a body are no image signature, else None
    (a `fetch` head check: the rest of such a body is never read)."""
    if sniff_image(head[:SNIFF_BYTES]) is None:
        return "html" if head[:512].lstrip().startswith(b"<") else "not_image"
    return None


class ImageCache:
    """Flat folder of images keyed by sha256(url), plus `failed/<key>.json` failure records.
    `sniff` tells a cached file from an error text (`sniff_video` for the video cache)."""

    def __init__(self, root: str, sniff=sniff_image):
        self.root, self.sniff = root, sniff
        self.failed_dir = os.path.join(root, "failed")  # created on the first failure (readers never write)

    def path(self, url: str) -> str:
        return os.path.join(self.root, url_key(url))

    def lookup(self, url: str) -> str | None:
        """Path of the cached image of `url`, or None (absent, or an official error-text file)."""
        path = self.path(url)
        try:
            with open(path, "rb") as f:
                return path if self.sniff(f.read(SNIFF_BYTES)) else None
        except FileNotFoundError:
            return None

    def store(self, url: str, body: bytes) -> str:
        os.makedirs(self.root, exist_ok=True)
        return atomic_write(self.path(url), body)

    def set_aside(self, url: str) -> str:
        """Moves the cached file of `url` to `failed/<key>.body`, out of the sources' sight but kept: it
        may be the only copy of an image whose URL is dead. Returns the new path."""
        os.makedirs(self.failed_dir, exist_ok=True)
        target = os.path.join(self.failed_dir, url_key(url) + ".body")
        os.replace(self.path(url), target)
        return target

    def failure(self, url: str) -> dict | None:
        try:
            with open(os.path.join(self.failed_dir, url_key(url) + ".json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def record_failure(self, url: str, cause: str, detail: str) -> None:
        record = {"url": url, "cause": cause, "detail": detail[:500], "time": time.time()}
        os.makedirs(self.failed_dir, exist_ok=True)
        atomic_write(os.path.join(self.failed_dir, url_key(url) + ".json"), json.dumps(record).encode())

    def clear_failure(self, url: str) -> None:
        try:
            os.remove(os.path.join(self.failed_dir, url_key(url) + ".json"))
        except FileNotFoundError:
            pass


def atomic_write(path: str, data: bytes) -> str:
    """Writes `data` to `path` through a temporary file + rename: a killed run leaves no partial file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
