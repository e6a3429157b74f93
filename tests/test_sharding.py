"""Mesh construction, logical axis rules on the real tiny Molmo, the replicated-bytes check and
the config-vs-devices validation (8 fake CPU devices from conftest)."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from molmo_jax.model import sharding
from molmo_jax.model.config import TINY_MOE, TINY_QWEN2
from molmo_jax.model.molmo import Molmo


def abstract_params(cfg):
    return nnx.split(nnx.eval_shape(lambda: Molmo(cfg, rngs=nnx.Rngs(0))))[1]


def flat_specs(cfg, mesh):
    specs = sharding.state_specs(abstract_params(cfg), mesh)
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert sharding.resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 6 devices but 8 are present"):
        sharding.resolve_mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axis \\['model'\\]"):
        sharding.resolve_mesh_shape({"model": 8}, 8)
    with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
        sharding.resolve_mesh_shape({"data": -1, "tensor": 3}, 8)


def test_rules_prefer_tensor_then_fsdp_and_fall_back_when_not_divisible():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    assert sharding.logical_to_spec(("vocab", "embed"), (512, 64), mesh) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == \
        P(None, "fsdp", "tensor", None)
    # 2 kv heads cannot be split 4 ways: replicated on tensor, the width still FSDP-sharded.
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh) == \
        P(None, "fsdp", None, None)
    # A bias with only an "mlp" dim takes tensor; without tensor it falls back to fsdp.
    assert sharding.logical_to_spec(("mlp",), (128,), mesh) == P("tensor")
    fsdp_only = sharding.make_mesh({"fsdp": 8})
    assert sharding.logical_to_spec(("mlp",), (128,), fsdp_only) == P("fsdp")
    assert sharding.logical_to_spec(("vocab", "embed"), (512, 64), fsdp_only) == P(None, "fsdp")
    with pytest.raises(ValueError, match="do not match the array shape"):
        sharding.logical_to_spec(("embed",), (4, 4), mesh)


def test_every_tiny_molmo_param_is_named_and_big_ones_are_sharded():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    params = abstract_params(TINY_QWEN2)
    unnamed = [p for p, v in nnx.to_flat_state(params) if sharding.variable_names(v) is None]
    assert unnamed == []
    specs = flat_specs(TINY_QWEN2, mesh)
    assert specs["llm/embed/embedding"] == P("tensor", "fsdp")
    assert specs["llm/lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["llm/blocks/ffn/mlp/down/kernel"] == P(None, "tensor", "fsdp")
    assert specs["vision/blocks/w1/kernel"] == P(None, "fsdp", "tensor")
    # Tiny widths make biases/norms a visible share; the check passes at a loose bound ...
    frac = sharding.check_sharded_enough(params, sharding.state_specs(params, mesh), mesh, 0.2)
    assert 0 < frac < 0.2
    # ... and names the largest replicated arrays when the bound is tight.
    with pytest.raises(ValueError, match="of parameter bytes are replicated.*Largest: "):
        sharding.check_sharded_enough(params, sharding.state_specs(params, mesh), mesh, 0.01)


def test_moe_experts_go_on_the_expert_axis():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    specs = flat_specs(TINY_MOE, mesh)
    expert_specs = {k: v for k, v in specs.items() if k in ("llm/blocks/ffn/up", "llm/blocks/ffn/gate", "llm/blocks/ffn/down")}
    assert len(expert_specs) == 3 and all(s[1] == "expert" for s in expert_specs.values()), expert_specs


def test_validation_refuses_impossible_configs_with_every_reason():
    sizes = {"data": 1, "fsdp": 2, "tensor": 8, "expert": 1}
    with pytest.raises(ValueError) as e:
        sharding.validate_parallelism(TINY_QWEN2, sizes, global_batch=6, grad_accum_steps=4, process_count=4)
    msg = str(e.value)
    assert "global batch 6 is not divisible by grad_accum_steps 4" in msg
    assert "global batch 6 is not divisible by the 4 processes" in msg
    assert "llm.n_heads = 4 is not divisible by the tensor axis 8" in msg
    with pytest.raises(ValueError, match="micro-batch 6 .* not divisible by the batch axes data\\*fsdp\\*expert = 4"):
        sharding.validate_parallelism(TINY_QWEN2, {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}, 12, 2, 1)
    with pytest.raises(ValueError, match="moe_num_experts = 8 is not divisible by the expert axis 3"):
        sharding.validate_parallelism(TINY_MOE, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 3}, 6, 1, 1)
    sharding.validate_parallelism(TINY_QWEN2, {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}, 8, 2, 1)


def test_global_batch_is_split_over_the_batch_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    local = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    g = sharding.make_global_batch(local, mesh)["input_ids"]
    assert g.shape == (8, 3) and g.sharding.spec == P(("data", "fsdp", "expert"))
    np.testing.assert_array_equal(np.asarray(g), local["input_ids"])
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
