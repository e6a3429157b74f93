"""Compile a training, evaluation or generation step for a TPU topology on a CPU machine
and report per-chip memory and FLOPs: check a configuration before paying for the pod.

    python -m molmo_jax.tools.aot --config configs/molmo_72b.py:sft --topology v5p-256
    python -m molmo_jax.tools.aot --config configs/molmo_7b_d.py:pretrain --topology v5e-256 --slices 2
    python -m molmo_jax.tools.aot --config configs/demo.py --topology v5p-8 --mesh fsdp=2,tensor=2
    python -m molmo_jax.tools.aot --config configs/molmo_7b_d.py:sft --topology v5p-64 --step eval
    python -m molmo_jax.tools.aot --config configs/molmo_7b_d.py:sft --topology v5e-8 --step decode \
        --batch 32 --prompt-len 2048 --max-new-tokens 512
    python -m molmo_jax.tools.aot --table docs/scaling.json    # the sweep of docs/scaling.md
    python -m molmo_jax.tools.aot --config configs/molmo_7b_d.py:sft --topology v5e-8 --lora 16 \
        --lora-base-dtype int8 --batch 8                         # QLoRA (config.lora), docs/scaling.md
    python -m molmo_jax.tools.aot --config configs/molmo_7b_d.py:sft --topology v6e-1 --hbm-gib 80 --lora 16
                                                       # one v6e chip, judged against 80 GiB (H100-sized)
    python -m molmo_jax.tools.aot --config configs/molmo2_8b.py:long_sft --topology v5p-128 --grad-accum 2
                                                       # Molmo2 (config.model_family "molmo2"): its row
                                                       # budget of tokens, frames and pooled tokens

--step train (default): the trainer's update step. eval: its loss on the same batch without
dropout, gradient or optimizer state. decode (Molmo only): generation's prefill of --batch prompts of
--prompt-len tokens (default: the config's global batch and seq_len) into a KV cache of
prompt + --max-new-tokens slots, and its one-token decode step, each reported (molmo_jax.tools.
aot_programs lists the programs).

Needs only the `libtpu` wheel (`pip install -e ".[tpu]"`), no TPU: the devices come from
`jax.experimental.topologies` and are compile-only, so CPU stays JAX's default backend.
The programs are the project's own (molmo_jax.train, molmo_jax.inference.generate), lowered
on the mesh and shardings the trainer would build from the same config, on abstract arrays
(nothing is allocated).

Exit status: 0 when every compiled program fits in the chip's HBM, 1 when one does not (or
the compiler reports running out of memory), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

from molmo_jax.train.config_file import load_config_file

# libtpu looks for a TPU VM's metadata when it loads; these tell it there is none, which
# silences its warnings. It also takes a machine-wide lock file meant for processes that
# own TPU chips; compiling only, several processes may load it at once. (Set before the
# first topology is built.)
_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures of a TPU generation (Cloud TPU system architecture pages)."""

    name: str
    topology_prefix: str  # generation name in jax.experimental.topologies
    chip_config: str  # "megacore": one JAX device per chip (both TensorCores)
    hbm_bytes: int
    peak_bf16_flops: float
    dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    cores_per_chip: int  # what the accelerator-type number counts per chip


CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 32 * GiB, 275e12, 3, 2),
    "v5p": Chip("v5p", "v5", "megacore", 95 * GiB, 459e12, 3, 2),
    "v5e": Chip("v5e", "v5e", "default", 16 * GiB, 197e12, 2, 1),
    "v6e": Chip("v6e", "v6e", "default", 32 * GiB, 918e12, 2, 1),
}

