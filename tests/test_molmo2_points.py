"""Molmo2's html-v2 point / track text (data_pipelines/molmo2_points.py) and its use in Molmo2 predict.

The expected strings are worked out by hand from the official `UnifiedPointFormatter` (allenai/molmo2
olmo/preprocessing/point_formatter.py, html-v2); a parity test also runs the official module itself,
read from a git clone of allenai/molmo2 named by MOLMO2_OFFICIAL_GIT, with its two light imports
stubbed (`parse_timestamp` taken from the official olmo/util.py, DataFormatter.format_output_timestamp
from data_formatter.py, by ast). Without that variable (CI cannot fetch the official code) those
tests skip saying so; with it, a clone that cannot be read or a module that no longer imports fails.
"""
import ast
import importlib.util
import io
import logging
import os
import subprocess
import sys
import tarfile
import types
import typing
from datetime import datetime

import numpy as np
import pytest

from data_pipelines import molmo2_points as mp
from molmo_jax.inference import drawing
from molmo_jax.inference.drawing import PointGroup, VideoPointGroup

# ---------------------------------------------------------------------------------------------
# Writing: hand-derived strings


def test_image_points_sorted_by_x_then_y_after_scaling():
    text = mp.format_image_points([(30, 40), (10, 20), (10, 5)], [100, 100], "cat")
    assert text == 'Counting the <points coords="1 1 100 050 2 100 200 3 300 400">cat</points> shows a total of 3.'


def test_image_points_in_pixels_and_percent():
    assert mp.format_image_points([(320, 240)], [640, 480], "dog", mode="point") == \
        '<points coords="1 1 500 500">dog</points>'
    assert mp.format_image_points(np.array([[25.0, 75.0]]), 100, "dog", mode="pointing") == \
        '<points coords="1 1 250 750">dog</points>'


def test_rounding_is_half_to_even_and_sorting_follows_the_rounded_values():
    # 6.25 % -> 62.5 per-mille -> 62; 18.75 % -> 187.5 -> 188 (Python round, exact binary halves)
    assert mp.format_image_points([(6.25, 18.75)], 100, "a", mode="point") == '<points coords="1 1 062 188">a</points>'
    # x 10.04 and 10.01 both round to 100: the tie is broken by y, not by the unrounded x
    assert mp.format_image_points([(10.01, 50), (10.04, 20)], 100, "a", mode="point") == \
        '<points coords="1 1 100 200 2 100 500">a</points>'


def test_alt_text_and_modes():
    assert mp.format_image_points([(30, 40)], 100, "cat", alt_text="a cat", mode="point") == \
        '<points alt="a cat" coords="1 1 300 400">cat</points>'
    # alt is written whenever given, even equal to the label
    assert mp.format_image_points([(30, 40)], 100, "cat", alt_text="cat", mode="point") == \
        '<points alt="cat" coords="1 1 300 400">cat</points>'
    two = [(10, 10), (20, 20)]
    tag = '<points coords="1 1 100 100 2 200 200">cats</points>'
    assert mp.format_image_points(two, 100, "cats", mode="point_count") == f"Counting the {tag} shows a total of 2."
    assert mp.format_image_points(two, 100, "cats", mode="count_then_point") == f"There are 2 {tag}."
    assert mp.format_image_points(two, 100, "cats", mode="count_point") == f"There are 2 {tag}."
    assert mp.format_image_points(two, 100, "cats", mode="count") == "2"
    assert mp.format_image_points(two, 100, "cats", mode=None) == tag
    for mode in ("point", "count", "point_then_count"):
        assert mp.format_image_points([], 100, "cats", mode=mode) == "There are none."
    with pytest.raises(NotImplementedError):
        mp.format_image_points(two, 100, "cats", mode="bogus")


def test_random_sort_order_numbers_the_shuffled_points():
    points = [(10, 10), (20, 20), (30, 30), (40, 40)]
    order = np.random.default_rng(3).permutation(4)
    expected = " ".join(f"{k + 1} {points[i][0] * 10:03d} {points[i][1] * 10:03d}" for k, i in enumerate(order))
    assert mp.format_image_points(points, 100, "a", mode="point", sort_order="random",
                                  rng=np.random.default_rng(3)) == f'<points coords="1 {expected}">a</points>'


