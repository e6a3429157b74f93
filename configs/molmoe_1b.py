"""MolmoE-1B-0924 (OLMoE-1B-7B LLM, CLIP ViT-L/14-336): stage 1 (pretrain), stage 2 (sft) and eval settings.

  python -m molmo_jax.train --config=configs/molmoe_1b.py:pretrain --workdir=WORKDIR \
      --config.init.vit=CLIP_FOLDER --config.init.llm=LLM_FOLDER
  python -m molmo_jax.train --config=configs/molmoe_1b.py:sft --config.init.checkpoint=STAGE1_WORKDIR/checkpoints

Stage 1 starts from the released backbones, downloaded as transformers folders:
CLIP_FOLDER = openai/clip-vit-large-patch14-336, LLM_FOLDER = allenai/OLMoE-1B-7B-0924 (configs/common.py, `init`).
"""
from configs import common
from molmo_jax.model.config import MOLMOE_1B


def get_config(arg=None):
    return common.release_config(MOLMOE_1B, common.parse_stage(arg))
