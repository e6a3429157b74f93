"""Import an official Hugging Face Molmo folder as a trainer checkpoint to fine-tune from.

  python -m molmo_jax.import_hf --hf Molmo-7B-D-0924/ --out CKPT --config configs/molmo_7b_d.py:sft
  python -m molmo_jax.train --config=configs/molmo_7b_d.py:sft --workdir=RUN --config.init.checkpoint=CKPT

CKPT holds step 0 in the trainer's layout (params / frozen split as --config freezes them, a
fresh optimizer state); --config is the experiment you will fine-tune with, and its model must
have the HF checkpoint's shapes.
"""
import argparse
import importlib.util
import logging
import os
import sys

from molmo_jax.convert.export import ExportError, import_hf


def load_config(spec: str):
    """'path/to/file.py:arg' -> get_config(arg) of that file (as --config of the trainer)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ExportError(f"--config {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ExportError(f"--config {spec}: {path} defines no get_config")
    return module.get_config(arg or None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.import_hf", description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF Molmo folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--config", required=True, help="experiment config to fine-tune with: file.py:stage")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(import_hf(args.hf, args.out, load_config(args.config), force=args.force))
    except ExportError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
