"""`python -m molmo_jax.evaluation.score` on golden cases: per-line scores, details and the mean."""
import json

import numpy as np
import pytest

from molmo_jax.evaluation import score


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_pointing_file_with_masks(tmp_path, golden_dir, capsys):
    cases = [c for c in json.loads((golden_dir / "metrics" / "metrics_goldens.json").read_text())["pointing"]
             if c["error"] is None]
    write_jsonl(tmp_path / "preds.jsonl", cases)
    out = tmp_path / "scored.jsonl"
    assert score.main(["--metric", "pointing", "--input", str(tmp_path / "preds.jsonl"),
                       "--masks", str(golden_dir / "metrics" / "pointing_masks.npz"), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == [c["id"] for c in cases]
    for record, case in zip(scored, cases):
        assert np.float32(record["score"]) == np.float32(case["f1"])
        assert {"precision", "recall", "f1", "points", "valid_format"} <= set(record)
    expected = np.mean([r["score"] for r in scored])
    assert f"mean {expected:.6f} over {len(cases)} examples" in capsys.readouterr().out


def test_count_file_and_bad_lines(tmp_path, capsys):
    write_jsonl(tmp_path / "ok.jsonl", [{"prediction": "a total of 3", "gt_count": 3},
                                        {"prediction": "There are none.", "gt_count": 0}])
    score.main(["--metric", "point_count", "--input", str(tmp_path / "ok.jsonl")])
    assert "mean 0.500000 over 2 examples" in capsys.readouterr().out

    (tmp_path / "bad.jsonl").write_text('{"prediction": "3", "gt_count": 3}\n{"prediction": "3"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'gt_count'"):
        score.main(["--metric", "point_count", "--input", str(tmp_path / "bad.jsonl")])
    (tmp_path / "broken.jsonl").write_text('{"prediction": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        score.main(["--metric", "vqa_score", "--input", str(tmp_path / "broken.jsonl")])
