"""Molmo wiring: splicing, text-only batches, logical axis names, remat and compute dtype,
the feed-forward factory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from molmo_jax.model import config as cfg
from molmo_jax.model.attention import default_positions
from molmo_jax.model.llm import LLM, FeedForward, make_feed_forward
from molmo_jax.model.molmo import Molmo, splice

LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "vit_embed", "vit_mlp",
                 "vit_heads", "patch", "expert", "expert_mlp", None}
TINY = cfg.TINY_QWEN2.replace(vision=cfg.VisionConfig(image_size=(56, 56), width=32, num_heads=2, head_dim=16,
                                                      mlp_dim=64, num_layers=3, feature_layers=(-1, -3)))


@nnx.jit
def _forward(model, *args):
    return model(*args)





def test_splice_adds_and_drops_negative_indices():
    embeds = jnp.ones((2, 5, 3))
    feats = jnp.arange(2 * 1 * 2 * 3, dtype=jnp.float32).reshape(2, 1, 2, 3)
    idx = jnp.array([[[1, -100]], [[4, -1]]])
    out = np.asarray(splice(embeds, feats, idx))
    np.testing.assert_array_equal(out[0, 1], 1 + np.arange(3))
    np.testing.assert_array_equal(out[1, 4], 1 + np.arange(6, 9))
    assert (np.delete(out.reshape(10, 3), [1, 9], axis=0) == 1).all()


@pytest.fixture(scope="module")
def model():
    return Molmo(TINY, rngs=nnx.Rngs(0))


def _batch(rng, b=2, crops=2, length=48):
    q = 4  # 56 px / patch 14 = 4x4 patches, pooled 2x2 -> 4 tokens per crop
    ids = rng.randint(0, 640, (b, length)).astype(np.int32)
    ids[1, 40:] = -1
    images = rng.randn(b, crops, 16, 588).astype(np.float32)
    images[1, 1] = -1
    idx = (np.arange(crops * q).reshape(1, crops, q) + 1).repeat(b, 0)
    idx[1, 1] = -1
    return ids, images, np.ones((b, crops, 16), np.float32), idx.astype(np.int32)


def test_every_param_has_logical_axis_names(model):
    for path, var in nnx.state(model, nnx.Param).flat_state():
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
        assert set(names) <= LOGICAL_NAMES, (path, names)
        if path[1] == "blocks":
            assert names[0] == "layers", path


def test_text_only_batch_equals_image_batch_without_features(model):
    ids, images, masks, idx = _batch(np.random.RandomState(0))
    text = _forward(model, ids)
    no_features = _forward(model, ids, images, masks, np.full_like(idx, -1))
    np.testing.assert_allclose(np.asarray(text), np.asarray(no_features), atol=1e-6)
    with pytest.raises(ValueError, match="without image_input_idx"):
        model(ids, images, masks)


def test_remat_policy_keeps_values_and_gradients(model):
    """Remat recomputes the scanned LLM blocks in the backward pass: same loss, same grads."""
    ids = np.random.RandomState(1).randint(0, 640, (2, 16)).astype(np.int32)
    remat = LLM(TINY.llm, remat_policy="dots_no_batch", rngs=nnx.Rngs(1))
    nnx.update(remat, nnx.state(model.llm, nnx.Param))

    @nnx.jit
    def loss_and_grad(llm):
        def loss(m):
            return jnp.mean(m(m.embed_tokens(ids), default_positions(ids), token_valid=ids != -1)[0] ** 2)
        return nnx.value_and_grad(loss)(llm)

    l0, g0 = loss_and_grad(model.llm)
    l1, g1 = loss_and_grad(remat)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g0, g1)


def test_bfloat16_compute_keeps_float32_params_and_logits(model):
    ids, images, masks, idx = _batch(np.random.RandomState(2))
    bf16 = Molmo(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(1))
    nnx.update(bf16, nnx.state(model, nnx.Param))
    assert all(v[...].dtype == jnp.float32 for _, v in nnx.state(bf16, nnx.Param).flat_state())
    out, ref = _forward(bf16, ids, images, masks, idx), _forward(model, ids, images, masks, idx)
    assert out.dtype == jnp.float32
    valid = ids != -1
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=0.25)


def test_feed_forward_factory():
    assert isinstance(make_feed_forward(cfg.TINY_QWEN2.llm, rngs=nnx.Rngs(0)), FeedForward)
    bad = cfg.TINY_QWEN2.llm.__class__(**{**cfg.TINY_QWEN2.llm.__dict__, "block_type": "sparse"})
    with pytest.raises(ValueError, match="unknown block_type 'sparse'"):
        make_feed_forward(bad, rngs=nnx.Rngs(0))


def test_moe_config_runs_through_the_factory():
    config = cfg.TINY_MOE.replace(vision=TINY.vision)
    model = Molmo(config, rngs=nnx.Rngs(0))
    ids, images, masks, idx = _batch(np.random.RandomState(3))
    logits, aux = nnx.jit(lambda m, *a: m(*a, return_aux=True))(model, ids, images, masks, idx)
    assert logits.shape == (2, 48, 512) and np.isfinite(np.asarray(logits)).all()
    assert set(aux) >= {"load_balance_loss", "router_z_loss"}


def test_siglip_odd_grid_is_zero_padded_before_pooling():
    """A 3x3 patch grid (SigLIP-style, no CLS) pools to 2x2 windows over a zero-padded 4x4 grid."""
    vision = cfg.VisionConfig(kind="siglip", image_size=(42, 42), width=16, num_heads=2, head_dim=8, mlp_dim=32,
                              num_layers=2, activation="gelu_tanh", norm_eps=1e-6, use_cls_token=False, pre_ln=False,
                              patch_bias=True, feature_layers=(-1, -2))
    model = Molmo(TINY.replace(vision=vision), rngs=nnx.Rngs(0))
    assert model.connector.tokens_per_crop == 4
    images = np.random.RandomState(5).randn(1, 2, 9, 588).astype(np.float32)
    encode = nnx.jit(lambda m, *a: m.encode_images(*a, return_intermediates=True))
    feats, inter = encode(model, images, np.ones((1, 2, 9), np.float32))
    assert feats.shape == (1, 2, 4, 64) and inter["pooled"].shape == (1, 2, 4, 16)
    # The last window holds one real patch and three zero pads: its keys include zeros.
    grid = jnp.concatenate(inter["vit_layers"], axis=-1)[0, 0].reshape(3, 3, 32)
    window = jnp.stack([grid[2, 2], jnp.zeros(32), jnp.zeros(32), jnp.zeros(32)])[None]
    pooled = model.connector.pooling(window.mean(axis=1, keepdims=True), window, jnp.float32)
    np.testing.assert_allclose(np.asarray(inter["pooled"])[0, 0, 3], np.asarray(pooled)[0, 0], atol=1e-5)


def test_misshaped_inputs_are_named(model):
    ids, images, masks, idx = _batch(np.random.RandomState(6))
    with pytest.raises(ValueError, match=r"images has shape \(2, 2, 16, 500\), expected \(\*, \*, 16, 588\)"):
        model.embed(ids, images[..., :500], masks, idx)
    with pytest.raises(ValueError, match=r"image_input_idx has shape \(2, 2, 3\), expected \(2, 2, 4\)"):
        model.embed(ids, images, masks, idx[..., :3])
    with pytest.raises(ValueError, match=r"image_masks has shape \(2, 2, 15\)"):
        model.embed(ids, images, masks[..., :15], idx)
    with pytest.raises(ValueError, match=r"position_ids has shape \(2, 47\), expected \(2, 48\)"):
        model(ids, position_ids=ids[:, :47])


def test_fan_in_init_scales_every_dense_kernel_and_keeps_image_features_visible():
    """init_scheme "fan_in": each Dense kernel (stacked ones keep their layer axis) has std
    1/sqrt(fan_in), same draws as "normal"; the ViT's positional / class embeddings and the LLM's
    token embeddings have std 1; the image features then reach the LLM at the scale of the token
    embeddings instead of ~1e-4 of them."""
    normal = Molmo(TINY, rngs=nnx.Rngs(0))
    fan_in = Molmo(TINY.replace(init_scheme="fan_in"), rngs=nnx.Rngs(0))
    wq, wq0 = fan_in.llm.blocks.attention.q.kernel[...], normal.llm.blocks.attention.q.kernel[...]
    d = TINY.llm.d_model
    assert wq.shape[0] == TINY.llm.n_layers                       # [layers, D, heads, head_dim]
    np.testing.assert_allclose(np.asarray(wq), np.asarray(wq0) * (d ** -0.5 / 0.02), rtol=1e-5)
    wo = fan_in.llm.blocks.attention.o.kernel[...]              # fan_in = heads * head_dim
    assert abs(float(jnp.std(wo)) * np.sqrt(TINY.llm.n_heads * TINY.llm.head_dim) - 1) < 0.1
    patch = fan_in.vision.patch_embedding.kernel[...]
    assert abs(float(jnp.std(patch)) * np.sqrt(588) - 1) < 0.05
    for name in ("positional_embedding", "class_embedding"):  # at the unit scale of the patch embeddings
        np.testing.assert_allclose(np.asarray(getattr(fan_in.vision, name)[...]),
                                   np.asarray(getattr(normal.vision, name)[...]) / 0.02, rtol=1e-5)
    for name in ("embedding", "new_embedding"):  # token embeddings at unit scale too
        np.testing.assert_allclose(np.asarray(getattr(fan_in.llm.embed, name)[...]),
                                   np.asarray(getattr(normal.llm.embed, name)[...]) / 0.02, rtol=1e-5)

    _, images, masks, _ = _batch(np.random.RandomState(0))
    emb_std = float(jnp.std(normal.llm.embed.embedding[...]))
    small = float(jnp.std(normal.encode_images(images[:1], masks[:1])))
    assert small < 1e-2 * emb_std   # "normal": image features ~1e-4 of the text they sit among
    # "fan_in": image features and token embeddings at the same scale (within 10x)
    fan_in_emb = float(jnp.std(fan_in.llm.embed.embedding[...]))
    visible = float(jnp.std(fan_in.encode_images(images[:1], masks[:1])))
    assert abs(fan_in_emb - 1) < 0.1 and 0.1 < visible / fan_in_emb < 10
    with pytest.raises(ValueError, match="init_scheme"):
        Molmo(TINY.replace(init_scheme="xavier"), rngs=nnx.Rngs(0))
