"""Fixed-shape training examples from tokenized ones: truncation, padding, loss weights.

The per-example preprocessor (`formatting` + `multicrop` + `tokenizer`) turns one image and all
its conversations into one sequence `[BOS][image tokens][conv 1][conv 2]...` with subsegment ids,
position ids and loss masks (spec §4.6). This module makes every example the same shape so that
grain can stack them into batches, exactly as the official collator pads (spec §3.7):

  input_ids, target_tokens, position_ids, subsegment_ids   int32[L]     -1 = padding
  loss_masks                                                float32[L]   -1 = padding
  images                                                    float32[C, P, D]  -1 = padding crop
  image_masks                                               float32[C, P]     -1
  image_input_idx                                           int32[C, T]       -1 (-100 = margin feature)

with L = seq_len and C = 1 + max_crops. Text-only examples get C padding crops, so they share
batches with image examples. As in the official code the loss mask is padded with -1 too, so the
loss must use `max(loss_masks, 0)`.

Truncation rule (the official collator cuts at `seq_len` wherever that falls, even inside the
image, which leaves `image_input_idx` pointing past the sequence): the BOS and the image block
are never cut. An example whose image block leaves no room for a single text token after it is
rejected with `ExampleTooLong` (the pipeline skips and counts it); otherwise the text is cut at
`seq_len`, so trailing conversations or the tail of the last one are dropped.

Loss weights (spec §4.6): `loss_masks` (1 on answer tokens incl. EOS) are multiplied by the
example's `weight` and, with `annotation_weighting="root_subsegments"` (fine-tuning), by
`1/sqrt(n)` where n is the number of conversations packed with the image, counted before
truncation as the official preprocessor does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence

import numpy as np

# Subsegment id of the BOS and the image tokens of a packed example (official constant).
IMAGE_SUBSEGMENT = 10000
ANNOTATION_WEIGHTINGS = (None, "root_subsegments")
TEXT_KEYS = ("input_ids", "target_tokens", "loss_masks", "position_ids", "subsegment_ids")


class ExampleTooLong(ValueError):
    """The BOS + image block does not leave room for any text within seq_len."""


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Shapes of one packed example.

    seq_len: L tokens.                  max_crops: high-res crops; examples hold 1 + max_crops crops.
    crop_patches: P patches per crop.   patch_dim: D values per patch.
    tokens_per_crop: T pooled features per crop (image_input_idx width).
    image_token_ids: ids of <im_start>, <im_end>, <im_patch>, <im_col> (to find the image block).
    annotation_weighting: None or "root_subsegments".
    """
    seq_len: int
    max_crops: int
    crop_patches: int
    patch_dim: int
    tokens_per_crop: int
    image_token_ids: Sequence[int]
    annotation_weighting: Optional[str] = None

    def __post_init__(self):
        if self.annotation_weighting not in ANNOTATION_WEIGHTINGS:
            raise ValueError(f"annotation_weighting must be one of {ANNOTATION_WEIGHTINGS}, "
                             f"got {self.annotation_weighting!r}")
        if self.seq_len < 2 or self.max_crops < 1:
            raise ValueError(f"PackConfig needs seq_len >= 2 and max_crops >= 1, got {self.seq_len}, {self.max_crops}")

    @property
    def num_crops(self) -> int:
        return 1 + self.max_crops


def num_conversations(subsegment_ids: Optional[np.ndarray]) -> int:
    """Conversations packed in one sequence: distinct subsegment ids other than the image's."""
    if subsegment_ids is None:
        return 1
    ids = np.unique(subsegment_ids)
    return max(int(np.sum((ids >= 0) & (ids != IMAGE_SUBSEGMENT))), 1)


def loss_scale(weight: float, n_conversations: int, annotation_weighting: Optional[str]) -> float:
    """Factor applied to the 0/1 loss mask of an example (spec §4.6)."""
    if annotation_weighting == "root_subsegments":
        return float(weight) * math.sqrt(1.0 / n_conversations)
    return float(weight)


def image_block_end(input_ids: np.ndarray, image_token_ids: Sequence[int]) -> int:
    """Index just past the last image token (0 for text-only sequences)."""
    hits = np.flatnonzero(np.isin(input_ids, np.asarray(image_token_ids)))
    return int(hits[-1]) + 1 if hits.size else 0


def _pad(values: np.ndarray, shape, dtype) -> np.ndarray:
    out = np.full(shape, -1, dtype)
    out[tuple(slice(0, n) for n in values.shape)] = values
    return out


