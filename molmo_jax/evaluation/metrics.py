"""Score one prediction the way the Molmo evaluation counts it, for every metric by name.

`score_record(metric, record)` takes a plain dict (one line of a predictions file: the prediction plus
the fields its metric needs) and returns {"score": float, ...detail fields}. Short-answer metrics
first apply the official answer extraction (`vqa_postprocess`), as `VqaEval` does.

Metric -> record fields (an alternative name in parentheses):
  vqa_score, anls, exact_match, a_okvqa:  prediction, references (answers; a string = one reference)
  relaxed_correctness:                    prediction, references (target)
  multiple_choice:                        prediction, options, answer_idx (answer: the option text)
  real_world_qa:                          prediction, target, question_type
  mmmu:                                   prediction (response), target, question_type, options
  point_count:                            prediction, gt_count (count)
  clock:                                  prediction, hour, minute, second, is_test (default false)
  pointing:                               prediction, image_wh, gt_points_px, masks (bool[N, H, W]
                                          nested lists) or mask_key into the masks file
  math_vista (no-judge fallback):         prediction, answer, question_type, answer_type,
                                          choices, precision
"""
import random
from typing import Any, Callable, Mapping

import numpy as np

from molmo_jax.evaluation import counting, mathvista, mmmu, pointing, vqa_metrics


class RecordError(ValueError):
    """A prediction record lacks a field its metric needs, or has one of the wrong type."""


def _field(record: Mapping[str, Any], *names: str, default: Any = RecordError) -> Any:
    for name in names:
        if name in record:
            return record[name]
    if default is RecordError:
        raise RecordError(f"record has no field {' or '.join(repr(n) for n in names)} "
                          f"(fields present: {sorted(record)})")
    return default


def _references(record: Mapping[str, Any], *names: str) -> list[str]:
    references = _field(record, *names)
    if isinstance(references, str):
        return [references]
    if not isinstance(references, (list, tuple)) or not references:
        raise RecordError(f"field {names[0]!r} must be a string or a non-empty list of strings, "
                          f"got {references!r}")
    return list(references)


def _prediction(record: Mapping[str, Any]) -> str:
    return vqa_metrics.vqa_postprocess(_field(record, "prediction", "response"))


def _vqa(record, masks):
    pred = _prediction(record)
    return {"score": vqa_metrics.vqa_score(_references(record, "references", "answers"), pred),
            "parsed_prediction": vqa_metrics.preprocess_answer(pred)}


def _anls(record, masks):
    pred = _prediction(record)
    references = _references(record, "references", "answers")
    return {"score": max(vqa_metrics.anls(ref, pred) for ref in references),
            "em": float(vqa_metrics.exact_match(references, pred)), "parsed_prediction": pred}


def _relaxed(record, masks):
    pred = _prediction(record)
    references = _references(record, "references", "answers", "target")
    return {"score": float(max(vqa_metrics.relaxed_correctness(ref, pred) for ref in references)),
            "em": float(vqa_metrics.exact_match(references, pred)), "parsed_prediction": pred}


def _exact_match(record, masks):
    pred = _prediction(record)
    references = _references(record, "references", "answers")
    return {"score": float(vqa_metrics.exact_match(references, pred)), "parsed_prediction": pred}


def _multiple_choice(record, masks):
    options = _field(record, "options")
    selected = vqa_metrics.select_mc_option(_prediction(record), options)
    answer_idx = _field(record, "answer_idx", default=None)
    if answer_idx is None:
        answer = _field(record, "answer")
        if answer not in options:
            raise RecordError(f"answer {answer!r} is not one of the options {options!r}")
        answer_idx = options.index(answer)
    return {"score": float(selected == answer_idx), "selected_index": selected}


def _a_okvqa(record, masks):
    pred = _prediction(record)
    return {"score": vqa_metrics.a_okvqa_score(_references(record, "references", "answers"), pred),
            "parsed_prediction": pred}


def _real_world_qa(record, masks):
    score = vqa_metrics.real_world_qa_score(
        _field(record, "target", "answer"), _prediction(record), _field(record, "question_type"))
    return {"score": score}


def _mmmu(record, masks):
    result = mmmu.mmmu_score(_field(record, "target", "answer"), _prediction(record),
                             _field(record, "question_type"), _field(record, "options", default=()),
                             rng=random.Random(42))
    parsed = result["parsed_pred"]
    if isinstance(parsed, list):  # a set upstream: sort strings and numbers for a stable output
        parsed = (sorted(p for p in parsed if isinstance(p, str))
                  + sorted(p for p in parsed if not isinstance(p, str)))
    return {**result, "parsed_pred": parsed}


def _point_count(record, masks):
    result = counting.point_count_score(_field(record, "prediction"), int(_field(record, "gt_count", "count")))
    return {"score": result["correct"], **result}


def _clock(record, masks):
    result = counting.clock_score(
        _field(record, "prediction"), int(_field(record, "hour")), int(_field(record, "minute")),
        int(_field(record, "second")), bool(_field(record, "is_test", default=False)))
    return {"score": result["overall_close"], **result}


def _pointing(record, masks):
    gt_points = _field(record, "gt_points_px", "points")
    image_wh = _field(record, "image_wh", "image_size")
    if "masks" in record:
        gt_masks = np.asarray(record["masks"], bool)
    elif len(gt_points) == 0:
        gt_masks = np.zeros((0, int(image_wh[1]), int(image_wh[0])), bool)
    else:
        key = _field(record, "mask_key")
        if masks is None or key not in masks:
            raise RecordError(f"mask_key {key!r} not found: pass a masks file that holds it")
        gt_masks = np.asarray(masks[key], bool)
    if gt_masks.shape[0] != len(gt_points):
        raise RecordError(f"{len(gt_points)} ground-truth points but masks of shape {gt_masks.shape}")
    result = pointing.pointing_score(_field(record, "prediction"), gt_points, gt_masks, image_wh)
    return {"score": result["f1"], **result}


def _math_vista(record, masks):
    return mathvista.math_vista_score(
        _prediction(record), str(_field(record, "answer")), _field(record, "question_type"),
        _field(record, "answer_type"), _field(record, "choices", default=None) or (),
        _field(record, "precision", default=None))


METRICS: dict[str, Callable[[Mapping[str, Any], Mapping[str, np.ndarray] | None], dict]] = {
    "vqa_score": _vqa,
    "anls": _anls,
    "relaxed_correctness": _relaxed,
    "exact_match": _exact_match,
    "multiple_choice": _multiple_choice,
    "a_okvqa": _a_okvqa,
    "real_world_qa": _real_world_qa,
    "mmmu": _mmmu,
    "point_count": _point_count,
    "clock": _clock,
    "pointing": _pointing,
    "math_vista": _math_vista,
}


def score_record(metric: str, record: Mapping[str, Any],
                 masks: Mapping[str, np.ndarray] | None = None) -> dict:
    """{"score": float, ...details} of one prediction record under `metric` (see module docstring).

    masks: mask_key -> bool[N, H, W], only for "pointing" records that name a mask_key.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric](record, masks)
