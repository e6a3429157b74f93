"""Molmo2 video / multi-image metrics on fixture cases; every expected value is worked out by hand from
the official code's rules (allenai/molmo2 olmo/eval/evaluators.py, object_tracking_utils.py, vqa.py)."""
import json
import math

import numpy as np
import pytest

from molmo_jax.evaluation import score, video_metrics, video_points
from molmo_jax.evaluation.metrics import RecordError, score_record


def box(y0, y1, x0, x1, shape=(100, 200)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_point_answers_are_read_in_both_formats():
    # 0..1000 scale on a 200 x 100 video; 1200 -> 240 px is outside the frame and dropped
    text = '<points coords="0.5 1 500 250;1.0 1 100 900 2 1000 1000 3 1200 100">dogs</points>'
    assert video_points.video_points(text, 200, 100) == [(0.5, 100.0, 25.0), (1.0, 20.0, 90.0), (1.0, 200.0, 100.0)]
    # legacy: 0..100 scale, a coordinate above 100 drops that point, a short triple voids the answer
    assert video_points.video_points("<points 0.5 1 50.0 25.0 2 120.0 10.0 />", 200, 100) == [(0.5, 100.0, 25.0)]
    assert video_points.video_points("<points 0.5 1 50.0 />", 200, 100) == []
    tracks = video_points.video_tracks('<tracks coords="0.0 1 100 100 1 200 200;0.5 2 500 500">x</tracks>', 200, 100, 10)
    # a repeated object index in one frame keeps its first point; frame = round(t * fps)
    assert tracks == [{"time": 0.0, "frame": 0, "points": {"1": {"point": [20.0, 10.0]}}},
                      {"time": 0.5, "frame": 5, "points": {"2": {"point": [100.0, 50.0]}}}]


def test_video_point_f1_matches_on_normalised_time_and_checks_the_mask_at_that_time():
    gt = [(1.0, 50.0, 50.0), (2.0, 150.0, 50.0)]
    masks = [{1.0: box(40, 60, 40, 60)}, {2.0: box(40, 60, 140, 160)}]
    # predictions at (1.0, 50, 50), (2.0, 150, 50) and an extra one at 5.0 s: 2 of 3 right, both found
    text = '<points coords="1.0 1 250 500;2.0 2 750 500;5.0 3 500 500">x</points>'
    result = video_metrics.video_point_score(text, gt, masks, duration=10.0, width=200, height=100)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == 1.0
    assert result["f1"] == pytest.approx(0.8)  # 2 * (2/3) * 1 / (2/3 + 1)
    # the right place at a time the mask does not cover scores nothing
    late = video_metrics.video_point_score('<points coords="1.5 1 250 500">x</points>', gt, masks, 10.0, 200, 100)
    assert late["precision"] == 0.0 and late["f1"] == 0.0 and late["valid"] == 1.0
    assert video_metrics.video_point_score("no points", [], [], 10.0, 200, 100)["f1"] == 1.0
    assert video_metrics.video_point_score("no points", gt, masks, 10.0, 200, 100)["f1"] == 0.0


@pytest.mark.parametrize("answer, gt, correct, close, valid", [
    ("5", 5, 1.0, 1.0, 1.0),
    ("There are a total of 12.", 11, 0.0, 1.0, 1.0),
    ("The total number of dogs is: 7", 7, 1.0, 1.0, 1.0),
    ("There are 3 dogs.", 3, 0.0, 0.0, 0.0),  # neither the whole answer nor a "total" phrase
    ("There are none.", 0, 0.0, 0.0, 0.0),  # upstream's "none" rule never matches
    ("43", 40, 0.0, 1.0, 1.0),  # margin 1 + floor(0.05 * 40) = 3
    ("44", 40, 0.0, 0.0, 1.0),
])
def test_video_count(answer, gt, correct, close, valid):
    result = score_record("video_count", {"prediction": answer, "count": gt})
    assert (result["score"], result["close"], result["valid"]) == (correct, close, valid)


def test_video_count_breakdown_by_count_bin_and_subset():
    examples = [(0, 1.0, "object"), (3, 0.0, "object"), (7, 1.0, "animal"), (26, 1.0, "action/event"),
                (27, 0.0, "action/event"), (2, 1.0, "other")]
    out = video_metrics.video_count_breakdown(examples)
    assert out["correct_0_5"] == pytest.approx(2 / 3) and out["correct_5_10"] == 1.0
    assert math.isnan(out["correct_10_15"]) and out["correct_25_28"] == 0.5  # the last bin ends at max + 1
    assert out["acc_object"] == 0.5 and out["acc_animal"] == 1.0 and out["acc_action/event"] == 0.5
    assert "acc_other" not in out  # only upstream's three subsets are reported


def track_case():
    """10 x 10 frames at 1 fps; object 0 in the top-left square (frames 0 and 1), object 1 in the
    bottom-right one (frame 0 only)."""
    top_left, bottom_right = box(0, 5, 0, 5, (10, 10)), box(5, 10, 5, 10, (10, 10))
    gt_tracks = [{"frame": 0, "points": {0: {"point": [2, 2]}, 1: {"point": [7, 7]}}},
                 {"frame": 1, "points": {0: {"point": [3, 3]}}}]
    gt_masks = {"0": [top_left, top_left], "1": [bottom_right, None]}
    text = '<tracks coords="0 1 200 200 2 700 700;1 1 300 300;2 1 500 500">it</tracks>'
    return text, gt_tracks, gt_masks


def test_tracking_precision_recall_f1_and_hota():
    text, gt_tracks, gt_masks = track_case()
    result = video_metrics.track_score(text, gt_tracks, gt_masks, width=10, height=10, video_fps=1)
    # frame 0: both right (P = R = 1); frame 1: right, but recall divides by the 2 objects (R = 0.5);
    # frame 2: a prediction without ground truth (0, 0, 0)
    assert result["frames"] == 3
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((1 + 2 / 3) / 3)
    # HOTA: TP 3, FP 1 (frame 2) -> DetA 3/4; matches (0,0) twice, (1,1) once with alignment counts
    # gt [2, 1], pred [3, 1] -> AssA = (2 * 2/3 + 1 * 1) / 3 = 7/9
    assert result["DetA"] == pytest.approx(0.75) and result["AssA"] == pytest.approx(7 / 9)
    assert result["HOTA"] == pytest.approx(math.sqrt(0.75 * 7 / 9))
    empty = video_metrics.track_score("nothing", [], {}, 10, 10, 1)
    assert empty["f1"] == 1.0 and empty["HOTA"] == 1.0
    missed = video_metrics.track_score("nothing", gt_tracks, gt_masks, 10, 10, 1)
    assert missed["f1"] == 0.0 and missed["HOTA"] == 0.0


def test_video_records_from_json(tmp_path):
    """The same cases as JSON lines (RLE masks, string time keys, frame-keyed mask lists) via the
    offline scorer; a record missing a field is rejected with its name."""
    text, gt_tracks, _ = track_case()
    # column-major RLE of the 10 x 10 squares: top-left = rows 0-4 of columns 0-4
    top_left = {"size": [10, 10], "counts": [0] + [5, 5] * 4 + [5, 55]}
    bottom_right = {"size": [10, 10], "counts": [55, 5] + [5, 5] * 4 + [0]}
    np.testing.assert_array_equal(video_metrics.as_mask(top_left), box(0, 5, 0, 5, (10, 10)))
    np.testing.assert_array_equal(video_metrics.as_mask(bottom_right), box(5, 10, 5, 10, (10, 10)))
    track = {"prediction": text, "video_wh": [10, 10], "video_fps": 1,
             "gt_tracks": [{"frame": t["frame"], "points": {str(k): v for k, v in t["points"].items()}}
                           for t in gt_tracks],
             "gt_masks": {"0": [{"frame": 0, "mask": top_left}, {"frame": 1, "mask": top_left}],
                          "1": [{"frame": 0, "mask": bottom_right}]}}
    point = {"prediction": '<points coords="1.0 1 250 500">x</points>', "video_wh": [200, 100], "video_duration": 10,
             "gt_triplets": [[1.0, 50, 50]], "gt_masks": [{"1.0": box(40, 60, 40, 60).tolist()}]}
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(track) + "\n")
    (records, rejected) = score.score_file("video_track", str(path))
    assert not rejected and records[0]["score"] == pytest.approx((1 + 2 / 3) / 3)
    assert score_record("video_point", point)["score"] == pytest.approx(1.0)
    with pytest.raises(RecordError, match="video_duration"):
        score_record("video_point", {k: v for k, v in point.items() if k != "video_duration"})
    with pytest.raises(RecordError, match="gt_masks"):
        score_record("video_point", dict(point, gt_masks=[]))


