"""Molmo2's video metrics: video pointing F1, video counting, tracking P/R/F1 and HOTA, video and
multi-image multiple choice. One answer at a time; `metrics.py` reads the records.

Bug-compatible transcriptions of allenai/molmo2 `olmo/eval/evaluators.py` (`VixMoPointEval`,
`VixMoPointCountEval`, `VideoObjectTrackingEval`), `olmo/eval/object_tracking_utils.py`
(`evaluate_video_tracks_with_masks`, `HOTAMetric`) and `olmo/eval/vqa.py` (`nextqa_mc`,
`muir_bench_mc`, `select_perception_test_option`, `mlvu_mc`). Kept on purpose, as upstream:
- video pointing matches predictions to ground truth on (t, x, y) normalised to 0..100 (rounded to
  0.1) and then checks each prediction against the mask of its match at exactly its timestamp;
- tracking matches per frame on pixel distance, but indexes the frame's masks (one per object of
  the video, in mask order) with the match's position among the frame's ground-truth points, and
  divides recall by the number of objects, not of points in the frame;
- HOTA similarity is 1 for a point inside the mask, else 0, so every alpha threshold gives the same
  value: it is computed once (upstream reports alpha 0.5);
- the counting "none" rule never matches (the non-raw "\\b" of upstream, see counting.py).
"""
import math
import random
import re
import string
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from data_pipelines.sources.molmo2_media import decode_rle
from molmo_jax.evaluation import counting, video_points
from molmo_jax.evaluation.pointing import point_in_mask

_TOTAL = re.compile(r"(?:a total of|the total number(?:\s+of\s+.+?)?\s+is:)\s*(\d+)\.?", re.IGNORECASE)
_EPS = float(np.finfo(float).eps)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall + 1e-10)


def _normalise(triplets, duration: float, width: float, height: float) -> np.ndarray:
    """(t, x, y) -> percent of the duration / width / height, rounded to 0.1 (normalize_timestamps_and_points)."""
    return np.array([(round(t / duration * 100, 1), round(x / width * 100, 1), round(y / height * 100, 1))
                     for t, x, y in triplets], np.float64).reshape(-1, 3)


