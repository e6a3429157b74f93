"""Evaluate a Molmo checkpoint on registered benchmarks (resumable).

  python -m molmo_jax.evaluate --checkpoint Molmo-7B-D-0924/ --tasks chart_qa,pixmo_count \
      --data-dir benchmarks_data/ --out-dir eval_out/ [--max-examples 100]
  python -m molmo_jax.evaluate --list

Each task reads `<data-dir>/<task>/**/*.parquet` (the HF dataset named by --list). Predictions go to
`<out-dir>/<task>.predictions.jsonl` (a rerun skips finished examples), scores to
`<out-dir>/scores.json`, and a table is printed. MathVista is scored with the no-judge fallback
(no OpenAI extraction), so it reads lower than the published, judge-based numbers.
"""
import argparse
import sys

from molmo_jax.evaluation.runner import evaluate_task, scores_table
from molmo_jax.evaluation.tasks import TASKS, get_task
from molmo_jax.inference.predictor import Predictor


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
    p.add_argument("--list", action="store_true", help="print the registered tasks and exit")
    args = p.parse_args(argv)
    if args.list:
        for t in TASKS.values():
            print(f"{t.name:<16} {t.metric:<20} split={t.split:<11} crops={t.max_crops:<3} "
                  f"max_new_tokens={t.max_new_tokens:<4} {t.source}")
        return 0
    missing = [f"--{name.replace('_', '-')}" for name in ("checkpoint", "tasks", "data_dir", "out_dir")
               if not getattr(args, name)]
    if missing:
        p.error(f"missing {', '.join(missing)}")
    tasks = [get_task(name.strip()) for name in args.tasks.split(",") if name.strip()]
    predictor = Predictor.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                                          weights=args.weights)
    scores = {}
    for task in tasks:
        scores[task.name] = {"metric": task.metric, **evaluate_task(
            predictor, task, args.data_dir, args.out_dir, max_examples=args.max_examples,
            batch_size=args.batch_size)}
        print(f"{task.name}: {100 * scores[task.name]['score']:.2f} ({task.metric}, {scores[task.name]['n']} examples)",
              flush=True)
    print(scores_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
