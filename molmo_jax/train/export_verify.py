"""`export --verify`: an exported Molmo folder read back gives the checkpoint's logits.

    report = verify_export("run/checkpoints", "out/")           # {"project": max |diff|, ...}

The folder is read back through the project's reader (convert/hf_molmo.load_hf_model: config.json
+ safetensors, the official key layout) and run on a small random batch (text and one image
crop, so the ViT, connector and LLM all count) next to the model built from the checkpoint
itself. The checkpoint's weights are first rounded to the export dtype, so a faithful folder
gives a difference of 0 whatever the dtype, and any written tensor that differs shows.

With torch, transformers and the folder's own remote code (export --remote-code), the folder is
also loaded in PyTorch (AutoModelForCausalLM, trust_remote_code) and its logits compared; when
that cannot run, the report says why instead of a number.

A Molmo2 folder is read back the same way (its transformers layout) and run on one random image
through the real processor (the run's, as its meta records it) and the folder's own tokenizer,
so the batch is what transformers' Molmo2 processor lays out; with torch and transformers it is
also loaded by transformers' own Molmo2ForConditionalGeneration (no remote code: transformers
has Molmo2) and compared.
"""
from __future__ import annotations

from typing import Dict, Union

import numpy as np
from flax import nnx

from data_pipelines import molmo2_processor, tokenizer as tokenizer_lib
from molmo_jax.convert.export_formats import ExportError
from molmo_jax.convert.hf_molmo import load_hf_model
from molmo_jax.convert.links import leaves, set_path
from molmo_jax.model.models import build_model
from molmo_jax.model.molmo2_config import Molmo2Config
from molmo_jax.tools.logits import compute_logits

# Largest |logit difference| accepted. Both sides run the same JAX code on the same (rounded)
# weights, so only a wrong tensor moves them; the torch side computes in another library
# (the official remote code gave the project's logits within 2.6e-5 in float32).
PROJECT_TOLERANCE = 1e-5
TORCH_TOLERANCE = 1e-3


