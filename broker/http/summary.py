"""One summary line per request, ``<event> key=value ...``, written by one helper every route uses.

The Functions logger drops ``extra=`` fields before Application Insights, so the line itself carries the
pairs. Many values come from the caller (a tenant reference, a principal in a path, a request id, the
detail of a refusal), so every value is escaped the same way: a plain value (letters, digits and
``._:/@+,-``, at most 300 characters) is written as it is; anything else is written as a JSON string
(cut to 300 characters), which escapes quotes, backslashes, control characters and everything outside
ASCII (``U+2028`` included). A value therefore can never add a pair of its own or start a new line.

Routes add fields to :func:`fields` as they learn them (the gate in :mod:`broker.http.access` adds the
caller, the tenant, the refusal reason and the audit reference); :func:`summarised` adds the outcome,
the error code, the duration and the request id, and queues the line when the request ends: lines reach
``logging`` in batches (``broker.requestlog``), one log record per request cost a third of a request.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import Request

from broker.errors import BrokerError, CallerError, RequestError
from broker.requestlog import summary_log

log = logging.getLogger(__name__)

MAX_VALUE_CHARS = 300
_PLAIN = re.compile(rf"[A-Za-z0-9._:/@+,-]{{1,{MAX_VALUE_CHARS}}}")


def escape(value: object) -> str:
    """``value`` as one logfmt value: as it is when plain, else a JSON string."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text[:MAX_VALUE_CHARS], ensure_ascii=True)


def format_pairs(pairs: Mapping[str, object]) -> str:
    """``key=value`` pairs joined by spaces, every value escaped (the keys are the broker's own)."""
    return " ".join(f"{key}={escape(value)}" for key, value in pairs.items())


def fields(request: Request) -> dict[str, Any]:
    """The request's summary fields, kept on ``request.state`` so every layer can add to them."""
    found: dict[str, Any] | None = getattr(request.state, "summary", None)
    if found is None:
        found = {}
        request.state.summary = found
    return found


def request_id(request: Request) -> str:
    """The request's id: the caller's ``X-Request-Id`` when it is a sane token, else a new one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum() and rid.isascii()):
            rid = uuid.uuid4().hex
        request.state.request_id = rid
    return str(rid)


def outcome_of(exc: BrokerError) -> str:
    """``denied`` when the caller or its request was refused, ``failed`` when the broker could not serve."""
    return "denied" if isinstance(exc, CallerError | RequestError) else "failed"


@asynccontextmanager
async def summarised(request: Request, event: str, **initial: object) -> AsyncIterator[dict[str, Any]]:
    """Log ``event`` and the request's fields once the body of the ``async with`` is done, however it ends.

    ``initial`` seeds the fields (``outcome`` is the success outcome); a ``BrokerError`` sets the outcome
    from its class and records its code and diagnostic; any other exception is a failure.
    """
    started = time.perf_counter()
    summary = fields(request)
    summary.update({"outcome": "ok", "code": "-", **initial})
    try:
        yield summary
    except BrokerError as exc:
        summary.update(outcome=outcome_of(exc), code=exc.code)
        if exc.diagnostic:
            summary["diagnostic"] = exc.diagnostic
        raise
    except Exception:
        summary.update(outcome="failed", code=BrokerError.code)
        raise
    finally:
        summary["duration_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
        summary["request_id"] = request_id(request)
        if log.isEnabledFor(logging.INFO):
            summary_log(log, event).add(f"{event} {format_pairs(summary)}")
