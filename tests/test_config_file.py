"""Experiment files are read by path (train/config_file.py), as the trainer's --config= reads them."""
import pytest

import configs
from molmo_jax.train.config_file import ConfigFileError, load_config_file


def test_reads_get_config_with_its_argument(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("import ml_collections\n"
                    "def get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict(dict(stage=arg or 'default'))\n")
    assert load_config_file(f"{path}:sft").stage == "sft"
    assert load_config_file(str(path)).stage == "default"
    assert configs.load(f"{path}:pretrain").stage == "pretrain"


def test_bad_specs_name_the_file(tmp_path):
    with pytest.raises(ConfigFileError, match="no file .*missing.py"):
        load_config_file(str(tmp_path / "missing.py") + ":sft")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ConfigFileError, match="defines no get_config"):
        load_config_file(str(tmp_path / "empty.py"))


def test_the_repository_configs_load_by_path():
    demo = load_config_file("configs/demo.py:sft")
    assert demo.train.total_steps > 0 and demo.model.init_scheme == "fan_in"
