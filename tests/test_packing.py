"""Packing: the official layout of packed conversations survives padding, weights, truncation."""
import dataclasses
import json
import math

import numpy as np
import pytest

from data_pipelines import formatting, multicrop, packing
from data_pipelines.preprocess import preprocess_example
from data_pipelines.tokenizer import load_tokenizer

SMALL_CROP = multicrop.CropConfig(crop_size=112, patch_size=14, overlap_margins=(2, 2), max_crops=4)


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    return load_tokenizer(golden_dir / "molmo-7b-d-hf")


def pack_config(tok, crop, seq_len, weighting=None):
    return packing.PackConfig(seq_len=seq_len, max_crops=crop.max_crops, crop_patches=crop.crop_patches ** 2,
                              patch_dim=crop.patch_dim, tokens_per_crop=crop.tokens_side ** 2,
                              image_token_ids=dataclasses.astuple(tok.image_token_ids), annotation_weighting=weighting)


def test_packed_golden_example_keeps_the_official_layout(tokenizer, golden_dir):
    """The official 2-conversation case (7B-D geometry), padded to 400 tokens."""
    case = next(c for c in json.loads((golden_dir / "text" / "text_goldens.json").read_text())["formatter_cases"]
                if c["id"] == "message_list_two_convs")
    example = dict(case["example"], image=np.full((*case["image_hw"], 3), 128, np.uint8))
    tokenized = preprocess_example(example, tokenizer, multicrop.CropConfig(), format_cfg=formatting.FINETUNED,
                                   rng=np.random.RandomState(case["rng"]["seed"]))
    packed = packing.pack_example(tokenized, pack_config(tokenizer, multicrop.CropConfig(), 400))
    gold = case["tokenized"]
    n_img = gold["n_image_tokens"]
    text = slice(1 + n_img, 1 + n_img + len(gold["input_tokens_after_image"]))
    assert packed["input_ids"][0] == gold["bos"]
    np.testing.assert_array_equal(packed["input_ids"][text], gold["input_tokens_after_image"])
    np.testing.assert_array_equal(packed["position_ids"][text], gold["position_ids_after_image"])
    np.testing.assert_array_equal(packed["subsegment_ids"][text], gold["subsegment_ids_after_image"])
    np.testing.assert_array_equal(packed["subsegment_ids"][:1 + n_img], gold["subsegment_id_of_image_and_bos"])
    targets = slice(n_img, n_img + len(gold["target_tokens_after_image"]))
    np.testing.assert_array_equal(packed["target_tokens"][targets], gold["target_tokens_after_image"])
    np.testing.assert_array_equal(packed["loss_masks"][targets], gold["loss_masks_after_image"])
    end = targets.stop
    for key in packing.TEXT_KEYS:
        assert packed[key].shape == (400,) and (packed[key][end:] == -1).all(), key
    assert packed["images"].shape == (13, 576, 588) and (packed["images"][2:] == -1).all()
    assert (packed["image_input_idx"][2:] == -1).all()


