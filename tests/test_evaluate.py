"""End to end: a tiny model evaluated on small local benchmark folders (HF parquet layout) writes
predictions and scores, and a restarted evaluation finishes only what is missing."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from molmo_jax import evaluate as evaluate_cli
from molmo_jax.evaluation.runner import evaluate_task, read_finished
from molmo_jax.evaluation.metrics import score_record
from molmo_jax.evaluation.tasks import get_task
from molmo_jax.inference.predictor import Predictor
from test_predict import checkpoint  # noqa: F401  (module fixture: golden qwen2_style weights + tiny tokenizer)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, golden_dir):
    """chart_qa and pointing_eval folders in the HF parquet layout (image structs, list columns)."""
    root = tmp_path_factory.mktemp("benchmarks")
    png = (golden_dir / "preprocess" / "astronaut_face_100x100.png").read_bytes()
    image = {"bytes": png, "path": "face.png"}
    chart = [{"image": image, "query": q, "label": [a], "human_or_machine": 0}
             for q, a in [("what is in the image", "12"), ("how many dogs are there", "3"),
                          ("point to the cat", "cat")]]
    (root / "chart_qa" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(chart), root / "chart_qa" / "data" / "test-00000-of-00001.parquet")
    masks = np.zeros((1, 100, 100), bool)
    masks[0, 40:60, 40:60] = True
    pointing = [{"image": png, "label": "face", "points": [{"x": 50.0, "y": 50.0}], "masks": masks.tolist()},
                {"image": png, "label": "dog", "points": [], "masks": np.zeros((0, 100, 100), bool).tolist()}]
    (root / "pointing_eval").mkdir()
    pq.write_table(pa.Table.from_pylist(pointing), root / "pointing_eval" / "test.parquet")
    return root


def test_evaluate_end_to_end_and_resume(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    evaluate_cli.main(["--checkpoint", str(checkpoint), "--tasks", "chart_qa,pointing_eval", "--data-dir",
                       str(data_dir), "--out-dir", str(out), "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert "chart_qa" in printed and "pointing_eval" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert scores["chart_qa"]["n"] == 3 and scores["pointing_eval"]["n"] == 2
    assert scores["chart_qa"]["metric"] == "relaxed_correctness"
    assert {"precision", "recall", "f1"} <= set(scores["pointing_eval"])

    rows = read_finished(out / "chart_qa.predictions.jsonl")
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    for row in rows:
        assert row["prompt"].strip().startswith("User: chart_qa: ") and row["prompt"].endswith(" Assistant:")
        rescored = score_record("relaxed_correctness", {**row["record"], "prediction": row["prediction"]})
        assert rescored["score"] == row["score"]
    pointing_rows = read_finished(out / "pointing_eval.predictions.jsonl")
    assert pointing_rows[1]["score"] == float(not pointing_rows[1]["details"]["points"])  # no GT: right iff no points

    # A crash mid-write: the last example is half written. A rerun redoes exactly that example.
    path = out / "chart_qa.predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:20])
    predictor = Predictor.from_checkpoint(str(checkpoint))
    summary = evaluate_task(predictor, get_task("chart_qa"), data_dir, out, batch_size=2)
    assert summary["n"] == 3
    assert read_finished(path) == rows


def test_bad_benchmark_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(get_task("chart_qa").examples(tmp_path))
    (tmp_path / "chart_qa").mkdir()
    pq.write_table(pa.Table.from_pylist([{"image": None, "question": "q"}]), tmp_path / "chart_qa" / "test.parquet")
    with pytest.raises(ValueError, match="row 0: cannot build an example.*'query'"):
        list(get_task("chart_qa").examples(tmp_path))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")
