"""Run registered benchmarks: generate answers, score them, keep a resumable predictions file.

For each task, `<out_dir>/<task>.predictions.jsonl` gets one line per example as soon as its batch
is done: id, prompt, prediction, the metric's record fields, `score` and its details. A restarted
evaluation reads that file and skips the ids already there (a line cut short by a crash is
dropped and redone). `<out_dir>/scores.json` keeps the mean score of every task evaluated in that
folder. Examples whose image does not decode are written with an `error` and left out of the mean
(the official loaders drop such rows too).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import pathlib
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from data_pipelines import formatting, images as images_lib, preprocess
from molmo_jax.evaluation.metrics import score_record
from molmo_jax.evaluation.tasks import Task, TaskExample
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import Predictor, read_image_source

log = logging.getLogger(__name__)
SCORES_FILE = "scores.json"


def json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_finished(path: pathlib.Path) -> list[dict]:
    """The complete lines of a predictions file; a truncated last line is removed from the file."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ValueError(f"{path}:{number + 1}: corrupt line in the middle of a predictions file")
            log.warning("%s: dropping a truncated last line (interrupted write); it will be redone", path)
            path.write_text("".join(lines[:-1]), encoding="utf-8")
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Mean score (and mean of every numeric detail) over the scored rows."""
    scored = [r for r in rows if "error" not in r]
    summary = {"n": len(scored), "errors": len(rows) - len(scored)}
    keys = sorted({k for r in scored for k, v in r.get("details", {}).items() if isinstance(v, (int, float))})
    summary["score"] = float(np.mean([r["score"] for r in scored])) if scored else math.nan
    for key in keys:
        values = [r["details"][key] for r in scored if isinstance(r["details"].get(key), (int, float))]
        summary[key] = float(np.mean(values))
    return summary


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _prepare(predictor: Predictor, task: Task, example: TaskExample) -> dict:
    crop = dataclasses.replace(predictor.crop, max_crops=task.max_crops)
    ex = dict(example.example)
    if example.image is not None:
        ex["image"] = read_image_source(example.image)
    return preprocess.preprocess_example(ex, predictor.tokenizer, crop, format_cfg=formatting.FINETUNED,
                                         for_inference=True)


def evaluate_task(predictor: Predictor, task: Task, data_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                  max_examples: Optional[int] = None, batch_size: int = 8) -> dict:
    """Evaluates (or finishes evaluating) one task; returns its summary (see `summarize`)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task.name}.predictions.jsonl"
    done = {row["id"] for row in read_finished(path)}
    config = GenerationConfig(max_new_tokens=task.max_new_tokens, stop_token_ids=(predictor.tokenizer.eos_id,))
    pending = (ex for ex in task.examples(data_dir, max_examples) if ex.id not in done)
    with path.open("a", encoding="utf-8") as out:
        for batch in _batches(pending, batch_size):
            prepared, ready = [], []
            for example in batch:
                try:
                    prepared.append(_prepare(predictor, task, example))
                    ready.append(example)
                except images_lib.ImageDecodeError as e:
                    log.warning("task %s, example %s: %s; skipped", task.name, example.id, e)
                    out.write(json.dumps({"id": example.id, "error": str(e)}) + "\n")
            answers = predictor.generate_batch(prepared, config, task.max_crops, batch_size) if prepared else []
            for example, inputs, answer in zip(ready, prepared, answers):
                record = {**example.record, "prediction": answer.text, "mask_key": example.id}
                masks = {example.id: example.masks} if example.masks is not None else None
                scored = score_record(task.metric, record, masks)
                prompt = predictor.tokenizer.decode(inputs["input_tokens"])
                row = {"id": example.id, "prompt": prompt, "prediction": answer.text,
                       "record": example.record, "score": scored.pop("score"), "details": scored}
                out.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")
            out.flush()
    summary = summarize(read_finished(path))
    update_scores(out_dir, task.name, task.metric, summary)
    return summary


def update_scores(out_dir: pathlib.Path, name: str, metric: str, summary: dict) -> None:
    """Puts task `name`'s summary into `<out_dir>/scores.json`, keeping the other tasks'."""
    path = out_dir / SCORES_FILE
    scores = json.loads(path.read_text()) if path.exists() else {}
    scores[name] = {"metric": metric, **summary}
    path.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")


def scores_table(scores: dict) -> str:
    """A plain-text table of {task: summary}: task, metric, score (x100), examples, errors."""
    lines = [f"{'task':<16} {'metric':<20} {'score':>7} {'n':>7} {'errors':>6}"]
    for name, s in sorted(scores.items()):
        lines.append(f"{name:<16} {s['metric']:<20} {100 * s['score']:>7.2f} {s['n']:>7} {s['errors']:>6}")
    return "\n".join(lines)
