"""Molmo2 sources: parquet fixtures in the published schemas, videos encoded here, media fetched from a
127.0.0.1 server through the bounded downloader; each bad row counted, never raised in a worker."""
import hashlib
import http.server
import io
import json
import os
import pickle
import threading

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import download as dl
from data_pipelines.image_cache import ImageCache, sniff_video
from data_pipelines.sources import molmo2, molmo2_media
from data_pipelines.sources.synthetic.video_shapes import encode_video

XY = pa.list_(pa.struct([("x", pa.float64()), ("y", pa.float64())]))


def write(folder, name, rows, schema=None):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(folder, name))


def make_video(path, n=6, fps=2):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encode_video(path, [np.full((16, 16, 3), 20 * i, np.uint8) for i in range(n)], fps)
    return str(path)


def png(i):
    out = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), (i, 0, 0)).save(out, format="PNG")
    return out.getvalue()


BODIES = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = BODIES.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    BODIES["/v/good.mp4"] = open(make_video(root / "good.mp4"), "rb").read()
    BODIES["/v/page"] = b"<html>video removed</html>"
    BODIES["/v/cut.mp4"] = BODIES["/v/good.mp4"][:200]  # an mp4 header, no frames
    for i in range(3):
        BODIES[f"/img/{i}.png"] = png(i)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


CONFIG = dl.FetchConfig(connect_timeout=1.0, read_timeout=0.5, deadline=3.0, max_attempts=1)


def test_videos_download_through_the_bounded_downloader(server, tmp_path):
    good = BODIES["/v/good.mp4"]
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"video_id": "yt_good", "url": f"{server}/v/good.mp4", "sha256": hashlib.sha256(good).hexdigest()},
            {"video_id": "yt_page", "url": f"{server}/v/page"},
            {"video_id": "yt_cut", "url": f"{server}/v/cut.mp4"},
            {"video_id": "yt_dead", "url": f"{server}/v/gone.mp4"},
            {"video_id": "yt_sha", "url": f"{server}/v/good.mp4?again", "sha256": "0" * 64}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    BODIES["/v/good.mp4?again"] = good
    cache_dir = str(tmp_path / "videos")
    argv = ["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "images"), "--video-manifest",
            str(manifest), "--video-cache", cache_dir, "--workers", "2", "--report", str(tmp_path / "r.json")]
    assert dl.main(argv) == 0
    counts = json.loads((tmp_path / "r.json").read_text())["manifest.jsonl"]
    assert counts == {"downloaded": 1, "html": 1, "bad_video": 1, "http_404": 1, "sha_mismatch": 1}
    assert dl.main(argv) == 0  # resumable: the good one is cached, the failures are remembered
    assert json.loads((tmp_path / "r.json").read_text())["manifest.jsonl"]["cached"] == 1
    index = molmo2_media.VideoIndex(cache_dir=cache_dir, manifest=str(manifest))
    assert open(index.lookup("yt_good"), "rb").read() == good
    assert index.lookup("yt_page") is None and index.lookup("never_listed") is None


def test_multi_image_urls_download(server, tmp_path):
    write(str(tmp_path / "data/Molmo2-MultiImageQA"), "train-00000-of-00001.parquet", [
        {"image_urls": [f"{server}/img/0.png", f"{server}/img/1.png"], "qa_pairs": {"question": ["q"], "answer": ["a"]}},
        {"image_urls": [f"{server}/img/2.png", f"{server}/img/9.png"], "qa_pairs": {"question": ["q"], "answer": ["a"]}}])
    argv = ["--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "images"), "--workers", "2",
            "--report", str(tmp_path / "r.json")]
    assert dl.main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == {"Molmo2-MultiImageQA": {"downloaded": 3, "http_404": 1}}


