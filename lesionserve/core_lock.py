"""A lock the CPU backbones of one repository share, so that only one of them computes at a time.

On a machine with few cores, three backbones computing at once (each with an intra-op thread per
core) oversubscribe the cores: threads wait on each other inside every parallel operator. Taking
turns, each backbone runs on all cores exactly as it does standalone, and the request's total is
the same work done without contention (benchmarks/RESULTS.md, "Tuning", measures both).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


def lock_path(name: str, repository: str | Path) -> Path:
    """One lock file per (name, repository): two servers of different repositories never share it."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"core lock name must be letters, digits, '-' or '_', got {name!r}")
    digest = hashlib.sha1(str(Path(repository).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"lesionserve-core-{name}-{digest}.lock"


class CoreLock:
    """``with CoreLock(path): ...`` holds an exclusive flock for the block.

    flock is released by the kernel when the holder dies, so a killed model instance never leaves
    the others waiting.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)

    def __enter__(self) -> "CoreLock":
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
