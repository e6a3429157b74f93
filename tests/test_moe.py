"""Mixture of experts: routing and experts against transformers' OLMoE, capacity dropping,
auxiliary losses, checkpoint layouts, and expert parallelism on 8 fake CPU devices."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from molmo_jax.convert import hf_backbones, hf_molmo, moe_weights
from molmo_jax.convert.hf_folder import read_hf_tensors
from molmo_jax.convert.links import CheckpointError, link_shapes, params_to_tensors, tensors_to_params
from molmo_jax.model.config import TINY_MOE
from molmo_jax.model.moe import MoEFeedForward, expert_capacity

import torch  # the "torch" extra, which `make test` installs
import transformers

LLM = TINY_MOE.llm  # d_model 64, 8 experts, top-2, expert width 64


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


def _abstract(config):
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MoEFeedForward(config, rngs=nnx.Rngs(0))), nnx.Param))


def _from_tensors(tensors, layout, prefix="mlp", config=LLM):
    links = moe_weights.moe_links(config, prefix, (), None, layout)
    return tensors_to_params(tensors, links, _abstract(config))


def _to_tensors(params, layout, prefix="mlp", config=LLM):
    links = moe_weights.moe_links(config, prefix, (), None, layout)
    return params_to_tensors(params, links, _abstract(config))


@nnx.jit
def _apply(module, x):
    return module(x)


def _x(b=2, t=7, seed=1):
    return np.random.RandomState(seed).randn(b, t, LLM.d_model).astype(np.float32)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dispatch", ["sorted", "capacity"])
def test_matches_transformers_olmoe_block(renormalize, dispatch):
    block = _hf_block(renormalize)
    params = _from_tensors({f"mlp.{k}": v.numpy() for k, v in block.state_dict().items()}, "fused")
    # Capacity factor E makes C = k*T: nothing can be dropped, so both modes are exact.
    config = _config(moe_renormalize=renormalize, moe_dispatch=dispatch,
                     moe_capacity_factor=float(LLM.moe_num_experts))
    module = _load(MoEFeedForward(config, rngs=nnx.Rngs(0)), params)
    x = _x()
    with torch.no_grad():
        expected = block(torch.from_numpy(x)).numpy()
    y, aux = _apply(module, jnp.asarray(x))
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
    y, aux = _apply(module, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-4)
    assert float(aux["dropped_tokens"]) == dropped
    if factor == 0.5:
        assert dropped > 0


def test_aux_losses_match_formulas():
    module = MoEFeedForward(_config(), rngs=nnx.Rngs(4))
    x = _x(b=2, t=9)
    logits, probs, _, experts = jax.tree.map(np.asarray, module.route(jnp.asarray(x)))
    _, aux = _apply(module, jnp.asarray(x))
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

        return nnx.jit(nnx.grad(loss))(module)

    g_sorted, g_capacity = grads("sorted"), grads("capacity")
    for a, b in zip(jax.tree.leaves(g_sorted), jax.tree.leaves(g_capacity)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)
    assert float(jnp.abs(g_sorted["router"][...]).sum()) > 0


def test_megablox_kernel_matches_ragged_dot():
    """The TPU grouped matmul (Pallas interpreter here) in its shard_map over 8 devices:
    values and gradients equal jax.lax.ragged_dot, including an empty group and row counts
    that divide neither the tiles nor the devices."""
    import functools

    from molmo_jax.model import sharding
    from molmo_jax.model.moe import megablox_sharded

    x = jax.random.normal(jax.random.key(0), (60, 64))
    w = jax.random.normal(jax.random.key(1), (4, 64, 96))
    sizes = jnp.array([10, 0, 35, 15], jnp.int32)

    def value_and_grads(matmul):
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(matmul(x, w, sizes))), argnums=(0, 1))(x, w)

    expected = value_and_grads(jax.lax.ragged_dot)
    with jax.set_mesh(sharding.make_mesh({"data": 2, "expert": 4})):
        got = value_and_grads(functools.partial(megablox_sharded, interpret=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5),
                 got, expected)


def test_tpu_compilation_uses_the_grouped_kernel():
    """Compiled for TPU (compile-only devices): "sorted" costs the useful FLOPs through the
    Megablox kernel (ragged_dot would cost E times that), also inside an expert-sharded mesh."""
    from molmo_jax.model import sharding
    from molmo_jax.tools import aot

    config = _config(d_model=256, moe_hidden_size=256, mlp_hidden_size=512)
    devices = aot.parse_topology("v5e-4").devices()
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MoEFeedForward(config, rngs=nnx.Rngs(0))))
    tokens, e, k = 2 * 512, config.moe_num_experts, config.moe_top_k
    useful = 3 * 2 * tokens * k * 3 * config.d_model * config.moe_hidden_size  # forward + backward

    def compile_on(mesh):
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        specs = sharding.state_specs(params, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                   sharding=jax.sharding.NamedSharding(mesh, s)),
                                params, specs)
        x = jax.ShapeDtypeStruct((2, 512, config.d_model), jnp.float32, sharding=replicated)

        def loss(p, x):
            return jnp.sum(nnx.merge(graphdef, p)(x, jnp.bfloat16)[0].astype(jnp.float32) ** 2)

        with jax.set_mesh(mesh):
            return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abstract, x).compile()

    compiled = compile_on(sharding.make_mesh({"expert": 4}, devices))
    assert "tpu_custom_call" in compiled.as_text()
    flops = compiled.cost_analysis()["flops"] * len(devices)  # reported per device
    assert useful <= flops < 1.5 * useful, (flops, useful, e)


def test_bfloat16_compute_stays_close():
    module = MoEFeedForward(_config(), rngs=nnx.Rngs(6))
    x = jnp.asarray(_x())
    y32, _ = _apply(module, x)
    y16, _ = nnx.jit(lambda m, x: m(x, jnp.bfloat16))(module, x)
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
    e, d, f = LLM.moe_num_experts, LLM.d_model, LLM.moe_hidden_size
    tensors = {layout: _to_tensors(ours, layout) for layout in moe_weights.LAYOUTS}
    assert tensors["per_expert"]["mlp.experts.7.down_proj.weight"].shape == (d, f)
    assert tensors["fused"]["mlp.experts.gate_up_proj"].shape == (e, 2 * f, d)
    assert tensors["megablocks"]["mlp.experts.mlp.w2"].shape == (e * f, d)
    for layout, t in tensors.items():
        back = _from_tensors(dict(t), layout)
        for name in ours:
            np.testing.assert_array_equal(back[name], ours[name], err_msg=f"{layout}: {name}")
    # Expert i's rows of megablocks w1 are its gate_proj, of the fused tensor gate then up (spec §7.1).
    np.testing.assert_array_equal(tensors["megablocks"]["mlp.experts.mlp.w1"][f:2 * f],
                                  tensors["per_expert"]["mlp.experts.1.gate_proj.weight"])
    np.testing.assert_array_equal(tensors["fused"]["mlp.experts.gate_up_proj"][1, f:],
                                  tensors["per_expert"]["mlp.experts.1.up_proj.weight"])
    bad = dict(tensors["megablocks"])
    bad["mlp.experts.mlp.v1"] = bad["mlp.experts.mlp.v1"][:5]
    with pytest.raises(CheckpointError, match="experts.mlp.v1"):
        _from_tensors(bad, "megablocks")
    missing = dict(tensors["per_expert"])
    del missing["mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        _from_tensors(missing, "per_expert")
    with pytest.raises(CheckpointError, match="unknown MoE checkpoint layout"):
        _from_tensors({}, "grouped")


@pytest.mark.parametrize("dispatch, mesh_axes", [("sorted", {"data": 2, "expert": 4}),
                                                 ("capacity", {"fsdp": 2, "tensor": 2, "expert": 2})])
def test_expert_parallel_train_step_matches_one_device(dispatch, mesh_axes):
    """One SGD step of the tiny MoE LLM on 8 devices (experts split over the "expert" axis,
    FSDP / tensor parallelism on the rest) gives the loss, aux values and updated parameters
    of one device."""
    import optax
    from molmo_jax.model import sharding
    from molmo_jax.model.llm import LLM as Decoder

    config = _config(moe_dispatch=dispatch, moe_capacity_factor=1.0, n_layers=1)
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (8, 16)).astype(np.int32)
    tx = optax.sgd(0.5)

    def loss_fn(params, ids):
        llm = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        logits, _, aux = llm(llm.embed_tokens(ids), positions, token_valid=jnp.ones(ids.shape, bool))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
        return nll + 0.01 * aux["load_balance_loss"] + 0.001 * aux["router_z_loss"], aux

    def step(params, opt_state, ids):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), loss, aux

    one = jax.jit(step)(params, tx.init(params), ids)

    mesh = sharding.make_mesh(mesh_axes)
    specs = sharding.state_specs(params, mesh)
    expected = ("expert", "fsdp", "tensor") if "tensor" in mesh_axes else ("expert", None, None)
    assert tuple(specs["blocks"]["ffn"]["gate"].get_value()) == (None, *expected)
    sharded = jax.device_put(params, sharding.named_shardings(specs, mesh))
    with jax.set_mesh(mesh):
        eight = jax.jit(step)(sharded, tx.init(sharded), jax.device_put(ids, sharding.batch_sharding(mesh)))
    assert eight[0]["blocks"]["ffn"]["down"].get_value().sharding.spec[1] == "expert"
    params1, loss1, aux1 = one
    params8, loss8, aux8 = eight
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
                 params8, params1)
    for key in aux1:
        np.testing.assert_allclose(float(aux8[key]), float(aux1[key]), rtol=1e-5, err_msg=key)
    if dispatch == "capacity":
        assert float(aux1["dropped_tokens"]) > 0  # factor 1.0 with a random router drops some


# ----------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def olmoe_hf(tmp_path_factory):
    """A random tiny OlmoeForCausalLM shaped like TINY_MOE.llm, and its hub-layout folder."""
    hf_config = transformers.OlmoeConfig(
        vocab_size=LLM.embedding_size, hidden_size=LLM.d_model, intermediate_size=LLM.moe_hidden_size,
        num_hidden_layers=LLM.n_layers, num_attention_heads=LLM.n_heads, num_key_value_heads=LLM.n_kv_heads,
        rms_norm_eps=LLM.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": LLM.rope_theta},
        num_experts=LLM.moe_num_experts, num_experts_per_tok=LLM.moe_top_k, norm_topk_prob=False,
        max_position_embeddings=64, pad_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("olmoe")
    model.save_pretrained(folder)
    return model, folder


def _llm_logits(params, config, ids):
    from molmo_jax.model.llm import LLM as Decoder

    llm = Decoder(config, rngs=nnx.Rngs(0))
    state = nnx.state(llm, nnx.Param)
    pure = nnx.to_pure_dict(state)
    pure.update({k: v for k, v in params.items() if k != "embed"})
    pure["embed"]["embedding"] = params["embed"]["embedding"]
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, pure))
    nnx.update(llm, state)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, _, aux = llm(llm.embed_tokens(jnp.asarray(ids)), positions, token_valid=jnp.ones(ids.shape, bool))
    return np.asarray(logits), aux


@pytest.mark.parametrize("dispatch", ["sorted", "capacity"])
def test_olmoe_llm_matches_transformers(olmoe_hf, dispatch):
    """transformers OlmoeForCausalLM (random tiny weights) == our LLM after conversion, from
    the in-memory (fused experts) state dict and from the hub-layout safetensors file."""
    from safetensors.numpy import load_file


    model, folder = olmoe_hf
    config = _config(moe_dispatch=dispatch, moe_capacity_factor=float(LLM.moe_num_experts))
    fused = hf_backbones.llm_params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, config)
    hub = hf_backbones.llm_params_from_hf(load_file(str(folder / "model.safetensors")), config)
    jax.tree.map(np.testing.assert_array_equal, fused, hub)
    ids = np.random.RandomState(0).randint(0, LLM.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    logits, aux = _llm_logits(hub, config, ids)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    assert float(aux["dropped_tokens"]) == 0.0


def test_olmoe_export_loads_in_transformers(olmoe_hf, tmp_path):
    """Our tiny MoE LLM written in the hub layout loads into OlmoeForCausalLM with equal logits."""
    from safetensors.numpy import save_file

    from molmo_jax.model.llm import LLM as Decoder

    model, folder = olmoe_hf
    llm = Decoder(LLM, rngs=nnx.Rngs(11))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(llm, nnx.Param)))
    tensors = params_to_tensors(params, hf_backbones.llm_links_hf(LLM), params)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in tensors
    model.config.save_pretrained(tmp_path)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    reloaded = transformers.OlmoeForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.random.RandomState(1).randint(0, LLM.vocab_size, (2, 9))
    with torch.no_grad():
        expected = reloaded(torch.from_numpy(ids)).logits.numpy()
    logits, _ = _llm_logits(params, LLM, ids)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


# The LLM / MoE part of MolmoE-1B-0924's config.json (vision and connector keys as released).
MOLMOE_CONFIG_JSON = {
    "block_type": "moe", "d_model": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": None, "head_dim": None,
    "mlp_ratio": 1, "mlp_hidden_size": None, "vocab_size": 50280, "embedding_size": 50304,
    "additional_vocab_size": 128, "layer_norm_type": "rms", "layer_norm_eps": 1e-05, "rope_theta": 10000.0,
    "max_position_embeddings": 32768, "qkv_bias": False, "attention_layer_norm": True, "norm_after": False,
    "clip_qkv": None, "weight_tying": False, "include_bias": False, "rope_impl": "llama", "activation_type": "swiglu",
    "moe_num_experts": 64, "moe_top_k": 8, "moe_dropless": True, "moe_capacity_factor": 1.25,
    "moe_loss_weight": 0.0, "moe_zloss_weight": 0.0, "vit_layers": [-2, -9], "image_pooling_2d": "attention-meanq",
    "image_pooling_h": 2, "image_pooling_w": 2, "image_padding_embed": "pad_and_partial_pad", "image_projector": "mlp",
    "vision_backbone": {
        "image_default_input_size": [336, 336], "image_patch_size": 14, "image_emb_dim": 1024, "image_num_heads": 16,
        "image_num_key_value_heads": 16, "image_head_dim": 64, "image_num_layers": 23, "image_mlp_dim": 4096,
        "image_mlp_activations": "quick_gelu", "image_num_pos": 577, "image_norm_eps": 1e-05},
}


def test_molmoe_1b_preset_config_and_parameter_count():
    from molmo_jax.model.config import MOLMOE_1B
    from molmo_jax.model.molmo import Molmo

    assert hf_molmo.config_from_hf(MOLMOE_CONFIG_JSON) == MOLMOE_1B
    assert hf_molmo.config_from_hf(hf_molmo.config_to_hf(MOLMOE_1B)) == MOLMOE_1B
    abstract = nnx.eval_shape(lambda: Molmo(MOLMOE_1B, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 7_221_875_712
    # The official key layout on shapes only: every key once, same total.
    shapes = {}
    abstract_pure = hf_molmo.abstract_params(MOLMOE_1B)
    for link in hf_molmo.molmo_links(MOLMOE_1B):
        ours = link_shapes(link, abstract_pure)
        shapes.update(zip(link.hf, link.hf_shapes(*ours)))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 7_221_875_712
    assert shapes["lm_head.weight"] == (50304, 2048)
    assert shapes["model.transformer.blocks.15.attn.att_proj.weight"] == (6144, 2048)
    assert shapes["model.transformer.blocks.0.mlp.gate.weight"] == (64, 2048)
    assert shapes["model.transformer.blocks.3.mlp.experts.63.down_proj.weight"] == (2048, 1024)
    assert shapes["model.transformer.blocks.3.mlp.ff_norm.weight"] == (2048,)
    assert len([k for k in shapes if ".mlp.experts." in k]) == 16 * 64 * 3


def test_molmoe_checkpoint_round_trip(tmp_path):
    from molmo_jax.model.molmo import Molmo

    model = Molmo(TINY_MOE, rngs=nnx.Rngs(2))
    hf_molmo.save_hf_checkpoint(str(tmp_path), model, TINY_MOE)
    config, state = hf_molmo.load_hf_checkpoint(str(tmp_path))
    assert config == TINY_MOE
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state),
                 nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = read_hf_tensors(str(tmp_path))
    assert {"lm_head.weight", "model.transformer.blocks.1.mlp.experts.7.gate_proj.weight",
            "model.transformer.blocks.1.attn.q_norm.weight"} <= set(tensors)
    del tensors["model.transformer.blocks.1.mlp.experts.7.gate_proj.weight"]
    with pytest.raises(CheckpointError, match="experts.7.gate_proj"):
        hf_molmo.hf_to_params(tensors, TINY_MOE)
