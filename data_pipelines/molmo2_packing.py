"""Molmo2 training sequences: message trees, loss weights, and several examples packed in one row.

Follows allenai/molmo2 (`olmo/preprocessing/text_preprocessor.py`, `olmo/data/dynamic_packer.py`,
`olmo/preprocessing/multimodal_collator.py`, `launch_scripts/sft.py`). Tokens are given as ids:
`prefix` is the BOS and the media tokens of one example (what `molmo2_processor.process` makes
for an empty prompt: the official code puts the media right after the BOS when the messages hold
no image prompt); a conversation is a list of tokenized messages, user and assistant in turn.

One example with n conversations about the same media (a "message tree", official
`tokenize_message_list`) is one sequence

    [BOS][media][conv 0][conv 1]...[conv n-1]      (EOS of each conversation: its last target)

with subsegment ids ATTEND_ALL (10000) on BOS + media and i on conversation i, so under the
rule "a query sees keys whose subsegment id is >= its own" every conversation sees the shared
prefix and nothing of its siblings. Its position ids restart after the prefix for every
conversation, so each one reads as if it were alone.

Packing (official `pack`) joins examples one after another: example j's subsegment ids are raised
by j * EXAMPLE_SUBSEGMENT_INCREMENT (a single conversation gets j * 100000 throughout), its pooling
indices by the patches of the examples before it, its position ids are kept. The model then lets
image / frame tokens see each other both ways only within one example (example id = subsegment //
100000). Fixed shapes, padded with -1 as the collator pads (`MMCollator`, pad="to_max"):

  input_ids, target_tokens, position_ids, subsegment_ids, mm_token_type_ids   int32[L]
  loss_masks                                                                  float32[L]
  pixel_values                                                                float32[N, P, D]
  token_pooling                                                               int32[M, K]

(L = seq_len, N = max_crops crops / frames of all examples, M = max_pooled_tokens, K = pool width:
4 for images, 9 for video; narrower rows are padded with -1 as `pack` does.) Which examples share
a row is `DynamicPacker`'s choice (official `DynamicSolver`: a 2D knapsack over a buffer, tokens
and crops as the two budgets).

Loss weights (official `MessageWeight`): per conversation, `root_length` multiplies its 0/1 loss
mask by 2 / sqrt(its loss tokens), `weight` by a constant, and `root_subsegments` divides every
conversation of a tree by sqrt(n conversations kept). Molmo2's SFT uses
`loss_token_weighting="root_subsegments_root_tokens"`, overridden per dataset: pointing, counting
and tracking sets weight 0.2, video captions 0.1, both without the root terms. The trainer's loss
(molmo_jax/train/loss.py) then divides by the global sum of these weights, as the official
`batch_divisor="global_batch"`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence

import numpy as np

from data_pipelines.mixtures import MIXTURES, MOLMO2_TRACKING, MOLMO2_VIDEO_POINTING
from data_pipelines.packing import IMAGE_SUBSEGMENT as ATTEND_ALL_SUBSEGMENT_ID

# Subsegment stride between packed examples (dynamic_packer.EXAMPLE_SUBSEGMENT_INCREMENT).
EXAMPLE_SUBSEGMENT_INCREMENT = 100000
TEXT_KEYS = ("input_ids", "target_tokens", "loss_masks", "position_ids", "subsegment_ids")
# Where a processor example keeps its crops / frames and their pooling indices.
MEDIA_KEYS = (("pixel_values", "image_token_pooling"), ("pixel_values_videos", "video_token_pooling"))


@dataclasses.dataclass(frozen=True)
class MessageWeight:
    """How a conversation's loss tokens are weighted (official `MessageWeight`); None = inherit."""
    weight: Optional[float] = None
    root_subsegments: Optional[bool] = None
    root_length: Optional[bool] = None

    def with_overrides(self, other: Optional["MessageWeight"]) -> "MessageWeight":
        """Fields of `other` that are set replace these (official `with_overrides`)."""
        if other is None:
            return self
        return MessageWeight(*(getattr(self, f.name) if getattr(other, f.name) is None else getattr(other, f.name)
                               for f in dataclasses.fields(self)))