def test_scale_point_clamps_only_x_out_of_range_with_y_inside():
    assert mp.scale_point((120, 50), 100) == (1000, 500)      # x clamped
    assert mp.scale_point((-5, 50), 100) == (0, 500)
    assert mp.scale_point((50, 120), 100) == (500, 1200)      # official quirk: y is not clamped
    assert mp.scale_point((120, 130), 100) == (1200, 1300)    # nor both
    assert mp.scale_point((64, 48), [640, 480]) == (100, 100)


def test_multi_image_points_number_on_across_images():
    text = mp.format_multi_image_points([1, 3], [[(50, 50), (10, 10)], [(99.95, 0.04)]], [[100, 100], [200, 100]],
                                        "dog", mode="count_then_point")
    # image 3 is 200 units wide: 99.95 / 200 -> 499.75 -> 500; 0.04 % -> 0.4 -> 0 ("000")
    assert text == 'There are 3 <points coords="1 1 100 100 2 500 500;3 3 500 000">dog</points>.'
    with pytest.raises(AssertionError):
        mp.format_multi_image_points([1], [[(1, 1)], [(2, 2)]], [100], "dog")


def test_video_points_per_timestamp():
    text = mp.format_video_points([0.5, 1.0, 2.25], [[(50, 50), (10, 10)], [], [(20, 30)]], 100, "ball")
    # an empty frame keeps its key ("1.0 "); 2.25 -> round(2.25, 1) = 2.2 (binary 2.25 is exact: half to even)
    assert text == 'Counting the <points coords="0.5 1 100 100 2 500 500;1.0 ;2.2 3 200 300">ball</points> shows a total of 3.'
    assert mp.format_video_points([], [], 100, "ball") == "There are none."
    assert mp.format_video_points([1.0], [[]], 100, "ball") == "There are none."


def test_video_timestamps_sft_and_default_formatters():
    assert mp.format_video_points([2], [[(50, 50)]], 100, "b", mode="point") == '<points coords="2 1 500 500">b</points>'
    assert mp.format_video_points([2], [[(50, 50)]], 100, "b", mode="point", format_timestamp=mp.default_timestamp) \
        == '<points coords="2.0 1 500 500">b</points>'
    assert mp.sft_timestamp(3.14159) == "3.1" and mp.default_timestamp(3.14159) == "3.1"
    assert mp.sft_timestamp("01:02.50") == "62.5" and mp.sft_timestamp("7") == "7.0"
    assert mp.parse_timestamp("1:01:02.50") == 3662.5 and mp.parse_timestamp("not:a time") == "not:a time"


def _frame(time, **points):
    """A track frame; keyword o<id>=(x, y) or (x, y, occluded)."""
    out = {}
    for name, p in points.items():
        out[int(name[1:])] = dict(point=list(p[:2]), occluded=p[2]) if len(p) > 2 else dict(point=list(p))
    return dict(time=time, frame=round(time * 10), points=out)


def test_tracks_in_time_order_objects_renumbered_by_first_appearance():
    frames = [_frame(1.0, o7=(60, 10), o3=(20, 50)), _frame(0.5, o3=(25, 55), o7=(70, 10)),
              _frame(1.5, o7=(10, 10), o3=(20, 20, True)), _frame(2.0)]
    # 0.5 first: 3 at (250, 550) sorts before 7 at (700, 100) -> 3 is 1, 7 is 2; occluded 3 and the
    # empty frame skipped
    assert mp.format_video_tracks(frames, [100, 100], "people") == \
        '<tracks coords="0.5 1 250 550 2 700 100;1.0 1 200 500 2 600 100;1.5 2 100 100">people</tracks>'


def test_tracks_frame_sorted_by_new_id_not_by_position():
    frames = [_frame(0.0, o0=(1, 1)), _frame(0.5, o8=(5, 5), o0=(50, 50))]
    # object 8 is new in frame 0.5 -> id 2 although it sorts first by (x, y)
    assert mp.format_video_tracks(frames, 100, "fish") == \
        '<tracks coords="0.0 1 010 010;0.5 1 500 500 2 050 050">fish</tracks>'


