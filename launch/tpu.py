"""Run molmo-jax on a Cloud TPU slice (or several slices) with gcloud.

    python -m launch.tpu create --name molmo --accelerator v5p-64 --zone us-east5-a --project my-proj
    python -m launch.tpu sync   --name molmo --zone us-east5-a --project my-proj
    python -m launch.tpu run    --name molmo --zone us-east5-a --project my-proj --run exp1 \
        --cache-dir gs://my-bucket/jax-cache -- \
        python -m molmo_jax.train --config=configs/molmo_72b.py:sft --workdir=gs://my-bucket/runs/exp1
    python -m launch.tpu logs   --name molmo --zone us-east5-a --project my-proj --run exp1 --worker 0
    python -m launch.tpu stop   --name molmo --zone us-east5-a --project my-proj
    python -m launch.tpu delete --name molmo --zone us-east5-a --project my-proj

`--slices N` (N > 1) asks for a multislice job: one queued resource NAME whose N nodes are
NAME-0 .. NAME-{N-1}; every other subcommand then addresses all nodes at once through
`gcloud compute tpus queued-resources ssh/scp --node=all`. The TPU runtime writes the
MEGASCALE_* variables of a queued resource into each worker's metadata, and
`jax.distributed.initialize()` reads them there, so nothing here passes ranks around.

Each subcommand builds one bash script of gcloud commands. `--dry-run` prints it instead of
running it, so what you read is exactly what would run. The environment every worker gets
is documented in launch/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from typing import List, Sequence

# Software image per TPU generation (Cloud TPU "runtime version").
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# gcloud spells v5e slices "v5litepod-N"; every other generation keeps its short name.
GCLOUD_ACCELERATOR_PREFIX = {"v5e": "v5litepod"}

REMOTE_DIR = "molmo-jax"  # relative to the worker's home directory
ARCHIVE = "molmo-jax.tar.gz"

# Processes that hold a TPU keep its device files open; the lock file outlives a crashed
# process and makes the next libtpu start fail with "TPU in use".
KILL_STALE = ("sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; "
              "sudo rm -f /tmp/libtpu_lockfile")

# XLA flags for TPU training (async collectives overlap FSDP gathers with compute). They
# are compiler options of libtpu, so they go in LIBTPU_INIT_ARGS, not XLA_FLAGS.
DEFAULT_LIBTPU_INIT_ARGS = ("--xla_tpu_enable_async_collective_fusion=true "
                            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
                            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                            "--xla_tpu_overlap_compute_collective_tc=true "
                            "--xla_enable_async_all_gather=true")


def parse_accelerator(name: str) -> tuple[str, int]:
    """'v5p-64' -> ('v5p', 64). The number is what gcloud uses: TensorCores for v4/v5p,
    chips for v5e/v6e. 'v5litepod-256' is accepted as v5e."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"unknown TPU accelerator {name!r}; expected e.g. v5p-64, v5e-256, v6e-16, v4-32")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    return gen, int(m.group(2))


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the commands go: one TPU VM slice, or one queued resource of `slices` nodes."""

    name: str
    zone: str
    project: str
    slices: int = 1
    queued: bool = False  # a single slice can be a queued resource too (waits for capacity)

    @property
    def is_queued_resource(self) -> bool:
        return self.queued or self.slices > 1

    def _where(self) -> List[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    def ssh(self, command: str, worker: str = "all") -> str:
        if self.is_queued_resource:
            head = ["gcloud", "compute", "tpus", "queued-resources", "ssh", self.name,
                    "--node=all", f"--worker={worker}"]
        else:
            head = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, f"--worker={worker}"]
        return join(head + self._where() + [f"--command={command}"])

    def scp(self, local: str, remote: str) -> str:
        """Copies `local` to `remote` (relative to the home directory) on every worker."""
        if self.is_queued_resource:
            head = ["gcloud", "compute", "tpus", "queued-resources", "scp", local,
                    f"{self.name}:{remote}", "--node=all", "--worker=all"]
        else:
            head = ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
                    "--worker=all"]
        return join(head + self._where())

    def create(self, accelerator: str, spot: bool, runtime_version: str | None) -> str:
        gen, count = parse_accelerator(accelerator)
        gcloud_type = f"{GCLOUD_ACCELERATOR_PREFIX.get(gen, gen)}-{count}"
        version = runtime_version or RUNTIME_VERSIONS[gen]
        if self.is_queued_resource:
            nodes = ([f"--node-count={self.slices}", f"--node-prefix={self.name}"] if self.slices > 1
                     else [f"--node-id={self.name}"])
            cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, *nodes,
                   f"--accelerator-type={gcloud_type}", f"--runtime-version={version}"]
        else:
            cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name,
                   f"--accelerator-type={gcloud_type}", f"--version={version}"]
        return join(cmd + self._where() + (["--spot"] if spot else []))

    def delete(self) -> str:
        if self.is_queued_resource:  # --force also deletes the nodes the request created
            cmd = ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, "--force"]
        else:
            cmd = ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name]
        return join(cmd + self._where() + ["--quiet"])


def join(argv: Sequence[str]) -> str:
    """Shell-quotes argv; `--flag=value` keeps the flag bare and quotes only the value."""
    def quote(arg: str) -> str:
        flag, sep, value = arg.partition("=")
        if arg.startswith("--") and sep:
            return flag + "=" + shlex.quote(value)
        return shlex.quote(arg)
    return " ".join(quote(a) for a in argv)


def env_prefix(env: dict) -> str:
    """`export K="V"; ...` for the remote shell (double quotes: the whole remote command is
    already single-quoted on the local side)."""
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or re.search(r'["$`\\]', value):
            raise ValueError(f"environment entry {key}={value!r}: keys must be shell names and "
                             "values may not contain quotes, $, ` or backslashes")
    return "".join(f'export {k}="{v}"; ' for k, v in env.items())


# --------------------------------------------------------------------------- subcommands

def create_script(t: Target, args) -> List[str]:
    return [t.create(args.accelerator, args.spot, args.runtime_version)]


def sync_script(t: Target, args) -> List[str]:
    """Copy the working tree (tracked + untracked, minus .gitignore'd) to every worker and
    install it into a venv there; an existing venv is reused, so a re-sync is quick."""
    pack = (f"git ls-files -z --cached --others --exclude-standard | "
            f"tar --null -T - -czf {shlex.quote('/tmp/' + ARCHIVE)}")
    install = (f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C ~/{REMOTE_DIR} && "
               f"cd ~/{REMOTE_DIR} && (test -d .venv || python3 -m venv .venv) && "
               f".venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e \".[tpu]\"")
    return [pack, t.scp("/tmp/" + ARCHIVE, ARCHIVE), t.ssh(install)]


def run_env(args) -> dict:
    env = {"LIBTPU_INIT_ARGS": args.libtpu_init_args}
    if args.cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = args.cache_dir
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {kv!r}")
        env[key] = value
    return env


def run_script(t: Target, args) -> List[str]:
    """Free the TPUs, then start the command on every worker at once, detached, each worker
    writing its own log (named after its hostname) under ~/molmo-jax/logs/<run>/."""
    if not args.command:
        raise ValueError("run: give the command to start after `--`, e.g. "
                         "-- python -m molmo_jax.train --config=configs/demo.py")
    command = list(args.command)
    if command[0] == "python":  # the workers' interpreter is the venv that `sync` made
        command[0] = ".venv/bin/python"
    logdir = f"logs/{args.run}"
    remote = (f"{KILL_STALE}; cd ~/{REMOTE_DIR} && mkdir -p {logdir} || exit 1; {env_prefix(run_env(args))}"
              f"setsid nohup {join(command)} > {logdir}/$(hostname).log 2>&1 < /dev/null &")
    return [t.ssh(remote)]


def logs_script(t: Target, args) -> List[str]:
    follow = " -f" if args.follow else ""
    return [t.ssh(f"tail -v -n {args.lines}{follow} ~/{REMOTE_DIR}/logs/{args.run}/*.log",
                  worker=args.worker)]


def stop_script(t: Target, args) -> List[str]:
    return [t.ssh(KILL_STALE)]


def delete_script(t: Target, args) -> List[str]:
    return [t.delete()]


SUBCOMMANDS = {"create": create_script, "sync": sync_script, "run": run_script,
               "logs": logs_script, "stop": stop_script, "delete": delete_script}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", required=True)
    for name in SUBCOMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--name", required=True, help="TPU VM / queued resource name")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", required=True)
        p.add_argument("--slices", type=int, default=1, help="number of slices (>1: multislice)")
        p.add_argument("--queued", action="store_true",
                       help="single slice through a queued resource (waits for capacity)")
        p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
        if name == "create":
            p.add_argument("--accelerator", required=True, help="e.g. v5p-64, v5e-256, v6e-16")
            p.add_argument("--spot", action="store_true")
            p.add_argument("--runtime-version", default=None,
                           help="TPU software version (default per generation)")
        if name == "run":
            p.add_argument("--run", required=True, help="run name: logs go to logs/<run>/")
            p.add_argument("--cache-dir", default=None,
                           help="persistent XLA compilation cache, e.g. gs://bucket/jax-cache")
            p.add_argument("--libtpu-init-args", default=DEFAULT_LIBTPU_INIT_ARGS)
            p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- python -m ... (on every worker)")
        if name == "logs":
            p.add_argument("--run", required=True)
            p.add_argument("--worker", default="0", help="worker index or 'all'")
            p.add_argument("--lines", type=int, default=50)
            p.add_argument("--follow", action="store_true")
    return parser


def script_for(argv: Sequence[str]) -> tuple[List[str], bool]:
    """Parses a command line; returns (lines of the bash script, dry_run)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if args.slices < 1:
        raise ValueError(f"--slices must be >= 1, got {args.slices}")
    target = Target(args.name, args.zone, args.project, args.slices, args.queued)
    return SUBCOMMANDS[args.subcommand](target, args), args.dry_run


def main(argv: Sequence[str] | None = None) -> int:
    try:
        lines, dry_run = script_for(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = "\n".join(lines)
    if dry_run:
        print(script)
        return 0
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script]).returncode


if __name__ == "__main__":
    sys.exit(main())
