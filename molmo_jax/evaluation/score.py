"""Score a JSONL file of predictions offline with one of the official Molmo metrics.

  python -m molmo_jax.evaluation.score --metric pointing --input preds.jsonl --masks masks.npz \
      --out scored.jsonl

Each input line is a JSON object with the fields of its metric (see `metrics.py`). Each output line
is a scored input object plus `score` and the metric's detail fields. Every record that can be
scored is; each line that cannot (not JSON, not an object, a missing field, a wrong type, a value
the official metric has no score for) is reported on stderr as `line N: field: reason` and left
out of the mean, and the exit status is then 1. Prints the mean score over the scored records.
"""
import argparse
import dataclasses
import json
import math
import sys
import zipfile
from typing import Iterable, Iterator

import numpy as np

from data_pipelines.jsonl import UnreadableFile, print_line, read_lines
from molmo_jax.evaluation.metrics import METRICS, RecordError, score_record

# What a metric may raise on values of the right types but a shape it cannot use (e.g. a ragged
# masks list); the record is rejected with the exception named, the other records are scored.
SCORING_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError)


@dataclasses.dataclass(frozen=True)
class Rejected:
    line: int  # 1-based line of the input file
    field: str  # the field at fault, "-" for the whole line
    problem: str


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; the first bad line raises ValueError naming file
    and line (for callers that must have every line; `score_file` reports bad lines instead)."""
    for number, record, problem in read_lines(path):
        if problem is None and not isinstance(record, dict):
            problem = f"expected a JSON object, got {type(record).__name__}"
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        yield number, record


def score_file(metric: str, path: str, masks=None) -> tuple[list[dict], list[Rejected]]:
    """(every record of `path` that could be scored, with its score fields added; every line that
    could not). Raises UnreadableFile when the file cannot be read at all."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    scored, rejected = [], []
    for number, record, problem in read_lines(path):
        if problem is None and not isinstance(record, dict):
            problem = f"expected a JSON object, got {type(record).__name__}"
        if problem:
            rejected.append(Rejected(number, "-", problem))
            continue
        try:
            scored.append({**record, **score_record(metric, record, masks)})
        except RecordError as e:
            rejected.append(Rejected(number, e.field, e.problem))
        except SCORING_ERRORS as e:
            rejected.append(Rejected(number, "-", f"cannot be scored ({type(e).__name__}: {e})"))
    return scored, rejected


def mean_score(records: Iterable[dict]) -> float:
    """Mean of the `score` fields (NaN when there are none)."""
    scores = [r["score"] for r in records if r["score"] is not None]
    return float(np.mean(scores)) if scores else math.nan


def load_masks(path: str) -> dict[str, np.ndarray]:
    """mask_key -> bool[N, H, W] from an .npz file; UnreadableFile names what is wrong with it."""
    try:
        loaded = np.load(path)  # no pickles: allow_pickle stays False
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive of arrays by mask_key")
        with loaded:
            return dict(loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UnreadableFile(f"{path}: cannot read masks: {e}") from e


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", required=True, choices=sorted(METRICS))
    parser.add_argument("--input", required=True, help="JSONL of predictions")
    parser.add_argument("--masks", help="npz of bool[N, H, W] masks by mask_key (pointing)")
    parser.add_argument("--out", help="JSONL to write the scored records to")
    args = parser.parse_args(argv)
    try:
        masks = load_masks(args.masks) if args.masks else None
        records, rejected = score_file(args.metric, args.input, masks)
    except UnreadableFile as e:
        print_line(f"error: {e}", sys.stderr)
        return 2
    if not records and not rejected:
        rejected = [Rejected(0, "-", "no records: the file is empty (or only blank lines)")]
    for r in rejected:
        print_line(f"line {r.line}: {r.field}: {r.problem}", sys.stderr)
    if args.out:
        try:
            # backslashreplace: a lone surrogate (from a JSON escape) is written back as its escape
            with open(args.out, "w", encoding="utf-8", errors="backslashreplace") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as e:
            print_line(f"error: cannot write {args.out}: {e.strerror or e}", sys.stderr)
            return 2
    summary = f"{args.metric}: mean {mean_score(records):.6f} over {len(records)} examples"
    print(summary + (f"; {len(rejected)} line(s) rejected (listed on stderr)" if rejected else ""))
    return 1 if rejected else 0


if __name__ == "__main__":
    sys.exit(main())
