"""The trainer end to end: the real tiny Molmo on the real grain pipeline over synthetic data.

Runs are subprocesses of `python -m molmo_jax.train` on one experiment file:
  reference    8 fake CPU devices, FSDP 4 x tensor 2, 12 steps: must overfit its 16 examples,
               keep the frozen embedding bit-identical and follow each group's LR schedule;
  one device   the same run on 1 device: losses and parameters within tolerance of reference;
  killed       the 1-device run SIGKILLed after checkpoint 4, then resumed: bit-identical to
               "one device"; resumed again over a corrupted latest checkpoint: the same;
  two processes  jax.distributed on 127.0.0.1, 4 devices each: losses within tolerance;
  preempted    an endless 1-device run sent SIGTERM: exits 0 after saving its current step,
               and the next run resumes from that step; a second trainer started on its
               workdir meanwhile is refused, naming the PID and host;
  other model  resuming "one device" (or starting from it with config.init.checkpoint) with
               another MLP width stops with one error and leaves both runs byte-identical;
  full disk    a save failing on the file system is one error line, and nothing is saved.
The NaN test runs in-process (it feeds one poisoned batch). The 1-device subprocesses share a
persistent compilation cache, so their program is compiled once. A subprocess is stopped as
hung only when neither its log nor its metrics.jsonl changed for IDLE_LIMIT_S: how long a
run takes on a loaded machine is no sign of a hang, a long silence is.
"""
import hashlib
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import configs
from configs import common
from molmo_jax.model import sharding
from molmo_jax.model.config import TINY_QWEN2
from molmo_jax.model.molmo import Molmo
from molmo_jax.train import optimizer as opt_lib
from molmo_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
# 8 devices vs 1 device: same math, different reduction order and collectives.
LOSS_RTOL = 2e-5
PARAM_ATOL = 2e-5

CONFIG_FILE = '''
import dataclasses
from configs import common, demo
from molmo_jax.model.config import TINY_QWEN2

def get_config(arg=None):
    c = demo.get_config("pretrain")
    # Pinned here, so that tuning the demo does not change what (and how long) this tests.
    c.model = common.model_config(TINY_QWEN2.replace(
        vision=dataclasses.replace(TINY_QWEN2.vision, image_size=(112, 112))))
    c.data.mixture = "synthetic_captions"
    c.data.seq_len, c.data.max_crops, c.data.overlap_margins = 256, 2, (2, 2)
    c.data.synthetic_image_size = c.data.clock_image_size = 112
    c.train.global_batch, c.train.grad_accum_steps = 8, 1
    c.sharding.max_replicated_fraction = 0.5
    c.data.tokenizer = {tokenizer!r}
    c.data.synthetic_examples = 16        # a tiny set the run overfits
    c.model.llm.response_residual_dropout = 0.0  # dropout masks follow batch rows, which
                                                 # differ between process layouts
    c.train.total_steps = {steps}
    c.optimizer.vit = dict(lr=1e-3, warmup_steps=4)
    c.optimizer.connector = dict(lr=2e-3, warmup_steps=2)
    c.optimizer.llm = dict(lr=3e-3, warmup_steps=6)
    c.mesh = dict(data=1, fsdp=-1, tensor={tensor}, expert=1)
    c.checkpoint.every = 2
    c.checkpoint.keep = 20
    c.log.every = 1
    return c
'''
IGNORED = ("step_time_s", "examples_per_s", "tokens_per_s", "mfu")
# The longest silence of a healthy run is the first compile of the step (no log line between
# "mesh ..." and step 1). Measured on 2 cores at load average 6-8 (other test runs beside):
# 81-112 s for the 1-device step, 110 s for the 8-device one. Ten times that is a hang.
IDLE_MEASURED_S = 112
IDLE_LIMIT_S = 10 * IDLE_MEASURED_S


