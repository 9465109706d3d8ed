"""Refusals before authentication, counted per client address and interval instead of one record each.

Anyone can send a request without a valid token; recording each as its own chained record would let a
flood bury (and, in best effort, push out) the records that matter. ``RefusalTally`` keeps a count per
(client address, action, code, reason) and emits one record per key and interval with ``count`` set.
It holds at most ``max_clients`` addresses and ``max_kinds`` kinds per address in an interval; the
rest is counted under client ``other`` / reason ``other``, so the rows an interval produces are bounded
however many addresses and kinds a flood uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from broker.audit.records import AuditRecord

INTERVAL_SECONDS = 10.0
MAX_CLIENTS = 256
MAX_KINDS = 8

_Key = tuple[str, str, str, str]


class RefusalTally:
    def __init__(
        self,
        emit: Callable[[AuditRecord], None],
        *,
        interval: float = INTERVAL_SECONDS,
        max_clients: int = MAX_CLIENTS,
        max_kinds: int = MAX_KINDS,
    ) -> None:
        self._emit = emit
        self.interval = interval
        self.max_clients = max_clients
        self.max_kinds = max_kinds
        self._lock = threading.Lock()
        self._counts: dict[_Key, int] = {}
        self._kinds: dict[str, int] = {}
        self._timer: threading.Timer | None = None
        self.refusals = 0

    def add(self, client: str, action: str, code: str, reason: str) -> None:
        with self._lock:
            self.refusals += 1
            if client not in self._kinds and len(self._kinds) >= self.max_clients:
                client = "other"
            key = (client, action, code, reason)
            if key not in self._counts:
                if self._kinds.get(client, 0) >= self.max_kinds:
                    key = (client, action, code, "other")
                else:
                    self._kinds[client] = self._kinds.get(client, 0) + 1
            self._counts[key] = self._counts.get(key, 0) + 1
            if self._timer is None:
                self._timer = threading.Timer(self.interval, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> int:
        """Emit the interval's counts now; returns how many records were emitted."""
        with self._lock:
            counts, self._counts, self._kinds = self._counts, {}, {}
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        ended = time.time()
        for (client, action, code, reason), count in counts.items():
            self._emit(
                AuditRecord(
                    action=action,
                    outcome="denied",
                    code=code,
                    reason=reason,
                    client=client,
                    count=count,
                    request_id=f"interval-{int(ended)}",
                )
            )
        return len(counts)