def random_batch(config, seed: int = 0, batch: int = 2, text: int = 16) -> Dict[str, np.ndarray]:
    """input_ids int32[B, Q' + text] with one image crop float32[B, 1, P, D] whose first Q'
    pooled features (at most 32) go onto the first Q' positions."""
    rng = np.random.default_rng(seed)
    vc, cc = config.vision, config.connector
    patches = vc.grid[0] * vc.grid[1]
    tokens = -(-vc.grid[0] // cc.pool_h) * -(-vc.grid[1] // cc.pool_w)
    used = min(tokens, 32)
    length = used + text
    idx = np.where(np.arange(tokens) < used, np.arange(tokens), -100)
    return {"input_ids": rng.integers(0, config.llm.vocab_size, (batch, length)).astype(np.int32),
            "images": rng.standard_normal((batch, 1, patches, vc.patch_dim)).astype(np.float32),
            "image_masks": np.ones((batch, 1, patches), np.float32),
            "image_input_idx": np.broadcast_to(idx, (batch, 1, tokens)).astype(np.int32)}


def molmo2_batch(params, folder: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """transformers' Molmo2 forward kwargs for one random 40x60 image and a short prompt, made by
    the run's processor (meta "processor") and the exported folder's tokenizer."""
    try:
        processor = molmo2_processor.config_for(params.meta.get("processor") or "")
        tok = tokenizer_lib.load_tokenizer(folder, pad_to=params.config.llm.vocab_size)
        image = np.random.default_rng(seed).integers(0, 256, (40, 60, 3), np.uint8)
        return molmo2_processor.process(f"{molmo2_processor.IMAGE_PLACEHOLDER} Describe this image.", tok,
                                        processor, images=[image])
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"--verify: no Molmo2 input could be made with the run's processor and the exported "
                          f"tokenizer ({e})") from None


def checkpoint_model(params, dtype):
    """The checkpoint's Molmo or Molmo2 (float32 compute) with its weights rounded to `dtype`, as exported."""
    pure: Dict = {}
    paths = [path for path, _ in leaves(params.abstract)]
    for path, value in params.read(paths).items():
        set_path(pure, path, value.astype(dtype).astype(np.float32))
    abstract = nnx.eval_shape(lambda: build_model(params.config.replace(dtype="float32"), nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def torch_logits(folder: str, batch: Dict[str, np.ndarray]) -> Union[np.ndarray, str]:
    """Logits of the folder loaded by its remote code in PyTorch, or the reason it cannot run."""
    try:
        import torch  # noqa: PLC0415 (optional: the "torch" extra)
        import transformers  # noqa: PLC0415
    except ImportError as e:
        return f"not run: {e.name} is not installed"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                                  dtype=torch.float32, local_files_only=True)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
                        images=torch.from_numpy(batch["images"]), image_masks=torch.from_numpy(batch["image_masks"]),
                        image_input_idx=torch.from_numpy(batch["image_input_idx"].astype(np.int64)))
        return out.logits.float().numpy()
    except Exception as e:  # noqa: BLE001 (someone else's code: any failure is reported, not raised)
        return f"not run: the folder's remote code failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def torch_molmo2_logits(folder: str, batch: Dict[str, np.ndarray]) -> Union[np.ndarray, str]:
    """Logits of the folder loaded by transformers' Molmo2ForConditionalGeneration, or why not."""
    try:
        import torch  # noqa: PLC0415 (optional: the "torch" extra)
        from transformers import Molmo2ForConditionalGeneration  # noqa: PLC0415
    except ImportError as e:
        return f"not run: {e.name or e} is not installed"
    try:
        model = Molmo2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()
              if k in ("input_ids", "pixel_values", "image_token_pooling", "image_grids", "image_num_crops",
                       "mm_token_type_ids")}
        kw["attention_mask"] = torch.ones_like(kw["input_ids"])
        with torch.no_grad():
            return model.eval()(**kw).logits.float().numpy()
    except Exception as e:  # noqa: BLE001 (another library: any failure is reported, not raised)
        return f"not run: transformers' Molmo2 failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def verify_export(params, folder: str, dtype, *, with_torch: bool = False) -> Dict[str, Union[float, str]]:
    """{"project": max |logits difference| of the folder read back vs the checkpoint, and with
    with_torch "torch": the same for PyTorch, or why it did not run}. params: an open
    hf_interop.CheckpointParams; dtype: the export's numpy dtype. A Molmo2 folder is always
    tried in transformers too (module docstring). Raises ExportError when a difference exceeds
    its tolerance, naming it."""
    molmo2 = isinstance(params.config, Molmo2Config)
    batch = molmo2_batch(params, folder) if molmo2 else random_batch(params.config)
    expected = compute_logits(checkpoint_model(params, dtype), batch)
    try:
        exported = load_hf_model(folder, dtype="float32")
    except Exception as e:  # noqa: BLE001 (any unreadable tensor or config is a failed verification)
        raise ExportError(f"--verify: {folder} cannot be read back ({e})") from e
    report: Dict[str, Union[float, str]] = {
        "project": float(np.max(np.abs(compute_logits(exported, batch) - expected)))}
    if with_torch or molmo2:
        got = torch_molmo2_logits(folder, batch) if molmo2 else torch_logits(folder, batch)
        report["torch"] = got if isinstance(got, str) else float(np.max(np.abs(got - expected)))
    failed = [f"{side} max |logits difference| {value:.3g} > {tolerance:g}"
              for side, tolerance in (("project", PROJECT_TOLERANCE), ("torch", TORCH_TOLERANCE))
              for value in [report.get(side)] if isinstance(value, float) and not value <= tolerance]
    if failed:
        raise ExportError(f"--verify: {folder} does not reproduce the checkpoint: {'; '.join(failed)}")
    return report
