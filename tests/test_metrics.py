"""Every metric case of the official Molmo evaluator (golden/metrics) reproduced exactly.

Direct function values (float64 / bool / int) are compared exactly; evaluator-pipeline values are
torchmetrics float32 means, so ours are compared after a float32 cast, as the goldens say.
"""
import json

import numpy as np
import pytest

from molmo_jax.evaluation import counting, mmmu, pointing, vqa_metrics
from molmo_jax.evaluation.metrics import RecordError, score_record


@pytest.fixture(scope="module")
def goldens(golden_dir):
    return json.loads((golden_dir / "metrics" / "metrics_goldens.json").read_text())


@pytest.fixture(scope="module")
def masks(golden_dir):
    return dict(np.load(golden_dir / "metrics" / "pointing_masks.npz"))


def assert_f32(ours, golden, case_id):
    assert golden is not None, case_id
    assert np.float32(ours) == np.float32(golden), (case_id, ours, golden)


def test_vqa_score(goldens):
    for case in goldens["vqa_score"]:
        assert vqa_metrics.preprocess_answer(case["prediction"]) == case["preprocessed_prediction"], case["id"]
        assert vqa_metrics.vqa_score(case["references"], case["prediction"]) == case["vqa_score"], case["id"]
        if "preprocessed_references" in case:
            assert [vqa_metrics.preprocess_answer(r) for r in case["references"]] == case["preprocessed_references"]
        if "vqaeval_pipeline_vqa_score" in case:
            assert_f32(score_record("vqa_score", case)["score"], case["vqaeval_pipeline_vqa_score"], case["id"])


def test_anls(goldens):
    for case in goldens["anls"]:
        for ref, golden, error in zip(case["references"], case["anls_per_reference"], case["errors_per_reference"]):
            ours = vqa_metrics.anls(ref, case["prediction"])
            if error is None:
                assert ours == golden, case["id"]
            else:  # upstream divides by zero on two empty strings; ours: equal strings score 1
                assert error.startswith("ZeroDivisionError") and ours == 1.0
        score = score_record("anls", case)["score"]
        if case["vqaeval_pipeline_error"] is None:
            assert_f32(score, case["vqaeval_pipeline_ansl"], case["id"])
        else:
            assert score == 1.0


def test_relaxed_correctness(goldens):
    for case in goldens["relaxed_correctness"]:
        if "target" in case:
            assert vqa_metrics.relaxed_correctness(case["target"], case["prediction"]) is case["relaxed_correctness"], case["id"]
            continue
        per_ref = [vqa_metrics.relaxed_correctness(r, case["prediction"]) for r in case["references"]]
        assert per_ref == case["relaxed_correctness_per_reference"], case["id"]
        result = score_record("relaxed_correctness", case)
        assert_f32(result["score"], case["vqaeval_pipeline"]["relaxed_correctness"], case["id"])
        assert_f32(result["em"], case["vqaeval_pipeline"]["em"], case["id"])


def test_exact_match(goldens):
    for case in goldens["exact_match"]:
        assert_f32(score_record("exact_match", case)["score"], case["vqaeval_pipeline_em"], case["id"])


def test_multiple_choice(goldens):
    for case in goldens["multiple_choice"]:
        selected = vqa_metrics.select_mc_option(case["prediction"], case["options"])
        if case["error"] is None:
            assert selected == case["selected_index"], case["id"]
        else:  # colliding options: upstream asserts, ours picks the first of the colliding ones
            assert case["error"].startswith("AssertionError")
            normalized = [o.lower().strip() for o in case["options"]]
            assert selected == normalized.index(case["prediction"].lower().strip())
        for key, golden in case.items():
            if key.startswith("vqaeval_pipeline_mc_if_answer_idx_"):
                answer_idx = int(key.rsplit("_", 1)[1])
                result = score_record("multiple_choice", {**case, "answer_idx": answer_idx})
                assert_f32(result["score"], golden, f"{case['id']}:{answer_idx}")


def test_a_okvqa_and_real_world_qa(goldens):
    for case in goldens["a_okvqa_and_realworldqa"]:
        if case["kind"] == "a_okvqa_score":
            assert vqa_metrics.a_okvqa_score(case["references"], case["prediction"]) == case["score"]
            assert score_record("a_okvqa", case)["score"] == case["score"], case["id"]
        else:
            direct = vqa_metrics.real_world_qa_score(case["target"], case["prediction"], case["question_type"])
            assert direct == float(case["score"]), case["id"]
            assert score_record("real_world_qa", case)["score"] == float(case["score"]), case["id"]


def test_mmmu(goldens):
    for case in goldens["mmmu"]:
        result = score_record("mmmu", case)
        if case["question_type"] == "multiple-choice":
            assert result["random_fallback"] == case["random_fallback"], case["id"]
            if case["random_fallback"]:
                continue  # upstream draws from a global random stream: only the path is reproducible
            assert result["parsed_pred"] == case["parsed_pred"], case["id"]
        else:
            parsed = mmmu.parse_open(case["response"])
            assert sorted(p for p in parsed if isinstance(p, str)) == case["parsed_pred_strings"], case["id"]
            assert sorted(p for p in parsed if not isinstance(p, str)) == case["parsed_pred_numbers"], case["id"]
        assert result["score"] == case["mmmu_score"], case["id"]


def test_point_count(goldens):
    for case in goldens["point_count"]:
        result = score_record("point_count", case)
        for key in ("correct", "close", "valid"):
            assert_f32(result[key], case[key], f"{case['id']}:{key}")
        assert result["score"] == result["correct"]


