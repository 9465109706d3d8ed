"""Shared fixtures: Azurite, the sandbox (Entra ID, managed identity, Key Vault, Defender, Graph) and a
live broker served by uvicorn over real HTTP.

The broker reaches the stand-ins only through its ordinary settings and the standard CA-bundle
variables, exactly as it would reach Azure.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import uvicorn

from broker import wiring
from broker.http.app import create_app
from broker.incidents.upstream import RetryPolicy
from broker.settings import Settings
from broker.wiring import Container
from sandbox.azurite import start_azurite
from sandbox.directory import DEMO_TENANTS
from sandbox.server import Sandbox

ROOT = Path(__file__).resolve().parent.parent
INSTANT = RetryPolicy(instant=True)  # waits become deferrals (see RetryPolicy)
DEFENDER = "https://api.security.microsoft.com/.default"
GRAPH = "https://graph.microsoft.com/.default"


def loopback_socket() -> socket.socket:
    """A listening loopback socket made with IPPROTO_TCP (plain socket() left Nagle on: 44 ms stalls)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The connection string of a session-wide Azurite."""
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server.connection_string
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The stand-ins for the Microsoft cloud, with the CA bundle and managed identity in the environment."""
    box = Sandbox(tmp_path_factory.mktemp("sandbox"))
    box.start()
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("AZURE_", "MSI_")) or name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
            del os.environ[name]
    env = box.env()
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
        os.environ[name] = env[name]
    try:
        yield box
    finally:
        os.environ.clear()
        os.environ.update(saved)
        box.stop()


@pytest.fixture(autouse=True)
def _fresh_sandbox_state(request: pytest.FixtureRequest) -> None:
    """Faults and latency never leak from one test into the next."""
    if "sandbox" in request.fixturenames:
        box: Sandbox = request.getfixturevalue("sandbox")
        box.recorder.clear_faults()
        for service in ("entra", "kv", "mi", "defender", "graph"):
            box.recorder.set_latency(service, 0.0)


def broker_environment(box: Sandbox, connection_string: str, **overrides: str) -> dict[str, str]:
    """The settings a broker under test runs with: the sandbox's, Azurite, and a fresh storage prefix."""
    env = dict(box.env())
    env.update(
        {
            "AzureWebJobsStorage": connection_string,
            "STORAGE_PREFIX": "t" + uuid.uuid4().hex[:12],
            "CALLER_AUTH": "none",
            "SECRET_REFRESH_SECONDS": "300",
        }
    )
    env.update(overrides)
    return env


class BrokerServer:
    """A broker served by uvicorn in a thread on a loopback socket, and an HTTP client for it."""

    def __init__(self, container: Container, *, sock: socket.socket | None = None) -> None:
        self.container = container
        self._sock = sock or loopback_socket()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(lambda: container), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)

    def start(self) -> BrokerServer:
        self.container.audit.start()
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the broker did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        self.container.close()

    def token(self, tenant: str, scope: str = DEFENDER, **extra: Any) -> httpx.Response:
        headers = extra.pop("headers", {})
        return self.client.post("/api/token", json={"tenant": tenant, "scope": scope, **extra}, headers=headers)


def build_container(
    box: Sandbox,
    connection_string: str,
    *,
    tenants: bool = False,
    retry: RetryPolicy | None = None,
    clock: Callable[[], float] = time.time,
    **overrides: str,
) -> Container:
    """The one way tests build the broker: the composition root (``wiring.build``) with the sandbox's
    settings, Azurite and a fresh storage prefix (``overrides`` win). ``tenants`` registers the sandbox's
    demo tenants; ``retry`` and ``clock`` are the root's seams."""
    env = broker_environment(box, connection_string, **overrides)
    container = wiring.build(Settings.from_environ(env), bind_host="127.0.0.1", retry=retry, clock=clock)
    if tenants:  # only these: the directory also holds every tenant earlier tests added, and they add up
        for tenant in box.directory.customer_tenants():
            if tenant.name in DEMO_TENANTS:
                container.tenants.add(tenant.name, tenant.tenant_id)
    return container


def start_broker(
    box: Sandbox,
    connection_string: str,
    *,
    tenants: bool = True,
    retry: RetryPolicy | None = None,
    clock: Callable[[], float] = time.time,
    **overrides: str,
) -> BrokerServer:
    """A broker from :func:`build_container`, served over real HTTP."""
    container = build_container(box, connection_string, tenants=tenants, retry=retry, clock=clock, **overrides)
    return BrokerServer(container).start()


@pytest.fixture
def broker(sandbox: Sandbox, azurite: str) -> Iterator[BrokerServer]:
    """A fresh broker (own storage prefix, cold caches) with the sandbox's demo tenants registered."""
    server = start_broker(sandbox, azurite)
    try:
        yield server
    finally:
        server.stop()


def trusting_session(box: Sandbox) -> requests.Session:
    """A requests session that trusts the sandbox CA whatever the environment says (use it as a context)."""
    session = requests.Session()
    session.trust_env = False
    session.verify = box.ca_bundle
    return session


def decode_claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified (for assertions)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
