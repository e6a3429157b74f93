"""Weight export and import: wall time and peak host memory for a ~1B-parameter random Molmo.

    python benchmarks/export.py [--layers 12] [--dtypes float32,bfloat16] [--shard-size 1GB] [--import]
        [--backbones] [--small] [--json]

Writes and reads ~4.6 GB of checkpoint and ~4.6 GB of safetensors per dtype (a few minutes on 2 busy
CPU cores); --layers 2 gives a 0.63B model for a quicker look.

Model: the CLIP ViT-L/14-336 tower, connector and a dense pre-norm LLM (d 2048, 16 heads, SwiGLU
width 2 x 5632, vocabulary 50304, `--layers` blocks; 12 give ~1.1B parameters), random float32
weights; `--small` swaps in a narrow ViT and LLM (d 512, width 2 x 1408; ~0.03B parameters per
block at --layers 8, for the CI test). A first subprocess writes it as a trainer checkpoint
(params / frozen and meta; the optimizer state is left out: the export never reads it). Each
export then runs in its own fresh subprocess, and its peak resident memory is
getrusage(RUSAGE_SELF).ru_maxrss of that process, interpreter and JAX runtime included.
`--import` also writes the model as an official HF folder (float32 safetensors shards) and
measures `import_hf` into a step-0 training checkpoint (params, frozen, Adam moments) the same way.
Columns:
  s            wall time of export_checkpoint / import_hf
  peak RSS     the process's maximum resident set size
  / f32 copy   peak RSS divided by the bytes of one float32 copy of the parameters (goal < 1.5
               for export, < 2 for import)
  idle RSS     the same process's RSS after its imports, before working (the fixed overhead)
  MB/s         bytes written per second
`--backbones` writes the LLM and ViT as transformers Qwen2 / CLIPVisionModel folders and measures the
trainer's stage-1 loading of them (trainer._load_backbones) onto a random-init state; its idle RSS
includes that state (one float32 copy), which the loaded towers replace.
`--json` prints the rows as one JSON list instead of the table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = """
from molmo_jax.model.config import CLIP_VIT_L14_336, LLMConfig, MolmoConfig
import dataclasses
def bench_config(layers, small):
    if small:  # CI size: a narrow ViT (same depth) and LLM
        vision = dataclasses.replace(CLIP_VIT_L14_336, width=256, num_heads=4, head_dim=64, mlp_dim=1024)
        llm = LLMConfig(d_model=512, n_layers=layers, n_heads=8, n_kv_heads=8, head_dim=64, mlp_hidden_size=2816,
                        vocab_size=50280, embedding_size=50304, qkv_bias=True)
        return MolmoConfig(vision=vision, llm=llm)
    return MolmoConfig(vision=CLIP_VIT_L14_336, llm=LLMConfig(
        d_model=2048, n_layers=layers, n_heads=16, n_kv_heads=16, head_dim=128, mlp_hidden_size=11264,
        vocab_size=50280, embedding_size=50304, qkv_bias=True))
"""

MAKE_CHECKPOINT = MODEL + """
import os, sys
import jax, numpy as np
from flax import nnx
from molmo_jax.convert.hf_molmo import config_to_hf, molmo_links
from molmo_jax.convert.links import get_path
from molmo_jax.convert.safetensors_stream import write_json, write_safetensors
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.checkpointing import Checkpointer
from molmo_jax.train.optimizer import split_trainable
layers, small, directory, hf, backbones = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
config = bench_config(layers, small)
abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Molmo(config, rngs=nnx.Rngs(0))), nnx.Param))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda a: rng.random(a.shape, dtype=np.float32) - 0.5, abstract)
if hf:  # the official HF folder import_hf reads, written with the export's streamed writer
    os.makedirs(hf)
    write_json(os.path.join(hf, "config.json"), config_to_hf(config))
    write_safetensors(hf, lambda paths: {p: get_path(params, p) for p in paths}, molmo_links(config), abstract,
                      np.float32, 10 ** 9)
if directory:  # the trainer checkpoint the export reads
    trainable, frozen = split_trainable(jax.device_put(params), r"llm/embed/embedding")
    ck = Checkpointer(directory, async_save=False)
    ck.save(1, {"params": trainable, "frozen": frozen}, None, {"step": 1, "model": config.to_dict(), "mesh": {}})
    ck.close()
