"""Find the points in an answer and draw them, numbered and labelled, on the image (PIL)."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines import molmo2_points
from molmo_jax.evaluation.pointing import extract_points

_TAG = re.compile(r"<(points?)\b([^>]*)>([\s\S]*?)</\1>")
# Molmo2's html-v2 tags: the opening tag (whose coords attribute molmo2_points reads), then the
# label up to the closing tag (none for a self-closing tag).
_HTML_V2_TAG = re.compile(r"(<(points|tracks)\b[^>]*>)(?:([^<]*)</\2>)?")
_ALT = re.compile(r'alt="([^"]*)"')
_COLORS = ("#ff3b30", "#34c759", "#007aff", "#ff9500", "#af52de", "#00c7be", "#ffcc00", "#ff2d55")


@dataclasses.dataclass
class PointGroup:
    label: str
    points: list[tuple[float, float]]  # (x, y) in percent of the image width / height


def find_points(answer: str) -> list[PointGroup]:
    """Every `<point ...>label</point>` / `<points ...>label</points>` tag of an answer, in order;
    an answer without tags but with "(x, y)" / Click(x, y) coordinates gives one unlabelled group.
    Coordinates are parsed exactly as the pointing evaluation parses them (values > 100 dropped)."""
    groups = []
    for match in _TAG.finditer(answer):
        attributes, text = match.group(2), match.group(3).strip()
        alt = _ALT.search(attributes)
        points = [tuple(p.tolist()) for p in extract_points(attributes, 100, 100)]
        groups.append(PointGroup(text or (alt.group(1) if alt else ""), points))
    if not groups:
        points = [tuple(p.tolist()) for p in extract_points(answer, 100, 100)]
        if points:
            groups.append(PointGroup("", points))
    return groups


@dataclasses.dataclass
class VideoPointGroup(PointGroup):
    """Points of a video answer, each at a time: times[i] (seconds) is points[i]'s."""
    times: list[float] = dataclasses.field(default_factory=list)


def find_molmo2_points(answer: str, video: bool = False) -> list[PointGroup]:
    """The points of a Molmo2 answer: its html-v2 tags (`<points coords=...>label</points>`,
    `<tracks ...>`, data_pipelines/molmo2_points.py) if it has any, else the v1 formats
    (`find_points`). Coordinates are in percent of the image (the per-mille values / 10; values
    above 1000 dropped, as the official extraction drops them).

    Image answer: one PointGroup per tag, with every point of it, whatever image the coords name
    (as the official `extract_points`). Video answer (`video`): a `<points>` tag is one
    VideoPointGroup, each point at its frame's time; a `<tracks>` tag is one VideoPointGroup per
    object ("label ID", ids in order), at most one point per frame (the official extract_tracks).
    A tag whose coords the official parser would fail on (a key like "1..5") is skipped."""
    groups, found = [], False
    for match in _HTML_V2_TAG.finditer(answer):
        opening, kind = match.group(1), match.group(2)
        if not molmo2_points.COORD_REGEX.search(opening):
            continue
        found = True
        alt = _ALT.search(opening)
        label = (match.group(3) or "").strip() or (alt.group(1) if alt else "")
        try:
            groups += _html_v2_groups(opening, kind, label, video)
        except ValueError:
            continue
    return groups if found else find_points(answer)


def _html_v2_groups(tag: str, kind: str, label: str, video: bool) -> list[PointGroup]:
    """The groups of one html-v2 opening tag (see find_molmo2_points); coordinates read as
    molmo2_points reads them on a 100 x 100 image, rounded to 0.1 % to undo the float noise of
    x / 1000 * 100."""
    pct = lambda x, y: (round(x, 1), round(y, 1))
    if not video:
        return [PointGroup(label, [pct(x, y) for x, y in molmo2_points.extract_points(tag, 100, 100)])]
    if kind == "points":
        rows = molmo2_points.extract_video_points(tag, 100, 100)
        return [VideoPointGroup(label, [pct(x, y) for _, x, y in rows], [t for t, _, _ in rows])]
    by_object = {}
    for frame in molmo2_points.extract_tracks(tag, 100, 100, video_fps=1):
        for obj, info in frame["points"].items():
            by_object.setdefault(obj, []).append((frame["time"], pct(*info["point"])))
    return [VideoPointGroup(f"{label} {obj}".strip(), [p for _, p in rows], [t for t, _ in rows])
            for obj, rows in sorted(by_object.items(), key=lambda item: int(item[0]))]


