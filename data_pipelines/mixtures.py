"""Named dataset mixtures and a random-access, seeded sampler over them.

A mixture is a list of groups; each group has a rate and its datasets share that rate in
proportion to sqrt(dataset size) ("root-size" mixing of the official fine-tuning recipe, spec
§5.3; a size override replaces the real size, e.g. PixMo-Cap counts as 50,000) or, for groups
of one dataset, take it whole. `mixture_rates` turns a mixture and the dataset sizes into
per-dataset rates that sum to 1. Molmo2's groups (allenai/molmo2 `launch_scripts/sft.py`,
`olmo/data/data_loader.py` `_build_mixture`) also scale some root sizes: a `WeightedDataset`'s
`sampling_rate` multiplies its sqrt(size) (`weights`), and its `root_size_factor` >= 1 replaces
the size (`sizes`; the video pointing buckets count as size 1).

`MixtureIndex` maps a global example index to (dataset, element) so that any index can be
computed on its own (grain workers, hosts and a restored iterator each read their own indices):
draws are allocated to datasets by systematic sampling in blocks of `block` indices (each
dataset gets floor or ceil of block * rate draws, with a seeded offset, so the observed rates
match the configured ones to within one draw per block), the order inside every block is a
seeded permutation, and each dataset is read in a fresh seeded permutation every epoch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Group:
    """Datasets sharing `rate` in proportion to weight * sqrt(size); `sizes` overrides some sizes,
    `weights` (default 1) scales some datasets' shares."""
    rate: float
    datasets: Tuple[str, ...]
    sizes: Tuple[Tuple[str, int], ...] = ()
    weights: Tuple[Tuple[str, float], ...] = ()


MIXTURES: Dict[str, Tuple[Group, ...]] = {
    # Stage 1 (spec §5.2): PixMo-Cap, each image with its caption and one transcript.
    "pixmo_cap_with_transcripts": (Group(1.0, ("pixmo_cap_with_transcripts",)),),
    # Stage 2, the released "3.2-synthetic" mixture (spec §5.3); PixMo-Clocks is not in it.
    "3.2-synthetic": (
        Group(0.15, ("pixmo_ask_model_anything", "pixmo_cap", "pixmo_cap_qa", "pixmo_pointing_explanations"),
              sizes=(("pixmo_cap", 50_000),)),
        Group(0.50, ("coco_2014_vqa_multi", "text_vqa", "okvqa", "chart_qa_weighted", "doc_qa", "info_qa",
                     "ai2_diagram_v2_mix_transparent", "a_okvqa_mc", "a_okvqa_da", "android_control",
                     "science_qa_img", "tabwmp_da", "st_qa", "tally_qa", "pixmo_docs_charts", "pixmo_docs_tables",
                     "pixmo_docs_other", "pixmo_docs_diagrams", "dv_qa", "figure_qa", "plot_qa"),
              sizes=(("dv_qa", 10_000), ("figure_qa", 10_000), ("plot_qa", 20_000))),
        Group(0.35, ("pixmo_points", "pixmo_count", "pixmo_points_high_freq", "pixmo_points_counting",
                     "pixmo_points_high_freq_counting", "pixmo_count_counting")),
    ),
    # Stage 2 without the academic sets (PixMo only): the docs take the aux group's place.
    "pixmo_only": (
        Group(0.15, ("pixmo_ask_model_anything", "pixmo_cap", "pixmo_cap_qa", "pixmo_pointing_explanations"),
              sizes=(("pixmo_cap", 50_000),)),
        Group(0.15, ("pixmo_docs_charts", "pixmo_docs_tables", "pixmo_docs_other", "pixmo_docs_diagrams")),
        Group(0.35, ("pixmo_points", "pixmo_count", "pixmo_points_high_freq", "pixmo_points_counting",
                     "pixmo_points_high_freq_counting", "pixmo_count_counting")),
    ),
    # Molmo2 stage 1 (launch_scripts/pretrain.py, defaults --pointing 0.3 --nlp 0.1).
    "molmo2_pretrain": (
        Group(0.6, ("pixmo_cap_with_transcripts",)),
        Group(0.3, ("pixmo_points_train", "pixmo_count_train", "pixmo_points_high_freq_train", "cosyn_point")),
        Group(0.1, ("tulu4_max_2304",)),
    ),
    # Synthetic data for the demo: captions first (stage 1), then the multitask mix (stage 2).
    "synthetic_captions": (Group(1.0, ("synthetic_captions",)),),
    "synthetic": (
        Group(0.35, ("synthetic_points",)),
        Group(0.15, ("synthetic_pointing",)),
        Group(0.15, ("synthetic_counting",)),
        Group(0.25, ("synthetic_clocks",)),
        Group(0.10, ("synthetic_captions",)),
    ),
}


