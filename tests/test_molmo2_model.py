"""Molmo2 parity with transformers' Molmo2ForConditionalGeneration: random tiny Qwen3-style and
OLMo3-style models (float32, CPU, eager attention), saved with save_pretrained, read with our
converter; logits, the vision tower's selected layers, the pooled and projected image features
and the merged input embeddings compared on (a) a batch of two images with different crop
counts and padding, (b) several images in one sequence, (c) a video of several frames.

The inputs are laid out as transformers' Molmo2 processor lays them out (index arrays, grids,
image tokens, mm_token_type_ids), built here in numpy from its code
(image_processing_molmo2.py: `_build_overlapping_crops`, `arange_for_pooling`, the crop-offset
bookkeeping of `_preprocess`; video_processing_molmo2.py: the per-frame offsets;
processing_molmo2.py: `replace_image_token`, `get_video_string`): the processor's image
backend needs torchvision, which is not installed here. Pixel values are random, since the
model only sees patches.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Molmo2Config as HFMolmo2Config
from transformers import Molmo2ForConditionalGeneration

from molmo_jax.convert import hf_molmo
from molmo_jax.model import molmo2_config as m2
from molmo_jax.tools import logits as logits_tool

COL_TOKEN, LOW_TOKEN = 506, 507  # <im_col>, <im_low>: ids in the extra rows, not in the config
TOL = 1e-4
VIDEO_KEYS = ("pixel_values_videos", "video_token_pooling", "video_grids")


# ----------------------------------------------------------------------------- processor layout


def arange_for_pooling(index_grid: np.ndarray, pool_h: int, pool_w: int):
    """[h, w] patch indices -> ([rows * cols, pool_h * pool_w] windows padded with -1, rows, cols);
    the padding is split evenly on both sides, as the processor does."""
    h, w = index_grid.shape
    pad_h, pad_w = -h % pool_h, -w % pool_w
    grid = np.pad(index_grid, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)), constant_values=-1)
    rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    windows = grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)
    return windows, rows, cols


def image_layout(config, tiling, margins=(1, 1), pool=(2, 2)):
    """One image of `tiling` (h, w) overlapping crops: (crop count incl. the global view,
    pooling indices into its own crops' patches, image_grid, token ids)."""
    cp = config.vision.grid[0]
    th, tw = tiling
    left, right = margins
    window = cp - left - right
    grid = np.arange(th * tw * cp * cp, dtype=np.int64).reshape(th, tw, cp, cp)
    if left:
        grid[1:, :, :left, :] = -1
        grid[:, 1:, :, :left] = -1
    if right:
        grid[:-1, :, -right:, :] = -1
        grid[:, :-1, :, -right:] = -1
    grid = grid.transpose(0, 2, 1, 3).reshape(-1)
    grid = grid[grid >= 0].reshape(th * window + left + right, tw * window + left + right)
    high, rows, cols = arange_for_pooling(grid, *pool)
    low, low_rows, low_cols = arange_for_pooling(np.arange(cp * cp).reshape(cp, cp), *pool)
    pooling = np.concatenate([low, np.where(high >= 0, high + cp * cp, -1)])
    c = config
    low_tokens = [c.low_res_image_start_token_id] + ([c.image_patch_id] * low_cols + [COL_TOKEN]) * low_rows
    high_tokens = [c.image_start_token_id] + ([c.image_patch_id] * cols + [COL_TOKEN]) * rows
    tokens = low_tokens + [c.image_end_token_id] + high_tokens + [c.image_end_token_id]
    return th * tw + 1, pooling, [low_rows, low_cols, rows, cols], tokens


def mm_types(config, ids: np.ndarray) -> np.ndarray:
    """The processor's mm_token_type_ids: 1 for every image / frame token and marker."""
    c = config
    image_ids = [c.image_patch_id, COL_TOKEN, c.image_start_token_id, c.low_res_image_start_token_id,
                 c.frame_start_token_id, c.image_end_token_id, c.frame_end_token_id, LOW_TOKEN]
    return np.isin(ids, image_ids).astype(np.int64)


def pad_batch(sequences, pad_id=0):
    """Left padding (as for generation) -> input_ids, attention_mask, position_ids [B, L]."""
    length = max(map(len, sequences))
    ids = np.full((len(sequences), length), pad_id, np.int64)
    mask = np.zeros((len(sequences), length), np.int64)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def image_inputs(config, images_per_example, seed):
    """`images_per_example`: per example, the tilings of its images -> transformers' kwargs."""
    rng = np.random.default_rng(seed)
    vc = config.vision
    sequences, pooling, grids, num_crops, offset = [], [], [], [], 0
    for tilings in images_per_example:
        seq = list(rng.integers(1, 400, 3))
        for tiling in tilings:
            crops, pool, grid, tokens = image_layout(config, tiling)
            pooling.append(np.where(pool >= 0, pool + offset, -1))
            offset += crops * vc.num_patches
            grids.append(grid)
            num_crops.append(crops)
            seq += tokens + list(rng.integers(1, 400, 2))
        sequences.append(seq + list(rng.integers(1, 400, int(rng.integers(1, 5)))))
    ids, mask, positions = pad_batch(sequences)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "pixel_values": rng.normal(size=(sum(num_crops), vc.num_patches, vc.patch_dim)).astype(np.float32),
            "image_token_pooling": np.concatenate(pooling), "image_grids": np.array(grids, np.int64),
            "image_num_crops": np.array(num_crops, np.int64), "mm_token_type_ids": mm_types(config, ids)}


