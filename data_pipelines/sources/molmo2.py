"""Molmo2 sources: the video and multi-image sets allenai released, read from their HF parquet files.

A folder per set holds the files of the HF repo as published (`Molmo2-Cap/train-*.parquet`,
`Molmo2-VideoPoint/<config>/train-*.parquet`, `molmo2-track-instruction/track/train-*.parquet`, ...);
columns are read by the names the official loaders read (allenai/molmo2 `olmo/data/molmo2_datasets.py`,
`molmo2_video_track_datasets.py`, `pixmo_datasets.py`), and a file that lacks one is refused with
one error naming the file and the columns. Videos come from a `VideoIndex` (`molmo2_media`: the
download cache through a manifest, or a folder in the official layouts); multi-image sets read the
image cache of `data_pipelines.download`.

Bad rows never reach a worker: a row with a null field the example needs, a video or image that is
not there, a clip that does not hold its annotations, are left out at load time and counted by cause
in `source.stats["skipped"]` (plus `missing_videos` / `missing_images`). A video that is there but
does not decode is left out and counted too with `check_videos=True` (`corrupt_videos`); without it,
it raises `video.VideoDecodeError` (a ValueError) when the example is processed, which the pipeline
skips and counts as malformed.

The PixMo sets reused by Molmo2 go through `sources.pixmo` (its records and examples), regrouped as
Molmo2's loaders do: "pixmo_points_train" / "pixmo_points_high_freq_train" / "pixmo_count_train" train
both the counting and the pointing style, "pixmo_cap_qa_as_user_qa" is CapQA styled "user_qa".

Records and examples follow the v1 PixMo sources (`sources.pixmo`): records are (media, key, rows),
examples are made by module-level functions with the per-epoch choices drawn from `rng`, and the
random-access `pixmo.PixmoSource` serves them to grain. Kept from the official loaders, on purpose:
caption styles per column, Molmo2-Cap's corrupt ids and `min_score`, the MC answer placed at a random
position among the negatives, pointing clips of at most 63 s with timestamps made relative to the clip
and floored to the 2 fps grid, points sorted by (x, y), the style drawn per message from
("point_count", "point") with the counting question dropped for "point", tracking rows whose fps is
not a multiple of their sampling fps dropped. Differences: the MC answer position is drawn per epoch
from `rng` (the official draws it once, with Python's global `random`, at load); examples always carry
a `message_list` (a single pointing message is a list of one); the official `p_multi_turn` regrouping
belongs to message-tree packing and is not done here.
"""
import collections
import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

import numpy as np

from data_pipelines.image_cache import ImageCache
from data_pipelines.sources import pixmo
from data_pipelines.sources.molmo2_media import VideoIndex, decode_rle

CAPTION_STYLES = {  # Molmo2Captions.CAPTION_KEY_TO_STYLE, in the official order of versions
    "merged_caption": "video_merged_caption",
    "video_caption": "video_short_caption",
    "video_frame_merged_caption": "video_long_caption",
}
CORRUPT_CAP_VIDEOS = frozenset({"0OfUqrbRa2Y", "mTXBQzptWAg", "NyuA4FatDQk", "a_", "gsfIHiBB6xE",
                                "bXApJtAf6Qo", "N8BlpYSpgg4"})  # Molmo2Captions.CORRUPT_VIDEO_IDS
MAX_CLIP_SECONDS = 63  # Molmo2VideoPoint: "Clips from metadata are pre-computed for max 63 seconds"
POINT_GRID = 0.5  # the 2 fps annotation grid of Molmo2-VideoPoint
TRACK_TASKS = {"track": "video_point_track_per_frame", "ground": "video_point_ground_start_end",
               "single_point_track": "video_single_point_track_per_frame"}  # TrackingDataset._get_style


def _check_rows(rows: list[dict], needed: Sequence[str], skipped: collections.Counter) -> list[dict]:
    """Rows whose `needed` fields are not null; the others are counted as `null_<field>`."""
    kept = []
    for row in rows:
        null = next((f for f in needed if row.get(f) is None), None)
        if null is None:
            kept.append(row)
        else:
            skipped[f"null_{null}"] += 1
    return kept