def test_video_folder_layouts_of_the_official_loaders(tmp_path):
    root = tmp_path / "videos"
    paths = {key: make_video(root / rel, n=2) for key, rel in {
        "yt1": "youtube-cc/youtube-cc-exist/yt1/some name.mp4",  # {video_id}/{video file}
        "yt2": "MammalNet/trimmed_video-2fps/yt2_2fps.mp4",  # 2 fps pointing copies
        "yt3": "LLaVA-Video-178K/x/activitynet/v_yt3.mp4",
        "sora2/clip": "generated_videos/sora2-2fps/clip_2fps.mp4",
        "clip9": "bdd100k/train/videos/clip9.mp4",
        "videos": "elsewhere/videos.mp4"}.items()}  # its own name wins over the folder "videos" above
    index = molmo2_media.VideoIndex(video_dir=str(root))
    assert {k: index.lookup(k) for k in paths} == paths
    assert index.lookup("missing") is None
    with pytest.raises(ValueError, match="need videos"):
        molmo2_media.VideoIndex()


def test_rle_masks_plain_and_compressed():
    # column-major runs 0,1: a 2x3 mask [[0, 1, 1], [1, 0, 1]] reads 0,1,1,0,1,1 down the columns
    want = np.array([[0, 1, 1], [1, 0, 1]], bool)
    assert (molmo2_media.decode_rle({"size": [2, 3], "counts": [1, 2, 1, 2]}) == want).all()
    # pycocotools strings, encoded by hand with maskApi.c rleToString: 40 -> "X1" (8 | 0x20, then 1);
    # from the fourth count on each is a delta to the count two back: [1, 4, 1, 1] -> "141" + chr(48 + 29)
    assert molmo2_media.rle_counts("X1") == [40]
    assert molmo2_media.rle_counts("141M") == [1, 4, 1, 1]
    assert molmo2_media.rle_counts("1114") == [1, 1, 1, 5]
    with pytest.raises(ValueError, match="cover 5 pixels"):
        molmo2_media.decode_rle({"size": [2, 3], "counts": [1, 4]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA/<HF folder> for every set, videos of ids a, b, c, clip1 in a folder ('dead' is missing)."""
    root = tmp_path_factory.mktemp("molmo2")
    videos = root / "videos"
    for vid in ("a", "b", "c"):
        make_video(videos / "youtube-cc/youtube-cc-kw" / vid / f"{vid}.mp4")
    make_video(videos / "sportsmot/train/videos/clip1.mp4")
    d = root / "data"
    cap = lambda vid, score, **c: {"video_id": vid, "annotation_score": score, "video_caption": c.get("short"),
                                   "merged_caption": c.get("merged"), "video_frame_merged_caption": c.get("long")}
    write(str(d / "Molmo2-Cap"), "train-00000-of-00001.parquet", [
        cap("a", 4, short="short a", long="long a"), cap("b", 2, short="low score"),
        cap("0OfUqrbRa2Y", 5, short="corrupt id"), cap("c", 3), cap("dead", 5, merged="no video"),
        cap(None, 5, short="no id")])
    mc = lambda vid, q: {"video_id": vid, "Question": q, "Answer": "yes", "NegativeAnswers": ["no", "maybe"],
                         "Category": "cat"}
    write(str(d / "Molmo2-VideoCapQA"), "CapQA-00000-of-00001.parquet", [
        mc("a", "q1"), mc("a", "q2"), mc("b", "q3"), mc("dead", "q4"), dict(mc("c", "q5"), Answer=None)])
    subtitle = [{"start": 0.0, "end": 1.5, "text": "hello"}]
    write(str(d / "Molmo2-VideoSubtitleQA"), "SubtitleQA-00000-of-00001.parquet",
          [dict(mc("a", "q1"), subtitle=subtitle), dict(mc("a", "q2"), subtitle=subtitle)])
    write(str(d / "Molmo2-AskModelAnything"), "HumanQA-00000-of-00001.parquet", [
        {"video_id": "a", "question": " why? ", "answer": " because "}, {"video_id": "a", "question": "q", "answer": "  "},
        {"video_id": "b", "question": "q", "answer": "  "}])
    frames = pa.list_(XY)
    point_schema = pa.schema([("video_id", pa.string()), ("video_source", pa.string()), ("clip_start", pa.float64()),
                              ("clip_end", pa.float64()), ("video_duration", pa.float64()), ("label", pa.string()),
                              ("count", pa.int64()), ("two_fps_timestamps", pa.list_(pa.float64())),
                              ("points", frames), ("question", pa.string()), ("category", pa.string()),
                              ("annotator_unsure", pa.bool_())])
    point = lambda vid, label, count, ts, pts, dur=30.0, clip=(None, None): {
        "video_id": vid, "video_source": "youtube", "clip_start": clip[0], "clip_end": clip[1], "video_duration": dur,
        "label": label, "count": count, "two_fps_timestamps": ts, "points": pts,
        "question": f"How many {label}?", "category": "object", "annotator_unsure": False}
    write(str(d / "Molmo2-VideoPoint/object"), "train-00000-of-00001.parquet", [
        point("a", "dog", 2, [1.0, 0.5], [[{"x": 50, "y": 10}, {"x": 20, "y": 30}], [{"x": 5, "y": 5}]]),
        point("a", "cat", 0, [], []),
        point("b", "car", 1, [70.5], [[{"x": 1, "y": 2}]], dur=100.0, clip=(60.0, 100.0)),  # long: its clip
        point("b", "bus", 1, [10.0], [[{"x": 1, "y": 2}]], dur=100.0),  # long without a clip
        point("c", "cow", 1, [20.0], [[{"x": 1, "y": 2}]], dur=100.0, clip=(30.0, 60.0)),  # clip misses it
        point("c", "ant", 30, [1.0], [[{"x": 1, "y": 2}]]),  # out of the 0-5 bucket
        point("c", "bee", 1, [0.3], [[{"x": 1, "y": 2}]]),  # off the 2 fps grid
        point("c", "fly", 1, [1.0], [[{"x": None, "y": 2}]])], point_schema)  # a point without x
    write(str(d / "Molmo2-VideoPoint/animal"), "train-00000-of-00001.parquet", [
        point("dead", "elk", 1, [1.0], [[{"x": 1, "y": 2}]])], point_schema)
    track = lambda i, fps, sfps, clip="clip1": {
        "id": i, "video": "orig", "clip": clip, "fps": fps, "video_dataset": "sportsmot", "expression": "the runner",
        "width": 16, "height": 16, "mask_id": ["7", "3"], "sampling_fps": sfps,
        "frame_trajectories": [
            {"frame": 6, "time": 1.0, "points": [{"id": 3, "point": [4.0, 5.0], "occluded": False}]},
            {"frame": 0, "time": 0.0, "points": [{"id": 7, "point": [1.0, 2.0], "occluded": False},
                                                 {"id": 99, "point": [0.0, 0.0], "occluded": True}]}]}
    write(str(d / "molmo2-track-instruction/track"), "train-00000-of-00001.parquet",
          [track("t0", 6, 2), track("t1", 25, 2), track("t2", 6, 1, clip="dead"),
           dict(track("t3", 6, 2), frame_trajectories=[{"frame": 0, "time": 0.0, "points": [
               {"id": 7, "point": None, "occluded": False}]}])])
    return {"data": str(d), "videos": str(videos), "root": root}


def load(data, name, split="train", **kw):
    return molmo2.load(name, data["data"], split, video_dir=data["videos"], **kw)


def test_corrupt_videos_are_counted_at_load_when_checked(data, tmp_path):
    videos = tmp_path / "videos"
    make_video(videos / "a.mp4")
    (videos / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short" * 10)
    source = molmo2.load("molmo2_syn_captions_qa", data["data"], "CapQA", video_dir=str(videos), check_videos=True)
    assert len(source) == 1 and source[0]["video"].endswith("a.mp4")
    assert source.stats["corrupt_videos"] == 1 and source.stats["skipped"]["video_not_a_video_file"] == 1


def test_captions(data):
    source = load(data, "molmo2_cap")
    assert len(source) == 1 and source.stats["missing_videos"] == 1
    assert source.stats["skipped"] == {"null_video_id": 1, "below_min_score": 1, "corrupt_video_id": 1,
                                       "no_caption": 1}
    example = source[0]
    assert example["video"].endswith("a/a.mp4") and example["metadata"]["video_id"] == "a"
    assert example["message_list"] == [{"text": "short a", "style": "video_short_caption"},
                                       {"text": "long a", "style": "video_long_caption"}]


def test_multiple_choice_with_the_answer_at_a_drawn_position(data):
    source = load(data, "molmo2_syn_captions_qa", "CapQA")
    assert len(source) == 2 and source.stats["skipped"] == {"null_Answer": 1} and source.stats["missing_videos"] == 1
    messages = source[0]["message_list"]
    assert [m["question"] for m in messages] == ["q1", "q2"]
    for m in messages:
        assert m["style"] == "video_multiple_choice" and m["options"][m["answer_idx"]] == "yes"
        assert sorted(m["options"]) == ["maybe", "no", "yes"]
    positions = {load_msg["answer_idx"] for i in range(40)
                 for load_msg in source.get(0, np.random.RandomState(i))["message_list"]}
    assert positions == {0, 1, 2}
    sub = load(data, "molmo2_syn_captions_subtitle_qa", "SubtitleQA")[0]
    assert sub["subtitle"] == {(0.0, 1.5): "hello"} and len(sub["message_list"]) == 2


def test_human_qa_strips_and_drops_empty_answers(data):
    source = load(data, "molmo2_human_qa", "HumanQA")
    assert len(source) == 1 and source.stats["skipped"] == {"empty_answer": 2}
    assert source[0]["message_list"] == [{"question": "why?", "answer": "because", "style": "user_qa"}]


def test_video_points_clip_sort_and_styles(data):
    source = load(data, "molmo2_video_point_minmax_0_5")
    assert source.stats["skipped"] == {"long_video_without_clip": 1, "invalid_clip": 1, "count_out_of_range": 1,
                                       "timestamp_off_grid": 1, "bad_points": 1}
    assert source.stats["missing_videos"] == 1 and len(source) == 2
    short, long = sorted((source[i] for i in range(2)), key=lambda e: e["metadata"]["video_id"])
    assert short["metadata"]["clip_start_time"] == 0.0 and short["metadata"]["clip_end_time"] == 30.0
    dog, cat = short["message_list"]
    np.testing.assert_array_equal(dog["points"][0], [[20, 30], [50, 10]])  # sorted by (x, y)
    assert dog["timestamps"] == [1.0, 0.5] and dog["count"] == 2 and dog["point_scale"] == 100
    assert cat["points"] == [] and cat["timestamps"] == []
    # a long video is shown in its clip: times relative to the clip start, on the 0.5 s grid
    assert long["metadata"]["clip_start_time"] == 60.0 and long["message_list"][0]["timestamps"] == [10.5]
    styles = {m["style"] for i in range(30) for m in source.get(0, np.random.RandomState(i))["message_list"]}
    assert styles == {"video_point_count", "video_point"}
    for i in range(30):
        for m in source.get(0, np.random.RandomState(i))["message_list"]:
            assert ("question" in m) == (m["style"] == "video_point_count")


def test_tracking_messages(data):
    source = load(data, "molmo2_video_track")
    assert len(source) == 1 and source.stats["skipped"] == {"fps_not_multiple_of_sampling_fps": 1, "bad_trajectory": 1}
    assert source.stats["missing_videos"] == 1
    example = source[0]
    assert example["video"].endswith("clip1.mp4") and example["sampling_fps"] == 2
    (message,) = example["message_list"]
    assert message["style"] == "video_point_track_per_frame" and message["label"] == "the runner"
    # frames sorted; object ids -> their index in mask_id; unknown ids dropped
    assert message["points"] == [{"frame": 0, "time": 0.0, "points": {0: {"point": [1.0, 2.0], "occluded": False}}},
                                 {"frame": 6, "time": 1.0, "points": {1: {"point": [4.0, 5.0], "occluded": False}}}]
    assert example["metadata"]["sampler_overrides"] == {"frame_sample_mode": "fps", "min_fps": 2}
    ground = load(data, "molmo2_video_track_ground")
    assert ground[0]["message_list"][0]["style"] == "video_point_ground_start_end"


def test_multi_image_qa(data, tmp_path):
    cache = ImageCache(str(tmp_path / "images"))
    urls = [f"http://img.test/{i}.png" for i in range(6)]
    for u in urls[:5]:
        cache.store(u, png(1))
    qa = {"question": ["How many dogs?", "What is it?"], "answer": ["2", "a dog"]}
    folder = tmp_path / "data/Molmo2-MultiImageQA"
    write(str(folder), "train-00000-of-00001.parquet", [
        {"image_urls": urls[:2], "qa_pairs": qa}, {"image_urls": urls[:1], "qa_pairs": qa},
        {"image_urls": urls[4:6], "qa_pairs": qa}, {"image_urls": urls[:5] + urls[:1], "qa_pairs": qa},
        {"image_urls": None, "qa_pairs": qa}])
    source = molmo2.load("pixmo_multi_image_qa_multi_only_max5", str(tmp_path / "data"), "train",
                         image_dir=str(tmp_path / "images"))
    assert len(source) == 1 and source.stats["missing_images"] == 1
    assert source.stats["skipped"] == {"image_count_out_of_range": 2, "null_image_urls": 1}
    example = source[0]
    assert example["image"] == [cache.path(u) for u in urls[:2]]
    (how_many, what) = example["message_list"]
    assert how_many["question"].endswith("How many dogs?") and how_many["question"] != "How many dogs?"
    assert what == {"question": "What is it?", "answer": "a dog", "style": "correction_qa"}
    with pytest.raises(ValueError, match="image_dir"):
        molmo2.load("pixmo_multi_image_qa", str(tmp_path / "data"), "train")


def test_missing_columns_are_one_error_and_sources_pickle(data, tmp_path):
    write(str(tmp_path / "Molmo2-Cap"), "train-00000-of-00001.parquet", [{"video_id": "a"}])
    with pytest.raises(ValueError, match=r"columns \['annotation_score'"):
        molmo2.load("molmo2_cap", str(tmp_path), "train", video_dir=data["videos"])
    with pytest.raises(KeyError, match="unknown Molmo2 source"):
        molmo2.spec("molmo2_nope")
    source = load(data, "molmo2_video_point_minmax_0_5")
    clone = pickle.loads(pickle.dumps(source))
    assert repr(clone) == repr(source) and clone[1]["metadata"] == source[1]["metadata"]


def test_eval_sets_decode_masks(data, tmp_path):
    rle = {"size": [2, 2], "counts": [1, 3]}
    write(str(tmp_path / "Molmo2-VideoPointEval"), "val-00000-of-00001.parquet", [{
        "video_id": "a", "video_source": "youtube", "label": "dog", "height": 2, "width": 2, "video_duration": 3.0,
        "two_fps_timestamps": [0.5, 1.0], "points": [{"x": 1.0, "y": 0.0}, {"x": 1.0, "y": 1.0}],
        "masks": [[{"frame_id": 1, "rle": rle}], [{"frame_id": 2, "rle": rle}]]}])
    write(str(tmp_path / "Molmo2-VideoCountEval"), "val-00000-of-00001.parquet", [{
        "video_id": "b", "video_source": "youtube", "clip_start": 0.0, "clip_end": 3.0, "count": 4, "label": "dog",
        "question": "How many dogs?", "category": "animal", "video_duration": 3.0}])
    point = molmo2.load("molmo2_video_point_eval", str(tmp_path), "val", video_dir=data["videos"])[0]
    assert point["metadata"]["gt_abs_triplets"] == [(0.5, 1.0, 0.0), (1.0, 1.0, 1.0)]
    (first, second) = point["metadata"]["gt_abs_masks"]
    assert list(first) == [0.5] and list(second) == [1.0]
    np.testing.assert_array_equal(first[0.5], [[False, True], [True, True]])
    count = molmo2.load("molmo2_video_count_eval", str(tmp_path), "val", video_dir=data["videos"])[0]
    assert count["answer"] == "4" and count["metadata"]["subset"] == "animal" and count["style"] == "video_count"


def test_cache_sniffs_videos(tmp_path):
    cache = ImageCache(str(tmp_path), sniff=sniff_video)
    cache.store("http://v/1", BODIES.get("/v/good.mp4") or open(make_video(tmp_path / "x.mp4"), "rb").read())
    cache.store("http://v/2", b"HTTPError 404")  # what the official downloader leaves in a cache file
    assert cache.lookup("http://v/1") and cache.lookup("http://v/2") is None


def test_pixmo_as_molmo2_trains_on_it(tmp_path):
    """pixmo_points_train: expressions over 60 points dropped, the rest cut into examples of at most 60
    points, each example twice (point_count, then pointing); points-eval images held out."""
    cache = ImageCache(str(tmp_path / "images"))
    urls = [f"http://img.test/{i}.png" for i in range(3)]
    for u in urls:
        cache.store(u, png(2))
    pts = lambda n: [{"x": 1.0 + k % 50, "y": 2.0} for k in range(n)]
    rows = [dict(image_url=urls[0], image_sha256="c" * 64, points=pts(n), count=n, label=f"l{n}",
                 collection_method="pointing") for n in (30, 25, 10, 61)]
    rows.append(dict(image_url=urls[1], image_sha256="d" * 64, points=pts(1), count=1, label="held out",
                     collection_method="pointing"))
    d = tmp_path / "data"
    write(str(d / "pixmo-points/data"), "train-00000-of-00001.parquet", rows, pa.schema([
        ("image_url", pa.string()), ("image_sha256", pa.string()), ("points", XY), ("count", pa.int64()),
        ("label", pa.string()), ("collection_method", pa.string())]))
    write(str(d / "pixmo-points-eval/data"), "test-00000-of-00001.parquet", [{"image_url": urls[1]}])
    write(str(d / "pixmo-count/data"), "train-00000-of-00001.parquet", [
        dict(image_url=urls[2], image_sha256="e" * 64, count=1, points=[{"x": 3.0, "y": 4.0}], label="cups")],
        pa.schema([("image_url", pa.string()), ("image_sha256", pa.string()), ("count", pa.int32()),
                   ("points", XY), ("label", pa.string())]))
    write(str(d / "pixmo-cap-qa/data"), "train-00000-of-00001.parquet", [
        {"image_url": urls[2], "question": "Q1", "answer": "A1"}])
    images = str(tmp_path / "images")
    points = molmo2.load("pixmo_points_train", str(d), "train", image_dir=images, n_val=0)
    got = [[(m["label"], m["style"]) for m in points[i]["message_list"]] for i in range(len(points))]
    assert got == [[("l30", "point_count"), ("l25", "point_count")], [("l30", "pointing"), ("l25", "pointing")],
                   [("l10", "point_count")], [("l10", "pointing")]]
    count = molmo2.load("pixmo_count_train", str(d), "train", image_dir=images)
    assert [count[i]["style"] for i in range(len(count))] == ["point_count", "pointing"]
    cap_qa = molmo2.load("pixmo_cap_qa_as_user_qa", str(d), "train", image_dir=images, n_val=0)
    assert cap_qa[0]["message_list"] == [{"messages": ["Q1", "A1"], "style": "user_qa"}]


def test_every_example_of_every_video_source_comes_out_of_grain(data):
    import grain
    names = [n for n in molmo2.SOURCES if n not in molmo2.IMAGE_SETS and "eval" not in n]
    splits = {"molmo2_syn_captions_qa": "CapQA", "molmo2_syn_captions_subtitle_qa": "SubtitleQA",
              "molmo2_human_qa": "HumanQA"}
    empty = []
    for name in names:
        source = load(data, name, splits.get(name, "train"))
        examples = list(grain.MapDataset.source(source).seed(1).shuffle())
        assert len(examples) == len(source), name
        assert all(os.path.isfile(e["video"]) and e["message_list"] for e in examples), name
        empty += [name] if not examples else []
    assert empty == ["molmo2_video_point_minmax_6_25"]  # the fixture has no 6-25 point row
