"""Server throughput and latency: continuous batching against one request at a time.

    python benchmarks/serve.py [--requests 4] [--max-tokens 32] [--max-batch 32] [--checkpoint DIR]

The server (uvicorn on 127.0.0.1, in this process) answers 1, 8 and 32 concurrent clients, each
sending --requests greedy text requests one after another (prompts of 3 to 20 words,
--max-tokens each); then the same 32 clients against a server with one KV-cache row, i.e. one
request at a time. Default model: the random tiny Qwen2-style preset ("tiny-qwen2", 2 layers of
width 64) with a sentencepiece tokenizer trained here in a second, so the figures measure the
server and the batching, not a model. Every shape is compiled by a warm-up round first.
Prints one table: requests/s, generated tokens/s, p50 / p99 request latency, and the speed-up of
continuous batching over one at a time at 32 clients.
"""
import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import httpx
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import tokenizer as tokenizer_lib  # noqa: E402
from molmo_jax.demo.data import train_tokenizer  # noqa: E402
from molmo_jax.inference.predictor import Predictor, model_crop_config  # noqa: E402
from molmo_jax.model.config import PRESETS  # noqa: E402
from molmo_jax.model.molmo import Molmo  # noqa: E402
from molmo_jax.serving.app import ServeConfig, create_app, serving_in_thread  # noqa: E402
from molmo_jax.serving.batcher import EngineConfig  # noqa: E402

WORDS = "the red circle is left of a blue square and two green triangles under the clock".split()


def tiny_predictor(folder: str) -> Predictor:
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    model = Molmo(PRESETS["tiny-qwen2"], rngs=nnx.Rngs(0))
    tok = tokenizer_lib.load_tokenizer(train_tokenizer(folder, lines, 320), pad_to=model.config.llm.vocab_size)
    return Predictor(model, tok, model_crop_config(model.config, max_crops=1))


def prompt(i: int) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 7) % 18))


async def load(base: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list, int]:
    """-> (wall seconds, per-request latencies, generated tokens)."""
    latencies, tokens = [], 0

    async def client(client_id, http):
        nonlocal tokens
        for r in range(requests):
            body = {"messages": [{"role": "user", "content": prompt(client_id * requests + r)}],
                    "max_tokens": max_tokens}
            start = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise SystemExit(f"error: {response.status_code} {response.text}")
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        return time.perf_counter() - start, latencies, tokens


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128, help="cache slots per row (prompt bucket + new)")
    parser.add_argument("--decode-chunk", type=int, default=4)
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of the random tiny model")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        predictor = (Predictor.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, max_crops=1)
                     if args.checkpoint else tiny_predictor(folder))
    runs = [("continuous", args.max_batch, c) for c in (1, 8, 32)] + [("one at a time", 1, 32)]
    rows, rps = [], {}
    for max_batch in sorted({r[1] for r in runs}, reverse=True):
        engine = EngineConfig(max_batch=max_batch, context=args.context, chunk=args.decode_chunk, max_queue=1024)
        with serving_in_thread(create_app(predictor, ServeConfig(engine=engine))) as base:
            asyncio.run(load(base, 8, 2, args.max_tokens))  # compile every prompt bucket and the decode chunk
            for mode, batch, clients in runs:
                if batch != max_batch:
                    continue
                wall, latencies, tokens = asyncio.run(load(base, clients, args.requests, args.max_tokens))
                rps[(mode, clients)] = len(latencies) / wall
                rows.append((mode, batch, clients, len(latencies), len(latencies) / wall, tokens / wall,
                             statistics.median(latencies), percentile(latencies, 99)))
    print(f"{'mode':>13} | {'rows':>4} | {'clients':>7} | {'requests':>8} | {'req/s':>6} | {'tok/s':>7} | "
          f"{'p50 s':>6} | {'p99 s':>6}")
    print("-+-".join("-" * w for w in (13, 4, 7, 8, 6, 7, 6, 6)))
    for mode, batch, clients, n, r, t, p50, p99 in sorted(rows, key=lambda row: (row[0] != "continuous", row[2])):
        print(f"{mode:>13} | {batch:>4} | {clients:>7} | {n:>8} | {r:>6.2f} | {t:>7.1f} | {p50:>6.3f} | {p99:>6.3f}")
    speed_up = rps[("continuous", 32)] / rps[("one at a time", 32)]
    print(f"continuous batching over one at a time, 32 clients: {speed_up:.1f}x requests/s")


if __name__ == "__main__":
    main()
