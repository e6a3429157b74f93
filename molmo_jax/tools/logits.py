"""Run the forward pass of a converted checkpoint on saved inputs and write the logits, to
compare against the reference implementation after a conversion.

    python -m molmo_jax.tools.logits --checkpoint Molmo-7B-D-0924/ --inputs inputs.npz \
        --out logits.npz [--dtype float32]

--checkpoint: an official HF Molmo folder (config.json + model.safetensors or a sharded
index) or a molmo-jax training checkpoint (orbax). --inputs: an npz with `input_ids`
int[B, L] (-1 = right padding) and optionally `images` [B, C, P, D], `image_masks`
[B, C, P], `image_input_idx` [B, C, Q], `position_ids` [B, L], `subsegment_ids` [B, L]
(the keys of the golden model inputs). --out gets `logits` float32[B, L, V].
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

REQUIRED = ("input_ids",)
OPTIONAL = ("images", "image_masks", "image_input_idx", "position_ids", "subsegment_ids")
DTYPES = ("float32", "bfloat16")


def read_inputs(path: str) -> Dict[str, np.ndarray]:
    """The model inputs of an npz file; unknown or missing keys are errors that name them."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable npz file ({e})") from e
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    missing = [k for k in REQUIRED if k not in arrays]
    if unknown or missing:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}; expected {REQUIRED} and "
                         f"optionally {OPTIONAL}")
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
        inputs = read_inputs(args.inputs)
        model = load_model(args.checkpoint, args.dtype)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logits = compute_logits(model, inputs)
    np.savez(args.out, logits=logits)
    print(f"wrote logits {logits.shape} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
