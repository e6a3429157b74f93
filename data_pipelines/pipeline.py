"""The training input pipeline: mixture -> example -> format / crop / tokenize -> pack -> batch.

Built on grain's dataset API, per JAX process (host):

  MapDataset.range(num_examples)            global example indices (the stream every host shares)
    .slice(process_index::process_count)    this host's shard: disjoint, together the whole stream
    .map(ExampleTransform)                  mixture pick, load, checks, preprocess, pack; a bad
                                            example becomes a skip record instead of an exception
    .to_iter_dataset()
    SkipAccounting                          drops skip records, counts them on the next example
    PackRows                                up to data.examples_per_row examples per sequence
                                            (packing.pack_row; default 1, the official layout)
    .batch(batch_per_host)                  fixed shapes (see packing.py)
    .mp_prefetch(num_workers)               worker processes, each on a slice; batches round-robin
                                            (no workers: a prefetch thread)
  PipelineIterator                          sums skip counts, enforces max_skip_rate,
                                            get_state / set_state for exact resume

Every random choice (mixture pick, dataset permutation, templates, message order) is a function
of (data seed, global index), so the stream does not depend on the number of hosts and a
restored iterator continues exactly where the saved one stopped; with worker processes the
stream is the same for the same `num_workers` (grain interleaves the workers' batches).

Bad examples are skipped and counted by cause (`SKIP_CAUSES`): a corrupt image, a missing
file, more than `max_points` points, an image block longer than seq_len, or a malformed
example that the formatter or tokenizer rejects with ValueError / KeyError. Any other
exception is a bug and stops the run. Once `skip_check_after` examples were seen, a skip rate
above `max_skip_rate` stops the run with `TooManyBadExamples` naming the causes. Skips travel
with the next kept example (that is how they cross worker processes), so in a finite stream the
skips after the last full batch are not counted.

`make_pipeline(config)` builds all of it from an experiment ConfigDict; keys of `config.data`
(defaults in brackets): mixture (a name in mixtures.MIXTURES or one dataset name), mixture_rates
[{}] (dataset -> rate replacing the mixture's; 0 drops it; renormalised), tokenizer,
seq_len, max_crops, seed, num_workers, prefetch [2], overlap_margins [(4, 4)], num_examples
[unbounded], shuffle_messages [True], annotation_weighting ["root_subsegments" for sft, else
None], format ["captioner" for pretrain, else "finetuned"], max_points [40], max_skip_rate
[0.05], skip_check_after [256], synthetic_image_size [168], synthetic_examples [100_000],
synthetic_options [{}] (per generator kind, constructor arguments of data_pipelines.sources.synthetic),
pixmo_dir, image_dir [""], split ["train"], clock_image_size [336], examples_per_row [1].
The batch size per host is `config.train.global_batch // process_count`.

Numpy only (grain imports jax for its own profiler, nothing here uses it): the trainer turns the
numpy batches into global arrays.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import grain
import numpy as np

from data_pipelines import formatting, multicrop, packing, preprocess as preprocess_lib
from data_pipelines.images import ImageDecodeError
from data_pipelines.mixtures import MixtureIndex, get_mixture, mixture_datasets, mixture_rates, override_rates
from data_pipelines.sources import synthetic

SKIP_CAUSES = ("corrupt_image", "missing_file", "too_many_points", "too_long", "malformed")
BATCH_KEYS = packing.TEXT_KEYS + ("images", "image_masks", "image_input_idx")
# Preprocess: (example dict, np.random.RandomState) -> tokenized example (see packing.pack_example).
Preprocess = Callable[[Dict[str, Any], np.random.RandomState], Dict[str, np.ndarray]]


class TooManyPoints(ValueError):
    """An annotation carries more points than the configured limit."""


class TooManyBadExamples(RuntimeError):
    """The skip rate passed max_skip_rate."""


def _count_points(example: Mapping[str, Any]) -> int:
    annotations = [example, *example.get("message_list", ())]
    return max((len(a["points"]) for a in annotations if a.get("points") is not None), default=0)


def skip_cause(error: Exception) -> Optional[str]:
    """The SKIP_CAUSES entry of an exception raised while making one example, None for bugs."""
    unreadable = isinstance(error, ImageDecodeError) and "unreadable file" in str(error)
    if isinstance(error, FileNotFoundError) or unreadable:
        return "missing_file"
    if isinstance(error, ImageDecodeError):
        return "corrupt_image"
    if isinstance(error, TooManyPoints):
        return "too_many_points"
    if isinstance(error, packing.ExampleTooLong):
        return "too_long"
    if isinstance(error, (ValueError, KeyError)):
        return "malformed"
    return None


def example_rng(seed: int, index: int) -> np.random.RandomState:
    """The RandomState of global example `index` (the official formatter draws from one)."""
    return np.random.RandomState(np.array([seed & 0xFFFFFFFF, index & 0xFFFFFFFF, index >> 32], np.uint32))


@dataclasses.dataclass
class ExampleTransform:
    """Global index -> packed example, or {"skip": cause index} for a bad example.

    sources: one random-access source per dataset of the mixture; mixture: their MixtureIndex.
    prepare: optional hook run on each raw example before the checks (e.g. drawing PixMo-Clocks rows).
    """
    sources: Sequence[Any]
    names: Sequence[str]
    mixture: MixtureIndex
    preprocess: Preprocess
    pack: packing.PackConfig
    seed: int
    max_points: int = 40
    prepare: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None

    skips_seen: int = 0     # in this process; only the first few and then every 1000th are logged

    def __call__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        d, element = self.mixture[index]
        rng = example_rng(self.seed, index)
        try:
            source = self.sources[d]
            example = source.get(element, rng) if hasattr(source, "get") else source[element]
            if self.prepare is not None:
                example = self.prepare(example)
            n_points = _count_points(example)
            if n_points > self.max_points:
                raise TooManyPoints(f"{n_points} points > max_points={self.max_points}")
            tokenized = self.preprocess(example, rng)
        except Exception as error:  # noqa: BLE001 -- classified in _skip, bugs are re-raised
            return self._skip(error, d, element, index)
        try:
            # Other packing errors (crops or shapes that do not fit the config) are bugs.
            return packing.pack_example(tokenized, self.pack, weight=float(example.get("weight", 1.0)))
        except packing.ExampleTooLong as error:
            return self._skip(error, d, element, index)

    def _skip(self, error: Exception, d: int, element: int, index: int) -> Dict[str, Any]:
        cause = skip_cause(error)
        if cause is None:
            raise error
        self.skips_seen += 1
        if self.skips_seen <= 20 or self.skips_seen % 1000 == 0:
            logging.warning("skipping %s[%d] (global index %d; skip %d in this process): %s: %s",
                            self.names[d], element, index, self.skips_seen, cause, error)
        return {"skip": np.int32(SKIP_CAUSES.index(cause))}


class _SkipAccountingIterator(grain.DatasetIterator):
    """Drops skip records; each kept example carries `skipped`: int32[len(SKIP_CAUSES)], the
    skips since the previous kept example (so the counts survive worker processes)."""

    def __next__(self):
        skipped = np.zeros(len(SKIP_CAUSES), np.int32)
        while True:
            record = next(self._parent)
            if "skip" in record:
                skipped[int(record["skip"])] += 1
                continue
            return {**record, "skipped": skipped}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class SkipAccounting(grain.IterDataset):
    def __iter__(self):
        return _SkipAccountingIterator(self._parent.__iter__())


class _PackRowsIterator(grain.DatasetIterator):
    """Next-fit packing of the example stream into rows (packing.pack_row): examples join the
    current row in stream order while they fit; the first that does not starts the next row.

    That example is read once and held; the state saved meanwhile is the parent's state from
    before it, so a restored iterator reads it again and continues exactly.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: packing.PackConfig, examples_per_row: int):
        super().__init__(parent)
        self._cfg = cfg
        self._per_row = examples_per_row
        self._held = None   # (parent state before it, example)

    def _read(self):
        if self._held is not None:
            held, self._held = self._held, None
            return held
        state = self._parent.get_state() if self._per_row > 1 else None
        return state, next(self._parent)

    def __next__(self):
        row, tokens = [], 0
        while len(row) < self._per_row:
            try:
                state, example = self._read()
            except StopIteration:
                if row:
                    break
                raise
            n = packing.example_length(example)
            if row and tokens + n > self._cfg.seq_len:
                self._held = (state, example)
                break
            row.append(example)
            tokens += n
        packed = packing.pack_row(row, self._cfg, self._per_row)
        packed["skipped"] = np.sum([e["skipped"] for e in row], axis=0).astype(np.int32)
        return packed

    def get_state(self):
        return self._held[0] if self._held is not None else self._parent.get_state()

    def set_state(self, state):
        self._held = None
        self._parent.set_state(state)


