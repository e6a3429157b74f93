"""Score one prediction the way the Molmo evaluation counts it, for every metric by name.

`score_record(metric, record)` takes a plain dict (one line of a predictions file: the prediction plus
the fields its metric needs) and returns {"score": float, ...detail fields}. Short-answer metrics
first apply the official answer extraction (`vqa_postprocess`), as `VqaEval` does. A record that lacks
a field or holds one of the wrong type raises `RecordError` naming the field. An empty references
list scores what the official code gives: 0.0 for vqa_score, exact_match and a_okvqa; anls and
relaxed_correctness take a max over the references there and fail, so it is a RecordError.

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
Molmo2 (video_metrics.py; masks are bool[H, W] nested lists or COCO RLE {"size", "counts"}):
  video_point:                            prediction, video_wh, video_duration, gt_triplets [[t, x, y]
                                          px], gt_masks [per point {time: mask}]
  video_count:                            prediction, count (gt_count)
  video_track:                            prediction, video_wh, video_fps, gt_tracks [{frame, points:
                                          {object: {point: [x, y]}}}], gt_masks {object: [mask per
                                          frame or None] or [{frame, mask}]}
  nextqa_mc, muir_bench_mc:               prediction, options, answer (the letter) or answer_idx
  perception_test_mc:                     prediction, answer_idx
  mlvu_mc:                                prediction, answer (the letter)
"""
import numbers
import random
import string
from typing import Any, Callable, Mapping

import numpy as np

from data_pipelines.jsonl import is_finite_number, show
from molmo_jax.evaluation import counting, mathvista, mmmu, pointing, video_metrics, vqa_metrics


