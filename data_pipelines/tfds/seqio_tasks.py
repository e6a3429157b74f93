"""seqio adapters over the prepared PixMo ArrayRecord data (optional extra: pip install -e ".[seqio]").

    register_tasks(DATA)                     # a seqio Task per PixMo source prepared under DATA
    register_mixture("3.2-synthetic")        # seqio mixture "molmo_3.2_synthetic", paper rates (spec §5.3)

Task names are the official dataset names (`pixmo_points_counting`, `pixmo_docs_charts`, ...), so
academic tasks registered under their official names (`text_vqa`, ...) complete the released mixture.
A task yields the stored record (`image` bytes, `record` JSON: key + annotation rows) plus `source`,
the name whose `data_pipelines.sources.pixmo.example_fn` turns it into a Molmo example; the
multimodal tokenization stays in the grain pipeline, so tasks declare no text output features.
Rates: within a group, proportional to sqrt(number of train examples) (size overrides as in the
paper, e.g. PixMo-Cap counted as 50,000), times the group rate (`data_pipelines.mixtures`).
Nothing else in the project imports this module, which pulls TensorFlow through seqio.
"""
import functools
import os

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import mixtures
from data_pipelines.sources import pixmo
from data_pipelines.tfds import builders


def _array_record_source(tfds_name: str, data_dir: str) -> seqio.FunctionDataSource:
    """A seqio source over a prepared ArrayRecord config. `seqio.TfdsDataSource` reads through
    `tfds.as_dataset`, which TFDS does not implement for ArrayRecord, so records are read with
    `tfds.data_source` (random access) and streamed into tf.data."""
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    num_examples = {split: info.num_examples for split, info in builder.info.splits.items()}

    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        records = tfds.data_source(tfds_name, split=split, data_dir=data_dir)
        order = np.arange(len(records))
        if shuffle_files:
            np.random.default_rng(seed).shuffle(order)

        def generate():
            for i in order:
                row = records[int(i)]
                yield {"image": row["image"], "record": row["record"]}

        return tf.data.Dataset.from_generator(generate, output_signature={
            "image": tf.TensorSpec((), tf.string), "record": tf.TensorSpec((), tf.string)})

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(num_examples), num_input_examples=num_examples)


def _tag_source(dataset, source: str):
    return dataset.map(lambda ex: dict(ex, source=source))


def register_tasks(data_dir: str, names=None) -> list[str]:
    """Registers a Task per PixMo source (all of `pixmo.SOURCES` by default) whose prepared config
    exists under `data_dir`; returns the names registered. Re-registering replaces the task."""
    registered = []
    for name in names or sorted(pixmo.SOURCES):
        storage = pixmo.spec(name).storage or name
        if not os.path.isdir(os.path.join(data_dir, builders.PixmoPrepared.name, storage)):
            if names:
                raise FileNotFoundError(f"{name}: prepared config {storage} not under {data_dir}; "
                                        f"run `python -m data_pipelines.tfds.builders --configs {storage}` first")
            continue
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=_array_record_source(f"{builders.PixmoPrepared.name}/{storage}:{builders.PixmoPrepared.VERSION}",
                                        data_dir),
            preprocessors=[functools.partial(_tag_source, source=name)],
            output_features={})
        registered.append(name)
    return registered


def mixture_name(mixture: str) -> str:
    """seqio name of a data_pipelines.mixtures mixture ("3.2-synthetic" -> "molmo_3.2_synthetic")."""
    return "molmo_" + mixture.replace("-", "_")


def register_mixture(mixture: str = "3.2-synthetic", split: str = "train") -> dict[str, float]:
    """Registers `mixture` (a key of data_pipelines.mixtures.MIXTURES) as the seqio Mixture
    `mixture_name(mixture)`; every dataset in it needs a registered Task. Returns the per-task rates."""
    groups = mixtures.get_mixture(mixture)
    names = mixtures.mixture_datasets(groups)
    missing = [n for n in names if n not in seqio.TaskRegistry.names()]
    if missing:
        raise KeyError(f"mixture {mixture!r} needs seqio tasks {missing}: prepare and register the PixMo ones "
                       "with register_tasks(); academic sets must be registered under these names")
    sizes = {n: seqio.get_mixture_or_task(n).num_input_examples(split) for n in names}
    rates = mixtures.mixture_rates(groups, sizes)
    seqio.MixtureRegistry.remove(mixture_name(mixture))
    seqio.MixtureRegistry.add(mixture_name(mixture), list(rates.items()))
    return rates