def test_tracks_start_end_by_list_position():
    frames = [_frame(0.0, o1=(10, 10)), _frame(0.5, o1=(20, 20), o2=(50, 50)), _frame(1.0, o1=(30, 30), o2=(60, 60)),
              _frame(1.5, o2=(70, 70))]
    assert mp.format_video_tracks(frames, 100, "x", start_end=True) == \
        '<tracks coords="0.0 1 100 100;0.5 2 500 500;1.0 1 300 300;1.5 2 700 700">x</tracks>'
    # first / last by position, not time (official quirk): the earliest frame (1.0) is dropped
    frames = [_frame(2.0, o1=(10, 10)), _frame(1.0, o1=(20, 20)), _frame(3.0, o1=(30, 30))]
    assert mp.format_video_tracks(frames, 100, "x", start_end=True) == \
        '<tracks coords="2.0 1 100 100;3.0 1 300 300">x</tracks>'


def test_tracks_from_initial_points_keep_whole_frames():
    frames = [_frame(0.5, o5=(10, 10), o9=(90, 90)), _frame(1.0, o5=(20, 20), o9=(80, 80)), _frame(1.5, o9=(70, 70))]
    initial = [dict(id=5, time=0.5, frame=5, point=[10, 10])]
    # only 1.0 has object 5 after its start; the frame keeps object 9 too (official quirk)
    assert mp.format_video_tracks(frames, 100, "x", from_initial_points=initial) == \
        '<tracks coords="1.0 1 200 200 2 800 800">x</tracks>'


def test_tracks_empty():
    assert mp.format_video_tracks([], 100, "x") == "No tracks available."
    assert mp.format_video_tracks([_frame(0.5, o1=(1, 1, True)), _frame(1.0)], 100, "x") == ""


# ---------------------------------------------------------------------------------------------
# Reading


def test_extract_points_in_pixels():
    text = 'Counting the <points coords="1 1 100 050 2 300 400">cat</points> shows a total of 2.'
    assert mp.extract_points(text, 640, 480) == [(64.0, 24.0), (192.0, 192.0)]
    assert mp.extract_multi_image_points(text, 640, 480) == [(1.0, 64.0, 24.0), (1.0, 192.0, 192.0)]
    assert mp.extract_multi_image_points(text, 640, 480, extract_ids=True) == \
        [(1.0, "1", 64.0, 24.0), (1.0, "2", 192.0, 192.0)]


def test_extract_drops_out_of_range_and_reads_every_tag():
    text = ('<points alt="x" coords="1 1 1001 500 2 1000 1000 3 999 1500">a</points> and '
            '<tracks coords="0.5 7 500 500">b</tracks>')
    assert mp.extract_multi_image_points(text, 100, 200, extract_ids=True) == \
        [(1.0, "2", 100.0, 200.0), (0.5, "7", 50.0, 100.0)]


def test_extract_malformed_text():
    assert mp.extract_points("no points", 10, 10) == []
    assert mp.extract_points('<points coords="1 1 50 50">a</points>', 10, 10) == []         # 2-digit values
    assert mp.extract_points('<points coords="1 1 100 x00">a</points>', 10, 10) == []        # not a coords string
    assert mp.extract_points('<points coords="1 1 100 100" alt="a">a</points>', 10, 10) == []  # coords not last
    assert mp.extract_points('<point x="10.0" y="20.0" alt="a">a</point>', 10, 10) == []     # v1 is not html-v2
    assert mp.extract_points('<points coords="1 1 100 100/>', 10, 10) == []                  # unclosed quote
    assert mp.extract_points('<points coords="1 1 100 100"/>', 10, 10) == [(1.0, 1.0)]      # self-closing
    # a truncated answer keeps its whole points, the "ID X Y" pattern is found anywhere in a frame
    assert mp.extract_points('<points coords="1 1 100 100 2 300">a</points>', 10, 10) == [(1.0, 1.0)]
    assert mp.extract_points('<points coords="1 1 100 100\t2 3 500 500">a</points>', 10, 10) == [(1.0, 1.0), (5.0, 5.0)]


