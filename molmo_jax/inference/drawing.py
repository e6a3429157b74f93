"""Find the points in an answer and draw them, numbered and labelled, on the image (PIL)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from molmo_jax.evaluation.pointing import extract_points

_TAG = re.compile(r"<(points?)\b([^>]*)>([\s\S]*?)</\1>")
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


def draw_frames(frames, groups: list[PointGroup]) -> list[Image.Image]:
    """Each of `frames` (uint8[H, W, 3] or PIL) with `groups` drawn on it. The points carry no time
    (the v1 formats), so every sampled frame shows them all."""
    return [draw_points(frame, groups) for frame in frames]


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
