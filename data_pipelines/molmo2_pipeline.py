"""The Molmo2 training input pipeline: mixture -> example -> processor -> message tree -> packed rows -> batches.

Per JAX process (host), on grain's dataset API:

  MapDataset.range(num_examples)             global example indices (the stream every host shares)
    .slice(process_index::process_count)     this host's shard
    .map(Molmo2ExampleTransform)             mixture pick, load, format (formatting.format_example),
                                             processor (molmo2_processor: BOS + media), message tree
                                             (molmo2_packing.build_example with the dataset's
                                             MessageWeight); a bad example becomes a skip record
  PackedRows                                 molmo2_packing.DynamicPacker (the official 2D knapsack
                                             over a buffer of examples) -> pack_examples rows of the
                                             trainer's budget; buffer_size 0: one example per row
    .batch(batch_per_host)
  pipeline.PipelineIterator                  skip counts by cause, max_skip_rate, get_state / set_state

Exact resume: an example is a function of (seed, global index) only, so the packer's state is
the position of the next example to read plus the positions of the examples it buffers (and of
rows chosen but not yet emitted), as the official `WorkerState` (on_example, buffered ids); a
restored iterator recomputes those examples and continues exactly as the saved one would have.
The examples still buffered when a finite stream ends are not emitted (official `packed_iterator`).

Fixed shapes: the packer's budgets are seq_len tokens and max_crops crops / frames (the official
two); the pooled-token budget of a row is a third the official code does not have (it pads to
the batch's widest), so a chosen group whose pooled tokens do not fit is split, in order, into
several rows. An example that fits no row alone (more crops / frames or pooled tokens than a row
holds, or text past seq_len whose cut would fall in the media or drop every loss token) is
skipped as too_long; a dead file as missing_file, a corrupt image as corrupt_image, a video that
does not decode (video.VideoDecodeError) or a malformed row as malformed (pipeline.skip_cause).

Text: each conversation of an example is formatted by `formatting.format_example` with the
dataset's FormatConfig (`MOLMO2_SFT_FORMAT`: the official "qwen3" chat turns and the
"demo_or_style_v2" prefix; `PLAIN_FORMAT`: the synthetic video tasks, prompt and answer as they
come, which gives the one-example rows of the tests' reference, tests/molmo2_rows.py). Conversations of a tree are shuffled,
as the official MultimodalPreprocessor does. Pointing and counting messages (PixMo-Points,
PixMo-Count, Molmo2-VideoPoint) get the official SFT prompt templates and html-v2 answers
(FormatConfig point_format "html-v2": formatting -> molmo2_points.image_point_text /
video_point_text). A video point example's clip is the whole video for videos of at most 63 s
(clip start 0, end >= the video's duration): it is decoded as the whole video.

Not here yet: the official prompt templates (`uber_model_v2`) of the other styles, the style
renames of the official get_system_prompt, tracking answers (their frames are filtered to the
sampled frames' times, sampled at the row's fps: official sampler_overrides), clips inside a
video and subtitles; mixtures with those sets are refused (`NOT_SUPPORTED`), clips of long
videos are skipped (malformed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import grain
import numpy as np

from data_pipelines import formatting, molmo2_packing, molmo2_processor, packing, pipeline
from data_pipelines.images import load_image
from data_pipelines.mixtures import MixtureIndex
from data_pipelines.sources import molmo2 as molmo2_sources

# Styles the official "demo_or_style_v2" system prompt leaves without a prefix (data_formatter.py
# DEMO_STYLES + VIDEO_MC_STYLES + IMAGE_MC_STYLES).
PLAIN_STYLES = (
    "point_count", "pointing", "cosyn_point", "user_qa", "long_caption", "short_caption", "video_long_caption",
    "video_short_caption", "video_point_track_per_frame", "video_point_track_start_end",
    "video_single_point_track_start_end", "video_transcript", "video_clip_caption_start_end",
    "video_clip_caption_start_end_in_seconds", "video_clip_transcript_start_end",
    "video_clip_transcript_start_end_in_seconds", "video_frame_caption_timestamp",
    "video_frame_caption_timestamp_in_seconds", "correction_qa", "text_sft", "video_point", "video_point_count",
    "video_count", "video_count_point", "multi_image_pointing", "multi_image_counting", "multi_image_point_then_count",
    "multi_image_count_then_point",
    "video_multiple_choice", "video_multiple_choice_count_without_pointing", "video_multiple_choice_multiple_correct",
    "video_multiple_choice_w_subtitle",
    "a_okvqa_mc", "ai2_diagram_no_letter", "ai2_diagram", "science_qa", "eval_multiple_choice", "multi_image_mc",
    "multi_image_mc_exp", "mantis_instruct_mc", "eval_multi_image_mc")
# The official SFT text (launch_scripts/sft.py: message_format "qwen3", system_prompt
# "demo_or_style_v2", pointing_format "html-v2"). Prompt templates are applied to the point styles
# only (see the module docstring).
MOLMO2_SFT_FORMAT = formatting.FormatConfig(prompt_templates="none", message_format="qwen3",
                                            system_prompt="demo_or_style_v2", always_start_with_space=False,
                                            plain_styles=PLAIN_STYLES, point_format="html-v2")
# Prompt and answer as the example has them, one space before the answer (the one-example rows).
PLAIN_FORMAT = formatting.FormatConfig(prompt_templates="none", message_format="none", system_prompt=None,
                                       always_start_with_space=False)
# Molmo2 sets this pipeline cannot train on yet, and why: tracks (frame-sampling overrides and
# answers over the sampled frames), eval-only examples, subtitles in the video text.
NOT_SUPPORTED = {
    **{name: ("its track answers are not formatted yet (official: frames sampled at the row's fps, "
              "sampler_overrides, and the tracks kept at the sampled frames' times)")
       for name, spec in molmo2_sources.SOURCES.items() if spec.example is molmo2_sources.track_example},
    **{name: "an eval set: its examples carry no answer (the points are metadata for the metric)"
       for name, spec in molmo2_sources.SOURCES.items() if spec.example is molmo2_sources.video_point_eval_example},
    "molmo2_syn_captions_subtitle_qa": "its subtitles are not put in the video text yet",
}


def whole_video_clip(metadata: Mapping[str, Any]) -> bool:
    """A clip from 0 to at least the video's duration (Molmo2-VideoPoint's videos of at most 63 s):
    the official decodes clip (0, min(end, duration)), the whole video."""
    start, end, duration = (metadata.get(k) for k in ("clip_start_time", "clip_end_time", "video_duration"))
    return start == 0 and end is not None and duration is not None and end >= duration


def pack_config(tokenizer, processor: molmo2_processor.Molmo2ProcessorConfig, budget: Mapping[str, int]
                ) -> molmo2_packing.Molmo2PackConfig:
    """The row shapes of a trainer budget ({seq_len, crops, pooled_tokens, slots}); image crops and
    video frames share the ViT, so both have the crop shape of the image processor."""
    crop = processor.image
    return molmo2_packing.Molmo2PackConfig(
        seq_len=int(budget["seq_len"]), max_crops=int(budget["crops"]), crop_patches=crop.crop_patches ** 2,
        patch_dim=crop.patch_dim, max_pooled_tokens=int(budget["pooled_tokens"]), pool_width=int(budget["slots"]),
        vision_token_ids=tuple(molmo2_processor.token_ids(tokenizer).all()))


def media_counts(example: Dict[str, np.ndarray]) -> tuple[int, int]:
    """(crops / frames, pooled tokens) of a built example."""
    pixels, pooling = molmo2_packing.example_media(example)
    return (0, 0) if pixels is None else (int(pixels.shape[0]), int(pooling.shape[0]))


def check_fits_alone(example: Dict[str, np.ndarray], cfg: molmo2_packing.Molmo2PackConfig) -> None:
    """Raises packing.ExampleTooLong naming every budget a built example breaks on its own."""
    crops, pooled = media_counts(example)
    pixels, pooling = molmo2_packing.example_media(example)
    problems = []
    if crops > cfg.max_crops:
        problems.append(f"{crops} crops/frames > max_crops {cfg.max_crops}")
    if pooled > cfg.max_pooled_tokens:
        problems.append(f"{pooled} pooled tokens > max_pooled_tokens {cfg.max_pooled_tokens}")
    if pooling is not None and pooling.shape[1] > cfg.pool_width:
        problems.append(f"pooling windows of {pooling.shape[1]} slots > pool slots {cfg.pool_width}")
    if pixels is not None and tuple(pixels.shape[1:]) != (cfg.crop_patches, cfg.patch_dim):
        problems.append(f"crops of shape {tuple(pixels.shape[1:])}, the row takes {(cfg.crop_patches, cfg.patch_dim)}")
    ids, loss, L = example["input_ids"], example["loss_masks"], cfg.seq_len
    if ids.size > L and np.isin(ids[L:], np.asarray(cfg.vision_token_ids)).any():
        problems.append(f"{ids.size} tokens > seq_len {L} and the cut falls in the media")
    elif ids.size > L and np.all(loss[:L] == 0):
        problems.append(f"{ids.size} tokens > seq_len {L} and the cut drops every loss token")
    if problems:
        raise packing.ExampleTooLong("example does not fit a row: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class Molmo2Preprocess:
    """Picklable: (example dict, rng, dataset name) -> built example (molmo2_packing.build_example
    keys plus the processor's media arrays). formats: dataset -> FormatConfig (default
    MOLMO2_SFT_FORMAT); loss_token_weighting: the run's default MessageWeight
    (molmo2_packing.LOSS_TOKEN_WEIGHTINGS), overridden per dataset (message_weight);
    max_text_tokens, last_message_loss_only: build_example's (official defaults None, False)."""
    tokenizer: Any
    processor: molmo2_processor.Molmo2ProcessorConfig
    pack: molmo2_packing.Molmo2PackConfig
    formats: Mapping[str, formatting.FormatConfig] = dataclasses.field(default_factory=dict)
    loss_token_weighting: Optional[str] = molmo2_packing.SFT_LOSS_TOKEN_WEIGHTING
    max_text_tokens: Optional[int] = None
    last_message_loss_only: bool = False

    def __call__(self, example: Dict[str, Any], rng: np.random.RandomState, dataset: str) -> Dict[str, np.ndarray]:
        metadata = example.get("metadata") or {}
        if metadata.get("clip_start_time") is not None and not whole_video_clip(metadata):
            raise ValueError("a video clip (metadata clip_start_time): clips are not decoded yet")
        images = example.get("images", example.get("image"))
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = [image if isinstance(image, np.ndarray) else load_image(image) for image in images or ()]
        fmt = self.formats.get(dataset, MOLMO2_SFT_FORMAT)
        conversations, _ = formatting.format_example(example, fmt, rng=rng,
                                                     image_hw=images[0].shape[:2] if images else None)
        if len(conversations) > 1:  # official MultimodalPreprocessor: matters when the tree is cut
            rng.shuffle(conversations)
        media = molmo2_processor.process("", self.tokenizer, self.processor, images=images, video=example.get("video"))
        tree = [[self.tokenizer.encode(message) for message in conversation] for conversation in conversations]
        built = molmo2_packing.build_example(
            media["input_ids"][0], tree, eos=self.tokenizer.eos_id,
            weight=molmo2_packing.message_weight(dataset, self.loss_token_weighting),
            max_sequence_length=self.pack.seq_len, max_text_tokens=self.max_text_tokens,
            last_message_loss_only=self.last_message_loss_only)
        for pixels_key, pooling_key in molmo2_packing.MEDIA_KEYS:
            if pixels_key in media:
                built[pixels_key], built[pooling_key] = media[pixels_key], media[pooling_key]
        check_fits_alone(built, self.pack)
        return built


