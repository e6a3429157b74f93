"""Mixture of experts: routing and experts against transformers' OLMoE, capacity dropping,
auxiliary losses, checkpoint layouts, and expert parallelism on 8 fake CPU devices."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from molmo_jax.convert import moe_weights
from molmo_jax.model.config import TINY_MOE
from molmo_jax.model.moe import MoEFeedForward, expert_capacity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLM = TINY_MOE.llm  # d_model 64, 8 experts, top-2, expert width 32


def _config(**changes):
    return dataclasses.replace(LLM, **changes)


def _hf_block(renormalize: bool):
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    hf_config = transformers.OlmoeConfig(
        hidden_size=LLM.d_model, intermediate_size=LLM.moe_hidden_size, num_experts=LLM.moe_num_experts,
        num_experts_per_tok=LLM.moe_top_k, norm_topk_prob=renormalize)
    hf_config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = OlmoeSparseMoeBlock(hf_config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block


def _load(module: MoEFeedForward, params: dict) -> MoEFeedForward:
    for name, value in params.items():
        getattr(module, name)[...] = jnp.asarray(value)
    return module


def _x(b=2, t=7, seed=1):
    return np.random.RandomState(seed).randn(b, t, LLM.d_model).astype(np.float32)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dispatch", ["sorted", "capacity"])
def test_matches_transformers_olmoe_block(renormalize, dispatch):
    block = _hf_block(renormalize)
    sd = {k: v.numpy() for k, v in block.state_dict().items()}
    params = moe_weights.moe_from_hf(sd, "", LLM.d_model, LLM.moe_num_experts, LLM.moe_hidden_size)
    assert not sd, f"unused tensors {sorted(sd)}"
    # Capacity factor E makes C = k*T: nothing can be dropped, so both modes are exact.
    config = _config(moe_renormalize=renormalize, moe_dispatch=dispatch,
                     moe_capacity_factor=float(LLM.moe_num_experts))
    module = _load(MoEFeedForward(config, rngs=nnx.Rngs(0)), params)
    x = _x()
    with torch.no_grad():
        expected = block(torch.from_numpy(x)).numpy()
    y, aux = module(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)
    assert float(aux["dropped_tokens"]) == 0.0


def _reference_capacity(module: MoEFeedForward, x: np.ndarray):
    """Loop reference of capacity dispatch: per sequence, slot 0 of every token first, then
    slot 1, ...; an expert takes assignments until it holds C of them."""
    cfg = module.config
    _, _, weights, experts = jax.tree.map(np.asarray, module.route(jnp.asarray(x)))
    cap = expert_capacity(cfg, x.shape[1])
    p = {n: np.asarray(getattr(module, n)[...]) for n in ("gate", "up", "down")}
    y = np.zeros_like(x)
    dropped = 0
    for b in range(x.shape[0]):
        fill = np.zeros(cfg.moe_num_experts, int)
        for k in range(cfg.moe_top_k):
            for t in range(x.shape[1]):
                e = experts[b, t, k]
                if fill[e] >= cap:
                    dropped += 1
                    continue
                fill[e] += 1
                h = x[b, t] @ p["gate"][e]
                h = h / (1 + np.exp(-h)) * (x[b, t] @ p["up"][e])
                y[b, t] += weights[b, t, k] * (h @ p["down"][e])
    return y, dropped


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_capacity_drops_in_priority_order(factor):
    config = _config(moe_dispatch="capacity", moe_capacity_factor=factor)
    module = MoEFeedForward(config, rngs=nnx.Rngs(3))
    module.router[...] = module.router[...] * 20.0  # peaked routing: some experts overflow
    x = _x(b=3, t=16)
    expected, dropped = _reference_capacity(module, x)
    y, aux = module(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-4)
    assert float(aux["dropped_tokens"]) == dropped
    if factor == 0.5:
        assert dropped > 0


def test_aux_losses_match_formulas():
    module = MoEFeedForward(_config(), rngs=nnx.Rngs(4))
    x = _x(b=2, t=9)
    logits, probs, _, experts = jax.tree.map(np.asarray, module.route(jnp.asarray(x)))
    _, aux = module(jnp.asarray(x))
    e, k = LLM.moe_num_experts, LLM.moe_top_k
    counts = np.bincount(experts.reshape(-1), minlength=e)
    expected_lb = e * np.sum(counts / (2 * 9 * k) * probs.reshape(-1, e).mean(0))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(aux["load_balance_loss"]), expected_lb, rtol=1e-5)
    np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse ** 2), rtol=1e-5)


def test_sorted_and_capacity_gradients_agree():
    x = jnp.asarray(_x())

    def grads(dispatch):
        cfg = _config(moe_dispatch=dispatch, moe_capacity_factor=float(LLM.moe_num_experts))
        module = MoEFeedForward(cfg, rngs=nnx.Rngs(5))

        def loss(m):
            y, aux = m(x)
            return jnp.mean(y ** 2) + 0.1 * aux["load_balance_loss"] + 0.01 * aux["router_z_loss"]

        return nnx.grad(loss)(module)

    g_sorted, g_capacity = grads("sorted"), grads("capacity")
    for a, b in zip(jax.tree.leaves(g_sorted), jax.tree.leaves(g_capacity)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
    assert float(jnp.abs(g_sorted["router"][...]).sum()) > 0


def test_bfloat16_compute_stays_close():
    module = MoEFeedForward(_config(), rngs=nnx.Rngs(6))
    x = jnp.asarray(_x())
    y32, _ = module(x)
    y16, _ = module(x, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=3e-2 * float(jnp.abs(y32).max()))


def test_bad_config_and_input_are_named():
    with pytest.raises(ValueError, match="moe_dispatch"):
        MoEFeedForward(_config(moe_dispatch="dense"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="moe_top_k"):
        MoEFeedForward(_config(moe_top_k=9), rngs=nnx.Rngs(0))
    module = MoEFeedForward(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, T, 64\]"):
        module(jnp.zeros((2, 3, 32)))


def test_checkpoint_layouts_round_trip():
    module = MoEFeedForward(_config(), rngs=nnx.Rngs(7))
    ours = {n: np.asarray(getattr(module, n)[...]) for n in ("router", "gate", "up", "down")}
    dims = (LLM.d_model, LLM.moe_num_experts, LLM.moe_hidden_size)
    hf = moe_weights.moe_to_hf(ours, "model.layers.3.mlp.")
    assert hf["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (LLM.d_model, LLM.moe_hidden_size)
    back = moe_weights.moe_from_hf(dict(hf), "model.layers.3.mlp.", *dims)
    mb = moe_weights.moe_to_megablocks(ours, "transformer.blocks.3.ffn.")
    assert mb["transformer.blocks.3.ffn.experts.mlp.w2"].shape == (LLM.moe_num_experts * LLM.moe_hidden_size,
                                                                   LLM.d_model)
    back_mb = moe_weights.moe_from_megablocks(dict(mb), "transformer.blocks.3.ffn.", *dims)
    for name in ours:
        np.testing.assert_array_equal(back[name], ours[name])
        np.testing.assert_array_equal(back_mb[name], ours[name])
    # The megablocks w1 rows of expert i are that expert's gate_proj (spec §7.1).
    np.testing.assert_array_equal(mb["transformer.blocks.3.ffn.experts.mlp.w1"][32:64],
                                  hf["model.layers.3.mlp.experts.1.gate_proj.weight"])
    with pytest.raises(ValueError, match="experts.mlp.v1"):
        bad = dict(mb)
        bad["transformer.blocks.3.ffn.experts.mlp.v1"] = bad["transformer.blocks.3.ffn.experts.mlp.v1"][:5]
        moe_weights.moe_from_megablocks(bad, "transformer.blocks.3.ffn.", *dims)
    with pytest.raises(KeyError, match="experts.0.gate_proj"):
        moe_weights.moe_from_hf({"p.gate.weight": hf["model.layers.3.mlp.gate.weight"]}, "p.", *dims)
