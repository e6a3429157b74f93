"""Simulate an N-host pod on one machine: N processes on 127.0.0.1, each with its own fake
CPU devices, joined by jax.distributed (gloo collectives on CPU).

    python -m launch.local --hosts 2 --devices 2 -- \
        python -m molmo_jax.train --config=configs/demo.py:pretrain --workdir=/tmp/run

Process i gets
  JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=<devices>  (JAX reads them)
and, appended to its command line, the experiment-config overrides that the trainer,
evaluator and exporter read through `molmo_jax.model.sharding.initialize_distributed`:
  --config.distributed.enabled=True --config.distributed.coordinator_address=127.0.0.1:<port>
  --config.distributed.num_processes=<hosts> --config.distributed.process_id=<i>
For a program with another command line, pass --no-config-overrides and put the placeholders
{process_id}, {num_processes}, {coordinator_address} in its arguments instead.

Each process logs to <log-dir>/process_<i>.log (default: a fresh temporary folder); the
launcher waits for all of them, prints the tail of any that failed, stops the others when
one fails (a lone survivor would block forever in a collective), and exits with the first
non-zero return code.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_commands(command: Sequence[str], hosts: int, coordinator: str,
                     config_overrides: bool) -> List[List[str]]:
    """The command line of every process: placeholders filled, config overrides appended."""
    if command and command[0] == "python":  # the interpreter running this launcher
        command = [sys.executable, *command[1:]]
    commands = []
    for i in range(hosts):
        fields = {"process_id": i, "num_processes": hosts, "coordinator_address": coordinator}
        argv = [arg.format(**fields) if "{" in arg else arg for arg in command]
        if config_overrides:
            argv += ["--config.distributed.enabled=True",
                     f"--config.distributed.coordinator_address={coordinator}",
                     f"--config.distributed.num_processes={hosts}",
                     f"--config.distributed.process_id={i}"]
        commands.append(argv)
    return commands


def process_env(devices: int) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # Replace any device-count flag of the parent (tests run with 8 fake devices).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def launch(command: Sequence[str], hosts: int, devices: int, log_dir: pathlib.Path,
           config_overrides: bool = True, timeout: float | None = None) -> int:
    """Runs the N processes to completion; returns 0 or the first failing return code."""
    if hosts < 1 or devices < 1:
        raise ValueError(f"--hosts and --devices must be >= 1, got {hosts} and {devices}")
    if not command:
        raise ValueError("give the command to run after `--`, "
                         "e.g. -- python -m molmo_jax.train --config=... --workdir=...")
    log_dir.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    env = process_env(devices)
    procs, logs = [], []
    for i, argv in enumerate(process_commands(command, hosts, coordinator, config_overrides)):
        log_path = log_dir / f"process_{i}.log"
        logs.append(log_path)
        with open(log_path, "wb") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    deadline = None if timeout is None else time.monotonic() + timeout
    failed, timed_out = None, False
    while any(p.poll() is None for p in procs):
        codes = [p.poll() for p in procs]
        failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
        timed_out = deadline is not None and time.monotonic() > deadline
        if failed is not None or timed_out:
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if timed_out and failed is None:
        print(f"stopped all {hosts} processes after the {timeout:.0f} s timeout; logs in {log_dir}",
              file=sys.stderr)
        return 124
    codes = [p.returncode for p in procs]
    if failed is None and any(codes):
        failed = next(i for i, c in enumerate(codes) if c)
    if failed is None:
        return 0
    tail = logs[failed].read_text(errors="replace").splitlines()[-30:]
    print(f"process {failed} of {hosts} failed (return code {codes[failed]}); logs in {log_dir}. "
          f"Last lines of {logs[failed].name}:\n" + "\n".join(tail), file=sys.stderr)
    return codes[failed] or 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2, help="number of processes (simulated hosts)")
    parser.add_argument("--devices", type=int, default=2, help="fake CPU devices per process")
    parser.add_argument("--log-dir", type=pathlib.Path, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all are stopped")
    parser.add_argument("--no-config-overrides", dest="config_overrides", action="store_false")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    log_dir = args.log_dir or pathlib.Path(tempfile.mkdtemp(prefix="molmo-local-"))
    try:
        code = launch(command, args.hosts, args.devices, log_dir, args.config_overrides, args.timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if code == 0:
        print(f"all {args.hosts} processes finished; logs in {log_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
