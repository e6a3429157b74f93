"""Your own data: a JSONL (or parquet) file of annotated images -> Molmo example dicts.

One JSON object per line (docs/custom_data.md has the full reference and a walkthrough):

    {"image": "imgs/cat.jpg", "caption": "A tabby cat asleep on a red sofa."}
    {"image": "imgs/cat.jpg", "question": "What color is the sofa?", "answer": "Red."}
    {"image": "imgs/cat.jpg", "question": "What animal is it?", "options": ["dog", "cat"], "answer_idx": 1}
    {"image": "imgs/cat.jpg", "label": "cat's ear", "points": [[120, 40], [180, 42]]}
    {"image": "imgs/dog.png", "label": "dog", "points": [[50.0, 61.5]], "point_units": "percent"}
    {"image": "imgs/dog.png", "messages": ["Is it sunny?", "Yes.", "Where?", "In a park."]}
    {"image": "imgs/dog.png", "annotations": [{"caption": "..."}, {"question": "...", "answer": "..."}]}

`image` is a path relative to the file's folder (or absolute). Each line holds one annotation kind
(caption | question+answer | question+options+answer_idx | label+points | messages) or a list of them
in `annotations`; optional `style` (default per kind), `weight` (> 0) and `id`. Points are pixels
(default) or `"point_units": "percent"` (0-100, Molmo's own scale); `"style": "point_count"` trains
"Counting the <points ...> shows a total of N." instead of plain pointing. All lines of one image
become one example whose annotations are packed into one sequence (spec §4.6).

Problems are reported all at once, one per (line, field): `CustomDataError` lists
"data.jsonl:12: points[3]: expected [x, y] numbers, got [4]".
"""
import collections
import dataclasses
import json
import math
import os
import re
import sys

import numpy as np

DEFAULT_STYLES = {"caption": "long_caption", "qa": "user_qa", "multiple_choice": "a_okvqa_mc",
                  "points": "pointing", "messages": "user_qa"}
KIND_FIELDS = {"caption": ("caption",), "qa": ("question", "answer"),
               "multiple_choice": ("question", "options", "answer_idx"), "points": ("label", "points", "point_units"),
               "messages": ("messages",)}
ANNOTATION_FIELDS = {f for fields in KIND_FIELDS.values() for f in fields} | {"style"}
LINE_FIELDS = ANNOTATION_FIELDS | {"image", "annotations", "weight", "id"}
STYLE = re.compile(r"^[a-z0-9_]+$")
MAX_OPTIONS = 7  # the formatter letters options A..G


@dataclasses.dataclass(frozen=True)
class LineError:
    line: int  # 1-based line (JSONL) or row (parquet)
    field: str  # e.g. "points[3]", "annotations[1].answer", "-" for the whole line
    problem: str


class CustomDataError(ValueError):
    def __init__(self, path: str, errors: list[LineError], shown: int = 30):
        self.errors = errors
        lines = [f"{path}:{e.line}: {e.field}: {e.problem}" for e in errors[:shown]]
        more = f"\n... and {len(errors) - shown} more" if len(errors) > shown else ""
        super().__init__(f"{len(errors)} problem(s) in {path}:\n" + "\n".join(lines) + more)


def _kind(obj: dict) -> list[str]:
    """Annotation kinds present in `obj` (multiple choice wins over plain QA)."""
    kinds = [k for k in ("caption", "messages") if k in obj]
    if "label" in obj or "points" in obj:
        kinds.append("points")
    if "question" in obj or "answer" in obj or "options" in obj:
        kinds.append("multiple_choice" if "options" in obj or "answer_idx" in obj else "qa")
    return kinds