def _is_xy(point) -> bool:
    """A point {x, y} or [x, y] of two numbers (what the examples turn into arrays)."""
    values = [point.get("x"), point.get("y")] if isinstance(point, dict) else point
    return isinstance(values, (list, tuple)) and len(values) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _video_records(groups: dict, videos: VideoIndex, rows_read: int, skipped: collections.Counter,
                   video_of: Callable = lambda key: key) -> tuple[list, dict]:
    """(video path, key, rows) for groups whose video is found (and, with `videos.check`, decodes);
    the rest are counted."""
    records, missing, corrupt, probed = [], 0, 0, {}
    for key, rows in groups.items():
        path = videos.lookup(video_of(key))
        if path is None:
            missing += 1
            continue
        if videos.check:
            if path not in probed:
                probed[path] = _video_problem(path)
            if probed[path] is not None:
                corrupt += 1
                skipped[f"video_{probed[path]}"] += 1
                continue
        records.append((path, key, rows))
    return records, {"rows": rows_read, "kept_rows": sum(len(r[2]) for r in records), "videos": len(groups),
                     "missing_videos": missing, "corrupt_videos": corrupt, "skipped": dict(skipped)}


def _video_problem(path: str) -> str | None:
    """The cause of `video.VideoDecodeError` for `path` ("zero_frames", ...), None when it is usable."""
    from data_pipelines import video  # PyAV only when videos are checked
    try:
        video.probe(path)
    except video.VideoDecodeError as e:
        return next((c.replace(" ", "_") for c in video.CAUSES if c in str(e)), "undecodable")
    return None


def _by_video(rows: list[dict], key: str = "video_id") -> dict:
    groups = collections.defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return groups


# ---------------------------------------------------------------------------------------------------
# Records.

def caption_records(folder: str, split: str, videos: VideoIndex, min_score: float = 3):
    """Molmo2-Cap (`Molmo2Captions`): one record per video row with a score >= `min_score` (the
    mixture's "vixmo3_top_level_captions_min_3") and at least one caption."""
    columns = ["video_id", "annotation_score", *CAPTION_STYLES]
    rows = pixmo.read_parquet(folder, split, columns).to_pylist()
    skipped = collections.Counter()
    kept = []
    for row in _check_rows(rows, ["video_id", "annotation_score"], skipped):
        if row["video_id"] in CORRUPT_CAP_VIDEOS:
            skipped["corrupt_video_id"] += 1
        elif row["annotation_score"] < min_score:
            skipped["below_min_score"] += 1
        elif not any(row[c] for c in CAPTION_STYLES):
            skipped["no_caption"] += 1
        else:
            kept.append(row)
    return _video_records({i: [r] for i, r in enumerate(kept)}, videos, len(rows), skipped,
                          video_of=lambda i: kept[i]["video_id"])


def qa_records(folder: str, split: str, videos: VideoIndex, columns: Sequence[str] = (),
               needed: Sequence[str] = ()):
    """Sets of one QA per row, grouped per video (VideoCapQA, VideoSubtitleQA, AskModelAnything)."""
    table = pixmo.read_parquet(folder, split, ["video_id", *columns])
    skipped = collections.Counter()
    rows = _check_rows(table.to_pylist(), ["video_id", *needed], skipped)
    return _video_records(_by_video(rows), videos, table.num_rows, skipped)


def multiple_choice_records(folder, split, videos, subtitles: bool = False):
    extra = ["subtitle"] if subtitles else []
    return qa_records(folder, split, videos, ["Question", "Answer", "NegativeAnswers", *extra],
                      ["Question", "Answer", "NegativeAnswers", *extra])


def human_qa_records(folder, split, videos):
    """Molmo2-AskModelAnything (`Molmo2HumanQA`): rows with an empty answer are left out."""
    records, stats = qa_records(folder, split, videos, ["question", "answer"], ["question", "answer"])
    kept = []
    for path, key, rows in records:
        answered = [r for r in rows if r["answer"].strip()]
        stats["skipped"]["empty_answer"] = stats["skipped"].get("empty_answer", 0) + len(rows) - len(answered)
        if answered:
            kept.append((path, key, answered))
    return kept, stats


POINT_COLUMNS = ("video_id", "video_source", "clip_start", "clip_end", "video_duration", "label", "count",
                 "two_fps_timestamps", "points", "question", "category")