class RecordError(ValueError):
    """A prediction record lacks a field its metric needs, or has one of the wrong type."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


def _name(record: Mapping[str, Any], names: tuple[str, ...]) -> str:
    """The first of `names` present in `record` (the first name when none is)."""
    return next((n for n in names if n in record), names[0])


def _field(record: Mapping[str, Any], *names: str, default: Any = RecordError) -> Any:
    for name in names:
        if name in record:
            return record[name]
    if default is RecordError:
        also = f" (or {' or '.join(repr(n) for n in names[1:])})" if names[1:] else ""
        raise RecordError(names[0], f"missing{also}; fields present: {show(sorted(record))}")
    return default


def _text(record: Mapping[str, Any], *names: str) -> str:
    value = _field(record, *names)
    if not isinstance(value, str):
        raise RecordError(_name(record, names), f"expected a string, got {show(value)}")
    return value


def _integer(record: Mapping[str, Any], *names: str) -> int:
    """An integer field (an integral float such as 3.0 is accepted, a bool or a string is not)."""
    value = _field(record, *names)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RecordError(_name(record, names), f"expected an integer, got {show(value)}")
    return int(value)


def _strings(record: Mapping[str, Any], *names: str, allow_empty: bool = True) -> list[str]:
    """A list of strings (a plain string is a list of one)."""
    value = _field(record, *names)
    if isinstance(value, str):
        return [value]
    name = _name(record, names)
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
        raise RecordError(name, f"expected a string or a list of strings, got {show(value)}")
    if not value and not allow_empty:
        raise RecordError(name, "empty list: the official metric takes the best score over the "
                                "references and has none to take")
    return list(value)


def _points(record: Mapping[str, Any], *names: str) -> list:
    """A list of [x, y] pairs of finite numbers (a float[N, 2] array from a library caller too)."""
    value = _field(record, *names)
    value = value.tolist() if isinstance(value, np.ndarray) else value
    name = _name(record, names)
    if not isinstance(value, (list, tuple)):
        raise RecordError(name, f"expected a list of [x, y] points, got {show(value)}")
    for i, point in enumerate(value):
        if not (isinstance(point, (list, tuple)) and len(point) == 2 and all(is_finite_number(v) for v in point)):
            raise RecordError(f"{name}[{i}]", f"expected [x, y] numbers, got {show(point)}")
    return value


def _prediction(record: Mapping[str, Any]) -> str:
    return vqa_metrics.vqa_postprocess(_text(record, "prediction", "response"))


def _vqa(record, masks):
    pred = _prediction(record)
    return {"score": vqa_metrics.vqa_score(_strings(record, "references", "answers"), pred),
            "parsed_prediction": vqa_metrics.preprocess_answer(pred)}


def _anls(record, masks):
    pred = _prediction(record)
    references = _strings(record, "references", "answers", allow_empty=False)
    return {"score": max(vqa_metrics.anls(ref, pred) for ref in references),
            "em": float(vqa_metrics.exact_match(references, pred)), "parsed_prediction": pred}


def _relaxed(record, masks):
    pred = _prediction(record)
    references = _strings(record, "references", "answers", "target", allow_empty=False)
    return {"score": float(max(vqa_metrics.relaxed_correctness(ref, pred) for ref in references)),
            "em": float(vqa_metrics.exact_match(references, pred)), "parsed_prediction": pred}


def _exact_match(record, masks):
    pred = _prediction(record)
    references = _strings(record, "references", "answers")
    return {"score": float(vqa_metrics.exact_match(references, pred)), "parsed_prediction": pred}


def _multiple_choice(record, masks):
    options = _strings(record, "options")
    if not options:
        raise RecordError("options", "empty list: there is no option to select")
    selected = vqa_metrics.select_mc_option(_prediction(record), options)
    if "answer_idx" in record:
        answer_idx = _integer(record, "answer_idx")  # out of range: never selected, 0.0 as upstream
    else:
        answer = _text(record, "answer")
        if answer not in options:
            raise RecordError("answer", f"{show(answer)} is not one of the options {show(options)}")
        answer_idx = options.index(answer)
    return {"score": float(selected == answer_idx), "selected_index": selected}


def _a_okvqa(record, masks):
    pred = _prediction(record)
    return {"score": vqa_metrics.a_okvqa_score(_strings(record, "references", "answers"), pred),
            "parsed_prediction": pred}


def _real_world_qa(record, masks):
    score = vqa_metrics.real_world_qa_score(
        _text(record, "target", "answer"), _prediction(record), _text(record, "question_type"))
    return {"score": score}


def _mmmu(record, masks):
    options = _strings(record, "options") if "options" in record else ()
    result = mmmu.mmmu_score(_strings(record, "target", "answer"), _prediction(record),
                             _text(record, "question_type"), options,
                             rng=random.Random(42))
    parsed = result["parsed_pred"]
    if isinstance(parsed, list):  # a set upstream: sort strings and numbers for a stable output
        parsed = (sorted(p for p in parsed if isinstance(p, str))
                  + sorted(p for p in parsed if not isinstance(p, str)))
    return {**result, "parsed_pred": parsed}


def _point_count(record, masks):
    result = counting.point_count_score(_text(record, "prediction"), _integer(record, "gt_count", "count"))
    return {"score": result["correct"], **result}


def _clock(record, masks):
    result = counting.clock_score(
        _text(record, "prediction"), _integer(record, "hour"), _integer(record, "minute"),
        _integer(record, "second"), bool(_field(record, "is_test", default=False)))
    return {"score": result["overall_close"], **result}


def _pointing(record, masks):
    gt_points = _points(record, "gt_points_px", "points")
    image_wh = _field(record, "image_wh", "image_size")
    image_wh = image_wh.tolist() if isinstance(image_wh, np.ndarray) else image_wh
    if not (isinstance(image_wh, (list, tuple)) and len(image_wh) == 2
            and all(is_finite_number(v) and v >= 1 for v in image_wh)):
        raise RecordError(_name(record, ("image_wh", "image_size")),
                          f"expected [width, height] in pixels, got {show(image_wh)}")
    if "masks" in record:
        gt_masks = np.asarray(record["masks"], bool)
    elif len(gt_points) == 0:
        gt_masks = np.zeros((0, int(image_wh[1]), int(image_wh[0])), bool)
    else:
        key = _field(record, "mask_key")
        if masks is None or key not in masks:
            raise RecordError("mask_key", f"{show(key)} not found: pass a masks file that holds it")
        gt_masks = np.asarray(masks[key], bool)
    if gt_masks.shape[0] != len(gt_points):
        raise RecordError("masks", f"{len(gt_points)} ground-truth points but masks of shape {gt_masks.shape}")
    result = pointing.pointing_score(_text(record, "prediction"), gt_points, gt_masks, image_wh)
    return {"score": result["f1"], **result}


def _math_vista(record, masks):
    return mathvista.math_vista_score(
        _prediction(record), str(_field(record, "answer")), _text(record, "question_type"),
        _text(record, "answer_type"), _field(record, "choices", default=None) or (),
        _field(record, "precision", default=None))


def _size(record, *names: str) -> list:
    value = _field(record, *names)
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_finite_number(v) and v >= 1 for v in value)):
        raise RecordError(_name(record, names), f"expected [width, height] in pixels, got {show(value)}")
    return list(value)


def _positive(record, *names: str) -> float:
    value = _field(record, *names)
    if not (is_finite_number(value) and value > 0):
        raise RecordError(_name(record, names), f"expected a positive number, got {show(value)}")
    return float(value)


def _timed_masks(record) -> list[dict]:
    """gt_masks of video_point: per ground-truth point {time: bool[H, W]} (JSON keys are strings)."""
    value = _field(record, "gt_masks")
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, Mapping) for m in value):
        raise RecordError("gt_masks", f"expected a list of {{time: mask}} objects, got {show(value)}")
    try:
        return [{float(t): video_metrics.as_mask(m) for t, m in masks.items()} for masks in value]
    except (TypeError, ValueError) as e:
        raise RecordError("gt_masks", f"cannot read a time or a mask ({e})") from e


def _video_point(record, masks):
    triplets = _field(record, "gt_triplets")
    if not (isinstance(triplets, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 3 and all(is_finite_number(v) for v in p) for p in triplets)):
        raise RecordError("gt_triplets", f"expected a list of [t, x, y] numbers, got {show(triplets)}")
    gt_masks = _timed_masks(record)
    if len(gt_masks) != len(triplets):
        raise RecordError("gt_masks", f"{len(gt_masks)} mask sets for {len(triplets)} ground-truth points")
    width, height = _size(record, "video_wh")
    result = video_metrics.video_point_score(_text(record, "prediction"), triplets, gt_masks,
                                             _positive(record, "video_duration"), width, height)
    return {"score": result["f1"], **result}


def _video_count(record, masks):
    result = video_metrics.video_count_score(_text(record, "prediction"), _integer(record, "count", "gt_count"))
    return {"score": result["correct"], **result}


def _video_track(record, masks):
    tracks, gt_masks = _field(record, "gt_tracks"), _field(record, "gt_masks")
    if not (isinstance(tracks, (list, tuple)) and all(isinstance(t, Mapping) and "frame" in t and "points" in t
                                                      for t in tracks)):
        raise RecordError("gt_tracks", f"expected a list of {{frame, points}} objects, got {show(tracks)}")
    if not isinstance(gt_masks, Mapping):
        raise RecordError("gt_masks", f"expected {{object: masks}}, got {show(gt_masks)}")
    width, height = _size(record, "video_wh")
    result = video_metrics.track_score(_text(record, "prediction"), tracks, gt_masks, int(width), int(height),
                                       _positive(record, "video_fps"))
    return {"score": result["f1"], **result}


def _letter_answer(record, options) -> str:
    if "answer_idx" in record:
        index = _integer(record, "answer_idx")
        return string.ascii_uppercase[index] if 0 <= index < len(options) else ""
    return _text(record, "answer")


def _nextqa(record, masks):
    options = _strings(record, "options")
    if len(options) < 5:
        raise RecordError("options", f"NExT-QA answers are read against 5 options, got {len(options)}")
    choice = video_metrics.nextqa_choice(_text(record, "prediction"), options, random.Random(42))
    return {"score": float(choice == _letter_answer(record, options)), "choice": choice}


def _muir_bench(record, masks):
    options = _strings(record, "options")
    if not options:
        raise RecordError("options", "empty list: there is no option to select")
    choice = video_metrics.muir_bench_choice(_text(record, "prediction"), options, random.Random(42))
    return {"score": float(choice == _letter_answer(record, options)), "choice": choice}


def _perception_test(record, masks):
    choice = video_metrics.perception_test_choice(_text(record, "prediction"))
    return {"score": float(choice == _integer(record, "answer_idx")), "selected_index": choice}


def _mlvu(record, masks):
    choice = video_metrics.mlvu_choice(_text(record, "prediction"))
    return {"score": float(choice == _text(record, "answer")), "choice": choice}


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
    "video_point": _video_point,
    "video_count": _video_count,
    "video_track": _video_track,
    "nextqa_mc": _nextqa,
    "muir_bench_mc": _muir_bench,
    "perception_test_mc": _perception_test,
    "mlvu_mc": _mlvu,
}


def score_record(metric: str, record: Mapping[str, Any],
                 masks: Mapping[str, np.ndarray] | None = None) -> dict:
    """{"score": float, ...details} of one prediction record under `metric` (see module docstring).

    masks: mask_key -> bool[N, H, W], only for "pointing" records that name a mask_key.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric](record, masks)
