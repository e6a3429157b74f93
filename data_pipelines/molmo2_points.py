"""Molmo2's point and track answer text ("html-v2"): writing it for training and reading it back.

Follows allenai/molmo2 `olmo/preprocessing/point_formatter.py` (`UnifiedPointFormatter`, built by
`build_for_format("html-v2")`: image_sep ";", coordinate_scale "1000", sort_order "xy",
sort_by_object_id, sort_tracking, point_str_format "coord_str") as `launch_scripts/sft.py` uses it
through `olmo/preprocessing/data_formatter.py`. A pointing answer is one tag

    <points coords="COORDS">label</points>              image / multi-image / video points
    <points alt="ALT" coords="COORDS">label</points>    with alt text (inline point annotations)
    <tracks coords="COORDS">label</tracks>              video tracks

wrapped by the mode ("point_then_count": "Counting the TAG shows a total of N.", see
`answer_text`). COORDS is frames joined by ";", each frame "KEY ID X Y ID X Y ...":

    image          "1 1 100 050 2 300 400"                 key 1 (the image), ids 1..n
    multi-image    "1 1 100 100 2 500 500;3 3 500 000"      key = 1-based image index, ids run on
    video points   "0.5 1 100 100 2 500 500;2.0 3 200 300"  key = seconds, ids run on
    video tracks   "0.5 1 250 550 2 700 100;1.0 1 200 500"  key = seconds, id = the object

X and Y are per-mille of the image width / height, integers written "%03d" (0..1000); within a
frame points are sorted by (x, y) after rounding (tracks: by object id, objects numbered 1.. in
the order they first appear, frame by frame, each frame sorted by (x, y)).

Timestamps: the formatter's `format_output_timestamp` is the DataFormatter's method in training
(`DataFormatter.__post_init__` passes it), i.e. `str(round(t, 1))` for the default
output_timestamp_mode "seconds" (`sft_timestamp`), not the formatter's own default "%0.1f"
(`default_timestamp`); they differ for integer times ("2" vs "2.0").

Reading (`extract_*`) is the official extraction: coordinates are found in any `<points ...>` /
`<tracks ...>` tag's coords attribute, scaled to pixels as x / 1000 * width, and points outside
the image dropped.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from datetime import datetime
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

IMAGE_SEP = ";"
# The official regexes (UnifiedPointFormatter.__post_init__, coord_str and scale "1000").
# The coords attribute must be the tag's last one (it is, as written): `>` or `/>` follows it.
COORD_REGEX = re.compile(r"<(?:points|tracks).*? coords=\"([0-9\t:;, .]+)\"/?>")
# Reading accepts every separator the formatter may be built with, not only ";".
FRAME_REGEX = re.compile(r"(?:^|\t|:|,|;)([0-9\.]+) ([0-9\. ]+)")
POINT_REGEX = re.compile(r"([0-9]+) ([0-9]{3,4}) ([0-9]{3,4})")
# What the official answers say instead of a tag.
NO_POINTS = "There are none."
NO_TRACKS = "No tracks available."

Scale = Union[float, Sequence[float]]  # a number, or [width, height]: the point units of the image


# ---------------------------------------------------------------------------------------------
# Timestamps


def parse_timestamp(value: Union[str, float]) -> Union[str, float]:
    """Seconds from a number, "SS.F", "MM:SS.FF" or "HH:MM:SS.FF" (official `olmo.util.parse_timestamp`);
    a string with ":" that neither layout reads comes back unchanged (logged)."""
    if not isinstance(value, str):
        return value
    if ":" not in value:
        return float(value)
    for layout in ("%M:%S.%f", "%H:%M:%S.%f"):
        try:
            t = datetime.strptime(value, layout)
        except ValueError:
            continue
        return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1000000
    logging.warning(f"Unable to parse timestamp: {value}")
    return value


def default_timestamp(seconds: float) -> str:
    """The formatter's own default (official `DefaultTimestampFormatter`): "%0.1f"."""
    return "%0.1f" % seconds


def sft_timestamp(seconds: Union[str, float]) -> str:
    """What training wrote (official `DataFormatter.format_output_timestamp`, output_timestamp_mode
    "seconds", seconds_decimal_places 1): `str(round(t, 1))`, so an int stays an int ("2")."""
    seconds = parse_timestamp(seconds)
    return seconds if isinstance(seconds, str) else str(round(seconds, 1))


