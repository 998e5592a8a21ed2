"""LesionClient over several replicas, without a server: spreading, failover, probing back, what is
never sent twice. The fake replicas are tests/unit/test_client.py's fake tritonclient (real
InferResult responses), one instance per url, some of them made to fail as a dead server does."""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Optional

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from lesionserve_client import LesionClient, RequestTimeoutError, ServerError, ServerUnavailableError
from lesionserve_client import cli
from lesionserve_client.client import validate_urls
from lesionserve_client.replicas import ReplicaSet
from tests.unit.test_client import FakeTritonClient, blobs_of, fake  # noqa: F401  (fake: the fixture)

URLS = ("a:8001", "b:8001", "c:8001")


def unavailable(url: str) -> InferenceServerException:
    """What tritonclient raises for a server that is gone (connection refused)."""
    return InferenceServerException(f"failed to connect to all addresses; last error: UNKNOWN: ipv4:{url}: Connection refused",
                                    status="StatusCode.UNAVAILABLE")


class ReplicaFake(FakeTritonClient):
    """A fake replica: ``down`` urls fail every call as a dead server does; ``failure`` urls fail
    infer with that exception (an answer: a server-side error, or a deadline)."""

    down: set[str] = set()
    failure: dict[str, InferenceServerException] = {}
    ready_calls: Counter = Counter()

    def infer(self, model_name: str, inputs: Any, outputs: Any = None, client_timeout: Optional[float] = None, **kw: Any):
        if self.url in self.down:
            raise unavailable(self.url)
        if self.url in self.failure:
            self.requests.append(["failed"])
            raise self.failure[self.url]
        return super().infer(model_name, inputs, outputs, client_timeout, **kw)

    def get_model_config(self, model_name: str, as_json: bool = False, client_timeout: Optional[float] = None) -> Any:
        if self.url in self.down:
            raise unavailable(self.url)
        return super().get_model_config(model_name, as_json, client_timeout)

    def is_server_ready(self, client_timeout: Optional[float] = None) -> bool:
        ReplicaFake.ready_calls[self.url] += 1
        if self.url in self.down:
            raise unavailable(self.url)
        return True


@pytest.fixture
def replicas(fake, monkeypatch):  # noqa: F811  (the imported fixture)
    from lesionserve_client import client as client_module

    monkeypatch.setattr(ReplicaFake, "down", set())
    monkeypatch.setattr(ReplicaFake, "failure", {})
    monkeypatch.setattr(ReplicaFake, "ready_calls", Counter())
    monkeypatch.setattr(client_module, "InferenceServerClient", ReplicaFake)
    return ReplicaFake


def by_url(fake_class: type[FakeTritonClient]) -> dict[str, FakeTritonClient]:
    return {instance.url: instance for instance in fake_class.instances}


def sent(instance: FakeTritonClient) -> list[bytes]:
    """The images a replica answered (its fake records a request only once it is accepted)."""
    return [blob for request in instance.requests for blob in request if blob != "failed"]


def test_validate_urls_accepts_a_sequence_or_comma_separated_and_refuses_duplicates_and_schemes():
    assert validate_urls("a:1") == ("a:1",)
    assert validate_urls("a:1, b:2") == ("a:1", "b:2") == validate_urls(["a:1", "b:2"])
    with pytest.raises(ValueError, match="url lists a:1 more than once; give each replica once"):
        validate_urls(["a:1", "b:2", "a:1"])
    with pytest.raises(ValueError, match="without a scheme, got 'grpc://b:2'"):
        validate_urls("a:1,grpc://b:2")
    with pytest.raises(ValueError, match="at least one endpoint"):
        validate_urls([])
    assert cli.build_parser().parse_args(["classify", "x.jpg", "--url", "a:1,b:2"]).url == ("a:1", "b:2")


def test_classify_spreads_requests_evenly_and_results_equal_a_single_server_when_three_replicas(replicas):
    blobs = blobs_of(30)
    with LesionClient("solo:8001", max_images_per_request=1) as client:
        alone = client.classify(blobs)
    replicas.on_infer = staticmethod(lambda batch: time.sleep(0.01))  # a server's time per request: load to balance
    with LesionClient(URLS, max_images_per_request=1, max_workers=3) as client:
        spread = client.classify(blobs)
        counts = client.replica_counts()
    assert [r.probabilities for r in spread] == [r.probabilities for r in alone]
    images = {url: len(sent(instance)) for url, instance in by_url(replicas).items() if url in URLS}
    print(f"answered per replica (config call included): {counts}; images per replica: {images}")
    assert sum(images.values()) == 30 and all(n >= 5 for n in images.values()), images
    assert sum(counts.values()) == 31  # 30 requests + the one model-config call


