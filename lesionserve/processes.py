"""What a running tritonserver owns, read from /proc: its python-backend stubs, their shared-memory
regions, memory use and listening sockets. Linux only; no psutil.

Used by ``TritonServer.stop`` (no stub or region of a stopped server may survive it), the
``lesionserve serve`` supervisor, the soak run and the safe-defaults tests.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
SHM_DIR = Path("/dev/shm")
STUB_BINARY = "triton_python_backend_stub"
#: Prefix of the python backend's shared-memory regions (one per model instance, in /dev/shm).
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"


@dataclass(frozen=True)
class StubProcess:
    """One python-backend stub: ``name`` is Triton's instance name (``resnet50_0_0``)."""

    pid: int
    name: str
    model_path: str
    shm_region: str
    #: Start time in clock ticks since boot: with ``pid``, identifies the process even if the pid is reused.
    start_ticks: int

    def alive(self) -> bool:
        """Still running (not a zombie), and still the same process."""
        return process_start_ticks(self.pid) == self.start_ticks and process_state(self.pid) not in (None, "Z", "X")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # the process is gone, or not ours to read
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    raw = _read(PROC / str(pid) / "stat")
    if raw is None:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()


def process_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def python_stubs(server_pid: int, repository: str | Path | None = None) -> list[StubProcess]:
    """The live stubs that tritonserver ``server_pid`` started.

    Found by the stub's command line (``stub <model.py> <shm region> <size> <growth> <parent pid> ...``),
    not by its parent pid: a stub whose server was SIGKILLed is re-parented but still names it.
    ``repository``: also require the model file to lie in it (guards against a reused server pid).
    """
    prefix = str(Path(repository).resolve()) + os.sep if repository is not None else None
    stubs = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        raw = _read(entry / "cmdline")
        if not raw:
            continue
        argv = raw.rstrip(b"\0").decode(errors="replace").split("\0")
        if not argv[0].endswith(STUB_BINARY) or len(argv) < 6 or argv[5] != str(server_pid):
            continue
        if prefix is not None and not argv[1].startswith(prefix):
            continue
        pid = int(entry.name)
        ticks = process_start_ticks(pid)
        if ticks is None or process_state(pid) in ("Z", "X"):
            continue
        name = argv[8] if len(argv) > 8 else Path(argv[1]).parent.parent.name
        stubs.append(StubProcess(pid, name, argv[1], argv[2], ticks))
    return sorted(stubs, key=lambda s: s.name)


def mapped_shm_regions(pid: int) -> set[str]:
    """Python-backend regions ``pid`` has mapped (tritonserver maps every one of its stubs')."""
    raw = _read(PROC / str(pid) / "maps")
    if raw is None:
        return set()
    marker = str(SHM_DIR / SHM_REGION_PREFIX)
    regions = set()
    for line in raw.decode(errors="replace").splitlines():
        fields = line.split(None, 5)  # address perms offset device inode path
        # " (deleted)": already unlinked, nothing left to remove.
        if len(fields) == 6 and fields[5].startswith(marker) and not fields[5].endswith(" (deleted)"):
            regions.add(Path(fields[5]).name)
    return regions


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (VmRSS), None if it is gone."""
    raw = _read(PROC / str(pid) / "status")
    if raw is None:
        return None
    for line in raw.decode().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS line


def shm_region_bytes(regions: list[str] | set[str]) -> int:
    """Bytes of /dev/shm actually allocated (not the sparse size) to the named regions that exist."""
    total = 0
    for name in regions:
        try:
            total += (SHM_DIR / name).stat().st_blocks * 512
        except OSError:
            continue
    return total


def shm_used_bytes() -> int:
    """Bytes used on the whole /dev/shm file system (every process's, not only ours)."""
    st = os.statvfs(SHM_DIR)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def remove_shm_regions(regions: list[str] | set[str]) -> list[str]:
    """Unlink the named python-backend regions still in /dev/shm; returns those removed.

    Only call once every process that mapped them is gone. Names outside the backend's prefix are
    refused, so a caller's mistake cannot delete another program's shared memory.
    """
    removed = []
    for name in sorted(regions):
        if not name.startswith(SHM_REGION_PREFIX) or "/" in name:
            raise ValueError(f"not a python-backend shared-memory region: {name!r}")
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            continue
    return removed


def parse_proc_net_line(line: str, ipv6: bool) -> tuple[str, int, str, int]:
    """(local address, port, state hex, inode) of one /proc/net/tcp{,6} row."""
    fields = line.split()
    address, port = fields[1].split(":")
    raw = bytes.fromhex(address)
    if ipv6:
        # Four 32-bit words, each in host (little-endian) order.
        packed = b"".join(struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, 16, 4))
        host = socket.inet_ntop(socket.AF_INET6, packed)
    else:
        host = socket.inet_ntop(socket.AF_INET, struct.pack("<I", struct.unpack(">I", raw)[0]))
    return host, int(port, 16), fields[3], int(fields[9])


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, IPv4 and IPv6."""
    inodes = set()
    fd_dir = PROC / str(pid) / "fd"
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    found = set()
    for table, ipv6 in (("tcp", False), ("tcp6", True)):
        raw = _read(PROC / str(pid) / "net" / table)
        if raw is None:
            continue
        for line in raw.decode().splitlines()[1:]:
            host, port, state, inode = parse_proc_net_line(line, ipv6)
            if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                found.add((host, port))
    return found
