"""Console lines, TensorBoard events and a metrics.jsonl file for the training loop.

The loop hands over the device metrics of step s right after dispatching step s+1, so reading
them (`jax.device_get`) waits for a step that is already finished and never stalls the device
(MaxText's one-step-late metrics). Throughput uses the wall time between consecutive steps.
MFU = useful model FLOPs of the step (its real tokens and crops, padding excluded:
useful_train_step_flops) / step time / (devices * peak FLOP/s of one device), shown only for
devices whose peak is known.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, Iterable, Optional

import jax
import numpy as np

from molmo_jax.model.flops import forward_flops
from molmo_jax.model.config import MolmoConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (vendor data sheets), keyed by a substring of device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device_kind: str) -> Optional[float]:
    for name, flops in PEAK_FLOPS.items():  # dict order: specific names before prefixes
        if name in device_kind:
            return flops
    return None


def train_step_flops(cfg: MolmoConfig, batch: int, seq_len: int, num_crops: int,
                     trained: Iterable[str] = ("vit", "connector", "llm")) -> float:
    """Model FLOPs of one optimizer step.

    A trained part costs forward + backward (3x forward: activation and weight gradients). A
    frozen part costs its forward, plus the activation gradient (2x in total) when something
    below it is trained. The parts run vit -> connector -> llm; the frozen base token
    embedding is a lookup (no matmul), so freezing it changes nothing here, while the LM head,
    trained, is counted 3x inside the llm part.
    """
    return trained_step_flops(forward_flops(cfg, batch, seq_len, num_crops), trained)


def trained_step_flops(fwd: Dict[str, float], trained: Iterable[str] = ("vit", "connector", "llm")) -> float:
    """One optimizer step from a forward pass's {'vit', 'connector', 'llm'} FLOPs (see
    train_step_flops; any model family)."""
    trained = set(trained)
    total, below_trained = 0.0, False
    for part in ("vit", "connector", "llm"):
        if part in trained:
            total += 3.0 * fwd[part]
            below_trained = True
        else:
            total += (2.0 if below_trained else 1.0) * fwd[part]
    return total


def useful_train_step_flops(cfg: MolmoConfig, input_ids: np.ndarray, images: Optional[np.ndarray] = None,
                            trained: Iterable[str] = ("vit", "connector", "llm")) -> float:
    """Model FLOPs of one step counting only real work: each row's non-padding tokens
    (input_ids != -1, so its attention is over that length) and its crops that are not all
    padding (images not all -1). input_ids: int[B, T]; images: float[B, C, P, D] or None.
    What MFU divides (a batch of short examples padded to seq_len scores what it computes usefully)."""
    lengths = np.sum(np.asarray(input_ids) != -1, axis=1)
    if images is None:
        crops = np.zeros_like(lengths)
    else:
        crops = np.sum(~np.all(np.asarray(images) == -1, axis=(2, 3)), axis=1)
    total, memo = 0.0, {}
    for key in zip(lengths.tolist(), crops.tolist()):
        if key not in memo:
            memo[key] = train_step_flops(cfg, 1, key[0], key[1], trained) if key[0] else 0.0
        total += memo[key]
    return total


class MetricsLogger:
    """Writes one console line per `every` steps, TensorBoard scalars and metrics.jsonl (process 0)."""

    def __init__(self, workdir: str, *, total_steps: int, every: int, tensorboard: bool,
                 flops_per_step: float, examples_per_step: int, tokens_per_step: int):
        self.total_steps, self.every = total_steps, max(every, 1)
        self.flops_per_step = flops_per_step
        self.examples_per_step, self.tokens_per_step = examples_per_step, tokens_per_step
        peak = peak_flops(jax.devices()[0].device_kind)
        self.peak_total = peak * jax.device_count() if peak else None
        self.is_main = jax.process_index() == 0
        self.writer = None
        self.jsonl = None
        if self.is_main:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.last_time: Optional[float] = None
        self.step_times: list = []

    def write(self, step: int, device_metrics: Dict, examples: Optional[int] = None,
              flops: Optional[float] = None) -> Dict[str, float]:
        """Fetches the metrics of `step` (blocking until that step finished) and records them.
        examples: how many the step's batch held (default examples_per_step; rows may pack several);
        flops: the step's useful model FLOPs for MFU (useful_train_step_flops; default flops_per_step)."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        if self.last_time is not None:
            dt = now - self.last_time
            self.step_times.append(dt)
            metrics["step_time_s"] = dt
            metrics["examples_per_s"] = (self.examples_per_step if examples is None else examples) / dt
            metrics["tokens_per_s"] = self.tokens_per_step / dt
            if self.peak_total:
                metrics["mfu"] = (self.flops_per_step if flops is None else flops) / dt / self.peak_total
        self.last_time = now
        if self.is_main:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(k.replace(".", "/"), v, step)
            if step % self.every == 0 or step == self.total_steps:
                log.info(self._line(step, metrics))
        return metrics

    def pause(self) -> None:
        """Excludes the time spent outside training steps (checkpoint saves) from the next step."""
        self.last_time = None

    def _line(self, step: int, m: Dict[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}", f"loss {m['loss']:.4f}"]
        parts.append("lr " + " ".join(f"{g}={m[f'lr.{g}']:.2e}" for g in ("vit", "connector", "llm")))
        parts.append("|g| " + " ".join(f"{g}={m[f'grad_norm.{g}']:.3f}" for g in ("vit", "connector", "llm")))
        if "step_time_s" in m:
            parts.append(f"{m['tokens_per_s']:.0f} tok/s {m['examples_per_s']:.2f} ex/s")
            if "mfu" in m:
                parts.append(f"MFU {m['mfu']:.1%}")
            recent = float(np.median(self.step_times[-20:]))
            parts.append(f"ETA {_duration(recent * (self.total_steps - step))}")
        return "  ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _duration(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
