"""Counting (CountBenchQA, PixMo-Count) and clock-reading (PixMo-Clocks) metrics.

Bug-compatible with allenai/molmo `PointCountEval` and `ClockEval` (behaviour notes 22 and 23).
"""
import re

_WORD_TO_NUMBER = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
# `re.match` anchors at the start and "." stops at newlines: the phrase must be on the first line.
_A_TOTAL_OF = re.compile(r".*a total of ([0-9]+).*")
# Upstream writes ".*\bnone\b.*" as a NON-raw string, so "\b" is a backspace character and
# "There are none." is not parsed as 0: only text containing "\x08none\x08" ever matches.
NEVER_MATCHING_NONE = re.compile(".*\x08none\x08.*")
_NONE_INTENDED = re.compile(r"\bnone\b")


def parse_count(prediction: str, read_none: bool = False) -> int | None:
    """The count stated by an answer, or None (invalid).

    Tried in order on the lower-cased answer without trailing dots: the last word as a Python int
    ("+7", "-2" and Unicode digits are accepted; "3.0" is not), the last word as a number word up to
    twenty, "a total of N" on the first line, then the (never matching, see `NEVER_MATCHING_NONE`) "none" rule.
    So "There are 3 dogs." is invalid. read_none=True applies the "none" rule as upstream meant it
    (the word "none" -> 0), so the official zero-count answer "There are none." reads as 0.
    """
    pred = prediction.strip().lower().rstrip(".").strip()
    words = pred.split()
    if words:
        try:
            return int(words[-1])
        except ValueError:
            if words[-1] in _WORD_TO_NUMBER:
                return _WORD_TO_NUMBER[words[-1]]
    match = _A_TOTAL_OF.match(pred)
    if match:
        return int(match.group(1))
    if NEVER_MATCHING_NONE.match(pred) or (read_none and _NONE_INTENDED.search(pred)):
        return 0
    return None


def point_count_score(prediction: str, gt_count: int, read_none: bool = False) -> dict:
    """{"correct", "close" (|pred - gt| <= 1), "valid", "count"} of one counting answer
    (read_none: see parse_count)."""
    count = parse_count(prediction, read_none)
    if count is None:
        return {"correct": 0.0, "close": 0.0, "valid": 0.0, "count": None}
    return {"correct": float(count == gt_count), "close": float(abs(gt_count - count) <= 1),
            "valid": 1.0, "count": count}


CLOCK_METRICS = ("overall_close", "overall_exact", "correctly_declines_to_answer", "all_correct",
                 "all_close", "hour_correct", "minute_correct", "second_correct", "minute_close",
                 "second_close")


def clock_score(prediction: str, hour: int, minute: int, second: int, is_test: bool = False) -> dict:
    """All `ClockEval` metrics of one answer; metrics that do not apply are None.

    hour/minute/second: -1 when not shown (all -1: unanswerable, right iff the answer has no ":").
    PixMo-Clocks (is_test=False): "PM" anywhere in the answer adds 12 hours, minutes and seconds are
    close within 3. Real-world clock test (is_test=True): 12 -> 0 and 60 -> 0, close within 1 minute,
    59-minute and 719-minute (12-hour) wrap-arounds count as close.
    Where the official code raises (test mode, no seconds, and an unparsable hour or minute: the
    wrap-around check reads an undefined variable) the wrap-around check is skipped.
    """
    prediction = prediction.strip()
    scores = dict.fromkeys(CLOCK_METRICS)
    threshold = 1 if is_test else 3
    if is_test and hour == 12:
        hour = 0
    if is_test and minute == 60:
        minute = 0
    if not (hour > -1 or minute > -1 or second > -1):
        declines = float(":" not in prediction)
        scores.update(correctly_declines_to_answer=declines, overall_close=declines, overall_exact=declines)
        return scores

    parts = prediction.split(":")
    pred_hour = pred_minute = None
    try:
        pred_hour = int(parts[0].split()[-1])
        if "PM" in prediction and not is_test:
            pred_hour += 12
        if is_test and pred_hour >= 12:
            pred_hour -= 12
        hour_correct = pred_hour == hour or (hour == 0 and pred_hour == 12)
    except (ValueError, IndexError):
        hour_correct = False
    try:
        pred_minute = int(parts[1].split()[0])
        if is_test and pred_minute == 60:
            pred_minute = 0
        minute_correct = pred_minute == minute
        minute_close = abs(pred_minute - minute) <= threshold or (is_test and abs(pred_minute - minute) == 59)
    except (ValueError, IndexError):
        minute_correct = minute_close = False

    if second != -1:
        try:
            pred_second = int(parts[2].split()[0])
            second_correct = pred_second == second
            second_close = abs(pred_second - second) <= threshold
        except (ValueError, IndexError):
            second_correct = second_close = False
        scores.update(second_correct=float(second_correct), second_close=float(second_close))
        all_correct = minute_correct and hour_correct and second_correct
        all_close = minute_close and hour_correct and second_close
    else:
        all_correct = minute_correct and hour_correct
        all_close = minute_close and hour_correct
        if is_test and pred_hour is not None and pred_minute is not None:
            all_close = all_close or abs(hour * 60 + minute - (pred_hour * 60 + pred_minute)) == 719
    scores.update(hour_correct=float(hour_correct), minute_correct=float(minute_correct),
                  minute_close=float(minute_close), all_correct=float(all_correct),
                  all_close=float(all_close), overall_close=float(all_close),
                  overall_exact=float(all_correct))
    return scores
