"""Molmo2-4B (SigLIP2 so400m/14-378 + the `qwen3_4b_instruct` LLM of allenai/molmo2):
pretrain, sft, long_sft and eval settings (configs/molmo2_common.py gives each stage and its sources).

  python -m molmo_jax.tools.aot --config configs/molmo2_4b.py:long_sft --topology v5p-256
"""
from configs import molmo2_common
from molmo_jax.model.molmo2_config import MOLMO2_4B


def get_config(arg=None):
    return molmo2_common.release_config(MOLMO2_4B, molmo2_common.parse_stage(arg), "molmo2-4b")