OPTIONS5 = ["the dog sits", "the man runs", "picks up the red ball", "a cat sleeps", "nothing happens"]


@pytest.mark.parametrize("answer, letter", [
    ("(C) picks up the red ball", "C"),
    ("I think B is right", "B"),  # " B " once the ends are padded
    ("(A) or maybe (D)", "D"),  # several bracketed letters: the last one written
    ("the person picks up the red ball from the floor", "C"),  # over 5 words: the option text
])
def test_nextqa(answer, letter):
    assert score_record("nextqa_mc", {"prediction": answer, "options": OPTIONS5, "answer": letter})["score"] == 1.0


def test_nextqa_falls_back_to_a_letter_and_needs_five_options():
    result = score_record("nextqa_mc", {"prediction": "no idea", "options": OPTIONS5, "answer_idx": 0})
    assert result["choice"] in "ABCDE"
    with pytest.raises(RecordError, match="5 options"):
        score_record("nextqa_mc", {"prediction": "A", "options": OPTIONS5[:4], "answer": "A"})


@pytest.mark.parametrize("answer, letter", [
    ("A.", "A"),  # the trailing "." is stripped first: a bare letter
    ("The answer is B) and also C.", "B"),  # "B)" marks it; "C." lost its dot to the strip
    ("(A) is wrong, B. is right", "A"),  # both marked: searched by the first form found, "(A)"
])
def test_muir_bench(answer, letter):
    options = ["one", "two", "three", "four"]
    assert score_record("muir_bench_mc", {"prediction": answer, "options": options, "answer": letter})["score"] == 1.0


def test_perception_test_and_mlvu():
    assert score_record("perception_test_mc", {"prediction": "The answer is C.", "answer_idx": 2})["score"] == 1.0
    assert score_record("perception_test_mc", {"prediction": "A dog", "answer_idx": 0})["score"] == 1.0  # upstream's \bA\b
    assert score_record("perception_test_mc", {"prediction": "dog", "answer_idx": 0})["selected_index"] == -1
    assert score_record("mlvu_mc", {"prediction": "(B) cat", "answer": "B"})["score"] == 1.0
    assert score_record("mlvu_mc", {"prediction": "B", "answer": "B"})["score"] == 1.0
    assert score_record("mlvu_mc", {"prediction": ") odd", "answer": "B"})["choice"] == ""
