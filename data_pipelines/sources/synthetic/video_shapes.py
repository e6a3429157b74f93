"""Videos of moving shapes for Molmo2's video tasks: point per frame, count over time, track.

A scene of `shapes.sample_scene` shapes moves over a still background: every shape has a
constant velocity and bounces off the borders; in "count" scenes shapes also appear and
disappear at random frames. Frames are rendered in memory and encoded with PyAV (H.264, nearly
lossless) to a real video file under `out_dir`, named after the example's random stream so that
example i of a seed always maps to the same file (encoded once, then reused).

Tasks (the answer texts are this project's own, not Molmo2's video-point text; the exact
per-frame geometry is in "metadata", in percent of the frame, for metrics):
  point  "Point to the red circles in every frame."  frame_points: [[(x, y), ...] per frame]
  count  "How many red circles appear in the video?"  count (distinct), frame_counts
  track  "Track the red circle that starts at (x, y)."  track: [(x, y) or None per frame]
"""
from __future__ import annotations

import os
import pathlib
import threading
from typing import Any, Dict, List

import av
import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.sources.synthetic.base import ImageSize, SyntheticSource, paint_background
from data_pipelines.sources.synthetic.shapes import (COLORS, Shape, category_label, matches,
                                                     sample_scene)

TASKS = ("point", "count", "track")


def trajectories(rng: np.random.Generator, shapes: List[Shape], height: int, width: int,
                 num_frames: int, speed: float = 0.03) -> np.ndarray:
    """float64[N, T, 2] (x, y) centres: constant velocities up to `speed` x the shorter side per
    frame, reflected at the borders so every shape stays inside the frame."""
    side = min(height, width)
    out = np.empty((len(shapes), num_frames, 2))
    t = np.arange(num_frames)[:, None]
    for k, s in enumerate(shapes):
        velocity = rng.uniform(-speed, speed, size=2) * side
        lo = np.array([s.radius + 1, s.radius + 1])
        span = np.array([width, height]) - 2 * lo
        raw = np.array([s.x, s.y]) - lo + velocity * t          # unfolded position
        folded = np.mod(raw, 2 * span)
        out[k] = lo + np.where(folded > span, 2 * span - folded, folded)
    return out


