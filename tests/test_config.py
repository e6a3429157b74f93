"""Model configs (typed, frozen) and experiment configs: every bad key or value is one line,
before anything is compiled or written."""
import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

import configs
from molmo_jax.model import config as cfg
from molmo_jax.train import config_checks

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_presets_roundtrip_through_dict():
    for name, preset in cfg.PRESETS.items():
        assert cfg.MolmoConfig.from_dict(preset.to_dict()) == preset, name


def test_unknown_key_is_named():
    d = cfg.MOLMO_7B_D.to_dict()
    d["llm"]["d_modle"] = 1
    with pytest.raises(ValueError, match="d_modle"):
        cfg.MolmoConfig.from_dict(d)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="molmo-8b"):
        cfg.get_preset("molmo-8b")


def test_projector_width_follows_llm():
    assert cfg.MOLMO_7B_D.projector_hidden == 18944
    assert cfg.MOLMO_72B.projector_hidden == 29568
    assert cfg.MOLMO_7B_O.projector_hidden == 11008
    assert cfg.MOLMOE_1B.projector_hidden == 1024


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.MOLMO_7B_D.llm.d_model = 1



@pytest.mark.parametrize("spec", ["configs/demo.py:pretrain", "configs/demo.py:sft", "configs/molmo_7b_d.py:sft",
                                  "configs/molmo_7b_o.py:pretrain", "configs/molmoe_1b.py:pretrain",
                                  "configs/molmo_72b.py:eval"])
def test_shipped_configs_validate(spec):
    config_checks.validate(configs.load(str(REPO / spec)))


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint.every", 0, "config.checkpoint.every=0: expected an integer >= 1"),
    ("log.every", -1, "config.log.every=-1: expected an integer >= 1"),
    ("model.llm.mlp_hidden_size", -8, "config.model.llm.mlp_hidden_size=-8: expected an integer >= 1"),
    ("model.vision.width", 0, "config.model.vision.width=0: expected an integer >= 1"),
    ("model.llm.residual_dropout", 1.0, "config.model.llm.residual_dropout=1.0: a dropout rate lies in [0, 1)"),
    ("model.remat_policy", "everything", "config.model.remat_policy='everything': choose one of dots, "),
    ("model.dtype", "float16", "config.model.dtype='float16': choose one of auto, float32, bfloat16"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0: expected a number in [0.0, 1.0)"),
    ("optimizer.llm.lr", -1e-3, "config.optimizer.llm.lr=-0.001: expected a number >= 0.0"),
    ("mesh.fsdp", 0, "config.mesh.fsdp=0: a mesh axis size is a positive integer, or -1"),
    ("train.grad_accum_steps", 3, "config.train.global_batch=8 is not divisible by config.train.grad_accum_steps=3"),
    ("model.llm.n_kv_heads", 3, "config.model.llm.n_heads=4 is not a multiple of config.model.llm.n_kv_heads=3"),
])
def test_each_bad_value_is_named_with_what_is_allowed(key, value, message):
    config = configs.load(str(REPO / "configs/demo.py:pretrain"))
    *parents, leaf = key.split(".")
    node = config
    for k in parents:
        node = node[k]
    node[leaf] = value
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(config)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_misspelt_key_names_close_matches_and_the_valid_keys():
    config = configs.load(str(REPO / "configs/demo.py:pretrain"))
    assert config_checks.unknown_key(config, "checkpoint.every") is None
    assert config_checks.unknown_key(config, "checkpoint.evry") == (
        "unknown config key config.checkpoint.evry: did you mean config.checkpoint.every? "
        "the keys of config.checkpoint are async_save, every, keep, keep_every")
    assert "did you mean config.optimizer.vit.lr or config.optimizer.llm.lr" in config_checks.unknown_key(
        config, "optimizer.lrr")


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.lrr=1", "error: unknown config key config.optimizer.lrr: did you mean "),
    ("--config.checkpoint.every=0", "error: config.checkpoint.every=0: expected an integer >= 1"),
    ("--config.model.llm.d_model=-64", "error: config.model.llm.d_model=-64: expected an integer >= 1"),
])
def test_trainer_cli_config_error_is_one_line_exit_2_and_writes_nothing(tmp_path, override, message):
    workdir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "molmo_jax.train", "--config=configs/demo.py:pretrain",
                        f"--workdir={workdir}", override], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr
    assert not workdir.exists()
