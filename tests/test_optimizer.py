"""Recipe pieces on their own: LR schedules, parameter groups of the real tiny Molmo, frozen
split, per-group clipping, and the normalised CE + z-loss against a numpy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from molmo_jax.model.config import TINY_QWEN2
from molmo_jax.model.molmo import Molmo
from molmo_jax.train import loss as loss_lib
from molmo_jax.train import optimizer as opt_lib

PATTERNS = common.PARAM_GROUPS


def official_lr(peak, warmup, total, s):
    """allenai/molmo CosWithWarmup at trainer step s (1-based), alpha_f = 0.1."""
    if s < warmup:
        return peak * s / warmup
    s, total = min(s - warmup, total - warmup), total - warmup
    final = 0.1 * peak
    return final + (peak - final) * (1 + math.cos(math.pi * s / total)) / 2


def test_warmup_cosine_matches_the_official_schedule():
    sched = opt_lib.warmup_cosine(2e-4, 200, 1000)
    for count in (0, 1, 99, 198, 199, 200, 500, 998, 999, 1500):
        assert float(sched(count)) == pytest.approx(official_lr(2e-4, 200, 1000, count + 1), rel=1e-5)
    assert float(sched(199)) == pytest.approx(2e-4)      # peak right after warmup
    assert float(sched(5000)) == pytest.approx(2e-5)     # 10% after the last step


@pytest.fixture(scope="module")
def tiny_params():
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Molmo(TINY_QWEN2, rngs=nnx.Rngs(0)))))


def test_groups_and_frozen_embedding_follow_the_official_split(tiny_params):
    trainable, frozen = opt_lib.split_trainable(tiny_params, common.FROZEN)
    assert list(frozen) == ["llm"] and list(frozen["llm"]) == ["embed"] and list(frozen["llm"]["embed"]) == ["embedding"]
    assert "embedding" not in trainable["llm"]["embed"] and "new_embedding" in trainable["llm"]["embed"]
    assert opt_lib.merge_trees(trainable, frozen).keys() == tiny_params.keys()
    labels = {opt_lib.path_str(p): g for p, g in jax.tree_util.tree_flatten_with_path(
        opt_lib.param_labels(trainable, PATTERNS))[0]}
    assert labels["llm/embed/new_embedding"] == "connector"
    assert labels["connector/pooling/wq/kernel"] == "connector"
    assert labels["vision/blocks/w1/kernel"] == "vit"
    assert labels["llm/lm_head/kernel"] == "llm"
    assert set(labels.values()) == {"vit", "connector", "llm"}
    with pytest.raises(ValueError, match="'other/w' matches none of config.optimizer.groups"):
        opt_lib.param_labels({"other": {"w": 1.0}}, PATTERNS)


def test_each_group_is_clipped_alone_and_uses_its_own_lr():
    cfg = common.base_config("pretrain").optimizer
    cfg.vit = dict(lr=1e-3, warmup_steps=1)
    cfg.connector = dict(lr=2e-3, warmup_steps=4)
    cfg.llm = dict(lr=3e-3, warmup_steps=2)
    params = {"vision": {"w": jnp.ones(4)}, "connector": {"w": jnp.ones(4)}, "llm": {"w": jnp.ones(4)}}
    tx = opt_lib.make_optimizer(cfg, 10, PATTERNS)
    state = tx.init(params)
    grads = {"vision": {"w": jnp.full(4, 1e6)}, "connector": {"w": jnp.full(4, 1e-3)}, "llm": {"w": jnp.full(4, 0.5)}}
    for count in range(3):
        updates, state = tx.update(grads, state, params)
        lrs = {g: float(v) for g, v in opt_lib.learning_rates(state).items()}
        for g in opt_lib.GROUPS:
            assert lrs[g] == pytest.approx(official_lr(cfg[g]["lr"], cfg[g]["warmup_steps"], 10, count + 1), rel=1e-5)
    # The huge ViT gradient is clipped inside its group only: the connector's tiny gradient
    # is not scaled down by it (after 3 Adam steps each |update| is about lr per step).
    norms = opt_lib.group_grad_norms(grads, PATTERNS)
    assert float(norms["vit"]) == pytest.approx(2e6) and float(norms["connector"]) == pytest.approx(2e-3)
    assert float(jnp.abs(updates["connector"]["w"][0])) == pytest.approx(lrs["connector"], rel=1e-2)


def test_loss_is_weighted_ce_plus_z_loss_over_the_global_weight():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    targets[1, 3:] = -1
    weights = rng.uniform(size=(2, 5)).astype(np.float32)
    weights[1, 3:] = 0
    sums = loss_lib.weighted_token_losses(jnp.asarray(logits, jnp.bfloat16), targets, weights, 1e-4)
    lf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    lse = np.log(np.exp(lf).sum(-1))
    ce = lse - np.take_along_axis(lf, np.maximum(targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(sums["ce_sum"]), (ce * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["z_sum"]), 1e-4 * (lse ** 2 * weights).sum(), rtol=1e-5)
    # Two halves normalised by the global weight add up to the whole batch's loss.
    total = weights.sum()
    halves = [loss_lib.weighted_token_losses(logits[i:i + 1], targets[i:i + 1], weights[i:i + 1], 1e-4) for i in (0, 1)]
    whole = loss_lib.normalised_loss(loss_lib.weighted_token_losses(logits, targets, weights, 1e-4), total)
    np.testing.assert_allclose(sum(float(loss_lib.normalised_loss(h, total)) for h in halves), float(whole), rtol=1e-6)