class PackRows(grain.IterDataset):
    """Rows of up to `examples_per_row` examples (1: one example per row, the official layout)."""

    def __init__(self, parent: grain.IterDataset, cfg: packing.PackConfig, examples_per_row: int):
        super().__init__(parent)
        if examples_per_row < 1:
            raise ValueError(f"examples_per_row must be >= 1, got {examples_per_row}")
        self._cfg = cfg
        self._per_row = int(examples_per_row)

    def __iter__(self):
        return _PackRowsIterator(self._parent.__iter__(), self._cfg, self._per_row)


@dataclasses.dataclass
class PipelineStats:
    """Counts since the start of training (restored with the iterator state)."""
    batches: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SKIP_CAUSES, 0))

    @property
    def skip_rate(self) -> float:
        bad = sum(self.skipped.values())
        return bad / max(bad + self.examples, 1)


class PipelineIterator(grain.DatasetIterator):
    """Batches of numpy arrays (keys BATCH_KEYS, leading dim = batch per host).

    A grain DatasetIterator, so `grain.checkpoint.CheckpointSave/Restore` (orbax) store it; its
    state (JSON) holds grain's state and the statistics.
    """

    def __init__(self, parent: grain.DatasetIterator, max_skip_rate: float, skip_check_after: int):
        super().__init__(parent)
        self._max_skip_rate = max_skip_rate
        self._skip_check_after = skip_check_after
        self.stats = PipelineStats()

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        skipped = np.asarray(batch.pop("skipped")).sum(0)
        s = self.stats
        s.batches += 1
        s.examples += int(np.sum(batch.pop("examples")))
        s.truncated += int(np.sum(batch.pop("truncated")))
        for cause, n in zip(SKIP_CAUSES, skipped):
            s.skipped[cause] += int(n)
        seen = s.examples + sum(s.skipped.values())
        if seen >= self._skip_check_after and s.skip_rate > self._max_skip_rate:
            causes = ", ".join(f"{k}={v}" for k, v in s.skipped.items() if v)
            raise TooManyBadExamples(
                f"{s.skip_rate:.1%} of {seen} examples were skipped ({causes}), above max_skip_rate="
                f"{self._max_skip_rate:.1%}; see the 'skipping' warnings for the first bad examples")
        return batch

    def get_state(self) -> Dict[str, Any]:
        return {"grain": self._parent.get_state(), "stats": dataclasses.asdict(self.stats)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["grain"])
        stats = dict(state["stats"])
        self.stats = PipelineStats(**{**stats, "skipped": dict(stats["skipped"])})


