"""Experiment configs (ml_collections): each file defines `get_config(arg)`; see common.py."""
import importlib.util
import pathlib


def load(spec: str):
    """ConfigDict of "path/to/file.py[:arg]", as `--config=` reads it (for tests and notebooks)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
