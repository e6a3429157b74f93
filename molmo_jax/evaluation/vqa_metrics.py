"""Short-answer metrics of the official Molmo evaluation: VQA score, ANLS, relaxed accuracy, MC.

Every function reproduces the official evaluator (allenai/molmo `olmo/eval/vqa.py` and `VqaEval`)
including its quirks, so that our numbers stay comparable with the published ones. Each quirk is
named in the docstring of the function that keeps it. Where the official code raises on some input,
we return a documented score instead (also said in the docstring).
"""
import collections
import re
from typing import Sequence

# The contraction table of the official VQA evaluation script, kept verbatim (including its odd
# "somebody'd" -> "somebodyd" entry) because VQA normalisation depends on it.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# Number words only up to ten ("eleven" stays a word); "none" counts as zero.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# `$ % & : * # '` are deliberately absent: the official list does not treat them as punctuation.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a mistyped look-behind that is really a look-ahead
# which never fires, so a period is removed whenever no digit follows it ("3." -> "3", "a.b" -> "ab").
_PERIOD = re.compile(r"\.(?!\d)")
# The official call is `sub("", text, re.UNICODE)`: the flag value 32 lands in the `count` slot.
_MAX_PERIODS_REMOVED = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    """Official `processPunctuation`: a mark next to a space (or any digit,digit pattern) is deleted,
    otherwise it becomes a space ("x-ray" -> "x ray"). Tests look at the unmodified input."""
    out = text
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def preprocess_answer(answer: str) -> str:
    """VQA answer normalisation of the official Molmo evaluator (behaviour note 17).

    Lower-case, newlines/tabs to spaces, punctuation rules of `_strip_punctuation` (at most 32 periods
    removed: bug-compatible), number words up to ten to digits, articles dropped, contractions restored.
    """
    text = answer.replace("\n", " ").replace("\t", " ").lower().strip()
    words = []
    for word in _strip_punctuation(text).lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(references: Sequence[str] | str, prediction: str) -> float:
    """min(#references equal to the prediction / 3, 1), both sides normalised (VQA v2, TextVQA).

    Bug-compatible: a plain-string reference is compared with the normalised prediction WITHOUT
    being normalised itself (behaviour note 18).
    """
    pred = preprocess_answer(prediction)
    if isinstance(references, str):
        return float(pred == references)
    counts = collections.Counter(preprocess_answer(ref) for ref in references)
    return min(counts[pred] / 3.0, 1.0)


def a_okvqa_score(references: Sequence[str], prediction: str) -> float:
    """A-OKVQA direct answer: only lower-case + strip, then min(#matches / 3, 1)."""
    counts = collections.Counter(ref.lower().strip() for ref in references)
    return min(counts[prediction.lower().strip()] / 3.0, 1.0)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance over characters (unit costs), as the `editdistance` package computes it."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(reference: str, prediction: str, theta: float = 0.5) -> float:
    """Normalised Levenshtein similarity of one reference (DocVQA, InfoVQA), threshold `theta`.

    Bug-compatible: both strings are lower-cased but the distance is divided by the ORIGINAL lengths,
    so "İ" vs "i" scores 0 (behaviour note 19). No stripping here (the pipeline strips).
    Where the official code divides by zero (both strings empty) we return 1.0: they are equal.
    """
    longest = max(len(reference), len(prediction))
    if longest == 0:
        return 1.0
    normalized = edit_distance(reference.lower(), prediction.lower()) / longest
    return 1.0 - normalized if normalized < theta else 0.0


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (pix2struct): numbers within 5 % of the target, else exact match.

    Bug-compatible (behaviour note 20): every trailing "%" is stripped and divides by 100 on either
    side; Python `float` parsing ("1e3", " 5 ", "nan", Unicode digits); a zero target falls back to a
    case-insensitive string comparison ("0" vs "0.0" is wrong); the bound is `<=` in float64.
    """
    pred_value, target_value = _to_float(prediction), _to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    return prediction.lower() == target.lower()


def select_mc_option(prediction: str, options: Sequence[str]) -> int:
    """Index of the option a free-text answer picks (AI2D, A-OKVQA MC, ScienceQA, RealWorldQA).

    Official order: exact match after lower/strip, else the single option containing the prediction,
    else the first option with the smallest edit distance. Where the official code raises
    (`AssertionError` on options that collide after lower/strip) we keep going with the same rules:
    the first of the colliding options wins.
    """
    target = prediction.lower().strip()
    normalized = [option.lower().strip() for option in options]
    if target in normalized:
        return normalized.index(target)
    containing = [i for i, option in enumerate(normalized) if target in option]
    if len(containing) == 1:
        return containing[0]
    distances = [edit_distance(option, target) for option in normalized]
    return distances.index(min(distances))


def real_world_qa_score(target: str, prediction: str, question_type: str) -> float:
    """RealWorldQA: MC answers (letters A-D) via `select_mc_option`, others VQA-normalised equality.

    Where the official code raises (`ValueError`: an MC target that is not one of A-D) we return 0.0.
    """
    if question_type == "multiple_choice":
        letters = ["A", "B", "C", "D"]
        if target not in letters:
            return 0.0
        return float(select_mc_option(prediction, letters) == letters.index(target))
    return float(preprocess_answer(prediction) == preprocess_answer(target))


def vqa_postprocess(prediction: str) -> str:
    """Answer extraction of the official `VqaEval`, applied before every short-answer metric.

    Strip; if "Answer:" occurs, take the text between the first and a possible second "Answer:";
    else if multi-line, the most frequent whitespace-collapsed line (first one on ties); else
    collapse whitespace.
    """
    pred = prediction.strip()
    if "Answer:" in pred:
        return pred.split("Answer:")[1].strip()
    if "\n" in pred:
        lines = [" ".join(line.split()) for line in pred.split("\n")]
        counts = collections.Counter(lines)
        best = max(counts.values())
        return next(line for line in lines if counts[line] == best)
    return " ".join(pred.split())


def exact_match(references: Sequence[str], prediction: str) -> bool:
    """Case-insensitive equality with any reference (`em` of `VqaEval`, no other normalisation)."""
    return prediction.lower() in [ref.lower() for ref in references]
