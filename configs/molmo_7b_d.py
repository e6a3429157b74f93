"""Molmo-7B-D-0924 (Qwen2-7B LLM, CLIP ViT-L/14-336): stage 1 (pretrain), stage 2 (sft) and eval settings.

  python -m molmo_jax.train --config=configs/molmo_7b_d.py:pretrain --workdir=WORKDIR \
      --config.init.vit=CLIP_FOLDER --config.init.llm=LLM_FOLDER
  python -m molmo_jax.train --config=configs/molmo_7b_d.py:sft --config.init.checkpoint=STAGE1_WORKDIR/checkpoints

Stage 1 starts from the released backbones, downloaded as transformers folders:
CLIP_FOLDER = openai/clip-vit-large-patch14-336, LLM_FOLDER = Qwen/Qwen2-7B (configs/common.py, `init`).
"""
from configs import common
from molmo_jax.model.config import MOLMO_7B_D


def get_config(arg=None):
    return common.release_config(MOLMO_7B_D, common.parse_stage(arg))
