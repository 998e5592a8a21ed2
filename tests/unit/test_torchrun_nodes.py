"""Training across nodes: two torchrun agents as two "nodes" on loopback (c10d rendezvous, gloo on CPU),
each with its own copy of the data, its own split file and its own output folder, as nodes with
local disks have (docs/deployment.md, "Training across nodes").
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lesionserve.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[2]
NODE = Path(__file__).with_name("torchrun_node.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_share_split_and_end_with_identical_weights_when_run_on_loopback(tmp_path):
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    nodes = []
    for node in (0, 1):
        here = tmp_path / f"node{node}"
        # The same generator arguments give byte-identical files: each "node" has its own copy.
        generate_dataset(here / "data", num_images=28, size=(64, 48), seed=3, progress=False)
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'},join_timeout=60",
            "--max-restarts", "0", "--monitor-interval", "1",
            str(NODE), "--data", str(here / "data"), "--out", str(here / "out"),
            "--splits", str(here / "splits.csv"), "--report", str(here / "report.json"),
        ]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, output) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{output[-4000:]}"

    reports = [json.loads((tmp_path / f"node{n}/report.json").read_text()) for n in (0, 1)]
    print(json.dumps([{k: r[k] for k in ("rank", "group_rank", "world_size", "split_sha256", "weights_sha256")}
                      for r in reports], indent=1))
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert sorted(r["group_rank"] for r in reports) == [0, 1]  # two nodes, one process each
    a, b = reports
    assert a["split_sha256"] == b["split_sha256"] and a["train_ids"] == b["train_ids"] and a["val_ids"] == b["val_ids"]
    assert a["weights_sha256"] == b["weights_sha256"]  # bitwise identical after 2 epochs
    timeless = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in reports]
    assert len(timeless[0]) == 2 and timeless[0] == timeless[1]  # losses and val metrics reduced alike
    # Only global rank 0 writes the run's files; its node is whichever got rank 0.
    writer = tmp_path / f"node{reports.index(next(r for r in reports if r['rank'] == 0))}" / "out"
    other = tmp_path / f"node{reports.index(next(r for r in reports if r['rank'] == 1))}" / "out"
    assert (writer / "checkpoint.pt").is_file() and (writer / "metrics.json").is_file()
    assert not other.exists() or not any(other.iterdir())