def frame_of_times(times: Sequence[float], timestamps: Sequence[float]) -> np.ndarray:
    """int[len(times)]: for each time (seconds), the index of the nearest of the sampled frames'
    `timestamps`, or -1 when it is further than half the frames' median spacing (at least 0.05 s,
    the answer's rounding to 0.1 s) from every frame: a time inside the sampled clip lands on
    one frame, a time outside it on none."""
    timestamps = np.asarray(timestamps, np.float64)
    times = np.asarray(times, np.float64).reshape(-1)
    if len(timestamps) == 0 or len(times) == 0:
        return np.full(len(times), -1, np.int64)
    spacing = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 0.0
    distance = np.abs(times[:, None] - timestamps[None, :])
    nearest = distance.argmin(axis=1)
    nearest[distance.min(axis=1) > max(spacing / 2, 0.05) + 1e-6] = -1
    return nearest


def draw_points(image: Image.Image | np.ndarray, groups: list[PointGroup], radius: int | None = None) -> Image.Image:
    """A copy of `image` with each point drawn as a numbered dot, one colour per group, and the
    group's label written next to its first point."""
    image = Image.fromarray(np.asarray(image)) if isinstance(image, np.ndarray) else image
    canvas = image.convert("RGB").copy()
    w, h = canvas.size
    radius = radius or max(3, round(min(w, h) / 80))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(canvas)
    for index, group in enumerate(groups):
        color = _COLORS[index % len(_COLORS)]
        for number, (x, y) in enumerate(group.points, 1):
            cx, cy = x / 100 * w, y / 100 * h
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color, outline="white",
                         width=max(1, radius // 3))
            if len(group.points) > 1:
                draw.text((cx + radius + 1, cy - radius - 1), str(number), fill="white", font=font,
                          stroke_width=2, stroke_fill="black")
        if group.label and group.points:
            x, y = group.points[0]
            draw.text((x / 100 * w + radius + 1, y / 100 * h + radius), group.label, fill=color, font=font,
                      stroke_width=2, stroke_fill="black")
    return canvas


def draw_frames(frames, groups: list[PointGroup], timestamps: Optional[Sequence[float]] = None) -> list[Image.Image]:
    """Each of `frames` (uint8[H, W, 3] or PIL) with `groups` drawn on it. A PointGroup carries no
    time (the v1 formats): every frame shows it. A VideoPointGroup's points go each on the frame
    its time names (`frame_of_times` against `timestamps`, the frames' seconds; none without
    them). Every group keeps its colour on every frame (its place in `groups`)."""
    frames = list(frames)
    on_frame = {i: frame_of_times(g.times, timestamps if timestamps is not None else [])
                for i, g in enumerate(groups) if isinstance(g, VideoPointGroup)}
    drawn = []
    for k, frame in enumerate(frames):
        shown = [PointGroup(g.label, [p for p, f in zip(g.points, on_frame[i]) if f == k]) if i in on_frame else g
                 for i, g in enumerate(groups)]
        drawn.append(draw_points(frame, shown))
    return drawn


def write_gif(images: list[Image.Image], path: str, seconds_per_frame: float = 0.5) -> str:
    """An animated GIF of `images` that loops forever; returns `path`."""
    first, *rest = [image.convert("RGB") for image in images]
    first.save(path, save_all=True, append_images=rest, duration=max(20, round(seconds_per_frame * 1000)), loop=0)
    return path


def contact_sheet(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """`images` (resized to the first one's size) on a grid of `columns`, each captioned below."""
    w, h = images[0].size
    caption_h = 14
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * (h + caption_h)), "black")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * w, (k // columns) * (h + caption_h)
        sheet.paste(image.convert("RGB").resize((w, h)), (x, y))
        draw.text((x + 2, y + h + 1), caption, fill="white", font=font)
    return sheet
