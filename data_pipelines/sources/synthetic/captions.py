"""Long captions of the shapes scenes, for caption pre-training on synthetic data.

The caption names every category with its count and where its instances are (a 3x3 grid of
image regions), largest groups first, e.g. "A drawing of 5 shapes. There are three orange
hexagons: at the top right, at the bottom left and at the bottom right. There is one blue
diamond on the left." Being a deterministic function of the scene, it can be learned exactly.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from data_pipelines.sources.synthetic.base import SyntheticSource
from data_pipelines.sources.synthetic.shapes import Shape, category_label, draw_scene, sample_scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty")
_REGIONS = (("at the top left", "at the top", "at the top right"),
            ("on the left", "in the center", "on the right"),
            ("at the bottom left", "at the bottom", "at the bottom right"))


def region(shape: Shape, height: int, width: int) -> str:
    """Which ninth of the image holds the shape's centre."""
    return _REGIONS[min(int(3 * shape.y / height), 2)][min(int(3 * shape.x / width), 2)]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _join(parts: List[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_scene(shapes: Sequence[Shape], height: int, width: int) -> str:
    """The caption of a scene (see module docstring)."""
    groups: Dict[tuple, List[Shape]] = defaultdict(list)
    for s in shapes:
        groups[(s.color, s.kind)].append(s)
    n = len(shapes)
    sentences = [f"A drawing of {number_word(n)} shape{'s' if n != 1 else ''}."]
    for (color, kind), members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        # reading order: top to bottom, then left to right
        members = sorted(members, key=lambda s: (min(int(3 * s.y / height), 2), s.x))
        places = [region(s, height, width) for s in members]
        if len(members) == 1:
            sentences.append(f"There is one {color} {kind} {places[0]}.")
        else:
            distinct = list(dict.fromkeys(places))
            where = f"all {places[0]}" if len(distinct) == 1 else _join(places)
            sentences.append(f"There are {number_word(len(members))} {category_label(color, kind)}: {where}.")
    return " ".join(sentences)


class CaptionSource(SyntheticSource):
    """Shapes scenes with long captions.

    Example: {"image": uint8[H, W, 3], "style": "long_caption", "caption": str,
              "metadata": {"image_hw", "example_id"}}.

    Args:
      max_count: most instances per category.
      max_categories, radius: the scene's categories and shape sizes, as ShapesSource's.
    """

    name = "captions"

    def __init__(self, num_examples: int, image_size=168, seed: int = 0, max_count: int = 4,
                 max_categories: int = 3, radius: Tuple[float, float] = (0.045, 0.085)):
        super().__init__(num_examples, image_size, seed)
        self.max_count = int(max_count)
        self.max_categories = int(max_categories)
        self.radius = (float(radius[0]), float(radius[1]))

    def _repr_fields(self):
        return dict(max_count=self.max_count, max_categories=self.max_categories, radius=self.radius)

    def generate(self, rng: np.random.Generator) -> Dict[str, Any]:
        h, w = self.image_size
        shapes = sample_scene(rng, h, w, self.max_count, self.max_categories, self.radius)
        return dict(image=draw_scene(rng, h, w, shapes), style="long_caption",
                    caption=describe_scene(shapes, h, w), metadata=dict(image_hw=(h, w)))