def make_tokenizer(path: pathlib.Path) -> str:
    """A small sentencepiece model (byte fallback: any text encodes)."""
    import sentencepiece as spm
    rng = np.random.default_rng(0)
    words = ("a the red green blue circle square triangle star point points to at top left right bottom "
             "center how many count clock time hour minute image shows small large one two three").split()
    lines = [" ".join(rng.choice(words, 12)) + " " + " ".join(map(str, rng.integers(0, 100, 3))) for _ in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path / "spm"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=-1,
                                   eos_id=1, unk_id=0, pad_id=-1, minloglevel=2)
    return str(path / "spm.model")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    (root / "exp.py").write_text(CONFIG_FILE.format(tokenizer=make_tokenizer(root), steps=STEPS, tensor=2))
    (root / "exp1.py").write_text(CONFIG_FILE.format(tokenizer=str(root / "spm.model"), steps=STEPS, tensor=1))
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(8))
    return root, env


def one_device(env, root):
    """Environment of the 1-device runs: no collectives, and one cached compilation."""
    return dict(env, XLA_FLAGS=xla_flags(1), JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def xla_flags(devices):
    # The fake devices are threads; on a busy machine a collective can wait for a starved
    # thread longer than XLA's default 40 s before it aborts the process.
    return (f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=600 "
            "--xla_cpu_collective_call_terminate_timeout_seconds=600")


def command(config, workdir, *overrides):
    return [sys.executable, "-m", "molmo_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def wait_while_progressing(proc, log_path, workdir, done=None):
    """Waits until `done()` holds (default: the process has exited), failing when the process
    exits first or when neither its log nor the workdir's metrics.jsonl changed for IDLE_LIMIT_S."""
    watched = [pathlib.Path(log_path), pathlib.Path(workdir) / "metrics.jsonl"]
    last, last_change = None, time.time()
    while not (done() if done else proc.poll() is not None):
        if done is not None:
            assert proc.poll() is None, "training subprocess ended early: " + pathlib.Path(log_path).read_text()[-4000:]
        state = [(p.stat().st_size, p.stat().st_mtime) if p.exists() else None for p in watched]
        if state != last:
            last, last_change = state, time.time()
        elif time.time() - last_change > IDLE_LIMIT_S:
            proc.kill()
            proc.wait()
            pytest.fail(f"training subprocess silent for {IDLE_LIMIT_S} s (hung): "
                        + pathlib.Path(log_path).read_text()[-4000:])
        time.sleep(0.05)


def start(config, env, workdir, *overrides, log_path=None, prefix=()):
    """Popen of a training run whose stderr goes to a file (a full pipe would block the run).

    prefix: a command that replaces `python -m molmo_jax.train` and gets the flags."""
    log_path = pathlib.Path(log_path or f"{workdir}.log")
    args = command(config, workdir, *overrides)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*prefix, *args[3:]] if prefix else args, cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    return proc, log_path


def run(config, env, workdir, *overrides, expect=0, prefix=()):
    """Runs training to its end; returns its console log (asserting its exit status)."""
    proc, log_path = start(config, env, workdir, *overrides, log_path=f"{workdir}.{time.time_ns()}.log",
                           prefix=prefix)
    wait_while_progressing(proc, log_path, workdir)
    log = log_path.read_text()
    assert proc.returncode == expect, log[-4000:]
    return log


def metrics(workdir) -> dict:
    """step -> metrics of the last run that logged that step (a resumed run appends)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m.pop("step")] = {k: v for k, v in m.items() if k not in IGNORED}
    return out


def saved_state(workdir, step):
    """The `state` item of a checkpoint as numpy arrays."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta.tree)
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore))


@pytest.fixture(scope="module")
def reference(setup):
    root, env = setup
    workdir = root / "reference"
    log = run(root / "exp.py", env, workdir)
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2, 'expert': 1} on 8 devices" in log
    return workdir, metrics(workdir)


