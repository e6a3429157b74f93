"""Prepared PixMo: ArrayRecord written by the TFDS builder and read back (grain, no TensorFlow) equal."""
import glob
import inspect
import os
import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines.sources import pixmo
from data_pipelines.tfds import builders
from test_pixmo_sources import data  # noqa: F401  (module fixture: parquet of every set + image cache)

CONFIGS = ["pixmo_cap", "pixmo_points", "pixmo_points_eval", "pixmo_count", "pixmo_docs_charts", "pixmo_clocks"]


def carved(name):
    """Tiny fixtures: no validation images carved out of the train-only sets."""
    return {"n_val": 0} if "n_val" in inspect.signature(pixmo.spec(name).records).parameters else {}


def assert_same(a, b, where="example"):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):  # noqa: F811
    d, images = data
    out = str(tmp_path_factory.mktemp("tfds"))
    for storage in CONFIGS:
        builders.prepare(storage, out, d, images, **carved(storage))
    return out


@pytest.mark.parametrize("name", ["pixmo_cap", "pixmo_cap_with_transcripts", "pixmo_points",
                                  "pixmo_points_counting", "pixmo_points_eval", "pixmo_count_counting",
                                  "pixmo_docs_charts", "pixmo_clocks"])
def test_written_and_read_back_equal(data, prepared, name):  # noqa: F811
    d, images = data
    split = {"pixmo_points_eval": "test"}.get(name, "train")
    direct = pixmo.load(name, d, split, images, **carved(name))
    assert len(direct) > 0
    stored = builders.prepared_source(name, split, prepared)
    assert len(stored) == len(direct)
    for i in range(len(direct)):
        expected = direct[i]
        if isinstance(expected.get("image"), str):  # the parquet source points at the cache file
            with open(expected["image"], "rb") as f:
                expected["image"] = f.read()
        assert_same(stored[i], expected, f"{name}[{i}]")


def test_array_record_files_and_grain(prepared):
    storage_dir = os.path.join(prepared, builders.PixmoPrepared.name, "pixmo_points_eval")
    assert glob.glob(os.path.join(storage_dir, "*", "*.array_record*"))
    source = builders.prepared_source("pixmo_points_eval", "test", prepared)
    dataset = grain.MapDataset.source(source).map(lambda ex: ex["metadata"]["masks"].shape)
    assert list(dataset) == [(1, 3, 4), (0, 0, 0)]
    assert len(pickle.loads(pickle.dumps(source))) == 2  # grain worker processes receive a pickled source
    by_name = tfds.data_source("pixmo_prepared/pixmo_points_eval", split="test", data_dir=prepared)
    assert builders.decode_record(by_name[1])[1] == source.records[1][1]


def test_missing_config_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        builders.prepared_source("pixmo_points", "train", str(tmp_path))
    with pytest.raises(KeyError, match="unknown prepared PixMo config"):
        builders.prepare("pixmo_nope", str(tmp_path), str(tmp_path))


def test_prepare_command(data, tmp_path, capsys):  # noqa: F811
    d, images = data
    builders.main(["--out", str(tmp_path), "--pixmo-dir", d, "--image-dir", images, "--configs", "pixmo_clocks"])
    assert "pixmo_clocks {'train': 2}" in capsys.readouterr().out
    assert len(builders.prepared_source("pixmo_clocks", "train", str(tmp_path))) == 2