def test_request_to_a_dead_replica_is_retried_at_once_elsewhere_and_each_image_answered_once_when_one_is_down(replicas):
    replicas.down = {"b:8001"}
    blobs = blobs_of(24)
    with LesionClient(URLS, max_images_per_request=1, max_workers=4, probe_interval=60) as client:
        results = client.classify(blobs)
        counts = client.replica_counts()
    fakes = by_url(replicas)
    answered = sent(fakes["a:8001"]) + sent(fakes["c:8001"])
    assert sorted(answered) == sorted(blobs)  # each exactly once: nothing answered was sent again
    assert counts["b:8001"] == 0 and len(results) == 24
    assert replicas.sleeps == []  # another replica was up: no backoff was waited


def test_down_replica_gets_no_new_request_until_a_probe_finds_it_ready_then_traffic_returns(replicas):
    replicas.down = {"b:8001"}
    with LesionClient(URLS, max_images_per_request=1, max_workers=1, probe_interval=0.05) as client:
        client.classify(blobs_of(6))  # one request fails on b, which is marked down
        assert client.down_replicas() == ["b:8001"]
        probes_before = replicas.ready_calls["b:8001"]
        client.classify(blobs_of(6))
        assert client.replica_counts()["b:8001"] == 0
        replicas.down = set()
        deadline = time.monotonic() + 5
        while client.down_replicas() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.down_replicas() == [] and replicas.ready_calls["b:8001"] > probes_before
        client.classify(blobs_of(6))
        assert client.replica_counts()["b:8001"] == 2  # its share of the 6 requests, round robin


def test_answered_server_error_is_raised_and_never_sent_to_another_replica(replicas):
    error = InferenceServerException("Stub process 'resnet50_0_0' is not healthy.", status="StatusCode.INTERNAL")
    replicas.failure = {url: error for url in URLS}
    with LesionClient(URLS, max_images_per_request=1) as client, pytest.raises(ServerError, match="not healthy"):
        client.classify(blobs_of(1))
    assert sum(len(f.requests) for f in replicas.instances) == 1


def test_timeout_is_raised_and_not_retried_on_another_replica(replicas):
    replicas.failure = {u: InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED") for u in URLS}
    with LesionClient(URLS, max_images_per_request=1, timeout=5) as client, pytest.raises(RequestTimeoutError):
        client.classify(blobs_of(1))
    assert sum(len(f.requests) for f in replicas.instances) == 1


def test_call_gives_up_naming_the_replicas_tried_when_every_replica_is_down(replicas):
    replicas.down = set(URLS)
    with LesionClient(URLS, retries=4, backoff=0.5, timeout=30) as client, pytest.raises(ServerUnavailableError) as info:
        client.classify(blobs_of(1))
    message = str(info.value)
    print(message)
    # 3 at once (one per replica), one backoff, then 2 more: 5 attempts = retries + 1.
    assert "gave up after 5 attempts" in message and "retries=4" in message
    assert "replicas tried: a:8001, b:8001, c:8001)" in message
    assert replicas.sleeps == [0.5]


def test_replica_set_picks_least_loaded_then_least_recently_picked():
    made = ReplicaSet(["x", "y", "z"], make_client=lambda url: object(), probe_interval=60)
    first, second = made.acquire(), made.acquire()
    assert {first.url, second.url} == {"x", "y"}  # both idle: round robin, not the same one twice
    made.release(first, answered=True)
    third = made.acquire()
    assert third.url == "z"  # x is idle again but z was never picked
    made.release(second, unavailable=True)
    assert made.down() == [second.url]
    assert made.acquire().url != second.url  # the least loaded up one: x (idle), never the down y
    assert made.acquire(exclude=[first, third]).url == second.url  # down ones only as the last resort
    assert made.acquire(exclude=made.replicas) is None
    made._closed.set()


def test_concurrent_calls_from_several_threads_each_get_their_own_results_when_spread(replicas):
    blobs = blobs_of(40)
    outcomes: dict[int, Any] = {}
    with LesionClient(URLS, max_images_per_request=1) as client:
        def run(i: int) -> None:
            outcomes[i] = client.classify([blobs[i]])[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with LesionClient("solo:8001") as client:
        alone = client.classify(blobs)
    assert all(np.allclose(list(outcomes[i].probabilities.values()), list(alone[i].probabilities.values())) for i in range(40))
