"""Synthetic PixMo-style data generated on the fly (numpy + PIL), so the demo and the tests need
no downloads. Every source is random access and deterministic per (seed, index); see README.md.

  clocks    ClockSource: analog clocks, "What time is being shown?" (PixMo-Clocks answers)
  shapes    ShapesSource: coloured shapes for pointing / counting, with masks and counts
  captions  CaptionSource: long captions of the shapes scenes
  charts    ChartSource: bar charts with questions about their data (PixMo-Docs charts style)
  video_shapes  VideoShapesSource: moving shapes encoded to video files (point per frame, count
            over time, track); needs PyAV (the "video" extra), so import it from its module
"""
from data_pipelines.sources.synthetic.base import SyntheticSource
from data_pipelines.sources.synthetic.captions import CaptionSource
from data_pipelines.sources.synthetic.charts import ChartSource
from data_pipelines.sources.synthetic.clocks import ClockSource, render_clock_row
from data_pipelines.sources.synthetic.shapes import ShapesSource

GENERATORS = {"clocks": ClockSource, "shapes": ShapesSource, "captions": CaptionSource, "charts": ChartSource}


def make_synthetic(kind: str, num_examples: int, image_size=168, seed: int = 0, **kwargs) -> SyntheticSource:
    """Builds the generator named `kind` (a key of GENERATORS); kwargs go to its constructor."""
    if kind not in GENERATORS:
        raise KeyError(f"unknown synthetic generator {kind!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[kind](num_examples, image_size, seed, **kwargs)


__all__ = ["CaptionSource", "ChartSource", "ClockSource", "GENERATORS", "ShapesSource", "SyntheticSource",
           "make_synthetic", "render_clock_row"]
