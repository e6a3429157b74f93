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
import shutil
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

log = logging.getLogger("molmo_jax.demo")

# The training stream uses config.data.seed; held-out scenes come from this seed, and
# `held_out_overlap` checks that no held-out image appears among the training images.
EVAL_SEED = 7_777
# Held-out pointing / counting questions ask for an absent shape at the generator's default rate
# (0.15: counts 0-6 about equally often) whatever rate the training recipe oversamples.
EVAL_ABSENT_RATE = 0.15
TOKENIZER_SEED = 1_234
TASKS = ("pointing", "counting", "clocks")


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
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. --config data.seq_len=384 (repeatable)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ config
def build_config(args: argparse.Namespace, tokenizer_path: str):
    """configs/demo.py:sft with the command-line overrides."""
    from configs import demo as demo_config
    c = demo_config.get_config("sft")
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


# ------------------------------------------------------------------------------------------ tokenizer
def tokenizer_text(config, examples_per_dataset: int) -> List[str]:
    """The formatted conversations of synthetic training examples: the text the model reads."""
    from data_pipelines import formatting
    from data_pipelines.mixtures import get_mixture, mixture_datasets
    from data_pipelines.pipeline import build_source, known_datasets
    lines = []
    for name in mixture_datasets(get_mixture(config.data.mixture, known_datasets())):
        source = build_source(name, config.data, TOKENIZER_SEED)
        for i in range(min(examples_per_dataset, len(source))):
            example = source[i]
            rng = np.random.RandomState(i)
            for cfg in (formatting.FINETUNED, formatting.CAPTIONER):
                if cfg is formatting.CAPTIONER and example.get("style") != "long_caption":
                    continue
                conversations, _ = formatting.format_example(example, cfg, rng=rng)
                lines += ["".join(c) for c in conversations]
    return lines


def train_tokenizer(folder: str, lines: Sequence[str], vocab_size: int) -> str:
    """A sentencepiece BPE model (byte fallback: any text encodes) -> path of spm.model.

    EOS is id 1 and doubles as BOS (Molmo's rule); the image tokens are added above the model's
    vocab_size by data_pipelines.tokenizer. Digits are single pieces, as in Qwen2's tokenizer, so
    a coordinate is read and written digit by digit rather than as one of hundreds of merged
    number pieces.
    """
    import sentencepiece as spm
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
        max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    return prefix + ".model"


# ------------------------------------------------------------------------------------------ data
def held_out_sets(config, n: int) -> Dict[str, List[Dict[str, Any]]]:
    """Per task, n held-out examples: {"request": example dict for the model, "truth": metric fields,
    "image": uint8[H, W, 3], "example": the source example, answer included}; plus "captions" for
    the caption loss."""
    from data_pipelines.pipeline import build_source
    sets: Dict[str, List[Dict[str, Any]]] = {t: [] for t in (*TASKS, "captions")}
    # The training datasets' generators and options (config.data.synthetic_*), another seed.
    data = config.data.copy_and_resolve_references()
    options = data.synthetic_options.to_dict()
    options["shapes"] = dict(options.get("shapes") or {}, absent_rate=EVAL_ABSENT_RATE)
    data.synthetic_options = options
    pointing, counting, clocks, captions = (build_source(f"synthetic_{name}", data, EVAL_SEED)
                                            for name in ("pointing", "counting", "clocks", "captions"))
    for i in range(n):
        ex = pointing[i]
        meta = ex["metadata"]
        h, w = ex["image"].shape[:2]
        sets["pointing"].append(dict(image=ex["image"], example=ex, request=dict(image=ex["image"], style="pointing", label=meta["label"]),
                                     truth=dict(image_wh=(w, h), gt_points_px=np.asarray(meta["points"]).tolist(),
                                                masks=meta["masks"], label=meta["label"])))
        ex = counting[i]
        meta = ex["metadata"]
        sets["counting"].append(dict(image=ex["image"], example=ex, request=dict(image=ex["image"], style="point_count",
                                                                     label=meta["label"]),
                                     truth=dict(gt_count=int(meta["count"]), label=meta["label"])))
        ex = clocks[i]
        meta = ex["metadata"]
        sets["clocks"].append(dict(image=ex["image"], example=ex, request=dict(image=ex["image"], style="clocks", question=ex["question"]),
                                   truth=dict(hour=meta["hour"], minute=meta["minute"], second=meta["second"],
                                              answer=ex["answer"])))
        sets["captions"].append(captions[i])
    return sets


def held_out_overlap(config, sets: Dict[str, List[Dict[str, Any]]], train_examples: int) -> int:
    """How many held-out images equal one of the first `train_examples` images of every training
    dataset (0 expected: the seeds differ)."""
    from data_pipelines.mixtures import get_mixture, mixture_datasets
    from data_pipelines.pipeline import build_source, known_datasets
    held = {_digest(e["image"]) for t in TASKS for e in sets[t]} | {_digest(e["image"]) for e in sets["captions"]}
    hits = 0
    for name in mixture_datasets(get_mixture(config.data.mixture, known_datasets())):
        source = build_source(name, config.data, int(config.data.seed))
        hits += sum(_digest(source[i]["image"]) in held for i in range(min(train_examples, len(source))))
    return hits


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): on a shared machine
    it tells what the run costs, independently of the other load."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _digest(image: np.ndarray) -> bytes:
    import hashlib
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("molmo_jax", "molmo_jax.demo"):
        logging.getLogger(name).setLevel(logging.INFO)
    from absl import logging as absl_logging  # orbax / grain chatter
    absl_logging.set_verbosity(absl_logging.WARNING)

    from molmo_jax import demo_report
    from molmo_jax.demo_eval import Evaluator
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
    log.info("      %s (%.0fs)", demo_report.one_line(before["scores"]), time.perf_counter() - start)

    log.info("[3/5] training %d steps of batch %d (real trainer, pipeline and checkpoints in %s)",
             config.train.total_steps, config.train.global_batch, workdir)
    from molmo_jax.train.trainer import train
    train_start = time.perf_counter()
    train(config, workdir)
    train_time = time.perf_counter() - train_start

    log.info("[4/5] trained model, loaded from its checkpoint, on the same scenes")
    from molmo_jax.inference.predict import load_orbax_model
    after = evaluator.run(load_orbax_model(workdir))
    log.info("      %s", demo_report.one_line(after["scores"]))

    log.info("[5/5] report")
    overlap = held_out_overlap(config, sets, args.overlap_check)
    summary = demo_report.write_report(workdir, before, after, sets, dict(
        train_seconds=train_time, total_seconds=time.perf_counter() - start, cpu_seconds=_cpu_seconds(),
        steps=int(config.train.total_steps), batch=int(config.train.global_batch), held_out_overlap=overlap,
        eval_examples=args.eval_examples))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
