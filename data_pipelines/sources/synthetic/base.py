"""The random-access base class and the backgrounds shared by the synthetic generators.

A synthetic source behaves like any grain data source (`__len__` + `__getitem__`): example `i`
of a source built with `seed` is a pure function of (generator name, seed, i, constructor
arguments), so worker processes, resumed runs and several hosts all see the same data without
storing anything. `__repr__` is deterministic because grain's DataLoader checks a restored
iterator state against `repr(data_source)`.
"""
from __future__ import annotations

import abc
import zlib
from typing import Any, Dict, Tuple, Union

import numpy as np

ImageSize = Union[int, Tuple[int, int]]


def image_hw(image_size: ImageSize) -> Tuple[int, int]:
    """`image_size` as (height, width); an int means a square image."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h < 32 or w < 32:
        raise ValueError(f"synthetic images need at least 32x32 pixels to stay legible, got {h}x{w}")
    return h, w


class SyntheticSource(abc.ABC):
    """Base: subclasses set `name` and implement `generate(rng) -> example dict`.

    Args:
      num_examples: length of the source (the generator itself is unbounded).
      image_size: output image size, int (square) or (height, width).
      seed: data seed; two sources with different `name` never share random streams.
    """

    name = "synthetic"

    def __init__(self, num_examples: int, image_size: ImageSize = 168, seed: int = 0):
        if num_examples <= 0:
            raise ValueError(f"{type(self).__name__}: num_examples must be positive, got {num_examples}")
        self.num_examples = int(num_examples)
        self.image_size = image_hw(image_size)
        self.seed = int(seed)
        # A stable per-generator salt (Python's hash() is randomised per process).
        self._salt = zlib.crc32(self.name.encode())

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"{self!r}: index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng([self._salt, self.seed, index])
        example = self.generate(rng)
        example.setdefault("metadata", {})["example_id"] = f"{self.name}/{self.seed}/{index}"
        return example

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator) -> Dict[str, Any]:
        """One example dict in the shared source shape (see data_pipelines/sources)."""

    def _repr_fields(self) -> Dict[str, Any]:
        """Constructor arguments beyond the common ones that change the data."""
        return {}

    def __repr__(self) -> str:
        fields = dict(num_examples=self.num_examples, image_size=self.image_size, seed=self.seed)
        fields.update(self._repr_fields())
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def paint_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A light background: flat, a linear gradient, or smooth blotches.  uint8[H, W, 3].

    Light tones keep dark outlines, hands and numerals readable at 112-168 px.
    """
    base = rng.uniform(185, 250, size=3)
    kind = rng.choice(["flat", "gradient", "blotches"], p=[0.4, 0.35, 0.25])
    if kind == "flat":
        img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == "gradient":
        other = rng.uniform(185, 250, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base * (1 - t[..., None]) + other * t[..., None]
    else:
        coarse = rng.normal(0, 12, size=(4, 4, 3))
        # Bilinear upsampling of a 4x4 grid gives smooth, low-frequency blotches.
        ys = np.linspace(0, 3, height)
        xs = np.linspace(0, 3, width)
        y0 = np.minimum(ys.astype(int), 2)
        x0 = np.minimum(xs.astype(int), 2)
        fy = (ys - y0)[:, None, None]
        fx = (xs - x0)[None, :, None]
        c00 = coarse[y0][:, x0]
        c01 = coarse[y0][:, x0 + 1]
        c10 = coarse[y0 + 1][:, x0]
        c11 = coarse[y0 + 1][:, x0 + 1]
        noise = (c00 * (1 - fy) * (1 - fx) + c01 * (1 - fy) * fx + c10 * fy * (1 - fx) + c11 * fy * fx)
        img = base + noise
    return np.clip(img, 0, 255).astype(np.uint8)