def test_three_conversations_official_layout_and_root_weighting(tokenizer):
    image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    qa = [("What colour is it?", "red"), ("How many are there?", "three of them"), ("Is it round?", "no")]
    example = {"image": image, "message_list": [dict(style="vqa2", question=q, answer=a) for q, a in qa]}
    tokenized = preprocess_example(example, tokenizer, SMALL_CROP, rng=np.random.RandomState(0))
    seq_len = 160
    packed = packing.pack_example(tokenized, pack_config(tokenizer, SMALL_CROP, seq_len, "root_subsegments"),
                                  weight=2.0)
    ids, sub, pos, loss = (packed[k] for k in ("input_ids", "subsegment_ids", "position_ids", "loss_masks"))
    targets = packed["target_tokens"]
    n_image = packing.image_block_end(ids, dataclasses.astuple(tokenizer.image_token_ids)) - 1
    n = int((ids != -1).sum())
    # BOS and image: subsegment 10000, positions 0..n_image
    assert (sub[:1 + n_image] == packing.IMAGE_SUBSEGMENT).all()
    np.testing.assert_array_equal(pos[:1 + n_image], np.arange(1 + n_image))
    # conversations 1, 2, 3 in order, each restarting at position 1 + n_image
    conv = sub[1 + n_image:n]
    assert list(dict.fromkeys(conv.tolist())) == [1, 2, 3] and (np.diff(conv) >= 0).all()
    for k in (1, 2, 3):
        where = np.flatnonzero(sub == k)
        np.testing.assert_array_equal(pos[where], 1 + n_image + np.arange(len(where)))
        # the answer and its EOS carry the loss, weighted by 2 * sqrt(1/3)
        answer = targets[where][loss[where] > 0]
        assert answer[-1] == tokenizer.eos_id
        assert tokenizer.decode(answer).strip() == qa[k - 1][1]
        np.testing.assert_allclose(loss[where][loss[where] > 0], 2.0 * math.sqrt(1 / 3), rtol=1e-6)
    assert (loss[:n_image] == 0).all()
    assert (ids[n:] == -1).all() and (sub[n:] == -1).all() and (loss[n:] == -1).all()
    # every image feature lands on an <im_patch> token
    idx = packed["image_input_idx"]
    assert (ids[idx[idx >= 0]] == tokenizer.image_token_ids.im_patch).all()
    assert packed["images"].shape == (1 + SMALL_CROP.max_crops, SMALL_CROP.crop_patches ** 2, SMALL_CROP.patch_dim)


def test_truncation_never_splits_the_image(tokenizer):
    image = np.zeros((112, 224, 3), np.uint8)
    example = {"image": image, "style": "vqa2", "question": "describe " * 40, "answer": "ok"}
    tokenized = preprocess_example(example, tokenizer, SMALL_CROP, rng=np.random.RandomState(0))
    image_end = packing.image_block_end(tokenized["input_tokens"], dataclasses.astuple(tokenizer.image_token_ids))
    n = len(tokenized["input_tokens"])
    cut = packing.pack_example(tokenized, pack_config(tokenizer, SMALL_CROP, image_end + 5))
    assert int(cut["num_tokens"]) == n and (cut["input_ids"] != -1).all()
    np.testing.assert_array_equal(cut["input_ids"], tokenized["input_tokens"][:image_end + 5])
    idx = cut["image_input_idx"]
    assert idx.max() < image_end + 5
    with pytest.raises(packing.ExampleTooLong, match="image block"):
        packing.pack_example(tokenized, pack_config(tokenizer, SMALL_CROP, image_end))


def test_text_only_examples_share_the_batch_shapes(tokenizer):
    tokenized = preprocess_example({"style": "user_qa", "messages": ["Hi there", "Hello"]}, tokenizer, SMALL_CROP,
                                   rng=np.random.RandomState(0))
    cfg = pack_config(tokenizer, SMALL_CROP, 32)
    packed = packing.pack_example(tokenized, cfg, weight=0.5)
    assert packed["images"].shape == (cfg.num_crops, cfg.crop_patches, cfg.patch_dim) and (packed["images"] == -1).all()
    assert (packed["image_input_idx"] == -1).all() and (packed["image_masks"] == -1).all()
    assert set(np.unique(packed["loss_masks"])) <= {-1.0, 0.0, 0.5}
    assert (packed["subsegment_ids"][packed["input_ids"] != -1] == 1).all()


def test_bad_shapes_are_named():
    cfg = packing.PackConfig(seq_len=8, max_crops=1, crop_patches=4, patch_dim=3, tokens_per_crop=2,
                             image_token_ids=(100, 101, 102, 103))
    base = dict(input_tokens=np.arange(5), target_tokens=np.arange(5), loss_masks=np.ones(5),
                position_ids=np.arange(5))
    with pytest.raises(ValueError, match="position_ids"):
        packing.pack_example({**base, "position_ids": np.arange(4)}, cfg)
    with pytest.raises(ValueError, match="max_crops"):
        packing.pack_example({**base, "images": np.zeros((3, 4, 3)), "image_masks": np.zeros((3, 4)),
                              "image_input_idx": np.zeros((3, 2))}, cfg)
    with pytest.raises(ValueError, match="annotation_weighting"):
        dataclasses.replace(cfg, annotation_weighting="sqrt")
