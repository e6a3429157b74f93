"""Settings shared by every experiment config, and the `:arg` parser.

Every config file defines `get_config(arg)` with arg one of "pretrain" (stage 1, caption
pre-training), "sft" (stage 2, multitask fine-tuning) or "eval", and builds on `base_config`.
Run as  python -m molmo_jax.train --config=configs/molmo_7b_d.py:pretrain --config.train.total_steps=100
Every key exists here with its default, so a misspelt `--config.x.y` override is an error.
"""
from __future__ import annotations

import ml_collections

from molmo_jax.model.config import MolmoConfig

STAGES = ("pretrain", "sft", "eval")

# (regex searched in the parameter path "a/b/c", group): the first match decides (spec §5.1).
# connector = pooling, projector, pad embeddings and the 128 new token embeddings.
PARAM_GROUPS = (
    (r"^vision/", "vit"),
    (r"^connector/", "connector"),
    (r"new_embedding$", "connector"),
    (r"^llm/", "llm"),
)
# Base token embedding, frozen by default (official `ft_embedding="lm_head"`).
FROZEN = r"llm/embed/embedding"


def parse_stage(arg: str | None) -> str:
    stage = arg or "pretrain"
    if stage not in STAGES:
        raise ValueError(f"config arg {stage!r}: expected one of {STAGES} (e.g. --config=configs/demo.py:pretrain)")
    return stage


def model_config(preset, **overrides) -> ml_collections.ConfigDict:
    """The model part of an experiment config: every field of the preset (a MolmoConfig or a
    Molmo2Config), as a ConfigDict.

    `dtype` "auto" becomes bfloat16 on accelerators and float32 on CPU (resolved by the trainer).
    """
    d = preset.to_dict()
    d["dtype"] = "auto"
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 6198  # official global seed
    # "molmo" (MolmoConfig, data_pipelines.pipeline) or "molmo2" (Molmo2Config, the packed rows of
    # data_pipelines.molmo2_pipeline): molmo_jax/train/families.py.
    c.model_family = "molmo"
    c.model = ml_collections.ConfigDict()  # filled by each experiment with `model_config`
    # Parameters to start from when the run has no checkpoint yet (the optimizer starts fresh):
    #   checkpoint  the checkpoints directory of another run, e.g. stage 2 starts from stage 1;
    #   vit / llm   stage 1 (spec §5.2): transformers checkpoint folders (config.json +
    #               model.safetensors or its sharded index) of the released backbones, e.g.
    #               openai/clip-vit-large-patch14-336 (CLIPVisionModel or CLIPModel; SigLIP too)
    #               and Qwen/Qwen2-7B (Qwen2ForCausalLM; Olmo2ForCausalLM, OlmoeForCausalLM).
    #               The connector and the new token rows keep their random init; a folder whose
    #               tensors do not fit config.model.vision / .llm is refused, naming the tensor.
    c.init = ml_collections.ConfigDict(dict(checkpoint="", vit="", llm=""))

    # Keys of data_pipelines.pipeline.make_pipeline (its docstring explains each).
    c.data = ml_collections.ConfigDict(dict(
        mixture="synthetic",       # name in data_pipelines.mixtures, or one dataset name
        mixture_rates={},          # dataset -> rate replacing the mixture's (0 drops it), renormalised
        tokenizer="",              # HF tokenizer.json / folder, or sentencepiece model
        seq_len=2304,
        max_crops=12,
        overlap_margins=(4, 4),
        seed=95818 if stage == "pretrain" else 50189,  # official data seeds
        num_workers=0,             # grain worker processes (0 = in the training process)
        prefetch=2,
        num_examples=2 ** 40,      # length of the global example stream
        shuffle_messages=True,
        max_points=40,
        max_skip_rate=0.05,
        skip_check_after=256,
        pixmo_dir="",
        image_dir="",
        custom="",                 # JSONL/parquet file of your own data (docs/custom_data.md): mixture "custom"
        split="train",
        synthetic_image_size=168,
        synthetic_examples=100_000,
        synthetic_options={},      # generator kind -> constructor arguments, e.g. {"shapes": {"max_categories": 1}}
        clock_image_size=336,
        examples_per_row=1,        # >1 packs several examples (image + conversations) per sequence
        # Molmo2 only (data_pipelines.molmo2_pipeline.pack_config): crops or frames, pooled tokens and
        # pooling slots of every row; the processor folder or preset (molmo2_processor.PRESETS).
        row_crops=0,
        row_pooled_tokens=0,
        row_pool_slots=9,
        processor="",
    ))

    c.train = ml_collections.ConfigDict(dict(
        global_batch=128,
        grad_accum_steps=1,        # micro-batch = global_batch / grad_accum_steps
        total_steps=1000,
        z_loss_weight=1e-4,
        ce_chunk_tokens=0,         # > 0: cross-entropy this many tokens at a time (no whole [B, L, V] logits)
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0, clip_norm=1.0, final_lr_fraction=0.1,
        vit=dict(lr=6e-6, warmup_steps=2000),
        connector=dict(lr=2e-4, warmup_steps=200),
        llm=dict(lr=2e-5, warmup_steps=2000),
        groups=list(PARAM_GROUPS),
        frozen=FROZEN,
    ))

    # LoRA / QLoRA (molmo_jax/model/lora.py; docs/custom_data.md): rank 0 = full fine-tuning. With
    # rank > 0 only the adapters train (they replace config.optimizer.frozen: everything else is
    # frozen) with their group's optimizer settings; checkpoints hold the adapters and name the
    # base, which is config.init.checkpoint (or the random init of config.seed).
    #   targets    preset names (llm_attention, llm_mlp, connector, vit) or regexes over Dense
    #              module paths, e.g. r"llm/blocks/attention/(q|v)"
    #   dropout    rate on each adapter's input (x -> dropout -> A -> B), training steps only
    #   base_dtype float32 | bfloat16 | int8 (weight-only, one scale per output channel) | nf4
    #              (QLoRA's 4-bit NormalFloat, one scale per block of 64; model/quantization.py)
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=("llm_attention", "llm_mlp"),
                                            base_dtype="float32"))

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(max_replicated_fraction=0.05))
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=0, process_id=-1))

    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=2, keep_every=0, async_save=True))
    c.log = ml_collections.ConfigDict(dict(every=10, tensorboard=True))
    return c


