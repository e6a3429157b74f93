"""The demo's evaluation: one model answers the held-out synthetic scenes, the project's metrics
score the answers (molmo_jax.evaluation.metrics), and the caption loss is measured.

    evaluator = Evaluator(config, sets, batch_size=32)      # sets: demo.data.held_out_sets(...)
    result = evaluator.run(model)      # {"scores": {...}, "records": {task: [record, ...]}}

Prompts are built exactly as at inference (`preprocess_example(..., for_inference=True)`, the
fine-tuned formatting, the first prompt template); answers are greedy, up to `max_new_tokens`.
The compiled generation programs are shared by every model of the same architecture, so the
untrained and the trained model compile once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import formatting, preprocess
from data_pipelines.pipeline import crop_config
from data_pipelines.tokenizer import load_tokenizer
from molmo_jax.evaluation.counting import point_count_score
from molmo_jax.evaluation.metrics import score_record
from molmo_jax.inference.generate import GenerationConfig, Generator, prompt_bucket
from molmo_jax.inference.predictor import collate
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.trainer import init_train_state, lora_config_from, model_config_from, token_loss_sums

# task -> metric of molmo_jax.evaluation.metrics
METRICS = {"pointing": "pointing", "counting": "point_count", "clocks": "clock"}
# The image part of a preprocessed example (same crop geometry within a task).
SWAPPED = ("images", "image_masks")


class Evaluator:
    """Prepared held-out requests of one demo config, and how to score a model on them."""

    def __init__(self, config, sets: Mapping[str, List[Dict[str, Any]]], *, batch_size: int = 32,
                 max_new_tokens: int = 160):
        self.config = config
        self.model_config = model_config_from(config)
        self.tokenizer = load_tokenizer(config.data.tokenizer, pad_to=self.model_config.llm.vocab_size)
        self.crop = crop_config(config)
        self.sets = sets
        self.batch_size = batch_size
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=(self.tokenizer.eos_id,))
        self.prompts = {task: [preprocess.preprocess_example(e["request"], self.tokenizer, self.crop,
                                                             format_cfg=formatting.FINETUNED, for_inference=True)
                               for e in sets[task]] for task in METRICS}
        self.captions = [preprocess.preprocess_example(e, self.tokenizer, self.crop, format_cfg=formatting.FINETUNED)
                         for e in sets["captions"]]
        # The held-out answers, teacher-forced: does the model need the image to predict them?
        self.answers = {task: [preprocess.preprocess_example(e["example"], self.tokenizer, self.crop,
                                                             format_cfg=formatting.FINETUNED) for e in sets[task]]
                        for task in METRICS}
        self._generator = None
        self._loss_sums = None

    def initial_model(self) -> Molmo:
        """The model exactly as the trainer initialises it (same seed and key split)."""
        import optax
        state = init_train_state(self.model_config, lora_config_from(self.config), optax.identity(), "",
                                 jax.random.key(self.config.seed))
        model = nnx.eval_shape(lambda: Molmo(self.model_config, rngs=nnx.Rngs(0)))
        graphdef, abstract = nnx.split(model)
        nnx.replace_by_pure_dict(abstract, state["params"])
        return nnx.merge(graphdef, abstract)

    def run(self, model: Molmo) -> Dict[str, Any]:
        """Answers and scores of `model` on every task, and its caption loss."""
        state = nnx.state(model)
        if self._generator is None:
            self._generator = Generator(model)
        self._generator.state = state   # same architecture: the compiled programs are reused
        records, scores = {}, {}
        for task, metric in METRICS.items():
            texts = self._answers(self.prompts[task])
            records[task] = []
            for example, text in zip(self.sets[task], texts):
                scored = score_record(metric, {"prediction": text, **example["truth"]})
                records[task].append({"prediction": text, **_plain(example["truth"]), **_plain(scored)})
        scores["pointing_f1"] = _mean(r["f1"] for r in records["pointing"])
        # Counts run 0-6: "There are none." (the official zero-count answer) reads as 0, which the
        # official parser means to do but never does (evaluation/counting.py); both are kept.
        for r in records["counting"]:
            r["official_correct"] = r["correct"]
            r.update(point_count_score(r["prediction"], r["gt_count"], read_none=True))
        scores["counting_accuracy"] = _mean(r["correct"] for r in records["counting"])
        scores["counting_accuracy_official_parser"] = _mean(r["official_correct"] for r in records["counting"])
        scores["clock_accuracy"] = _mean(r["overall_close"] for r in records["clocks"])
        scores["clock_hour_accuracy"] = _mean(r["hour_correct"] or 0.0 for r in records["clocks"])
        scores["caption_loss"] = self.mean_loss(state, self.captions)
        right = [self.mean_loss(state, examples) for examples in self.answers.values()]
        swapped = [self.mean_loss(state, examples, swap_images=True) for examples in self.answers.values()]
        scores["image_reliance"] = float(np.mean(swapped) - np.mean(right))
        return {"scores": scores, "records": records}

    def _answers(self, prompts: Sequence[dict]) -> List[str]:
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)  # one batch shape: one compilation
            batch = collate(chunk, self.crop.max_crops)
            out = self._generator(batch, self.generation, self.tokenizer.decode)
            texts += [t.strip() for t in out.texts[:real]]
        return texts

    def mean_loss(self, state, examples: Sequence[dict], *, swap_images: bool = False) -> float:
        """Mean token cross-entropy of the examples' answers (teacher-forced). With swap_images
        each example gets the next example's image instead of its own (a model that answers from
        the text alone scores the same either way)."""
        if self._loss_sums is None:
            graphdef = self._generator.graphdef

            @jax.jit
            def sums(state, batch):
                return token_loss_sums(nnx.merge(graphdef, state), batch, 0.0)[0]

            self._loss_sums = sums
        total, weight = 0.0, 0.0
        for start in range(0, len(examples), self.batch_size):
            chunk = list(examples[start:start + self.batch_size])
            if swap_images:
                chunk = [dict(e, **{k: examples[(start + i + 1) % len(examples)][k] for k in SWAPPED})
                         for i, e in enumerate(chunk)]
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)
            batch = _teacher_forced_batch(chunk, real, self.crop.max_crops)
            out = jax.device_get(self._loss_sums(state, batch))
            total += float(out["ce_sum"])
            weight += float(out["weight_sum"])
        return total / max(weight, 1.0)


def _teacher_forced_batch(examples: Sequence[dict], real: int, max_crops: int) -> Dict[str, jnp.ndarray]:
    """collate + right-padded targets and loss weights (0 on padding and on the filler rows)."""
    batch = collate(examples, max_crops)
    length = prompt_bucket(batch["input_ids"].shape[1])  # a few lengths: a few compilations
    batch["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, length - batch["input_ids"].shape[1])),
                                constant_values=-1)
    targets = np.full((len(examples), length), -1, np.int32)
    weights = np.zeros((len(examples), length), np.float32)
    for row, e in enumerate(examples[:real]):
        n = len(e["target_tokens"])
        targets[row, :n] = e["target_tokens"]
        weights[row, :n] = np.maximum(e["loss_masks"], 0.0)
    batch.update(target_tokens=targets, loss_masks=weights)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _plain(d: Mapping[str, Any]) -> Dict[str, Any]:
    """JSON-friendly copy: arrays -> lists; the big instance masks are left out."""
    out = {}
    for k, v in d.items():
        if k == "masks":
            continue
        out[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else float("nan")