def _point_clip(row: dict, clip: tuple, skipped: collections.Counter) -> tuple | None:
    """(start, end) of the clip a pointing row is shown in, or None (counted) when there is none."""
    duration = row["video_duration"]
    times = row["two_fps_timestamps"]
    ann_start, ann_end = (min(times), max(times)) if times else (0.0, min(duration, MAX_CLIP_SECONDS))
    if duration <= MAX_CLIP_SECONDS:
        start, end = 0.0, duration
    elif clip[0] is not None and clip[1] is not None:
        start, end = clip
    else:
        skipped["long_video_without_clip"] += 1
        return None
    if not (0 <= start < end <= duration and end - start <= MAX_CLIP_SECONDS
            and start <= ann_start and end >= ann_end):
        skipped["invalid_clip"] += 1
        return None
    return start, end


def video_point_records(folder: str, split: str, videos: VideoIndex, min_points: int | None = None,
                        max_points: int | None = None):
    """Molmo2-VideoPoint, every config (`Molmo2VideoPoint` as the "molmo2_video_point_minmax_*"
    entries build it: clips from the metadata, at most 63 s, `multi_message_short_clips`).

    Each record is one example: all messages of a video of at most 63 s together, else one message
    with its clip. Rows: messages with `points` [per timestamp] float32[N, 2] in percent (point_scale
    100), `timestamps` relative to the clip start, floored to the 0.5 s grid.
    """
    read = pixmo.read_parquet(folder, split, list(POINT_COLUMNS), optional=["annotator_unsure"]).to_pylist()
    skipped = collections.Counter()
    rows = _check_rows(read, ["video_id", "video_duration", "label", "count", "two_fps_timestamps", "points"],
                       skipped)
    groups = collections.defaultdict(list)
    for row in rows:
        clip = (row["clip_start"], row["clip_end"])
        if None not in clip and clip[1] - clip[0] > MAX_CLIP_SECONDS:
            skipped["clip_too_long"] += 1
            continue
        if (min_points is not None and row["count"] < min_points) or (
                max_points is not None and row["count"] > max_points):
            skipped["count_out_of_range"] += 1
            continue
        if len(row["points"]) != len(row["two_fps_timestamps"]):
            skipped["points_timestamps_mismatch"] += 1
            continue
        if not all(frame is not None and all(_is_xy(p) for p in frame) for frame in row["points"]):
            skipped["bad_points"] += 1
            continue
        if any(t / POINT_GRID != int(t / POINT_GRID) for t in row["two_fps_timestamps"]):
            skipped["timestamp_off_grid"] += 1  # the official loader asserts here
            continue
        span = _point_clip(row, clip, skipped)
        if span is None:
            continue
        short = row["video_duration"] <= MAX_CLIP_SECONDS
        # short videos: one example with every message; long ones: one example per message
        key = (row["video_id"], span) if short else (row["video_id"], span, len(groups))
        groups[key].append(dict(row, clip_start_time=span[0], clip_end_time=span[1]))
    return _video_records(groups, videos, len(read), skipped, video_of=lambda k: k[0])


def track_records(folder: str, split: str, videos: VideoIndex, task: str = "track"):
    """molmo2-track-instruction config `task` (`Molmo2VideoTrackInstruction`); the video of a row is
    its `clip` (`{clip}.mp4` in the per-source video folders)."""
    if task not in TRACK_TASKS:
        raise ValueError(f"molmo2 tracking task {task!r} not in {list(TRACK_TASKS)}")
    config = os.path.join(folder, task)
    columns = ["id", "video", "clip", "fps", "video_dataset", "expression", "width", "height", "mask_id",
               "sampling_fps", "frame_trajectories"]
    rows = pixmo.read_parquet(config if os.path.isdir(config) else folder, split, columns).to_pylist()
    skipped = collections.Counter()
    kept = []
    for row in _check_rows(rows, columns, skipped):
        if not all(f is not None and f.get("frame") is not None and all(
                p is not None and p.get("id") is not None and _is_xy(p.get("point")) for p in f.get("points") or ())
                for f in row["frame_trajectories"]):
            skipped["bad_trajectory"] += 1
        elif not (row["fps"] > 0 and row["sampling_fps"] > 0 and row["fps"] % row["sampling_fps"] == 0):
            skipped["fps_not_multiple_of_sampling_fps"] += 1
        else:
            kept.append(row)
    clips = {r["id"]: r["clip"] for r in kept}
    return _video_records({r["id"]: [r] for r in kept}, videos, len(rows), skipped, video_of=clips.__getitem__)


