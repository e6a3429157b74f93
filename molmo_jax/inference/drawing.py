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
