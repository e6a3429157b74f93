"""One trainer per workdir: `<workdir>/trainer.lock`, held by process 0 of the run that owns it.

The processes of one multi-host run share the workdir, so only process 0 takes the lock and
tells the others (a broadcast) whether it got it; every process of a second run then stops
with the same one-line error naming the PID and host that hold the workdir.

The lock is an `fcntl.flock` on the file, which the kernel drops when its holder dies (even
on SIGKILL); the file's JSON text ({"pid", "host"}) names the holder for the error message and
stays behind after a kill. Found unlocked with a holder named in it, it is a stale lock: taken
over with a message. A holder on another host cannot be checked from here (flock may not
reach across hosts on a shared file system), so that lock is refused until its file is removed.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_NAME = "trainer.lock"


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir (or it cannot be locked); the message is one line."""


class WorkdirLock:
    """Held from `acquire()` until `release()` (or the death of the process)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Takes the lock (process 0) and agrees on the outcome with the other processes."""
        problem = ""
        if jax.process_index() == 0:
            try:
                self._take()
            except WorkdirLockedError as e:
                problem = str(e)
        if jax.process_count() > 1:
            refused = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
            if refused and not problem:
                problem = f"process 0 of this run could not lock {self.path} (its log says why)"
        if problem:
            raise WorkdirLockedError(problem)

    def _take(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirLockedError(f"cannot create {self.path}: {e.strerror}") from None
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir {os.path.dirname(self.path)} is in use by another trainer: PID {holder.get('pid', '?')} "
                f"on host {holder.get('host', '?')} holds {self.path}; stop that run or use another workdir") from None
        host = socket.gethostname()
        if holder and holder.get("host") not in (None, host):
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir {os.path.dirname(self.path)} may be in use: {self.path} names PID {holder.get('pid')} on "
                f"host {holder.get('host')}, which cannot be checked from {host}; if that run has ended, "
                "remove the file")
        if holder:
            log.warning("taking over the stale lock %s of PID %s on host %s (that process is gone)",
                        self.path, holder.get("pid"), holder.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host}).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Empties the file (an empty lock file is a free one) and drops the lock.

        The file is not deleted: a second trainer may have it open already, and would lock a
        deleted file while a third created a new one."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_holder(fd: int) -> dict:
    """{"pid", "host"} of the file's last holder; {} for a free (empty) or unreadable file."""
    text = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
