"""MMMU answer parsing and scoring, as the official MMMU script that Molmo's evaluator uses.

Bug-compatible with `MMMU-Benchmark/MMMU eval/main_parse_and_eval.py` as vendored by allenai/molmo
(behaviour note 25): letters are matched case-sensitively as "(X)" or " X "; answer-text matching is
tried only for responses of more than 5 words; several candidates -> the one occurring last; no
candidate -> a random letter. Open questions compare numbers rounded to 2 decimals and strings by
substring; the sentence splitter looks for capitals AFTER lower-casing, so it never splits on ". ".
"""
import random
import re
import string
from typing import Sequence

_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def parse_multi_choice(response: str, options: Sequence[str], rng: random.Random) -> tuple[str, bool]:
    """Letter picked by a free-text MC response. Returns (letter, random_fallback).

    options: the answer texts in letter order (empty strings are dropped, as upstream). When nothing
    is found the letter is drawn from `rng` (upstream: the global `random` seeded with 42 at import,
    so its value depends on call history; only the fact that the fallback was taken is reproducible).
    """
    options = [option for option in options if option]
    letters = list(string.ascii_uppercase[:len(options)])
    letter_to_text = dict(zip(letters, options))
    for char in _EDGE_PUNCTUATION:
        response = response.strip(char)
    response = f" {response} "

    candidates = [letter for letter in letters if f"({letter})" in response]
    with_brackets = bool(candidates)
    if not candidates:
        candidates = [letter for letter in letters if f" {letter} " in response]
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [letter for letter in letters if letter_to_text[letter].lower() in response.lower()]
        by_text = bool(candidates)

    if not candidates:
        return rng.choice(letters), True
    if len(candidates) == 1:
        return candidates[0], False
    if by_text:
        positions = [response.lower().rfind(letter_to_text[c].lower()) for c in candidates]
    elif with_brackets:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))], False


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_answer(text: str) -> list:
    """A number -> [float rounded to 2 decimals]; a string -> [lower-cased] (a single character is
    padded with a space on either side, to avoid trivial substring matches)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


def _extract_numbers(text: str) -> list[str]:
    return (_NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text)
            + _NUMBER_SIMPLE.findall(text))


def _key_subresponses(response: str) -> list[str]:
    """Tails of each sentence after the answer indicator giving the shortest tail."""
    response = response.strip().strip(".").lower()
    # Upstream splits on r"\.\s(?=[A-Z])" after lower-casing, so only newlines ever split.
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                # `not shortest` (upstream) lets a later indicator replace an empty tail.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    """The set (as a list) of normalised candidate answers of an open-ended response."""
    keys = _key_subresponses(response)
    candidates = list(keys)
    for key in keys:
        candidates.extend(_extract_numbers(key))
    normalized = []
    for candidate in candidates:
        normalized.extend(normalize_answer(candidate))
    return list(set(normalized))


def eval_open(targets: Sequence[str] | str, parsed: Sequence) -> bool:
    """Correct iff a parsed number equals a normalised target number, or a normalised target string
    is a substring of a parsed string."""
    targets = [targets] if isinstance(targets, str) else targets
    normalized_targets = [norm for target in targets for norm in normalize_answer(target)]
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(t, str) and t in pred for t in normalized_targets):
                return True
        elif pred in normalized_targets:
            return True
    return False


def mmmu_score(targets: Sequence[str] | str, response: str, question_type: str,
               options: Sequence[str] = (), rng: random.Random | None = None) -> dict:
    """Score one MMMU answer. Returns {"score", "parsed_pred", "random_fallback"}.

    targets: the gold letter(s) for "multiple-choice", the gold answer(s) for "open".
    rng: used only for the random-letter fallback; defaults to `random.Random(42)` per call (upstream
    uses one global stream, so fallback letters cannot match it example by example).
    """
    if question_type == "multiple-choice":
        letter, fallback = parse_multi_choice(response, options, rng or random.Random(42))
        gold = [targets] if isinstance(targets, str) else list(targets)
        return {"score": float(letter in gold), "parsed_pred": letter, "random_fallback": fallback}
    parsed = parse_open(response)
    return {"score": float(eval_open(targets, parsed)), "parsed_pred": parsed,
            "random_fallback": False}