# Chip grids of the slice shapes Cloud TPU offers (chips -> grid).
GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    grid: tuple
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def name(self) -> str:
        size = self.chips_per_slice * self.chip.cores_per_chip
        return f"{self.chip.name}-{size}" + (f" x{self.slices}" if self.slices > 1 else "")

    def devices(self) -> list:
        """Compile-only TPU devices of the whole (multi-slice) topology."""
        for key, value in _LIBTPU_ENV.items():
            os.environ.setdefault(key, value)
        from jax.experimental import topologies  # noqa: PLC0415 (after the env is set)
        # Wrap-around links: 3D slices from a full 4x4x4 cube up, and the 16-chip-long
        # dimensions of v5e/v6e slices.
        if self.chip.dims == 3:
            wrap = (min(self.grid) >= 4,) * 3
        else:
            wrap = tuple(n == 16 for n in self.grid)
        name = f"{self.chip.topology_prefix}:{'x'.join(map(str, self.grid))}"
        host = (2, 2, 1) if self.chips_per_slice >= 4 else (1, 1, 1)
        desc = topologies.get_topology_desc(
            topology_name=name, platform="tpu", chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=host, wrap=wrap + (False,) * (3 - len(wrap)), num_slices=self.slices)
        return list(desc.devices)


def parse_topology(name: str, slices: int = 1) -> Topology:
    """'v5p-256' (accelerator type as gcloud names it: TensorCores for v4/v5p, chips for
    v5e/v6e) -> Topology."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"unknown topology {name!r}; expected e.g. v5p-256, v5e-16, v6e-64, v4-32")
    chip = CHIPS[m.group(1)]
    size = int(m.group(2))
    chips = size // chip.cores_per_chip
    grids = GRIDS_3D if chip.dims == 3 else GRIDS_2D
    if size % chip.cores_per_chip or chips not in grids:
        sizes = sorted(n * chip.cores_per_chip for n in grids)
        raise ValueError(f"{name}: no {chip.name} slice of that size; sizes are {sizes}")
    if slices < 1:
        raise ValueError(f"--slices must be >= 1, got {slices}")
    return Topology(chip, grids[chips], slices)


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Report:
    topology: Topology
    step: str  # train, eval, prefill or decode (molmo_jax.tools.aot_programs)
    shape: str  # batch geometry, in words
    mesh: Dict[str, int]
    remat_policy: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    xla_flops_per_chip: float
    analytic_flops: float  # whole step, all chips
    tokens: int  # tokens the step processes
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Peak HBM estimate per chip: inputs + outputs (minus donated buffers reused as
        outputs) + temporaries + program (MaxText's formula; XLA may overestimate)."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.topology.chip.hbm_bytes

    def step_seconds(self, mfu: float) -> float:
        return self.analytic_flops / (self.topology.num_chips * self.topology.chip.peak_bf16_flops * mfu)

    def format(self, mfu: float) -> str:
        chip = self.topology.chip

        def size(n: int) -> str:
            return f"{n / GiB:9.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:9.2f} MiB"

        xla_total = self.xla_flops_per_chip * self.topology.num_chips
        seconds = self.step_seconds(mfu)
        duration = f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"  # decode: milliseconds
        lines = [
            f"{self.step} step on {self.topology.name} ({self.topology.num_chips} chips, "
            f"mesh {self.mesh}, remat {self.remat_policy}), compiled in {self.compile_seconds:.0f} s",
            f"  {self.shape}",
            "per-chip memory:",
            f"  arguments     {size(self.argument_bytes)}",
            f"  outputs       {size(self.output_bytes)}  (of which {size(self.alias_bytes).strip()} "
            "reuse donated arguments)",
            f"  temporaries   {size(self.temp_bytes)}",
            f"  program       {size(self.generated_code_bytes)}",
            f"  total         {size(self.total_bytes)}  of {chip.hbm_bytes / GiB:.0f} GiB HBM "
            f"({chip.name}): {'fits' if self.fits else 'DOES NOT FIT'}",
            "FLOPs per step:",
            f"  XLA           {xla_total:.4g}  ({self.xla_flops_per_chip:.4g} per chip; XLA counts the body of "
            "each scanned layer stack once, not once per layer)",
            f"  analytic      {self.analytic_flops:.4g}  (model FLOPs, molmo_jax.model.flops; "
            f"{self.analytic_flops / self.tokens:.4g} per token)",
            f"  est. step time at {mfu:.0%} MFU: {duration} ({chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 "
            "per chip)",
        ]
        return "\n".join(lines)


def is_out_of_memory(error: Exception) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text or "hbm" in text


# --------------------------------------------------------------------------- compile


def prepare_config(exp, *, mesh: Optional[Dict[str, int]] = None, remat: Optional[str] = None,
                   batch: Optional[int] = None, grad_accum: Optional[int] = None, lora_rank: Optional[int] = None,
                   lora_base_dtype: Optional[str] = None):
    """A copy of the experiment config with command-line changes; compute dtype "auto"
    becomes bfloat16, what the trainer picks on TPU. lora_rank / lora_base_dtype set
    config.lora (LoRA / QLoRA on the config's targets)."""
    exp = exp.copy_and_resolve_references()
    if lora_rank is not None:
        exp.lora.rank = lora_rank
    if lora_base_dtype is not None:
        exp.lora.base_dtype = lora_base_dtype
    if exp.model.dtype == "auto":
        exp.model.dtype = "bfloat16"
    if mesh is not None:
        exp.mesh = dict(mesh)
    if remat is not None:
        exp.model.remat_policy = remat
    if batch is not None:
        exp.train.global_batch = batch
    if grad_accum is not None:
        exp.train.grad_accum_steps = grad_accum
    return exp


STEPS = ("train", "eval", "decode")


def compile_report(exp, topology: Topology, step: str = "train", *, prompt_len: Optional[int] = None,
                   max_new_tokens: int = 256) -> List[Report]:
    """Compiles `step` of `exp` for `topology`: one report for train and eval, two for decode
    (prefill, then one decode step). prompt_len (default exp.data.seq_len) and max_new_tokens
    apply to decode. Raises ValueError when the config cannot run on the mesh, and the
    compiler's error (RESOURCE_EXHAUSTED) when it runs out of HBM."""
    import jax  # noqa: PLC0415
    from molmo_jax.model import attention, sharding  # noqa: PLC0415
    from molmo_jax.tools import aot_programs  # noqa: PLC0415
    from molmo_jax.train import trainer  # noqa: PLC0415

    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose from {STEPS}")
    if step == "decode" and exp.model_family != "molmo":
        raise ValueError(f"--step decode plans Molmo's generation; config.model_family={exp.model_family!r} "
                         "has train and eval plans only")
    mesh = sharding.make_mesh(dict(exp.mesh), topology.devices())
    cfg = trainer.model_config_from(exp)
    tc = exp.train
    hosts = len({d.process_index for d in mesh.devices.flat})
    accum = tc.grad_accum_steps if step == "train" else 1
    sharding.validate_parallelism(cfg, dict(mesh.shape), tc.global_batch, accum, hosts)
    setup = trainer.build_train_setup(exp, cfg, mesh)

    reports = []

    def run(program) -> "jax.stages.Compiled":
        start = time.perf_counter()
        # The model's activation sharding constraints apply, as in train(); attention picks the
        # TPU kernels ("auto": splash) although the tracing machine's backend is CPU.
        with jax.set_mesh(mesh), attention.target_platform("tpu"):
            compiled = program.lower().compile()
        seconds = time.perf_counter() - start
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
        reports.append(Report(topology, program.name, program.shape, dict(mesh.shape), exp.model.remat_policy,
                              mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                              mem.temp_size_in_bytes, mem.generated_code_size_in_bytes,
                              float(cost.get("flops", 0.0)), program.analytic_flops, program.tokens, seconds))
        return compiled

    if step == "train":
        run(aot_programs.train_program(exp, cfg, setup, mesh))
    elif step == "eval":
        run(aot_programs.eval_program(exp, cfg, setup, mesh))
    else:
        prompt_len = exp.data.seq_len if prompt_len is None else prompt_len
        prefill = run(aot_programs.prefill_program(exp, cfg, setup, mesh, prompt_len, prompt_len + max_new_tokens))
        run(aot_programs.decode_program(cfg, setup, mesh, prefill))
    return reports


# --------------------------------------------------------------------------- sweep (--table)

STAGES = ("pretrain", "sft")
MOLMO2_STAGES = ("pretrain", "sft", "long_sft")  # configs/molmo2_common.py
RELEASES = (("Molmo-7B-D", "configs/molmo_7b_d.py", STAGES), ("Molmo-72B", "configs/molmo_72b.py", STAGES),
            ("Molmo-7B-O", "configs/molmo_7b_o.py", STAGES), ("MolmoE-1B", "configs/molmoe_1b.py", STAGES),
            ("Molmo2-4B", "configs/molmo2_4b.py", MOLMO2_STAGES), ("Molmo2-8B", "configs/molmo2_8b.py", MOLMO2_STAGES),
            ("Molmo2-O-7B", "configs/molmo2_o_7b.py", MOLMO2_STAGES))
# Slice sizes tried, smallest first: (accelerator type, slices). Past one v5e/v6e pod (256
# chips) the sweep adds slices joined over the data-center network.
SWEEP_SLICES = {
    "v5p": [(f"v5p-{n}", 1) for n in (8, 16, 32, 64, 128, 256, 512, 1024)],
    "v6e": [(f"v6e-{n}", 1) for n in (4, 8, 16, 32, 64, 128, 256)] + [("v6e-256", 2), ("v6e-256", 4)],
    "v5e": [(f"v5e-{n}", 1) for n in (4, 8, 16, 32, 64, 128, 256)] + [("v5e-256", 2), ("v5e-256", 4)],
}


def sweep_candidates(exp, topology: Topology):
    """(mesh, grad_accum) pairs to try on one slice, cheapest in memory last: FSDP inside each
    slice, data parallelism across slices, tensor parallelism only as far as needed for the
    batch to cover the chips; then gradient accumulation down to one example per chip."""
    batch, chips = exp.train.global_batch, topology.num_chips
    tensor = 1
    while chips // tensor > batch or batch % (chips // tensor):
        tensor *= 2
        if tensor > 8 or chips % tensor:
            return []
    mesh = {"data": topology.slices, "fsdp": topology.chips_per_slice // tensor, "tensor": tensor, "expert": 1}
    per_chip = batch // (chips // tensor)
    return [(mesh, 1)] + ([(mesh, per_chip)] if per_chip > 1 else [])


def state_bytes_per_chip(exp, chips: int) -> float:
    """Lower bound of the per-chip HBM: float32 params, two AdamW moments and the float32
    gradients, evenly split (the gradients all exist at once because each group is clipped by
    its global norm before any update). A slice below it cannot fit, so the sweep does not
    compile there."""
    import jax  # noqa: PLC0415
    from molmo_jax.convert import hf_molmo  # noqa: PLC0415
    from molmo_jax.train.trainer import model_config_from  # noqa: PLC0415
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(hf_molmo.abstract_params(model_config_from(exp))))
    return 16.0 * n / chips


def sweep(results: dict, generations: Sequence[str], log=print) -> Iterator[str]:
    """Fills `results` (key "model|stage|gen" -> row dict) for every release x stage x
    generation not in it yet: the smallest slice of SWEEP_SLICES where the step fits.
    Yields each key once its row is in, so the caller can save progress."""
    from molmo_jax.train import families  # noqa: PLC0415
    for gen in generations:
        for model, path, stages in RELEASES:
            for stage in stages:
                key = f"{model}|{stage}|{gen}"
                if key in results:
                    continue
                base = load_config_file(f"{path}:{stage}")
                tried = []
                for accelerator, slices in SWEEP_SLICES[gen]:
                    topology = parse_topology(accelerator, slices)
                    if state_bytes_per_chip(base, topology.num_chips) > topology.chip.hbm_bytes:
                        tried.append(f"{topology.name}: state alone exceeds HBM")
                        continue
                    for mesh, accum in sweep_candidates(base, topology):
                        exp = prepare_config(base, mesh=mesh, grad_accum=accum)
                        log(f"[{key}] compiling on {topology.name}, mesh {mesh}, grad_accum {accum} ...")
                        try:
                            [report] = compile_report(exp, topology)
                        except ValueError as e:  # this mesh cannot run the config
                            tried.append(f"{topology.name} accum {accum}: {e}")
                            continue
                        except Exception as e:  # noqa: BLE001 (only out-of-memory is expected)
                            if not is_out_of_memory(e):
                                raise
                            tried.append(f"{topology.name} accum {accum}: compiler out of HBM")
                            continue
                        if not report.fits:
                            tried.append(f"{topology.name} accum {accum}: {report.total_bytes / GiB:.1f} GiB")
                            continue
                        results[key] = dict(model=model, stage=stage, gen=gen, slice=topology.name,
                                            chips=topology.num_chips, mesh=report.mesh, remat=report.remat_policy,
                                            grad_accum=accum, batch=exp.train.global_batch,
                                            seq_len=exp.data.seq_len,
                                            geometry=families.family_of(exp).describe(exp),
                                            total_gib=report.total_bytes / GiB,
                                            hbm_gib=topology.chip.hbm_bytes / GiB,
                                            xla_flops=report.xla_flops_per_chip * topology.num_chips,
                                            analytic_flops=report.analytic_flops,
                                            peak_flops=topology.chip.peak_bf16_flops,
                                            compile_s=report.compile_seconds, tried=tried)
                        log(f"[{key}] fits: {report.total_bytes / GiB:.1f} GiB per chip")
                        break
                    if key in results:
                        break
                else:
                    results[key] = dict(model=model, stage=stage, gen=gen, slice=None, tried=tried)
                yield key


def table_markdown(results: dict, generations: Sequence[str], mfu: float) -> str:
    """The docs/scaling.md table: one row per release x stage x generation."""
    head = ("| model | stage | TPU | smallest slice that fits | mesh (data, fsdp, tensor) | remat | grad accum "
            "| HBM per chip (of) | analytic FLOPs | est. step time |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for gen in generations:
        for model, _, stages in RELEASES:
            for stage in stages:
                r = results.get(f"{model}|{stage}|{gen}")
                if r is None:
                    rows.append(f"| {model} | {stage} | {gen} | not computed | | | | | | |")
                elif r["slice"] is None:
                    rows.append(f"| {model} | {stage} | {gen} | none up to {SWEEP_SLICES[gen][-1][0]} "
                                f"x{SWEEP_SLICES[gen][-1][1]} | | | | | | |")
                else:
                    m = r["mesh"]
                    seconds = r["analytic_flops"] / (r["chips"] * r["peak_flops"] * mfu)
                    rows.append(f"| {model} | {stage} | {gen} | {r['slice']} ({r['chips']} chips) "
                                f"| {m['data']}, {m['fsdp']}, {m['tensor']} | {r['remat']} | {r['grad_accum']} "
                                f"| {r['total_gib']:.1f} GiB ({r['hbm_gib']:.0f}) "
                                f"| {r['analytic_flops']:.3g} | {seconds:.2f} s |")
    return head + "\n".join(rows) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m molmo_jax.tools.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment config, e.g. configs/molmo_72b.py:sft")
    parser.add_argument("--topology", help="accelerator type, e.g. v5p-256, v5e-64, v6e-16")
    parser.add_argument("--slices", type=int, default=1, help="slices joined over the data-center network")
    parser.add_argument("--mesh", default=None,
                        help="mesh axis sizes, e.g. data=2,fsdp=-1,tensor=4 (default: the config's)")
    parser.add_argument("--step", default="train", choices=STEPS,
                        help="train: the update step; eval: its loss only; decode: generation's prefill "
                             "and one-token decode step")
    parser.add_argument("--remat", default=None, help="remat policy (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (train)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="decode: prompt tokens (default: the config's seq_len)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="decode: new tokens the KV cache holds beyond the prompt (default 256)")
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="LoRA of this rank on config.lora.targets (only adapters train)")
    parser.add_argument("--lora-base-dtype", default=None, choices=("float32", "bfloat16", "int8", "nf4"),
                        help="with --lora: the frozen base's weights (int8 or nf4 = QLoRA; model/quantization.py)")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="judge the fit against this memory per device instead of the chip's HBM (e.g. 80 "
                             "for an H100-80GB-sized device, with --topology v6e-1; XLA:TPU still refuses a "
                             "program larger than the real chip's HBM, 32 GiB for v6e)")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the step-time estimate")
    parser.add_argument("--table", default=None, metavar="RESULTS_JSON",
                        help="sweep every release (results cached in this JSON) and print the table")
    parser.add_argument("--generations", default="v5p,v6e,v5e", help="TPU generations of the sweep")
    parser.add_argument("--cached-only", action="store_true",
                        help="with --table: print the table of the cached results, compile nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.table:
        import json  # noqa: PLC0415
        gens = args.generations.split(",")
        unknown = [g for g in gens if g not in SWEEP_SLICES]
        if unknown:
            print(f"error: unknown generation(s) {unknown}; choose from {sorted(SWEEP_SLICES)}", file=sys.stderr)
            return 2
        results = {}
        if os.path.exists(args.table):
            with open(args.table) as f:
                results = json.load(f)
        for _ in ([] if args.cached_only else sweep(results, gens, log=lambda m: print(m, file=sys.stderr, flush=True))):
            with open(args.table, "w") as f:
                json.dump(results, f, indent=1, sort_keys=True)
        print(table_markdown(results, gens, args.mfu))
        return 0

    try:
        if not args.config or not args.topology:
            raise ValueError("give --config and --topology (or --table)")
        if args.step != "train" and args.grad_accum is not None:
            raise ValueError(f"--grad-accum applies to --step train, not {args.step}")
        if args.step != "decode" and (args.prompt_len is not None or args.max_new_tokens is not None):
            raise ValueError(f"--prompt-len and --max-new-tokens apply to --step decode, not {args.step}")
        for flag, value in (("--prompt-len", args.prompt_len), ("--max-new-tokens", args.max_new_tokens),
                            ("--batch", args.batch)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        mesh = None
        if args.mesh:
            mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(","))}
        if args.lora_base_dtype and not args.lora:
            raise ValueError("--lora-base-dtype needs --lora RANK")
        topology = parse_topology(args.topology, args.slices)
        if args.hbm_gib is not None:
            if args.hbm_gib <= 0:
                raise ValueError(f"--hbm-gib must be > 0, got {args.hbm_gib}")
            chip = dataclasses.replace(topology.chip, name=f"{topology.chip.name} judged at {args.hbm_gib:g} GiB",
                                       hbm_bytes=int(args.hbm_gib * GiB))
            topology = dataclasses.replace(topology, chip=chip)
        exp = prepare_config(load_config_file(args.config), mesh=mesh, remat=args.remat, batch=args.batch,
                             grad_accum=args.grad_accum, lora_rank=args.lora, lora_base_dtype=args.lora_base_dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        reports = compile_report(exp, topology, args.step, prompt_len=args.prompt_len,
                                 max_new_tokens=256 if args.max_new_tokens is None else args.max_new_tokens)
    except ValueError as e:  # the config cannot run on this mesh (named by the trainer's checks)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        if not is_out_of_memory(e):
            raise
        print(f"{args.step} step does not fit on {topology.name}: {e}", file=sys.stderr)
        return 1
    print("\n\n".join(report.format(args.mfu) for report in reports))
    for report in reports:
        if not report.fits:
            print(f"{report.step} step does not fit on {topology.name}: {report.total_bytes / GiB:.1f} GiB per "
                  f"chip > {topology.chip.hbm_bytes / GiB:.0f} GiB HBM", file=sys.stderr)
    return 0 if all(report.fits for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