# ---------------------------------------------------------------------------------------------
# Writing


def scale_point(point: Sequence[float], scale: Scale) -> Tuple[int, int]:
    """(x, y) in `scale` units -> per-mille integers, Python `round` (half to even).

    Official quirk kept: the clamp to [0, 1] applies only when x is outside it and y inside
    (`not 0 <= x <= 1.0 and 0 <= y <= 1.0` parses as `(not ...) and ...`); a y outside [0, 1]
    is written unclamped (e.g. 1200), and extraction then drops it."""
    x_scale, y_scale = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    x, y = float(point[0]) / x_scale, float(point[1]) / y_scale
    if not 0 <= x <= 1.0 and 0 <= y <= 1.0:
        logging.warning(f"Out of bound points {point}")
        x, y = max(0, min(x, 1.0)), max(0, min(y, 1.0))
    return round(1000 * float(x)), round(1000 * float(y))


def points_text(ids: Sequence[int], scaled: Sequence[Tuple[int, int]]) -> str:
    """"ID X Y ID X Y ...": already scaled and sorted points, coordinates "%03d"."""
    return " ".join(f"{i} {'%03d' % x} {'%03d' % y}" for i, (x, y) in zip(ids, scaled))


def image_coordinates(points, scale: Scale, first_id: int = 1, sort_order: str = "xy",
                      rng: Optional[np.random.Generator] = None) -> str:
    """One image's "ID X Y ..." (no key): scaled, sorted by (x, y) after rounding (so the order
    matches the written values) or shuffled (sort_order "random", `rng.permutation`), numbered
    from `first_id`."""
    scaled = [scale_point(p, scale) for p in points]
    if sort_order == "xy":
        order = sorted(range(len(scaled)), key=lambda i: scaled[i])
    elif sort_order == "random":
        order = rng.permutation(len(scaled))
    else:
        raise NotImplementedError(sort_order)
    scaled = [scaled[i] for i in order]
    return points_text(range(first_id, first_id + len(scaled)), scaled)


def frames_coordinates(keys: Sequence[str], frame_points, scales: Sequence[Scale], sort_order: str = "xy",
                       rng: Optional[np.random.Generator] = None) -> str:
    """"KEY ID X Y ...;KEY ..." for several images / frames, ids running on across them.

    Official quirk kept: a frame without points still writes its key ("1.0 " between the ";")."""
    frames, next_id = [], 1
    for key, points, scale in zip(keys, frame_points, scales):
        frames.append(f"{key} {image_coordinates(points, scale, next_id, sort_order, rng)}")
        next_id += len(points)
    return IMAGE_SEP.join(frames)


def point_tag(label: str, alt_text: Optional[str], coords: str, track: bool = False) -> str:
    """`<points [alt="ALT"] coords="COORDS">label</points>` (`<tracks ...>` for tracks); "" for
    empty coords. Neither label nor alt is escaped; alt is written whenever given, even when it
    equals the label."""
    if not coords:
        return ""
    name = "tracks" if track else "points"
    alt = f' alt="{alt_text}"' if alt_text is not None else ""
    return f'<{name}{alt} coords="{coords}">{label}</{name}>'


def answer_text(tag: str, count: Optional[int], mode: Optional[str] = "point") -> str:
    """The answer around a tag (official `build_point_output`): count 0 -> "There are none." (in
    every mode); "point_then_count" / "point_count" -> "Counting the TAG shows a total of N.";
    "count_then_point" / "count_point" -> "There are N TAG."; "count" -> "N"; "point" /
    "pointing" / None -> the tag alone."""
    if count == 0:
        return NO_POINTS
    if mode in ("point_then_count", "point_count"):
        return f"Counting the {tag} shows a total of {count}."
    if mode in ("count_then_point", "count_point"):
        return f"There are {count} {tag}."
    if mode == "count":
        return str(count)
    if mode is None or mode in ("point", "pointing"):
        return tag
    raise NotImplementedError(mode)