# The official names of launch_scripts/sft.py, except where this project's Molmo2 sources
# (sources/molmo2.py) serve the released set under its get_dataset name: "vixmo3_top_level_captions_min_3"
# -> molmo2_cap, "vixmo_points_minmax_*" -> molmo2_video_point_minmax_*, and the internal
# "vixmo_syn_video_capqa_v2" / "..._with_sub_v2" -> the released VideoCapQA / VideoSubtitleQA.
MOLMO2_IMAGE_ACADEMIC = (
    "coco_2014_vqa_multi", "text_vqa", "okvqa", "chart_qa_weighted", "doc_qa", "info_qa",
    "ai2_diagram_v2_mix_transparent", "a_okvqa_mc", "a_okvqa_da", "science_qa_img", "tabwmp_da", "st_qa",
    "tally_qa", "mantis_instruct_llava_665k_multi_multi_only", "mantis_instruct_nlvr2_multi_only",
    "mantis_instruct_spot-the-diff_multi_only", "dv_qa", "figure_qa", "plot_qa", "cosyn_chart_exp",
    "cosyn_chemical_exp", "cosyn_diagram_exp", "cosyn_document", "cosyn_math_exp", "cosyn_music_exp",
    "cosyn_table_exp", "cosyn_multidoc_chart_exp", "cosyn_multidoc_chemical_exp", "cosyn_multidoc_diagram_exp",
    "cosyn_multidoc_doc_exp", "cosyn_multidoc_music_exp", "cosyn_multidoc_table_exp")
MOLMO2_VIDEO_ACADEMIC = (
    "tgif", "tvqa_with_sub", "paxion", "llava_video_mc_academic", "llava_video_oe_academic", "perception_test",
    "nextqa_mc", "news_video_qa_filtered", "how2qa", "sutd_trafficqa", "social_iq2", "sportsqa_oe",
    "cinepile_with_sub", "clevrer", "funqa", "star", "intent_qa", "video_localized_narratives", "road_text_vqa",
    "countix_oe", "camerabench_qa", "motionbench_train", "moments_in_time_qa", "kinetics_qa",
    "charades_sta_all_qa", "coin_all_qa", "youcook2_all_qa", "activitynet_all_qa", "ego4d_all",
    "epic_kitchens_qa", "video_localized_narratives_caption", "qv_highlights",
    "molmo2_syn_captions_qa", "molmo2_syn_captions_subtitle_qa")
# TRACKING_MIXTURE: (subgroup rate, datasets, size overrides); inside the "tracking" group every dataset's
# share is its subgroup rate / the sum of the rates (1.11) times sqrt(size).
MOLMO2_TRACKING = (
    (0.4, ("mevis_track", "ref_yt_vos_track", "lv_vis_track", "vicas_track", "revos_track", "molmo2_video_track"),
     (("vicas_track", 30_000),)),
    (0.05, ("burst_track", "ref_davis17_track", "yt_vis_track", "moca_track"), ()),
    (0.2, ("mevis_ground", "lv_vis_ground", "vicas_ground", "revos_ground", "molmo2_video_track_ground"),
     (("vicas_ground", 30_000),)),
    (0.01, ("burst_ground", "moca_ground"), ()),
    (0.15, ("mevis_single_point_track", "lv_vis_single_point_track", "vicas_single_point_track",
            "revos_single_point_track", "molmo2_video_single_point_track"), (("vicas_single_point_track", 30_000),)),
    (0.2, ("webuav_single_point_track", "got10k_single_point_track", "vasttrack_single_point_track",
           "trackingnet_single_point_track"), ()),
    (0.1, ("burst_single_point_track", "lvosv1_single_point_track", "lvosv2_single_point_track",
           "lasot_single_point_track", "uwcot_single_point_track", "webuot_single_point_track",
           "latot_single_point_track", "tnl2k_single_point_track", "tnllt_single_point_track"), ()),
)
_TRACK_TOTAL = sum(rate for rate, _, _ in MOLMO2_TRACKING)
MOLMO2_VIDEO_POINTING = (("molmo2_video_point_minmax_0_5", 0.4), ("molmo2_video_point_minmax_6_25", 0.3),
                         ("molmo2_video_point_minmax_26_60", 0.1), ("academic_points_clip_63s_2fps", 0.2))