def pack_example(tokenized: Dict[str, np.ndarray], cfg: PackConfig, weight: float = 1.0) -> Dict[str, np.ndarray]:
    """One tokenized example -> the fixed shapes of the module docstring.

    Args:
      tokenized: "input_tokens", "target_tokens", "loss_masks", "position_ids" [n] and optionally
        "subsegment_ids" [n], "images" [c, P, D], "image_masks" [c, P], "image_input_idx" [c, T]
        (positions already shifted for the BOS; negative = no feature).
      weight: per-example loss weight.
    Returns the packed dict plus "num_tokens" (int32, tokens before truncation).
    Raises:
      ExampleTooLong: the image block does not fit (see the truncation rule).
      ValueError: inconsistent lengths or more crops than the config allows.
    """
    input_ids = np.asarray(tokenized["input_tokens"], np.int32)
    n = input_ids.shape[0]
    text = {"input_ids": input_ids,
            "target_tokens": np.asarray(tokenized["target_tokens"], np.int32),
            "loss_masks": np.asarray(tokenized["loss_masks"], np.float32),
            "position_ids": np.asarray(tokenized["position_ids"], np.int32)}
    sub = tokenized.get("subsegment_ids")
    # One conversation: a single subsegment makes the attention mask plain causal.
    text["subsegment_ids"] = np.ones(n, np.int32) if sub is None else np.asarray(sub, np.int32)
    for key, value in text.items():
        if value.shape != (n,):
            raise ValueError(f"tokenized example: {key} has shape {value.shape}, input_tokens has ({n},)")

    text["loss_masks"] = text["loss_masks"] * np.float32(
        loss_scale(weight, num_conversations(sub), cfg.annotation_weighting))
    L = cfg.seq_len
    if n > L:
        end = image_block_end(input_ids, cfg.image_token_ids)
        if end >= L:
            raise ExampleTooLong(f"image block of {end} tokens (BOS included) leaves no room for text in "
                                 f"seq_len={L}; lower max_crops or raise seq_len")
    out = {key: _pad(value[:L], (L,), value.dtype) for key, value in text.items()}

    C, P, D, T = cfg.num_crops, cfg.crop_patches, cfg.patch_dim, cfg.tokens_per_crop
    if "images" in tokenized and tokenized["images"] is not None:
        images = np.asarray(tokenized["images"], np.float32)
        if images.shape[0] > C or images.shape[1:] != (P, D):
            raise ValueError(f"tokenized example: images {images.shape} do not fit [{C}, {P}, {D}] "
                             f"(1 + max_crops={cfg.max_crops})")
        out["images"] = _pad(images, (C, P, D), np.float32)
        out["image_masks"] = _pad(np.asarray(tokenized["image_masks"], np.float32), (C, P), np.float32)
        out["image_input_idx"] = _pad(np.asarray(tokenized["image_input_idx"], np.int32), (C, T), np.int32)
    else:
        out["images"] = np.full((C, P, D), -1, np.float32)
        out["image_masks"] = np.full((C, P), -1, np.float32)
        out["image_input_idx"] = np.full((C, T), -1, np.int32)
    out["num_tokens"] = np.int32(n)
    return out


def example_length(example: Dict[str, np.ndarray]) -> int:
    """Tokens a pack_example output holds (its text up to the first padding)."""
    valid = example["input_ids"] != -1
    return int(valid.argmin()) if not valid.all() else int(valid.size)


def pack_row(examples: Sequence[Dict[str, np.ndarray]], cfg: PackConfig, examples_per_row: int) -> Dict[str, np.ndarray]:
    """Several pack_example outputs -> one sequence of cfg.seq_len holding them one after another.

    Example j keeps its own position ids; its subsegment ids are raised by j * IMAGE_SUBSEGMENT
    (image and BOS -> (j + 1) * 10000, conversation k -> j * 10000 + k). Under Molmo's attention
    rule (a token sees earlier tokens whose subsegment id is >= its own) every token then sees
    exactly what it saw alone: its image and its own conversation, nothing of the examples
    before it. Its crops go to crop slots j * (1 + max_crops) ...; image_input_idx is shifted to
    where its text starts. Shapes: text [L]; images [examples_per_row * (1 + max_crops), P, D] etc.

    Also returns "examples" (int32, how many) and "truncated" (int32, how many were cut at seq_len
    by pack_example). Raises ValueError if they do not fit (more examples or tokens than allowed).
    """
    L, C = cfg.seq_len, cfg.num_crops
    lengths = [example_length(e) for e in examples]
    if not 1 <= len(examples) <= examples_per_row or sum(lengths) > L:
        raise ValueError(f"pack_row: {len(examples)} examples of {sum(lengths)} tokens do not fit "
                         f"{examples_per_row} examples of seq_len={L}")
    out = {key: np.full((L,), -1, examples[0][key].dtype) for key in TEXT_KEYS}
    shapes = {key: examples[0][key].shape[1:] for key in ("images", "image_masks", "image_input_idx")}
    out.update({key: np.full((examples_per_row * C, *shape), -1, examples[0][key].dtype)
                for key, shape in shapes.items()})
    start = 0
    for j, (example, n) in enumerate(zip(examples, lengths)):
        for key in TEXT_KEYS:
            out[key][start:start + n] = example[key][:n]
        out["subsegment_ids"][start:start + n] += j * IMAGE_SUBSEGMENT
        crops = slice(j * C, (j + 1) * C)
        out["images"][crops] = example["images"]
        out["image_masks"][crops] = example["image_masks"]
        idx = example["image_input_idx"]
        out["image_input_idx"][crops] = np.where(idx >= 0, idx + start, idx)
        start += n
    out["examples"] = np.int32(len(examples))
    out["truncated"] = np.int32(sum(int(e["num_tokens"]) > L for e in examples))
    return out
