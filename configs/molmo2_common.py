"""Settings shared by the Molmo2 experiment configs (molmo2_4b.py, molmo2_8b.py, molmo2_o_7b.py)
and the official stages, as allenai/molmo2's launch scripts set them.

  python -m molmo_jax.tools.aot --config configs/molmo2_8b.py:sft --topology v5p-128

Stages (arg of get_config): "pretrain" (launch_scripts/pretrain.py: captions, pointing, NLP),
"sft" (launch_scripts/sft.py: the multitask mixture "molmo2", images, multi-image and video),
"long_sft" (README.md "Long-Context SFT Training": sft.py from the SFT checkpoint with
--seq_len=36864 --model.mm_preprocessor.video.max_frames=384 --max_duration=2000
--device_batch_size=1 --model.llm.max_sequence_length=36864), and "eval" (the model part only).
Where each figure comes from is in `STAGE_RECIPES` below.

The row budget (configs.common: data.row_crops, row_pooled_tokens, row_pool_slots): the
official preprocessor pads every example to the largest it can produce (MultimodalPreprocessor.
get_output_shapes: the maximum over its image, multi-image and video preprocessors), so
  row_crops          max(image crops, images x multi-image crops, video frames)
                     pretrain max(8 + 1, 16) = 16 (pretrain.py: "Max frames 16 means the model will
                     take 16 crops as input"); sft max(8 + 1, 5 x (8 + 1), 128) = 128; long_sft 384.
  row_pooled_tokens  the most pooled tokens: a frame pools 27x27 patches 3x3 into 81; the widest
                     single image (a 1 x 8 tiling + the global crop, measured with
                     molmo2_images.preprocess_image at max_crops 8) gives 1,316. pretrain
                     max(1316, 16 x 81) = 1,316; sft 128 x 81 = 10,368 (5 images: <= 6,580);
                     long_sft 384 x 81 = 31,104.
  row_pool_slots     9, the 3x3 video window (2x2 image windows are padded with -1).
One example per row: the official dynamic packer (PackingConfig, buffer 48) fills rows with
several examples up to these same budgets; that packing is not in data_pipelines yet.
"""
from __future__ import annotations

import ml_collections

from configs import common

STAGES = ("pretrain", "sft", "long_sft", "eval")

# (regex over the parameter path, group), first match decides: the official Molmo2
# get_connector_parameters = the adapter + the new token embedding rows; get_vit_parameters =
# the ViT; the rest of the decoder is the LLM (olmo/models/molmo2/molmo2.py).
PARAM_GROUPS = (
    (r"^vision/", "vit"),
    (r"^adapter/", "connector"),
    (r"new_embedding$", "connector"),
    (r"^llm/", "llm"),
)

PRETRAIN_SEED, SFT_SEED = 95818, 50189  # DataLoaderConfig seeds of pretrain.py / sft.py

# Per stage: data budget, batch, steps, dropout and per-group (lr, warmup). Sources:
#   pretrain.py: --seq_len 2536, --global_batch_size 128, duration 31000 (the default mixture has
#     --pointing 0.3 and --nlp 0.1), connector/vit/llm LR 2e-4/6e-6/2e-5 with warmup 200/2000/2000,
#     residual_dropout 0.0 / response_residual_dropout 0.1, max_crops 8 (siglip2), video max_frames 16.
#   sft.py: --seq_len 16384, global_train_batch_size 128, --device_batch_size 2, max_duration 300000
#     (the script's default; runs stop earlier by override), LR 5e-6/5e-6/1e-5 with warmup 200 each,
#     residual_dropout 0.1 / response 0.0, video max_frames 128 (get_model), max_images 5,
#     max_multi_image_crops 8, llm.max_sequence_length 16384.
#   long_sft: README's command line above, everything else as sft.
# All stages: AdamW betas (0.9, 0.95), eps 1e-5, no weight decay (olmo/train/optim.py
# OptimizerConfig defaults), alpha_f 0.1, max_grad_norm 1, z-loss 1e-4
# (softmax_auxiliary_loss_scale), seed 6198, ft_embedding "lm_head" (base token rows frozen).
STAGE_RECIPES = {
    "pretrain": dict(seq_len=2536, row_crops=16, row_pooled_tokens=1316, global_batch=128, total_steps=31_000,
                     residual_dropout=0.0, response_residual_dropout=0.1,
                     lr=dict(connector=(2e-4, 200), vit=(6e-6, 2000), llm=(2e-5, 2000)),
                     mixture="pixmo_cap_with_transcripts", seed=PRETRAIN_SEED),
    "sft": dict(seq_len=16384, row_crops=128, row_pooled_tokens=128 * 81, global_batch=128, total_steps=300_000,
                residual_dropout=0.1, response_residual_dropout=0.0,
                lr=dict(connector=(5e-6, 200), vit=(5e-6, 200), llm=(1e-5, 200)), mixture="molmo2",
                seed=SFT_SEED),
    "long_sft": dict(seq_len=36864, row_crops=384, row_pooled_tokens=384 * 81, global_batch=128, total_steps=2000,
                     residual_dropout=0.1, response_residual_dropout=0.0,
                     lr=dict(connector=(5e-6, 200), vit=(5e-6, 200), llm=(1e-5, 200)), mixture="molmo2",
                     seed=SFT_SEED),
}