# PixMo-Cap train images; stage 1 runs 4 epochs of them at batch 128 (official
# `4 * (n + 127) // 128` = 22,408 steps; the paper rounds to 22.3k).
PIXMO_CAP_TRAIN_IMAGES = 717_042
PRETRAIN_STEPS = 4 * (PIXMO_CAP_TRAIN_IMAGES + 127) // 128


def release_config(preset: MolmoConfig, stage: str) -> ml_collections.ConfigDict:
    """Stage 1 / stage 2 recipe of the released models (spec §5.2, §5.3) for `preset`."""
    c = base_config(stage)
    c.model = model_config(preset)
    if stage == "sft":
        c.train.global_batch = 256
        c.train.total_steps = 30_000
        c.optimizer.vit = dict(lr=5e-6, warmup_steps=200)
        c.optimizer.connector = dict(lr=5e-6, warmup_steps=200)
        c.optimizer.llm = dict(lr=1e-5, warmup_steps=200)
        c.model.llm.residual_dropout, c.model.llm.response_residual_dropout = 0.1, 0.0
        c.data.mixture = "3.2-synthetic"
    else:  # pretrain (and eval, which only reads the model part)
        c.train.global_batch = 128
        c.train.total_steps = PRETRAIN_STEPS
        c.model.llm.residual_dropout, c.model.llm.response_residual_dropout = 0.0, 0.1
        c.data.mixture = "pixmo_cap_with_transcripts"
    # Official launches: FSDP over all devices, whole-layer activation checkpointing.
    c.model.remat_policy = "full"
    return c