def multi_image_qa_records(folder: str, split: str, image_dir: str | None, max_images: int | None = None):
    """Molmo2-MultiImageQA (`PixmoMultiImageQa`): examples of 2 to `max_images` images (2 or more
    without a cap, as the official default), each image in the download cache."""
    if image_dir is None:
        raise ValueError("Molmo2-MultiImageQA stores image URLs: pass image_dir, the cache of data_pipelines.download")
    rows = pixmo.read_parquet(folder, split, ["image_urls", "qa_pairs"]).to_pylist()
    skipped = collections.Counter()
    cache, records, missing = ImageCache(image_dir), [], 0
    for i, row in enumerate(_check_rows(rows, ["image_urls", "qa_pairs"], skipped)):
        n = len(row["image_urls"])
        if n < 2 or (max_images is not None and n > max_images):
            skipped["image_count_out_of_range"] += 1
            continue
        paths = [cache.lookup(u) for u in row["image_urls"]]
        if None in paths:
            missing += 1
            continue
        records.append((paths, str(i), [row]))
    return records, {"rows": len(rows), "kept_rows": len(records), "missing_images": missing,
                     "skipped": dict(skipped)}


# ---------------------------------------------------------------------------------------------------
# PixMo as Molmo2 trains on it: the v1 PixMo records, regrouped (allenai/molmo2 olmo/data/pixmo_datasets.py).

def both_styles(records: list) -> list:
    """Every record twice, its rows styled "point_count" then "pointing" (`counting="both"`: even
    indices count, odd ones point)."""
    return [(image, key, [dict(r, style=style) for r in rows]) for image, key, rows in records
            for style in ("point_count", "pointing")]


def points_train_records(folder: str, split: str, image_dir: str | None, kind: str = "basic",
                         exclude_urls: Sequence[str] = (), n_val: int = 2048, max_points: int = 60,
                         max_total_points: int = 60):
    """PixMo-Points as "pixmo_points_train" / "pixmo_points_high_freq_train" build it (`PixMoPoints(
    counting="both", max_points=60, max_total_points_per_example=60)`): expressions with more than
    `max_points` points dropped, an image's expressions cut into examples of at most
    `max_total_points` points (a new example starts when the next expression would pass it)."""
    records, stats = pixmo.points_records(folder, split, image_dir, kind, exclude_urls, n_val, max_points)
    parts = []
    for image, key, rows in records:
        batch, total = [], 0
        for row in rows:
            if batch and total + len(row["points"]) > max_total_points:
                parts.append((image, key, batch))
                batch, total = [], 0
            batch.append(row)
            total += len(row["points"])
        if batch:
            parts.append((image, key, batch))
    return both_styles(parts), stats


def points_train_example(record, rng) -> dict:
    """pixmo.points_example with `clip_points` on each message, as the official PixMoPoints sets it
    (the formatter clips the points to [0, point scale] before writing them)."""
    example = pixmo.points_example(record, rng)
    example["message_list"] = [dict(m, clip_points=True) for m in example["message_list"]]
    return example


def count_train_records(folder: str, split: str, image_dir: str | None):
    """PixMo-Count as "pixmo_count_train" (`PixMoCount(counting="both")`)."""
    records, stats = pixmo.row_records(folder, split, image_dir, ["image_url", "image_sha256", "count", "points",
                                                                 "label"])
    return both_styles(records), stats


def count_train_example(record, rng) -> dict:
    """pixmo.count_example, a published empty point list kept as no points (the official PixMoCount
    always passes the train split's points, so a count of 0 answers "There are none.")."""
    example = pixmo.count_example(record, rng)
    if "points" not in example and record[2][0]["points"] is not None:
        example["points"] = pixmo.points_xy([])
    return example