HARDCODE_RATE = 0.0005
# The group rates add up to 1.1 as published; mixture_rates normalises them as _build_mixture does.
MIXTURES["molmo2"] = (
    Group(0.15, ("pixmo_ask_model_anything", "pixmo_cap", "pixmo_cap_qa_as_user_qa",
                 "pixmo_multi_image_qa_multi_only_max5", "molmo2_human_qa", "molmo2_cap"),
          sizes=(("pixmo_cap", 100_000),), weights=(("molmo2_cap", 1.5),)),
    Group(0.2, MOLMO2_VIDEO_ACADEMIC, sizes=(("tgif", 60_000), ("tvqa_with_sub", 60_000), ("paxion", 60_000),
                                             ("moments_in_time_qa", 60_000), ("kinetics_qa", 60_000))),
    Group(0.25, MOLMO2_IMAGE_ACADEMIC, sizes=(("dv_qa", 10_000), ("figure_qa", 10_000), ("plot_qa", 20_000))),
    Group(0.15, tuple(d for _, names, _ in MOLMO2_TRACKING for d in names),
          sizes=tuple(s for _, _, sizes in MOLMO2_TRACKING for s in sizes),
          weights=tuple((d, rate / _TRACK_TOTAL) for rate, names, _ in MOLMO2_TRACKING for d in names)),
    Group(0.15, tuple(d for d, _ in MOLMO2_VIDEO_POINTING), sizes=tuple((d, 1) for d, _ in MOLMO2_VIDEO_POINTING),
          weights=MOLMO2_VIDEO_POINTING),
    Group(0.1, ("pixmo_multi_points", "pixmo_points_train", "pixmo_count_train", "pixmo_points_high_freq_train",
                "cosyn_point"), sizes=(("pixmo_multi_points", 200_000),)),
    Group(0.1 - HARDCODE_RATE, ("tulu4",)),
    Group(HARDCODE_RATE, ("molmo2_hardcodes",)),
)


def get_mixture(name: str, datasets: Sequence[str] = ()) -> Tuple[Group, ...]:
    """The groups of mixture `name`, or a one-dataset mixture if `name` is one of `datasets`."""
    if name in MIXTURES:
        return MIXTURES[name]
    if name in datasets:
        return (Group(1.0, (name,)),)
    raise KeyError(f"unknown mixture {name!r}; mixtures: {sorted(MIXTURES)}; or a single dataset of "
                   f"{sorted(datasets)}")


def restrict(groups: Sequence[Group], keep: Sequence[str]) -> Tuple[Group, ...]:
    """The groups with only the datasets in `keep`, groups left empty dropped: each keeps its rate,
    shared by root size among its kept datasets (mixture_rates renormalises). Raises ValueError
    for a name of `keep` that is in no group."""
    strangers = sorted(set(keep) - set(mixture_datasets(groups)))
    if strangers:
        raise ValueError(f"datasets {strangers} are not in the mixture")
    out = []
    for g in groups:
        kept = tuple(d for d in g.datasets if d in keep)
        if kept:
            out.append(dataclasses.replace(g, datasets=kept, sizes=tuple((d, n) for d, n in g.sizes if d in kept),
                                           weights=tuple((d, w) for d, w in g.weights if d in kept)))
    return tuple(out)


def mixture_datasets(groups: Sequence[Group]) -> Tuple[str, ...]:
    return tuple(d for g in groups for d in g.datasets)


def mixture_rates(groups: Sequence[Group], sizes: Mapping[str, int]) -> Dict[str, float]:
    """Per-dataset sampling rates (summing to 1) from group rates and root sizes.

    Args:
      sizes: number of examples of every dataset of the mixture (the override wins).
    """
    rates: Dict[str, float] = {}
    for group in groups:
        overrides = dict(group.sizes)
        missing = [d for d in group.datasets if d not in sizes and d not in overrides]
        if missing:
            raise KeyError(f"mixture needs the sizes of {missing} (dataset not built or empty)")
        weights = dict(group.weights)
        roots = {d: weights.get(d, 1.0) * math.sqrt(overrides.get(d, sizes.get(d, 0))) for d in group.datasets}
        total = sum(roots.values())
        if total <= 0:
            raise ValueError(f"every dataset of the group {group.datasets} is empty")
        for d, root in roots.items():
            rates[d] = rates.get(d, 0.0) + group.rate * root / total
    norm = sum(rates.values())
    return {d: r / norm for d, r in rates.items()}


