"""The demo's data: the tokenizer it trains, and the held-out scenes it is scored on.

    lines = tokenizer_text(config, 150)          # formatted conversations of training examples
    spm_path = train_tokenizer(folder, lines, vocab_size)
    sets = held_out_sets(config, 128)             # per task: requests, truths, images
    held_out_overlap(config, sets, 200)           # 0: no held-out image is a training image
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Sequence

import numpy as np
import sentencepiece as spm

from data_pipelines import formatting
from data_pipelines.mixtures import get_mixture, mixture_datasets
from data_pipelines.pipeline import build_source, known_datasets

# The training stream uses config.data.seed; held-out scenes come from this seed, and
# `held_out_overlap` checks that no held-out image appears among the training images.
EVAL_SEED = 7_777
# Held-out pointing / counting questions ask for an absent shape at the generator's default rate
# (0.15: counts 0-6 about equally often) whatever rate the training recipe oversamples.
EVAL_ABSENT_RATE = 0.15
TOKENIZER_SEED = 1_234
TASKS = ("pointing", "counting", "clocks")



# ------------------------------------------------------------------------------------------ tokenizer
def tokenizer_text(config, examples_per_dataset: int) -> List[str]:
    """The formatted conversations of synthetic training examples: the text the model reads."""
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
    held = {_digest(e["image"]) for t in TASKS for e in sets[t]} | {_digest(e["image"]) for e in sets["captions"]}
    hits = 0
    for name in mixture_datasets(get_mixture(config.data.mixture, known_datasets())):
        source = build_source(name, config.data, int(config.data.seed))
        hits += sum(_digest(source[i]["image"]) in held for i in range(min(train_examples, len(source))))
    return hits


def _digest(image: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()
