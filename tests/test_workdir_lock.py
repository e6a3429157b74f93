"""One trainer per workdir: a live holder is refused by PID and host, a stale lock (its process
gone) is taken over with a message, a lock naming another host is refused until removed."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from molmo_jax.train.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

HOLD = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_holder_is_refused_by_pid_and_host(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert (f"workdir {tmp_path} is in use by another trainer: PID {holder.pid} on host "
                f"{socket.gethostname()} holds") in str(e.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message_and_emptied_on_release(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    lock = WorkdirLock(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="molmo_jax"):
        lock.acquire()
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of PID {gone.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"PID {os.getpid()}"):
        WorkdirLock(str(tmp_path)).acquire()  # a second trainer in this very process
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    WorkdirLock(str(tmp_path)).acquire()  # free again


def test_a_lock_of_another_host_is_refused_until_removed(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "another-host"}))
    with pytest.raises(WorkdirLockedError, match=r"names PID 4242 on host another-host, which cannot be checked "
                                                 r"from .*; if that run has ended, remove the file"):
        WorkdirLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == {"pid": 4242, "host": "another-host"}