# TextPreprocessorConfig.build_text_preprocessor: loss_token_weighting -> default MessageWeight.
LOSS_TOKEN_WEIGHTINGS = {
    None: MessageWeight(),
    "root_subsegments": MessageWeight(root_subsegments=True),
    "root_subsegments_root_tokens": MessageWeight(root_subsegments=True, root_length=True),
}
SFT_LOSS_TOKEN_WEIGHTING = "root_subsegments_root_tokens"  # launch_scripts/sft.py
POINT_WEIGHT = MessageWeight(weight=0.2, root_subsegments=False, root_length=False)
CAPTION_WEIGHT = MessageWeight(weight=0.1, root_subsegments=False, root_length=False)
# sft.py "molmo2" mixture: every tracking, video pointing and image pointing set gets point_weight,
# the video captions (vixmo3_top_level_captions_min_3, here molmo2_cap) cap_weight.
_IMAGE_POINTING = next(g.datasets for g in MIXTURES["molmo2"] if "cosyn_point" in g.datasets)
DATASET_MESSAGE_WEIGHTS: Dict[str, MessageWeight] = {
    **{d: POINT_WEIGHT for _, names, _ in MOLMO2_TRACKING for d in names},
    **{d: POINT_WEIGHT for d, _ in MOLMO2_VIDEO_POINTING},
    **{d: POINT_WEIGHT for d in _IMAGE_POINTING},
    "molmo2_cap": CAPTION_WEIGHT,
}


def message_weight(dataset: str, loss_token_weighting: Optional[str] = SFT_LOSS_TOKEN_WEIGHTING) -> MessageWeight:
    """The weight of a conversation of `dataset`: the run's default with the dataset's overrides."""
    if loss_token_weighting not in LOSS_TOKEN_WEIGHTINGS:
        raise ValueError(f"loss_token_weighting must be one of {list(LOSS_TOKEN_WEIGHTINGS)}, "
                         f"got {loss_token_weighting!r}")
    return LOSS_TOKEN_WEIGHTINGS[loss_token_weighting].with_overrides(DATASET_MESSAGE_WEIGHTS.get(dataset))


