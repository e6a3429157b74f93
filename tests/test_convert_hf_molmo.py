"""The official HF layout <-> our parameters: key coverage and shapes on the real 7B-D key list
(abstract shapes only), parameter totals, config round trips, byte-identical read/write,
and clear errors for checkpoints that do not fit."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from molmo_jax.convert import hf_molmo
from molmo_jax.convert.hf_folder import INDEX, read_hf_tensors
from molmo_jax.convert.links import CheckpointError
from molmo_jax.model import config as cfg

OFFICIAL_TOTALS = {"molmo-7b-d": 8_021_025_280, "molmo-72b": 73_308_285_952, "molmo-7b-o": 7_665_032_192}


@pytest.mark.parametrize("name", sorted(OFFICIAL_TOTALS))
def test_preset_parameter_totals(name):
    abstract = hf_molmo.abstract_params(cfg.get_preset(name))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == OFFICIAL_TOTALS[name]


@pytest.fixture(scope="module")
def real_7b_d(golden_dir):
    folder = golden_dir / "molmo-7b-d-hf"
    shapes = json.loads((folder / "weight_shapes.json").read_text())["shapes"]
    return json.loads((folder / "config.json").read_text()), {k: tuple(v) for k, v in shapes.items()}


def test_preset_from_real_config_equals_builtin(real_7b_d):
    config_json, _ = real_7b_d
    assert hf_molmo.config_from_hf(config_json) == cfg.MOLMO_7B_D


def test_every_real_7b_d_key_maps_both_ways(real_7b_d):
    _, shapes = real_7b_d
    config = cfg.MOLMO_7B_D
    abstract = hf_molmo.abstract_params(config)
    # ours -> official: exactly the real key set, every shape equal.
    written = jax.eval_shape(lambda p: hf_molmo.params_to_hf(p, config), abstract)
    assert set(written) == set(shapes)
    assert {k: tuple(v.shape) for k, v in written.items()} == shapes
    # official -> ours: every parameter filled with its own shape, nothing left over.
    sd = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    read = jax.eval_shape(lambda d: hf_molmo.hf_to_params(d, config), sd)
    assert jax.tree.structure(read) == jax.tree.structure(abstract)
    assert jax.tree.map(lambda a: a.shape, read) == jax.tree.map(lambda a: a.shape, abstract)


@pytest.mark.parametrize("name", ["molmo-7b-d", "molmo-72b", "molmo-7b-o", "tiny-qwen2", "tiny-olmo"])
def test_config_json_round_trip(name):
    preset = cfg.get_preset(name)
    assert hf_molmo.config_from_hf(hf_molmo.config_to_hf(preset)) == preset


@pytest.mark.parametrize("arch", ["qwen2_style", "olmo_style"])
def test_read_write_is_byte_identical(golden_dir, tmp_path, arch):
    src = golden_dir / "model" / arch
    original = load_file(str(src / "model.safetensors"))
    config, params = hf_molmo.load_hf_checkpoint(str(src))
    assert config == hf_molmo.config_from_hf(json.loads((src / "config.json").read_text()))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    hf_molmo.save_hf_checkpoint(str(single), params, config)
    hf_molmo.save_hf_checkpoint(str(sharded), params, config, max_shard_bytes=1 << 20)
    assert len(json.loads((sharded / INDEX).read_text())["weight_map"]) == len(original)
    for folder in (single, sharded):
        again = read_hf_tensors(str(folder))
        assert set(again) == set(original)
        for key, value in original.items():
            assert again[key].dtype == value.dtype and again[key].tobytes() == value.tobytes(), key
        assert hf_molmo.read_hf_config(str(folder)) == config


@pytest.fixture(scope="module")
def olmo_state(golden_dir):
    folder = golden_dir / "model" / "olmo_style"
    config, sd = hf_molmo.read_hf_config(str(folder)), load_file(str(folder / "model.safetensors"))
    return config, sd, hf_molmo.hf_to_params(sd, config)


def test_wrong_shape_names_key_and_both_shapes(olmo_state):
    config, sd, _ = olmo_state
    key = "model.transformer.blocks.1.att_proj.weight"
    bad = dict(sd, **{key: np.zeros((10, 96), np.float32)})
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att_proj\.weight.*\(10, 96\).*\(288, 96\)"):
        hf_molmo.hf_to_params(bad, config)


def test_missing_and_unexpected_keys_are_named(olmo_state):
    config, sd, _ = olmo_state
    bad = {k: v for k, v in sd.items() if k != "model.transformer.blocks.0.q_norm.weight"}
    bad["model.transformer.blocks.0.att_proj.bias"] = np.zeros(288, np.float32)
    pattern = (r"missing \['model\.transformer\.blocks\.0\.q_norm\.weight'\]"
               r".*unexpected \['model\.transformer\.blocks\.0\.att_proj\.bias'\]")
    with pytest.raises(CheckpointError, match=pattern):
        hf_molmo.hf_to_params(bad, config)


def test_training_checkpoint_names_without_prefix(olmo_state):
    config, sd, params = olmo_state
    stripped = {k[len("model."):]: v for k, v in sd.items()}
    again = hf_molmo.hf_to_params(stripped, config)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), again, params))


def test_truncated_file_is_a_clear_error(golden_dir, tmp_path):
    src = golden_dir / "model" / "olmo_style"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hf_molmo.load_hf_checkpoint(str(tmp_path))


def test_missing_files_are_clear_errors(golden_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        hf_molmo.read_hf_config(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        read_hf_tensors(str(tmp_path))
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                       "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which does not exist"):
        read_hf_tensors(str(tmp_path))


def test_unsupported_config_fields_are_named(real_7b_d):
    config_json, _ = real_7b_d
    with pytest.raises(CheckpointError, match="clip_qkv=8.0"):
        hf_molmo.config_from_hf(dict(config_json, clip_qkv=8.0))
    with pytest.raises(CheckpointError, match="missing required key 'hidden_size'"):
        hf_molmo.config_from_hf({k: v for k, v in config_json.items() if k != "hidden_size"})


def test_bfloat16_checkpoint_loads_as_float32_params(olmo_state, tmp_path):
    config, sd, params = olmo_state
    hf_molmo.save_hf_checkpoint(str(tmp_path), params, config, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in read_hf_tensors(str(tmp_path)).values())
    _, state = hf_molmo.load_hf_checkpoint(str(tmp_path))
    loaded = nnx.to_pure_dict(state)
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16).astype(np.float32), params)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == np.float32 and np.array_equal(a, b), loaded, rounded))
