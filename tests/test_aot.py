"""AOT compilation for TPU topologies on CPU (libtpu wheel, no TPU) and the analytic FLOPs."""
import dataclasses

import numpy as np
import pytest

from molmo_jax.model import flops
from molmo_jax.model import config as cfg
from molmo_jax.tools import aot


def test_parameter_count_matches_the_official_checkpoint():
    # model.safetensors.index.json of Molmo-7B-D-0924: metadata.total_parameters.
    assert flops.params_count(cfg.MOLMO_7B_D)["total"] == 8_021_025_280


def test_forward_flops_by_hand_for_the_llm():
    c = cfg.TINY_QWEN2
    llm = c.llm
    per_token = llm.n_layers * (2 * llm.d_model * (llm.n_heads + 2 * llm.n_kv_heads) * llm.head_dim
                                + 2 * llm.n_heads * llm.head_dim * llm.d_model
                                + 2 * llm.d_model * llm.mlp_hidden_size + llm.mlp_hidden_size * llm.d_model)
    per_token += 2 * llm.d_model * llm.embedding_size
    attention = llm.n_layers * 4 * 16 * 16 * llm.n_heads * llm.head_dim
    f = flops.forward_flops(c, batch=3, seq_len=16, num_crops=0)
    assert f["vit"] == f["connector"] == 0
    assert f["llm"] == f["total"] == 3 * (16 * per_token + attention)


def test_analytic_forward_flops_match_xla_on_an_unscanned_model():
    # One block per stack: XLA counts a scanned loop body once, so only then is its count complete.
    # For the same reason the attention is the einsum: the chunked kernel (CPU's "auto") loops over
    # tiles. XLA also counts norms, softmax and activations, hence the 3% margin.
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from molmo_jax.model.molmo import Molmo

    base = cfg.TINY_QWEN2
    c = base.replace(
        vision=dataclasses.replace(base.vision, num_layers=1, feature_layers=(-1, -1), width=128, num_heads=4,
                                   head_dim=32, mlp_dim=512),
        llm=dataclasses.replace(base.llm, n_layers=1, d_model=256, n_heads=4, head_dim=64, n_kv_heads=2,
                                mlp_hidden_size=1024),
        attention="reference")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Molmo(c, rngs=nnx.Rngs(0))))
    b, length, crops, v = 2, 512, 3, c.vision
    args = (jax.ShapeDtypeStruct((b, length), jnp.int32),
            jax.ShapeDtypeStruct((b, crops, v.num_patches, v.patch_dim), jnp.float32),
            jax.ShapeDtypeStruct((b, crops, v.num_patches), jnp.float32),
            jax.ShapeDtypeStruct((b, crops, 144), jnp.int32))
    compiled = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *args).compile()
    analytic = flops.forward_flops(c, b, length, crops)
    assert analytic["vit"] > 0 and analytic["connector"] > 0 and analytic["llm"] > 0
    assert compiled.cost_analysis()["flops"] == pytest.approx(analytic["total"], rel=0.03)


def test_vit_flops_stop_at_the_deepest_feature_layer():
    deeper = cfg.MOLMO_7B_D.replace(vision=dataclasses.replace(cfg.MOLMO_7B_D.vision, feature_layers=(-1, -9)))
    one = flops.forward_flops(cfg.MOLMO_7B_D, 1, 8, 1)["vit"]
    assert flops.vit_blocks_used(cfg.MOLMO_7B_D) == 22 and flops.vit_blocks_used(deeper) == 23
    assert flops.forward_flops(deeper, 1, 8, 1)["vit"] > one


@pytest.mark.parametrize("name, slices, chips, grid", [
    ("v5p-8", 1, 4, (2, 2, 1)), ("v5p-256", 1, 128, (4, 4, 8)), ("v5e-256", 2, 512, (16, 16)),
    ("v6e-16", 1, 16, (4, 4)), ("v4-32", 1, 16, (2, 2, 4)),
])
def test_topology_names(name, slices, chips, grid):
    t = aot.parse_topology(name, slices)
    assert (t.num_chips, t.grid) == (chips, grid)


@pytest.mark.parametrize("name, message", [("v7-8", "unknown topology"), ("v5p-12", "sizes are"),
                                           ("v5e-3", "sizes are")])
