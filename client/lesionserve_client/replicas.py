"""Several servers behind one LesionClient: which replica takes the next request, which are down.

A replica that fails a call with UNAVAILABLE is marked down: no new request goes to it while
another replica is up, and a background thread probes it (``is_server_ready``, which Triton answers
without any credential) every ``probe_interval`` seconds until it is ready again. Choosing, counting
and marking are plain code under one lock; the retry policy that uses them is
``LesionClient._call``.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger("lesionserve_client")

#: Seconds between two probes of a replica that is down.
DEFAULT_PROBE_INTERVAL = 1.0


@dataclass
class Replica:
    """One endpoint, its tritonclient and what the client has seen of it."""

    url: str
    client: Any  # tritonclient.grpc.InferenceServerClient (a fake in unit tests)
    down_since: Optional[float] = None
    in_flight: int = 0
    #: Calls it answered (results or a server-side error: either way, an answer).
    answered: int = 0
    #: Calls that failed on it with UNAVAILABLE (never answered: retried elsewhere or raised).
    unavailable: int = 0
    #: Round-robin position: ties in load go to the replica picked least recently.
    last_picked: int = field(default=-1, repr=False)

    @property
    def up(self) -> bool:
        return self.down_since is None


class ReplicaSet:
    """The replicas of one LesionClient: picks the least loaded up replica, marks failed ones down,
    probes them back. Thread-safe."""

    def __init__(self, urls: Sequence[str], make_client: Callable[[str], Any], probe_interval: float = DEFAULT_PROBE_INTERVAL) -> None:
        if not probe_interval > 0:
            raise ValueError(f"probe_interval must be > 0 seconds, got {probe_interval!r}")
        self.replicas = [Replica(url, make_client(url)) for url in urls]
        self.probe_interval = float(probe_interval)
        self._lock = threading.Lock()
        self._ticks = itertools.count()
        self._closed = threading.Event()
        self._prober: Optional[threading.Thread] = None

    def acquire(self, exclude: Sequence[Replica] = ()) -> Optional[Replica]:
        """The replica for the next attempt among those not in ``exclude``, counted in flight until ``release``.

        An up replica if there is one, the least loaded (ties: picked least recently); else the one
        down the longest (it may be back before its probe says so). None when all are excluded.
        """
        with self._lock:
            candidates = [r for r in self.replicas if r not in exclude]
            if not candidates:
                return None
            up = [r for r in candidates if r.up]
            if up:
                replica = min(up, key=lambda r: (r.in_flight, r.last_picked))
            else:
                replica = min(candidates, key=lambda r: (r.down_since or 0.0, r.in_flight))
            replica.in_flight += 1
            replica.last_picked = next(self._ticks)
            return replica

    def release(self, replica: Replica, answered: bool = False, unavailable: bool = False) -> None:
        """End ``replica``'s attempt: ``answered`` (any answer) marks it up, ``unavailable`` (no answer)
        marks it down; neither (a timeout, an interrupted call) changes nothing but its load."""
        with self._lock:
            replica.in_flight -= 1
            if answered:
                replica.answered += 1
                replica.down_since = None  # it answered: whatever marked it down is over
                return
            if not unavailable:
                return
            replica.unavailable += 1
            if replica.up:
                replica.down_since = time.monotonic()
                if len(self.replicas) > 1:  # alone, the client's retry warnings already say it
                    logger.warning("replica %s is unavailable: no new request goes to it until it is ready again", replica.url)
            # One replica alone needs no prober: every call goes to it anyway, and its answer marks it up.
            if len(self.replicas) > 1 and self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe_loop, name="lesionserve-probe", daemon=True)
                self._prober.start()

    def counts(self) -> dict[str, int]:
        """Calls answered by each replica, by url."""
        with self._lock:
            return {r.url: r.answered for r in self.replicas}

    def down(self) -> list[str]:
        """Urls of the replicas marked down now."""
        with self._lock:
            return [r.url for r in self.replicas if not r.up]

    def _probe_loop(self) -> None:
        """Until no replica is down (or the set is closed): wait, then ask each down one if it is ready."""
        while not self._closed.wait(self.probe_interval):
            with self._lock:
                down = [r for r in self.replicas if not r.up]
                if not down:
                    self._prober = None  # under the lock: a replica marked down from now on starts a new one
                    return
            for replica in down:
                if self._is_ready(replica):
                    with self._lock:
                        replica.down_since = None
                    logger.info("replica %s is ready again: requests go to it", replica.url)

    def _is_ready(self, replica: Replica) -> bool:
        try:
            return bool(replica.client.is_server_ready(client_timeout=self.probe_interval))
        except Exception:  # any failure to answer means: still down; the next probe tries again
            return False

    def close(self) -> None:
        """Stop probing and close every replica's channel."""
        self._closed.set()
        with self._lock:
            prober = self._prober
        if prober is not None:
            prober.join(self.probe_interval + 1.0)
        for replica in self.replicas:
            replica.client.close()