def parse_stage(arg: str | None) -> str:
    stage = arg or "sft"
    if stage not in STAGES:
        raise ValueError(f"config arg {stage!r}: expected one of {STAGES} (e.g. --config=configs/molmo2_8b.py:sft)")
    return stage


def base_config(stage: str) -> ml_collections.ConfigDict:
    """configs.common.base_config for Molmo2: its family, parameter groups and optimizer."""
    c = common.base_config("sft" if stage in ("sft", "long_sft") else stage)
    c.stage = stage
    c.model_family = "molmo2"
    c.optimizer.groups = list(PARAM_GROUPS)
    c.optimizer.eps = 1e-5
    c.data.mixture = "video_shapes"
    c.data.row_pool_slots = 9
    # Where the released Molmo2 sets are (data_pipelines.sources.molmo2.load): the HF folders, the
    # videos (a folder and / or the download cache with its manifest); images: c.data.image_dir.
    c.data.molmo2_dir, c.data.video_dir, c.data.video_cache_dir, c.data.video_manifest = "", "", "", ""
    # Only these sets of c.data.mixture, each group at its official rate (empty: all of them).
    c.data.mixture_datasets = []
    # Packing (data_pipelines.molmo2_pipeline): the official SFT packs with a buffer of 48 examples
    # and image weight 30; pretraining does not pack (0 = one example per row).
    c.data.pack_buffer = 0 if stage == "pretrain" else 48
    c.data.pack_image_weight = 30.0
    c.data.loss_token_weighting = "" if stage == "pretrain" else "root_subsegments_root_tokens"
    # Message-tree options of the official text preprocessor, at its defaults (sft.py sets neither):
    # a text cap on a tree (0 = none), and the loss only on each conversation's last answer.
    c.data.max_text_tokens, c.data.last_message_loss_only = 0, False
    return c


def release_config(preset, stage: str, processor: str) -> ml_collections.ConfigDict:
    """The official recipe of `stage` (STAGE_RECIPES) for a Molmo2 preset; `processor`: its
    preset name in data_pipelines.molmo2_processor.PRESETS."""
    c = base_config(stage)
    c.model = common.model_config(preset)
    c.data.processor = processor
    r = STAGE_RECIPES["sft" if stage == "eval" else stage]
    c.data.seq_len, c.data.row_crops, c.data.row_pooled_tokens = r["seq_len"], r["row_crops"], r["row_pooled_tokens"]
    c.data.mixture, c.data.seed = r["mixture"], r["seed"]
    c.train.global_batch, c.train.total_steps = r["global_batch"], r["total_steps"]
    for group, (lr, warmup) in r["lr"].items():
        c.optimizer[group] = dict(lr=lr, warmup_steps=warmup)
    c.model.llm.residual_dropout = r["residual_dropout"]
    c.model.llm.response_residual_dropout = r["response_residual_dropout"]
    # The official runs shard with FSDP and checkpoint every block's activations.
    c.model.remat_policy = "full"
    return c
