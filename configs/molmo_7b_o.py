"""Molmo-7B-O-0924 (OLMo-7B-1024 LLM, CLIP ViT-L/14-336): stage 1 (pretrain), stage 2 (sft) and eval settings.

  python -m molmo_jax.train --config=configs/molmo_7b_o.py:pretrain --workdir=WORKDIR
  python -m molmo_jax.train --config=configs/molmo_7b_o.py:sft --config.init.checkpoint=STAGE1_WORKDIR/checkpoints
"""
from configs import common
from molmo_jax.model.config import MOLMO_7B_O


def get_config(arg=None):
    return common.release_config(MOLMO_7B_O, common.parse_stage(arg))
