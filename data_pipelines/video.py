"""Video decoding with PyAV and Molmo2's frame sampling (numpy only; runs in data-loader workers).

`probe` reads a file's video stream without decoding a frame: it demuxes the packets (cheap) to
count the frames and list their presentation times, and refuses bad input with one error type,
`VideoDecodeError`, whose message names the file and the cause. `sample_frame_indices` picks the
frames as Molmo2 does; `iter_frames` then decodes only up to those frames, seeking past long gaps,
and yields them one at a time so that a caller can shrink each before the next is decoded (a
long video is never held in memory). Timestamps are frame index / average frame rate, as in
transformers' and the official Molmo2 processors.

Sampling modes (`sample_frame_indices`):
  * "uniform_last_frame" (the released Molmo2 models): every fps/max_fps-th frame plus the last
    one when that fits in `max_frames`, else `max_frames` frames spread evenly from the first to
    the last. Transcribed from the official Molmo2 video processor (as vLLM carries it).
  * "fps": the largest frame rate that is a multiple of `sampling_fps`, divides the video's and
    is at most 8 fps that keeps the video within `max_frames`; else `max_frames` spread evenly.
  * "transformers": transformers' `Molmo2VideoProcessor.sample_frames` (its default, 64 frames
    at most 2 fps, spread from the start without forcing the last frame).
"""
import dataclasses
import os
import pathlib

import av
import numpy as np

MODES = ("uniform_last_frame", "fps", "transformers")
# 8K: larger frames are refused before any is decoded.
DEFAULT_MAX_PIXELS = 7680 * 4320
# A frame interval that differs from the median by more than this fraction (and more than one
# time-base unit) means a variable frame rate: its timestamps (index / fps) would be wrong.
VFR_TOLERANCE = 0.25
MAX_CANDIDATE_FPS = 8  # the official "fps" mode never samples faster


CAUSES = ("unreadable file", "not a video file", "no video stream", "zero frames", "absurd dimensions",
          "variable frame rate", "truncated or corrupt data")  # what a VideoDecodeError message names


class VideoDecodeError(ValueError):
  """A video cannot be used. The message names the file and one cause: 'unreadable file',
  'not a video file', 'no video stream', 'zero frames', 'absurd dimensions', 'variable frame
  rate', 'truncated or corrupt data'."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What `probe` found. pts: int64[num_frames] presentation times (stream time base), sorted."""
  path: str
  num_frames: int
  fps: float
  height: int
  width: int
  pts: np.ndarray

  @property
  def duration(self) -> float:  # seconds, as the samplers see it
    return self.num_frames / self.fps


def _open(path: str):
  if not os.path.isfile(path):
    raise VideoDecodeError(f"{path}: unreadable file (no such file)")
  try:
    return av.open(path)
  except av.error.FFmpegError as e:
    raise VideoDecodeError(f"{path}: not a video file, or one cut before its index "
                           f"({type(e).__name__}: {e})") from e


