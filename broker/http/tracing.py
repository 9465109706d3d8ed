"""Request spans for the HTTP app when telemetry is on (``broker.telemetry``), with the query string hidden."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from broker import telemetry

_QUERY_KEY = "broker.query_string"


class TracedApp:
    """ASGI middleware: a server span per request when telemetry is on, with the query string hidden."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._traced: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not telemetry.enabled():
            await self.app(scope, receive, send)
            return
        if self._traced is None:
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

            self._traced = OpenTelemetryMiddleware(_RestoreQuery(self.app), exclude_spans=["receive", "send"])
        hidden = dict(scope)
        hidden[_QUERY_KEY] = scope.get("query_string", b"")
        hidden["query_string"] = b""
        await self._traced(hidden, receive, send)


class _RestoreQuery:
    """Inside the OpenTelemetry middleware: give the app back the query string it hid."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        restored = dict(scope)
        restored["query_string"] = restored.pop(_QUERY_KEY, b"")
        await self.app(restored, receive, send)
