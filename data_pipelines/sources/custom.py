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
"data.jsonl:12: points[3]: expected [x, y] numbers, got [4]" (line 0: the whole file). Any line
is reported, never raised: bytes that are not UTF-8, broken JSON, numbers too big for a float,
JSON nested too deeply (data_pipelines/jsonl.py). Pixel points must lie inside the image, whose
size is read from its header; `python -m data_pipelines.sources.custom FILE` also decodes every
image, so that broken pixel data is reported by line too. At training time `CustomSource` refuses
a file with any problem before the first step; an image whose pixel data turns out broken after
a good header is skipped by the pipeline, logged and counted as `corrupt_image` (pipeline.py).
"""
import argparse
import collections
import dataclasses
import os
import re
import sys

import numpy as np

from data_pipelines import images
from data_pipelines.jsonl import UnreadableFile, is_finite_number, print_line, read_lines, show

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


def check_annotation(obj: dict, prefix: str = "", image_hw: tuple[int, int] | None = None
                     ) -> list[tuple[str, str]]:
    """(field, problem) pairs of one annotation; empty when it is valid.

    image_hw: (height, width) of the image; pixel points outside it are problems (unchecked: None).
    """
    problems = []

    def bad(field, problem):
        problems.append((prefix + field, problem))

    def text(field, allow_empty=False):
        value = obj.get(field)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            bad(field, f"expected a non-empty string, got {show(value)}")

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
        bad("style", f"expected a lower-case word like \"user_qa\", got {show(obj['style'])}")
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
                bad("options", f"expected 2 to {MAX_OPTIONS} non-empty strings, got {show(options)}")
            idx = obj.get("answer_idx")
            if not (isinstance(idx, int) and not isinstance(idx, bool)
                    and isinstance(options, list) and 0 <= idx < len(options)):
                bad("answer_idx", f"expected the 0-based index of the right option, got {show(idx)}")
            if "answer" in obj:
                bad("answer", "multiple choice takes answer_idx, not answer")
    elif kind == "points":
        text("label")
        units = obj.get("point_units", "pixels")
        if units not in ("pixels", "percent"):
            bad("point_units", f"expected \"pixels\" or \"percent\", got {show(units)}")
        points = obj.get("points")
        if not isinstance(points, list):
            bad("points", f"expected a list of [x, y] (may be empty: not in the image), got {show(points)}")
        else:
            for i, p in enumerate(points):
                if not (isinstance(p, list) and len(p) == 2 and all(is_finite_number(v) for v in p)):
                    bad(f"points[{i}]", f"expected [x, y] numbers, got {show(p)}")
                elif units == "percent" and not (0 <= p[0] <= 100 and 0 <= p[1] <= 100):
                    bad(f"points[{i}]", f"{p} outside 0..100 percent")
                elif units != "percent" and (min(p) < 0 or (image_hw is not None and (
                        p[0] > image_hw[1] or p[1] > image_hw[0]))):
                    size = f"the {image_hw[1]}x{image_hw[0]} image" if image_hw else "the image"
                    bad(f"points[{i}]", f"{p} outside {size} (x, y in pixels; "
                                        f"\"point_units\": \"percent\" for 0..100)")
        if obj.get("style", "pointing") not in ("pointing", "point_count"):
            bad("style", "points train the \"pointing\" or \"point_count\" style")
    elif kind == "messages":
        msgs = obj.get("messages")
        if not (isinstance(msgs, list) and len(msgs) >= 2 and len(msgs) % 2 == 0
                and all(isinstance(m, str) and m.strip() for m in msgs)):
            bad("messages", "expected user, assistant, user, assistant ... (an even number of non-empty strings)")
    for field in obj:
        if field not in ANNOTATION_FIELDS and field not in LINE_FIELDS:
            bad(field if isinstance(field, str) and len(field) < 80 else show(field),
                f"unknown field (known: {sorted(LINE_FIELDS)})")
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
    """(line number, parsed object or LineError) for every non-blank line / parquet row.

    Raises UnreadableFile when the file cannot be read at all.
    """
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise UnreadableFile(f"{path}: cannot read as parquet: {e}") from e
        return [(i, {k: v for k, v in row.items() if v is not None})
                for i, row in enumerate(table.to_pylist(), start=1)]
    return [(number, LineError(number, "-", problem) if problem else value)
            for number, value, problem in read_lines(path)]


class _ImageSizes:
    """(height, width) or a problem per image path, each image read once.

    decode: decode every image fully (images.load_image: finds broken pixel data), else read
    the header only (images.image_size: cheap enough for a training start).
    """

    def __init__(self, decode: bool):
        self.decode = decode
        self.cache: dict[str, tuple[tuple[int, int] | None, str | None]] = {}

    def __call__(self, path: str) -> tuple[tuple[int, int] | None, str | None]:
        if path not in self.cache:
            try:
                hw = images.load_image(path).shape[:2] if self.decode else images.image_size(path)
                self.cache[path] = (tuple(hw), None)
            except images.ImageDecodeError as e:
                self.cache[path] = (None, str(e))
        return self.cache[path]


def parse(path: str, image_root: str | None = None, *, decode_images: bool = False
          ) -> tuple[list[dict], list[LineError]]:
    """(examples grouped per image, every problem found); never raises on bad content.

    decode_images: decode every image (the check command) instead of reading its header only.
    """
    root = image_root or os.path.dirname(os.path.abspath(path))
    sizes = _ImageSizes(decode_images)
    errors: list[LineError] = []
    groups: dict[str, dict] = {}
    try:
        rows = read_rows(path)
    except UnreadableFile as e:
        return [], [LineError(0, "-", str(e).removeprefix(f"{path}: "))]
    if not rows:
        return [], [LineError(0, "-", "no examples: the file is empty (or only blank lines)")]
    for number, obj in rows:
        if isinstance(obj, LineError):
            errors.append(obj)
            continue
        if not isinstance(obj, dict):
            errors.append(LineError(number, "-", f"expected a JSON object, got {type(obj).__name__}"))
            continue
        problems = _check_line(obj, root, sizes)
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


def _check_line(obj: dict, root: str, sizes: _ImageSizes) -> list[tuple[str, str]]:
    problems = []
    image, image_hw = obj.get("image"), None
    if not isinstance(image, str) or not image:
        problems.append(("image", f"expected a path to an image file, got {show(image)}"))
    else:
        image_hw, problem = sizes(os.path.join(root, image))
        if problem:
            problems.append(("image", problem))
    weight = obj.get("weight", 1.0)
    if not (is_finite_number(weight) and weight > 0):
        problems.append(("weight", f"expected a positive number, got {show(weight)}"))
    if "annotations" in obj:
        annotations = obj["annotations"]
        if not (isinstance(annotations, list) and annotations and all(isinstance(a, dict) for a in annotations)):
            return problems + [("annotations", "expected a non-empty list of annotation objects")]
        stray = sorted(set(obj) & ANNOTATION_FIELDS)
        if stray:
            problems.append((stray[0], "put every annotation inside \"annotations\" when that list is given"))
        for i, annotation in enumerate(annotations):
            problems += check_annotation(annotation, prefix=f"annotations[{i}].", image_hw=image_hw)
            problems += [(f"annotations[{i}].{k}", "belongs to the line, not the annotation")
                         for k in annotation if k in LINE_FIELDS - ANNOTATION_FIELDS]
    else:
        problems += check_annotation({k: v for k, v in obj.items() if k not in ("image", "weight", "id")},
                                     image_hw=image_hw)
    return problems


class CustomSource:
    """Random-access examples of a custom file (grain-ready, picklable).

    Raises CustomDataError listing every problem of the file (images checked by header only)
    before any example is read, so a bad line never reaches a data-loader worker.
    """

    def __init__(self, path: str, image_root: str | None = None):
        self.path = path
        self.examples, errors = parse(path, image_root)
        if errors:
            raise CustomDataError(path, errors)

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
    """python -m data_pipelines.sources.custom FILE...: check files, decode every image, print every
    problem and a summary per file; exit status 1 when any file has a problem."""
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.sources.custom",
                                     description="Check custom fine-tuning files line by line (docs/custom_data.md).")
    parser.add_argument("paths", nargs="+", metavar="FILE", help="JSONL or parquet files to check")
    paths = parser.parse_args(argv).paths
    status = 0
    for path in paths:
        examples, errors = parse(path, decode_images=True)
        for e in errors:
            print_line(f"{path}:{e.line}: {e.field}: {e.problem}")
        kinds = collections.Counter(m["style"] for ex in examples for m in ex["message_list"])
        accepted = sum(len(ex["metadata"]["lines"]) for ex in examples)
        rejected = len({e.line for e in errors if e.line > 0})
        print_line(f"{path}: {accepted + rejected} lines, {accepted} accepted, {rejected} rejected; "
                   f"{len(examples)} images, {sum(kinds.values())} annotations {dict(kinds)}; "
                   f"{len(errors)} problem(s)")
        status |= bool(errors)
    return status


if __name__ == "__main__":
    sys.exit(main())