def conversation_tokens(messages: Sequence[Sequence[int]], eos: int, weight: MessageWeight,
                        add_last_eos: bool, last_message_loss_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> (ids int64[n], loss float32[n]), official `tokenize_message` without BOS.

    Assistant messages (odd index) get an EOS (the last one only with add_last_eos) and a loss
    (with last_message_loss_only, only the last message, if it is the assistant's); root_length
    scales the loss by 2 / sqrt(its loss tokens), weight by the constant."""
    ids, loss = [], []
    for k, message in enumerate(messages):
        message = [int(t) for t in message]
        is_model = k % 2 == 1
        if is_model and (add_last_eos or k != len(messages) - 1):
            message.append(eos)
        ids += message
        loss += [float(is_model and (not last_message_loss_only or k == len(messages) - 1))] * len(message)
    ids, loss = np.asarray(ids, np.int64), np.asarray(loss, np.float32)
    if weight.root_length and loss.sum() > 0:
        loss *= 2 / np.sqrt(loss.sum())
    if weight.weight is not None:
        loss *= weight.weight
    return ids, loss


def subsegment_positions(subsegments: np.ndarray) -> np.ndarray:
    """0, 1, ... within each subsegment id (official `build_subsegment_pos_ids`). int[n] -> int32[n]."""
    positions = np.zeros(subsegments.shape, np.int32)
    for sub in np.unique(subsegments):
        at = subsegments == sub
        positions[at] = np.arange(at.sum(), dtype=np.int32)
    return positions


def build_example(prefix: Sequence[int], conversations: Sequence[Sequence[Sequence[int]]], *, eos: int,
                  weight: MessageWeight = MessageWeight(), max_sequence_length: Optional[int] = None,
                  max_text_tokens: Optional[int] = None, last_message_loss_only: bool = False) -> Dict[str, np.ndarray]:
    """One training example (official `tokenize_and_interleave`, media right after the BOS).

    prefix: BOS + media token ids; conversations: one or more, each [user, assistant, ...] ids.
    Returns input_ids, target_tokens, position_ids int32[n], loss_masks float32[n] (already shifted:
    target i is the token after input i) and, for two or more conversations, subsegment_ids
    int32[n]. Position ids run 0.. over the prefix and restart after it for every conversation
    (text-only trees restart at 0, as the official code does). With max_sequence_length,
    conversations after the first whose first loss token would fall past it are dropped (official
    `tokenize_message_list`), and they do not count for root_subsegments. With max_text_tokens
    (official default None), the conversations after the one whose text (the BOS and the
    conversations so far, media not counted) reaches it are dropped the same way; a single
    conversation is never cut (the official rule applies to trees only). last_message_loss_only
    (official default False): see conversation_tokens. Raises ValueError for an empty prefix or
    conversation list, or a conversation without an answer.
    """
    prefix = np.asarray(prefix, np.int64)
    if prefix.size == 0 or not len(conversations):
        raise ValueError(f"build_example needs a prefix (BOS + media) and a conversation, got "
                         f"{prefix.size} prefix tokens and {len(conversations)} conversations")
    short = [k for k, conversation in enumerate(conversations) if len(conversation) < 2]
    if short:
        raise ValueError(f"conversations {short} have no answer (each is [user, assistant, ...])")
    n_pre = prefix.size
    if len(conversations) == 1:
        ids, loss = conversation_tokens(conversations[0], eos, weight, True, last_message_loss_only)
        tokens = np.concatenate([prefix, ids])
        loss = np.concatenate([np.zeros(n_pre, np.float32), loss])
        positions = np.arange(tokens.size, dtype=np.int32)
        return _shifted(tokens, loss, positions)

    parts, losses = [], []
    for k, conversation in enumerate(conversations):
        ids, loss = conversation_tokens(conversation, eos, weight, False, last_message_loss_only)
        if max_sequence_length and k and n_pre + sum(p.size for p in parts) + int(np.argmax(loss != 0)) >= max_sequence_length:
            break  # this conversation would get no loss tokens anyway
        parts.append(ids)
        losses.append(loss)
        if max_text_tokens and 1 + sum(p.size for p in parts) >= max_text_tokens:
            break
    if weight.root_subsegments:
        losses = [loss / math.sqrt(len(parts)) for loss in losses]
    after = np.concatenate([np.full(p.size, k, np.int32) for k, p in enumerate(parts)] + [[len(parts) - 1]])
    tokens = np.concatenate([prefix, *parts, [eos]])
    loss = np.concatenate([np.zeros(n_pre, np.float32), *losses, [0.0]]).astype(np.float32)
    subsegments = np.concatenate([np.full(n_pre, ATTEND_ALL_SUBSEGMENT_ID, np.int32), after])
    if n_pre > 1:
        positions = np.concatenate([np.arange(n_pre, dtype=np.int32), n_pre + subsegment_positions(after)])
    else:  # text only: the official code counts every subsegment, the BOS's too, from 0
        positions = subsegment_positions(subsegments)
    out = _shifted(tokens, loss, positions)
    out["subsegment_ids"] = subsegments[:-1]
    # Every conversation but the last ends on the first token of the next: its target is an EOS
    # instead, weighted as the conversation's last answer token.
    for k in range(len(parts)):
        end = int(np.flatnonzero(out["subsegment_ids"] == k)[-1])
        out["target_tokens"][end] = eos
        out["loss_masks"][end] = out["loss_masks"][end - 1]
    return out


def _shifted(tokens: np.ndarray, loss: np.ndarray, positions: np.ndarray) -> Dict[str, np.ndarray]:
    return {"input_ids": tokens[:-1].astype(np.int32), "target_tokens": tokens[1:].astype(np.int32),
            "loss_masks": loss[1:].astype(np.float32), "position_ids": positions[:-1].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class Molmo2PackConfig:
    """Shapes of one packed row: seq_len L tokens; max_crops N crops / frames of P patches of D
    values; max_pooled_tokens M pooling rows of pool_width K slots; vision_token_ids: the ids
    `mm_token_type_ids` marks (molmo2_images.Molmo2TokenIds.all())."""
    seq_len: int
    max_crops: int
    crop_patches: int
    patch_dim: int
    max_pooled_tokens: int
    pool_width: int
    vision_token_ids: Sequence[int]


def example_media(example: Dict[str, np.ndarray]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(crops or frames [c, P, D], pooling [m, k]) of an example, or (None, None) for text only."""
    found = [(example[p], example[t]) for p, t in MEDIA_KEYS if example.get(p) is not None]
    if len(found) > 1:
        raise ValueError("an example has images or one video, not both")
    return found[0] if found else (None, None)


def pack_examples(examples: Sequence[Dict[str, np.ndarray]], cfg: Molmo2PackConfig) -> Dict[str, np.ndarray]:
    """build_example outputs (plus their processor media arrays) -> one row of the module's shapes.

    Each example holds the keys of build_example and optionally pixel_values + image_token_pooling
    or pixel_values_videos + video_token_pooling. Text past seq_len is cut, as the official
    collator cuts it, unless that cuts a vision token or every loss token (its two errors). Also
    returns "examples" (int32, how many) and "truncated" (int32, tokens cut).
    Raises ValueError, naming the budget, when crops or pooled tokens do not fit or a cut is refused.
    """
    L, N, M, K = cfg.seq_len, cfg.max_crops, cfg.max_pooled_tokens, cfg.pool_width
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    media = [example_media(e) for e in examples]
    crops = [0 if px is None else px.shape[0] for px, _ in media]
    pooled = [0 if tp is None else tp.shape[0] for _, tp in media]
    for name, used, budget in (("crops/frames", sum(crops), N), ("pooled tokens", sum(pooled), M)):
        if used > budget:
            raise ValueError(f"pack_examples: {len(examples)} examples need {used} {name}, the row holds {budget}")
    text = {key: np.concatenate([e[key] for e in examples]) for key in TEXT_KEYS[:-1]}
    text["subsegment_ids"] = np.concatenate([
        j * EXAMPLE_SUBSEGMENT_INCREMENT + e.get("subsegment_ids", np.zeros(e["input_ids"].shape, np.int32))
        for j, e in enumerate(examples)])
    n = text["input_ids"].size
    if n > L and np.isin(text["input_ids"][L:], np.asarray(cfg.vision_token_ids)).any():
        raise ValueError(f"pack_examples: {n} tokens do not fit seq_len={L} and the cut would fall in an image")
    if n > L and np.any(text["loss_masks"] != 0) and np.all(text["loss_masks"][:L] == 0):
        raise ValueError(f"pack_examples: {n} tokens do not fit seq_len={L} and the cut would drop every loss token")
    out = {key: np.full((L,), -1, np.float32 if key == "loss_masks" else np.int32) for key in TEXT_KEYS}
    for key in TEXT_KEYS:
        out[key][:min(n, L)] = text[key][:L]
    out["pixel_values"] = np.full((N, cfg.crop_patches, cfg.patch_dim), -1, np.float32)
    out["token_pooling"] = np.full((M, K), -1, np.int32)
    crop = row = 0
    for j, (pixels, pooling) in enumerate(media):
        if pixels is not None:
            c, m = pixels.shape[0], pooling.shape[0]
            if pixels.shape[1:] != out["pixel_values"].shape[1:] or pooling.shape[1] > K:
                raise ValueError(f"example {j}: crops {pixels.shape} / pooling {pooling.shape} do not fit "
                                 f"[{cfg.crop_patches}, {cfg.patch_dim}] / width {K}")
            out["pixel_values"][crop:crop + c] = pixels
            # Pooling indices point into the flat patches of all crops of the row.
            offset = crop * cfg.crop_patches
            out["token_pooling"][row:row + m, :pooling.shape[1]] = np.where(pooling >= 0, pooling + offset, -1)
            crop, row = crop + c, row + m
    out["mm_token_type_ids"] = np.isin(out["input_ids"], np.asarray(cfg.vision_token_ids)).astype(np.int32)
    out["examples"] = np.int32(len(examples))
    out["truncated"] = np.int32(max(n - L, 0))
    return out


def select_subset_2d_knapsack(t_values: Sequence[int], i_values: Sequence[int], max_t: int, max_i: int,
                              obj_vals: Sequence[float]) -> list[int]:
    """Indices (last first) of the subset of items with the largest total value whose (quantized)
    token and crop counts fit max_t and max_i; the official dynamic program, verbatim."""
    dp = np.zeros((len(t_values) + 1, max_t + 1, max_i + 1), dtype=np.float32)
    for item in range(1, len(t_values) + 1):
        t, i, value = t_values[item - 1], i_values[item - 1], obj_vals[item - 1]
        dp[item] = dp[item - 1]
        if t <= max_t and i <= max_i:
            dp[item, t:, i:] = np.maximum(dp[item, t:, i:], dp[item - 1, :max_t + 1 - t, :max_i + 1 - i] + value)
    selected, t_rem, i_rem = [], max_t, max_i
    for item in range(len(t_values), 0, -1):
        t, i = t_values[item - 1], i_values[item - 1]
        if t <= t_rem and i <= i_rem and dp[item, t_rem, i_rem] != dp[item - 1, t_rem, i_rem]:
            selected.append(item - 1)
            t_rem, i_rem = t_rem - t, i_rem - i
    return selected


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A budget of the packer (official `Constraint`): the row holds at most max_len of `key`
    (tokens, crops / frames), counted in units of `granularity`; allow_shortcut sends an example
    that fills it alone straight out; weight: its value per unit in the solver."""
    max_len: int
    allow_shortcut: bool
    weight: float
    granularity: int

    def quantized(self, value: int) -> int:
        return (value + self.granularity - 1) // self.granularity


def _counts(example: Dict[str, np.ndarray]) -> tuple[int, int]:
    """(tokens, crops / frames) of an example."""
    pixels, _ = example_media(example)
    return int(example["input_ids"].shape[0]), 0 if pixels is None else int(pixels.shape[0])


class DynamicPacker:
    """Chooses which examples share a row (official `DynamicSolver`, `PackingConfig.bulid`).

    Keeps a buffer of `buffer_size` examples; once it is full, every new example makes it pick the
    subset of the buffer with the most tokens + crops (text_weight, image_weight per unit) that
    fits seq_len tokens (granularity max(1, seq_len // 512)) and max_crops crops / frames,
    returns it and puts the new example in the buffer. An example that fills the tokens (or, with
    shortcut_max_crops, the crops) alone is returned at once. Call: example -> list of examples
    for one row, or None while the buffer fills; `buffered()` gives what is left at the end.
    """

    def __init__(self, cfg: Molmo2PackConfig, buffer_size: int = 32, text_weight: float = 1.0,
                 image_weight: float = 1.0, shortcut_max_crops: bool = False):
        if buffer_size < 1:
            raise ValueError(f"DynamicPacker needs buffer_size >= 1, got {buffer_size}")
        self.buffer_size = buffer_size
        self.constraints = (Constraint(cfg.seq_len, True, text_weight, max(1, cfg.seq_len // 512)),
                            Constraint(cfg.max_crops, shortcut_max_crops, image_weight, 1))
        self._buffer: list[tuple[tuple[int, int], float, Dict[str, np.ndarray]]] = []

    def __call__(self, example: Dict[str, np.ndarray]) -> Optional[list[Dict[str, np.ndarray]]]:
        counts = _counts(example)
        for c, n in zip(self.constraints, counts):
            if c.allow_shortcut and c.quantized(n) >= c.quantized(c.max_len):
                return [example]
        entry = (tuple(c.quantized(n) for c, n in zip(self.constraints, counts)),
                 sum(n * c.weight for c, n in zip(self.constraints, counts)), example)
        if len(self._buffer) < self.buffer_size:
            self._buffer.append(entry)
            return None
        (ct, ci) = self.constraints
        indices = select_subset_2d_knapsack([e[0][0] for e in self._buffer], [e[0][1] for e in self._buffer],
                                            ct.quantized(ct.max_len), ci.quantized(ci.max_len),
                                            [e[1] for e in self._buffer])
        if not indices:
            raise ValueError(f"DynamicPacker: no buffered example fits seq_len={ct.max_len} tokens and "
                             f"{ci.max_len} crops/frames")
        out = [self._buffer[i][2] for i in indices]
        for i in sorted(indices, reverse=True):
            self._buffer.pop(i)
        self._buffer.append(entry)
        return out

    def buffered(self) -> list[Dict[str, np.ndarray]]:
        return [e[2] for e in self._buffer]
