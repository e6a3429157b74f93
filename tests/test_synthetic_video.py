"""Synthetic moving-shapes videos: real files that decode to the frames the metadata describes."""
import av
import numpy as np
import pytest

from data_pipelines import video
from data_pipelines.sources.synthetic.shapes import COLORS
from data_pipelines.sources.synthetic.video_shapes import VideoShapesSource


def _decode(path):
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("task", ["point", "track"])
def test_points_and_tracks_sit_on_the_shapes(tmp_path, task):
  source = VideoShapesSource(2, image_size=(96, 128), seed=3, task=task, num_frames=12, fps=6,
                             out_dir=tmp_path)
  for index in range(len(source)):
    example = source[index]
    info = video.probe(example["video"])
    assert (info.num_frames, info.fps, info.height, info.width) == (12, 6.0, 96, 128)
    frames = _decode(example["video"])
    meta = example["metadata"]
    color = np.array(COLORS[meta["label"].split()[0]])
    per_frame = meta["frame_points"] if task == "point" else [[p] for p in meta["track"]]
    assert len(per_frame) == 12 and all(per_frame)
    hits = []
    for frame, points in zip(frames, per_frame):
      for x, y in points:  # the centre has the shape's colour (H.264 at crf 12) unless a shape
        r, c = int(y / 100 * 96), int(x / 100 * 128)  # of the same kind passes over it
        hits.append(np.abs(frame[r, c].astype(int) - color).max() < 40)
    assert np.mean(hits) >= 0.85, (index, np.mean(hits))
    assert example["question"].startswith("Point to the" if task == "point" else "Track the")
    assert example["answer"].startswith("0.0: (")
    # The centres move (a still scene would not test tracking).
    first, last = np.array(per_frame[0][0]), np.array(per_frame[-1][0])
    assert np.abs(first - last).max() > 1.0


def test_count_over_time(tmp_path):
  source = VideoShapesSource(3, image_size=(64, 96), seed=0, task="count", num_frames=10,
                             fps=5, out_dir=tmp_path)
  for index in range(3):
    meta = source[index]["metadata"]
    counts = np.array(meta["frame_counts"])
    assert len(counts) == 10 and counts.max() <= meta["count"] and meta["count"] >= 1
    assert source[index]["answer"] == str(meta["count"])


def test_deterministic_and_cached(tmp_path):
  source = VideoShapesSource(2, seed=5, task="point", num_frames=8, out_dir=tmp_path)
  a = source[1]
  mtime = (tmp_path / a["video"].split("/")[-1]).stat().st_mtime_ns
  b = VideoShapesSource(2, seed=5, task="point", num_frames=8, out_dir=tmp_path)[1]
  assert a == b
  assert (tmp_path / a["video"].split("/")[-1]).stat().st_mtime_ns == mtime  # not re-encoded
  longer = VideoShapesSource(2, seed=5, task="point", num_frames=10, out_dir=tmp_path)[1]
  assert longer["video"] != a["video"]
  assert len(list(tmp_path.glob("*.partial*"))) == 0


def test_bad_arguments_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="task 'dance'"):
    VideoShapesSource(1, task="dance", out_dir=tmp_path)
  with pytest.raises(ValueError, match="must be even"):
    VideoShapesSource(1, image_size=(95, 128), out_dir=tmp_path)
  with pytest.raises(ValueError, match="out_dir is required"):
    VideoShapesSource(1)


def test_the_same_example_made_by_many_threads_at_once(tmp_path):
  """Loader threads may make one example together (a small source read at several indices): each
  writer renames only its own temporary file, and no temporary file is left behind."""
  import concurrent.futures
  source = VideoShapesSource(1, image_size=(48, 64), seed=2, task="count", num_frames=6, fps=3,
                             out_dir=tmp_path)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    examples = list(pool.map(lambda _: source[0], range(16)))
  assert all(e == examples[0] for e in examples)
  assert [p.name for p in tmp_path.iterdir()] == [examples[0]["video"].split("/")[-1]]
  assert video.probe(examples[0]["video"]).num_frames == 6