if backbones:  # transformers Qwen2 + CLIPVisionModel folders, as stage 1 starts from
    from molmo_jax.convert import export_formats
    read = lambda paths: {p: get_path(params, p) for p in paths}
    for sub, links in (("llm", export_formats.causal_lm_links(config)),
                       ("vision", export_formats.clip_vision_links(config))):
        os.makedirs(os.path.join(backbones, sub))
        write_safetensors(os.path.join(backbones, sub), read, links, abstract, np.float32, 10 ** 9)
print(sum(x.size for x in jax.tree.leaves(params)))
"""

MEASURE = """
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
from molmo_jax.train.hf_interop import export_checkpoint, import_hf
from configs import common
idle = rss_mb()
start = time.perf_counter()
"""

EXPORT = MEASURE + """
export_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], max_shard_bytes=int(sys.argv[4]), tokenizer=sys.argv[5])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "idle_mb": idle}))
"""

IMPORT = MEASURE + MODEL + """
cfg = common.base_config("sft")
cfg.model = common.model_config(bench_config(int(sys.argv[3]), sys.argv[4] == "1"))
import_hf(sys.argv[1], sys.argv[2], cfg)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "idle_mb": idle}))
"""

BACKBONES = MEASURE + MODEL + """
import jax
from molmo_jax.convert.hf_molmo import abstract_params
from molmo_jax.train.trainer import _load_backbones
config = bench_config(int(sys.argv[2]), sys.argv[3] == "1")
state = {"params": jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), abstract_params(config)), "frozen": {}}
jax.block_until_ready(state)
idle = rss_mb()  # the runtime and the random-init state the backbones replace
start = time.perf_counter()
jax.block_until_ready(_load_backbones(sys.argv[1] + "/vision", sys.argv[1] + "/llm", config, state, ""))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "idle_mb": idle}))
"""


def folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files) / 2 ** 20


def run(code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"subprocess failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--small", action="store_true", help="narrow ViT and LLM (the CI test's size)")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16 (empty: no export)")
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--import", dest="do_import", action="store_true", help="also measure import_hf")
    p.add_argument("--backbones", action="store_true",
                   help="also measure stage-1 loading of Qwen2 + CLIP folders (trainer._load_backbones)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    args = p.parse_args()
    from molmo_jax.train.hf_interop import parse_size  # noqa: PLC0415 (the bench imports JAX only in its subprocesses)

    work = tempfile.mkdtemp(prefix="export-bench-", dir=args.workdir)
    small = "1" if args.small else "0"
    try:
        hf = os.path.join(work, "hf") if args.do_import else ""
        dtypes = [d for d in args.dtypes.split(",") if d]
        backbones = os.path.join(work, "backbones") if args.backbones else ""
        n = int(run(MAKE_CHECKPOINT, str(args.layers), small, os.path.join(work, "ckpt") if dtypes else "", hf,
                    backbones))
        tokenizer = os.path.join(work, "tokenizer.json")
        with open(tokenizer, "w") as f:
            json.dump({"version": "1.0", "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0}, "merges": []},
                       "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True, "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": False}]}, f)
        f32_mb = 4 * n / 2 ** 20
        rows = []
        for dtype in dtypes:
            out = os.path.join(work, f"out-{dtype}")
            r = json.loads(run(EXPORT, os.path.join(work, "ckpt"), out, dtype, str(parse_size(args.shard_size)),
                               tokenizer))
            rows.append((f"export {dtype}", r, folder_mb(out)))
            shutil.rmtree(out)
        if args.do_import:
            out = os.path.join(work, "imported")
            r = json.loads(run(IMPORT, hf, out, str(args.layers), small))
            rows.append(("import float32", r, folder_mb(out)))
            shutil.rmtree(out)
        if args.backbones:
            r = json.loads(run(BACKBONES, backbones, str(args.layers), small))
            rows.append(("stage-1 load", r, folder_mb(backbones)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps([dict(r, what=what, parameters=n, f32_mb=f32_mb, written_mb=mb) for what, r, mb in rows]))
        return
    print(f"export / import of a random Molmo with {n / 1e9:.3f}B parameters (one float32 copy = {f32_mb:,.0f} MB), "
          f"{os.cpu_count()} CPUs")
    print(f"{'what':<16}{'s':>8}{'peak RSS MB':>13}{'/ f32 copy':>12}{'idle RSS MB':>13}{'MB/s':>8}")
    for what, r, mb in rows:
        print(f"{what:<16}{r['seconds']:>8.1f}{r['peak_mb']:>13,.0f}{r['peak_mb'] / f32_mb:>12.2f}"
              f"{r['idle_mb']:>13,.0f}{mb / r['seconds']:>8.0f}")


if __name__ == "__main__":
    main()
