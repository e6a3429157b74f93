"""Serve a Molmo checkpoint: an OpenAI-style chat-completions API and a pointing page.

  python -m molmo_jax.serve --checkpoint Molmo-7B-D-0924/ --port 8000 --max-batch 8
  python -m molmo_jax.serve --checkpoint run/ --tokenizer tok/spm.model --max-crops 1

Then POST /v1/chat/completions (OpenAI chat format, text + image_url parts, stream=true for
server-sent events; points in the answer come back in image pixels), GET /v1/models, GET /health,
and open http://HOST:PORT/ for the page. Requests that arrive while others decode join the running
batch (continuous batching over --max-batch KV-cache rows of --context slots). Limits: body size,
image pixels, queue length, time for the body and for the answer; a full queue answers 503 with
Retry-After. Bind another host than 127.0.0.1 only on a network you trust: there is no auth.
"""
import argparse
import dataclasses
import os
import sys

import uvicorn

from data_pipelines.jsonl import UnreadableFile
from molmo_jax.convert.links import CheckpointError
from molmo_jax.inference.predictor import IMAGE_FETCH, Predictor
from molmo_jax.serving.app import ServeConfig, create_app
from molmo_jax.serving.batcher import EngineConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.serve", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF Molmo folder or molmo-jax checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer file/folder (default: the checkpoint folder)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the id in /v1/models and responses (default: the folder name)")
    p.add_argument("--max-crops", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache rows)")
    p.add_argument("--context", type=int, default=2048,
                   help="KV-cache slots per request: its padded prompt + max_tokens + --decode-chunk")
    p.add_argument("--decode-chunk", type=int, default=4, help="decode steps per compiled call; new requests "
                                                                "join between chunks")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; more get 503")
    p.add_argument("--max-tokens", type=int, default=200, help="max_tokens of a request that gives none")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MiB")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image, in pixels")
    p.add_argument("--max-image-mb", type=float, default=IMAGE_FETCH.max_bytes / 2**20,
                   help="largest image body fetched from an http(s) URL, MiB")
    p.add_argument("--fetch-timeout", type=float, default=IMAGE_FETCH.deadline,
                   help="seconds for the whole download of one image URL")
    p.add_argument("--body-timeout", type=float, default=10.0, help="seconds for a client to send its body")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds for an answer")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name in ("max_body_mb", "max_image_mb", "fetch_timeout", "body_timeout", "request_timeout", "max_pixels",
                 "max_tokens"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    try:
        engine = EngineConfig(max_batch=args.max_batch, context=args.context, chunk=args.decode_chunk,
                              max_queue=args.max_queue, seed=args.seed)
        fetch = dataclasses.replace(IMAGE_FETCH, deadline=args.fetch_timeout,
                                    max_bytes=int(args.max_image_mb * 2**20))
        predictor = Predictor.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, max_crops=args.max_crops,
                                              dtype=args.dtype, fetch_config=fetch)
    except (UnreadableFile, CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    config = ServeConfig(engine=engine, model_name=name, max_body_bytes=int(args.max_body_mb * 2**20),
                         max_pixels=args.max_pixels, body_timeout=args.body_timeout,
                         request_timeout=args.request_timeout, default_max_tokens=args.max_tokens, fetch=fetch)
    uvicorn.run(create_app(predictor, config), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
