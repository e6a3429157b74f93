"""PixMo sources: a parquet fixture per set, in the published HF schema, read into the right examples."""
import io
import os

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.image_cache import ImageCache
from data_pipelines.sources import pixmo

XY = pa.list_(pa.struct([("x", pa.float64()), ("y", pa.float64())]))


def png_bytes(color=(200, 10, 10), size=(8, 6)) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def write(folder, name, rows, schema):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(folder, name))


def url(i):
    return f"http://img.test/{i}.png"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA/<hf folder>/... for every set, and an image cache holding images 0..9 (10+ are 'dead')."""
    root = tmp_path_factory.mktemp("pixmo")
    cache = ImageCache(str(root / "images"))
    for i in range(10):
        cache.store(url(i), png_bytes((i, 0, 0)))
    d = str(root / "data")
    write(f"{d}/pixmo-cap/data", "train-00000-of-00001.parquet", [
        {"image_url": url(0), "caption": "A red square.", "transcripts": ["um a red", "red square"]},
        {"image_url": url(1), "caption": "Another.", "transcripts": ["t1"]},
        {"image_url": url(12), "caption": "Dead link.", "transcripts": []},
    ], pa.schema([("image_url", pa.string()), ("caption", pa.string()), ("transcripts", pa.list_(pa.string()))]))
    write(f"{d}/pixmo-ask-model-anything/data", "train-00000-of-00001.parquet", [
        {"image_url": url(0), "image_sha256": "a" * 64, "question": "What is it?", "answer": "A square."},
        {"image_url": url(0), "image_sha256": "a" * 64, "question": "How many squares?", "answer": "One."},
        {"image_url": url(2), "image_sha256": "b" * 64, "question": "Color?", "answer": "Red."},
    ], pa.schema([(c, pa.string()) for c in ("image_url", "image_sha256", "question", "answer")]))
    write(f"{d}/pixmo-cap-qa/data", "train-00000-of-00001.parquet", [
        {"image_url": url(3), "question": "Q1", "answer": "A1", "messages": ["Q1", "A1", "how many dogs?", "2"]},
        {"image_url": url(3), "question": "Q2", "answer": "A2", "messages": ["Q2", "A2"]},
    ], pa.schema([("image_url", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                  ("messages", pa.list_(pa.string()))]))
    many = [{"x": float(k), "y": 1.0} for k in range(41)]
    points_rows = [
        dict(image_url=url(4), image_sha256="c" * 64, points=[{"x": 250.0, "y": 20.0}], count=1,
             label="cat", collection_method="pointing"),
        dict(image_url=url(4), image_sha256="c" * 64, points=[], count=0, label="zebra",
             collection_method="pointing"),
        dict(image_url=url(4), image_sha256="c" * 64, points=many, count=41, label="dots",
             collection_method="pointing"),
        dict(image_url=url(5), image_sha256="d" * 64, points=[{"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0}],
             count=2, label="birds", collection_method="counting"),
        dict(image_url=url(6), image_sha256="e" * 64, points=[{"x": 5.0, "y": 5.0}], count=1,
             label="held out", collection_method="pointing"),
    ]
    write(f"{d}/pixmo-points/data", "train-00000-of-00002.parquet", points_rows[:3], pa.schema([
        ("image_url", pa.string()), ("image_sha256", pa.string()), ("points", XY), ("count", pa.int64()),
        ("label", pa.string()), ("collection_method", pa.string())]))
    write(f"{d}/pixmo-points/data", "train-00001-of-00002.parquet", points_rows[3:], pa.schema([
        ("image_url", pa.string()), ("image_sha256", pa.string()), ("points", XY), ("count", pa.int64()),
        ("label", pa.string()), ("collection_method", pa.string())]))
    masks = np.zeros((1, 3, 4), bool)
    masks[0, 1, 2] = True
    write(f"{d}/pixmo-points-eval/data", "test-00000-of-00001.parquet", [
        dict(image_url=url(6), image_sha256="e" * 64, label="held out", points=[{"x": 2.0, "y": 1.0}],
             masks=masks.tolist()),
        dict(image_url=url(7), image_sha256="f" * 64, label="nothing", points=[], masks=[]),
    ], pa.schema([("image_url", pa.string()), ("image_sha256", pa.string()), ("label", pa.string()),
                  ("points", XY), ("masks", pa.list_(pa.list_(pa.list_(pa.bool_()))))]))
    write(f"{d}/pixmo-point-explanations/data", "train-00000-of-00001.parquet", [
        dict(image_url=url(8), question=f"Why {k}?", parsed_response=f"Because <|POINT|> {k}.",
             alt_text=[f"alt{k}"], inline_text=[f"in{k}"], points=[[[10.0, 20.0], [30.0, 40.0]]])
        for k in range(3)] + [dict(image_url=url(8), question="Bad", parsed_response=None, alt_text=[],
                                   inline_text=[], points=[])],
        pa.schema([("image_url", pa.string()), ("question", pa.string()), ("parsed_response", pa.string()),
                   ("alt_text", pa.list_(pa.string())), ("inline_text", pa.list_(pa.string())),
                   ("points", pa.list_(pa.list_(pa.list_(pa.float64()))))]))
    count_schema = pa.schema([("image_url", pa.string()), ("image_sha256", pa.string()), ("count", pa.int32()),
                              ("points", pa.list_(pa.struct([("x", pa.float32()), ("y", pa.float32())]))),
                              ("label", pa.string())])
    write(f"{d}/pixmo-count/data", "train-00000-of-00001.parquet", [
        dict(image_url=url(9), image_sha256="9" * 64, count=2, points=[{"x": 3.0, "y": 4.0}, {"x": 1.0, "y": 2.0}],
             label="cups")], count_schema)
    write(f"{d}/pixmo-count/data", "validation-00000-of-00001.parquet", [
        dict(image_url=url(1), image_sha256="1" * 64, count=5, points=[], label="cars")], count_schema)
    docs_schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                             ("image_id", pa.string()),
                             ("questions", pa.struct([("question", pa.list_(pa.string())),
                                                      ("answer", pa.list_(pa.string()))]))])
    for t in pixmo.DOC_TYPES:
        write(f"{d}/pixmo-docs/{t}", "train-00000-of-00001.parquet", [
            dict(image={"bytes": png_bytes((k, 1, 1)), "path": None}, image_id=f"{t}-{k}",
                 questions={"question": [f"q{k}a", f"q{k}b"], "answer": [f"a{k}a", f"a{k}b"]}) for k in range(3)],
            docs_schema)
    write(f"{d}/pixmo-clocks/data", "train-00000-of-00001.parquet", [
        dict(example_id=0, watchface_id=11, watchface_name="plain", watch_time="07:57:39", time_format="With AM/PM",
             shows_seconds=True, hour_visible=1, minute_visible=1, second_visible=1, text="7:57:39 AM"),
        dict(example_id=1, watchface_id=12, watchface_name="bold", watch_time="12:05:00", time_format="Without AM/PM",
             shows_seconds=False, hour_visible=1, minute_visible=1, second_visible=-1, text="12:05")],
        pa.schema([("example_id", pa.int64()), ("watchface_id", pa.int64()), ("watchface_name", pa.string()),
                   ("watch_time", pa.string()), ("time_format", pa.string()), ("shows_seconds", pa.bool_()),
                   ("hour_visible", pa.int32()), ("minute_visible", pa.int32()), ("second_visible", pa.int32()),
                   ("text", pa.string())]))
    return d, str(root / "images")


def test_cap_groups_and_skips_dead_urls(data):
    d, images = data
    src = pixmo.load("pixmo_cap_with_transcripts", d, "train", images, n_val=0)
    src_val = pixmo.load("pixmo_cap_with_transcripts", d, "validation", images, n_val=0)
    assert len(src) == 2 and len(src_val) == 0 and src.stats["missing_images"] == 1
    ex = src[0]
    assert ex["image"] == ImageCache(images).path(url(0)) and ex["metadata"]["image_url"] == url(0)
    assert ex["message_list"][0] == {"text": "A red square.", "style": "long_caption"}
    assert ex["message_list"][1]["style"] == "transcript" and ex["message_list"][1]["text"] in ("um a red", "red square")
    assert src[0] == src[0]  # deterministic per index
    assert [m["style"] for m in pixmo.load("pixmo_cap", d, "train", images, n_val=0)[0]["message_list"]] == ["long_caption"]
    records, _ = pixmo.load_records("pixmo_cap", d, "train", images, n_val=0)
    only_transcripts = pixmo.PixmoSource("t", records, pixmo.example_fn("pixmo_cap", mode="transcripts"))
    transcripts = only_transcripts[0]["message_list"]
    assert [m["text"] for m in transcripts] == ["um a red", "red square"]


def test_validation_split_is_hash_based_and_disjoint(data):
    d, images = data
    train = pixmo.load("pixmo_cap", d, "train", images, n_val=1)
    val = pixmo.load("pixmo_cap", d, "validation", images, n_val=1)
    train_urls = {ex["metadata"]["image_url"] for ex in train}
    val_urls = {ex["metadata"]["image_url"] for ex in val}
    assert not train_urls & val_urls and len(train_urls | val_urls) == 2
    assert val_urls == pixmo.validation_keys([url(0), url(1), url(12)], 1) - {url(12)}


def test_ask_model_anything_prefixes_how_many(data):
    d, images = data
    src = pixmo.load("pixmo_ask_model_anything", d, "train", images, n_val=0)
    by_url = {ex["metadata"]["image_url"]: ex for ex in src}
    msgs = by_url[url(0)]["message_list"]
    assert by_url[url(0)]["metadata"]["image_sha256"] == "a" * 64
    assert msgs[0] == {"question": "What is it?", "answer": "A square.", "style": "user_qa"}
    assert msgs[1]["question"].endswith("How many squares?") and msgs[1]["question"] != "How many squares?"


def test_cap_qa_messages(data):
    d, images = data
    ex = pixmo.load("pixmo_cap_qa", d, "train", images, n_val=0)[0]
    assert [m["style"] for m in ex["message_list"]] == ["synthetic_qa", "synthetic_qa"]
    turns = ex["message_list"][0]["messages"]
    assert turns[:2] == ["Q1", "A1"] and turns[2].endswith("how many dogs?") and turns[3] == "2"


def test_points_variants_quirk_filters_and_holdout(data):
    d, images = data
    basic = pixmo.load("pixmo_points", d, "train", images, n_val=0)
    assert len(basic) == 1  # image 6 is a points-eval image, image 5 is high-frequency
    msgs = basic[0]["message_list"]
    assert [m["label"] for m in msgs] == ["cat", "zebra"]  # the 41-point row is dropped
    assert all(m["style"] == "point_count" for m in msgs)  # official inversion: counting=False -> point_count
    np.testing.assert_array_equal(msgs[0]["points"], [[250.0, 20.0]])  # > 100: pixels, as the card says
    assert msgs[1]["points"].shape == (0, 2) and "point_scale" not in msgs[0]
    counting = pixmo.load("pixmo_points_counting", d, "train", images, n_val=0)
    assert all(m["style"] == "pointing" for m in counting[0]["message_list"])
    high = pixmo.load("pixmo_points_high_freq", d, "train", images, n_val=0)
    assert len(high) == 1 and high[0]["message_list"][0]["label"] == "birds"
    assert high.stats["point_units"] == "percent" and high[0]["message_list"][0]["point_scale"] == 100
    forced = pixmo.load("pixmo_points_high_freq", d, "train", images, n_val=0, point_units="pixels")
    assert "point_scale" not in forced[0]["message_list"][0] and basic.stats["point_units"] == "pixels"
    assert high[0]["message_list"][0]["style"] == "point_count"
    assert pixmo.load("pixmo_points_high_freq_counting", d, "train", images, n_val=0)[0]["message_list"][0]["style"] == "pointing"
    no_holdout = pixmo.load("pixmo_points", d, "train", images, n_val=0, exclude_urls=())
    assert len(no_holdout) == 2  # without the eval hold-out, image 6 is back
    with pytest.raises(FileNotFoundError, match="pointing-eval"):
        pixmo.load("pixmo_points", os.path.join(d, "pixmo-cap"), "train", images, n_val=0)


def test_point_explanations_split_groups_and_drops_unparsed(data):
    d, images = data
    src = pixmo.load("pixmo_pointing_explanations", d, "train", images, n_val=0)
    assert [len(ex["message_list"]) for ex in src] == [2, 1]
    msg = src[0]["message_list"][0]
    assert msg["style"] == "point_qa" and msg["answer"] == "Because <|POINT|> 0."
    ann = msg["answer_annotations"][0]
    assert ann["inline_text"] == "in0" and ann["alt_text"] == "alt0"
    np.testing.assert_array_equal(ann["points"], [[10, 20], [30, 40]])
    assert len(pixmo.load("pixmo_pointing_explanations", d, "train", images, split_groups=False, n_val=0)) == 1


def test_count_splits_and_styles(data):
    d, images = data
    train = pixmo.load("pixmo_count", d, "train", images)[0]
    assert train["style"] == "pointing" and train["label"] == "cups" and train["metadata"]["count"] == 2
    np.testing.assert_array_equal(train["points"], [[3, 4], [1, 2]])
    val = pixmo.load("pixmo_count_counting", d, "validation", images)[0]
    assert val["style"] == "point_count" and "points" not in val and val["metadata"]["count"] == 5


def test_points_eval_masks(data):
    d, images = data
    src = pixmo.load("pixmo_points_eval", d, "test", images)
    assert len(src) == 2
    ex = src[0]
    assert ex["style"] == "pointing" and ex["label"] == "held out"
    masks = ex["metadata"]["masks"]
    assert masks.shape == (1, 3, 4) and masks.dtype == bool and masks[0, 1, 2] and masks.sum() == 1
    np.testing.assert_array_equal(ex["metadata"]["points"], [[2.0, 1.0]])
    assert src[1]["points"].shape == (0, 2) and src[1]["metadata"]["masks"].shape[0] == 0


@pytest.mark.parametrize("doc_type", pixmo.DOC_TYPES)
def test_docs_embedded_images(data, doc_type):
    d, _ = data
    src = pixmo.load(f"pixmo_docs_{doc_type}", d, "train")
    ex = src[2]
    assert PIL.Image.open(io.BytesIO(ex["image"])).getpixel((0, 0)) == (2, 1, 1)
    assert ex["metadata"] == {"image_id": f"{doc_type}-2"}
    assert ex["message_list"] == [{"question": "q2a", "answer": "a2a", "style": f"pixmo_docs_{doc_type}"},
                                  {"question": "q2b", "answer": "a2b", "style": f"pixmo_docs_{doc_type}"}]


def test_clocks_metadata(data):
    d, _ = data
    src = pixmo.load("pixmo_clocks", d, "train")
    first, second = src[0], src[1]
    assert "image" not in first and first["style"] == "clocks" and first["answer"] == "7:57:39 AM"
    assert (first["metadata"]["hour"], first["metadata"]["minute"], first["metadata"]["second"]) == (7, 57, 39)
    assert (second["metadata"]["hour"], second["metadata"]["second"]) == (0, -1)
    assert second["metadata"]["watchface_name"] == "bold"


def test_schema_errors_name_file_and_column(tmp_path):
    write(str(tmp_path / "data"), "train-0.parquet", [{"image_url": "u"}], pa.schema([("image_url", pa.string())]))
    (tmp_path / "pixmo-cap").symlink_to(tmp_path / "data")
    with pytest.raises(ValueError, match=r"train-0.parquet.*\['caption', 'transcripts'\] missing"):
        pixmo.load("pixmo_cap", str(tmp_path), "train", str(tmp_path / "img"))
    with pytest.raises(KeyError, match="unknown PixMo source"):
        pixmo.load("pixmo_nope", str(tmp_path), "train")


def test_image_urls_for_the_downloader(data):
    d, _ = data
    urls = pixmo.image_urls(os.path.join(d, "pixmo-points"))
    assert urls[0] == (url(4), "c" * 64) and len(urls) == 3


def test_sources_pickle_for_grain_workers(data):
    import pickle

    import grain
    d, images = data
    for name in ("pixmo_docs_tables", "pixmo_points_counting"):
        source = pixmo.load(name, d, "train", images, **({"n_val": 0} if "points" in name else {}))
        again = pickle.loads(pickle.dumps(source))
        assert repr(again) == repr(source) and again[0]["metadata"] == source[0]["metadata"]
        assert len(list(grain.MapDataset.source(source))) == len(source)
