"""`make demo`: a tiny Molmo learns to point, count and read clocks on a CPU.

    python -m molmo_jax.demo                       # what `make demo` runs
    python -m molmo_jax.demo --steps 3000 --width 256 --workdir runs/longer

Steps, all under --workdir (default demo_run/):
  1. tokenizer/spm.model: a sentencepiece BPE trained on the text of synthetic training examples;
  2. held-out scenes: the synthetic generators with a seed the training stream never uses;
  3. the untrained model (the trainer's initialisation) answers them;
  4. training with the real trainer, input pipeline and checkpointing (configs/demo.py:sft),
     logging loss and the time left; checkpoints/ is what `molmo_jax.predict` and
     `molmo_jax.export` read;
  5. the trained model, loaded back from its checkpoint, answers the same scenes;
  6. report: scores before / after (scores.md, scores.json), answers drawn on the held-out
     images (answers/*.png), the loss curve (loss_curve.png), every answer (predictions.jsonl).

Scores are the project's evaluation metrics: pointing F1 (points matched inside the instance
masks), counting accuracy (exact count, PixMo-Count parsing), clock accuracy within the
PixMo-Clocks tolerance (hour right, minutes within 3) and the clock hour accuracy, and the
caption loss (token cross-entropy of held-out captions, teacher-forced).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import resource
import shutil
import sys
import time
from typing import Sequence

from absl import logging as absl_logging

from molmo_jax.demo import report
from molmo_jax.demo.data import held_out_overlap, held_out_sets, tokenizer_text, train_tokenizer
from molmo_jax.demo.evaluator import Evaluator
from molmo_jax.inference.predictor import load_orbax_model
from molmo_jax.train.config_file import load_config_file
from molmo_jax.train.trainer import train

log = logging.getLogger("molmo_jax.demo")
# The demo's experiment file, configs/demo.py beside this package (in a checkout and when installed).
DEMO_CONFIG = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo.py")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="demo_run", help="output folder (a finished run there is replaced)")
    p.add_argument("--steps", type=int, help="training steps (default: configs/demo.py)")
    p.add_argument("--batch", type=int, help="global batch size (default: configs/demo.py)")
    p.add_argument("--width", type=int, help="LLM width d_model (heads of 32 dims; default: configs/demo.py)")
    p.add_argument("--layers", type=int, help="LLM blocks (default: configs/demo.py)")
    p.add_argument("--lr", type=float, help="peak learning rate of every parameter group (default: configs/demo.py)")
    p.add_argument("--eval-examples", type=int, default=128, help="held-out scenes per task")
    p.add_argument("--eval-batch", type=int, default=32, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest answer generated")
    p.add_argument("--overlap-check", type=int, default=200,
                   help="training images per dataset compared with the held-out images")
    p.add_argument("--tokenizer-examples", type=int, default=150, help="examples per dataset to train the tokenizer on")
    p.add_argument("--config-file", default=f"{DEMO_CONFIG}:sft", metavar="FILE.py:ARG",
                   help="experiment file the overrides apply to (default: configs/demo.py:sft)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. --config data.seq_len=384 (repeatable)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, tokenizer_path: str):
    """The experiment file (configs/demo.py:sft) with the command-line overrides."""
    c = load_config_file(args.config_file)
    c.data.tokenizer = tokenizer_path
    if args.steps is not None:
        c.train.total_steps = args.steps
        c.checkpoint.every = min(c.checkpoint.every, args.steps)
    if args.batch is not None:
        c.train.global_batch = args.batch
    if args.width is not None:
        c.model.llm.d_model = args.width
        c.model.llm.n_heads = max(args.width // 32, 1)
        c.model.llm.n_kv_heads = max(args.width // 64, 1)
        c.model.llm.head_dim = args.width // c.model.llm.n_heads
        c.model.llm.mlp_hidden_size = 4 * args.width
    if args.layers is not None:
        c.model.llm.n_layers = args.layers
    if args.lr is not None:
        c.optimizer.llm.lr = c.optimizer.connector.lr = c.optimizer.vit.lr = args.lr
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config {item!r}: expected KEY=VALUE, e.g. data.seq_len=384")
        node, *path = key.split(".")
        parent = c
        for name in [node, *path][:-1]:
            if name not in parent:
                raise KeyError(f"--config {item!r}: no key {name!r} in the demo config")
            parent = parent[name]
        leaf = key.split(".")[-1]
        if leaf not in parent:
            raise KeyError(f"--config {item!r}: no key {leaf!r} under {key.rsplit('.', 1)[0] or 'the config'}")
        old = parent[leaf]
        parent[leaf] = type(old)(json.loads(value) if not isinstance(old, str) else value)
    return c


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): on a shared machine
    it tells what the run costs, independently of the other load."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("molmo_jax", "molmo_jax.demo"):
        logging.getLogger(name).setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / grain chatter

    start = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        log.info("removing the previous demo run in %s", workdir)
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)

    config = build_config(args, tokenizer_path="")
    lines = tokenizer_text(config, args.tokenizer_examples)
    vocab = int(config.model.llm.vocab_size) - 12  # a few ids of headroom, image tokens go above vocab_size
    config.data.tokenizer = train_tokenizer(os.path.join(workdir, "tokenizer"), lines, vocab)
    log.info("[1/5] tokenizer: %d pieces trained on %d synthetic conversations -> %s (%.0fs)",
             vocab, len(lines), config.data.tokenizer, time.perf_counter() - start)

    sets = held_out_sets(config, args.eval_examples)
    evaluator = Evaluator(config, sets, batch_size=args.eval_batch, max_new_tokens=args.max_new_tokens)
    log.info("[2/5] untrained model on %d held-out scenes per task", args.eval_examples)
    before = evaluator.run(evaluator.initial_model())
    log.info("      %s (%.0fs)", report.one_line(before["scores"]), time.perf_counter() - start)

    log.info("[3/5] training %d steps of batch %d (real trainer, pipeline and checkpoints in %s)",
             config.train.total_steps, config.train.global_batch, workdir)
    train_start = time.perf_counter()
    train(config, workdir)
    train_time = time.perf_counter() - train_start

    log.info("[4/5] trained model, loaded from its checkpoint, on the same scenes")
    after = evaluator.run(load_orbax_model(workdir))
    log.info("      %s", report.one_line(after["scores"]))

    log.info("[5/5] report")
    overlap = held_out_overlap(config, sets, args.overlap_check)
    summary = report.write_report(workdir, before, after, sets, dict(
        train_seconds=train_time, total_seconds=time.perf_counter() - start, cpu_seconds=_cpu_seconds(),
        steps=int(config.train.total_steps), batch=int(config.train.global_batch), held_out_overlap=overlap,
        eval_examples=args.eval_examples))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
