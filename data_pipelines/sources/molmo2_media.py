"""Where the Molmo2 sources find their videos, and the COCO RLE masks of the Molmo2 eval sets.

The Molmo2 parquet files name videos by id (a YouTube id, a clip name), never by URL. A video is
found, in this order:

1. through a manifest (`{video_id: url}` JSON, or JSONL rows `{"video_id", "url", "sha256"}`), the
   way allenai/molmo2 ships `molmo_point_track_youtube_id_to_urls_mapping.json`: the downloader
   (`python -m data_pipelines.download --video-manifest ...`) stores each URL's bytes in the video
   cache as `<sha256 of the URL>`, the image-cache layout, checked by PyAV before they count;
2. else in a folder of videos laid out as the official loaders expect them
   (`olmo/data/molmo2_datasets.py` `_find_video_by_id`, `_find_video_point_path_by_id`,
   `_find_video_cap_path_by_id`; `molmo2_video_track_datasets.py`): `{id}.mp4` files,
   `{id}/{any video file}` folders (youtube-cc), `{id}_2fps.mp4` (2 fps pointing copies),
   `v_{id}` / `ytb_{id}` / `vimeo_{id}` prefixes (LLaVA-Video, CapEval), and `{prefix}-2fps/
   {name}_2fps.mp4` for ids with a slash (`sora2/name`). The folder is walked once per source.

A video found in neither place is left out of the source and counted (`missing_videos`); with
`check=True` one that PyAV cannot use is too (`corrupt_videos`, its causes in `skipped`).
"""
import json
import os

import numpy as np

from data_pipelines.image_cache import ImageCache, sniff_video

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
_PREFIXES = ("v_", "ytb_", "vimeo_")


def read_manifest(path: str) -> dict[str, tuple[str, str | None]]:
    """video_id -> (url, sha256 or None) from a JSON object or a JSONL file of rows."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        return {str(k): (v, None) if isinstance(v, str) else (v["url"], v.get("sha256"))
                for k, v in whole.items()}
    out = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["video_id"])] = (row["url"], row.get("sha256"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: expected a JSON object with video_id and url "
                             f"({type(e).__name__}: {e})") from e
    return out


def _keys(relative: str) -> tuple[list[str], list[str]]:
    """The video ids a file at `relative` (to the video folder) answers to: (by its own name, by a
    prefix or its folder); the first kind wins over the second for any id."""
    folder, name = os.path.split(relative)
    stem = os.path.splitext(name)[0]
    bare = stem[:-len("_2fps")] if stem.endswith("_2fps") else stem
    derived = [bare[len(p):] for p in _PREFIXES if bare.startswith(p)]
    if folder:
        parent = os.path.basename(folder)
        derived.append(parent)  # youtube-cc layout: {video_id}/{video file}
        derived.append(f"{parent[:-len('-2fps')] if parent.endswith('-2fps') else parent}/{bare}")
    return [stem, bare], derived


class VideoIndex:
    """video_id -> local path, from the download cache (through a manifest) and/or a folder."""

    def __init__(self, video_dir: str | None = None, cache_dir: str | None = None,
                 manifest: str | None = None, check: bool = False):
        """check: probe every video found (PyAV demuxes it: slow on a large set) so that a corrupt
        one is left out at load time and counted, instead of failing when its example is processed."""
        if video_dir is None and cache_dir is None:
            raise ValueError("Molmo2 video sets need videos: pass video_dir (a folder of videos) "
                             "and/or cache_dir + manifest (the download cache)")
        if (cache_dir is None) != (manifest is None):
            raise ValueError("cache_dir and manifest go together (the manifest maps ids to URLs)")
        self.files: dict[str, str] = {}
        if video_dir is not None:
            if not os.path.isdir(video_dir):
                raise FileNotFoundError(f"video_dir {video_dir} is not a folder")
            derived = {}
            for root, dirs, names in os.walk(video_dir):
                dirs.sort()  # the first file for an id wins: walk in a fixed order
                for name in sorted(names):
                    if name.lower().endswith(VIDEO_EXTENSIONS):
                        path = os.path.join(root, name)
                        own, other = _keys(os.path.relpath(path, video_dir))
                        for key in own:
                            self.files.setdefault(key, path)
                        for key in other:
                            derived.setdefault(key, path)
            for key, path in derived.items():
                self.files.setdefault(key, path)
        self.check = check
        self.urls = read_manifest(manifest) if manifest else {}
        self.cache = ImageCache(cache_dir, sniff=sniff_video) if cache_dir else None

    def lookup(self, video_id: str) -> str | None:
        """The file of `video_id`, or None when it is neither downloaded nor in the folder."""
        if self.cache is not None and video_id in self.urls:
            path = self.cache.lookup(self.urls[video_id][0])
            if path is not None:
                return path
        return self.files.get(video_id)


def rle_counts(counts: str | list) -> list[int]:
    """COCO RLE counts: a list of run lengths as is, or pycocotools' compressed string decoded
    (`rleFrString` of maskApi.c: 5-bit groups, sign bit 0x10, deltas to the count two back)."""
    if not isinstance(counts, str):
        return [int(c) for c in counts]
    out, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def decode_rle(rle: dict) -> np.ndarray:
    """bool[H, W] of a COCO RLE {"size": [H, W], "counts": ...}: runs alternate 0s and 1s,
    starting with 0s, over the column-major pixels (what `_decode_rle_mask` of the official
    Molmo2 loaders reads)."""
    height, width = rle["size"]
    runs = rle_counts(rle["counts"])
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs {runs[:8]}... cover {sum(runs)} pixels, the mask has {height}x{width}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape((height, width), order="F")