@dataclasses.dataclass
class Molmo2ExampleTransform(pipeline.ExampleTransform):
    """Global index -> built example, or {"skip": cause index} (pipeline.ExampleTransform's
    skip classification and logging); `preprocess` is a Molmo2Preprocess."""

    def __call__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        d, element = self.mixture[index]
        rng = pipeline.example_rng(self.seed, index)
        try:
            source = self.sources[d]
            example = source.get(element, rng) if hasattr(source, "get") else source[element]
            n_points = pipeline._count_points(example)
            if n_points > self.max_points:
                raise pipeline.TooManyPoints(f"{n_points} points > max_points={self.max_points}")
            return self.preprocess(example, rng, self.names[d])
        except Exception as error:  # noqa: BLE001 -- classified in _skip, bugs are re-raised
            return self._skip(error, d, element, index)


def split_by_pooled_tokens(group: Sequence[Dict[str, np.ndarray]], max_pooled_tokens: int) -> List[list]:
    """A packer's group -> rows, in order, each within the pooled-token budget (each example fits
    alone: check_fits_alone)."""
    rows, pooled = [[]], 0
    for example in group:
        n = media_counts(example)[1]
        if rows[-1] and pooled + n > max_pooled_tokens:
            rows.append([])
            pooled = 0
        rows[-1].append(example)
        pooled += n
    return rows


