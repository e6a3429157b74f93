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
    assert score.main(["--metric", "point_count", "--input", str(tmp_path / "ok.jsonl")]) == 0
    assert "mean 0.500000 over 2 examples" in capsys.readouterr().out

    (tmp_path / "bad.jsonl").write_text('{"prediction": "a total of 3", "gt_count": 3}\n{"prediction": "3"}\n'
                                        '{"prediction": "3", "gt_count": 2.5}\n')
    assert score.main(["--metric", "point_count", "--input", str(tmp_path / "bad.jsonl")]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["line 2: gt_count: missing (or 'count'); fields present: ['prediction']",
                                         "line 3: gt_count: expected an integer, got 2.5"]
    assert "mean 1.000000 over 1 examples; 2 line(s) rejected" in captured.out


def hostile_vqa_lines():
    """(bytes of a predictions file, the lines that must be rejected and why)."""
    lines = [
        json.dumps({"id": 1, "prediction": "yes", "references": ["yes", "yes", "yes"]}),   # 1: 1.0
        json.dumps({"id": 2, "prediction": "yes", "references": []}),                      # 2: 0.0 (official)
        '{"prediction": ',                                                                 # 3
        json.dumps({"prediction": "no"}),                                                  # 4
        json.dumps({"prediction": 3, "references": ["3"]}),                                # 5
        "[1, 2]",                                                                          # 6
        '{"prediction": "caf\xe9", "references": ["x"]}',                                 # 7 (Latin-1 byte)
        '{"prediction": "x", "references": ' + "[" * 50_000 + "]" * 50_000 + "}",          # 8
        '{"prediction": "x", "references": ["x"], "n": ' + "7" * 5000 + "}",               # 9
        json.dumps({"id": 10, "prediction": "no", "references": "no"}),   # 10: 1/3 (a list of one)
        "   ",                                                                             # 11: blank
        '{"id": 12, "prediction": "\\ud800", "references": ["x", "x", 7]}',                # 12
        '{"id": 13, "prediction": "\\ud800", "references": ["x"]}',                        # 13: 0.0
    ]
    data = "\n".join(lines).encode("utf-8").replace("caf\xe9".encode("utf-8"), b"caf\xe9") + b"\n"
    rejected = ["line 3: -: invalid JSON: Expecting value at column 16",
                "line 4: references: missing (or 'answers'); fields present: ['prediction']",
                "line 5: prediction: expected a string, got 3",
                "line 6: -: expected a JSON object, got list",
                "line 7: -: not UTF-8: byte 0xe9 at byte 20 of the line",
                "line 8: -: invalid JSON: nested deeper than 64 levels",
                "line 9: -: invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: "
                "value has 5000 digits",
                "line 12: references: expected a string or a list of strings, got ['x', 'x', 7]"]
    return data, rejected


def test_every_record_that_can_be_scored_is(tmp_path, capsys):
    """Case 11 (issue 18): bad lines are reported one by one, the others scored, exit status 1."""
    data, rejected = hostile_vqa_lines()
    (tmp_path / "preds.jsonl").write_bytes(data)
    out = tmp_path / "scored.jsonl"
    assert score.main(["--metric", "vqa_score", "--input", str(tmp_path / "preds.jsonl"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == rejected
    assert captured.out.strip() == (f"vqa_score: mean 0.333333 over 4 examples; {len(rejected)} line(s) rejected "
                                    "(listed on stderr)")
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["score"]) for r in scored] == [(1, 1.0), (2, 0.0), (10, 1 / 3), (13, 0.0)]
    assert scored[3]["prediction"] == "\ud800"  # written back as its JSON escape


def test_empty_references_where_the_official_metric_has_no_score(tmp_path, capsys):
    write_jsonl(tmp_path / "docvqa.jsonl", [{"prediction": "abc", "references": []},
                                            {"prediction": "abc", "references": ["abd"]}])
    assert score.main(["--metric", "anls", "--input", str(tmp_path / "docvqa.jsonl")]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("line 1: references: empty list: the official metric takes the best score")
    assert "anls: mean 0.666667 over 1 examples; 1 line(s) rejected" in captured.out


def test_pointing_records_of_unusable_shapes(tmp_path, capsys):
    write_jsonl(tmp_path / "points.jsonl", [
        {"prediction": "<point x=\"50.0\" y=\"50.0\" alt=\"a\">a</point>", "image_wh": [4, 4],
         "gt_points_px": [[2, 2]], "masks": [[[True] * 4] * 4]},
        {"prediction": "x", "image_wh": [4, 4], "gt_points_px": [[2, 2]], "masks": [[[True] * 4, [True]]]},
        {"prediction": "x", "image_wh": [4, 4], "gt_points_px": [[2, 2]], "mask_key": "absent"},
        {"prediction": "x", "image_wh": "4x4", "gt_points_px": []}])
    assert score.main(["--metric", "pointing", "--input", str(tmp_path / "points.jsonl")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("line 2: -: cannot be scored (ValueError: ")
    assert err[1:] == ["line 3: mask_key: 'absent' not found: pass a masks file that holds it",
                       "line 4: image_wh: expected [width, height] in pixels, got '4x4'"]


def test_whole_file_problems_are_one_line(tmp_path, capsys):
    args = ["--metric", "vqa_score", "--input"]
    assert score.main(args + [str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.jsonl'}: cannot read: No such file or directory\n"
    (tmp_path / "empty.jsonl").write_text("\n")
    assert score.main(args + [str(tmp_path / "empty.jsonl")]) == 1
    assert capsys.readouterr().err == "line 0: -: no records: the file is empty (or only blank lines)\n"
    (tmp_path / "masks.npz").write_bytes(b"PK not a zip")
    assert score.main(args + [str(tmp_path / "empty.jsonl"), "--masks", str(tmp_path / "masks.npz")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'masks.npz'}: cannot read masks: ")
    np.save(tmp_path / "array.npy", np.zeros(3))
    assert score.main(args + [str(tmp_path / "empty.jsonl"), "--masks", str(tmp_path / "array.npy")]) == 2
    assert "not an .npz archive" in capsys.readouterr().err


def test_score_command_as_a_process_prints_no_traceback(tmp_path):
    import subprocess
    import sys
    data, rejected = hostile_vqa_lines()
    (tmp_path / "preds.jsonl").write_bytes(data)
    done = subprocess.run([sys.executable, "-m", "molmo_jax.evaluation.score", "--metric", "vqa_score",
                           "--input", str(tmp_path / "preds.jsonl")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.splitlines() == rejected, done.stderr
