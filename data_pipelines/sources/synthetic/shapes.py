"""Scenes of coloured shapes for pointing and counting, with exact masks.

A scene holds 1-3 categories ("red circles", "blue stars", ...) with 1..max_count instances each,
placed without overlap on a light background. Every instance has a centre point (which lies
inside its shape) and a boolean mask, so the pointing metric (points matched inside GT masks)
and the counting metric (exact count) can be computed exactly. Questions ask for categories in
the scene, for shape-only or colour-only groups, and for categories that are absent (count 0,
answer "There are none.").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.sources.synthetic.base import ImageSize, SyntheticSource, paint_background

COLORS = {
    "red": (215, 35, 35), "green": (35, 160, 60), "blue": (40, 80, 220), "yellow": (245, 200, 20),
    "orange": (245, 125, 20), "purple": (135, 55, 180), "black": (25, 25, 25), "pink": (240, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
PLURAL = {s: s + "s" for s in SHAPES}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One instance: centre (x, y) and radius in pixels, rotation in degrees."""
    color: str
    kind: str
    x: float
    y: float
    radius: float
    rotation: float

    def polygon(self, scale: float = 1.0) -> List[Tuple[float, float]]:
        """Outline vertices (circles: a 48-gon), in pixels times `scale`."""
        sides = {"circle": 48, "square": 4, "triangle": 3, "diamond": 4, "hexagon": 6, "star": 10}[self.kind]
        offset = {"square": 45.0, "diamond": 0.0}.get(self.kind, 0.0) + self.rotation
        angles = np.deg2rad(offset + 360.0 * np.arange(sides) / sides)
        radii = np.full(sides, self.radius)
        if self.kind == "star":
            radii[1::2] *= 0.45
        if self.kind == "diamond":
            radii[1::2] *= 0.65       # narrower than tall, so it differs from a rotated square
        xs = (self.x + radii * np.sin(angles)) * scale
        ys = (self.y - radii * np.cos(angles)) * scale
        return list(zip(xs.tolist(), ys.tolist()))


def category_label(color: str | None, kind: str | None) -> str:
    """Plural query label: "red circles", "circles" (any colour) or "red shapes" (any kind)."""
    return f"{color + ' ' if color else ''}{PLURAL[kind] if kind else 'shapes'}"


def matches(shape: Shape, color: str | None, kind: str | None) -> bool:
    return (color is None or shape.color == color) and (kind is None or shape.kind == kind)


def sample_scene(rng: np.random.Generator, height: int, width: int, max_count: int,
                 max_categories: int = 3, radius: Tuple[float, float] = (0.045, 0.085)) -> List[Shape]:
    """Non-overlapping shapes of 1..max_categories categories, each 1..max_count instances, of
    radius `radius` (min, max) times the shorter image side (at least 5 px).

    Instances that do not fit after a bounded number of tries are dropped, so counts always
    describe what was drawn.
    """
    n_cat = int(rng.integers(1, max_categories + 1))
    colors = rng.choice(list(COLORS), size=n_cat, replace=False)
    kinds = rng.choice(SHAPES, size=n_cat, replace=True)
    side = min(height, width)
    shapes: List[Shape] = []
    for color, kind in zip(colors, kinds):
        for _ in range(int(rng.integers(1, max_count + 1))):
            for _attempt in range(30):
                r = max(side * rng.uniform(*radius), 5.0)
                x = rng.uniform(r + 1, width - r - 1)
                y = rng.uniform(r + 1, height - r - 1)
                if all((x - s.x) ** 2 + (y - s.y) ** 2 > (r + s.radius + 2) ** 2 for s in shapes):
                    shapes.append(Shape(str(color), str(kind), float(x), float(y), float(r),
                                        float(rng.uniform(-30, 30))))
                    break
    return shapes


