"""Experiment configs (ml_collections): each file defines `get_config(arg)`; see common.py.

`load("path/to/file.py[:arg]")` reads one as the trainer's `--config=` does (tests, notebooks).
"""
from molmo_jax.train.config_file import load_config_file as load  # noqa: F401