def format_image_points(points, scale: Scale, label: str, alt_text: Optional[str] = None,
                        mode: Optional[str] = "point_then_count", sort_order: str = "xy",
                        rng: Optional[np.random.Generator] = None) -> str:
    """Points [(x, y), ...] of one image, in `scale` units (pixels with scale [w, h]; percent with
    100) -> the answer. Key "1", as the first image of a multi-image answer.

    How training calls it: pointing sets (`format_points`) with mode = the example's style
    ("pointing", "point_count", ...; "cosyn_point" -> "point"), scale [w, h] or [s, s] for
    `point_scale`; inline annotations (`format_annotated_text`) with scale 100, alt_text and mode
    "point"."""
    coords = "1 " + image_coordinates(points, scale, 1, sort_order, rng)
    return answer_text(point_tag(label, alt_text, coords), len(points), mode)


def format_multi_image_points(image_indices: Sequence[int], points, scales: Sequence[Scale], label: str,
                              alt_text: Optional[str] = None, mode: Optional[str] = "point_then_count",
                              sort_order: str = "xy", rng: Optional[np.random.Generator] = None) -> str:
    """Points of several images: image_indices (1-based, as training passes them), points[i] the
    (x, y) list of image i, scales[i] its scale -> the answer. Keys are `str(index)`."""
    assert len(scales) == len(points)
    coords = frames_coordinates([str(i) for i in image_indices], points, scales, sort_order, rng)
    return answer_text(point_tag(label, alt_text, coords), sum(len(p) for p in points), mode)


def format_video_points(timestamps: Sequence[float], points, scale: Scale, label: str, alt_text: Optional[str] = None,
                        mode: Optional[str] = "point_then_count",
                        format_timestamp: Callable[[float], str] = sft_timestamp, sort_order: str = "xy",
                        rng: Optional[np.random.Generator] = None) -> str:
    """Points per frame: timestamps[i] (seconds) and points[i] its (x, y) list, one scale for all
    -> the answer. Training calls it with scale 100 (points in percent) and mode = the style
    after "video_" (`format_video_points`), and mode None for the query point of single-point
    tracking."""
    keys = [format_timestamp(t) for t in timestamps]
    coords = frames_coordinates(keys, points, [scale] * len(points), sort_order, rng)
    return answer_text(point_tag(label, alt_text, coords), sum(len(p) for p in points), mode)


PointTrack = Dict  # {"time": seconds, "frame": int, "points": {object id: {"point": [x, y], "occluded": bool}}}


def track_coordinates(point_tracks: Sequence[PointTrack], scale: Scale,
                      format_timestamp: Callable[[float], str] = sft_timestamp) -> str:
    """"T ID X Y ...;T ..." of tracks (official `build_video_track_coordinates`, skip_occluded):
    frames in time order (stable), occluded points and frames left empty skipped, each frame's
    points sorted by their scaled (x, y), objects renumbered 1.. in the order they first appear
    so sorted, then each frame sorted by the new id (stable)."""
    frames, new_ids = [], {}
    for track in sorted(point_tracks, key=lambda t: t["time"]):
        points = [[obj, scale_point(info["point"], scale)] for obj, info in track["points"].items()
                  if not info.get("occluded", False)]
        if not points:
            continue
        points.sort(key=lambda p: p[1])
        for p in points:
            p[0] = new_ids.setdefault(p[0], len(new_ids)) + 1
        points.sort(key=lambda p: p[0])
        time = format_timestamp(parse_timestamp(track["time"]))
        frames.append(f"{time} {points_text([p[0] for p in points], [p[1] for p in points])}")
    return IMAGE_SEP.join(frames)


def start_end_only(point_tracks: Sequence[PointTrack]) -> List[PointTrack]:
    """Each object at its first and last appearance only (official `_filter_all_but_start_end`):
    first / last by position in the list, not by time (an official quirk, kept); frames with the
    same time are merged, frames left empty dropped."""
    seen = defaultdict(list)
    for i, track in enumerate(point_tracks):
        for obj in track["points"]:
            seen[obj].append(i)
    by_time = {}
    for i, track in enumerate(point_tracks):
        kept = {obj: info for obj, info in track["points"].items() if i in (seen[obj][0], seen[obj][-1])}
        if kept:
            by_time.setdefault(track["time"], dict(track, points={}))["points"].update(kept)
    return list(by_time.values())


def after_initial_points(point_tracks: Sequence[PointTrack], initial_points: Sequence[Dict]) -> List[PointTrack]:
    """Frames where some initial point's object appears after that point's time (official
    `_filter_for_initial_points`, single-point tracking). Official quirk kept: the frame is kept
    whole, all its objects and original ids, not only the initial points' objects."""
    starts = {start["id"]: start for start in initial_points}  # an id given twice: its last entry
    kept = []
    for track in point_tracks:
        if not track["points"]:
            continue
        if any(obj in track["points"] and track["time"] > start["time"] for obj, start in starts.items()):
            kept.append(dict(track))
    return kept