def render_frame(background: np.ndarray, shapes: List[Shape], centres: np.ndarray,
                 visible: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3]: the visible shapes at `centres` (float[N, 2]) over `background`,
    anti-aliased by drawing at 4x and reducing."""
    h, w = background.shape[:2]
    k = 4
    canvas = Image.fromarray(background).resize((w * k, h * k), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for s, (x, y), on in zip(shapes, centres, visible):
        if on:
            moved = Shape(s.color, s.kind, float(x), float(y), s.radius, s.rotation)
            draw.polygon(moved.polygon(k), fill=COLORS[s.color], outline=(20, 20, 20), width=k)
    return np.asarray(canvas.reduce(k))


def encode_video(path: str | os.PathLike, frames, fps: int) -> None:
    """Writes uint8[H, W, 3] frames (H, W even) as H.264 (crf 12) to `path`, atomically."""
    path = pathlib.Path(path)
    # One temporary name per writer: two loader threads or processes may make the same example
    # at once, and each must rename only the file it wrote (the results are identical).
    tmp = path.with_name(f"{path.stem}.partial-{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        with av.open(str(tmp), "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"crf": "12"})
            first = True
            for frame in frames:
                if first:
                    stream.height, stream.width = frame.shape[:2]
                    stream.pix_fmt = "yuv420p"
                    first = False
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _percent(xy, height: int, width: int):
    return (round(100.0 * xy[0] / width, 1), round(100.0 * xy[1] / height, 1))


class VideoShapesSource(SyntheticSource):
    """Moving-shapes videos (module docstring). Examples: {"video": path, "question", "answer",
    "style", "metadata"}; the metadata also holds fps and num_frames.

    Args beyond SyntheticSource's: task ("point" | "count" | "track"), num_frames, fps,
    out_dir (where the videos are written; required).
    """

    name = "video_shapes"

    def __init__(self, num_examples: int, image_size: ImageSize = (96, 128), seed: int = 0,
                 task: str = "point", num_frames: int = 16, fps: int = 8,
                 out_dir: str | os.PathLike | None = None):
        super().__init__(num_examples, image_size, seed)
        problems = []
        if task not in TASKS:
            problems.append(f"task {task!r} is not one of {TASKS}")
        if any(v % 2 for v in self.image_size):
            problems.append(f"image_size {self.image_size} must be even (yuv420p video)")
        if num_frames < 2 or fps < 1:
            problems.append(f"need num_frames >= 2 and fps >= 1, got {num_frames}, {fps}")
        if out_dir is None:
            problems.append("out_dir is required (the videos are files)")
        if problems:
            raise ValueError("VideoShapesSource: " + "; ".join(problems))
        self.task, self.num_frames, self.fps = task, int(num_frames), int(fps)
        self.out_dir = pathlib.Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _repr_fields(self):
        return dict(task=self.task, num_frames=self.num_frames, fps=self.fps)

    def generate(self, rng: np.random.Generator) -> Dict[str, Any]:
        h, w, n = *self.image_size, self.num_frames
        shapes = sample_scene(rng, h, w, max_count=3, max_categories=2)
        centres = trajectories(rng, shapes, h, w, n)
        visible = np.ones((len(shapes), n), bool)
        if self.task == "count":  # each shape is on screen for one random interval
            for k in range(len(shapes)):
                start = int(rng.integers(0, n - 1))
                visible[k] = (np.arange(n) >= start) & (np.arange(n) <= rng.integers(start, n))
        background = paint_background(rng, h, w)
        target = shapes[int(rng.integers(len(shapes)))]
        color, kind = target.color, target.kind
        hits = [k for k, s in enumerate(shapes) if matches(s, color, kind)]
        label = category_label(color, kind)
        # Everything that changes the pixels is in the name, so a cached file is never stale.
        shown = "interval" if self.task == "count" else "always"
        path = self.out_dir / (f"{self.name}-{h}x{w}-{n}f{self.fps}-{shown}-"
                               f"{int(rng.integers(2 ** 62)):016x}.mp4")
        if not path.exists():  # the asked-for shapes are drawn last: others never hide them
            order = [k for k in range(len(shapes)) if k not in hits] + hits
            drawn = [shapes[k] for k in order]
            encode_video(path, (render_frame(background, drawn, centres[order, t],
                                             visible[order, t]) for t in range(n)), self.fps)
        meta: Dict[str, Any] = dict(fps=self.fps, num_frames=n, image_hw=(h, w), label=label)
        if self.task == "point":
            frame_points = [[_percent(centres[k, t], h, w) for k in hits] for t in range(n)]
            meta["frame_points"] = frame_points
            question = f"Point to the {label} in every frame."
            answer = " ".join(f"{t / self.fps:.1f}: " + " ".join(f"({x}, {y})" for x, y in pts) + ";"
                              for t, pts in enumerate(frame_points))
        elif self.task == "count":
            meta["count"] = int(visible[hits].any(axis=1).sum())
            meta["frame_counts"] = visible[hits].sum(axis=0).astype(int).tolist()
            question, answer = f"How many {label} appear in the video?", str(meta["count"])
        else:
            k = hits[0]
            track = [_percent(centres[k, t], h, w) if visible[k, t] else None for t in range(n)]
            meta["track"] = track
            x0, y0 = track[0]
            question = f"Track the {category_label(color, kind)[:-1]} that starts at ({x0}, {y0})."
            answer = " ".join(f"{t / self.fps:.1f}: ({x}, {y});" for t, (x, y) in enumerate(track))
        return dict(video=str(path), question=question, answer=answer, style=f"video_{self.task}",
                    metadata=meta)
