"""Orbax checkpoints of the whole training state, plus the grain iterator state, saved together.

One checkpoint `<dir>/<step>/` holds three items:
  state  params (trainable and frozen), optimizer state, step, RNG key data (orbax StandardSave)
  data   the grain iterator state of this process (grain's orbax handler, one file per process)
  meta   JSON: step, model config, mesh shape, and a checksum of every array of `state`

Saves are asynchronous; orbax writes into a temporary directory and renames it when complete,
so a finished checkpoint is never replaced by a partial one, and an interrupted save leaves
only a temporary directory that restore ignores (and removes). A save that fails (disk full, a
read-only file system) raises `CheckpointSaveError`, one line; what it leaves is only such a
temporary directory. Restore reads onto whatever shardings the abstract target carries, so a
checkpoint saved on one mesh loads on another.

Restore checks, newest checkpoint first:
  1. its arrays have the paths and shapes of the target; if not, `CheckpointMismatchError`
     names the differing model config fields and parameter, and nothing is touched (a config
     that differs is the user's choice to fix, not a broken checkpoint);
  2. it reads, its arrays match the checksums written at save time (a flipped byte on disk is
     found) and every float is finite.
A checkpoint failing 2 is moved aside to `<step>.unreadable` (never deleted, never overwritten)
with a warning naming it and the reason, and the previous one is tried. A read-only
Checkpointer (another run's checkpoints, `config.init.checkpoint`) only skips it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
from typing import Any, Dict, List, Optional, Tuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from molmo_jax.train.optimizer import merge_trees, path_str

log = logging.getLogger(__name__)

# Failures of a save that are the file system's, not a bug: reported in one line.
SAVE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG, errno.EIO)


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the model config of this run; nothing was changed."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, read-only file system, ...)."""


class NonFiniteStateError(FloatingPointError):
    """The state to save holds NaN/inf; it is not saved, so it cannot replace a good checkpoint."""


# --------------------------------------------------------------------------- checksums

