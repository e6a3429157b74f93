"""Experiment config files: `path/to/file.py[:arg]` -> the ConfigDict its `get_config(arg)` returns.

The trainer's `--config=` flag (ml_collections config_flags) reads files this way; commands that
take an experiment file without absl flags (import_hf, the demo) and notebooks use
`load_config_file`. Files are loaded by path, never imported as modules of this package, so
imports keep running configs -> molmo_jax.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


class ConfigFileError(ValueError):
    """A config spec whose file is missing or defines no get_config (the message names it)."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'path/to/file.py:arg' -> get_config(arg) of that file (get_config(None) without ':arg')."""
    path, _, arg = str(spec).partition(":")
    if not os.path.isfile(path):
        raise ConfigFileError(f"config {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"config {spec}: {path} defines no get_config")
    return module.get_config(arg or None)
