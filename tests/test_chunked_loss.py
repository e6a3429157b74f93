"""The chunked cross-entropy (train/loss.chunked_token_losses, config.train.ce_chunk_tokens):
the same loss sums and gradients as the whole-logits loss, without the [B, L, V] logits.

  sums       a length that is no multiple of the chunk, padding targets, targets beyond the
             vocabulary (image tokens) and fractional weights: the four sums and the gradients
             of hidden states and head equal the unchunked loss's;
  memory     the compiled gradient's temporaries hold about one chunk's logits and gradient,
             where the unchunked loss holds the whole [B, L, V] logits and their gradient;
  trainer    three AdamW steps of the tiny Molmo and the tiny Molmo2 with ce_chunk_tokens give the
             losses and gradient norms of the default;
  config     a negative chunk is refused by name.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from configs import molmo2_tiny
from molmo_jax.model import sharding
from molmo_jax.train import config_checks, loss as loss_lib, trainer


def _inputs(b=2, length=37, d=16, v=50, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) / 4, jnp.float32)
    targets = rng.integers(0, v, (b, length)).astype(np.int32)
    targets[:, :10] = np.argmax(np.einsum("btd,dv->btv", hidden, head), -1)[:, :10]  # some right answers
    targets[0, -5:] = -1  # padding
    targets[1, 3] = v + 7  # an image token: no logit
    weights = (rng.random((b, length)) < 0.7) * rng.uniform(0.5, 2.0, (b, length))
    weights[targets < 0] = 0
    return hidden, head, jnp.asarray(targets), jnp.asarray(weights, jnp.float32)


def _whole(hidden, head, targets, weights, z=1e-4):
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    return loss_lib.weighted_token_losses(logits, targets, weights, z)


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_chunked_sums_and_gradients_equal_the_whole_logits_loss(chunk):
    hidden, head, targets, weights = _inputs()
    chunked = lambda h, w: loss_lib.chunked_token_losses(h, w, targets, weights, 1e-4, chunk)  # noqa: E731
    whole = lambda h, w: _whole(h, w, targets, weights)  # noqa: E731
    got, want = jax.jit(chunked)(hidden, head), jax.jit(whole)(hidden, head)
    for key in ("ce_sum", "z_sum", "weight_sum", "correct_sum"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
    assert float(want["correct_sum"]) > 0 and float(want["z_sum"]) > 0  # the check sees every sum

    def total(f):
        return jax.jit(jax.grad(lambda h, w: (lambda s: s["ce_sum"] + s["z_sum"])(f(h, w)), argnums=(0, 1)))
    for name, a, b in zip(("hidden", "head"), total(chunked)(hidden, head), total(whole)(hidden, head)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)


def test_chunked_gradient_never_holds_the_whole_logits():
    b, length, d, v = 2, 2048, 32, 4096
    hidden, head = jnp.zeros((b, length, d)), jnp.zeros((d, v))
    targets, weights = jnp.zeros((b, length), jnp.int32), jnp.ones((b, length))
    logits_bytes = b * length * v * 4  # 64 MiB

    def temporaries(f):
        grad = jax.jit(jax.grad(lambda h, w: f(h, w)["ce_sum"], argnums=(0, 1)))
        return grad.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    chunked = temporaries(lambda h, w: loss_lib.chunked_token_losses(h, w, targets, weights, 1e-4, 256))
    whole = temporaries(lambda h, w: _whole(h, w, targets, weights))
    chunk_bytes = b * 256 * v * 4  # one chunk's logits: 8 MiB
    # The whole loss keeps the logits and their gradient (2 x 64 MiB); the chunked one about a
    # chunk's logits and their gradient (measured 17.9 MB against 134.3 MB).
    assert whole >= 2 * logits_bytes and chunked < 3 * chunk_bytes, (chunked, whole)


def _steps(config, batch_arrays, chunk):
    config.train.ce_chunk_tokens = chunk
    config.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
    setup = trainer.build_train_setup(config, trainer.model_config_from(config), mesh)
    state, out = setup.init(jax.random.key(0)), []
    batch = sharding.make_global_batch(batch_arrays, mesh)
    for _ in range(3):
        state, metrics = setup.step_fn(state, batch)
        out.append([float(metrics[k]) for k in ("loss", "accuracy", "grad_norm.llm")])
    return out


def test_trainer_steps_are_equal_with_the_chunked_loss_for_both_families():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (2, 100)).astype(np.int32)
    ids[1, 70:] = -1
    molmo = {"input_ids": ids, "target_tokens": np.roll(ids, -1, 1),
             "loss_masks": ((rng.random((2, 100)) < 0.6) & (ids != -1)).astype(np.float32)}
    config = configs.load("configs/demo.py:pretrain")
    np.testing.assert_allclose(_steps(config, molmo, 32), _steps(config, molmo, 0), rtol=2e-5)

    from test_molmo2_lora import row_batch  # the tiny Molmo2's training-layout rows
    config2 = molmo2_tiny.get_config("qwen3")
    rows = row_batch(trainer.model_config_from(config2))
    np.testing.assert_allclose(_steps(config2, rows, 12), _steps(config2, rows, 0), rtol=2e-5)


def test_a_negative_chunk_is_refused_by_name():
    config = configs.load("configs/demo.py:pretrain")
    config.train.ce_chunk_tokens = -1
    with pytest.raises(config_checks.ConfigError, match="train.ce_chunk_tokens"):
        config_checks.validate(config)
