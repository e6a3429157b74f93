"""Orbax checkpoints of the whole training state, plus the grain iterator state, saved together.

One checkpoint `<dir>/<step>/` holds three items:
  state  params (trainable and frozen), optimizer state, step, RNG key data (orbax StandardSave)
  data   the grain iterator state of this process (grain's orbax handler, one file per process)
  meta   JSON: step, model config, mesh shape (for humans and for resume checks)

Saves are asynchronous; orbax writes into a temporary directory and renames it when complete,
so a finished checkpoint is never replaced by a partial one, and an interrupted save leaves
only a temporary directory that restore ignores (and removes). Restore reads onto whatever
shardings the abstract target carries, so a checkpoint saved on one mesh loads on another.
A checkpoint that fails to read is moved aside to `<step>.unreadable` with a warning naming it,
and the previous one is tried.
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Dict, Optional, Tuple

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the newest `keep` checkpoints plus every step that is a multiple of `keep_every`."""

    def __init__(self, directory: str, *, keep: int = 3, keep_every: Optional[int] = None,
                 async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def save(self, step: int, state: Any, data_iterator: Any, meta: Dict[str, Any]) -> bool:
        """Starts saving `state` (a pytree of global arrays) and the iterator state at `step`.

        Returns False, saving nothing, when a finished checkpoint of that step already exists.
        """
        if step in self.manager.all_steps():
            log.info("checkpoint of step %d already exists in %s; not saving it again", step, self.directory)
            return False
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_state: Any, data_iterator: Any, *, partial: bool = False
                       ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """Restores the newest readable checkpoint onto the shardings of `abstract_state`.

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set (the target mesh).
        data_iterator: a grain iterator whose state is set in place (or None to skip the data).
        partial: `abstract_state` names a subset of the saved state (e.g. params without the
          optimizer state); only that subset is read.
        Returns (step, state, meta), or None when there is no readable checkpoint.
        """
        if partial:
            state_args = ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = dict(state=state_args, meta=ocp.args.JsonRestore())
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # any read failure: fall back to the previous checkpoint
                self._set_aside(step, e)
                continue
            return step, restored["state"], dict(restored["meta"])
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        aside = self.directory / f"{step}.unreadable"
        log.warning("checkpoint %s could not be read (%s: %s); moving it to %s and falling back to "
                        "the previous checkpoint", path, type(error).__name__, str(error)[:300], aside)
        multihost_utils.sync_global_devices(f"unreadable checkpoint {step}")
        if jax.process_index() == 0:
            if aside.exists():
                aside.rmtree()
            path.rename(aside)
        multihost_utils.sync_global_devices(f"moved unreadable checkpoint {step}")
        self.manager.reload()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