def video_point_eval_records(folder: str, split: str, videos: VideoIndex):
    """Molmo2-VideoPointEval (`Molmo2VideoPointEval`): one record per row, masks decoded at read time."""
    columns = ["video_id", "video_source", "label", "height", "width", "video_duration", "two_fps_timestamps",
               "points", "masks"]
    table = pixmo.read_parquet(folder, split, columns)
    skipped = collections.Counter()
    rows = _check_rows(table.to_pylist(), columns, skipped)
    return _video_records({i: [r] for i, r in enumerate(rows)}, videos, table.num_rows, skipped,
                          video_of=lambda i: rows[i]["video_id"])


def video_count_eval_records(folder: str, split: str, videos: VideoIndex):
    """Molmo2-VideoCountEval (`Molmo2VideoCountEval`): one record per row."""
    columns = ["video_id", "video_source", "clip_start", "clip_end", "count", "label", "question", "category",
               "video_duration"]
    table = pixmo.read_parquet(folder, split, columns)
    skipped = collections.Counter()
    rows = _check_rows(table.to_pylist(), ["video_id", "count", "question", "category"], skipped)
    return _video_records({i: [r] for i, r in enumerate(rows)}, videos, table.num_rows, skipped,
                          video_of=lambda i: rows[i]["video_id"])


# ---------------------------------------------------------------------------------------------------
# Examples: record -> example dict (module-level functions, so sources pickle into grain workers).

def _video_base(record, **fields) -> dict:
    video, key, rows = record
    metadata = {"video_id": rows[0].get("video_id", key), **fields.pop("metadata", {})}
    return {"video": video, "metadata": metadata, **fields}


def caption_example(record, rng) -> dict:
    """Molmo2-Cap: one message per caption column that has text, styled as `CAPTION_STYLES`."""
    row = record[2][0]
    return _video_base(record, message_list=[{"text": row[c], "style": s} for c, s in CAPTION_STYLES.items()
                                             if row[c]])


def _multiple_choice(row: dict, rng) -> dict:
    options = list(row["NegativeAnswers"])
    answer_idx = int(rng.randint(0, len(options) + 1))  # random.randint(0, n) is inclusive
    options.insert(answer_idx, row["Answer"])
    return {"question": row["Question"], "options": options, "answer_idx": answer_idx,
            "style": "video_multiple_choice", "category": row.get("Category")}


def multiple_choice_example(record, rng) -> dict:
    """Molmo2-VideoCapQA / -VideoSubtitleQA: `video_multiple_choice` messages; with subtitles the
    video's subtitle as {(start, end): text} (all rows of a video share it)."""
    rows = record[2]
    out = _video_base(record, message_list=[_multiple_choice(r, rng) for r in rows],
                      metadata={"example_id": f"molmo2_syn_qa_{record[1]}"})
    if "subtitle" in rows[0]:
        out["subtitle"] = {(s["start"], s["end"]): s["text"] for s in rows[0]["subtitle"]}
    return out


def human_qa_example(record, rng) -> dict:
    """Molmo2-AskModelAnything: `user_qa` messages, question and answer stripped."""
    return _video_base(record, message_list=[
        {"question": r["question"].strip(), "answer": r["answer"].strip(), "style": "user_qa"} for r in record[2]])


def _point_message(row: dict, style: str) -> dict:
    start = row["clip_start_time"]
    points = [np.array(sorted(((p["x"], p["y"]) for p in frame)), np.float32).reshape(-1, 2)
              for frame in row["points"]]
    times = [math.floor((t - start) / POINT_GRID) * POINT_GRID for t in row["two_fps_timestamps"]]
    message = {"label": row["label"], "count": row["count"], "points": points, "timestamps": times,
               "point_scale": 100, "style": style, "subset": row["category"],
               "question": row["question"]}
    if style == "video_point":  # the counting question does not fit: the formatter's template asks
        del message["question"]
    return message


def video_point_example(record, rng, modes: Sequence[str] = ("point_count", "point")) -> dict:
    """Molmo2-VideoPoint: each message styled `video_<mode>`, the mode drawn from `modes`."""
    rows = record[2]
    messages = [_point_message(r, f"video_{modes[rng.randint(0, len(modes))]}") for r in rows]
    return _video_base(record, message_list=messages, metadata={
        "clip_start_time": rows[0]["clip_start_time"], "clip_end_time": rows[0]["clip_end_time"],
        "video_duration": rows[0]["video_duration"]})