def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijective mix of uint32 values."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 checksum of one array: sum(bits[i] * w[i]) mod 2^32, w[i] odd weights mixed from
    the element index.

    Any change of one element changes it (a nonzero change times an odd number is never 0
    mod 2^32); other changes go unseen with odds of about 2^-32. Integer sums do not depend on
    the reduction order, so the value is the same on any mesh and any number of processes.
    One jit for the whole state: many small programs with collectives can starve one another
    on fake CPU devices.
    """
    if x.dtype == jnp.bool_ or jax.dtypes.itemsize_bits(x.dtype) < 8:  # sub-byte: nf4 codes (uint4)
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing dim of 2
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):  # flat index without reshaping (which could move a sharded array)
        index = index * jnp.uint32(bits.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
    return jnp.sum(bits * (_fmix32(index) | jnp.uint32(1)), dtype=jnp.uint32)


def _host_summary(x: np.ndarray) -> Tuple[int, bool]:
    """_leaf_checksum and _leaf_finite of a host array, in numpy (bit-identical: same formula,
    same wrap-around), so that a state of host arrays is not copied to a device whole."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_ or jax.dtypes.itemsize_bits(x.dtype) < 8:
        bits = x.astype(np.uint32)
    elif x.dtype.itemsize >= 4:
        bits = x.view(np.uint32).reshape(x.shape + ((x.dtype.itemsize // 4,) if x.dtype.itemsize > 4 else ()))
    else:
        bits = x.view({1: np.uint8, 2: np.uint16}[x.dtype.itemsize]).astype(np.uint32)
    h = np.arange(bits.size, dtype=np.uint32).reshape(bits.shape)
    h ^= h >> 16
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> 13
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> 16
    finite = bool(np.isfinite(x).all()) if np.issubdtype(x.dtype, np.inexact) else True
    return int(np.sum(bits * (h | np.uint32(1)), dtype=np.uint32)), finite


def _leaf_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


_tree_summary = jax.jit(lambda tree: (jax.tree.map(_leaf_checksum, tree), jax.tree.map(_leaf_finite, tree)))


def state_checksums(state: Any) -> Tuple[Dict[str, str], List[str]]:
    """({"params/llm/lm_head/kernel": 8 hex digits, ...}, paths of arrays holding NaN/inf).

    state: pytree of (global) jax arrays, or numpy arrays (summed on the host); every process
    gets the same answer.
    """
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0]) if jax.tree.leaves(state) else ((), ())
    by_devices: Dict[Any, List[int]] = {}  # one jit per device set (a jit takes arrays of one set)
    for i, leaf in enumerate(leaves):
        devices = frozenset(leaf.devices()) if isinstance(leaf, jax.Array) else None
        by_devices.setdefault(devices, []).append(i)
    summary: Dict[int, Tuple[Any, Any]] = {}
    for devices, indices in by_devices.items():
        if devices is None:
            summary.update((i, _host_summary(np.asarray(leaves[i]))) for i in indices)
            continue
        words, finite = jax.device_get(_tree_summary([leaves[i] for i in indices]))
        summary.update(zip(indices, zip(words, finite)))
    sums, bad = {}, []
    for i, path in enumerate(paths):
        name = path_str(path)
        sums[name] = f"{int(summary[i][0]):08x}"
        if not bool(summary[i][1]):
            bad.append(name)
    return sums, bad


def tree_fingerprint(tree: Any) -> str:
    """16 hex digits naming the values of a pytree (a hash of its state_checksums): how a LoRA
    checkpoint records the base its adapters apply to."""
    sums, _ = state_checksums(tree)
    return hashlib.sha256(json.dumps(sorted(sums.items())).encode()).hexdigest()[:16]


def verify_state(state: Any, saved_sums: Optional[Dict[str, str]]) -> Optional[str]:
    """Why a restored `state` cannot be trusted (checksum or non-finite values), or None.

    saved_sums: the checksums written at save time (None for checkpoints older than them:
    only finiteness is checked); arrays of `state` absent from them are not compared.
    """
    sums, bad = state_checksums(state)
    if saved_sums is not None:
        differ = [p for p, s in sums.items() if p in saved_sums and saved_sums[p] != s]
        if differ:
            return (f"{len(differ)} array(s) differ from their checksums written at save time, first "
                    f"state/{differ[0]} (saved {saved_sums[differ[0]]}, read {sums[differ[0]]})")
    if bad:
        return f"non-finite values in {len(bad)} array(s), first state/{bad[0]}"
    return None


# --------------------------------------------------------------------------- the checkpointer

class Checkpointer:
    """Keeps the newest `keep` checkpoints plus every step that is a multiple of `keep_every`.

    read_only: open another run's checkpoints to read them: nothing is created, cleaned up,
    moved aside or saved in `directory`.
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_every: Optional[int] = None,
                 async_save: bool = True, read_only: bool = False):
        self.directory = epath.Path(directory)
        self.read_only = read_only
        self._pending_step: Optional[int] = None
        self._failed = False
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   max_to_keep=None, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, keep_period=keep_every or None, create=True,
                enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        _quiet_save_failures()
        with self._save_errors("open the checkpoint directory"), quiet_absl():  # "directory is read only"
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "data", "meta"))

    def save(self, step: int, state: Any, data_iterator: Any, meta: Dict[str, Any]) -> bool:
        """Starts saving `state` (a pytree of global arrays) and the iterator state at `step`.

        Returns False, saving nothing, when a finished checkpoint of that step already exists.
        Raises NonFiniteStateError (saving nothing) when an array holds NaN/inf, and
        CheckpointSaveError when this save or the previous asynchronous one failed to write.
        """
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read-only; not saving step {step}")
        if step in self.manager.all_steps():
            log.info("checkpoint of step %d already exists in %s; not saving it again", step, self.directory)
            return False
        sums, bad = state_checksums(state)
        if bad:
            raise NonFiniteStateError(f"the state of step {step} holds NaN/inf in {len(bad)} array(s), first "
                                      f"{bad[0]}; it was not saved")
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, checksums=sums)))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._save_errors(f"save the checkpoint of step {self._pending_step}"):
            self.manager.check_for_errors()  # of the previous asynchronous save
        self._pending_step = step
        with self._save_errors(f"save the checkpoint of step {step}"):
            # orbax makes its folders in background threads, whose peers then wait minutes for a
            # folder that failed (and keep the process from exiting): try one here first.
            probe = self.directory / f".write-probe-{jax.process_index()}"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_state: Any, data_iterator: Any, *, partial: bool = False,
                       model_config: Optional[Dict[str, Any]] = None
                       ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """Restores the newest checkpoint that fits, reads and verifies, onto `abstract_state`.

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set (the target mesh).
        data_iterator: a grain iterator whose state is set in place (or None to skip the data);
          when no checkpoint restores, it is left at the state it had.
        partial: `abstract_state` names a subset of the saved state (e.g. params without the
          optimizer state); only that subset is read.
        model_config: this run's model config (dict), to name the fields that differ when the
          arrays do not fit.
        Returns (step, state, meta), or None when there is no usable checkpoint. Raises
        CheckpointMismatchError when the newest readable checkpoint does not fit.
        """
        if partial:
            state_args = ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        initial_data_state = data_iterator.get_state() if data_iterator is not None else None
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = self.directory / str(step)
            try:
                meta = json.loads((path / "meta" / "metadata").read_text())
                stored = self._stored_shapes(path)
            except Exception as e:  # noqa: BLE001  any read failure: fall back to the previous checkpoint
                self._unusable(step, f"could not be read ({type(e).__name__}: {str(e)[:300]})")
                continue
            mismatch = _shape_mismatch(stored, abstract_state, partial)
            if mismatch:
                raise CheckpointMismatchError(_mismatch_message(path, mismatch, meta.get("model"), model_config))
            items = dict(state=state_args, meta=ocp.args.JsonRestore())
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001
                self._unusable(step, f"could not be read ({type(e).__name__}: {str(e)[:300]})")
                continue
            problem = verify_state(restored["state"], meta.get("checksums"))
            if problem:
                self._unusable(step, f"failed verification ({problem})")
                continue
            return step, restored["state"], {k: v for k, v in restored["meta"].items() if k != "checksums"}
        if data_iterator is not None:
            data_iterator.set_state(initial_data_state)
        return None

    def restore_params(self, abstract_params: Dict, *, model_config: Optional[Dict[str, Any]] = None
                       ) -> Optional[Tuple[int, Dict]]:
        """(step, params) of the newest usable checkpoint, or None: every parameter of
        `abstract_params` (a plain nested dict of ShapeDtypeStructs with shardings, no
        trainable/frozen split), read from wherever the saving run kept it ("params" or
        "frozen"), checked and verified as restore_latest does. The optimizer state is not read."""
        steps = sorted(self.manager.all_steps())
        if not steps:
            return None
        stored = self._stored_shapes(self.directory / str(steps[-1]))
        target: Dict[str, Dict] = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
            keys = [k.key for k in path]
            node = target.setdefault("frozen" if "frozen/" + "/".join(keys) in stored else "params", {})
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = leaf
        restored = self.restore_latest(target, None, partial=True, model_config=model_config)
        if restored is None:
            return None
        step, state, _ = restored
        return step, merge_trees(state.get("params", {}), state.get("frozen", {}))

    @staticmethod
    def _stored_shapes(path: epath.Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """{array path: (shape, dtype)} of a checkpoint's state item, from its metadata alone."""
        with quiet_absl():  # orbax looks for a step metadata file inside the item and warns
            tree = ocp.PyTreeCheckpointer().metadata(path / "state").item_metadata.tree
        return {path_str(p): (tuple(leaf.shape), str(leaf.dtype))
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def _unusable(self, step: int, reason: str) -> None:
        path = self.directory / str(step)
        if self.read_only:
            log.warning("checkpoint %s %s; it is left in place (read-only) and the previous checkpoint is tried",
                        path, reason)
            return
        aside = self.directory / f"{step}.unreadable"
        n = 1
        while aside.exists():  # an earlier set-aside copy of this step is kept too
            n += 1
            aside = self.directory / f"{step}.unreadable.{n}"
        log.warning("checkpoint %s %s; moving it to %s and falling back to the previous checkpoint",
                    path, reason, aside)
        multihost_utils.sync_global_devices(f"unusable checkpoint {step}")
        if jax.process_index() == 0:
            path.rename(aside)
        multihost_utils.sync_global_devices(f"moved unusable checkpoint {step}")
        self.manager.reload()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed."""
        with self._save_errors(f"save the checkpoint of step {self._pending_step}"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save and closes; after a failed save, only closes."""
        if self._failed:
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _save_errors(self, what: str):
        """Turns a file-system failure (possibly wrapped by orbax) into one CheckpointSaveError line."""
        try:
            yield
        except Exception as e:  # noqa: BLE001
            reason = _file_system_reason(e)
            if reason is None:
                raise
            self._failed = _SaveFailureNoise.failed = True
            raise CheckpointSaveError(
                f"could not {what} in {self.directory}: {reason}; the checkpoints finished before it are "
                "intact, and resume ignores the unfinished one") from None


class _SaveFailureNoise(logging.Filter):
    """Drops orbax's tracebacks of a save that failed on the file system (disk full, read-only):
    its background threads log each failing write, then the loop shutdown, while the
    Checkpointer reports the failure once, in one line. Other errors pass untouched."""

    failed = False  # set once a save failed: what its threads log afterwards is its aftermath

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        if _file_system_reason(record.exc_info[1]) is not None:
            return False
        return not _SaveFailureNoise.failed


def _quiet_save_failures() -> None:
    for name in ("absl", "concurrent.futures"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _SaveFailureNoise) for f in logger.filters):
            logger.addFilter(_SaveFailureNoise())


def _file_system_reason(error: BaseException) -> Optional[str]:
    """The strerror of an OSError in `error`'s chain (or named in a wrapped error's text)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in SAVE_ERRNOS:
            return f"{os.strerror(error.errno)}" + (f" ({error.filename})" if error.filename else "")
        for code in SAVE_ERRNOS:  # tensorstore reports the C library's message inside its own error
            if os.strerror(code) in str(error):
                return os.strerror(code)
        error = error.__cause__ or error.__context__
    return None


def _shape_mismatch(stored: Dict[str, Tuple], abstract_state: Any, partial: bool) -> Optional[str]:
    """The first array whose presence, shape or dtype differs between checkpoint and target."""
    wanted = {path_str(p): (tuple(a.shape), str(a.dtype))
              for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    # Parameters first: the optimizer moments that follow them would name the same difference.
    wanted = dict(sorted(wanted.items(), key=lambda kv: not kv[0].startswith(("params/", "frozen/"))))
    for name, (shape, dtype) in wanted.items():
        if name not in stored:
            group, _, rest = name.partition("/")
            elsewhere = [n for n in stored if n.partition("/")[2] == rest and n != name]
            if elsewhere:  # e.g. trainable here, frozen there
                return (f"the checkpoint stores {name} as {elsewhere[0]} (config.optimizer.frozen differs "
                        "from the run that saved it)")
            return f"the config's model has {name} {list(shape)}, the checkpoint has no such array"
        if stored[name] != (shape, dtype):
            return (f"{name} is {stored[name][1]}{list(stored[name][0])} in the checkpoint and "
                    f"{dtype}{list(shape)} in the config")
    if not partial:
        for name, (shape, _) in stored.items():
            if name not in wanted:
                return f"the checkpoint has {name} {list(shape)}, the config's model has no such array"
    return None


def _config_differences(saved: Any, current: Any, prefix: str = "config.model") -> List[str]:
    """'<field> is X in the checkpoint and Y here' for each model config field that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = list(current) + [k for k in saved if k not in current]
        return [d for k in keys for d in _config_differences(saved.get(k), current.get(k), f"{prefix}.{k}")]
    as_json = lambda v: json.loads(json.dumps(v))  # noqa: E731  the saved copy went through JSON
    return [] if as_json(saved) == as_json(current) else [f"{prefix} is {saved!r} in the checkpoint and {current!r} here"]


def _mismatch_message(path: epath.Path, mismatch: str, saved_model: Any, model_config: Any) -> str:
    fields = _config_differences(saved_model, model_config) if saved_model and model_config else []
    which = "; ".join(fields[:3]) + (f" (and {len(fields) - 3} more fields)" if len(fields) > 3 else "")
    return (f"checkpoint {path} does not fit this run's model: {which + '; ' if which else ''}{mismatch}. "
            "Nothing was changed: run with the checkpoint's model config, or use another workdir")


@contextlib.contextmanager
def quiet_absl():
    """absl logging (orbax's warnings) at ERROR for a moment; errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class PreemptionWatcher:
    """Turns SIGTERM into a flag the training loop polls once per step.

    On multi-host pods the JAX preemption service (via orbax `reached_preemption`) makes all
    hosts agree on the step to stop at; in a single process the signal flag alone decides.
    """

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.signalled = False
        # With several processes the JAX preemption service owns SIGTERM; do not replace it.
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.signalled = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.checkpointer.manager.reached_preemption(step)
        return self.signalled

    def restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