def check_annotation(obj: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(field, problem) pairs of one annotation; empty when it is valid."""
    problems = []

    def bad(field, problem):
        problems.append((prefix + field, problem))

    def text(field, allow_empty=False):
        value = obj.get(field)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            bad(field, f"expected a non-empty string, got {value!r}"[:200])

    kinds = _kind(obj)
    if not kinds:
        bad("-", "no annotation: give caption, question+answer, question+options+answer_idx, "
                 "label+points or messages")
        return problems
    if len(kinds) > 1:
        bad("-", f"one annotation kind per object, found {kinds}; use \"annotations\": [...] for several")
        return problems
    kind = kinds[0]
    if "style" in obj and not (isinstance(obj["style"], str) and STYLE.match(obj["style"])):
        bad("style", f"expected a lower-case word like \"user_qa\", got {obj['style']!r}")
    if kind == "caption":
        text("caption")
    elif kind in ("qa", "multiple_choice"):
        text("question")
        if kind == "qa":
            text("answer")
        else:
            options = obj.get("options")
            if not (isinstance(options, list) and 2 <= len(options) <= MAX_OPTIONS
                    and all(isinstance(o, str) and o.strip() for o in options)):
                bad("options", f"expected 2 to {MAX_OPTIONS} non-empty strings, got {options!r}"[:200])
            idx = obj.get("answer_idx")
            if not (isinstance(idx, int) and not isinstance(idx, bool)
                    and isinstance(options, list) and 0 <= idx < len(options)):
                bad("answer_idx", f"expected the 0-based index of the right option, got {idx!r}")
            if "answer" in obj:
                bad("answer", "multiple choice takes answer_idx, not answer")
    elif kind == "points":
        text("label")
        units = obj.get("point_units", "pixels")
        if units not in ("pixels", "percent"):
            bad("point_units", f"expected \"pixels\" or \"percent\", got {units!r}")
        points = obj.get("points")
        if not isinstance(points, list):
            bad("points", f"expected a list of [x, y] (may be empty: not in the image), got {points!r}"[:200])
        else:
            for i, p in enumerate(points):
                if not (isinstance(p, list) and len(p) == 2 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
                    bad(f"points[{i}]", f"expected [x, y] numbers, got {p!r}"[:200])
                elif min(p) < 0 or (units == "percent" and max(p) > 100):
                    bad(f"points[{i}]", f"{p} outside {'0..100 percent' if units == 'percent' else 'the image'}")
        if obj.get("style", "pointing") not in ("pointing", "point_count"):
            bad("style", "points train the \"pointing\" or \"point_count\" style")
    elif kind == "messages":
        msgs = obj.get("messages")
        if not (isinstance(msgs, list) and len(msgs) >= 2 and len(msgs) % 2 == 0
                and all(isinstance(m, str) and m.strip() for m in msgs)):
            bad("messages", "expected user, assistant, user, assistant ... (an even number of non-empty strings)")
    for field in obj:
        if field not in ANNOTATION_FIELDS and field not in LINE_FIELDS:
            bad(field, f"unknown field (known: {sorted(LINE_FIELDS)})")
        elif field in ANNOTATION_FIELDS and field not in KIND_FIELDS[kind] + ("style",) and not (
                kind == "multiple_choice" and field == "answer"):
            bad(field, f"not part of a {kind} annotation")
    return problems


def to_message(obj: dict) -> dict:
    """A valid annotation -> the official example shape of one conversation."""
    kind = _kind(obj)[0]
    style = obj.get("style", DEFAULT_STYLES[kind])
    if kind == "caption":
        return {"style": style, "text": obj["caption"]}
    if kind == "qa":
        return {"style": style, "question": obj["question"], "answer": obj["answer"]}
    if kind == "multiple_choice":
        return {"style": style, "question": obj["question"], "options": list(obj["options"]),
                "answer_idx": obj["answer_idx"]}
    if kind == "messages":
        return {"style": style, "messages": list(obj["messages"])}
    message = {"style": style, "label": obj["label"], "points": np.asarray(obj["points"], np.float32).reshape(-1, 2)}
    if obj.get("point_units") == "percent":
        message["point_scale"] = 100
    return message


def read_rows(path: str) -> list[tuple[int, object]]:
    """(line number, parsed object or LineError) for every non-empty line / parquet row."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [(i, {k: v for k, v in row.items() if v is not None})
                for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((number, LineError(number, "-", f"invalid JSON: {e.msg} at column {e.colno}")))
    return rows


def parse(path: str, image_root: str | None = None) -> tuple[list[dict], list[LineError]]:
    """(examples grouped per image, every problem found)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    errors: list[LineError] = []
    groups: dict[str, dict] = {}
    for number, obj in read_rows(path):
        if isinstance(obj, LineError):
            errors.append(obj)
            continue
        if not isinstance(obj, dict):
            errors.append(LineError(number, "-", f"expected a JSON object, got {type(obj).__name__}"))
            continue
        problems = _check_line(obj, root)
        errors += [LineError(number, field, problem) for field, problem in problems]
        if problems:
            continue
        annotations = obj.get("annotations") or [{k: v for k, v in obj.items() if k in ANNOTATION_FIELDS}]
        image = os.path.join(root, obj["image"])
        group = groups.setdefault(image, {"image": image, "message_list": [],
                                          "metadata": {"lines": [], "ids": []}, "weight": obj.get("weight", 1.0)})
        if obj.get("weight", 1.0) != group["weight"]:
            errors.append(LineError(number, "weight", f"{obj.get('weight', 1.0)} differs from line "
                                                      f"{group['metadata']['lines'][0]} of the same image"))
            continue
        group["message_list"] += [to_message(a) for a in annotations]
        group["metadata"]["lines"].append(number)
        if "id" in obj:
            group["metadata"]["ids"].append(obj["id"])
    return list(groups.values()), errors


def _check_line(obj: dict, root: str) -> list[tuple[str, str]]:
    problems = []
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        problems.append(("image", f"expected a path to an image file, got {image!r}"))
    elif not os.path.isfile(os.path.join(root, image)):
        problems.append(("image", f"file not found: {os.path.join(root, image)}"))
    weight = obj.get("weight", 1.0)
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0 and math.isfinite(weight)):
        problems.append(("weight", f"expected a positive number, got {weight!r}"))
    if "annotations" in obj:
        annotations = obj["annotations"]
        if not (isinstance(annotations, list) and annotations and all(isinstance(a, dict) for a in annotations)):
            return problems + [("annotations", "expected a non-empty list of annotation objects")]
        stray = sorted(set(obj) & ANNOTATION_FIELDS)
        if stray:
            problems.append((stray[0], "put every annotation inside \"annotations\" when that list is given"))
        for i, annotation in enumerate(annotations):
            problems += check_annotation(annotation, prefix=f"annotations[{i}].")
            problems += [(f"annotations[{i}].{k}", "belongs to the line, not the annotation")
                         for k in annotation if k in LINE_FIELDS - ANNOTATION_FIELDS]
    else:
        problems += check_annotation({k: v for k, v in obj.items() if k not in ("image", "weight", "id")})
    return problems


class CustomSource:
    """Random-access examples of a custom file (grain-ready, picklable); raises CustomDataError."""

    def __init__(self, path: str, image_root: str | None = None):
        self.path = path
        self.examples, errors = parse(path, image_root)
        if errors:
            raise CustomDataError(path, errors)
        if not self.examples:
            raise CustomDataError(path, [LineError(0, "-", "the file has no examples")])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {**example, "message_list": [dict(m) for m in example["message_list"]]}

    def get(self, index: int, rng=None) -> dict:
        return self[index]

    def __repr__(self) -> str:
        return f"CustomSource({self.path!r}, n={len(self)})"


def main(argv=None) -> int:
    """python -m data_pipelines.sources.custom FILE...: check files, print every problem."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m data_pipelines.sources.custom FILE.jsonl [FILE.parquet ...]", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        examples, errors = parse(path)
        for e in errors:
            print(f"{path}:{e.line}: {e.field}: {e.problem}")
        kinds = collections.Counter(m["style"] for ex in examples for m in ex["message_list"])
        print(f"{path}: {len(examples)} images, {sum(kinds.values())} annotations {dict(kinds)}, "
              f"{len(errors)} problem(s)")
        status |= bool(errors)
    return status


if __name__ == "__main__":
    sys.exit(main())