def track_example(record, rng, task: str = "track") -> dict:
    """molmo2-track-instruction: one message (`TrackingDataset._create_message_list`) with per-frame
    points {object index: {"point": [x, y], "occluded"}} sorted by frame; sampling overrides for the
    official "fps" frame sampling."""
    row = record[2][0]
    index = {str(obj): i for i, obj in enumerate(row["mask_id"])}
    frames = sorted(({"frame": f["frame"], "time": f["time"],
                      "points": {index[str(p["id"])]: {"point": p["point"], "occluded": p["occluded"]}
                                 for p in f["points"] if str(p["id"]) in index}}
                     for f in row["frame_trajectories"]), key=lambda f: f["frame"])
    message = {"style": TRACK_TASKS[task], "label": row["expression"], "sampling_fps": row["sampling_fps"],
               "width": row["width"], "height": row["height"], "points": frames or None}
    return {"video": record[0], "message_list": [message], "sampling_fps": row["sampling_fps"], "metadata": {
        "example_id": row["id"], "task": task, "expression": row["expression"], "w": row["width"],
        "h": row["height"], "video_fps": row["fps"], "orig_video": row["video"], "video": row["clip"],
        "video_dataset": row["video_dataset"],
        "sampler_overrides": {"frame_sample_mode": "fps", "min_fps": row["sampling_fps"]}}}


def multi_image_qa_example(record, rng) -> dict:
    """Molmo2-MultiImageQA: `correction_qa` messages over all images, "how many" questions
    prefixed with a no-pointing phrase (the official `prefix_how_many`)."""
    images, _, (row,) = record
    return {"image": list(images), "metadata": {"image_urls": row["image_urls"]},
            "message_list": [{"question": pixmo.no_point_prefix(q, rng), "answer": a, "style": "correction_qa"}
                             for q, a in pixmo.qa_pairs(row["qa_pairs"])]}


def video_point_eval_example(record, rng) -> dict:
    """Molmo2-VideoPointEval: style `video_point_count`; metadata has the pixel (t, x, y) triplets and,
    per ground-truth point, {time: bool[H, W]} masks (frame_id / 2: the 2 fps annotation)."""
    row = record[2][0]
    triplets = [(t, p["x"], p["y"]) for t, p in zip(row["two_fps_timestamps"], row["points"])]
    masks = [{m["frame_id"] / 2.0: decode_rle(m["rle"]) for m in frame} for frame in row["masks"]]
    return _video_base(record, label=row["label"], style="video_point_count",
                       question=f'How many "{row["label"]}" are there in the video?',
                       metadata={"gt_abs_triplets": triplets, "gt_abs_masks": masks,
                                 "video_duration": row["video_duration"], "video_height": row["height"],
                                 "video_width": row["width"]})


def video_count_eval_example(record, rng) -> dict:
    """Molmo2-VideoCountEval: style `video_count`, answer the count; metadata for the count metric."""
    row = record[2][0]
    return _video_base(record, question=row["question"], answer=str(row["count"]), style="video_count",
                       label=row["label"], metadata={
                           "count": row["count"], "subset": row["category"], "video_duration": row["video_duration"],
                           "clip_start_time": row["clip_start"], "clip_end_time": row["clip_end"]})


# ---------------------------------------------------------------------------------------------------
# Registry: the official dataset names (allenai/molmo2 `olmo/data/get_dataset.py`).