def test_clock(goldens):
    for case in goldens["clock"]:
        result = counting.clock_score(case["prediction"], case["hour"], case["minute"], case["second"], case["is_test"])
        for key, golden in case["metrics"].items():
            if golden is None:  # NaN upstream: the metric does not apply to this example
                assert result[key] is None, (case["id"], key)
            else:
                assert_f32(result[key], golden, f"{case['id']}:{key}")
        assert score_record("clock", case)["score"] == result["overall_close"]


def test_pointing(goldens, masks):
    for case in goldens["pointing"]:
        w, h = case["image_wh"]
        assert pointing.is_valid_format(case["prediction"]) == case["is_valid_format"], case["id"]
        extracted = [p.tolist() for p in pointing.extract_points(case["prediction"], w, h)]
        assert extracted == case["extracted_points_px"], case["id"]
        result = score_record("pointing", case, masks)
        if case["error"] is not None:  # upstream cdist crash on all-dropped points: ours scores 0
            assert case["error"].startswith("ValueError") and result["f1"] == 0.0
            continue
        for key in ("precision", "recall", "f1"):
            assert_f32(result[key], case[key], f"{case['id']}:{key}")


def test_point_parsing(goldens):
    for case in goldens["point_parsing"]:
        w, h = case["image_wh"]
        assert pointing.is_valid_format(case["text"]) == case["is_valid_format"], case["id"]
        extracted = [p.tolist() for p in pointing.extract_points(case["text"], w, h)]
        assert extracted == case["extract_points_px"], case["id"]


def test_record_errors_name_the_field():
    with pytest.raises(RecordError, match=r"^references: missing \(or 'answers'\)") as info:
        score_record("vqa_score", {"prediction": "x"})
    assert info.value.field == "references"
    for metric, record, field in [
            ("vqa_score", {"prediction": 3, "references": ["3"]}, "prediction"),
            ("vqa_score", {"prediction": "3", "answers": ["3", None]}, "answers"),
            ("point_count", {"prediction": "3", "gt_count": "3"}, "gt_count"),
            ("point_count", {"prediction": "3", "count": True}, "count"),
            ("clock", {"prediction": "3:00", "hour": 3, "minute": 0.5, "second": 0}, "minute"),
            ("multiple_choice", {"prediction": "a", "options": [], "answer_idx": 0}, "options"),
            ("multiple_choice", {"prediction": "a", "options": ["a", "b"], "answer_idx": "0"}, "answer_idx"),
            ("pointing", {"prediction": "", "image_wh": [4], "gt_points_px": []}, "image_wh"),
            ("pointing", {"prediction": "", "image_wh": [4, 4], "gt_points_px": [[1, 10 ** 400]]}, "gt_points_px[0]"),
            ("anls", {"prediction": "x", "references": []}, "references")]:
        with pytest.raises(RecordError) as info:
            score_record(metric, record)
        assert info.value.field == field, (metric, record)
    with pytest.raises(ValueError, match="unknown metric"):
        score_record("bleu", {"prediction": "x"})
    with pytest.raises(ValueError, match="mask_key"):
        score_record("pointing", {"prediction": "(1.0, 1.0)", "image_wh": [4, 4],
                                  "gt_points_px": [[1, 1]], "mask_key": "k"})


def test_empty_references_follow_the_official_code():
    """Upstream scores an empty list 0.0 where its formula is a count (vqa_score, a_okvqa) or a
    membership test (em); anls and relaxed_correctness take max() over it and raise: RecordError."""
    for metric in ("vqa_score", "exact_match", "a_okvqa"):
        assert score_record(metric, {"prediction": "yes", "references": []})["score"] == 0.0
    for metric in ("anls", "relaxed_correctness"):
        with pytest.raises(RecordError, match="^references: empty list"):
            score_record(metric, {"prediction": "yes", "references": []})


def test_math_vista_fallback():
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["cat", "dog", "bird"]}
    assert score_record("math_vista", {**mc, "prediction": "B", "answer": "dog"})["score"] == 1.0
    assert score_record("math_vista", {**mc, "prediction": "dgo", "answer": "dog"})["extracted"] == "cat"
    num = {"question_type": "free_form", "answer_type": "float", "precision": 2.0, "choices": None}
    assert score_record("math_vista", {**num, "prediction": "3.14159", "answer": "3.14"})["score"] == 1.0
    assert score_record("math_vista", {**num, "prediction": "about 3", "answer": "3.14"})["extracted"] is None
    integer = {"question_type": "free_form", "answer_type": "integer", "precision": None}
    assert score_record("math_vista", {**integer, "prediction": "7.0", "answer": "7"})["score"] == 1.0


def test_point_count_read_none_is_opt_in():
    """Upstream's "none" rule never matches (its regex is a non-raw string); read_none applies it
    as meant, so the official zero-count answer reads as 0. The default stays bug-compatible."""
    assert counting.parse_count("There are none.") is None
    assert counting.parse_count("There are none.", read_none=True) == 0
    assert counting.parse_count("None of them", read_none=True) == 0
    assert counting.parse_count("nonetheless 3", read_none=True) == 3        # official rules come first
    assert counting.parse_count("nonetheless", read_none=True) is None       # whole word only
    assert counting.point_count_score("There are none.", 0, read_none=True)["correct"] == 1.0
    assert counting.point_count_score("There are none.", 2, read_none=True)["correct"] == 0.0