def override_rates(rates: Mapping[str, float], overrides: Mapping[str, float]) -> Dict[str, float]:
    """`rates` with some datasets' rates replaced (config.data.mixture_rates), renormalised to 1.

    A rate of 0 drops the dataset. Raises ValueError naming a dataset that is not in the
    mixture, a negative or non-numeric rate, or overrides that leave nothing to sample.
    """
    overrides = dict(overrides.items())  # a ConfigDict too
    strangers = sorted(set(overrides) - set(rates))
    if strangers:
        raise ValueError(f"config.data.mixture_rates names {strangers}, which the mixture does not hold; "
                         f"its datasets: {sorted(rates)}")
    out = dict(rates)
    for name, rate in overrides.items():
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise ValueError(f"config.data.mixture_rates[{name!r}] = {rate!r} is not a number") from None
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"config.data.mixture_rates[{name!r}] = {rate} must be a finite rate >= 0")
        out[name] = rate
    out = {d: r for d, r in out.items() if r > 0}
    if not out:
        raise ValueError("config.data.mixture_rates leaves every dataset of the mixture at rate 0")
    norm = sum(out.values())
    return {d: r / norm for d, r in out.items()}


class MixtureIndex:
    """Random-access global index -> (dataset position, element index); see module docstring.

    Args:
      rates: sampling rate per dataset (normalised here).
      lengths: number of examples per dataset, same order.
      seed: data seed.
      shuffle: read every dataset in a fresh seeded permutation per epoch (else in order).
      block: indices per allocation block.
    """

    def __init__(self, rates: Sequence[float], lengths: Sequence[int], seed: int, shuffle: bool = True,
                 block: int = 1024):
        rates = np.asarray(rates, np.float64)
        if rates.ndim != 1 or len(rates) != len(lengths) or len(rates) == 0:
            raise ValueError(f"MixtureIndex: {len(rates)} rates for {len(lengths)} datasets")
        if (rates < 0).any() or rates.sum() <= 0:
            raise ValueError(f"MixtureIndex: rates must be >= 0 with a positive sum, got {rates.tolist()}")
        if min(lengths) <= 0:
            raise ValueError(f"MixtureIndex: every dataset needs examples, lengths {list(lengths)}")
        self.rates = rates / rates.sum()
        self.lengths = np.asarray(lengths, np.int64)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.block = int(block)
        self._offsets = np.random.default_rng([self.seed, 0x3D7]).random(len(rates))
        # Readers move forward through blocks and epochs: remembering the last one is enough.
        self._cached_block: Tuple[int, tuple] = (-1, ())
        self._cached_perms: Dict[int, Tuple[int, np.ndarray]] = {}

    def _draws_before(self, b: int) -> np.ndarray:
        """int64[n_datasets]: draws of each dataset in blocks [0, b)."""
        return np.floor(b * self.block * self.rates + self._offsets).astype(np.int64)

    def _block_of(self, index: int) -> int:
        lo, hi = index // self.block, index // self.block + 1
        while self._draws_before(hi).sum() <= index:     # block totals vary by a few draws
            hi += 1
        while lo > 0 and self._draws_before(lo).sum() > index:
            lo -= 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._draws_before(mid).sum() <= index:
                lo = mid
            else:
                hi = mid
        return lo

    def _block(self, b: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(dataset per position, rank of that draw within its dataset in the block, draws before, start)."""
        if self._cached_block[0] == b:
            return self._cached_block[1]
        before = self._draws_before(b)
        counts = self._draws_before(b + 1) - before
        order = np.random.default_rng([self.seed, b]).permutation(np.repeat(np.arange(len(counts)), counts))
        rank = np.zeros(len(order), np.int64)
        for d in range(len(counts)):
            hits = np.flatnonzero(order == d)
            rank[hits] = np.arange(len(hits))
        self._cached_block = (b, (order, rank, before, int(before.sum())))
        return self._cached_block[1]

    def _permutation(self, dataset: int, epoch: int) -> np.ndarray:
        cached = self._cached_perms.get(dataset)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, dataset, epoch, 0x5EED]).permutation(self.lengths[dataset])
            cached = self._cached_perms[dataset] = (epoch, perm)
        return cached[1]

    def __getitem__(self, index: int) -> Tuple[int, int]:
        index = int(index)
        if index < 0:
            raise IndexError(f"MixtureIndex: negative index {index}")
        order, rank, before, start = self._block(self._block_of(index))
        d = int(order[index - start])
        k = int(before[d] + rank[index - start])        # how many draws of dataset d came earlier
        epoch, pos = divmod(k, int(self.lengths[d]))
        element = int(self._permutation(d, epoch)[pos]) if self.shuffle else pos
        return d, element
