"""Point parsing and the PixMo-Points-Eval pointing metric (precision / recall / F1 with masks).

Bug-compatible with allenai/molmo `olmo/util.py extract_points` and `olmo/eval/evaluators.py
PointingEval` / `is_valid_format` (behaviour note 24): `Click(x, y)` is not a valid format and is
extracted twice; coordinates above 100 pass the format check but are dropped by extraction; pixel
lookup rounds half-to-even and x = 100 % maps to column w (outside the mask).
"""
import re
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

_NUMBER = r"\d+(\.\d+)?"
# The answer must be exactly one of these (after strip), else the example scores 0.
_VALID_FORMAT = re.compile("|".join([
    # one or more "(x, y)" lines
    rf"(\(\s*-?{_NUMBER}\s*,\s*-?{_NUMBER}\s*\)\n?)+",
    # <point x=".." y=".." alt="..">label</point>
    rf'<point\s+x="\s*{_NUMBER}"\s+y="\s*{_NUMBER}"\s+alt="[\s\S]*?">[\s\S]*?</point>',
    # <points x1=".." y1=".." x2=.. .. alt="..">label</points>
    rf'<points\s+(x\d+="\s*{_NUMBER}"\s+y\d+="\s*{_NUMBER}"\s+)+alt="[\s\S]*?">[\s\S]*?</points>',
    # the 3-digit per-mille forms: <point p=xxx,yyy alt=..> and <points 1=xxx,yyy 2=.. alt=..>
    r'<point\s+p=\s*\d{3}\s*,\s*\d{3}\s+alt="[\s\S]*?">[\s\S]*?</point>',
    r'<points\s+(\d+=\s*\d{3}\s*,\s*\d{3}\s+)+alt="[\s\S]*?">[\s\S]*?</points>',
]))
# Extraction passes in the official order; each yields (x, y) in percent (per-mille for the last).
_CLICK = re.compile(r"Click\(([0-9]+\.[0-9]), ?([0-9]+\.[0-9])\)")
_TUPLE = re.compile(r"\(([0-9]+\.[0-9]),? ?([0-9]+\.[0-9])\)")
_XY_ATTRIBUTES = re.compile(r'x\d*="\s*([0-9]+(?:\.[0-9]+)?)"\s+y\d*="\s*([0-9]+(?:\.[0-9]+)?)"')
_PER_MILLE = re.compile(r"(?:\d+|p)\s*=\s*([0-9]{3})\s*,\s*([0-9]{3})")


def is_valid_format(text: str) -> bool:
    """Whether the stripped answer is exactly one pointing answer (no text around it)."""
    return _VALID_FORMAT.fullmatch(text.strip()) is not None


def extract_points(text: str, image_w: float, image_h: float) -> list[np.ndarray]:
    """All points of an answer in pixels: list of float64[2] (x, y), in the official pass order.

    Points with a coordinate above 100 % are dropped (treated as invalid output).
    """
    percent = [(float(x), float(y)) for pattern in (_CLICK, _TUPLE, _XY_ATTRIBUTES)
               for x, y in pattern.findall(text)]
    percent += [(int(x) / 10.0, int(y) / 10.0) for x, y in _PER_MILLE.findall(text)]
    points = []
    for point in percent:
        point = np.array(point)
        if np.max(point) > 100:
            continue
        points.append(point / 100.0 * np.array([image_w, image_h]))
    return points


def point_in_mask(point: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a pixel point lies in a bool[H, W] mask; Python `round` (half-to-even) per axis."""
    height, width = mask.shape
    x, y = int(round(point[0])), int(round(point[1]))
    return 0 <= x < width and 0 <= y < height and bool(mask[y, x])


def pointing_score(prediction: str, gt_points: Sequence[Sequence[float]], masks: np.ndarray | Sequence,
                   image_wh: Sequence[float]) -> dict:
    """Precision / recall / F1 of one pointing answer against ground-truth points and masks.

    gt_points: [N, 2] pixel (x, y); masks: bool[N, H, W], one instance mask per ground-truth point;
    image_wh: (w, h) used to turn percent into pixels.
    Predictions and GT points are matched one-to-one by the Hungarian algorithm on Euclidean pixel
    distance (no threshold); a match is correct iff the prediction lies in its GT's mask.
    precision = #correct / #predictions, recall = #correct / #masks, F1 = 2PR / (P + R + 1e-10).
    No GT points: all three are 1 iff no point is extracted. Invalid format: all 0.
    Where the official code raises (a valid format whose points are all dropped for being > 100,
    `cdist` on an empty array) we score 0: the answer contains no usable point.
    Returns {"precision", "recall", "f1", "valid_format", "points": [[x, y], ...]}.
    """
    prediction = prediction.strip()
    image_w, image_h = image_wh
    points = extract_points(prediction, image_w, image_h)
    valid = is_valid_format(prediction)
    result = {"valid_format": valid, "points": [p.tolist() for p in points]}
    if len(gt_points) == 0:
        score = float(len(points) == 0)
        return {**result, "precision": score, "recall": score, "f1": score}
    if not valid or not points:
        return {**result, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    points = np.stack(points)
    rows, cols = linear_sum_assignment(cdist(points, np.asarray(gt_points, np.float64)))
    correct = sum(point_in_mask(points[i], np.asarray(masks[j])) for i, j in zip(rows, cols))
    precision, recall = correct / len(points), correct / len(masks)
    f1 = 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall + 1e-10)
    return {**result, "precision": precision, "recall": recall, "f1": f1}