def draw_scene(rng: np.random.Generator, height: int, width: int, shapes: Sequence[Shape]) -> np.ndarray:
    """Shapes with a thin dark outline on a light background, anti-aliased.  uint8[H, W, 3]."""
    k = 4 if min(height, width) <= 256 else 2
    canvas = Image.fromarray(paint_background(rng, height, width)).resize((width * k, height * k), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for s in shapes:
        draw.polygon(s.polygon(k), fill=COLORS[s.color], outline=(20, 20, 20), width=k)
    return np.asarray(canvas.reduce(k))


def shape_masks(height: int, width: int, shapes: Sequence[Shape]) -> np.ndarray:
    """Per-instance masks at image resolution.  bool[N, H, W]."""
    masks = np.zeros((len(shapes), height, width), dtype=bool)
    for i, s in enumerate(shapes):
        img = Image.new("L", (width, height), 0)
        ImageDraw.Draw(img).polygon(s.polygon(), fill=1)
        masks[i] = np.asarray(img, dtype=bool)
    return masks


def sample_query(rng: np.random.Generator, shapes: Sequence[Shape],
                 absent_rate: float) -> Tuple[str | None, str | None]:
    """A (colour, kind) query; None means "any". Absent categories come with `absent_rate`."""
    if rng.random() < absent_rate:
        present = {(s.color, s.kind) for s in shapes}
        while True:
            color, kind = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            if (color, kind) not in present:
                return color, kind
    target = shapes[int(rng.integers(len(shapes)))]
    mode = rng.choice(["both", "kind", "color"], p=[0.7, 0.15, 0.15])
    return (None if mode == "kind" else target.color), (None if mode == "color" else target.kind)


def annotation(style: str, shapes: Sequence[Shape], color: str | None, kind: str | None) -> Dict[str, Any]:
    """One pointing / counting annotation in the source shape: label + points in pixels."""
    hits = [s for s in shapes if matches(s, color, kind)]
    points = np.array([[s.x, s.y] for s in hits], dtype=np.float32).reshape(-1, 2)
    return dict(style=style, label=category_label(color, kind), points=points)


class ShapesSource(SyntheticSource):
    """Coloured shapes for pointing and counting.

    task="pointing" / "counting": one question per image; metadata for the evaluators:
      {"label", "points": float32[N, 2] (x, y) pixels, "masks": bool[N, H, W], "count": N}.
    task="mixed": several annotations of one image in `message_list` (both styles, some "not
      present"), the PixMo-Points training form that packing turns into subsegments.

    Args:
      max_count: most instances per category (counts run 0..max_count).
      absent_rate: fraction of questions about a category that is not in the image.
      annotations: (min, max) annotations per image for task="mixed".
      max_categories: most (colour, kind) categories per scene.
      radius: (min, max) shape radius as a fraction of the shorter image side.
    """

    name = "shapes"
    STYLES = {"pointing": "pointing", "counting": "point_count"}

    def __init__(self, num_examples: int, image_size: ImageSize = 168, seed: int = 0, task: str = "mixed",
                 max_count: int = 6, absent_rate: float = 0.15, annotations: Tuple[int, int] = (2, 4),
                 max_categories: int = 3, radius: Tuple[float, float] = (0.045, 0.085)):
        super().__init__(num_examples, image_size, seed)
        if task not in ("pointing", "counting", "mixed"):
            raise ValueError(f"ShapesSource: task must be pointing, counting or mixed, got {task!r}")
        if not 1 <= max_count <= 20:
            raise ValueError(f"ShapesSource: max_count must be in 1..20, got {max_count}")
        if not 1 <= max_categories <= len(COLORS):
            raise ValueError(f"ShapesSource: max_categories must be in 1..{len(COLORS)}, got {max_categories}")
        if not 0 < radius[0] <= radius[1] < 0.5:
            raise ValueError(f"ShapesSource: radius must be (min, max) fractions with 0 < min <= max < 0.5, "
                             f"got {tuple(radius)}")
        self.task = task
        self.max_count = int(max_count)
        self.max_categories = int(max_categories)
        self.radius = (float(radius[0]), float(radius[1]))
        self.absent_rate = float(absent_rate)
        self.annotations = (int(annotations[0]), int(annotations[1]))

    def _repr_fields(self):
        return dict(task=self.task, max_count=self.max_count, absent_rate=self.absent_rate,
                    annotations=self.annotations, max_categories=self.max_categories, radius=self.radius)

    def generate(self, rng: np.random.Generator) -> Dict[str, Any]:
        h, w = self.image_size
        shapes = sample_scene(rng, h, w, self.max_count, self.max_categories, self.radius)
        image = draw_scene(rng, h, w, shapes)
        if self.task == "mixed":
            n = int(rng.integers(self.annotations[0], self.annotations[1] + 1))
            message_list, asked = [], set()
            for _ in range(4 * n):       # distinct questions; small scenes may offer fewer than n
                style = str(rng.choice(list(self.STYLES.values())))
                query = sample_query(rng, shapes, self.absent_rate)
                if (style, query) not in asked:
                    asked.add((style, query))
                    message_list.append(annotation(style, shapes, *query))
                if len(message_list) == n:
                    break
            return dict(image=image, message_list=message_list, metadata=dict(image_hw=(h, w)))
        color, kind = sample_query(rng, shapes, self.absent_rate)
        example = annotation(self.STYLES[self.task], shapes, color, kind)
        hits = [s for s in shapes if matches(s, color, kind)]
        example["image"] = image
        example["metadata"] = dict(label=example["label"], points=example["points"], masks=shape_masks(h, w, hits),
                                   count=len(hits), image_hw=(h, w))
        return example
