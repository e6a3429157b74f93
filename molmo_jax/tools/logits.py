"""Run the forward pass of a converted checkpoint on saved inputs and write the logits, to
compare against the reference implementation after a conversion.

    python -m molmo_jax.tools.logits --checkpoint Molmo-7B-D-0924/ --inputs inputs.npz \
        --out logits.npz [--dtype float32]

--checkpoint: an official HF Molmo folder (config.json + model.safetensors or a sharded
index), a Molmo2 folder as transformers saves it, or a molmo-jax training checkpoint (orbax).
--inputs: for Molmo, an npz with `input_ids` int[B, L] (-1 = right padding) and optionally
`images` [B, C, P, D], `image_masks` [B, C, P], `image_input_idx` [B, C, Q], `position_ids`
[B, L], `subsegment_ids` [B, L] (the keys of the golden model inputs); for Molmo2, the keyword
arguments of transformers' Molmo2ForConditionalGeneration.forward under their names
(`input_ids`, `attention_mask`, `pixel_values` + `image_token_pooling`, or
`pixel_values_videos` + `video_token_pooling`, `mm_token_type_ids`, `position_ids`; the
grids and crop counts are accepted and unused, as the pooling indices carry the layout).
--out gets `logits` float32[B, L, V].
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from molmo_jax.convert import hf_molmo
from molmo_jax.convert.hf_folder import is_hf_folder
from molmo_jax.inference.predictor import load_orbax_model, with_compute_dtype
from molmo_jax.model.molmo2 import Molmo2, check_placeholders

REQUIRED = ("input_ids",)
OPTIONAL = ("images", "image_masks", "image_input_idx", "position_ids", "subsegment_ids")
MOLMO2_OPTIONAL = ("attention_mask", "pixel_values", "image_token_pooling", "image_grids", "image_num_crops",
                   "pixel_values_videos", "video_token_pooling", "video_grids", "mm_token_type_ids", "position_ids")
MOLMO2_PAIRS = (("pixel_values", "image_token_pooling"), ("pixel_values_videos", "video_token_pooling"))
DTYPES = ("float32", "bfloat16")


def read_molmo2_inputs(path: str) -> Dict[str, np.ndarray]:
    """transformers' Molmo2 forward kwargs from an npz file (see the module docstring)."""
    arrays = read_inputs(path, MOLMO2_OPTIONAL)
    for pixels, pooling in MOLMO2_PAIRS:
        if (pixels in arrays) != (pooling in arrays):
            raise ValueError(f"{path}: '{pixels}' and '{pooling}' go together, one is missing")
    if all(pixels in arrays for pixels, _ in MOLMO2_PAIRS):
        raise ValueError(f"{path}: give 'pixel_values' or 'pixel_values_videos', not both (as transformers)")
    return arrays


def read_inputs(path: str, optional: Sequence[str] = OPTIONAL) -> Dict[str, np.ndarray]:
    """The model inputs of an npz file (input_ids and the `optional` keys); unknown or missing
    keys are errors that name them."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable npz file ({e})") from e
    unknown = sorted(set(arrays) - set(REQUIRED) - set(optional))
    missing = [k for k in REQUIRED if k not in arrays]
    if unknown or missing:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}; expected {REQUIRED} and "
                         f"optionally {tuple(optional)}")
    if "images" in arrays and "image_input_idx" not in arrays:
        raise ValueError(f"{path}: 'images' needs 'image_input_idx' (where the features go)")
    return arrays


def load_model(checkpoint: str, dtype: str):
    """A Molmo from an HF folder or an orbax training checkpoint, computing in `dtype`."""
    if is_hf_folder(checkpoint):
        return hf_molmo.load_hf_model(checkpoint, dtype=dtype)

    return with_compute_dtype(load_orbax_model(checkpoint), dtype)


def compute_logits(model, inputs: Dict[str, np.ndarray]) -> np.ndarray:
    """float32[B, L, V] logits of the forward pass on `inputs` (see read_inputs).

    A float32 model runs its matmuls at full float32 precision: GPUs (TF32) and TPUs
    (bfloat16 passes) otherwise round float32 matmuls by default, which moved the golden
    logits by 2.5e-2 on an H200 (3e-5 at full precision)."""
    if isinstance(model, Molmo2):
        pixels, pooling = next(((inputs[p], inputs[q]) for p, q in MOLMO2_PAIRS if p in inputs), (None, None))
        args = {k: inputs.get(k) for k in ("attention_mask", "position_ids", "mm_token_type_ids")}
        args.update(pixel_values=pixels, token_pooling=pooling)
        # The placeholder count is checked here, on concrete arrays (inside jit it cannot be).
        if pixels is not None:
            check_placeholders(inputs["input_ids"] == model.config.image_patch_id, pooling)
    else:
        args = {k: inputs.get(k) for k in ("images", "image_masks", "image_input_idx", "position_ids",
                                           "subsegment_ids")}
    forward = nnx.jit(lambda m, ids, a: m(ids, **a))
    precision = "highest" if model.config.dtype == "float32" else "default"
    with jax.default_matmul_precision(precision):
        return np.asarray(forward(model, inputs["input_ids"].astype(np.int32), args), np.float32)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="HF Molmo folder or molmo-jax checkpoint")
    parser.add_argument("--inputs", required=True, help="npz with input_ids (+ images, masks, ...)")
    parser.add_argument("--out", required=True, help="npz to write with 'logits'")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.dtype)
        inputs = read_molmo2_inputs(args.inputs) if isinstance(model, Molmo2) else read_inputs(args.inputs)
        logits = compute_logits(model, inputs)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez(args.out, logits=logits)
    print(f"wrote logits {logits.shape} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
