"""Weight export: wall time and peak host memory for a ~1B-parameter random Molmo.

    python benchmarks/export.py [--layers 12] [--dtypes float32,bfloat16] [--shard-size 1GB]

Writes and reads ~4.6 GB of checkpoint and ~4.6 GB of safetensors per dtype (a few minutes on 2 busy
CPU cores); --layers 2 gives a 0.63B model for a quicker look.

Model: the CLIP ViT-L/14-336 tower, connector and a dense pre-norm LLM (d 2048, 16 heads, SwiGLU
width 2 x 5632, vocabulary 50304, `--layers` blocks; 12 give ~1.1B parameters), random float32
weights. A first subprocess writes it as a trainer checkpoint (params / frozen and meta; the
optimizer state is left out: the export never reads it). Each export then runs in its own fresh
subprocess, and its peak resident memory is getrusage(RUSAGE_SELF).ru_maxrss of that process,
interpreter and JAX runtime included. Columns:
  export s     wall time of export_checkpoint (read orbax, convert, write safetensors)
  peak RSS     the export process's maximum resident set size
  / f32 copy   peak RSS divided by the bytes of one float32 copy of the parameters (goal < 1.5)
  idle RSS     the same process's RSS after its imports, before exporting (the fixed overhead)
  MB/s         bytes written per second
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAKE_CHECKPOINT = """
import dataclasses, sys
import jax, numpy as np
from flax import nnx
from molmo_jax.model.config import CLIP_VIT_L14_336, LLMConfig, MolmoConfig
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.checkpointing import Checkpointer
from molmo_jax.train.optimizer import split_trainable
layers, directory = int(sys.argv[1]), sys.argv[2]
config = MolmoConfig(vision=CLIP_VIT_L14_336, llm=LLMConfig(
    d_model=2048, n_layers=layers, n_heads=16, n_kv_heads=16, head_dim=128, mlp_hidden_size=11264,
    vocab_size=50280, embedding_size=50304, qkv_bias=True))
abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Molmo(config, rngs=nnx.Rngs(0))), nnx.Param))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda a: jax.device_put(rng.random(a.shape, dtype=np.float32) - 0.5), abstract)
trainable, frozen = split_trainable(params, r"llm/embed/embedding")
ck = Checkpointer(directory, async_save=False)
ck.save(1, {"params": trainable, "frozen": frozen}, None, {"step": 1, "model": config.to_dict(), "mesh": {}})
ck.close()
print(sum(x.size for x in jax.tree.leaves(params)))
"""

EXPORT = """
import json, resource, sys, time
from molmo_jax.train.hf_interop import export_checkpoint
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
idle = rss_mb()
start = time.perf_counter()
export_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], max_shard_bytes=int(sys.argv[4]), tokenizer=sys.argv[5])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "idle_mb": idle}))
"""


def run(code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"subprocess failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    args = p.parse_args()
    from molmo_jax.train.hf_interop import parse_size  # noqa: PLC0415 (the bench imports JAX only in its subprocesses)

    work = tempfile.mkdtemp(prefix="export-bench-", dir=args.workdir)
    try:
        n = int(run(MAKE_CHECKPOINT, str(args.layers), os.path.join(work, "ckpt")))
        tokenizer = os.path.join(work, "tokenizer.json")
        with open(tokenizer, "w") as f:
            json.dump({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}, f)
        f32_mb = 4 * n / 2 ** 20
        rows = []
        for dtype in args.dtypes.split(","):
            out = os.path.join(work, f"out-{dtype}")
            r = json.loads(run(EXPORT, os.path.join(work, "ckpt"), out, dtype, str(parse_size(args.shard_size)),
                               tokenizer))
            written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2 ** 20
            rows.append((dtype, r["seconds"], r["peak_mb"], r["peak_mb"] / f32_mb, r["idle_mb"],
                         written / r["seconds"]))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"export of a random Molmo with {n / 1e9:.3f}B parameters (one float32 copy = {f32_mb:,.0f} MB), "
          f"{os.cpu_count()} CPUs")
    print(f"{'dtype':<10}{'export s':>10}{'peak RSS MB':>13}{'/ f32 copy':>12}{'idle RSS MB':>13}{'MB/s':>8}")
    for dtype, seconds, peak, ratio, idle, rate in rows:
        print(f"{dtype:<10}{seconds:>10.1f}{peak:>13,.0f}{ratio:>12.2f}{idle:>13,.0f}{rate:>8.0f}")


if __name__ == "__main__":
    main()