SOURCES = {
    "molmo2_cap": pixmo.Spec("Molmo2-Cap", caption_records, caption_example),
    "molmo2_syn_captions_qa": pixmo.Spec("Molmo2-VideoCapQA", multiple_choice_records, multiple_choice_example),
    "molmo2_syn_captions_subtitle_qa": pixmo.Spec("Molmo2-VideoSubtitleQA", multiple_choice_records,
                                                  multiple_choice_example, (("subtitles", True),)),
    "molmo2_human_qa": pixmo.Spec("Molmo2-AskModelAnything", human_qa_records, human_qa_example),
    "molmo2_video_track": pixmo.Spec("molmo2-track-instruction", track_records, track_example,
                                     (("task", "track"),), (("task", "track"),)),
    "molmo2_video_track_ground": pixmo.Spec("molmo2-track-instruction", track_records, track_example,
                                            (("task", "ground"),), (("task", "ground"),)),
    "molmo2_video_single_point_track": pixmo.Spec(
        "molmo2-track-instruction", track_records, track_example, (("task", "single_point_track"),),
        (("task", "single_point_track"),)),
    "molmo2_video_point_eval": pixmo.Spec("Molmo2-VideoPointEval", video_point_eval_records,
                                          video_point_eval_example),
    "molmo2_video_count_eval": pixmo.Spec("Molmo2-VideoCountEval", video_count_eval_records,
                                          video_count_eval_example),
    "pixmo_cap_qa_as_user_qa": dataclasses.replace(pixmo.SOURCES["pixmo_cap_qa"], example_args=(("style", "user_qa"),),
                                                   storage="pixmo_cap_qa"),
    "pixmo_points_train": pixmo.Spec("pixmo-points", points_train_records, points_train_example, (("kind", "basic"),)),
    "pixmo_points_high_freq_train": pixmo.Spec("pixmo-points", points_train_records, points_train_example,
                                               (("kind", "high_frequency"),)),
    "pixmo_count_train": pixmo.Spec("pixmo-count", count_train_records, count_train_example),
    "pixmo_multi_image_qa": pixmo.Spec("Molmo2-MultiImageQA", multi_image_qa_records, multi_image_qa_example),
    "pixmo_multi_image_qa_multi_only_max5": pixmo.Spec("Molmo2-MultiImageQA", multi_image_qa_records,
                                                       multi_image_qa_example, (("max_images", 5),)),
}
# The point-count buckets of the "molmo2" SFT mixture (get_dataset's "molmo2_video_point_minmax_{lo}_{hi}").
for _lo, _hi in ((0, 5), (6, 25), (26, 60)):
    SOURCES[f"molmo2_video_point_minmax_{_lo}_{_hi}"] = pixmo.Spec(
        "Molmo2-VideoPoint", video_point_records, video_point_example, (("min_points", _lo), ("max_points", _hi)))
# Sets published as one HF split of their own name, which the official loaders read for training
# (Molmo2SynCaptionsQA.HF_SPLIT, Molmo2SynCaptionsSubtitleQA.HF_SPLIT, Molmo2HumanQA.HF_SPLIT).
TRAIN_SPLITS = {"molmo2_syn_captions_qa": "CapQA", "molmo2_syn_captions_subtitle_qa": "SubtitleQA",
                "molmo2_human_qa": "HumanQA"}
IMAGE_SETS = ("pixmo_multi_image_qa", "pixmo_multi_image_qa_multi_only_max5", "pixmo_cap_qa_as_user_qa",
              "pixmo_points_train", "pixmo_points_high_freq_train", "pixmo_count_train")


def spec(name: str) -> pixmo.Spec:
    if name not in SOURCES:
        raise KeyError(f"unknown Molmo2 source {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name]


def load(name: str, data_dir: str, split: str, *, video_dir: str | None = None, cache_dir: str | None = None,
         manifest: str | None = None, image_dir: str | None = None, check_videos: bool = False,
         **record_args) -> pixmo.PixmoSource:
    """Source `name` from `data_dir/<HF folder>`: video sets find their videos in `video_dir` and/or the
    download cache `cache_dir` (+ `manifest`), probed at load with `check_videos`; image sets read the
    image cache `image_dir`."""
    s = spec(name)
    args = {**dict(s.record_args), **record_args}
    if s.records is points_train_records and "exclude_urls" not in args:  # points-eval images are held out
        args["exclude_urls"] = pixmo.eval_image_urls(data_dir)
    media = image_dir if name in IMAGE_SETS else VideoIndex(video_dir, cache_dir, manifest, check_videos)
    records, stats = s.records(os.path.join(data_dir, s.folder), split, media, **args)
    return pixmo.PixmoSource(f"{name}[{split}]", records, example_fn(name), stats)


def example_fn(name: str, **example_args) -> Callable:
    """The picklable record -> example function of source `name`."""
    s = spec(name)
    return functools.partial(s.example, **{**dict(s.example_args), **example_args})
