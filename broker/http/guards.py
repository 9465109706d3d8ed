"""What must hold before any route runs: no cross-site request can change anything, and a development
broker (``CALLER_AUTH=none``) answers nobody but this machine.

A loopback bind alone does not keep a browser out. A web page on another site can

- make the browser POST a form to ``http://127.0.0.1:7071/...`` (a "simple" request: no preflight), and
- rebind its own DNS name to 127.0.0.1, after which the browser treats the broker as the page's own
  origin and lets the page read the answers (tokens) — but every such request carries the page's host
  name in ``Host``.

So, ``CrossSiteGuard``:

1. every state-changing request (anything but GET, HEAD, OPTIONS) must say ``Content-Type:
   application/json``, which a form cannot send and which makes a browser ask permission (a CORS
   preflight) that the broker never grants — ``415 unsupported_media_type`` otherwise, in every mode;
2. with ``CALLER_AUTH=none``, ``Host`` must name a loopback address (``localhost``, ``127.0.0.0/8``,
   ``[::1]``, any port) — ``403 host_not_allowed``; and an ``Origin`` header, when a browser sends one,
   must be a loopback origin too — ``403 origin_not_allowed`` (``Origin: null``, from sandboxed frames and
   files, is refused).

Under ``CALLER_AUTH=entra`` every request needs a bearer token, which a browser never attaches on its own,
so ``Host`` and ``Origin`` are not checked there (Azure's front ends set ``Host``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from broker.clouds import is_loopback_host
from broker.errors import BrokerError, HostNotAllowed, OriginNotAllowed, UnsupportedMediaType
from broker.wiring import Container

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CrossSiteGuard:
    """ASGI middleware; ``refuse`` sends the problem response (the app's own renderer)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        container: Callable[[], Container],
        refuse: Callable[[Send, BrokerError], Awaitable[None]],
        serves: Callable[[Scope], bool] = lambda _scope: True,
    ) -> None:
        self.app = app
        self.container = container
        self.refuse = refuse
        self.serves = serves

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                log.warning(
                    "http.refused code=%s method=%s path=%s diagnostic=%s",
                    error.code,
                    scope.get("method"),
                    scope.get("path"),
                    error.diagnostic,
                )
                await self.refuse(send, error)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> BrokerError | None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())}
        # A method no route serves at that path changes nothing: the router answers it (405 with Allow).
        if scope.get("method") not in SAFE_METHODS and self.serves(scope):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return UnsupportedMediaType(
                    "a request that changes anything must be Content-Type: application/json", diagnostic="not_json"
                )
        if not self._development():
            return None
        host = _hostname(headers.get("host", ""))
        if host is None or not is_loopback_host(host):
            return HostNotAllowed(diagnostic=f"host={headers.get('host', '')[:80]!r}")
        origin = headers.get("origin")
        if origin is not None:
            origin_host = urlsplit(origin).hostname if origin.startswith(("http://", "https://")) else None
            if origin_host is None or not is_loopback_host(origin_host):
                return OriginNotAllowed(diagnostic=f"origin={origin[:80]!r}")
        return None

    def _development(self) -> bool:
        try:
            return self.container().settings.caller_auth == "none"
        except BrokerError:
            return False  # not configured: the route answers that, and serves nothing


def _hostname(value: str) -> str | None:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), or None if malformed."""
    if not value:
        return None
    try:
        parts = urlsplit(f"//{value}")
        _ = parts.port  # a malformed port makes the whole header malformed
    except ValueError:
        return None
    return parts.hostname
