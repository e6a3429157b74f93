"""Score a JSONL file of predictions offline with one of the official Molmo metrics.

  python -m molmo_jax.evaluation.score --metric pointing --input preds.jsonl --masks masks.npz \
      --out scored.jsonl

Each input line is a JSON object with the fields of its metric (see `metrics.py`). Each output line
is the input object plus `score` and the metric's detail fields. Prints the mean score.
"""
import argparse
import json
import math
import sys
from typing import Iterable, Iterator

import numpy as np

from molmo_jax.evaluation.metrics import METRICS, score_record


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line; a bad line raises naming file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def score_file(metric: str, path: str, masks=None) -> list[dict]:
    """Every record of `path` with its score fields added (errors name the file and line)."""
    scored = []
    for number, record in read_jsonl(path):
        try:
            scored.append({**record, **score_record(metric, record, masks)})
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{number}: {e}") from e
    return scored


def mean_score(records: Iterable[dict]) -> float:
    """Mean of the `score` fields (NaN when there are none)."""
    scores = [r["score"] for r in records if r["score"] is not None]
    return float(np.mean(scores)) if scores else math.nan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", required=True, choices=sorted(METRICS))
    parser.add_argument("--input", required=True, help="JSONL of predictions")
    parser.add_argument("--masks", help="npz of bool[N, H, W] masks by mask_key (pointing)")
    parser.add_argument("--out", help="JSONL to write the scored records to")
    args = parser.parse_args(argv)
    masks = dict(np.load(args.masks)) if args.masks else None
    records = score_file(args.metric, args.input, masks)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{args.metric}: mean {mean_score(records):.6f} over {len(records)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