def test_bad_topology_is_named(name, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_topology(name)


def test_compile_only_devices_beside_cpu():
    import jax
    devices = aot.parse_topology("v5e-16", slices=2).devices()
    assert len(devices) == 32 and {d.platform for d in devices} == {"tpu"}
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8  # CPU stays the default


def test_demo_train_step_compiles_for_v5p_8(capsys):
    # The trainer's real step (dropout, AdamW groups, z-loss) of the demo config, 4 chips.
    assert aot.main(["--config", "configs/demo.py:pretrain", "--topology", "v5p-8"]) == 0
    out = capsys.readouterr().out
    assert "train step on v5p-8 (4 chips, mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 1}" in out
    assert "of 95 GiB HBM (v5p): fits" in out
    xla = float(out.split("  XLA ")[1].split()[0])
    analytic = float(out.split("  analytic ")[1].split()[0])
    assert xla > 0 and analytic > 0


def test_a_step_that_does_not_fit_exits_non_zero(capsys):
    # Molmo-7B-D stage 2 (batch 256, 13 crops x 2304 tokens) on the 4 chips of a v5e-4.
    assert aot.main(["--config", "configs/molmo_7b_d.py:sft", "--topology", "v5e-4", "--mesh", "fsdp=4"]) == 1
    assert "does not fit on v5e-4" in capsys.readouterr().err


def test_sweep_candidates_cover_the_chips_with_the_batch():
    exp = aot.load_config_file("configs/molmo_7b_d.py:pretrain")  # global batch 128
    mesh, accum = aot.sweep_candidates(exp, aot.parse_topology("v5p-8"))[1]
    assert mesh == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1} and accum == 32  # 1 sequence per chip
    # 512 chips for 128 sequences: tensor parallelism 4 inside each slice, data parallel across.
    assert aot.sweep_candidates(exp, aot.parse_topology("v5e-256", slices=2)) == [
        ({"data": 2, "fsdp": 64, "tensor": 4, "expert": 1}, 1)]


