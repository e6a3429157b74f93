"""Synthetic PixMo-style generators: determinism, metadata the evaluators rely on, answer formats."""
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipelines.sources.synthetic import (CaptionSource, ChartSource, ClockSource, ShapesSource, make_synthetic,
                                              render_clock_row)
from data_pipelines.sources.synthetic.captions import NUMBER_WORDS
from data_pipelines.sources.synthetic.clocks import (WITH_AM_PM, WITHOUT_AM_PM, ClockFace, clock_answer, draw_clock,
                                                     hand_angles)
from data_pipelines.sources.synthetic.shapes import COLORS, SHAPES

SOURCES = [ClockSource(50, 112, seed=3), ShapesSource(50, 112, seed=3, task="pointing"),
           ShapesSource(50, (96, 128), seed=3, task="mixed"), CaptionSource(50, 112, seed=3),
           ChartSource(50, 160, seed=3)]


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("src", SOURCES, ids=repr)
def test_deterministic_per_seed_and_index(src):
    again = type(src)(**{**vars_of(src)})
    assert repr(again) == repr(src)
    for i in (0, 7, 49):
        assert _equal(src[i], again[i]), f"{src!r}[{i}] differs between two constructions"
        assert _equal(src[i], src[i])
    assert not np.array_equal(src[0]["image"], src[1]["image"])
    other_seed = type(src)(**{**vars_of(src), "seed": 4})
    assert not np.array_equal(src[0]["image"], other_seed[0]["image"])
    image = src[5]["image"]
    assert image.dtype == np.uint8 and image.shape == (*src.image_size, 3)
    with pytest.raises(IndexError):
        src[50]


def vars_of(src):
    args = dict(num_examples=src.num_examples, image_size=src.image_size, seed=src.seed)
    args.update(src._repr_fields())
    return args


@pytest.mark.parametrize("task", ["pointing", "counting"])
def test_points_lie_inside_their_masks(task):
    src = ShapesSource(200, 112, seed=11, task=task, max_count=6)
    counts, absent = set(), 0
    for i in range(len(src)):
        ex = src[i]
        meta = ex["metadata"]
        points, masks = meta["points"], meta["masks"]
        assert points.shape == (meta["count"], 2) and masks.shape == (meta["count"], 112, 112)
        assert ex["style"] == {"pointing": "pointing", "counting": "point_count"}[task]
        assert ex["label"] == meta["label"]
        for (x, y), mask in zip(points, masks):
            # the pointing metric looks the point up with Python round(), as here
            assert mask[int(round(y)), int(round(x))], f"example {i}: point ({x}, {y}) outside its mask"
        assert masks.sum(0, dtype=int).max(initial=0) <= 1   # instances do not overlap
        counts.add(meta["count"])
        absent += meta["count"] == 0
    assert 0 in counts and max(counts) >= 4          # counts span 0..N
    assert 0.05 < absent / len(src) < 0.3           # "not present" questions at about absent_rate


def test_labels_name_the_pointed_shapes():
    src = ShapesSource(40, 112, seed=0, task="pointing")
    for i in range(len(src)):
        ex = src[i]
        words = ex["label"].split()
        assert words[-1] in {s + "s" for s in SHAPES} | {"shapes"}
        assert len(words) == 1 or words[0] in COLORS


def test_mixed_scenes_carry_several_annotations():
    ex = ShapesSource(5, 112, seed=0, task="mixed", annotations=(3, 3))[2]
    assert len(ex["message_list"]) == 3
    for ann in ex["message_list"]:
        assert ann["style"] in ("pointing", "point_count") and ann["points"].shape[1] == 2


def test_clock_answer_matches_the_official_loader():
    assert clock_answer(0, 5, 9, False, WITH_AM_PM) == ("The time shown is 12:05 AM", dict(hour=0, minute=5, second=-1))
    assert clock_answer(12, 30, 0, True, WITH_AM_PM)[0] == "The time shown is 12:30:00 AM"  # official quirk
    assert clock_answer(19, 57, 39, True, WITH_AM_PM)[0] == "The time shown is 7:57:39 PM"
    assert clock_answer(19, 57, 39, False, WITHOUT_AM_PM) == ("The time shown is 7:57", dict(hour=7, minute=57,
                                                                                              second=-1))
    assert clock_answer(3, 4, 5, True, "The time is not shown") == (
        "The time is not shown in the image.", dict(hour=-1, minute=-1, second=-1))
    with pytest.raises(ValueError, match="time_format"):
        clock_answer(3, 4, 5, True, "24 hour clock")


def test_clock_examples_answer_their_metadata():
    src = ClockSource(30, 112, seed=1, seconds_rate=0.5, am_pm_rate=0.5)
    pattern = re.compile(r"The time shown is (\d{1,2}):(\d{2})(?::(\d{2}))?( [AP]M)?")
    for i in range(len(src)):
        ex = src[i]
        assert ex["style"] == "clocks" and ex["question"] == "What time is being shown?"
        m = pattern.fullmatch(ex["answer"])
        assert m, ex["answer"]
        meta = ex["metadata"]
        assert int(m[2]) == meta["minute"]
        assert (m[3] is not None) == meta["shows_seconds"] and int(m[3] or -1) == meta["second"]
        assert int(m[1]) % 12 == meta["hour"] % 12


