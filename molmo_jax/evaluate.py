"""Evaluate a Molmo checkpoint on registered benchmarks (resumable).

  python -m molmo_jax.evaluate --checkpoint Molmo-7B-D-0924/ --tasks chart_qa,pixmo_count \
      --data-dir benchmarks_data/ --out-dir eval_out/ [--max-examples 100]
  python -m molmo_jax.evaluate --checkpoint Molmo2-8B/ --tasks molmo2_video_point_eval \
      --data-dir molmo2_data/ --video-dir videos/ --out-dir eval_out/
  python -m molmo_jax.evaluate --list

Each task reads `<data-dir>/<task>/**/*.parquet` (the HF dataset named by --list). Predictions go to
`<out-dir>/<task>.predictions.jsonl` (a rerun skips finished examples), scores to
`<out-dir>/scores.json`, and a table is printed. MathVista is scored with the no-judge fallback
(no OpenAI extraction), so it reads lower than the published, judge-based numbers. A Molmo2 checkpoint
(a transformers Molmo2 folder, or a Molmo2 run's training checkpoint) runs the Molmo2 tasks (`evaluation/molmo2_runner.py`: its video eval sets
and MuirBench): their parquet folders as published under --data-dir, videos in --video-dir and/or the
download cache.
"""
import argparse
import dataclasses
import sys

from molmo_jax.evaluation import molmo2_runner
from molmo_jax.evaluation.runner import evaluate_task, scores_table
from molmo_jax.evaluation.tasks import TASKS, get_task
from molmo_jax.inference.predictor import Predictor
from molmo_jax.inference.predictor_molmo2 import Molmo2Predictor, is_molmo2_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="HF Molmo folder or molmo-jax checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer file/folder (default: the checkpoint folder)")
    p.add_argument("--tasks", help="comma-separated task names (see --list)")
    p.add_argument("--data-dir", help="folder with one sub-folder of parquet files per task")
    p.add_argument("--out-dir", help="where predictions and scores.json go")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--weights", choices=("int8", "nf4"),
                   help="weight-only int8 or nf4 (4-bit NormalFloat) quantized inference (default: the checkpoint's "
                        "weights; a LoRA checkpoint runs its base + adapters unmerged either way)")
    p.add_argument("--video-dir", help="Molmo2 tasks: a folder of videos in the official layouts")
    p.add_argument("--video-cache", help="Molmo2 tasks: the video download cache (with --video-manifest)")
    p.add_argument("--video-manifest", help="Molmo2 tasks: the {video_id: url} manifest of --video-cache")
    p.add_argument("--max-new-tokens", type=int, help="cap every task's new tokens (default: each task's own)")
    p.add_argument("--list", action="store_true", help="print the registered tasks and exit")
    args = p.parse_args(argv)
    if args.list:
        for t in TASKS.values():
            print(f"{t.name:<16} {t.metric:<20} split={t.split:<11} crops={t.max_crops:<3} "
                  f"max_new_tokens={t.max_new_tokens:<4} {t.source}")
        for t in molmo2_runner.TASKS.values():
            print(f"{t.name:<16} {t.metric:<20} split={t.split:<11} (Molmo2{', video' if t.video else ''}) "
                  f"max_new_tokens={t.max_new_tokens:<4} {t.source}")
        return 0
    missing = [f"--{name.replace('_', '-')}" for name in ("checkpoint", "tasks", "data_dir", "out_dir")
               if not getattr(args, name)]
    if missing:
        p.error(f"missing {', '.join(missing)}")
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if is_molmo2_checkpoint(args.checkpoint):
        return _molmo2(p, args, names)
    tasks = [get_task(name) for name in names]
    predictor = Predictor.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                                          weights=args.weights)
    scores = {}
    for task in tasks:
        if args.max_new_tokens:
            task = dataclasses.replace(task, max_new_tokens=args.max_new_tokens)
        scores[task.name] = {"metric": task.metric, **evaluate_task(
            predictor, task, args.data_dir, args.out_dir, max_examples=args.max_examples,
            batch_size=args.batch_size)}
        _report(task, scores[task.name])
    print(scores_table(scores))
    return 0


def _report(task, summary: dict) -> None:
    print(f"{task.name}: {100 * summary['score']:.2f} ({task.metric}, {summary['n']} examples)", flush=True)


def _molmo2(p: argparse.ArgumentParser, args, names: list[str]) -> int:
    """The Molmo2 tasks (video, multi-image) on a Molmo2 folder or a Molmo2 run's training checkpoint."""
    unknown = [n for n in names if n not in molmo2_runner.TASKS]
    if unknown:
        p.error(f"{args.checkpoint} is a Molmo2 checkpoint: tasks {unknown} are not Molmo2 tasks "
                f"({', '.join(sorted(molmo2_runner.TASKS))})")
    videos = [n for n in names if molmo2_runner.TASKS[n].video]
    if videos and not (args.video_dir or args.video_cache):
        p.error(f"Molmo2 video tasks {videos} need --video-dir and/or --video-cache with --video-manifest")
    predictor = Molmo2Predictor.from_checkpoint(args.checkpoint, dtype=args.dtype, weights=args.weights,
                                                tokenizer=args.tokenizer)
    scores = {}
    for task in map(molmo2_runner.get_task, names):
        scores[task.name] = {"metric": task.metric, **molmo2_runner.evaluate_task(
            predictor, task, args.data_dir, args.out_dir, video_dir=args.video_dir, cache_dir=args.video_cache,
            manifest=args.video_manifest, max_examples=args.max_examples, max_new_tokens=args.max_new_tokens)}
        _report(task, scores[task.name])
    print(scores_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