def format_video_tracks(point_tracks: Sequence[PointTrack], scale: Scale, label: str, alt_text: Optional[str] = None,
                        start_end: bool = False, from_initial_points: Optional[Sequence[Dict]] = None,
                        format_timestamp: Callable[[float], str] = sft_timestamp) -> str:
    """Tracks (a list of frames {"time", "frame", "points": {object id: {"point", "occluded"}}}, in
    `scale` units) -> the `<tracks>` tag alone (mode "point": tracking answers never count).

    Training's styles: video_point_track_per_frame (plain), video_point_ground_start_end
    (start_end, official start_end_only=True), video_single_point_track_per_frame
    (from_initial_points; official single_point_track=True is ignored by this formatter).
    No frames at all -> "No tracks available."; frames but no visible point -> "" (official
    quirk: the empty tag goes through build_point_output with count None)."""
    if len(point_tracks) == 0:
        return NO_TRACKS
    if start_end:
        point_tracks = start_end_only(point_tracks)
    if from_initial_points is not None:
        point_tracks = after_initial_points(point_tracks, from_initial_points)
    coords = track_coordinates(point_tracks, scale, format_timestamp)
    return answer_text(point_tag(label, alt_text, coords, track=True), None, "point")


# ---------------------------------------------------------------------------------------------
# Reading


def _frame_points(text: str, width: float, height: float):
    """(id str, x, y) in pixels for each "ID X Y" of one frame's text inside the image."""
    for match in POINT_REGEX.finditer(text):
        x, y = float(match.group(2)) / 1000 * width, float(match.group(3)) / 1000 * height
        if 0 <= x <= width and 0 <= y <= height:
            yield match.group(1), x, y


def extract_multi_image_points(text: str, image_w, image_h, extract_ids: bool = False) -> list:
    """Every point of every coords attribute: (key, x, y) or, with extract_ids, (key, id, x, y);
    id is the text's string ("3"). One width / height for all: key is a float (seconds, or the
    image number as 1.0). Lists of widths / heights (one per image): key is an int and image
    key - 1's size is used.

    Official quirks kept: a key that is no number ("1..5", FRAME_REGEX allows it) raises
    ValueError; with lists, so does a key that is no int ("0.5"), key 0 uses the last image's
    size and a key past the list raises IndexError."""
    per_image = isinstance(image_w, (list, tuple)) and isinstance(image_h, (list, tuple))
    if per_image:
        assert len(image_w) == len(image_h)
    out = []
    for coords in COORD_REGEX.finditer(text):
        for frame in FRAME_REGEX.finditer(coords.group(1)):
            key = int(frame.group(1)) if per_image else float(frame.group(1))
            w, h = (image_w[key - 1], image_h[key - 1]) if per_image else (image_w, image_h)
            for point_id, x, y in _frame_points(frame.group(2), w, h):
                out.append((key, point_id, x, y) if extract_ids else (key, x, y))
    return out


def extract_points(text: str, image_w: float, image_h: float) -> List[Tuple[float, float]]:
    """(x, y) pixels of every point, whatever image / frame it names (official `extract_points`)."""
    return [(x, y) for _, x, y in extract_multi_image_points(text, image_w, image_h)]


def extract_video_points(text: str, width: float, height: float) -> List[Tuple[float, float, float]]:
    """(seconds, x, y) of every point: how the official video pointing evals read answers
    (`extract_multi_image_points` with the video's size)."""
    return extract_multi_image_points(text, width, height)


def extract_tracks(text: str, width: float, height: float, video_fps: float) -> List[PointTrack]:
    """Frames in time order, [{"time": seconds, "frame": round(time * video_fps) (half to even),
    "points": {id str: {"point": [x, y]}}}]; an object named twice in one frame keeps its first
    point (the official "formatting error" rule)."""
    by_time = defaultdict(list)
    for t, point_id, x, y in extract_multi_image_points(text, width, height, extract_ids=True):
        by_time[t].append((point_id, x, y))
    out = []
    for t in sorted(by_time):
        points = {}
        for point_id, x, y in by_time[t]:
            points.setdefault(str(point_id), dict(point=[x, y]))
        out.append(dict(time=t, frame=round(t * video_fps), points=points))
    return out