def test_clock_hands_point_at_the_time():
    """3:00 on a plain dial: the hour hand points right, the minute hand up, nothing points left."""
    face = ClockFace(dial=(255, 255, 255), ink=(0, 0, 0), rim=(255, 255, 255), rim_frac=0.05, numerals="none",
                     ticks="none", hand_shape="bar", second_color=(0, 0, 0))
    img = Image.new("RGB", (200, 200), (255, 255, 255))
    draw_clock(ImageDraw.Draw(img), 100, 100, 90, face, hand_angles(3, 0, 0, (True, True, False)))
    dark = np.asarray(img).mean(-1) < 128
    assert dark[100, 130] and dark[100, 135]      # hour hand, right of the centre
    assert dark[40, 100] and dark[50, 100]        # minute hand, above the centre
    assert not dark[100, 60] and not dark[150, 100]


def test_render_pixmo_clocks_row():
    row = dict(example_id="x1", watchface_id="face-7", watch_time="19:57:39", time_format="With AM/PM",
               shows_seconds=True, hour_visible=7, minute_visible=57, second_visible=39)
    ex = render_clock_row(row, image_size=128)
    assert ex["answer"] == "The time shown is 7:57:39 PM"
    assert ex["metadata"]["hour"] == 19 and ex["metadata"]["second"] == 39
    assert ex["image"].shape == (128, 128, 3)
    assert np.array_equal(ex["image"], render_clock_row(row, image_size=128)["image"])
    hidden = render_clock_row({**row, "second_visible": -1}, image_size=128)["image"]
    assert not np.array_equal(ex["image"], hidden)
    with pytest.raises(ValueError, match="watch_time"):
        render_clock_row({"example_id": "bad", "watch_time": "noon"})


def test_captions_count_every_shape():
    src = CaptionSource(20, 112, seed=2)
    for i in range(len(src)):
        caption = src[i]["caption"]
        total = NUMBER_WORDS.index(re.match(r"A drawing of (\w+) shapes?\.", caption)[1])
        groups = [NUMBER_WORDS.index(g) for g in re.findall(r"There (?:is|are) (\w+) ", caption)]
        assert sum(groups) == total > 0, caption


def test_chart_answers_follow_the_drawn_data():
    src = ChartSource(30, 168, seed=5, questions=1)
    for i in range(len(src)):
        ex = src[i]
        chart = ex["metadata"]
        values = dict(zip(chart["labels"], chart["values"]))
        q, a = ex["question"], ex["answer"]
        assert ex["style"] == "pixmo_docs_charts" and chart["answers"] == [a]
        if q.startswith("What is the value of "):
            assert int(a) == values[q[len("What is the value of "):-1]]
        elif q == "Which bar has the highest value?":
            assert values[a] == max(values.values())
        elif q == "Which bar has the lowest value?":
            assert values[a] == min(values.values())
        elif q == "How many bars are there?":
            assert int(a) == len(values)
    packed = ChartSource(3, 168, seed=5, questions=3)[0]["message_list"]
    assert len(packed) == 3 and len({m["question"] for m in packed}) == 3


def test_make_synthetic_rejects_unknown_kind():
    assert isinstance(make_synthetic("clocks", 3, 64), ClockSource)
    with pytest.raises(KeyError, match="tables"):
        make_synthetic("tables", 3)


def test_scene_options_set_categories_and_sizes():
    """max_categories / radius (ShapesSource and CaptionSource) shape the scenes; the defaults keep
    the same random draws, so default data is unchanged by the options' existence."""
    src = ShapesSource(30, 112, seed=4, task="pointing", max_categories=1, radius=(0.1, 0.12))
    for i in range(len(src)):
        ex = src[i]
        masks = ex["metadata"]["masks"]
        areas = masks.sum(axis=(1, 2))
        # one category: a question about a present colour or kind finds every shape of the scene
        assert all(np.pi * (0.1 * 112) ** 2 * 0.3 < a < np.pi * (0.12 * 112 + 1) ** 2 for a in areas)
    caption = CaptionSource(10, 112, seed=4, max_categories=1)
    assert all(len(re.findall(r"There (?:is|are) ", caption[i]["caption"])) == 1 for i in range(10))
    default, explicit = ShapesSource(5, 112, seed=1), ShapesSource(5, 112, seed=1, max_categories=3,
                                                                  radius=(0.045, 0.085))
    assert all(_equal(default[i], explicit[i]) for i in range(5))
    with pytest.raises(ValueError, match="max_categories"):
        ShapesSource(5, 112, max_categories=0)
    with pytest.raises(ValueError, match="radius"):
        ShapesSource(5, 112, radius=(0.2, 0.1))


def test_plain_clock_faces_keep_the_times():
    """plain_faces draws every clock on the one PLAIN_FACE; the times and placements are the random ones."""
    plain, varied = ClockSource(8, 112, seed=6, plain_faces=True), ClockSource(8, 112, seed=6)
    for i in range(8):
        a, b = plain[i], varied[i]
        assert a["answer"] == b["answer"] and a["metadata"] == b["metadata"]
        pixels = a["image"].reshape(-1, 3).astype(int)
        white = (pixels >= 250).all(1).mean()
        assert white > 0.15, white     # the white dial covers a good part of every image


def test_centred_clocks_keep_the_times_and_fill_the_middle():
    """centred puts every dial in the middle at nearly full size; the times stay those of the seed."""
    centred, loose = ClockSource(8, 112, seed=6, plain_faces=True, centred=True), ClockSource(8, 112, seed=6, plain_faces=True)
    ys, xs = np.mgrid[:112, :112]
    for i in range(8):
        a, b = centred[i], loose[i]
        assert a["answer"] == b["answer"] and a["metadata"] == b["metadata"]
        white = (a["image"].astype(int) >= 250).all(-1)
        assert white.mean() > 0.5, white.mean()                  # the dial covers most of the image
        assert abs(xs[white].mean() - 55.5) < 3 and abs(ys[white].mean() - 55.5) < 3   # around its centre
