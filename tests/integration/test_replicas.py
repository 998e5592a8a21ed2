"""One LesionClient over three real tritonservers on loopback ports: one is SIGKILLed in the middle
of a run of at least 1,000 requests from several threads, then restarted on the same ports.

Zero requests may fail, every result must equal a single-server run, traffic must leave the dead
replica and come back to the restarted one, and no request may run twice: on each replica that
stayed up, and on the restarted one, the server's own count of successful requests equals the
number of answers the client received from it. The 64 px, T=1 repository keeps three servers
(7 python stubs each) affordable on two cores.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from lesionserve.server import TritonServer
from lesionserve.spec import CLASS_NAMES
from lesionserve.synthetic import render_lesion
from lesionserve_client import LesionClient

pytestmark = pytest.mark.integration

REQUESTS = 1000
THREADS = 4
DISTINCT = 16
ENSEMBLE = "lesion_ensemble"


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(5)
    return [cv2.imencode(".jpg", render_lesion(CLASS_NAMES[i % 7], rng, (96, 72))[..., ::-1])[1].tobytes()
            for i in range(DISTINCT)]


def start_server(repository, like: TritonServer | None = None) -> TritonServer:
    """A server on free ports, or on the ports of ``like`` (the restart of a killed replica)."""
    ports = dict(grpc_port=like.grpc_port, http_port=like.http_port, metrics_port=like.metrics_port) if like else \
        dict(grpc_port=0, http_port=0, metrics_port=0)
    return TritonServer(repository, startup_timeout=180, **ports).start()


def successes(server: TritonServer, at_least: int = 0) -> int:
    """The server's count of successful ensemble requests (statistics lag the answers a little)."""
    with grpcclient.InferenceServerClient(server.grpc_url) as raw:
        deadline = time.monotonic() + 5
        while True:
            (stats,) = raw.get_inference_statistics(ENSEMBLE).model_stats
            if stats.inference_stats.success.count >= at_least or time.monotonic() > deadline:
                return stats.inference_stats.success.count
            time.sleep(0.05)


class Load:
    """THREADS threads sending one-image requests (image ``i % DISTINCT`` for request ``i``) until stopped."""

    def __init__(self, client: LesionClient, images: list[bytes]) -> None:
        self.client, self.images = client, images
        self.results: dict[int, object] = {}
        self.failures: list[tuple[int, BaseException]] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                index, self._next = self._next, self._next + 1
            try:
                self.results[index] = self.client.classify([self.images[index % DISTINCT]])[0]
            except Exception as exc:  # the outcome under test: counted, never raised in the thread
                self.failures.append((index, exc))

    @property
    def done(self) -> int:
        return len(self.results) + len(self.failures)

    def wait_for(self, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what} ({self.done} requests done)"
            assert not self.failures, f"failed requests: {self.failures[:3]}"
            time.sleep(0.05)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(60)


def test_no_request_fails_and_results_equal_one_server_when_a_replica_is_killed_then_restarted(small_repository, images):
    started = time.monotonic()
    # One after the other, from this thread: PR_SET_PDEATHSIG (server._die_with_parent) fires when the
    # *thread* that started a server ends, so servers started from a pool's threads die with them.
    servers = [start_server(small_repository) for _ in range(3)]
    victim = servers[2]
    try:
        print(f"\n3 servers ready in {time.monotonic() - started:.1f} s")
        with LesionClient(servers[0].grpc_url) as alone:
            expected = [alone.classify([image])[0] for image in images]
        urls = [s.grpc_url for s in servers]
        server_before = [successes(s) for s in servers]
        with LesionClient(urls, timeout=60, probe_interval=0.5, backoff=0.2) as client:
            client.model_info  # noqa: B018  (the config call, before the counts that follow are taken)
            base = client.replica_counts()
            delta = lambda now: [now[u] - base[u] for u in urls]  # noqa: E731
            with Load(client, images) as load:
                load.wait_for(lambda: load.done >= 300, "300 requests before the kill")
                before_kill = delta(client.replica_counts())
                os.kill(victim.process.pid, signal.SIGKILL)
                killed_at = load.done
                load.wait_for(lambda: client.down_replicas() == [victim.grpc_url], "the killed replica marked down", timeout=30)
                victim.stop()  # reaps its orphaned stubs and shared memory while the load goes on
                at_down = delta(client.replica_counts())
                load.wait_for(lambda: load.done >= killed_at + 200, "200 requests with the replica dead")
                while_down = delta(client.replica_counts())
                restarted_at = time.monotonic()
                victim = servers[2] = start_server(small_repository, like=victim)
                print(f"replica {victim.grpc_url} restarted in {time.monotonic() - restarted_at:.1f} s")
                load.wait_for(lambda: delta(client.replica_counts())[2] >= while_down[2] + 50 and load.done >= REQUESTS,
                              "traffic back on the restarted replica")
            after_restart = delta(client.replica_counts())
        answered_by = client.replica_counts()
        took = time.monotonic() - started
        print(f"requests sent {load.done}, answered {len(load.results)}, failed {len(load.failures)} in {took:.1f} s")
        print(f"answered per replica {urls}: before the kill {before_kill}; marked down {at_down}; "
              f"while down {while_down}; after the restart {after_restart}")
        assert not load.failures, load.failures[:3]
        assert len(load.results) >= REQUESTS
        for index, result in load.results.items():
            want = expected[index % DISTINCT]
            assert result.label == want.label and result.thresholds_fired == want.thresholds_fired
            np.testing.assert_allclose(list(result.probabilities.values()), list(want.probabilities.values()), atol=1e-6)
        assert min(before_kill) >= 0.15 * sum(before_kill), f"not spread: {before_kill}"
        assert while_down[2] == at_down[2], "the dead replica answered"
        assert after_restart[2] - while_down[2] >= 50
        # No request ran twice: each server's successes equal the answers the client got from it.
        for i in (0, 1):
            want_count = server_before[i] + answered_by[urls[i]] - base[urls[i]]
            assert successes(servers[i], want_count) == want_count
        assert successes(victim, after_restart[2] - while_down[2]) == after_restart[2] - while_down[2]
        assert took < 180
    finally:
        for server in servers:
            server.stop()
