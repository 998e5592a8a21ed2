"""The backbones' turn-taking lock: exclusive across processes, released when a holder dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lesionserve.core_lock import CoreLock, lock_path

HOLD = """
import sys, time
from lesionserve.core_lock import CoreLock
with CoreLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_path_is_per_repository_and_refuses_odd_names(tmp_path):
    a, b = lock_path("backbones", tmp_path / "repo_a"), lock_path("backbones", tmp_path / "repo_b")
    assert a != b and a == lock_path("backbones", tmp_path / "repo_a")
    with pytest.raises(ValueError, match=r"letters, digits, '-' or '_', got '../x'"):
        lock_path("../x", tmp_path)


def test_lock_excludes_another_process_until_the_holder_is_killed(tmp_path):
    path = tmp_path / "core.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = CoreLock(path)
        import fcntl

        with pytest.raises(BlockingIOError):  # held elsewhere: a non-blocking attempt fails
            fcntl.flock(lock._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.kill(holder.pid, signal.SIGKILL)  # a killed model instance must not leave others waiting
        holder.wait()
        start = time.monotonic()
        with lock:
            pass
        assert time.monotonic() - start < 5
        lock.close()
    finally:
        holder.kill()
        holder.wait()
