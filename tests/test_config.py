import dataclasses

import pytest

from molmo_jax.model import config as cfg


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