def test_extract_multi_image_with_sizes_per_image():
    text = '<points coords="1 1 100 200 2 300 400;2 3 999 1000 4 500 1001">a</points>'
    assert mp.extract_multi_image_points(text, [100, 200], [100, 200]) == \
        [(1, 10.0, 20.0), (1, 30.0, 40.0), (2, 199.8, 200.0)]
    # official quirks: key 0 takes the last image's size; a non-integer key raises
    assert mp.extract_multi_image_points('<points coords="0 1 500 500">a</points>', [10, 20], [10, 20]) == [(0, 10.0, 10.0)]
    with pytest.raises(ValueError):
        mp.extract_multi_image_points('<points coords="0.5 1 500 500">a</points>', [10], [10])


def test_extract_video_points_and_tracks():
    text = '<points coords="0.5 1 100 100 2 500 500;1.0 ;2.2 3 200 300">ball</points>'
    assert mp.extract_video_points(text, 100, 100) == [(0.5, 10.0, 10.0), (0.5, 50.0, 50.0), (2.2, 20.0, 30.0)]
    text = '<tracks coords="0.75 1 100 100 1 200 200 2 300 300;0.25 2 400 400;0.75 3 999 999">x</tracks>'
    # the duplicate object 1 keeps its first point; frame = round(t * fps), half to even
    assert mp.extract_tracks(text, 10, 10, video_fps=2) == [
        dict(time=0.25, frame=0, points={"2": dict(point=[4.0, 4.0])}),
        dict(time=0.75, frame=2, points={"1": dict(point=[1.0, 1.0]), "2": dict(point=[3.0, 3.0]),
                                          "3": dict(point=[9.99, 9.99])}),
    ]
    assert mp.extract_tracks("There are none.", 10, 10, 2) == []


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_image_and_multi_image():
    points = [(12.8, 400.0), (600.0, 24.0), (320.0, 240.0)]
    text = mp.format_image_points(points, [640, 480], "a")
    got = sorted(mp.extract_points(text, 640, 480))
    assert np.allclose(got, sorted(points), atol=0.5 * 640 / 1000)
    text = mp.format_multi_image_points([1, 2], [[(10, 20)], [(300, 30), (5, 5)]], [[100, 100], [400, 300]], "b")
    # (5, 5) on 400 x 300: 12.5 -> 12 (half to even), 16.7 -> 17 per-mille -> (4.8, 5.1) pixels
    got = mp.extract_multi_image_points(text, [100, 400], [100, 300])
    assert [k for k, _, _ in got] == [1, 2, 2]
    assert np.allclose([(x, y) for _, x, y in got], [(10, 20), (4.8, 5.1), (300, 30)])


def test_round_trip_video_points_and_tracks():
    text = mp.format_video_points([0.0, 0.5], [[(10, 20), (5, 5)], [(70, 80)]], 100, "c")
    assert mp.extract_video_points(text, 200, 100) == [(0.0, 10.0, 5.0), (0.0, 20.0, 20.0), (0.5, 140.0, 80.0)]
    frames = [_frame(0.0, o4=(100, 50), o2=(300, 200)), _frame(0.5, o2=(320, 210)), _frame(1.0, o4=(110, 60))]
    text = mp.format_video_tracks(frames, [640, 480], "d")
    tracks = mp.extract_tracks(text, 640, 480, video_fps=10)
    assert [(t["time"], t["frame"]) for t in tracks] == [(0.0, 0), (0.5, 5), (1.0, 10)]
    # object 4 sorts first at 0.0 -> "1", object 2 -> "2"
    assert tracks[0]["points"].keys() == {"1", "2"} and tracks[1]["points"].keys() == {"2"}
    assert tracks[2]["points"].keys() == {"1"}
    assert np.allclose(tracks[2]["points"]["1"]["point"], [110, 60], atol=0.5)


# ---------------------------------------------------------------------------------------------
# Parity with the official module

OFFICIAL_GIT = os.environ.get("MOLMO2_OFFICIAL_GIT", "")  # a clone (or bare mirror) of allenai/molmo2


