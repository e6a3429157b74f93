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


def test_molmo2_sft_rates_follow_the_official_weighted_datasets():
    """launch_scripts/sft.py "molmo2": group rates; a dataset's share is sampling_rate * sqrt(size), with
    root_size_factor >= 1 replacing the size (so each video pointing bucket counts as size 1)."""
    groups = get_mixture("molmo2")
    sizes = {d: 10_000 for d in mixture_datasets(groups)}
    sizes["pixmo_ask_model_anything"] = 40_000
    rates = mixture_rates(groups, sizes)
    assert math.isclose(sum(rates.values()), 1.0)
    # the official group rates add up to 1.1; _build_mixture divides every rate by the total
    for group, expected in zip(groups, (0.15, 0.2, 0.25, 0.15, 0.15, 0.1, 0.0995, 0.0005)):
        assert math.isclose(sum(rates[d] for d in group.datasets), expected / 1.1)
    # video pointing: 0.4 / 0.3 / 0.1 / 0.2 of the group's 0.15, whatever the sizes
    for name, share in (("molmo2_video_point_minmax_0_5", 0.4), ("molmo2_video_point_minmax_6_25", 0.3),
                        ("molmo2_video_point_minmax_26_60", 0.1), ("academic_points_clip_63s_2fps", 0.2)):
        assert math.isclose(rates[name], 0.15 * share / 1.1)
    # captions: sampling_rate 1.5 on sqrt(size); PixMo-Cap counts as 100,000
    assert math.isclose(rates["molmo2_cap"] / rates["pixmo_ask_model_anything"], 1.5 * math.sqrt(10_000 / 40_000))
    assert math.isclose(rates["pixmo_cap"] / rates["molmo2_human_qa"], math.sqrt(100_000 / 10_000))
    # tracking: subgroup rate / 1.11 each; ViCaS counts as 30,000
    assert math.isclose(rates["mevis_track"] / rates["burst_track"], 0.4 / 0.05)
    assert math.isclose(rates["mevis_track"] / rates["vicas_track"], math.sqrt(10_000 / 30_000))
    assert math.isclose(rates["mevis_ground"] / rates["tnllt_single_point_track"], 0.2 / 0.1)
    assert math.isclose(rates["pixmo_multi_points"] / rates["cosyn_point"], math.sqrt(200_000 / 10_000))


def test_molmo2_pretrain_rates():
    rates = mixture_rates(get_mixture("molmo2_pretrain"), {d: 100 for d in mixture_datasets(get_mixture("molmo2_pretrain"))})
    assert math.isclose(rates["pixmo_cap_with_transcripts"], 0.6) and math.isclose(rates["tulu4_max_2304"], 0.1)
    assert math.isclose(rates["cosyn_point"], 0.3 / 4)


def test_override_rates_replaces_renormalises_and_names_mistakes():
    from data_pipelines.mixtures import override_rates
    rates = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert override_rates(rates, {}) == pytest.approx(rates)
    assert override_rates(rates, {"c": 0}) == pytest.approx({"a": 0.625, "b": 0.375})
    assert override_rates(rates, {"a": 0.1}) == pytest.approx({"a": 1 / 6, "b": 0.5, "c": 1 / 3})
    for bad, message in (({"d": 1}, r"\['d'\]"), ({"a": -0.1}, "'a'.*>= 0"), ({"a": "x"}, "not a number"),
                         ({"a": 0, "b": 0, "c": 0}, "every dataset")):
        with pytest.raises(ValueError, match=message):
            override_rates(rates, bad)
