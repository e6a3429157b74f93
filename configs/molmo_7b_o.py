"""Molmo-7B-O-0924 (OLMo-7B-1024 LLM, CLIP ViT-L/14-336): stage 1 (pretrain), stage 2 (sft) and eval settings.

  python -m molmo_jax.train --config=configs/molmo_7b_o.py:pretrain --workdir=WORKDIR \
      --config.init.vit=CLIP_FOLDER --config.init.llm=LLM_FOLDER
  python -m molmo_jax.train --config=configs/molmo_7b_o.py:sft --config.init.checkpoint=STAGE1_WORKDIR/checkpoints

Stage 1 starts from the released backbones, downloaded as transformers folders:
CLIP_FOLDER = openai/clip-vit-large-patch14-336, LLM_FOLDER = allenai/OLMo-7B-1024-preview (configs/common.py, `init`).
"""
from configs import common
from molmo_jax.model.config import MOLMO_7B_O


def get_config(arg=None):
    return common.release_config(MOLMO_7B_O, common.parse_stage(arg))
