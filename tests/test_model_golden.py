"""Parity with the official Molmo forward on the two tiny golden models (golden README §1):
weights through the HF reader, float32, atol/rtol 1e-4 at valid positions."""
import numpy as np
import pytest
from flax import nnx

from molmo_jax.convert.hf_molmo import load_hf_model

ARCHS = ("qwen2_style", "olmo_style")
TOL = dict(atol=1e-4, rtol=1e-4)


@nnx.jit
def _forward(model, input_ids, images, image_masks, image_input_idx):
    feats, inter = model.encode_images(images, image_masks, return_intermediates=True)
    embeds = model.embed(input_ids, images, image_masks, image_input_idx)
    return feats, inter, embeds, model(input_ids, images, image_masks, image_input_idx)


@pytest.fixture(scope="module")
def inputs(golden_dir):
    return dict(np.load(golden_dir / "model" / "inputs.npz"))


@pytest.fixture(scope="module", params=ARCHS)
def run(request, golden_dir, inputs):
    folder = golden_dir / "model" / request.param
    model = load_hf_model(str(folder))
    expected = dict(np.load(folder / "outputs.npz"))
    feats, inter, embeds, logits = _forward(model, inputs["input_ids"], inputs["images"], inputs["image_masks"],
                                            inputs["image_input_idx"])
    got = {"logits": logits, "image_features": feats, "pooled_features": inter["pooled"],
           "input_embeddings": embeds, "vit_hidden_layer_m2_crop0": inter["vit_layers"][0][0, 0],
           "vit_hidden_layer_m9_crop0": inter["vit_layers"][1][0, 0]}
    return request.param, model, expected, {k: np.asarray(v) for k, v in got.items()}


@pytest.mark.parametrize("key", ["logits", "input_embeddings"])
def test_sequence_outputs_match_at_valid_positions(run, key):
    arch, _, expected, got = run
    valid = expected["valid_mask"]
    diff = np.abs(got[key][valid] - expected[key][valid]).max()
    print(f"{arch} {key}: max abs diff {diff:.3g}")
    np.testing.assert_allclose(got[key][valid], expected[key][valid], **TOL)


@pytest.mark.parametrize("key", ["vit_hidden_layer_m2_crop0", "vit_hidden_layer_m9_crop0", "pooled_features",
                                 "image_features"])
def test_image_outputs_match(run, key):
    arch, _, expected, got = run
    print(f"{arch} {key}: max abs diff {np.abs(got[key] - expected[key]).max():.3g}")
    np.testing.assert_allclose(got[key], expected[key], **TOL)


def test_explicit_positions_equal_default(run, inputs):
    _, model, expected, got = run
    valid = expected["valid_mask"]
    logits = nnx.jit(lambda m, *a: m(*a))(model, inputs["input_ids"], inputs["images"], inputs["image_masks"],
                                          inputs["image_input_idx"], inputs["position_ids"])
    np.testing.assert_array_equal(np.asarray(logits)[valid], got["logits"][valid])


def test_greedy_continuation_by_full_recompute(run, inputs):
    """8 greedy tokens of example 0: one fixed-length jitted forward per step (the new token
    replaces the first -1 of the right padding), logits at the last valid position."""
    _, model, expected, _ = run
    steps = len(expected["gen_new_tokens"])
    prompt = inputs["input_ids"][0]
    n = int((prompt != -1).sum())
    ids = np.full((1, n + steps), -1, np.int32)
    ids[0, :n] = prompt[:n]
    args = (inputs["images"][:1], inputs["image_masks"][:1], inputs["image_input_idx"][:1])
    forward = nnx.jit(lambda m, i, *a: m(i, *a))
    tokens, step_logits = [], []
    for s in range(steps):
        last = np.asarray(forward(model, ids, *args))[0, n + s - 1]
        step_logits.append(last)
        tokens.append(int(last.argmax()))
        ids[0, n + s] = tokens[-1]
    assert tokens == expected["gen_new_tokens"].tolist()
    np.testing.assert_allclose(np.stack(step_logits), expected["gen_step_logits"], **TOL)