def test_table_says_which_rows_are_missing():
    row = dict(model="Molmo-7B-D", stage="pretrain", gen="v5p", slice="v5p-8", chips=4,
               mesh={"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}, remat="full", grad_accum=32,
               total_gib=41.5, hbm_gib=95.0, analytic_flops=1.5e16, peak_flops=459e12)
    table = aot.table_markdown({"Molmo-7B-D|pretrain|v5p": row}, ["v5p"], mfu=0.5).splitlines()
    assert table[2] == ("| Molmo-7B-D | pretrain | v5p | v5p-8 (4 chips) | 1, 4, 1 | full | 32 | 41.5 GiB (95) "
                        "| 1.5e+16 | 16.34 s |")
    assert table[3] == "| Molmo-7B-D | sft | v5p | not computed | | | | | | |"


def test_forward_flops_of_a_kv_cache_call():
    # A decode step: one token per row attending to every cache slot; no images.
    c, slots = cfg.TINY_QWEN2, 96
    llm = c.llm
    one_token = flops.forward_flops(c, batch=3, seq_len=1, num_crops=0)["total"]  # attends to itself only
    extra = llm.n_layers * 4 * 1 * (slots - 1) * llm.n_heads * llm.head_dim
    assert flops.forward_flops(c, batch=3, seq_len=1, num_crops=0, kv_len=slots)["total"] == one_token + 3 * extra


@pytest.fixture(scope="module")
def one_block_demo():
    # The demo config with one block per stack (XLA counts a scanned body once, so only then is
    # its FLOP count complete), widened so that matmuls dominate norms, softmax and param casts
    # (as in the unscanned forward test above); batch 64 for the decode step's per-step casts.
    exp = aot.prepare_config(aot.load_config_file("configs/demo.py:pretrain"), batch=64)
    exp.model.llm.update(dict(n_layers=1, d_model=256, n_heads=4, head_dim=64, n_kv_heads=2, mlp_hidden_size=1024))
    exp.model.vision.update(dict(num_layers=1, feature_layers=(-1, -1), width=128, num_heads=4, head_dim=32,
                                 mlp_dim=512))
    return exp


def _xla_over_analytic(report):
    return report.xla_flops_per_chip * report.topology.num_chips / report.analytic_flops


def test_eval_step_compiles_and_counts_the_forward_flops(one_block_demo):
    [report] = aot.compile_report(one_block_demo, aot.parse_topology("v5p-8"), "eval")
    assert report.step == "eval" and report.fits
    assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.alias_bytes == 0  # nothing donated
    assert report.tokens == 64 * 256
    # The loss and norms come on top of the model FLOPs.
    assert _xla_over_analytic(report) == pytest.approx(1.0, rel=0.04)


def test_decode_compiles_prefill_and_one_token_step(one_block_demo):
    prefill, decode = aot.compile_report(one_block_demo, aot.parse_topology("v5p-8"), "decode", prompt_len=64,
                                         max_new_tokens=64)
    assert (prefill.step, decode.step) == ("prefill", "decode")
    assert "prompt 64 tokens + 3 crops, cache 128 slots" in prefill.shape
    assert (prefill.tokens, decode.tokens) == (64 * 64, 64)
    for r in (prefill, decode):
        assert r.fits and r.argument_bytes > 0 and r.temp_bytes > 0
        assert _xla_over_analytic(r) == pytest.approx(1.0, rel=0.04)
    # The decode step updates the donated KV cache in place: bf16 k and v of 1 layer, 64 rows x 128 slots x
    # 2 kv heads x 64, split over the 4 chips (plus the valid mask).
    cache_bytes = 2 * 64 * 128 * 2 * 64 * 2 // 4
    assert decode.alias_bytes >= cache_bytes


def test_cli_eval_and_decode_on_the_demo_config(capsys):
    assert aot.main(["--config", "configs/demo.py:pretrain", "--topology", "v5p-8", "--step", "decode",
                     "--prompt-len", "32", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "prefill step on v5p-8" in out and "decode step on v5p-8" in out
    assert "batch 8, 1 token, cache 48 slots" in out
    assert aot.main(["--config", "configs/demo.py:pretrain", "--topology", "v5p-8", "--step", "eval"]) == 0
    assert "eval step on v5p-8" in capsys.readouterr().out


def test_decode_that_does_not_fit_exits_1(capsys):
    # 4096 prompts of 8192 tokens: the prefill's logits and ViT activations alone exceed a v5e's 16 GiB.
    assert aot.main(["--config", "configs/demo.py:pretrain", "--topology", "v5e-4", "--step", "decode",
                     "--batch", "4096", "--prompt-len", "8192"]) == 1
    assert "decode step does not fit on v5e-4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--step", "eval", "--prompt-len", "32"], "apply to --step decode"),
    (["--step", "decode", "--grad-accum", "2"], "applies to --step train"),
    (["--step", "decode", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_step_flags_are_checked(args, message, capsys):
    assert aot.main(["--config", "configs/demo.py:pretrain", "--topology", "v5p-8"] + args) == 2
    assert message in capsys.readouterr().err


def test_eval_step_is_the_token_loss_of_the_model():
    # What --step eval compiles, run on CPU against the loss written out in numpy: padding
    # (weight -1) carries no loss, z-loss included.
    import jax
    import numpy as np
    from flax import nnx
    from configs import common
    from molmo_jax.model import sharding
    from molmo_jax.train import optimizer as opt_lib, trainer

    exp = aot.load_config_file("configs/demo.py:pretrain")
    exp.model = common.model_config(cfg.TINY_QWEN2)
    exp.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    mesh = sharding.make_mesh(exp.mesh.to_dict(), jax.devices()[:1])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (4, 32)).astype(np.int32)
    targets = np.roll(ids, -1, 1)
    weights = np.where(rng.random((4, 32)) < 0.6, 1.0, -1.0).astype(np.float32)
    batch = sharding.make_global_batch({"input_ids": ids, "target_tokens": targets, "loss_masks": weights}, mesh)
    setup = trainer.build_train_setup(exp, trainer.model_config_from(exp), mesh)
    # Random params of the trainer's structure (its jitted init compiles for far longer than this test).
    params, frozen = (jax.tree.map(lambda a: (0.5 * rng.standard_normal(a.shape)).astype(a.dtype),
                                   setup.abstract_state[k]) for k in ("params", "frozen"))
    got = jax.device_get(jax.jit(trainer.make_eval_step(setup.graphdef, exp))(params, frozen, batch))

    model = nnx.merge(setup.graphdef, opt_lib.merge_trees(params, frozen))
    logits = np.asarray(model(ids), np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = np.maximum(weights, 0)
    assert float(got["loss_tokens"]) == w.sum()
    assert float(got["ce_loss"]) == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
    assert float(got["z_loss"]) == pytest.approx(exp.train.z_loss_weight * (lse ** 2 * w).sum() / w.sum(), rel=1e-4)
    assert float(got["accuracy"]) == pytest.approx(((logits.argmax(-1) == targets) * w).sum() / w.sum())


def test_attention_is_lowered_with_the_splash_kernel_for_tpu():
    """On this CPU machine, attention traced for a TPU device under target_platform("tpu") is the
    Pallas splash kernel (a Mosaic custom call that libtpu compiles), and the XLA einsum without it."""
    import jax
    import jax.numpy as jnp
    from molmo_jax.model import attention
    from molmo_jax.model.attention_mask import AttentionMask

    device = jax.sharding.SingleDeviceSharding(aot.parse_topology("v5p-8").devices()[0])
    q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16, sharding=device)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16, sharding=device)
    valid = jax.ShapeDtypeStruct((2, 1024), jnp.bool_, sharding=device)

    def lowered():  # a new function each time: jit's trace cache does not key on the platform
        return jax.jit(lambda q, k, v, valid: attention.dot_product_attention(
            q, k, v, AttentionMask(key_valid=valid), implementation="auto")).lower(q, kv, kv, valid)

    with attention.target_platform("tpu"):
        kernel = lowered()
    assert "tpu_custom_call" in kernel.as_text()
    assert kernel.compile().memory_analysis() is not None
    assert "tpu_custom_call" not in lowered().as_text()


def test_useful_flops_leave_out_padding_tokens_and_crops():
    """MFU's numerator: a row's FLOPs are those of its real tokens and crops only."""
    from molmo_jax.model.config import TINY_QWEN2
    from molmo_jax.train.metrics_logging import train_step_flops, useful_train_step_flops

    v = TINY_QWEN2.vision
    ids = np.zeros((2, 64), np.int32)
    ids[1, 40:] = -1  # row 1: 40 real tokens
    images = np.zeros((2, 3, v.num_patches, v.patch_dim), np.float32)
    images[1, 1:] = -1  # row 1: one real crop
    useful = useful_train_step_flops(TINY_QWEN2, ids, images)
    assert useful == train_step_flops(TINY_QWEN2, 1, 64, 3) + train_step_flops(TINY_QWEN2, 1, 40, 1)
    assert useful < train_step_flops(TINY_QWEN2, 2, 64, 3)
    assert useful_train_step_flops(TINY_QWEN2, ids[:1], images[:1]) == train_step_flops(TINY_QWEN2, 1, 64, 3)



def test_molmo2_analytic_forward_flops_match_xla_on_an_unscanned_model():
    # Molmo2's training layout (a crop and pooled-token budget per row), one block per stack.
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from molmo_jax.model import molmo2_config, molmo2_flops
    from molmo_jax.model.molmo2 import Molmo2

    base = molmo2_config.TINY_MOLMO2_QWEN3
    c = base.replace(
        vision=dataclasses.replace(base.vision, num_layers=1, feature_layers=(-1, -1), width=128, num_heads=4,
                                   head_dim=32, mlp_dim=512),
        adapter=dataclasses.replace(base.adapter, width=128, num_heads=4, head_dim=32, projector_hidden=512),
        llm=dataclasses.replace(base.llm, n_layers=1, d_model=256, n_heads=4, head_dim=64, n_kv_heads=2,
                                mlp_hidden_size=1024))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Molmo2(c, rngs=nnx.Rngs(0))))
    b, length, crops, pooled, slots, v = 2, 512, 3, 40, 9, c.vision
    args = (jax.ShapeDtypeStruct((b, length), jnp.int32),
            jax.ShapeDtypeStruct((b, crops, v.num_patches, v.patch_dim), jnp.float32),
            jax.ShapeDtypeStruct((b, pooled, slots), jnp.int32))
    compiled = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *args).compile()
    analytic = molmo2_flops.forward_flops(c, b, length, crops, pooled, slots)
    assert analytic["vit"] > 0 and analytic["connector"] > 0 and analytic["llm"] > 0
    assert compiled.cost_analysis()["flops"] == pytest.approx(analytic["total"], rel=0.03)


def test_molmo2_train_step_compiles_for_v5p_8(capsys):
    # The trainer's step on the tiny Molmo2's row budget (configs/molmo2_tiny.py), 4 chips.
    from molmo_jax.train import families, trainer
    assert aot.main(["--config", "configs/molmo2_tiny.py:olmo3", "--topology", "v5p-8"]) == 0
    out = capsys.readouterr().out
    assert "train step on v5p-8 (4 chips, mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 1}" in out
    assert "batch 4 x 128 tokens, 4 crops/frames, 16 pooled tokens x 9 slots per row" in out
    exp = aot.prepare_config(aot.load_config_file("configs/molmo2_tiny.py:olmo3"))
    expected = families.step_flops(families.MOLMO2, trainer.model_config_from(exp), exp, 4)
    assert float(out.split("  analytic ")[1].split()[0]) == pytest.approx(expected, rel=1e-3)


def test_molmo2_has_no_decode_plan(capsys):
    assert aot.main(["--config", "configs/molmo2_tiny.py", "--topology", "v5p-8", "--step", "decode"]) == 2
    assert "has train and eval plans only" in capsys.readouterr().err
