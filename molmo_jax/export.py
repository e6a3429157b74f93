"""Export a trained checkpoint to Hugging Face / PyTorch.

  python -m molmo_jax.export --checkpoint RUN/checkpoints --out HF_DIR --tokenizer TOK [--step N]
      [--format hf|torch-backbones] [--dtype float32|bfloat16] [--shard-size 5GB] [--force]
      [--remote-code MOLMO_SNAPSHOT] [--verify] [--merge-lora]

--format hf writes the official Molmo folder (loads where Molmo-7B-D-0924 etc. load);
torch-backbones writes HF_DIR/llm (Qwen2 / OLMo2 / OLMoE CausalLM) and HF_DIR/vision
(CLIPVisionModel). --merge-lora exports a LoRA run's checkpoint (adapters only) as the plain
model: its recorded base with the adapters merged into the weights. A Molmo2 run's checkpoint
exports (with --format hf) to the folder transformers' Molmo2ForConditionalGeneration loads;
its --verify runs one processor-made image input through the folder read back and through
transformers' Molmo2 (train/export_verify.py).
The output appears only when complete (see molmo_jax/train/hf_interop.py).
"""
import argparse
import logging
import signal
import sys

from molmo_jax.train.hf_interop import DTYPES, FORMATS, ExportError, export_checkpoint, parse_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint folder (<workdir>/checkpoints)")
    p.add_argument("--step", type=int, help="step to export (default: the latest)")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    p.add_argument("--format", default="hf", choices=FORMATS)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--tokenizer", help="tokenizer folder or file the model was trained with")
    p.add_argument("--remote-code", metavar="DIR",
                   help="folder with the official *_molmo.py files (an official Molmo snapshot you have): copied "
                        "in, auto_map names them, the folder loads offline; default: auto_map names the hub")
    p.add_argument("--verify", action="store_true",
                   help="read the folder back and compare logits with the checkpoint on a random batch (and in "
                        "PyTorch with --remote-code and torch installed); prints the max difference")
    p.add_argument("--merge-lora", action="store_true",
                   help="the checkpoint is a LoRA run's: merge its adapters into the base it records")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def _print_report(report) -> None:
    for side, value in report.items():
        print(f"verify ({side}): " + (f"max |logits difference| {value:.3g}" if isinstance(value, float) else value))


def _stop(signum, frame):
    raise SystemExit(f"interrupted by signal {signum}; no output written")


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax notes that the checkpoint is opened read-only
    signal.signal(signal.SIGTERM, _stop)  # unwinds, so the temporary folder is removed
    try:
        out = export_checkpoint(args.checkpoint, args.out, step=args.step, fmt=args.format, dtype=args.dtype,
                                max_shard_bytes=parse_size(args.shard_size), tokenizer=args.tokenizer,
                                remote_code=args.remote_code, force=args.force,
                                verify=_print_report if args.verify else None, merge_lora=args.merge_lora)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    main()