@pytest.fixture(scope="module")
def single(setup):
    root, env = setup
    workdir = root / "one_device"
    log = run(root / "exp1.py", one_device(env, root), workdir)
    assert "on 1 devices" in log
    return workdir, metrics(workdir)


def test_reference_run_overfits_keeps_frozen_params_and_follows_each_lr_schedule(setup, reference):
    root, _ = setup
    workdir, m = reference
    assert sorted(m) == list(range(1, STEPS + 1))
    losses = [m[s]["loss"] for s in range(1, STEPS + 1)]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    cfg = configs.load(str(root / "exp.py"))
    for group in ("vit", "connector", "llm"):
        peak, warmup = cfg.optimizer[group]["lr"], cfg.optimizer[group]["warmup_steps"]
        for s in range(1, STEPS + 1):
            expected = peak * s / warmup if s < warmup else 0.1 * peak + 0.9 * peak * 0.5 * (
                1 + math.cos(math.pi * (s - warmup) / (STEPS - warmup)))
            assert m[s][f"lr.{group}"] == pytest.approx(expected, rel=1e-5), (group, s)
    # The base token embedding: bit-identical to its initial value after every step, while the
    # trained parameters moved.
    model_cfg = trainer.model_config_from(cfg)
    params_key, _ = jax.random.split(jax.random.key(cfg.seed))
    init = jax.jit(lambda k: nnx.to_pure_dict(nnx.state(Molmo(model_cfg, rngs=nnx.Rngs(params=k)))))(params_key)
    final = saved_state(workdir, STEPS)
    np.testing.assert_array_equal(final["frozen"]["llm"]["embed"]["embedding"],
                                  np.asarray(init["llm"]["embed"]["embedding"]))
    assert "embedding" not in final["params"]["llm"]["embed"]
    assert not np.array_equal(final["params"]["llm"]["embed"]["new_embedding"],
                              np.asarray(init["llm"]["embed"]["new_embedding"]))
    assert not np.array_equal(final["params"]["llm"]["lm_head"]["kernel"],
                              np.asarray(init["llm"]["lm_head"]["kernel"]))
    assert any((workdir / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def killed_and_resumed(setup, single):
    """The 1-device run, SIGKILLed once checkpoint 4 is on disk, then resumed."""
    root, env = setup
    workdir = root / "killed"
    return (workdir, *kill_at_checkpoint_4_then_resume(root / "exp1.py", one_device(env, root), workdir))


def kill_at_checkpoint_4_then_resume(script, env, workdir):
    """SIGKILL a run of `script` once checkpoint 4 is on disk, then run it again in the same
    workdir. -> (the steps logged before the kill, the resumed run's log)."""
    proc, log_path = start(script, env, workdir)
    wait_while_progressing(proc, log_path, workdir, done=lambda: (workdir / "checkpoints" / "4").is_dir())
    proc.kill()
    proc.wait()
    killed_steps = sorted(metrics(workdir))
    assert max(killed_steps) < STEPS, "the run finished before it was killed"
    return killed_steps, run(script, env, workdir)


def test_one_device_matches_fsdp_tensor_parallel(reference, single):
    one, eight = single[1], reference[1]
    for s in range(1, STEPS + 1):
        assert one[s]["loss"] == pytest.approx(eight[s]["loss"], rel=LOSS_RTOL), s
        assert one[s]["grad_norm.llm"] == pytest.approx(eight[s]["grad_norm.llm"], rel=1e-4), s
    for step in (2, STEPS):
        a, b = saved_state(single[0], step), saved_state(reference[0], step)
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=PARAM_ATOL, rtol=0, err_msg=f"step {step} {jax.tree_util.keystr(path)}")


def test_kill9_then_resume_repeats_the_uninterrupted_losses_bit_for_bit(killed_and_resumed, single):
    workdir, killed_steps, log = killed_and_resumed
    resumed_from = int(re.search(r"resumed from step (\d+)", log).group(1))
    assert 4 <= resumed_from <= max(killed_steps)
    # The killed run could not release its lock; the kernel did, and the resume says so.
    assert f"taking over the stale lock {workdir / 'trainer.lock'} of PID" in log
    ref, got = single[1], metrics(workdir)
    for s in range(resumed_from + 1, STEPS + 1):
        assert got[s] == ref[s], s  # every metric, bit for bit (float32 values via JSON)


def test_corrupted_checkpoints_are_set_aside_and_the_run_resumes_from_the_last_good_one(setup, killed_and_resumed,
                                                                                        single):
    """The latest checkpoint unreadable (garbage files), the one before it silently corrupted
    (bytes flipped inside an array data file, which orbax restores without complaint): both are
    named with the reason and set aside, and the run resumes from the third."""
    root, env = setup
    workdir = killed_and_resumed[0]
    latest, flipped = (workdir / "checkpoints" / str(s) for s in (STEPS, STEPS - 2))
    for dirpath, _, files in os.walk(latest / "state"):
        for f in files:
            pathlib.Path(dirpath, f).write_bytes(b"\0not a checkpoint")
    flip_bytes(flipped)
    log = run(root / "exp1.py", one_device(env, root), workdir)
    assert f"checkpoint {latest} could not be read" in log and "falling back to the previous checkpoint" in log
    assert re.search(rf"checkpoint {flipped} failed verification \(\d+ array\(s\) differ from their checksums "
                     r"written at save time, first state/\S+ \(saved [0-9a-f]{8}, read [0-9a-f]{8}\)\)", log), log
    assert f"resumed from step {STEPS - 4}" in log
    assert (workdir / "checkpoints" / f"{STEPS}.unreadable").is_dir()
    assert (workdir / "checkpoints" / f"{STEPS - 2}.unreadable").is_dir()
    got = metrics(workdir)
    for s in range(STEPS - 3, STEPS + 1):
        assert got[s] == single[1][s], s


def flip_bytes(step_dir):
    """Inverts 4 bytes in the middle of the largest array data file of a checkpoint."""
    data = max((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))


def tree_hashes(root):
    """{path: sha256} of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in pathlib.Path(root).rglob("*") if p.is_file()}


def test_checkpoint_of_another_model_stops_and_leaves_both_runs_untouched(setup, single):
    """Resuming "one device" with a wider MLP, or starting another run from its checkpoints
    (config.init.checkpoint) with it: exit 1, one error naming the config field and the first
    parameter with both shapes, and every file of both runs as it was."""
    root, env = setup
    env, source, other = one_device(env, root), single[0], root / "other_model"
    before = tree_hashes(source)
    wider = "--config.model.llm.mlp_hidden_size=256"
    for workdir, extra in ((source, ()), (other, (f"--config.init.checkpoint={source / 'checkpoints'}",))):
        log = run(root / "exp1.py", env, workdir, wider, *extra, expect=1)
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in log, log[-4000:]
        assert re.search(r"does not fit this run's model: config\.model\.llm\.mlp_hidden_size is 128 in the "
                         r"checkpoint and 256 here; params/\S+ is float32\[[\d, ]+\] in the checkpoint and "
                         r"float32\[[\d, ]+\] in the config\. Nothing was changed", errors[0]), errors[0]
        assert tree_hashes(source) == before
    assert not [p for p in (other / "checkpoints").iterdir()] and not (other / "metrics.jsonl").exists()


def test_a_failing_checkpoint_save_is_one_error_line_and_saves_nothing(setup, single, tmp_path):
    """The file system refuses the first save (EROFS, from the folder orbax creates first;
    simulated in the trainer process, since the tests run as root, where a chmod'ed folder
    stays writable): exit 1, one error line naming the step and the reason."""
    root, env = setup
    patch = ("import errno, os, runpy, sys; from etils import epath; P = type(epath.Path('/'))\n"
             "def refuse(self, *a, **k): raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))\n"
             "P.mkdir = lambda self, *a, _mkdir=P.mkdir, **k: (refuse(self) if 'checkpoints/' in str(self) "
             "else _mkdir(self, *a, **k))\n"
             "sys.argv = ['molmo_jax.train', *sys.argv[1:]]; runpy.run_module('molmo_jax.train', run_name='__main__')")
    workdir = tmp_path / "read_only"
    log = run(root / "exp1.py", one_device(env, root), workdir, expect=1, prefix=(sys.executable, "-c", patch))
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: could not save the checkpoint of step 2 in {workdir / 'checkpoints'}: Read-only file "
                      f"system ({workdir / 'checkpoints' / '.write-probe-0'}); the checkpoints finished before it are "
                      "intact, and resume ignores the unfinished one"], log[-4000:]
    assert "Traceback" not in log and not [p for p in (workdir / "checkpoints").iterdir()]


def sigterm_after_new_steps(config, env, workdir, log_path, new_steps, *overrides, while_running=None):
    """Runs training until metrics.jsonl has `new_steps` more lines, calls `while_running(proc)`
    if given, sends SIGTERM and waits.

    Returns (exit code, console log, last step logged before the signal)."""
    jsonl = workdir / "metrics.jsonl"
    before = len(jsonl.read_text().splitlines()) if jsonl.exists() else 0
    proc, _ = start(config, env, workdir, *overrides, log_path=log_path)
    try:
        wait_while_progressing(proc, log_path, workdir,
                               done=lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= before + new_steps)
        if while_running is not None:
            while_running(proc)
        last_logged = max(metrics(workdir))
        proc.send_signal(signal.SIGTERM)
        wait_while_progressing(proc, log_path, workdir)
    finally:  # a failed check must not leave an endless run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log_path.read_text(), last_logged


def test_sigterm_saves_the_current_step_exits_0_and_the_run_resumes_from_it(setup):
    """Preemption: no periodic checkpoint falls in the run, so the one found is the SIGTERM one."""
    root, env = setup
    env, workdir = one_device(env, root), root / "preempted"
    endless = ("--config.train.total_steps=1000000", "--config.checkpoint.every=1000000")

    def second_trainer_is_refused(first):
        log = run(root / "exp1.py", env, workdir, *endless, expect=1)
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in log and errors == [f"error: workdir {workdir} is in use by another trainer: PID {first.pid} on host "
                          f"{socket.gethostname()} holds {workdir / 'trainer.lock'}; stop that run or use another "
                          "workdir"], log[-4000:]

    code, log, logged = sigterm_after_new_steps(root / "exp1.py", env, workdir, root / "preempted.log", 3, *endless,
                                                while_running=second_trainer_is_refused)
    assert code == 0, log[-4000:]
    assert len({json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()}) == \
        len((workdir / "metrics.jsonl").read_text().splitlines())  # one trainer wrote them
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= logged, (steps, logged)
    saved = steps[0]
    assert f"stopping at step {saved} after SIGTERM" in log
    assert max(metrics(workdir)) == saved  # the saved step was logged before exiting
    meta = json.loads((workdir / "checkpoints" / str(saved) / "meta" / "metadata").read_text())
    assert meta["tokenizer"] == str(root / "spm.model")  # what export copies without --tokenizer

    code, log, _ = sigterm_after_new_steps(root / "exp1.py", env, workdir, root / "resumed.log", 1, *endless)
    assert code == 0, log[-4000:]
    assert f"resumed from step {saved}" in log
    lines = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    resumed = lines[lines.index(saved) + 1:]
    assert resumed[:2] == [saved + 1, saved + 2], lines
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == resumed[-1]


class PoisonedBatches(grain.DatasetIterator):
    """The real pipeline iterator, with NaN images in one batch (a broken input)."""

    def __init__(self, parent, poisoned_batch):
        super().__init__(parent)
        self.poisoned_batch, self.count = poisoned_batch, 0

    def __next__(self):
        batch = next(self._parent)
        self.count += 1
        if self.count == self.poisoned_batch:
            batch = dict(batch, images=np.full_like(batch["images"], np.nan))
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, single, tmp_path):
    root, _ = setup
    cfg = configs.load(str(root / "exp1.py"))
    cfg.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    from data_pipelines.pipeline import make_pipeline
    data = PoisonedBatches(iter(make_pipeline(cfg)), poisoned_batch=5)
    with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite training metrics at step 5: .*'loss': nan.*"
                                                         r"the last good checkpoint is step 4"):
        trainer.train(cfg, str(tmp_path), data_iterator=data, devices=jax.devices()[:1])
    # Nothing after the bad step was saved; the last good checkpoint is intact and finite.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    good = saved_state(tmp_path, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good["params"]))
    ref = saved_state(single[0], 4)  # the same run up to the poisoned batch (compiled in another process)
    np.testing.assert_allclose(good["params"]["llm"]["lm_head"]["kernel"], ref["params"]["llm"]["lm_head"]["kernel"],
                               atol=PARAM_ATOL, rtol=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_steps_as_one(setup, reference):
    root, env = setup
    workdir = root / "two_processes"
    env = dict(env, XLA_FLAGS=xla_flags(4))
    address = f"127.0.0.1:{free_port()}"
    procs, logs = zip(*[start(root / "exp.py", env, workdir, "--config.distributed.enabled=True",
                              f"--config.distributed.coordinator_address={address}",
                              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                              log_path=root / f"process_{i}.log") for i in (0, 1)])
    for p, log in zip(procs, logs):
        wait_while_progressing(p, log, workdir)
    logs = [log.read_text() for log in logs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "8 devices, 2 processes" in logs[0]
    got = metrics(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s]["loss"] == pytest.approx(reference[1][s]["loss"], rel=LOSS_RTOL), s
    data_states = sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").glob("process_*"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]


def test_gradient_accumulation_equals_one_big_batch():
    """Text-only batches keep this in-process test small; every loss token counts once."""
    cfg = configs.load("configs/demo.py:pretrain")
    cfg.model = common.model_config(TINY_QWEN2)  # dropout 0: micro-batches draw their own keys
    cfg.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (4, 32)).astype(np.int32)
    batch = sharding.make_global_batch({"input_ids": ids, "target_tokens": np.roll(ids, -1, 1),
                                        "loss_masks": (rng.random((4, 32)) < 0.6).astype(np.float32)}, mesh)
    results = []
    for accum in (1, 2):
        cfg.train.grad_accum_steps = accum
        setup = trainer.build_train_setup(cfg, trainer.model_config_from(cfg), mesh)
        state, m = setup.step_fn(setup.init(jax.random.key(0)), batch)
        results.append((jax.device_get(state["params"]), jax.device_get(m)))
    (p1, m1), (p2, m2) = results
    for k in ("loss", "ce_loss", "z_loss", "loss_tokens", "grad_norm.llm", "grad_norm.connector"):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-9), k
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))



@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A 1-device train setup (not compiled yet) of a tiny model whose ViT and LLM fit the tiny
    transformers CLIPVisionModel / Qwen2ForCausalLM written here by save_pretrained."""
    import transformers  # the "torch" extra, which `make test` installs
    from test_convert_hf_backbones import LLM_CASES, randomize

    from molmo_jax.model.config import TINY_VISION

    root = tmp_path_factory.mktemp("init")
    make_qwen, lc = LLM_CASES["qwen2"]
    vc = TINY_VISION
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=vc.width, intermediate_size=vc.mlp_dim, num_hidden_layers=vc.num_layers + 1,
        num_attention_heads=vc.num_heads, image_size=vc.image_size[0], patch_size=vc.patch_size,
        hidden_act="quick_gelu"))
    clip_sd, qwen = randomize(clip, seed=1), make_qwen()
    qwen_sd = randomize(qwen, seed=3)
    clip.save_pretrained(root / "clip")
    qwen.save_pretrained(root / "qwen")

    cfg = configs.load("configs/demo.py:pretrain")
    cfg.model = common.model_config(TINY_QWEN2.replace(vision=vc, llm=lc))
    cfg.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    model_cfg = trainer.model_config_from(cfg)
    setup = trainer.build_train_setup(cfg, model_cfg, sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1]))
    return root, cfg, model_cfg, setup, clip_sd, qwen_sd


