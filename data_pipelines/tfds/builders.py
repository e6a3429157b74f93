"""TFDS builder writing the prepared PixMo sets, image bytes included, to ArrayRecord.

    python -m data_pipelines.tfds.builders --out OUT --pixmo-dir DATA --image-dir IMAGES [--configs a,b]
    source = prepared_source("pixmo_points_counting", "train", data_dir=OUT)  # grain-ready, no TensorFlow

One config per stored record set (`pixmo.SOURCES[...].storage`): the four PixMo-Points mixture entries
share two configs (basic, high_frequency), PixMo-Cap captions/transcripts share one, PixMo-Count both
styles one. A record is the image bytes plus its annotation rows as JSON; `prepared_source` applies the
same example function as the parquet source, so per-epoch choices (which transcript, no-pointing
prefixes) stay random and the two paths give equal examples. Reading goes through
`tfds.data_source` (ArrayRecord random access), which needs neither TensorFlow nor network.
"""
import argparse
import base64
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.sources import pixmo

STORAGE = sorted({spec.storage or name for name, spec in pixmo.SOURCES.items()})
SPLITS = {"pixmo_count": ("train", "validation", "test"), "pixmo_points_eval": ("test",)}
FEATURES = tfds.features.FeaturesDict({
    "image": tfds.features.Scalar(dtype=np.object_, doc="encoded image bytes, empty when the set has none"),
    "record": tfds.features.Text(doc="JSON {key, rows}: the image URL or id and its annotation rows"),
})


def splits_of(storage: str) -> tuple[str, ...]:
    return SPLITS.get(storage, ("train", "validation"))


def _source_of(storage: str) -> str:
    """A source name whose records are stored in `storage` (they all read the same records)."""
    return next(name for name, spec in sorted(pixmo.SOURCES.items()) if (spec.storage or name) == storage)


class PixmoPrepared(tfds.core.GeneratorBasedBuilder):
    """PixMo records with image bytes; build with `pixmo_dir` (HF parquet folders) and `image_dir`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of the published PixMo parquet, grouped per image, with image bytes."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"records of {name}") for name in STORAGE]

    def __init__(self, *, pixmo_dir: str | None = None, image_dir: str | None = None,
                 record_args: dict | None = None, **kwargs):
        self.pixmo_dir, self.image_dir, self.record_args = pixmo_dir, image_dir, record_args or {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Unshuffled: record i of a split is record i of the parquet source (grain shuffles at read time).
        return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0], features=FEATURES,
                                     disable_shuffling=True, homepage="https://huggingface.co/allenai")

    def _split_generators(self, dl_manager):
        if self.pixmo_dir is None:
            raise ValueError(f"{self.name}/{self.builder_config.name}: pass pixmo_dir (the folder holding the HF "
                             "parquet folders) to prepare it")
        source, splits = _source_of(self.builder_config.name), splits_of(self.builder_config.name)
        records = {}
        for split in splits:
            try:
                records[split] = pixmo.load_records(source, self.pixmo_dir, split, self.image_dir,
                                                    **self.record_args)[0]
            except FileNotFoundError:
                if split == splits[0]:
                    raise
        # Published splits not downloaded are left out, and so are empty ones (TFDS cannot write them).
        return {split: self._generate_examples(rs) for split, rs in records.items() if rs}

    def _generate_examples(self, records: list):
        for index, (image, key, rows) in enumerate(records):
            yield index, encode_record(pixmo.image_bytes_or_path(image), key, rows)


def encode_record(image, key, rows: list[dict]) -> dict:
    """(image path | bytes | None, key, rows) -> the stored feature dict."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            image = f.read()
    return {"image": image or b"", "record": json.dumps({"key": key, "rows": rows}, default=_encode_array)}


def decode_record(stored: dict) -> tuple:
    """A stored feature dict -> (image bytes | None, key, rows), what `pixmo` example functions take."""
    record = json.loads(stored["record"], object_hook=_decode_array)
    return stored["image"] or None, record["key"], record["rows"]


def _encode_array(value):
    if not isinstance(value, np.ndarray):
        raise TypeError(f"cannot store {type(value).__name__} in a PixMo record")
    packed = np.packbits(value) if value.dtype == bool else np.ascontiguousarray(value)
    return {"__ndarray__": base64.b64encode(packed.tobytes()).decode(), "dtype": value.dtype.str,
            "shape": list(value.shape)}


def _decode_array(obj: dict):
    if "__ndarray__" not in obj:
        return obj
    data, dtype, shape = base64.b64decode(obj["__ndarray__"]), np.dtype(obj["dtype"]), tuple(obj["shape"])
    if dtype == bool:
        return np.unpackbits(np.frombuffer(data, np.uint8), count=int(np.prod(shape))).astype(bool).reshape(shape)
    return np.frombuffer(data, dtype).reshape(shape).copy()


class _StoredRecords:
    """Lazy sequence of decoded records over a tfds ArrayRecord data source."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> tuple:
        return decode_record(self.data_source[index])


def prepare(storage: str, data_dir: str, pixmo_dir: str, image_dir: str | None = None,
            **record_args) -> PixmoPrepared:
    """Writes config `storage` (one of STORAGE) as ArrayRecord under `data_dir`; returns the builder.
    `record_args` go to the record reader (e.g. n_val); prepared data then differs from the defaults."""
    if storage not in STORAGE:
        raise KeyError(f"unknown prepared PixMo config {storage!r}; known: {STORAGE}")
    builder = PixmoPrepared(config=storage, data_dir=data_dir, file_format="array_record",
                            pixmo_dir=pixmo_dir, image_dir=image_dir, record_args=record_args)
    builder.download_and_prepare()
    return builder


def prepared_source(name: str, split: str, data_dir: str, seed: int = 0) -> pixmo.PixmoSource:
    """Source `name` (a pixmo.SOURCES key) read from its prepared ArrayRecord files."""
    spec = pixmo.spec(name)
    storage = spec.storage or name
    if not os.path.isdir(os.path.join(data_dir, PixmoPrepared.name, storage)):
        raise FileNotFoundError(f"{data_dir}/{PixmoPrepared.name}/{storage} not found: run "
                                f"data_pipelines.tfds.builders.prepare({storage!r}, ...) first")
    data_source = PixmoPrepared(config=storage, data_dir=data_dir).as_data_source(split)
    return pixmo.PixmoSource(f"{name}[{split}, prepared]", _StoredRecords(data_source), pixmo.example_fn(name),
                             seed=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write prepared PixMo configs as ArrayRecord.")
    parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--pixmo-dir", required=True, help="folder holding the HF parquet folders")
    parser.add_argument("--image-dir", help="image cache of data_pipelines.download (URL-based sets)")
    parser.add_argument("--configs", default=",".join(STORAGE))
    args = parser.parse_args(argv)
    for storage in args.configs.split(","):
        builder = prepare(storage, args.out, args.pixmo_dir, args.image_dir)
        print(storage, {split: info.num_examples for split, info in builder.info.splits.items()})


if __name__ == "__main__":
    main()
