"""Per-request summary lines (``token.issue outcome=… code=… tenant=…``), handed to ``logging`` in batches.

One ``key=value`` line per request is what operators query (docs/operations.md). Emitting each as a log
record of its own cost more than a third of a cached token request on this machine (``logging`` builds a
record, finds the caller's frame, formats a time, takes the handler's lock and writes; ``bench/token.py``
prints the cost with and without the line). So a line is formatted on the request path, cheaply, and up
to ``MAX_LINES`` lines go out as one log record, one line per line of its message, at most
``MAX_DELAY_SECONDS`` after the first of them; ``flush_all`` (the container's ``close``) writes the rest.
Every line starts with its event name, so a query splits the message on newlines (``mv-expand``) and
parses each line as before. ``broker.http.summary`` formats and escapes the lines.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_LINES = 64
MAX_DELAY_SECONDS = 0.25
_logs: dict[str, SummaryLog] = {}
_logs_lock = threading.Lock()


class SummaryLog:
    """Summary lines of one event, batched into log records of ``logger``."""

    def __init__(self, logger: logging.Logger, event: str) -> None:
        self.logger = logger
        self.event = event
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._first = 0.0
        self._timer: threading.Timer | None = None

    def add(self, line: str) -> None:
        """Queue one line (``<event> key=value ...``, already escaped: ``broker.http.summary``)."""
        with self._lock:
            self._lines.append(line)
            if len(self._lines) == 1:
                self._first = time.monotonic()
                if self._timer is None:
                    self._timer = threading.Timer(MAX_DELAY_SECONDS, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
            full = len(self._lines) >= MAX_LINES or time.monotonic() - self._first >= MAX_DELAY_SECONDS
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if lines:
            self.logger.info("%s", "\n".join(lines))


def summary_log(logger: logging.Logger, event: str) -> SummaryLog:
    """The process's batcher for ``event`` lines (one per event, shared by every app in the process)."""
    with _logs_lock:
        found = _logs.get(event)
        if found is None:
            found = _logs[event] = SummaryLog(logger, event)
        return found


def flush_all() -> None:
    """Write every buffered summary line now (at shutdown)."""
    with _logs_lock:
        logs = list(_logs.values())
    for log in logs:
        log.flush()