def test_stage1_starts_from_transformers_backbones(tiny_init):
    """config.init.vit / .llm: the saved CLIP and Qwen2 folders become the ViT and LLM (frozen
    embedding included); the connector and the new token rows keep the random init. A folder
    that does not fit is refused by name."""
    from molmo_jax.convert import hf_backbones
    from molmo_jax.convert.links import CheckpointError

    root, cfg, model_cfg, setup, clip_sd, qwen_sd = tiny_init
    cfg = cfg.copy_and_resolve_references()
    cfg.init.vit, cfg.init.llm = str(root / "clip"), str(root / "qwen")
    state = jax.device_get(trainer.initial_state(cfg, model_cfg, setup))
    random = jax.device_get(setup.init(jax.random.key(cfg.seed)))
    got, rand = (opt_lib.merge_trees(s["params"], s["frozen"]) for s in (state, random))
    assert "embedding" in state["frozen"]["llm"]["embed"]  # still frozen, now the Qwen2 embedding
    expected = {"vision": hf_backbones.vision_params_from_hf(clip_sd, model_cfg.vision),
                "llm": hf_backbones.llm_params_from_hf(qwen_sd, model_cfg.llm)}
    expected["llm"]["embed"]["new_embedding"] = rand["llm"]["embed"]["new_embedding"]  # no HF counterpart
    expected["connector"] = rand["connector"]
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(got["llm"]["lm_head"]["kernel"], rand["llm"]["lm_head"]["kernel"])

    cfg.init.vit = str(root / "qwen")
    with pytest.raises(CheckpointError, match=r"config\.init\.vit='.*qwen' does not fit config\.model\.vision"):
        trainer.initial_state(cfg, model_cfg, setup)
    cfg.init.checkpoint = str(root)
    with pytest.raises(ValueError, match=r"config\.init\.checkpoint=.* replaces every parameter"):
        trainer.initial_state(cfg, model_cfg, setup)


def test_init_checkpoint_reads_params_and_frozen_only(tiny_init, tmp_path):
    """config.init.checkpoint (stage 2 from stage 1): the other run's params, a fresh optimizer
    state and step 0; the source checkpoint is left as it was."""
    _, cfg, model_cfg, setup, _, _ = tiny_init
    fresh = setup.init(jax.random.key(cfg.seed))
    stage1 = jax.tree.map(lambda x: x + 1, fresh)  # every leaf differs from the fresh state
    source = trainer.Checkpointer(str(tmp_path / "stage1"), async_save=False)
    source.save(7, stage1, None, {"step": 7})
    source.close()

    cfg = cfg.copy_and_resolve_references()
    cfg.init.checkpoint = str(tmp_path / "stage1")
    got, stage1, fresh = jax.device_get((trainer.initial_state(cfg, model_cfg, setup), stage1, fresh))
    for key, want in (("params", stage1), ("frozen", stage1), ("opt_state", fresh), ("step", fresh), ("rng", fresh)):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got[key])[0], jax.tree.leaves(want[key])):
            np.testing.assert_array_equal(a, b, err_msg=key + jax.tree_util.keystr(path))
    assert sorted(p.name for p in (tmp_path / "stage1").iterdir()) == ["7"]