@dataclasses.dataclass
class Pipeline:
    """An iterable over this host's batches; `iter(pipeline)` gives a fresh PipelineIterator."""
    dataset: grain.IterDataset
    batch_size: int
    max_skip_rate: float
    skip_check_after: int
    datasets: Dict[str, float]     # dataset name -> sampling rate

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(iter(self.dataset), self.max_skip_rate, self.skip_check_after)


def build_dataset(transform: ExampleTransform, *, num_examples: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 0, prefetch: int = 2,
                  examples_per_row: int = 1) -> grain.IterDataset:
    """The grain dataset of one host (see the module docstring)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.range(num_examples).slice(slice(process_index, None, process_count)).map(transform)
    ds = PackRows(SkipAccounting(ds.to_iter_dataset()), transform.pack, examples_per_row)
    ds = ds.batch(batch_size, drop_remainder=True)
    if num_workers > 0:
        _allow_grain_workers()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
    elif prefetch > 0:
        # a background thread prepares the next batches while the training step runs
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def _allow_grain_workers() -> None:
    """grain 0.2.18 reads an absl flag in its workers and fails unless flags count as parsed
    (google/grain#1355); programs not started by absl.app need this."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline_from_parts(sources: Mapping[str, Any], rates: Mapping[str, float], preprocess: Preprocess,
                             pack: packing.PackConfig, *, seed: int, batch_size: int, num_examples: int = 2 ** 40,
                             process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                             prefetch: int = 2, shuffle: bool = True, max_points: int = 40,
                             max_skip_rate: float = 0.05, skip_check_after: int = 256,
                             prepare: Optional[Callable] = None, examples_per_row: int = 1) -> Pipeline:
    """A Pipeline over already-built sources.

    Args:
      sources: dataset name -> random-access source (`len`, `[i]` or `get(i, rng)`).
      rates: dataset name -> sampling rate (any positive scale).
      batch_size: rows (sequences) per batch on this host.
      examples_per_row: most examples packed into one row (1: one per row, the official layout).
      num_examples: length of the global example stream (all hosts together); unbounded by default.
    """
    names: List[str] = list(rates)
    missing = [n for n in names if n not in sources]
    if missing:
        raise KeyError(f"no source built for datasets {missing}")
    mixture = MixtureIndex([rates[n] for n in names], [len(sources[n]) for n in names], seed, shuffle=shuffle)
    transform = ExampleTransform([sources[n] for n in names], names, mixture, preprocess, pack, seed, max_points,
                                 prepare)
    dataset = build_dataset(transform, num_examples=num_examples, batch_size=batch_size, process_index=process_index,
                            process_count=process_count, num_workers=num_workers, prefetch=prefetch,
                            examples_per_row=examples_per_row)
    total = sum(rates.values())
    return Pipeline(dataset, batch_size, max_skip_rate, skip_check_after,
                    {n: rates[n] / total for n in names})


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Picklable `Preprocess`: optional message shuffling, then `preprocess.preprocess_example`."""
    tokenizer: Any
    crop: multicrop.CropConfig
    format_cfg: formatting.FormatConfig
    shuffle_messages: bool = True

    def __call__(self, example: Dict[str, Any], rng: np.random.RandomState) -> Dict[str, np.ndarray]:
        if self.shuffle_messages and len(example.get("message_list", ())) > 1:
            # The official training preprocessor shuffles the annotations of an image.
            order = rng.permutation(len(example["message_list"]))
            example = {**example, "message_list": [example["message_list"][i] for i in order]}
        return preprocess_lib.preprocess_example(example, self.tokenizer, self.crop, format_cfg=self.format_cfg,
                                                 rng=rng)


# Synthetic datasets: name -> (generator, constructor arguments).
SYNTHETIC = {
    "synthetic_points": ("shapes", dict(task="mixed", annotations=(1, 3))),
    "synthetic_pointing": ("shapes", dict(task="pointing")),
    "synthetic_counting": ("shapes", dict(task="counting")),
    "synthetic_clocks": ("clocks", {}),
    "synthetic_captions": ("captions", {}),
    "synthetic_charts": ("charts", {}),
}


def known_datasets() -> List[str]:
    from data_pipelines.sources import pixmo
    return sorted(SYNTHETIC) + sorted(pixmo.SOURCES) + ["custom"]


def build_source(name: str, data: Any, seed: int):
    """The random-access source of dataset `name`: synthetic_*, a PixMo set of sources.pixmo, or
    "custom" (the user's own file `data.custom`, sources.custom)."""
    if name in SYNTHETIC:
        kind, kwargs = SYNTHETIC[name]
        options = dict((data.get("synthetic_options") or {}).get(kind) or {})
        kwargs = {**kwargs, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}}
        try:
            return synthetic.make_synthetic(kind, data.get("synthetic_examples", 100_000),
                                            data.get("synthetic_image_size", 168), seed, **kwargs)
        except TypeError as e:  # an option the generator does not take
            raise ValueError(f"dataset {name}: config.data.synthetic_options.{kind} = {options} does not "
                             f"fit the {kind} generator: {e}") from None
    from data_pipelines.sources import pixmo
    if name in pixmo.SOURCES:
        if not data.get("pixmo_dir"):
            raise ValueError(f"dataset {name}: set config.data.pixmo_dir to the folder of the PixMo parquet files")
        return pixmo.load(name, data.pixmo_dir, data.get("split", "train"), image_dir=data.get("image_dir") or None)
    if name == "custom":
        if not data.get("custom"):
            raise ValueError("dataset custom: set config.data.custom to your JSONL/parquet file (docs/custom_data.md)")
        from data_pipelines.sources.custom import CustomSource
        return CustomSource(data.custom)
    raise KeyError(f"no source for dataset {name!r}; known: {known_datasets()} (academic sets are not built here)")


