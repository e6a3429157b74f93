"""Test reference: one Molmo2 example as a training row of one fixed shape (no packing, no trees).

A row is one example as `molmo2_processor.process` lays it out (images or one video, then the
prompt), followed by its answer and EOS, padded to a fixed budget so that every batch of a run
has the same shapes (one compile):

  input_ids, target_tokens, position_ids     int32[L]        -1 = padding
  loss_masks                                 float32[L]      -1 = padding (the trainer clamps to 0)
  mm_token_type_ids                          int32[L]        1 = vision token, 0 = text / padding
  pixel_values                               float32[N, P, D] crops or frames; -1 = padding crop
  token_pooling                              int32[M, K]     indices into the row's N*P patches,
                                                             -1 = empty slot / padding token

L = seq_len, N = max_crops (image crops and video frames share the ViT, so one budget holds
either), M = max_pooled_tokens, K = pool_slots (9: the 3x3 window of a video frame; the 2x2
windows of image crops are padded with -1, as the official collator pads token_pooling to the
widest). Targets are aligned (target_tokens[t] = input_ids[t + 1]); the loss falls on the
answer and its EOS. An example over any budget is refused with ExampleTooLong naming it.

The text is the processor's prompt and the answer as they come (no chat template). Training
packs rows with data_pipelines.molmo2_pipeline; with one example per row its rows are these,
less the last input (the EOS, which predicts nothing).
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np

TEXT_KEYS = ("input_ids", "target_tokens", "position_ids", "loss_masks", "mm_token_type_ids")


class ExampleTooLong(ValueError):
    """An example needs more tokens, crops or pooled tokens than the row budget."""


@dataclasses.dataclass(frozen=True)
class RowBudget:
    """The fixed shape of a row (module docstring)."""
    seq_len: int
    max_crops: int
    max_pooled_tokens: int
    pool_slots: int = 9


def _padded(values: np.ndarray, length: int, dtype, fill) -> np.ndarray:
    out = np.full((length, *values.shape[1:]), fill, dtype)
    out[:len(values)] = values
    return out


def training_row(inputs: Dict[str, np.ndarray], answer_ids, eos_id: int, budget: RowBudget,
                 patch_shape: tuple) -> Dict[str, np.ndarray]:
    """One row from processor outputs (`inputs`: input_ids [1, T], mm_token_type_ids [1, T] and
    the image or video arrays) and the answer's token ids; patch_shape: (P, D) of a crop."""
    prompt = np.asarray(inputs["input_ids"][0], np.int64)
    answer = np.concatenate([np.asarray(answer_ids, np.int64), [eos_id]])
    ids = np.concatenate([prompt, answer])
    kind = "video" if "pixel_values_videos" in inputs else "image"
    pixels = inputs.get("pixel_values_videos", inputs.get("pixel_values"))
    pooling = inputs.get("video_token_pooling", inputs.get("image_token_pooling"))
    if pixels is None:
        pixels, pooling = np.zeros((0, *patch_shape), np.float32), np.zeros((0, budget.pool_slots), np.int32)
    problems = []
    if len(ids) > budget.seq_len:
        problems.append(f"{len(ids)} tokens > seq_len {budget.seq_len}")
    if len(pixels) > budget.max_crops:
        problems.append(f"{len(pixels)} {kind} crops/frames > max_crops {budget.max_crops}")
    if len(pooling) > budget.max_pooled_tokens:
        problems.append(f"{len(pooling)} pooled tokens > max_pooled_tokens {budget.max_pooled_tokens}")
    if pooling.shape[1] > budget.pool_slots:
        problems.append(f"pooling windows of {pooling.shape[1]} slots > pool_slots {budget.pool_slots}")
    if tuple(pixels.shape[1:]) != tuple(patch_shape):
        problems.append(f"crops of shape {tuple(pixels.shape[1:])}, the model takes {tuple(patch_shape)}")
    if problems:
        raise ExampleTooLong("example does not fit the row budget: " + "; ".join(problems))
    n = len(ids)
    loss = np.zeros(n, np.float32)
    loss[len(prompt) - 1:n - 1] = 1.0  # targets of positions len(prompt)-1 .. n-2 are the answer + EOS
    slots = np.full((len(pooling), budget.pool_slots), -1, np.int32)
    slots[:, :pooling.shape[1]] = pooling
    mm = np.concatenate([np.asarray(inputs["mm_token_type_ids"][0]), np.zeros(len(answer), np.int64)])
    return {
        "input_ids": _padded(ids, budget.seq_len, np.int32, -1),
        "target_tokens": _padded(np.concatenate([ids[1:], [-1]]), budget.seq_len, np.int32, -1),
        "position_ids": _padded(np.arange(n), budget.seq_len, np.int32, -1),
        "loss_masks": _padded(loss, budget.seq_len, np.float32, -1),
        "mm_token_type_ids": _padded(mm, budget.seq_len, np.int32, 0),
        "pixel_values": _padded(np.asarray(pixels, np.float32), budget.max_crops, np.float32, -1),
        "token_pooling": _padded(slots, budget.max_pooled_tokens, np.int32, -1),
    }