def _function_from(source: str, name: str, namespace: dict, cls: str = None):
    """A top-level function (or a method of class `cls`) of `source`, compiled alone in `namespace`."""
    body = ast.parse(source).body
    if cls:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], []), name, "exec"), namespace)
    return namespace[name]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(official point_formatter module, DataFormatter.format_output_timestamp bound as in SFT)."""
    files = ["olmo/preprocessing/point_formatter.py", "olmo/util.py", "olmo/preprocessing/data_formatter.py"]
    if not OFFICIAL_GIT:
        pytest.skip("MOLMO2_OFFICIAL_GIT is not set: no clone of allenai/molmo2 to compare with")
    archive = subprocess.run(["git", "-C", OFFICIAL_GIT, "archive", "HEAD", *files], capture_output=True,
                             check=True, timeout=60).stdout
    root = tmp_path_factory.mktemp("molmo2src")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root)
    read = lambda f: (root / f).read_text()
    ns = {"datetime": datetime, "logging": logging, "Union": typing.Union}
    parse_timestamp = _function_from(read("olmo/util.py"), "parse_timestamp", ns)
    stubs = {name: types.ModuleType(name) for name in
             ("olmo", "olmo.util", "olmo.data", "olmo.data.academic_video_track_datasets", "olmo.preprocessing")}
    stubs["olmo.util"].parse_timestamp = parse_timestamp
    stubs["olmo.data.academic_video_track_datasets"].PointTrack = dict
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        name = "olmo.preprocessing.point_formatter"
        spec = importlib.util.spec_from_file_location(name, root / f"{name.replace('.', '/')}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        method = _function_from(read("olmo/preprocessing/data_formatter.py"), "format_output_timestamp",
                                dict(ns, parse_timestamp=parse_timestamp), cls="DataFormatter")
    except Exception as e:  # a changed official module: fail, naming why
        pytest.fail(f"the official point_formatter does not import with stubs: {type(e).__name__}: {e}")
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    settings = types.SimpleNamespace(output_timestamp_mode="seconds", seconds_decimal_places=1)
    return module, lambda t: method(settings, t)


def _random_points(rng, n, scale):
    """n points over the image and a little outside it, rounded to 0-2 decimals (ties after scaling)."""
    w, h = scale if isinstance(scale, list) else (scale, scale)
    points = np.round(rng.uniform(-0.05, 1.05, (n, 2)) * [w, h], int(rng.integers(0, 3)))
    return [tuple(float(v) for v in p) for p in points]


def test_parity_with_the_official_formatter(official):
    module, sft_format = official
    for timestamps, ours_format in ((sft_format, mp.sft_timestamp), (module.DefaultTimestampFormatter(),
                                                                      mp.default_timestamp)):
        theirs = module.UnifiedPointFormatter.build_for_format("html-v2", timestamps)
        rng = np.random.default_rng(0)
        for case in range(300):
            scale = [float(rng.integers(50, 900)), float(rng.integers(50, 900))] if case % 2 else 100
            mode = ["point", "point_then_count", "count_then_point", "count", None, "pointing", "point_count"][case % 7]
            points = _random_points(rng, int(rng.integers(0, 6)), scale)
            alt = "an alt" if case % 5 == 0 else None
            assert mp.format_image_points(points, scale, "lbl", alt, mode) == \
                theirs.format_image_points(points, scale, "lbl", alt, mode)
            shuffled = module.UnifiedPointFormatter(timestamps, sort_order="random", image_sep=";")
            assert mp.format_image_points(points, scale, "lbl", alt, mode, sort_order="random",
                                          rng=np.random.default_rng(case)) == \
                shuffled.format_image_points(points, scale, "lbl", alt, mode, rng=np.random.default_rng(case))

            n = int(rng.integers(1, 4))
            scales = [[float(rng.integers(50, 900))] * 2 for _ in range(n)]
            frames = [_random_points(rng, int(rng.integers(0, 4)), s) for s in scales]
            indices = sorted(rng.choice(8, n, replace=False) + 1)
            assert mp.format_multi_image_points(indices, frames, scales, "lbl", alt, mode) == \
                theirs.format_multi_image_points(indices, frames, scales, "lbl", alt, mode)

            times = sorted(rng.choice(40, n, replace=False) * 0.25 + (case % 3 == 0))
            times = [int(t) for t in times] if case % 4 == 0 else times
            frames = [_random_points(rng, int(rng.integers(0, 4)), 100) for _ in times]
            text = mp.format_video_points(times, frames, 100, "lbl", alt, mode, format_timestamp=ours_format)
            assert text == theirs.format_video_points(times, frames, 100, "lbl", alt, mode)

            tracks = []
            for t in rng.choice(20, int(rng.integers(0, 6)), replace=False) * 0.5:
                objects = rng.choice(6, int(rng.integers(0, 4)), replace=False)
                tracks.append(dict(time=float(t), frame=int(t * 2), points={
                    int(o): dict(point=list(_random_points(rng, 1, scale)[0]), occluded=bool(rng.random() < 0.2))
                    for o in objects}))
            initial = [dict(id=int(o), time=float(rng.choice(10) * 0.5)) for o in rng.choice(6, 2, replace=False)]
            for kwargs, official_kwargs in (({}, {}), (dict(start_end=True), dict(start_end_only=True)),
                                            (dict(from_initial_points=initial),
                                             dict(from_initial_points=initial, single_point_track=True))):
                ours = mp.format_video_tracks(tracks, scale, "lbl", format_timestamp=ours_format, **kwargs)
                assert ours == theirs.format_video_tracks(tracks, scale, "lbl", **official_kwargs)
                w, h = (scale, scale) if scale == 100 else scale
                assert mp.extract_tracks(ours, w, h, 2) == theirs.extract_tracks(ours, w, h, 2)


def test_parity_of_extraction_on_noisy_text(official):
    module, _ = official
    theirs = module.UnifiedPointFormatter.build_for_format("html-v2")
    rng = np.random.default_rng(1)
    alphabet = list("0123456789 .;,:\t") + ["10", "100", "999", "1000", "1001", " 1 ", ";0.5 ", "x"]
    for _ in range(500):
        coords = "".join(rng.choice(alphabet, int(rng.integers(0, 30))))
        tag = rng.choice(["points", "tracks"])
        text = f'Counting the <{tag} alt="a" coords="{coords}">lbl</{tag}> and <points coords="1 1 500 500"/>'
        w, h = float(rng.integers(1, 900)), float(rng.integers(1, 900))
        assert _outcome(mp.extract_multi_image_points, text, w, h, True) == \
            _outcome(theirs.extract_multi_image_points, text, w, h, True)
        assert _outcome(mp.extract_points, text, w, h) == _outcome(theirs.extract_points, text, w, h)
        assert _outcome(mp.extract_tracks, text, w, h, 3) == _outcome(theirs.extract_tracks, text, w, h, 3)
    # the official key parse raises on a key like "1..5" (kept)
    with pytest.raises(ValueError):
        mp.extract_points('<points coords="1..5 1 500 500">a</points>', 10, 10)


def _outcome(f, *args):
    """f(*args), or the type of the exception it raises."""
    try:
        return f(*args)
    except Exception as e:
        return type(e)


# ---------------------------------------------------------------------------------------------
# Molmo2 predict: html-v2 answers as PointGroups, video points on the frames they name

def test_image_answer_groups_in_percent():
    text = ('Counting the <points coords="1 1 100 050 2 300 400">cats</points> shows a total of 2. '
            'And <points alt="a dog" coords="1 1 1000 1001 2 999 000"></points>')
    assert drawing.find_molmo2_points(text) == [PointGroup("cats", [(10.0, 5.0), (30.0, 40.0)]),
                                                PointGroup("a dog", [(99.9, 0.0)])]
    # every image's points, as the official extract_points; a self-closing tag has no label
    assert drawing.find_molmo2_points('<points coords="1 1 500 500;2 2 250 250"/>') == \
        [PointGroup("", [(50.0, 50.0), (25.0, 25.0)])]


def test_v1_answers_are_the_fallback():
    v1 = '<point x="25.0" y="50.0" alt="ball">ball</point>'
    assert drawing.find_molmo2_points(v1) == drawing.find_points(v1) == [PointGroup("ball", [(25.0, 50.0)])]
    assert drawing.find_molmo2_points(v1, video=True) == [PointGroup("ball", [(25.0, 50.0)])]
    # an html-v2 tag wins over v1 text in the same answer
    assert drawing.find_molmo2_points(v1 + ' <points coords="1 1 100 100">b</points>') == \
        [PointGroup("b", [(10.0, 10.0)])]
    assert drawing.find_molmo2_points("There are none.") == []


def test_malformed_html_v2_tags():
    # a key the official parser fails on: that tag is skipped, not the answer
    text = '<points coords="1..5 1 500 500">a</points> <points coords="1 1 500 500">b</points>'
    assert drawing.find_molmo2_points(text) == [PointGroup("b", [(50.0, 50.0)])]
    # coords that are no coords: no html-v2 tag; v1 reads the tag as a group without points
    assert drawing.find_molmo2_points('<points coords="1 1 5o0 500">a</points>') == [PointGroup("a", [])]
    # all points out of range: the group stays, empty (as v1 keeps a tag whose points are dropped)
    assert drawing.find_molmo2_points('<points coords="1 1 1500 500">a</points>') == [PointGroup("a", [])]


def test_video_answer_points_and_tracks_carry_their_times():
    text = 'Counting the <points coords="0.5 1 100 100 2 500 500;1.0 ;2.2 3 200 300">ball</points> shows a total of 3.'
    assert drawing.find_molmo2_points(text, video=True) == [
        VideoPointGroup("ball", [(10.0, 10.0), (50.0, 50.0), (20.0, 30.0)], [0.5, 0.5, 2.2])]
    text = '<tracks coords="0.5 10 250 550 2 700 100;1.0 10 200 500 10 900 900 2 600 100;1.5 2 100 100">people</tracks>'
    # one group per object, ids in numeric order; object 10 named twice at 1.0 keeps its first point
    assert drawing.find_molmo2_points(text, video=True) == [
        VideoPointGroup("people 2", [(70.0, 10.0), (60.0, 10.0), (10.0, 10.0)], [0.5, 1.0, 1.5]),
        VideoPointGroup("people 10", [(25.0, 55.0), (20.0, 50.0)], [0.5, 1.0])]
    # an image answer reads a tracks tag as plain points
    assert drawing.find_molmo2_points('<tracks coords="0.5 1 100 100;1.0 1 200 200">x</tracks>') == \
        [PointGroup("x", [(10.0, 10.0), (20.0, 20.0)])]


def test_frame_of_times():
    timestamps = [0.0, 0.5, 1.0, 1.5]
    times = [0.5, 0.7, 0.76, 2.0, -0.2, 1.74, 1.76]
    assert drawing.frame_of_times(times, timestamps).tolist() == [1, 1, 2, -1, 0, 3, -1]
    assert drawing.frame_of_times([3.04, 3.1], [3.0]).tolist() == [0, -1]  # one frame: 0.05 s either side
    assert drawing.frame_of_times([1.0], []).tolist() == [-1]
    assert drawing.frame_of_times([], timestamps).tolist() == []


def _color(image, xy):
    return image.convert("RGB").getpixel(xy)


def test_draw_frames_puts_timed_points_on_their_frames():
    frames = [np.zeros((40, 40, 3), np.uint8) for _ in range(3)]
    red, green = (255, 59, 48), (52, 199, 89)  # the first two group colours
    groups = [VideoPointGroup("", [(25.0, 25.0), (75.0, 75.0)], [0.0, 1.0]), PointGroup("", [(50.0, 50.0)])]
    drawn = drawing.draw_frames(iter(frames), groups, timestamps=[0.0, 0.5, 1.0])
    assert len(drawn) == 3
    assert _color(drawn[0], (10, 10)) == red and _color(drawn[0], (30, 30)) == (0, 0, 0)
    assert _color(drawn[1], (10, 10)) == (0, 0, 0) and _color(drawn[1], (30, 30)) == (0, 0, 0)
    assert _color(drawn[2], (30, 30)) == red and _color(drawn[2], (10, 10)) == (0, 0, 0)
    # the untimed group is on every frame, in its own colour even where the timed group is empty
    assert all(_color(image, (20, 20)) == green for image in drawn)
    # no timestamps: timed points are drawn nowhere
    assert _color(drawing.draw_frames(frames[:1], groups)[0], (10, 10)) == (0, 0, 0)