def video_inputs(config, num_frames, seed, pool=(3, 3)):
    """One video of `num_frames` frames, 3x3 pooling, frame timestamps as text tokens."""
    rng = np.random.default_rng(seed)
    vc, c = config.vision, config
    cp = vc.grid[0]
    frame_pool, rows, cols = arange_for_pooling(np.arange(cp * cp).reshape(cp, cp), *pool)
    pooling = np.concatenate([np.where(frame_pool >= 0, frame_pool + f * cp * cp, -1) for f in range(num_frames)])
    seq = list(rng.integers(1, 400, 3))
    for _ in range(num_frames):
        seq += list(rng.integers(1, 400, 2))  # the "t.t " timestamp
        seq += [c.frame_start_token_id] + [c.image_patch_id] * (rows * cols) + [c.frame_end_token_id]
    seq += list(rng.integers(1, 400, 4))
    ids, mask, positions = pad_batch([seq])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "pixel_values_videos": rng.normal(size=(num_frames, vc.num_patches, vc.patch_dim)).astype(np.float32),
            "video_token_pooling": pooling, "video_grids": np.array([[num_frames, rows, cols]], np.int64),
            "mm_token_type_ids": mm_types(config, ids)}


CASES = {
    "two_images_padded": lambda c: image_inputs(c, [[(1, 2)], [(2, 2)]], seed=1),
    "multi_image": lambda c: image_inputs(c, [[(1, 1), (2, 1), (1, 3)]], seed=2),
    "video": lambda c: video_inputs(c, num_frames=4, seed=3),
}


# ----------------------------------------------------------------------------- models


def random_hf_model(config, seed):
    """transformers' model of our config with weights of a useful scale (N(0, 0.1); norms 1 + N(0, 0.1))."""
    torch.manual_seed(seed)
    hf_config = HFMolmo2Config(**hf_molmo.config_to_hf(config))
    hf_config._attn_implementation = "eager"
    model = Molmo2ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["tiny-molmo2-qwen3", "tiny-molmo2-olmo3"])
def pair(request, tmp_path_factory):
    config = m2.get_preset(request.param)
    hf = random_hf_model(config, seed=0)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = hf_molmo.load_hf_model(str(folder))
    assert ours.config == config  # config.json as transformers writes it reads back to the preset
    return config, hf, ours, folder


def hf_forward(hf, inputs):
    """Logits and intermediates of transformers' forward, captured with hooks."""
    seen = {}
    hooks = [hf.model.multi_modal_projector.image_pooling_2d.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("pooled", out[0][:, 0])),
             hf.model.language_model.register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True)]
    try:
        with torch.no_grad():
            out = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()})
            pixels = inputs.get("pixel_values", inputs.get("pixel_values_videos"))
            vit = hf.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    layers = hf.config.adapter_config.vision_feature_layer
    seen["vit_layers"] = [vit[i + 1 if i >= 0 else i] for i in layers]
    with torch.no_grad():
        if "pixel_values" in inputs:
            projected = out.image_outputs.pooler_output
        else:
            projected = hf.model.get_video_features(*(torch.from_numpy(inputs[k]) for k in VIDEO_KEYS)).pooler_output
    seen["projected"] = torch.cat(projected)
    return out.logits.numpy(), {k: v if isinstance(v, list) else v.numpy() for k, v in seen.items()}


