"""Molmo-72B-0924 (Qwen2-72B LLM, CLIP ViT-L/14-336): stage 1 (pretrain), stage 2 (sft) and eval settings.

  python -m molmo_jax.train --config=configs/molmo_72b.py:pretrain --workdir=WORKDIR
  python -m molmo_jax.train --config=configs/molmo_72b.py:sft --config.init.checkpoint=STAGE1_WORKDIR/checkpoints
"""
from configs import common
from molmo_jax.model.config import MOLMO_72B


def get_config(arg=None):
    return common.release_config(MOLMO_72B, common.parse_stage(arg))
