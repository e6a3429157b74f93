"""Molmo2 benchmarks on video and several images, answered by a `Molmo2Predictor`, scored with the
Molmo2 metrics (`video_metrics`), with the resumable predictions file of `runner`.

Tasks (allenai/molmo2 `olmo/eval/eval_utils.py` names the evaluators and the new-token budgets):
  molmo2_video_point_eval  allenai/Molmo2-VideoPointEval, split val   video_point (F1 with masks), 2048
  molmo2_video_count_eval  allenai/Molmo2-VideoCountEval, split val   video_count (accuracy), 2048
  muir_bench               MUIRBENCH/MUIRBENCH, split test            muir_bench_mc, 32
The video sets are read by `data_pipelines.sources.molmo2` from `<data_dir>/<HF folder>/`, their videos
from `video_dir` (the official layouts) or the video download cache; the prompt is the example's
question as the official loaders give it. MuirBench is read from `<data_dir>/muir_bench/` (images in the
parquet); its prompt is the official eval template of `DataFormatter.template_options` ("<image>" in the
question becomes "Image N" as `replace_images` does). A video that does not decode is written with an
`error` and left out of the mean. Masks stay out of the predictions file (its records hold the small
fields).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import random
import re
import string
from typing import Callable, Iterator, Optional

from data_pipelines import video as video_lib
from data_pipelines.sources import molmo2
from molmo_jax.evaluation import runner, tasks as tasks_lib, video_metrics
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import RequestError

log = logging.getLogger(__name__)


def _point_score(prediction: str, example: dict) -> dict:
    m = example["metadata"]
    result = video_metrics.video_point_score(prediction, m["gt_abs_triplets"], m["gt_abs_masks"], m["video_duration"],
                                             m["video_width"], m["video_height"])
    return {"score": result["f1"], **result}


def _count_score(prediction: str, example: dict) -> dict:
    result = video_metrics.video_count_score(prediction, int(example["metadata"]["count"]))
    return {"score": result["correct"], **result}


def _point_record(example: dict) -> dict:
    m = example["metadata"]
    return {"label": example["label"], "gt_triplets": m["gt_abs_triplets"], "video_duration": m["video_duration"],
            "video_wh": [m["video_width"], m["video_height"]]}


def _count_record(example: dict) -> dict:
    return {"count": example["metadata"]["count"], "subset": example["metadata"]["subset"]}


def _replace_images(question: str, options: list[str]) -> tuple[str, list[str]]:
    """"<image>" -> "Image 1", "Image 2", ... across the question and then the options (`replace_images`)."""
    counter = iter(range(1, 1 << 30))
    texts = [re.sub(r"<image>", lambda _: f"Image {next(counter)}", t) for t in [question, *options]]
    return texts[0], texts[1:]


def muir_bench_examples(task, data_dir: str, max_examples: Optional[int] = None, **media) -> Iterator[tuple[str, dict]]:
    """MuirBench rows (idx, question, options, answer letter, image_list) -> (id, example)."""
    for index, row in enumerate(tasks_lib.read_rows(pathlib.Path(data_dir) / task.name, task.split)):
        if max_examples is not None and index >= max_examples:
            return
        try:
            question, options = _replace_images(row["question"], list(row["options"]))
            images = [tasks_lib.image_value(i) for i in row["image_list"]]
            answer = row["answer"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"task {task.name}, row {index}: cannot build an example ({type(e).__name__}: {e}); "
                             f"the row has columns {sorted(row)}") from e
        prompt = question + "\nOnly return the correct answer option.\n" + "\n".join(
            f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options))
        yield str(row.get("idx", index)), {"question": prompt, "images": images, "options": options,
                                           "answer": answer, "task": row.get("task")}


def _muir_bench_score(prediction: str, example: dict) -> dict:
    choice = video_metrics.muir_bench_choice(prediction, example["options"], random.Random(42))
    return {"score": float(choice == example["answer"]), "choice": choice}


def _video_examples(task, data_dir: str, max_examples: Optional[int] = None, **media) -> Iterator[tuple[str, dict]]:
    """(id, example) of a Molmo2 video eval set in file order; examples whose video is absent are not
    there (counted in the source's stats)."""
    source = molmo2.load(task.name, data_dir, task.split, **media)
    log.info("%s: %s", task.name, source.stats)
    for index in range(len(source) if max_examples is None else min(max_examples, len(source))):
        yield str(source.records[index][1]), source[index]


@dataclasses.dataclass(frozen=True)
class Molmo2Task:
    name: str  # also the name of its source in data_pipelines.sources.molmo2
    metric: str
    split: str
    max_new_tokens: int
    score: Callable[[str, dict], dict]  # (prediction, example) -> {"score", ...details}
    record: Callable[[dict], dict]  # example -> the fields written to the predictions file
    source: str = ""
    breakdown: Optional[Callable[[list], dict]] = None  # scored rows -> per-set figures added to the summary
    read: Callable = _video_examples  # (task, data_dir, max_examples, **media) -> (id, example)
    video: bool = True  # needs videos (--video-dir / --video-cache)


TASKS = {t.name: t for t in (
    Molmo2Task("molmo2_video_point_eval", "video_point", "val", 2048, _point_score, _point_record,
               "allenai/Molmo2-VideoPointEval"),
    Molmo2Task("molmo2_video_count_eval", "video_count", "val", 2048, _count_score, _count_record,
               "allenai/Molmo2-VideoCountEval", lambda rows: video_metrics.video_count_breakdown(
                   [(r["record"]["count"], r["score"], r["record"]["subset"]) for r in rows])),
    Molmo2Task("muir_bench", "muir_bench_mc", "test", 32, _muir_bench_score,
               lambda e: {"options": e["options"], "answer": e["answer"], "task": e["task"]}, "MUIRBENCH/MUIRBENCH",
               read=muir_bench_examples, video=False),
)}


def get_task(name: str) -> Molmo2Task:
    if name not in TASKS:
        raise KeyError(f"unknown Molmo2 task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def evaluate_task(predictor, task: Molmo2Task, data_dir: str, out_dir: str | pathlib.Path, *,
                  video_dir: Optional[str] = None, cache_dir: Optional[str] = None, manifest: Optional[str] = None,
                  max_examples: Optional[int] = None, max_new_tokens: Optional[int] = None) -> dict:
    """Evaluates (or finishes evaluating) one Molmo2 task with a `Molmo2Predictor`; its summary."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task.name}.predictions.jsonl"
    done = {row["id"] for row in runner.read_finished(path)}
    config = GenerationConfig(max_new_tokens=max_new_tokens or task.max_new_tokens)
    with path.open("a", encoding="utf-8") as out:
        media = dict(video_dir=video_dir, cache_dir=cache_dir, manifest=manifest) if task.video else {}
        for example_id, example in task.read(task, data_dir, max_examples, **media):
            if example_id in done:
                continue
            try:
                inputs = predictor.prepare(example["question"], images=example.get("images", ()),
                                           video=example.get("video"))
            except (video_lib.VideoDecodeError, RequestError) as e:
                log.warning("task %s, example %s: %s; skipped", task.name, example_id, e)
                out.write(json.dumps({"id": example_id, "error": str(e)}) + "\n")
                continue
            answer = predictor.generate(inputs, config)
            scored = task.score(answer.text, example)
            row = {"id": example_id, "prompt": example["question"], "prediction": answer.text,
                   "record": task.record(example), "score": scored.pop("score"), "details": scored}
            out.write(json.dumps(row, ensure_ascii=False, default=runner.json_default) + "\n")
            out.flush()
    rows = runner.read_finished(path)
    summary = runner.summarize(rows)
    if task.breakdown is not None:
        summary.update(task.breakdown([r for r in rows if "error" not in r]))
    runner.update_scores(out_dir, task.name, task.metric, summary)
    return summary