def probe(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
  """Checks a video file and lists its frames without decoding them. Raises VideoDecodeError."""
  path = str(pathlib.Path(path))
  container = _open(path)
  with container:
    if not container.streams.video:
      kinds = sorted({s.type for s in container.streams}) or ["none"]
      raise VideoDecodeError(f"{path}: no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0 or width * height > max_pixels:
      raise VideoDecodeError(f"{path}: absurd dimensions {width}x{height} (want 1 <= width x "
                             f"height <= {max_pixels} pixels)")
    try:
      pts = [p.pts for p in container.demux(stream) if p.size and p.pts is not None]
    except av.error.FFmpegError as e:
      raise VideoDecodeError(f"{path}: truncated or corrupt data ({type(e).__name__}: {e})") from e
    declared, rate, time_base = stream.frames, stream.average_rate, stream.time_base
    declared_s = container.duration / av.time_base if container.duration else None
  if not pts:
    raise VideoDecodeError(f"{path}: zero frames")
  if declared and len(pts) < declared:
    raise VideoDecodeError(f"{path}: truncated or corrupt data (the header declares {declared} "
                           f"frames, the file holds {len(pts)})")
  unique = np.unique(np.asarray(pts, np.int64))
  if len(unique) < len(pts) or rate is None or float(rate) <= 0:
    raise VideoDecodeError(f"{path}: variable frame rate (repeated frame times or no average "
                           f"frame rate)")
  pts = unique
  if len(pts) > 2:
    steps = np.diff(pts)
    median = float(np.median(steps))
    covered_s = float((pts[-1] - pts[0] + median) * time_base)
    if declared_s and covered_s < declared_s * 0.99 - 2 * median * float(time_base):
      raise VideoDecodeError(f"{path}: truncated or corrupt data (the header declares "
                             f"{declared_s:.2f} s, the frames cover {covered_s:.2f} s)")
    # One time-base unit of rounding is allowed (30 fps in a 1/1000 time base: 33 or 34).
    worst = float(np.max(np.abs(steps - median)))
    if median <= 0 or worst > max(VFR_TOLERANCE * median, 1.0):
      raise VideoDecodeError(f"{path}: variable frame rate (frame intervals from {steps.min()} "
                             f"to {steps.max()} time-base units; timestamps would be wrong)")
  return VideoInfo(path=path, num_frames=len(pts), fps=float(rate), height=height, width=width,
                   pts=pts)


def _uniform(total: int, count: int) -> np.ndarray:
  return np.linspace(0, total - 1, num=min(count, total), endpoint=True).astype(int)


def _candidate_fps(video_fps: float, sampling_fps: float) -> list[float]:
  """Multiples of sampling_fps that divide the (integer) video fps, up to MAX_CANDIDATE_FPS."""
  video_fps, sampling_fps = int(video_fps), int(sampling_fps)
  if video_fps <= 0 or sampling_fps <= 0 or video_fps % sampling_fps:
    raise ValueError(f"'fps' sampling: sampling_fps={sampling_fps} must divide the video's "
                     f"fps={video_fps}")
  return [float(c) for c in range(sampling_fps, min(video_fps, MAX_CANDIDATE_FPS) + 1,
                                  sampling_fps) if video_fps % c == 0]


def _fps_mode(total: int, video_fps: float, max_frames: int, sampling_fps: float) -> np.ndarray:
  chosen, sampled = None, 0
  for target in _candidate_fps(video_fps, sampling_fps):
    count = int(total / max(int(video_fps / target), 1))
    if sampled == 0 or count <= max_frames and count > sampled:
      # The first candidate is taken even when it overflows: the official loop only skips
      # overflowing candidates once one is chosen ("uniform" modes aside).
      chosen, sampled = target, count
  if chosen is None:
    indices = np.linspace(0, total, max_frames, endpoint=False, dtype=int)
  else:
    indices = np.arange(0, total, max(int(video_fps / chosen), 1))
  return indices[:max_frames]


def sample_frame_indices(num_frames: int, fps: float, *, mode: str = "uniform_last_frame",
                         max_frames: int = 384, max_fps: float | None = 2.0,
                         sampling_fps: float = 2.0) -> np.ndarray:
  """int64[T] sorted indices of the frames Molmo2 uses, for a video of `num_frames` frames at
  `fps` (modes: module docstring)."""
  if num_frames < 1 or fps <= 0 or max_frames < 1:
    raise ValueError(f"sample_frame_indices: need num_frames >= 1, fps > 0, max_frames >= 1 "
                     f"(got {num_frames}, {fps}, {max_frames})")
  duration = num_frames / fps
  if mode == "uniform_last_frame":
    if max_fps is None:
      indices = _uniform(num_frames, max_frames)
    elif num_frames <= 2:
      indices = np.arange(num_frames)
    elif duration > (max_frames - 1) / max_fps:  # too long for max_fps: spread evenly
      indices = _uniform(num_frames, max_frames)
    else:
      steps = np.arange(0.0, num_frames - 1, float(fps / max_fps))
      if np.round(steps[-1]) != num_frames - 1:
        steps = np.concatenate([steps, [num_frames - 1]])
      indices = np.round(steps).astype(int)
  elif mode == "fps":
    indices = _fps_mode(num_frames, fps, max_frames, sampling_fps)
  elif mode == "transformers":
    target = max_frames
    if max_fps is not None and fps > max_fps:
      target = min(target, int(duration * max_fps))
    target = max(min(target, num_frames), 1)
    # torch.arange(0, total, total / target).int(): values in double, stored as float32, truncated
    step = num_frames / target
    count = int(np.ceil(num_frames / step))
    indices = (np.arange(count) * step).astype(np.float32).astype(np.int64)
  else:
    raise ValueError(f"unknown frame sampling mode {mode!r} (want one of {', '.join(MODES)})")
  return np.asarray(indices, np.int64)


def timestamps(indices: np.ndarray, fps: float) -> np.ndarray:
  """float64[T] seconds of each sampled frame (index / average frame rate)."""
  return np.asarray(indices, np.float64) / fps


def iter_frames(info: VideoInfo, indices: np.ndarray, *, seek_gap_s: float = 2.0):
  """Yields uint8[H, W, 3] RGB frames for `indices` (sorted; repeats yield the frame again),
  decoding forward from the previous frame, or seeking to the keyframe before a target that
  lies more than `seek_gap_s` seconds ahead. Raises VideoDecodeError on broken data."""
  indices = np.asarray(indices, np.int64)
  if len(indices) and (indices.min() < 0 or indices.max() >= info.num_frames or
                       np.any(np.diff(indices) < 0)):
    raise ValueError(f"{info.path}: frame indices must be sorted within [0, {info.num_frames})")
  container = _open(info.path)
  with container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    gap = int(seek_gap_s * info.fps)
    decoded, position, last = None, -1, None
    try:
      for index in indices:
        if index == position and last is not None:
          yield last
          continue
        if decoded is None or index - position > gap:
          container.seek(int(info.pts[index]), stream=stream, backward=True, any_frame=False)
          decoded = container.decode(stream)
        target = info.pts[index]
        for frame in decoded:
          if frame.pts is None or frame.pts < target:
            continue
          position, last = index, frame.to_ndarray(format="rgb24")
          break
        else:
          raise VideoDecodeError(f"{info.path}: truncated or corrupt data (frame {index} of "
                                 f"{info.num_frames} could not be decoded)")
        yield last
    except av.error.FFmpegError as e:
      raise VideoDecodeError(f"{info.path}: truncated or corrupt data ({type(e).__name__}: {e})"
                             ) from e
