"""What every stand-in shares: request counters, injected faults and injected latency.

A service names itself (``"entra"``, ``"kv"``, ``"mi"``, ``"defender"``, ``"graph"``) and counts each request
under ``"<service>.<operation>"`` and, where a tenant is involved, ``"<service>.<operation>:<tenant-guid>"``.
Tests and benchmarks read the counters to prove what the broker did *not* do (no outbound call on bad input,
one token request for 200 concurrent callers).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fault:
    """A canned response served instead of the real one, ``times`` times (``None``: until cleared)."""

    service: str
    status: int
    body: str = ""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    path_contains: str = ""
    times: int | None = 1
    delay_seconds: float = 0.0

    def matches(self, service: str, path: str) -> bool:
        return self.service == service and self.path_contains in path


class Recorder:
    """Thread-safe counters, fault queue and per-service latency for the stand-ins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._faults: list[Fault] = []
        self._latency: dict[str, float] = {}

    def hit(self, key: str, tenant: str | None = None) -> None:
        with self._lock:
            self._counts[key] += 1
            if tenant:
                self._counts[f"{key}:{tenant}"] += 1

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def counts(self, prefix: str = "") -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._counts.items() if k.startswith(prefix)}

    def total(self, service: str) -> int:
        """Every request a service answered (sum of its un-suffixed counters)."""
        with self._lock:
            return sum(v for k, v in self._counts.items() if k.startswith(service + ".") and ":" not in k)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_fault(self, service: str, path: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.matches(service, path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            del self._faults[i]
                    return fault
        return None

    def set_latency(self, service: str, seconds: float) -> None:
        with self._lock:
            self._latency[service] = seconds

    def latency(self, service: str) -> float:
        with self._lock:
            return self._latency.get(service, 0.0)

    async def delay(self, service: str) -> None:
        seconds = self.latency(service)
        if seconds > 0:
            await asyncio.sleep(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self._counts), "latency": dict(self._latency), "faults": len(self._faults)}


class FaultsAndLatency:
    """Pure ASGI wrapper: serve an injected :class:`Fault` or add the service's latency, then the app.

    A served fault counts as ``"<service>.fault"`` so that ``Recorder.total`` still sees every request.
    The fault is matched against the path plus the query string (``/msi/token?resource=...``). Every
    request is also counted by its ``Host`` (:func:`count_host`).
    """

    def __init__(self, app: Any, service: str, recorder: Recorder) -> None:
        self.app = app
        self.service = service
        self.recorder = recorder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        count_host(self.recorder, self.service, scope)
        target = scope.get("path", "")
        query = scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        fault = self.recorder.take_fault(self.service, target)
        if fault is None:
            await self.recorder.delay(self.service)
            await self.app(scope, receive, send)
            return
        self.recorder.hit(f"{self.service}.fault")
        if fault.delay_seconds > 0:
            await asyncio.sleep(fault.delay_seconds)
        body = fault.body.encode()
        headers = [(b"content-type", fault.content_type.encode()), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in fault.headers.items()]
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def count_host(recorder: Recorder, service: str, scope: Any) -> None:
    """Count a request under ``"<service>.host:<Host header>"``: a test can tell which name a client used
    for the same stand-in (``127.0.0.1:port`` or ``localhost:port``, e.g. a tenant's regional host). The
    ``:`` keeps it out of ``Recorder.total``."""
    host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"-").decode("latin-1")
    recorder.hit(f"{service}.host:{host.lower()}")


class CountHosts:
    """Pure ASGI wrapper for a stand-in with its own fault handling: only :func:`count_host`."""

    def __init__(self, app: Any, service: str, recorder: Recorder) -> None:
        self.app = app
        self.service = service
        self.recorder = recorder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            count_host(self.recorder, self.service, scope)
        await self.app(scope, receive, send)
