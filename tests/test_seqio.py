"""seqio adapters over prepared PixMo (runs only where the optional seqio extra is installed)."""
import math

import pytest

seqio = pytest.importorskip("seqio", reason="the optional seqio extra is not installed (pip install -e '.[seqio]')")

from data_pipelines import mixtures  # noqa: E402
from data_pipelines.tfds import builders, seqio_tasks  # noqa: E402
from test_pixmo_sources import data  # noqa: E402,F401  (module fixture: parquet of every set + image cache)

POINTING = ("pixmo_points", "pixmo_count", "pixmo_points_high_freq", "pixmo_points_counting",
            "pixmo_points_high_freq_counting", "pixmo_count_counting")


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):  # noqa: F811
    d, images = data
    out = str(tmp_path_factory.mktemp("seqio"))
    for storage in ("pixmo_points", "pixmo_points_high_freq", "pixmo_count"):
        builders.prepare(storage, out, d, images, **({"n_val": 0} if storage != "pixmo_count" else {}))
    return out


def test_task_per_source_and_mixture_rates(prepared):
    names = seqio_tasks.register_tasks(prepared)
    assert set(POINTING) <= set(names) and "pixmo_cap" not in names  # only prepared configs
    examples = list(seqio.get_mixture_or_task("pixmo_points_counting").get_dataset(
        sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
    assert len(examples) == 1 and examples[0]["source"] == b"pixmo_points_counting"
    assert examples[0]["image"].startswith(b"\x89PNG")

    with pytest.raises(KeyError, match="needs seqio tasks"):
        seqio_tasks.register_mixture("3.2-synthetic")
    mixtures.MIXTURES["pointing_only_test"] = (mixtures.MIXTURES["3.2-synthetic"][2],)
    try:
        rates = seqio_tasks.register_mixture("pointing_only_test")
    finally:
        del mixtures.MIXTURES["pointing_only_test"]
    assert math.isclose(sum(rates.values()), 1.0) and set(rates) == set(POINTING)
    # root-size rule: every dataset of the fixture has one training image -> equal rates
    assert all(math.isclose(r, 1 / 6) for r in rates.values())
    mixture = seqio.get_mixture_or_task(seqio_tasks.mixture_name("pointing_only_test"))
    assert math.isclose(mixture.get_rate(seqio.get_mixture_or_task("pixmo_count")), 1 / 6)