@dataclasses.dataclass(frozen=True)
class DrawClocks:
    """PixMo-Clocks publishes no images: draw each row's clock (synthetic.render_clock_row)."""
    image_size: int
    seed: int

    def __call__(self, example: Dict[str, Any]) -> Dict[str, Any]:
        if example.get("style") == "clocks" and example.get("image") is None and "metadata" in example:
            image = synthetic.render_clock_row(example["metadata"], self.image_size, self.seed)["image"]
            example = {**example, "image": image}
        return example


def crop_fields(config: Any) -> Dict[str, Any]:
    """The CropConfig fields of the experiment, unchecked and JSON-ready: the ViT input and patch
    size, the connector's pooling, config.data.max_crops and overlap_margins (the trainer records
    them in every checkpoint; the export writes them into preprocessor_config.json)."""
    vision, connector = config.model.vision, config.model.connector
    return dict(crop_size=int(vision.image_size[0]), patch_size=int(vision.patch_size),
                overlap_margins=[int(m) for m in config.data.get("overlap_margins", (4, 4))],
                pool=int(connector.pool_h), max_crops=int(config.data.max_crops))


def crop_config(config: Any) -> multicrop.CropConfig:
    """Crop geometry of the experiment (`crop_fields`), checked."""
    fields = crop_fields(config)
    return multicrop.CropConfig(**dict(fields, overlap_margins=tuple(fields["overlap_margins"])))


