"""The decoder: KV-cached decoding equals full recomputation (pre-norm and post-norm blocks,
right-padded batch), the masks for padding and subsegments, response residual dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from molmo_jax.model import config as cfg
from molmo_jax.model.attention import AttentionMask, default_positions, subsegment_positions
from molmo_jax.model.llm import LLM


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-olmo"])
def llm(request):
    return LLM(cfg.get_preset(request.param).llm, rngs=nnx.Rngs(0))


@nnx.jit
def _full(llm, ids):
    valid = ids != -1
    logits, _, _ = llm(llm.embed_tokens(ids), default_positions(ids), token_valid=valid)
    return logits


@nnx.jit
def _cached(llm, ids, positions, valid, cache):
    logits, cache, _ = llm(llm.embed_tokens(ids), positions, token_valid=valid, cache=cache)
    return logits, cache


def test_cached_decode_equals_full_recompute(llm):
    rng = np.random.RandomState(0)
    lengths, width, steps = [7, 4], 7, 5
    prompts = [rng.randint(0, 640, n) for n in lengths]  # also ids of the 128 extra rows
    new = rng.randint(0, 512, (2, steps))
    ids = np.full((2, width), -1, np.int32)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    cache = llm.init_cache(2, width + steps, jnp.float32)
    logits, cache = _cached(llm, ids, default_positions(ids), ids != -1, cache)
    got = [np.asarray(logits)[np.arange(2), np.array(lengths) - 1]]
    for s in range(steps):
        pos = (np.array(lengths) + s)[:, None].astype(np.int32)
        logits, cache = _cached(llm, new[:, s:s + 1], pos, np.ones((2, 1), bool), cache)
        got.append(np.asarray(logits)[:, 0])
    assert int(cache.index) == width + steps
    for b, p in enumerate(prompts):
        seq = np.concatenate([p, new[b]])[None].astype(np.int32)
        full = np.asarray(_full(llm, seq))[0, len(p) - 1:]
        np.testing.assert_allclose(np.stack([g[b] for g in got]), full, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_valid_logits(llm):
    ids = np.random.RandomState(1).randint(0, 512, (1, 6)).astype(np.int32)
    padded = np.concatenate([ids, np.full((1, 3), -1, np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(_full(llm, padded))[:, :6], np.asarray(_full(llm, ids)), atol=1e-5)


def test_subsegments_see_image_and_themselves_only():
    """Spec §4.6: [image x3 (sub 10000)][conv 1 x2][conv 2 x2][pad]."""
    sub = np.array([[10000, 10000, 10000, 1, 1, 2, 2, 2]])
    valid = np.array([[True] * 7 + [False]])
    np.testing.assert_array_equal(subsegment_positions(valid, sub)[:, :7], [[0, 1, 2, 3, 4, 3, 4]])
    mask = np.asarray(AttentionMask(key_valid=valid, subsegment_ids=sub).dense(8, 8))[0]
    assert mask[5, :3].all() and not mask[5, 3:5].any() and mask[5, 5]  # conv 2 skips conv 1
    assert mask[4, 3] and not mask[2, 3:].any()  # conv 1 sees itself; image sees no text
    assert not mask[:, 7].any()  # padding is never a key


def test_two_conversations_equal_separate_runs(llm):
    """Packing [shared prefix][conv 1][conv 2] with subsegment ids gives conv 2 the logits it
    would have right after the prefix alone."""
    rng = np.random.RandomState(2)
    prefix, c1, c2 = rng.randint(0, 512, 3), rng.randint(0, 512, 4), rng.randint(0, 512, 3)
    packed = np.concatenate([prefix, c1, c2])[None].astype(np.int32)
    sub = np.array([[10000] * 3 + [1] * 4 + [2] * 3])
    valid = packed != -1
    logits, _, _ = llm(llm.embed_tokens(packed), subsegment_positions(valid, sub), token_valid=valid,
                       subsegment_ids=sub)
    alone = np.asarray(_full(llm, np.concatenate([prefix, c2])[None].astype(np.int32)))
    np.testing.assert_allclose(np.asarray(logits)[0, 7:], alone[0, 3:], atol=1e-5, rtol=1e-5)


def test_response_dropout_only_where_masked():
    config = cfg.TINY_QWEN2.llm.__class__(**{**cfg.TINY_QWEN2.llm.__dict__, "response_residual_dropout": 0.5})
    llm = LLM(config, rngs=nnx.Rngs(0))
    ids = np.random.RandomState(3).randint(0, 512, (2, 8)).astype(np.int32)
    emb, pos, valid = llm.embed_tokens(ids), default_positions(ids), np.ones((2, 8), bool)
    response = np.zeros((2, 8), bool)
    response[:, 5:] = True
    clean, _, _ = llm(emb, pos, token_valid=valid)
    a, _, _ = llm(emb, pos, token_valid=valid, response_mask=response, dropout_key=jax.random.key(0))
    b, _, _ = llm(emb, pos, token_valid=valid, response_mask=response, dropout_key=jax.random.key(1))
    # Causal: positions before the first response token are untouched, later ones differ by key.
    np.testing.assert_allclose(np.asarray(a)[:, :5], np.asarray(clean)[:, :5], atol=1e-6)
    assert not np.allclose(np.asarray(a)[:, 5:], np.asarray(b)[:, 5:])


def test_cache_rejects_subsegments(llm):
    ids = np.zeros((1, 2), np.int32)
    with pytest.raises(ValueError, match="subsegment_ids cannot be combined"):
        llm(llm.embed_tokens(ids), default_positions(ids), token_valid=ids != -1, subsegment_ids=ids,
            cache=llm.init_cache(1, 4))
