"""Mixtures: root-size rates of the official fine-tuning groups, seeded random-access sampling."""
import math

import numpy as np
import pytest

from data_pipelines.mixtures import MIXTURES, Group, MixtureIndex, get_mixture, mixture_datasets, mixture_rates


def test_finetuning_groups_use_root_size_rates():
    groups = get_mixture("3.2-synthetic")
    sizes = {d: 10_000 * (i + 1) for i, d in enumerate(mixture_datasets(groups))}
    rates = mixture_rates(groups, sizes)
    assert math.isclose(sum(rates.values()), 1.0)
    for group, expected in zip(groups, (0.15, 0.50, 0.35)):
        assert math.isclose(sum(rates[d] for d in group.datasets), expected)
    # inside a group rates go with sqrt(size); PixMo-Cap counts as 50,000 and plot_qa as 20,000
    assert math.isclose(rates["pixmo_cap_qa"] / rates["pixmo_ask_model_anything"],
                        math.sqrt(sizes["pixmo_cap_qa"] / sizes["pixmo_ask_model_anything"]))
    assert math.isclose(rates["pixmo_cap"] / rates["pixmo_ask_model_anything"],
                        math.sqrt(50_000 / sizes["pixmo_ask_model_anything"]))
    assert math.isclose(rates["plot_qa"] / rates["dv_qa"], math.sqrt(2))
    assert "pixmo_clocks" not in rates          # not in the released mixture


def test_mixture_lookup():
    assert get_mixture("pixmo_cap_with_transcripts") == (Group(1.0, ("pixmo_cap_with_transcripts",)),)
    assert get_mixture("synthetic_clocks", datasets=["synthetic_clocks"]) == (Group(1.0, ("synthetic_clocks",)),)
    with pytest.raises(KeyError, match="unknown mixture"):
        get_mixture("no_such_mixture")
    with pytest.raises(KeyError, match="sizes"):
        mixture_rates(MIXTURES["synthetic"], {"synthetic_points": 10})


def test_observed_rates_over_10k_samples():
    rates = [0.5, 0.25, 0.15, 0.07, 0.03]
    mix = MixtureIndex(rates, [1000, 37, 5, 300, 2], seed=50189)
    picks = np.array([mix[i][0] for i in range(10_000)])
    observed = np.bincount(picks, minlength=len(rates)) / len(picks)
    np.testing.assert_allclose(observed, rates, atol=0.003)
    # also on a window that does not start at 0 (what one host or one worker reads)
    window = np.array([mix[i][0] for i in range(123_457, 133_457, 3)])
    # strided picks are random draws: about 3 standard deviations of 3334 samples
    np.testing.assert_allclose(np.bincount(window, minlength=len(rates)) / len(window), rates, atol=0.025)


def test_sampling_is_deterministic_and_random_access():
    a = MixtureIndex([0.6, 0.4], [50, 20], seed=7)
    sequence = [a[i] for i in range(3000)]
    fresh = MixtureIndex([0.6, 0.4], [50, 20], seed=7)
    assert [fresh[i] for i in (2999, 17, 1500)] == [sequence[2999], sequence[17], sequence[1500]]
    other = MixtureIndex([0.6, 0.4], [50, 20], seed=8)
    assert [other[i] for i in range(3000)] != sequence


def test_every_epoch_is_a_permutation():
    mix = MixtureIndex([0.7, 0.3], [40, 7], seed=1)
    draws = {0: [], 1: []}
    for i in range(1000):
        d, element = mix[i]
        draws[d].append(element)
    for d, n in ((0, 40), (1, 7)):
        full = len(draws[d]) // n * n
        epochs = np.array(draws[d][:full]).reshape(-1, n)
        assert all(sorted(e) == list(range(n)) for e in epochs), f"dataset {d} repeats within an epoch"
        assert len({tuple(e) for e in epochs}) > 1, "each epoch should be reshuffled"