def make_pipeline(config: Any, *, tokenizer: Any = None, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """This host's training pipeline from an experiment ConfigDict (see the module docstring).

    Args:
      tokenizer: a tokenizer.Tokenizer; default: load config.data.tokenizer (padded to the
        model's vocab_size).
      process_index, process_count: this JAX process and the number of processes.
    """
    from data_pipelines.tokenizer import load_tokenizer
    data = config.data
    if tokenizer is None:
        if not data.tokenizer:
            raise ValueError("config.data.tokenizer is empty: give a tokenizer.json / folder / sentencepiece model")
        tokenizer = load_tokenizer(data.tokenizer, pad_to=int(config.model.llm.vocab_size))
    global_batch = int(config.train.global_batch)
    if global_batch % process_count:
        raise ValueError(f"config.train.global_batch={global_batch} is not divisible by {process_count} processes")
    crop = crop_config(config)
    stage = config.get("stage", "pretrain")
    pack = packing.PackConfig(
        seq_len=int(data.seq_len), max_crops=crop.max_crops, crop_patches=crop.crop_patches ** 2,
        patch_dim=crop.patch_dim, tokens_per_crop=crop.tokens_side ** 2,
        image_token_ids=tuple(dataclasses.astuple(tokenizer.image_token_ids)),
        annotation_weighting=data.get("annotation_weighting", "root_subsegments" if stage == "sft" else None))
    groups = get_mixture(data.mixture, known_datasets())
    seed = int(data.seed)
    sources = {name: build_source(name, data, seed) for name in mixture_datasets(groups)}
    rates = mixture_rates(groups, {name: len(src) for name, src in sources.items()})
    if data.get("mixture_rates"):  # some datasets' rates set by hand; 0 drops one
        rates = override_rates(rates, data.mixture_rates)
        sources = {name: src for name, src in sources.items() if name in rates}
    format_name = data.get("format", "captioner" if stage == "pretrain" else "finetuned")
    if format_name not in ("captioner", "finetuned"):
        raise ValueError(f"config.data.format must be 'captioner' or 'finetuned', got {format_name!r}")
    format_cfg = formatting.CAPTIONER if format_name == "captioner" else formatting.FINETUNED
    preprocessor = Preprocessor(tokenizer, crop, format_cfg, bool(data.get("shuffle_messages", True)))
    return make_pipeline_from_parts(
        sources, rates, preprocessor, pack, seed=seed, batch_size=global_batch // process_count,
        num_examples=int(data.get("num_examples", 2 ** 40)), process_index=process_index,
        process_count=process_count, num_workers=int(data.get("num_workers", 0)),
        prefetch=int(data.get("prefetch", 2)), max_points=int(data.get("max_points", 40)),
        max_skip_rate=float(data.get("max_skip_rate", 0.05)), skip_check_after=int(data.get("skip_check_after", 256)),
        prepare=DrawClocks(int(data.get("clock_image_size", 336)), seed),
        examples_per_row=examples_per_row(config))


def examples_per_row(config: Any) -> int:
    """config.data.examples_per_row [1]: most examples (each an image and its conversations)
    packed into one training sequence."""
    return int(config.data.get("examples_per_row", 1))   # PackRows rejects values below 1


def crops_per_row(config: Any) -> int:
    """Crop slots of one training sequence: examples_per_row * (1 + max_crops)."""
    return examples_per_row(config) * (1 + int(config.data.max_crops))
