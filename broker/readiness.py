"""Readiness: can this instance serve? Key Vault (or the managed identity), storage and Entra ID's metadata.

``GET /api/health`` stays a liveness answer that touches nothing. ``GET /api/health/ready`` runs the named
checks here, in parallel, each with its own timeout, and keeps the answer for ``ttl`` seconds: the route is
anonymous (load balancers and probes call it), so however often it is asked, each dependency sees at most
one request per instance per ``ttl``, and concurrent askers share one run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import requests

from broker.errors import BrokerError

log = logging.getLogger(__name__)

DEFAULT_TTL = 10.0
CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    duration_ms: float
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": self.ok, "duration_ms": round(self.duration_ms, 1)}
        if self.problem:
            body["problem"] = self.problem
        return body


@dataclass(frozen=True)
class ReadinessReport:
    checks: tuple[CheckResult, ...]
    checked_at: float

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not_ready",
            "checks": {c.name: c.to_json() for c in self.checks},
        }


class Readiness:
    """Named checks (each a callable that raises when its dependency is not usable), cached briefly."""

    def __init__(
        self,
        checks: Mapping[str, Callable[[], None]],
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = CHECK_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks = dict(checks)
        self.ttl = ttl
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._last: ReadinessReport | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._checks)), thread_name_prefix="readiness")
        self.runs = 0

    def report(self) -> ReadinessReport:
        last = self._last
        if last is not None and self._clock() - last.checked_at < self.ttl:
            return last
        with self._lock:
            last = self._last
            if last is not None and self._clock() - last.checked_at < self.ttl:
                return last
            self._last = self._run()
            return self._last

    def _run(self) -> ReadinessReport:
        self.runs += 1
        futures = {name: self._pool.submit(_timed, name, check) for name, check in self._checks.items()}
        results = []
        for name, future in futures.items():
            try:
                results.append(future.result(timeout=self.timeout))
            except FutureTimeout:
                results.append(CheckResult(name, False, self.timeout * 1000, "timed out"))
        report = ReadinessReport(tuple(results), self._clock())
        log.info(
            "health.ready ready=%s %s",
            report.ready,
            " ".join(f"{c.name}={'ok' if c.ok else 'failed'}" for c in results),
        )
        return report

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _timed(name: str, check: Callable[[], None]) -> CheckResult:
    started = time.perf_counter()
    try:
        check()
    except BrokerError as exc:
        return CheckResult(name, False, (time.perf_counter() - started) * 1000, exc.code)
    except Exception as exc:  # a dependency failing in any way is "not ready", named, never a 500
        log.warning("health.ready check=%s error=%s", name, exc.__class__.__name__)
        return CheckResult(name, False, (time.perf_counter() - started) * 1000, exc.__class__.__name__)
    return CheckResult(name, True, (time.perf_counter() - started) * 1000)


def authority_metadata_check(authority_host: str, tenant: str, session: requests.Session) -> Callable[[], None]:
    """Entra ID's OpenID metadata for ``tenant`` answers with a token endpoint."""
    url = f"{authority_host.rstrip('/')}/{tenant}/v2.0/.well-known/openid-configuration"

    def check() -> None:
        response = session.get(url, timeout=CHECK_TIMEOUT)
        response.raise_for_status()
        if "token_endpoint" not in response.json():
            raise ValueError("no token_endpoint in the metadata")

    return check
