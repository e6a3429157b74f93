"""The grain pipeline: exact resume (with and without worker processes), per-host sharding, bad
examples skipped and counted."""
import dataclasses
import io
import json
import re

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipelines import formatting, multicrop, packing, pipeline
from data_pipelines.tokenizer import load_tokenizer

CROP = multicrop.CropConfig(crop_size=112, patch_size=14, overlap_margins=(2, 2), max_crops=2)


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir / "molmo-7b-d-hf")


def demo_config(num_workers=0):
    return ml_collections.ConfigDict(dict(
        stage="sft",
        model=dict(vision=dict(image_size=(112, 112), patch_size=14), connector=dict(pool_h=2),
                   llm=dict(vocab_size=152064)),
        train=dict(global_batch=4),
        data=dict(mixture="synthetic", tokenizer="", seq_len=256, max_crops=2, seed=3, num_workers=num_workers,
                  overlap_margins=(2, 2), synthetic_image_size=112, synthetic_examples=500, prefetch=1)))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_continues_identically(tokenizer, num_workers):
    pipe = pipeline.make_pipeline(demo_config(num_workers), tokenizer=tokenizer)
    it = iter(pipe)
    first = take(it, 2)
    state = json.loads(json.dumps(it.get_state()))   # what the checkpoint stores
    expected = take(it, 2)
    restored = iter(pipeline.make_pipeline(demo_config(num_workers), tokenizer=tokenizer))
    restored.set_state(state)
    got = take(restored, 2)
    assert restored.stats == it.stats
    assert isinstance(restored, grain.DatasetIterator)   # grain.checkpoint handlers accept it
    it.close()
    restored.close()
    assert_same_batches(expected, got)
    batch = first[0]
    assert set(batch) == set(pipeline.BATCH_KEYS)
    assert batch["input_ids"].shape == (4, 256) and batch["images"].shape == (4, 3, 64, 588)
    assert not np.array_equal(first[0]["input_ids"], first[1]["input_ids"])


class ListSource:
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __repr__(self):
        return f"ListSource(n={len(self)})"


def parts_pipeline(tokenizer, source, **kwargs):
    pack = packing.PackConfig(seq_len=64, max_crops=CROP.max_crops, crop_patches=CROP.crop_patches ** 2,
                              patch_dim=CROP.patch_dim, tokens_per_crop=CROP.tokens_side ** 2,
                              image_token_ids=dataclasses.astuple(tokenizer.image_token_ids))
    preprocess = pipeline.Preprocessor(tokenizer, CROP, formatting.FINETUNED)
    return pipeline.make_pipeline_from_parts({"list": source}, {"list": 1.0}, preprocess, pack, **kwargs)


def example_ids(batches, tokenizer):
    ids = []
    for batch in batches:
        for row in batch["input_ids"]:
            ids += [int(m) for m in re.findall(r"record (\d+)", tokenizer.decode(row[row >= 0]))]
    return ids


def test_two_hosts_read_disjoint_shards_covering_the_epoch(tokenizer):
    n = 24
    source = ListSource([{"style": "user_qa", "messages": [f"record {i}", "ok"]} for i in range(n)])
    shards = []
    for host in (0, 1):
        pipe = parts_pipeline(tokenizer, source, seed=5, batch_size=4, num_examples=n, process_index=host,
                              process_count=2)
        shards.append(example_ids(list(iter(pipe)), tokenizer))
    assert len(shards[0]) == len(shards[1]) == n // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(n))


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_examples_are_skipped_and_counted(tokenizer, tmp_path):
    good = {"image": png_bytes(), "style": "vqa2", "question": "What colour?", "answer": "red"}
    corrupt = dict(good, image=png_bytes()[:40])
    missing = dict(good, image=str(tmp_path / "gone.jpg"))
    many_points = {"image": png_bytes(), "style": "pointing", "label": "dots",
                   "points": np.ones((41, 2), np.float32)}
    unknown_style = {"image": png_bytes(), "style": "vqa2"}  # no question: the formatter rejects it
    # skips are reported with the next kept example, so the bad ones do not come last
    source = ListSource([good] * 5 + [corrupt, missing, many_points, unknown_style] + [good] * 6)
    pipe = parts_pipeline(tokenizer, source, seed=0, batch_size=11, num_examples=len(source), shuffle=False)
    it = iter(pipe)
    batches = list(it)
    assert len(batches) == 1 and it.stats.examples == 11
    assert it.stats.skipped == {"corrupt_image": 1, "missing_file": 1, "too_many_points": 1, "too_long": 0,
                                "malformed": 1}

    strict = parts_pipeline(tokenizer, source, seed=0, batch_size=2, num_examples=len(source), shuffle=False,
                            max_skip_rate=0.1, skip_check_after=4)
    source.examples = [corrupt, good, good, corrupt, good, good] * 3
    with pytest.raises(pipeline.TooManyBadExamples, match=r"corrupt_image=\d+.*max_skip_rate=10.0%"):
        list(iter(strict))


