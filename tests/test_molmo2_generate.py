"""Greedy Molmo2 generation with the KV cache (prefill with the bidirectional image block, then
decode) equals recomputing the whole sequence for every new token (one uncached pass over the
prompt and the generated tokens), on an image and on a video prompt, for the Qwen3- and the OLMo3-style (per-layer YaRN) tiny models."""
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax.convert import hf_molmo
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.generate_molmo2 import Molmo2Generator
from molmo_jax.model import molmo2_config as m2
from test_molmo2_model import image_inputs, random_hf_model, video_inputs

STEPS = 6


@pytest.fixture(scope="module", params=["tiny-molmo2-qwen3", "tiny-molmo2-olmo3"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    random_hf_model(m2.get_preset(request.param), seed=1).save_pretrained(folder)
    return hf_molmo.load_hf_model(str(folder))


def prompt(config, kind):
    if kind == "image":
        inputs = image_inputs(config, [[(1, 2)]], seed=4)
        return inputs["input_ids"], inputs["pixel_values"], inputs["image_token_pooling"], inputs["mm_token_type_ids"]
    inputs = video_inputs(config, num_frames=3, seed=5)
    return inputs["input_ids"], inputs["pixel_values_videos"], inputs["video_token_pooling"], inputs["mm_token_type_ids"]


def recompute(model, ids, pixels, pooling, mm, tokens):
    """Logits float32[T, V] of each of the T generated positions without a cache: one full forward
    pass over the prompt + tokens[:-1]. Generated tokens are causal text, so the logits at a position
    do not depend on later tokens: this equals rerunning the model for every new token, in one pass."""
    tokens = np.asarray(tokens)
    full_ids = np.concatenate([ids[0], tokens[:-1]])[None].astype(np.int32)
    full_mm = np.concatenate([mm[0], np.zeros(len(tokens) - 1, mm.dtype)])[None]
    out = model(jnp.asarray(full_ids), jnp.asarray(pixels), jnp.asarray(pooling), mm_token_type_ids=jnp.asarray(full_mm))
    return np.asarray(out[0, ids.shape[1] - 1:])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_greedy_with_cache_equals_recompute(model, kind):
    ids, pixels, pooling, mm = prompt(model.config, kind)
    batch = {"input_ids": ids, "pixel_values": pixels, "token_pooling": pooling, "mm_token_type_ids": mm}
    out = Molmo2Generator(model)(batch, GenerationConfig(max_new_tokens=STEPS, chunk_size=2), return_logits=True)
    expected_logits = recompute(model, ids, pixels, pooling, mm, out.tokens[0])
    assert expected_logits.shape[0] == STEPS
    assert out.tokens[0].tolist() == np.argmax(expected_logits, axis=-1).tolist()  # greedy, step by step
    assert np.max(np.abs(out.logits[0] - expected_logits)) < 1e-4
    # The comparison means something: every step sees new logits (random tiny weights may still
    # repeat one argmax), and the prefill's bidirectional image block changes them.
    assert np.abs(np.diff(expected_logits, axis=0)).max() > 1e-2
    causal_only = Molmo2Generator(model)({k: v for k, v in batch.items() if k != "mm_token_type_ids"},
                                         GenerationConfig(max_new_tokens=1), return_logits=True)
    assert np.max(np.abs(causal_only.logits[0, 0] - expected_logits[0])) > 1e-2


def test_prompt_without_its_pooling_is_one_clear_error(model):
    ids, pixels, _, mm = prompt(model.config, "image")
    with pytest.raises(ValueError, match="no 'token_pooling'"):
        Molmo2Generator(model)({"input_ids": ids, "pixel_values": pixels, "mm_token_type_ids": mm})