class _PackedRowsIterator(grain.DatasetIterator):
    """Rows of the examples of a MapDataset (module docstring); state: next position, buffered
    positions, positions of the rows chosen but not emitted, skips not yet reported."""

    def __init__(self, examples: grain.MapDataset, cfg: molmo2_packing.Molmo2PackConfig, buffer_size: int,
                 image_weight: float):
        super().__init__()
        self._examples, self._cfg = examples, cfg
        self._buffer_size, self._image_weight = buffer_size, image_weight
        self._reset(0)

    def _reset(self, position: int) -> None:
        self._next = position
        self._packer = (molmo2_packing.DynamicPacker(self._cfg, self._buffer_size, image_weight=self._image_weight)
                        if self._buffer_size else None)
        self._pending: List[list] = []
        self._skipped = np.zeros(len(pipeline.SKIP_CAUSES), np.int32)

    def _read(self) -> Optional[Dict[str, Any]]:
        """The next kept example (with its "position"), counting skips; StopIteration at the end."""
        while True:
            if self._next >= len(self._examples):
                raise StopIteration
            position, self._next = self._next, self._next + 1
            record = self._examples[position]
            if "skip" in record:
                self._skipped[int(record["skip"])] += 1
                continue
            return {**record, "position": position}

    def __next__(self) -> Dict[str, np.ndarray]:
        while not self._pending:
            example = self._read()
            group = [example] if self._packer is None else self._packer(example)
            if group is not None:
                self._pending = split_by_pooled_tokens(group, self._cfg.max_pooled_tokens)
        row = molmo2_packing.pack_examples(self._pending.pop(0), self._cfg)
        row["skipped"], self._skipped = self._skipped, np.zeros(len(pipeline.SKIP_CAUSES), np.int32)
        return row

    def get_state(self) -> Dict[str, Any]:
        buffered = [] if self._packer is None else self._packer.buffered()
        return {"next": self._next, "buffered": [int(e["position"]) for e in buffered],
                "pending": [[int(e["position"]) for e in row] for row in self._pending],
                "skipped": self._skipped.tolist()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._reset(int(state["next"]))
        for position in state["buffered"]:  # the buffer is not full, so each call only appends
            self._packer({**self._examples[position], "position": position})
        self._pending = [[{**self._examples[p], "position": p} for p in row] for row in state["pending"]]
        self._skipped = np.asarray(state["skipped"], np.int32)


class PackedRows(grain.IterDataset):
    """Packed rows of a MapDataset of built examples (or skip records); buffer_size 0: one per row."""

    def __init__(self, examples: grain.MapDataset, cfg: molmo2_packing.Molmo2PackConfig, buffer_size: int,
                 image_weight: float = 1.0):
        super().__init__()
        if buffer_size < 0:
            raise ValueError(f"the packing buffer holds >= 0 examples, got {buffer_size}")
        self._examples, self._cfg = examples, cfg
        self._buffer_size, self._image_weight = int(buffer_size), float(image_weight)

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(self._examples, self._cfg, self._buffer_size, self._image_weight)


def example_dataset(sources: Mapping[str, Any], rates: Mapping[str, float], preprocess: Molmo2Preprocess, *,
                    seed: int, num_examples: int = 2 ** 40, process_index: int = 0, process_count: int = 1,
                    shuffle: bool = True, max_points: int = 40) -> grain.MapDataset:
    """This host's built examples (or skip records), by position: the stream PackedRows packs.

    sources: dataset name -> random-access source (`len`, `[i]` or `get(i, rng)`); rates: dataset
    name -> sampling rate (any positive scale); num_examples: the global stream (all hosts)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    names = list(rates)
    missing = [n for n in names if n not in sources]
    if missing:
        raise KeyError(f"no source built for datasets {missing}")
    mixture = MixtureIndex([rates[n] for n in names], [len(sources[n]) for n in names], seed, shuffle=shuffle)
    transform = Molmo2ExampleTransform([sources[n] for n in names], names, mixture, preprocess, None, seed, max_points)
    return grain.MapDataset.range(num_examples).slice(slice(process_index, None, process_count)).map(transform)


def make_pipeline_from_parts(sources: Mapping[str, Any], rates: Mapping[str, float], preprocess: Molmo2Preprocess, *,
                             seed: int, batch_size: int, num_examples: int = 2 ** 40, process_index: int = 0,
                             process_count: int = 1, buffer_size: int = 48, image_weight: float = 30.0,
                             prefetch: int = 2, shuffle: bool = True, max_points: int = 40,
                             max_skip_rate: float = 0.05, skip_check_after: int = 256) -> pipeline.Pipeline:
    """A pipeline.Pipeline of packed Molmo2 rows (`example_dataset` -> PackedRows -> batches of
    batch_size rows on this host); buffer_size, image_weight: the packer's (official SFT: 48 and
    30; 0 = one example per row)."""
    examples = example_dataset(sources, rates, preprocess, seed=seed, num_examples=num_examples,
                               process_index=process_index, process_count=process_count, shuffle=shuffle,
                               max_points=max_points)
    ds = PackedRows(examples, preprocess.pack, buffer_size, image_weight).batch(batch_size, drop_remainder=True)
    if prefetch > 0:  # a background thread prepares the next batches while the training step runs
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    total = sum(rates.values())
    return pipeline.Pipeline(ds, batch_size, max_skip_rate, skip_check_after, {n: rate / total for n, rate in rates.items()})