def our_forward(model, inputs):
    pixels = inputs.get("pixel_values", inputs.get("pixel_values_videos"))
    pooling = inputs.get("image_token_pooling", inputs.get("video_token_pooling"))
    j = {k: jnp.asarray(v) for k, v in inputs.items()}
    logits = model(j["input_ids"], jnp.asarray(pixels), jnp.asarray(pooling), attention_mask=j["attention_mask"],
                   position_ids=j["position_ids"], mm_token_type_ids=j["mm_token_type_ids"])
    features, valid, extra = model.encode_images(jnp.asarray(pixels), jnp.asarray(pooling), return_intermediates=True)
    embeds = model.embed(j["input_ids"], jnp.asarray(pixels), jnp.asarray(pooling))
    return np.asarray(logits), features, np.asarray(valid), extra, np.asarray(embeds)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(pair, case):
    config, hf, ours, _ = pair
    inputs = CASES[case](config)
    hf_logits, hf_seen = hf_forward(hf, inputs)
    logits, features, valid, extra, embeds = our_forward(ours, inputs)
    mask = inputs["attention_mask"].astype(bool)
    assert logits.shape == hf_logits.shape
    # Logits of real tokens (padding rows are never read and differ between backends).
    assert max_diff(logits[mask], hf_logits[mask]) < TOL
    assert max_diff(embeds[mask], hf_seen["embeds"][mask]) < TOL
    for a, b in zip(extra["vit_layers"], hf_seen["vit_layers"]):
        assert max_diff(a, b) < TOL
    assert max_diff(np.asarray(extra["pooled"])[valid], hf_seen["pooled"][valid]) < TOL
    assert max_diff(np.asarray(features)[valid], hf_seen["projected"]) < TOL
    # The comparison means something: image features move the embeddings and logits.
    assert valid.sum() == (inputs["input_ids"] == config.image_patch_id).sum() > 0
    text_only = np.asarray(ours.embed(jnp.asarray(inputs["input_ids"])))
    assert max_diff(embeds[mask], text_only[mask]) > 100 * TOL


def test_exported_folder_loads_in_transformers_with_no_missing_keys(pair, tmp_path):
    config, hf, ours, _ = pair
    hf_molmo.save_hf_checkpoint(str(tmp_path), nnx.state(ours, nnx.Param), config)
    loaded, info = Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True,
                                                                  attn_implementation="eager")
    assert {k: v for k, v in info.items() if v} == {}
    # Every weight transformers builds is the one it was saved from, bit for bit.
    original, exported = hf.state_dict(), loaded.state_dict()
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    inputs = CASES["multi_image"](config)
    with torch.no_grad():
        a = loaded.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
        b = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    assert max_diff(a, b) == 0.0


def test_placeholder_count_mismatch_is_one_clear_error(pair):
    config, _, ours, _ = pair
    inputs = CASES["multi_image"](config)
    ids = inputs["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == config.image_patch_id)[0]] = 7
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        ours(jnp.asarray(ids), jnp.asarray(inputs["pixel_values"]), jnp.asarray(inputs["image_token_pooling"]))


@pytest.mark.parametrize("case", ["two_images_padded", "video"])
def test_logits_tool_takes_a_molmo2_folder_and_transformers_kwargs(pair, case, tmp_path):
    config, hf, _, folder = pair
    inputs = CASES[case](config)
    np.savez(tmp_path / "in.npz", **inputs)
    assert logits_tool.main(["--checkpoint", str(folder), "--inputs", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "out.npz")]) == 0
    got = np.load(tmp_path / "out.npz")["logits"]
    expected, _ = hf_forward(hf, inputs)
    mask = inputs["attention_mask"].astype(bool)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert max_diff(got[mask], expected[mask]) < TOL


def test_logits_tool_names_bad_molmo2_inputs(pair, tmp_path, capsys):
    config, _, _, folder = pair
    inputs = CASES["video"](config)
    del inputs["video_token_pooling"]
    np.savez(tmp_path / "in.npz", **inputs, images=np.zeros(1))
    assert logits_tool.main(["--checkpoint", str(folder), "--inputs", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "out.npz")]) == 2
    assert "unknown keys ['images']" in capsys.readouterr().err
    np.savez(tmp_path / "in.npz", **inputs)
    assert logits_tool.main(["--checkpoint", str(folder), "--inputs", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "out.npz")]) == 2
    assert "'pixel_values_videos' and 'video_token_pooling' go together" in capsys.readouterr().err


def test_chunked_attention_backend_keeps_the_image_block(pair):
    """The same mask through the project's tiled kernel (the backend long sequences get)."""
    config, hf, _, folder = pair
    chunked = hf_molmo.load_hf_model(str(folder), attention="chunked")
    inputs = CASES["two_images_padded"](config)
    expected, _ = hf_forward(hf, inputs)
    got = our_forward(chunked, inputs)[0]
    mask = inputs["attention_mask"].astype(bool)
    assert max_diff(got[mask], expected[mask]) < TOL