def test_unexpected_errors_are_not_hidden(tokenizer):
    good = {"image": png_bytes(), "style": "vqa2", "question": "q", "answer": "a"}
    source = ListSource([dict(good, image=object()), good])
    broken = ListSource([None])   # a source bug, not a bad example: it must stop the run
    with pytest.raises(AttributeError):
        list(iter(parts_pipeline(tokenizer, broken, seed=0, batch_size=1, num_examples=1)))
    # an unsupported image object is a bad example (ImageDecodeError), not a crash
    it = iter(parts_pipeline(tokenizer, source, seed=0, batch_size=1, num_examples=2, shuffle=False))
    assert len(list(it)) == 1 and it.stats.skipped["corrupt_image"] == 1


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_demo_config_builds_its_pipeline(tokenizer, stage):
    from configs import demo
    config = demo.get_config(stage)
    it = iter(pipeline.make_pipeline(config, tokenizer=tokenizer))
    batch = next(it)
    it.close()
    d = config.data
    crop = pipeline.crop_config(config)
    assert batch["input_ids"].shape == (config.train.global_batch, d.seq_len)
    assert batch["images"].shape == (config.train.global_batch, pipeline.crops_per_row(config),
                                     crop.crop_patches ** 2, crop.patch_dim)
    assert pipeline.crops_per_row(config) == d.get("examples_per_row", 1) * (1 + d.max_crops)
    assert (batch["loss_masks"] > 0).any(axis=1).all()     # every example trains on something
    texts = [tokenizer.decode(row[row >= 0]) for row in batch["input_ids"]]
    if stage == "pretrain":   # captioner format: length-hinted caption prompts, no chat roles
        assert all("long_caption" in t and "User:" not in t for t in texts), texts
    else:
        assert all("User:" in t and "Assistant:" in t for t in texts), texts


def test_pixmo_clocks_rows_get_drawn():
    row = dict(example_id="c1", watchface_id="w9", watch_time="19:57:39", time_format="With AM/PM",
               shows_seconds=True, hour_visible=7, minute_visible=57, second_visible=39, text="7:57:39 PM")
    example = {"style": "clocks", "question": "What time is being shown?", "answer": row["text"], "metadata": row}
    drawn = pipeline.DrawClocks(image_size=96, seed=0)(example)
    assert drawn["image"].shape == (96, 96, 3) and drawn["answer"] == row["text"]
    with_image = dict(example, image=np.zeros((8, 8, 3), np.uint8))
    assert pipeline.DrawClocks(image_size=96, seed=0)(with_image) is with_image


def test_synthetic_options_reach_the_generators():
    """config.data.synthetic_options[kind] are the generator's constructor arguments (lists become
    tuples, as ml_collections stores them); an argument the generator lacks is named."""
    data = ml_collections.ConfigDict(dict(synthetic_examples=10, synthetic_image_size=64, synthetic_options=dict(
        shapes=dict(max_categories=1, radius=[0.1, 0.2]), clocks=dict(plain_faces=True))))
    shapes = pipeline.build_source("synthetic_counting", data, 0)
    assert (shapes.task, shapes.max_categories, shapes.radius) == ("counting", 1, (0.1, 0.2))
    assert pipeline.build_source("synthetic_clocks", data, 0).plain_faces
    assert pipeline.build_source("synthetic_captions", data, 0).max_categories == 3   # no "captions" options
    data.synthetic_options = dict(shapes=dict(max_cats=1))
    with pytest.raises(ValueError, match=r"synthetic_options\.shapes.*max_cats"):
        pipeline.build_source("synthetic_pointing", data, 0)


def test_mixture_rates_override_reweights_and_drops_datasets(tokenizer):
    """config.data.mixture_rates replaces some datasets' rates (0 drops one): only pointing
    questions are drawn here; a name outside the mixture or a negative rate is refused by name."""
    config = demo_config()
    config.data.mixture_rates = dict(synthetic_points=0, synthetic_counting=0, synthetic_clocks=0,
                                     synthetic_captions=0.0, synthetic_pointing=2)
    pipe = pipeline.make_pipeline(config, tokenizer=tokenizer)
    assert pipe.datasets == {"synthetic_pointing": 1.0}
    it = iter(pipe)
    texts = [tokenizer.decode(row[row >= 0]) for b in take(it, 3) for row in b["input_ids"]]
    it.close()
    assert all(("<point" in t or "There are none." in t) and "Counting the" not in t for t in texts), texts
    config.data.mixture_rates = dict(synthetic_pointing=1, no_such_set=0.5)
    with pytest.raises(ValueError, match="no_such_set"):
        pipeline.make_pipeline(config, tokenizer=tokenizer)
    config.data.mixture_rates = dict(synthetic_pointing=-1)
    with pytest.raises(ValueError, match="synthetic_pointing.*>= 0"):
        pipeline.make_pipeline(config, tokenizer=tokenizer)