def video_point_score(prediction: str, gt_triplets: Sequence, gt_masks: Sequence[Mapping[float, np.ndarray]],
                      duration: float, width: float, height: float) -> dict:
    """Precision / recall / F1 of one video pointing answer (`VixMoPointEval`).

    gt_triplets: [(t s, x px, y px)], one per ground-truth point; gt_masks: per ground-truth point
    {t: bool[H, W]}. A prediction is correct when it lies in the mask of its Hungarian match at its
    own timestamp. No ground truth: 1 iff nothing is predicted; nothing predicted: 0.
    """
    preds = video_points.video_points(prediction, width, height)
    result = {"valid": float(len(preds) > 0), "points": [list(p) for p in preds]}
    if len(gt_triplets) == 0:
        score = float(len(preds) == 0)
        return {**result, "precision": score, "recall": score, "f1": score}
    if not preds:
        return {**result, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    rows, cols = linear_sum_assignment(cdist(_normalise(preds, duration, width, height),
                                             _normalise(gt_triplets, duration, width, height)))
    correct = sum(preds[i][0] in gt_masks[j] and point_in_mask(np.array(preds[i][1:]), gt_masks[j][preds[i][0]])
                  for i, j in zip(rows, cols))
    precision, recall = correct / len(preds), correct / len(gt_masks)
    return {**result, "precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def parse_video_count(prediction: str) -> int | None:
    """The count of a video counting answer (`VixMoPointCountEval`): the whole answer as an int,
    else "a total of N" / "the total number of ... is: N"; None when neither reads."""
    pred = prediction.strip().lower().rstrip(".").strip()
    try:
        return int(pred)
    except ValueError:
        pass
    match = _TOTAL.search(pred)
    if match:
        return int(match.group(1))
    return 0 if counting.NEVER_MATCHING_NONE.match(pred) else None


def video_count_score(prediction: str, gt_count: int) -> dict:
    """{"correct", "close" (|pred - gt| <= 1 + floor(5 % of gt)), "valid", "count"}."""
    count = parse_video_count(prediction)
    if count is None:
        return {"correct": 0.0, "close": 0.0, "valid": 0.0, "count": None}
    return {"correct": float(count == gt_count), "close": float(abs(gt_count - count) <= 1 + math.floor(0.05 * gt_count)),
            "valid": 1.0, "count": count}


def as_mask(mask) -> np.ndarray:
    """bool[H, W] from an array, nested lists or a COCO RLE {"size", "counts"} (`ann_to_mask`)."""
    return decode_rle(mask) if isinstance(mask, Mapping) else np.asarray(mask, bool)


COUNT_SUBSETS = ("object", "animal", "action/event")  # VixMoPointCountEval.SUBSETS
COUNT_BINS = (0, 5, 10, 15, 20, 25)


def video_count_breakdown(examples: Sequence[tuple[int, float, str]]) -> dict:
    """The per-set figures of `VixMoPointCountEval` over (gt count, correct, subset) triples:
    "correct_{lo}_{hi}" for the ground-truth count bins [0, 5), [5, 10), ... [25, max count + 1) and
    "acc_{subset}" for its three subsets; NaN for an empty one (upstream's mean of nothing)."""
    by_count: dict[int, list[float]] = {}
    by_subset: dict[str, list[float]] = {}
    for gt, correct, subset in examples:
        by_count.setdefault(int(gt), []).append(correct)
        by_subset.setdefault(subset, []).append(correct)
    top = max(by_count, default=-1) + 1
    out = {}
    for lo, hi in zip(COUNT_BINS, COUNT_BINS[1:] + (top,)):
        hits = [c for n in range(lo, hi) for c in by_count.get(n, ())]
        out[f"correct_{lo}_{hi}"] = float(np.mean(hits)) if hits else math.nan
    for subset in COUNT_SUBSETS:
        hits = by_subset.get(subset, [])
        out[f"acc_{subset}"] = float(np.mean(hits)) if hits else math.nan
    return out


def masks_at_frame(gt_masks: Mapping[str, Sequence], frame: int, height: int, width: int) -> list[np.ndarray]:
    """One bool[H, W] per object of `gt_masks` at `frame` (`load_masks_at_frame`): an object's list is
    either one mask (or None) per frame, or entries {"frame", "mask"}; empty where none is given."""
    out = []
    for masks in gt_masks.values():
        first = next((m for m in masks if m is not None), None)
        mask = np.zeros((height, width), bool)
        if isinstance(first, Mapping) and "frame" in first:
            found = next((m["mask"] for m in masks if m["mask"] is not None and m["frame"] == frame), None)
            mask = mask if found is None else as_mask(found)
        elif first is not None and frame < len(masks) and masks[frame] is not None:
            mask = as_mask(masks[frame])
        out.append(mask)
    return out


def _frame_scores(preds, gts, masks) -> tuple[float, float, float]:
    if len(gts) == 0:
        score = float(len(preds) == 0)
        return score, score, score
    if len(preds) == 0:
        return 0.0, 0.0, 0.0
    rows, cols = linear_sum_assignment(cdist(np.array(preds, float), np.array(gts, float)))
    correct = sum(point_in_mask(np.array(preds[i]), masks[j]) for i, j in zip(rows, cols))
    precision, recall = correct / len(preds), correct / len(masks)
    return precision, recall, _f1(precision, recall)


def _hota(pred_tracks, gt_tracks, gt_masks, height, width) -> dict:
    """HOTA, DetA, AssA with 0/1 point-in-mask similarity (`HOTAMetric`, one alpha)."""
    pred_by, gt_by = {e["frame"]: e for e in pred_tracks}, {e["frame"]: e for e in gt_tracks}
    gt_ids = {str(k): i for i, k in enumerate(sorted({k for e in gt_tracks for k in e["points"]}))}
    pred_ids = {str(k): i for i, k in enumerate(sorted({k for e in pred_tracks for k in e["points"]}))}
    frames = []
    for frame in sorted(set(pred_by) | set(gt_by)):
        gt = sorted(gt_by[frame]["points"].items()) if frame in gt_by else []
        pred = sorted(pred_by[frame]["points"].items()) if frame in pred_by else []
        sim = np.zeros((len(gt), len(pred)))
        if gt and pred:
            masks = masks_at_frame(gt_masks, frame, height, width)
            for i, mask in zip(range(len(gt)), masks):
                for j, (_, p) in enumerate(pred):
                    sim[i, j] = float(point_in_mask(np.array(p["point"]), mask))
        frames.append((np.array([gt_ids[str(k)] for k, _ in gt], int), np.array([pred_ids[str(k)] for k, _ in pred], int),
                       sim))
    n_gt, n_pred = sum(len(g) for g, _, _ in frames), sum(len(p) for _, p, _ in frames)
    if n_gt == 0 and n_pred == 0:
        return {"HOTA": 1.0, "DetA": 1.0, "AssA": 1.0}
    if n_gt == 0 or n_pred == 0:
        return {"HOTA": 0.0, "DetA": 0.0, "AssA": 0.0}
    potential = np.zeros((len(gt_ids), len(pred_ids)))
    gt_count, pred_count = np.zeros((len(gt_ids), 1)), np.zeros((1, len(pred_ids)))
    for g, p, sim in frames:
        denom = sim.sum(0)[None, :] + sim.sum(1)[:, None] - sim
        iou = np.zeros_like(sim)
        keep = denom > 0 + _EPS
        iou[keep] = sim[keep] / denom[keep]
        potential[g[:, None], p[None, :]] += iou
        gt_count[g] += 1
        pred_count[0, p] += 1
    alignment = potential / (gt_count + pred_count - potential + _EPS)
    matches = np.zeros_like(potential)
    tp = fn = fp = 0
    for g, p, sim in frames:
        if len(g) == 0 or len(p) == 0:
            fp, fn = fp + len(p), fn + len(g)
            continue
        rows, cols = linear_sum_assignment(-(alignment[g[:, None], p[None, :]] * sim))
        hit = sim[rows, cols] >= 0.5 - _EPS
        tp, fn, fp = tp + int(hit.sum()), fn + len(g) - int(hit.sum()), fp + len(p) - int(hit.sum())
        np.add.at(matches, (g[rows[hit]], p[cols[hit]]), 1)
    ass = matches / np.maximum(1, gt_count + pred_count - matches)
    ass_a = float(np.sum(matches * ass) / max(1, tp))
    det_a = tp / max(1, tp + fn + fp)
    return {"HOTA": math.sqrt(det_a * ass_a), "DetA": det_a, "AssA": ass_a}


def track_score(prediction: str, gt_tracks: Sequence[Mapping], gt_masks: Mapping[str, Sequence],
                width: int, height: int, video_fps: float) -> dict:
    """Tracking P / R / F1 (means over the frames with a prediction or ground truth) and HOTA of one
    answer (`VideoObjectTrackingEval`). gt_tracks: [{"frame", "points": {object: {"point": [x, y]}}}]
    in pixels; gt_masks: {object: masks, see masks_at_frame}."""
    pred_tracks = video_points.video_tracks(prediction, width, height, video_fps)
    pred_by, gt_by = {e["frame"]: e for e in pred_tracks}, {e["frame"]: e for e in gt_tracks}
    frames = sorted(set(pred_by) | set(gt_by))
    scores = [_frame_scores([tuple(p["point"]) for p in pred_by[f]["points"].values()] if f in pred_by else [],
                            [tuple(p["point"]) for p in gt_by[f]["points"].values()] if f in gt_by else [],
                            masks_at_frame(gt_masks, f, height, width)) for f in frames]
    precision, recall, f1 = (float(np.mean(s)) for s in zip(*scores)) if scores else (1.0, 1.0, 1.0)
    return {"precision": precision, "recall": recall, "f1": f1, "frames": len(frames),
            **_hota(pred_tracks, gt_tracks, gt_masks, height, width)}


# ---------------------------------------------------------------------------------------------------
# Multiple choice with letters (NExT-QA, MuirBench / MMIU, PerceptionTest, MLVU).

def _strip_response(response: str) -> str:
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    return " " + response + " "  # spaces avoid partial matches


def _last(candidates, response, marks) -> str:
    """The candidate written last, `marks(c)` giving the text searched for each candidate."""
    return candidates[int(np.argmax([response.rfind(marks(c)) for c in candidates]))]


def nextqa_choice(response: str, options: Sequence[str], rng: random.Random) -> str:
    """The letter a NExT-QA answer picks (`nextqa_parse_multi_choice_response`); needs 5 options.
    "(A)", else " A ", else "A."; else for answers over 5 words the option texts; else a random letter."""
    if len(options) < 5:
        raise ValueError(f"NExT-QA parsing reads 5 options, got {len(options)}")
    choices = list("ABCDE")
    answers = {c: options[i].strip() for i, c in enumerate(choices)}
    response = _strip_response(response)
    for mark in (lambda c: f"({c})", lambda c: f" {c} ", lambda c: f"{c}."):
        candidates = [c for c in choices if mark(c) in response]
        if candidates:
            return _last(candidates, response, mark)
    if len(response.split()) > 5:
        candidates = [c for c, a in answers.items() if a.lower() in response.lower()]
        if candidates:
            return candidates[int(np.argmax([response.lower().rfind(answers[c].lower()) for c in candidates]))]
    return rng.choice(choices)


def muir_bench_choice(response: str, options: Sequence[str], rng: random.Random | None) -> str:
    """The letter a MuirBench / MMIU answer picks (`muir_bench_parse_multi_choice_response`): the
    candidates of every marked form "(A)", "A)", "A.", "A:" together (the last one written by the
    first form that found any), else a bare letter, else option texts (answers over 5 words), else a
    random letter (rng None: "N/A")."""
    choices = list(string.ascii_uppercase[:len(options)])
    answers = {c: o.strip() for c, o in zip(choices, options)}
    response = _strip_response(response)
    marks = [lambda c: f"({c})", lambda c: f"{c})", lambda c: f"{c}.", lambda c: f"{c}:"]
    found = [[c for c in choices if mark(c) in response] for mark in marks]
    candidates = [c for group in found for c in group]
    first_mark = next((mark for mark, group in zip(marks, found) if group), None)
    if not candidates:
        for c in choices:
            if response.strip() == c:
                return c
        candidates, first_mark = [c for c in choices if f" {c} " in response], (lambda c: f" {c} ")
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates, by_text = [c for c, a in answers.items() if a.lower() in response.lower()], True
    if not candidates:
        return rng.choice(choices) if rng is not None else "N/A"
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        return candidates[int(np.argmax([response.lower().rfind(answers[c].lower()) for c in candidates]))]
    return _last(candidates, response, first_mark)


def perception_test_choice(prediction: str) -> int:
    """0..3 for the first standalone letter A-D of the answer, -1 without one."""
    match = re.search(r"\b([A-D])\b", prediction.strip())
    return "ABCD".index(match.group(1)) if match else -1


def mlvu_choice(prediction: str) -> str:
    """The character before the first ")" of the answer, else the whole stripped answer."""
    s = prediction.strip()
    return s[s.index(")") - 1:s.index(")")] if ")" in s else s
