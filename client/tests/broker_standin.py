"""A loopback stand-in for the broker's ``POST /api/token``, for the client's own tests.

It behaves as the broker does towards a client: it requires a bearer token, answers a JSON body with a
token for the tenant and scope asked (a new value each time: the tests see what came from the cache), and
serves the answers a test queued first (refusals, throttling, nonsense). It records every request (headers,
body, arrival time) so a test can assert what the client sent and how often.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions

TENANT_GUID = "0b3f1c5e-7a2d-4e8f-9c61-5d2a8b7e4f10"
CALLER_TOKEN = "caller-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
SCOPE = "https://graph.microsoft.com/.default"


@dataclass(frozen=True)
class Seen:
    at: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/problem+json"


def problem(status: int, code: str, **headers: str) -> Answer:
    body = {"type": f"urn:partner-token-broker:problem:{code}", "title": code, "status": status, "code": code}
    return Answer(status, json.dumps({**body, "detail": f"refused: {code}"}).encode(), dict(headers))


class StandInBroker:
    def __init__(self, *, tenants: dict[str, str] | None = None, lifetime: int = 3600, delay: float = 0.0) -> None:
        self.tenants = tenants or {"contoso": TENANT_GUID}
        self.lifetime = lifetime
        self.delay = delay
        self.seen: list[Seen] = []
        self.queued: deque[Answer] = deque()
        self._issued = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> StandInBroker:
        self._thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def queue(self, *answers: Answer) -> None:
        self.queued.extend(answers)

    def answer(self, seen: Seen) -> Answer:
        with self._lock:
            self.seen.append(seen)
            if self.queued:
                return self.queued.popleft()
            self._issued += 1
            n = self._issued
        if seen.headers.get("authorization") != f"Bearer {CALLER_TOKEN}":
            return problem(401, "unauthenticated")
        tenant = str(seen.body.get("tenant", ""))
        guid = self.tenants.get(tenant.lower(), tenant.lower() if tenant.lower() in self.tenants.values() else None)
        if guid is None:
            return problem(403, "forbidden")
        expires_on = int(time.time()) + self.lifetime
        token = {
            "access_token": f"issued-token-{n}-{uuid.uuid4().hex}",
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "expires_on": expires_on,
            "tenant_id": guid,
            "scope": seen.body.get("scope"),
        }
        return Answer(200, json.dumps(token).encode(), {"Cache-Control": "no-store"}, "application/json")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        broker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("latin-1")}
                seen = Seen(time.monotonic(), self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if broker.delay:
                    time.sleep(broker.delay)
                answer = broker.answer(seen)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.send_header("X-Request-Id", uuid.uuid4().hex)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class CallerCredential:
    """The caller's own credential: a fixed token for the broker's scope, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        return AccessToken(CALLER_TOKEN, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        self.calls += 1
        return AccessTokenInfo(CALLER_TOKEN, int(time.time()) + 3600)


class AsyncCallerCredential:
    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        return AccessToken(CALLER_TOKEN, int(time.time()) + 3600)

    async def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        self.calls += 1
        return AccessTokenInfo(CALLER_TOKEN, int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> AsyncCallerCredential:
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.close()
