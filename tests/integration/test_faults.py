"""Faults injected into a real tritonserver (docs/reliability.md, "Faults injected").

The server SIGKILLed while a classify is in flight, then restarted on the same ports; a python
backend stub SIGKILLed. Each test starts its own server on the 64 px repository (a few seconds)
and leaves no server, stub or shared-memory region behind.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from lesionserve.processes import SHM_DIR, python_stubs
from lesionserve.server import TritonServer
from lesionserve.spec import CLASS_NAMES
from lesionserve_client import LesionClient, RequestTimeoutError, ServerError, ServerUnavailableError
from lesionserve.synthetic import render_lesion
from tests.integration.conftest import PYTHON_MODELS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [cv2.imencode(".jpg", render_lesion(CLASS_NAMES[i % 7], rng, (320, 240))[..., ::-1])[1].tobytes()
            for i in range(64)]


def start(repository: Path, like: TritonServer | None = None) -> TritonServer:
    """A server on free ports, or on the ports of ``like`` (a restart)."""
    ports = dict(grpc_port=like.grpc_port, http_port=like.http_port, metrics_port=like.metrics_port) if like else \
        dict(grpc_port=0, http_port=0, metrics_port=0)
    return TritonServer(repository, startup_timeout=180, **ports).start()


def assert_nothing_left(server: TritonServer, regions: set[str]) -> None:
    assert python_stubs(server.process.pid) == [], "a stub of the stopped server survived"
    assert not [r for r in regions if (SHM_DIR / r).exists()], "a shared-memory region of the stopped server survived"


def classify_in_thread(client: LesionClient, images: list[bytes]) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        outcome["started"] = time.monotonic()
        try:
            outcome["results"] = client.classify(images)
        except Exception as exc:  # the outcome under test
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_classify_raises_unavailable_within_timeout_when_server_killed_mid_request_then_same_client_recovers(
    small_repository, images
):
    server = start(small_repository)
    regions = {stub.shm_region for stub in server.stubs()}
    timeout = 8.0
    client = LesionClient(server.grpc_url, timeout=timeout, retries=3, backoff=0.2, max_backoff=1.0)
    try:
        before = client.classify(images[:1])
        # 64 images = 8 requests of 8 on 4 threads: seconds of work, so the kill lands mid-call.
        thread, outcome = classify_in_thread(client, images)
        time.sleep(0.5)
        killed = time.monotonic()
        os.kill(server.process.pid, signal.SIGKILL)
        thread.join(timeout + 5)  # never hangs: bounded by the client's timeout
        assert not thread.is_alive(), "classify still running after its timeout"
        assert outcome["started"] < killed < outcome["ended"]
        assert isinstance(outcome.get("error"), (ServerUnavailableError, RequestTimeoutError)), outcome
        waited = outcome["ended"] - killed
        print(f"kill -> {type(outcome['error']).__name__} after {waited:.2f} s: {outcome['error']}")
        assert waited <= timeout

        server.stop()  # the server is gone; stop reaps what it left
        assert_nothing_left(server, regions)

        restarted = start(small_repository, like=server)
        try:
            recovered = time.monotonic()
            after = client.classify(images[:1])  # the same client object, its channel reconnected
            print(f"same client classified {time.monotonic() - recovered:.2f} s after the restarted server was ready")
            assert after == before
        finally:
            restarted.stop()
        assert_nothing_left(restarted, {stub.shm_region for stub in restarted.stubs()} | regions)
    finally:
        client.close()
        server.stop()


def test_classify_retries_through_a_restart_when_server_comes_back_within_the_timeout(small_repository, images):
    server = start(small_repository)
    client = LesionClient(server.grpc_url, timeout=120, retries=12, backoff=0.5, max_backoff=4.0)
    try:
        before = client.classify(images[:1])
        server.stop()
        thread, outcome = classify_in_thread(client, images[:1])  # sent while nothing listens
        time.sleep(1.0)
        down = time.monotonic()
        restarted = start(small_repository, like=server)
        try:
            thread.join(120)
            assert "error" not in outcome, outcome.get("error")
            assert outcome["results"] == before
            print(f"classify sent while down returned {outcome['ended'] - outcome['started']:.2f} s later "
                  f"(server restart took {time.monotonic() - down:.2f} s of it)")
        finally:
            restarted.stop()
    finally:
        client.close()
        server.stop()


def test_stub_killed_fails_every_request_to_its_model_precisely_and_triton_stays_ready(small_repository, images):
    """What Triton 2.51 does: it does not restart the stub, keeps reporting ready, and answers every
    request needing that model with INTERNAL "Stub process '<name>' is not healthy." (after ~1 s)."""
    server = start(small_repository)
    try:
        stubs = {stub.name: stub for stub in server.stubs()}
        assert set(stubs) == {f"{m}_0_0" for m in PYTHON_MODELS}
        victim = stubs["resnet50_0_0"]
        with LesionClient(server.grpc_url, timeout=30, retries=3) as client:
            client.classify(images[:1])
            os.kill(victim.pid, signal.SIGKILL)
            for attempt in range(3):
                sent = time.monotonic()
                with pytest.raises(ServerError) as info:
                    client.classify(images[:1])
                took = time.monotonic() - sent
                assert info.value.status == "StatusCode.INTERNAL"  # not UNAVAILABLE: the client does not retry it
                assert "in ensemble 'lesion_ensemble', Stub process 'resnet50_0_0' is not healthy." in str(info.value)
                assert took < 5
            print(f"after the kill: {info.value} ({took:.2f} s)")
        assert server.is_ready()  # Triton still says ready ...
        with urllib.request.urlopen(f"{server.http_url}/v2/models/resnet50/ready", timeout=5) as r:
            assert r.status == 200  # ... and so does the model
        now = {stub.name: stub for stub in server.stubs()}
        assert "resnet50_0_0" not in now  # no new stub: not restarted
        assert all(stub.alive() for stub in now.values())  # the others are untouched
        assert [stub.name for stub in server.dead_stubs()] == ["resnet50_0_0"]
        assert (SHM_DIR / victim.shm_region).exists()  # a killed stub leaves its region behind ...
    finally:
        server.stop()
    assert_nothing_left(server, {stub.shm_region for stub in stubs.values()})  # ... which stop removes
