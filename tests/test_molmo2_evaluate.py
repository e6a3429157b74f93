"""`evaluate` on a tiny random Molmo2 folder: the Molmo2 video eval sets (parquet in the published
schema, videos encoded here) answered, scored with the Molmo2 metrics, resumable; a corrupt video is an
error row, not a crash."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from PIL import Image

from molmo_jax import evaluate
from molmo_jax.evaluation import video_metrics
from test_molmo2_predict import checkpoint, folder  # noqa: F401 (pytest fixtures)
from test_molmo2_preprocess import write_video


@pytest.fixture(scope="module")
def molmo2_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2eval")
    videos = root / "videos" / "youtube-cc" / "youtube-cc-exist"
    for vid in ("v1", "v2"):
        (videos / vid).mkdir(parents=True)
        write_video(videos / vid / f"{vid}.mp4", n_frames=20, fps=10)
    (videos / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    data = root / "data"
    count_rows = [{"video_id": vid, "video_source": "youtube", "clip_start": 0.0, "clip_end": 2.0, "count": n,
                   "label": "dot", "question": "How many dots are there?", "category": "object",
                   "video_duration": 2.0} for vid, n in (("v1", 3), ("v2", 0), ("bad", 1), ("absent", 2))]
    (data / "Molmo2-VideoCountEval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(count_rows), data / "Molmo2-VideoCountEval" / "val-00000-of-00001.parquet")
    rle = {"size": [48, 64], "counts": [48 * 64]}  # an empty mask
    point_rows = [{"video_id": "v1", "video_source": "youtube", "label": "dot", "height": 48, "width": 64,
                   "video_duration": 2.0, "two_fps_timestamps": [0.5], "points": [{"x": 10.0, "y": 10.0}],
                   "masks": [[{"frame_id": 1, "rle": rle}]]}]
    (data / "Molmo2-VideoPointEval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(point_rows), data / "Molmo2-VideoPointEval" / "val-00000-of-00001.parquet")

    def png(seed):
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), np.uint8)).save(out, format="PNG")
        return {"bytes": out.getvalue(), "path": None}
    muir = [{"idx": f"m{i}", "task": "Counting", "question": "Which of <image> and <image> shows more?",
             "options": ["<image>", "both", "neither"], "answer": "B", "image_list": [png(i), png(i + 1), png(i + 2)]}
            for i in range(2)]
    (data / "muir_bench").mkdir()
    pq.write_table(pa.Table.from_pylist(muir), data / "muir_bench" / "test-00000-of-00001.parquet")
    return data, root / "videos"


def test_evaluate_runs_the_molmo2_video_tasks(folder, molmo2_data, tmp_path, capsys):  # noqa: F811
    data, videos = molmo2_data
    argv = ["--checkpoint", str(folder), "--tasks", "molmo2_video_count_eval,molmo2_video_point_eval",
            "--data-dir", str(data), "--video-dir", str(videos), "--out-dir", str(tmp_path), "--max-new-tokens", "3"]
    assert evaluate.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "molmo2_video_count_eval.predictions.jsonl").open()]
    assert [r["id"] for r in rows] == ["0", "1", "2"]  # row 3's video is absent: not an example
    assert "bad.mp4" in rows[2]["error"]
    for row, gt in zip(rows[:2], (3, 0)):
        assert row["record"] == {"count": gt, "subset": "object"}
        assert row["score"] == video_metrics.video_count_score(row["prediction"], gt)["correct"]
    (point,) = [json.loads(line) for line in (tmp_path / "molmo2_video_point_eval.predictions.jsonl").open()]
    assert point["record"]["gt_triplets"] == [[0.5, 10.0, 10.0]] and point["score"] == 0.0  # empty mask
    scores = json.loads((tmp_path / "scores.json").read_text())
    count = scores["molmo2_video_count_eval"]
    assert count["n"] == 2 and count["errors"] == 1
    assert count["acc_object"] == count["score"] and "correct_0_5" in count
    assert scores["molmo2_video_point_eval"]["metric"] == "video_point"
    capsys.readouterr()
    assert evaluate.main(argv) == 0  # resumed: nothing is answered again
    assert len((tmp_path / "molmo2_video_count_eval.predictions.jsonl").read_text().splitlines()) == 3


def test_evaluate_runs_muir_bench(folder, molmo2_data, tmp_path):  # noqa: F811
    data, _ = molmo2_data
    assert evaluate.main(["--checkpoint", str(folder), "--tasks", "muir_bench", "--data-dir", str(data),
                          "--out-dir", str(tmp_path), "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "muir_bench.predictions.jsonl").open()]
    assert [r["id"] for r in rows] == ["m0", "m1"]
    # "<image>" numbered across the question and the options, then the official eval template
    assert rows[0]["prompt"] == ("Which of Image 1 and Image 2 shows more?\nOnly return the correct answer option.\n"
                                 "A. Image 3\nB. both\nC. neither")
    for row in rows:
        assert row["score"] == float(row["details"]["choice"] == "B") and row["details"]["choice"] in "ABC"


def test_molmo2_checkpoint_refuses_v1_tasks_and_needs_videos(folder, molmo2_data, tmp_path):  # noqa: F811
    data, _ = molmo2_data
    base = ["--checkpoint", str(folder), "--data-dir", str(data), "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        evaluate.main(base + ["--tasks", "chart_qa", "--video-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main(base + ["--tasks", "molmo2_video_count_eval"])