# ---------------------------------------------------------------------------------------------
# Training examples: prompt and answer of a pointing message (official DataFormatter.get_user_prompt
# under launch_scripts/sft.py: prompt_templates "uber_model_v2", pointing_format "html-v2")

IMAGE_POINT_STYLES = ("pointing", "point_count", "cosyn_point")
VIDEO_POINT_STYLES = ("video_point", "video_point_count", "video_count", "video_count_point")


def _template(style: str, label: str, rng, debug: bool = False) -> str:
    """The official `apply_keyword_prompt`: template `rng.randint(0, n)` of the style (the first in
    debug mode), `{label}` filled in (our wording, prompt_templates.MOLMO2_TEMPLATES)."""
    from data_pipelines.prompt_templates import MOLMO2_TEMPLATES
    templates = MOLMO2_TEMPLATES[style]
    template = templates[0] if debug or rng is None else templates[rng.randint(0, len(templates))]
    return template.replace("{label}", label)


def image_point_scale(message: Dict, image_hw: Optional[Tuple[int, int]]) -> List[float]:
    """The official `_get_scale`: [s, s] for point_scale s, else the image's [w, h] (pixels), else the
    message's width / height."""
    if "point_scale" in message:
        return [message["point_scale"]] * 2
    if image_hw is not None:
        return [image_hw[1], image_hw[0]]
    w, h = message.get("width", message.get("w")), message.get("height", message.get("h"))
    if w is None or h is None:
        raise ValueError("pixel points need the image size (no point_scale, image or width / height)")
    return [w, h]


def image_point_answer(message: Dict, image_hw: Optional[Tuple[int, int]]) -> Optional[str]:
    """The official `format_points`: None without "points"; no points -> "There are none." (styles
    pointing / point_count); points clipped to [0, scale] with clip_points (PixMo-Points); label
    lower-cased, else the question; mode = the style ("cosyn_point" -> "point")."""
    if "points" not in message:
        return None
    points, style = np.asarray(message["points"], np.float64).reshape(-1, 2), message["style"]
    label = message["label"].lower() if "label" in message else message["question"]
    if len(points) == 0:
        if style in ("pointing", "point_count"):
            return NO_POINTS
        raise NotImplementedError(f"no points in a {style!r} message")
    scale = image_point_scale(message, image_hw)
    if message.get("clip_points"):
        points = np.minimum(np.maximum(points, 0), np.asarray(scale, np.float64)[None, :])
    return format_image_points(points, scale, label, mode="point" if style == "cosyn_point" else style)


def image_point_text(message: Dict, image_hw: Optional[Tuple[int, int]], rng, debug: bool = False
                     ) -> Tuple[str, Optional[str]]:
    """(prompt, answer) of an image pointing / counting message: the question if it has one, else a
    template of its style with the lower-cased label (or label_cased as is)."""
    if "question" in message:
        prompt = message["question"]
    else:
        label = message["label"].lower() if "label" in message else message["label_cased"]
        prompt = _template(message["style"], label, rng, debug)
    return prompt, image_point_answer(message, image_hw)


def video_point_answer(message: Dict) -> Optional[str]:
    """The official `format_video_points`: None without points / timestamps; count 0 -> "There are
    none."; else the points of each annotated time, in percent (scale 100), keyed by the message's
    own timestamps (the annotation's, relative to the clip: not the sampled frames' times), label as
    is, mode = the style after "video_"."""
    if "points" not in message or "timestamps" not in message:
        return None
    if message.get("count") == 0:
        return NO_POINTS
    if message.get("unanswerable"):
        return message["explanation"] or f"Sorry, I can't count {message['label']}."
    points = [[(p["x"], p["y"]) if isinstance(p, dict) else tuple(p) for p in frame] for frame in message["points"]]
    return format_video_points(message["timestamps"], points, 100, message["label"], mode=message["style"][6:])


def video_point_text(message: Dict, rng, debug: bool = False) -> Tuple[str, Optional[str]]:
    """(prompt, answer) of a video pointing / counting message: the question if it has one, else a
    template of its style with the label."""
    prompt = message["question"] if "question" in message else _template(message["style"], message["label"], rng, debug)
    return prompt, video_point_answer(message)
