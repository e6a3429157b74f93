"""A tiny Molmo2 (24 px crops of 4 px patches, toy widths) on synthetic moving-shape videos, for
tests and CPU runs of the Molmo2 training path; arg "qwen3" (default) or "olmo3" picks the
decoder (model/molmo2_config.py: TINY_MOLMO2_QWEN3 / TINY_MOLMO2_OLMO3).

  python -m molmo_jax.train --config=configs/molmo2_tiny.py:qwen3 --workdir=WORKDIR \
      --config.data.tokenizer=FOLDER --config.data.processor=FOLDER \
      --config.data.synthetic_options.video_shapes.out_dir=VIDEO_DIR
  python -m molmo_jax.tools.aot --config configs/molmo2_tiny.py:olmo3 --topology v5p-8

FOLDER: a tokenizer with Molmo2's tokens at the tiny ids (500..) and a processor_config.json with
24 px crops of 4 px patches, at most 4 frames (tests/test_molmo2_train.py writes one). The
learning rates and budget are small-scale choices, not a released recipe.
"""
from configs import common, molmo2_common
from molmo_jax.model import molmo2_config

DECODERS = {"qwen3": molmo2_config.TINY_MOLMO2_QWEN3, "olmo3": molmo2_config.TINY_MOLMO2_OLMO3}


def get_config(arg=None):
    name = arg or "qwen3"
    if name not in DECODERS:
        raise ValueError(f"config arg {name!r}: expected one of {sorted(DECODERS)}")
    c = molmo2_common.base_config("sft")
    c.model = common.model_config(DECODERS[name])
    # 4 sampled frames of 2x2 pooled tokens each, one video (or image) example per row.
    c.data.seq_len, c.data.row_crops, c.data.row_pooled_tokens = 128, 4, 16
    c.data.synthetic_examples = 8
    c.data.pack_buffer, c.data.loss_token_weighting = 0, ""  # one example per row, 0/1 loss weights
    c.data.synthetic_options = {"video_shapes": dict(task="count", num_frames=8, fps=4, image_size=(48, 64),
                                                     out_dir=None)}  # required: where videos are written
    c.train.global_batch, c.train.total_steps = 4, 6
    for group in ("vit", "connector", "llm"):
        c.optimizer[group] = dict(lr=2e-3, warmup_steps=2)
    c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
    c.sharding.max_replicated_fraction = 1.0  # toy widths: norms and biases weigh a lot
    c.checkpoint.every = 3
    c.log.every, c.log.tensorboard = 1, False
    return c
