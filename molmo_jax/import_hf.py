"""Import an official Hugging Face Molmo folder as a trainer checkpoint to fine-tune from.

  python -m molmo_jax.import_hf --hf Molmo-7B-D-0924/ --out CKPT --config configs/molmo_7b_d.py:sft
  python -m molmo_jax.train --config=configs/molmo_7b_d.py:sft --workdir=RUN --config.init.checkpoint=CKPT

CKPT holds step 0 in the trainer's layout (params / frozen split as --config freezes them, a
fresh optimizer state); --config is the experiment you will fine-tune with, and its model must
have the HF checkpoint's shapes. A transformers Molmo2 folder imports with a Molmo2 experiment
(config.model_family "molmo2", e.g. configs/molmo2_tiny.py), as the base of a Molmo2 LoRA run.
"""
import argparse
import logging
import sys

from molmo_jax.train.hf_interop import ExportError, import_hf
from molmo_jax.train.config_file import ConfigFileError, load_config_file


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.import_hf", description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF Molmo folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--config", required=True, help="experiment config to fine-tune with: file.py:stage")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(import_hf(args.hf, args.out, load_config_file(args.config), force=args.force))
    except (ExportError, ConfigFileError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
