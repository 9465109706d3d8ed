"""``Sandbox``: every stand-in on its own loopback port, served from one background thread.

One thread runs one asyncio loop with one ``uvicorn.Server`` per service:

========== ======= ===========================================================
service    scheme  what
========== ======= ===========================================================
entra      https   OIDC discovery, JWKS, token endpoint (``sandbox.entra``)
kv         https   Key Vault secrets (``sandbox.keyvault``)
mi         http    App Service managed-identity endpoint (``sandbox.managed_identity``)
defender   https   Defender XDR incidents API (``sandbox.security``)
graph      https   Graph security incidents API (``sandbox.security``)
control    http    ``/_sandbox/...`` control plane (``sandbox.control``)
========== ======= ===========================================================

Listening sockets are made with ``IPPROTO_TCP`` (a plain ``socket.socket()`` leaves Nagle's algorithm
interacting with delayed ACKs: ~44 ms per response) and bound before serving, so ports are known up
front. ``env()`` gives the broker's ordinary settings pointing at the stand-ins.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from sandbox.ca import SandboxCA, create_ca
from sandbox.control import create_control_app
from sandbox.directory import DEFENDER_RESOURCE, GRAPH_RESOURCE, Directory
from sandbox.entra import create_entra_app
from sandbox.keyvault import create_keyvault_app
from sandbox.managed_identity import MI_PATH, create_managed_identity_app
from sandbox.security.apis import create_defender_app, create_graph_app
from sandbox.security.control import security_control_routes
from sandbox.security.world import IncidentWorld
from sandbox.state import CountHosts, Recorder

log = logging.getLogger(__name__)

HTTPS_SERVICES = frozenset({"entra", "kv", "defender", "graph"})
DEMO_INCIDENTS_PER_TENANT = 20
# seed_tenant spaces incidents 30 s - 1 h apart and updates them up to 2 h later: 20 fit in under 23 h.
LIVE_SEED_SPAN = 2 * 86_400


def _listen(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


class _StandInServer(uvicorn.Server):
    """uvicorn, minus a 30 s stall at shutdown.

    uvicorn closes idle connections gracefully; a TLS connection whose client already left without
    sending ``close_notify`` then waits ``ssl_shutdown_timeout`` (30 s) for it. Idle connections are
    aborted instead; connections in the middle of a request still finish normally.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if transport is not None and (cycle is None or cycle.response_complete):
                transport.abort()
        await asyncio.sleep(0.01)  # let connection_lost run for the aborted ones
        await super().shutdown(sockets=sockets)


class Sandbox:
    """Local Entra ID, managed identity, Key Vault, Defender and Graph, with a control plane.

    ``Sandbox(state_dir).start()`` … ``.stop()`` (or use it as a context manager). ``state_dir`` receives
    the CA files; ``seed`` builds the demo world (see ``Directory.seed``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        seed: bool = True,
        host: str = "127.0.0.1",
        directory: Directory | None = None,
        recorder: Recorder | None = None,
        live: bool = False,
        activity_per_minute: float = 0.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.recorder = recorder or Recorder()
        self.directory = directory or Directory()
        self.seeded = seed
        #: Seed the demo incidents over the last days (not from the fixed 2024 start tests rely on).
        self.live = live
        #: New and updated incidents per minute in each demo tenant, while running (0: none).
        self.activity_per_minute = activity_per_minute
        self._activity_stop = threading.Event()
        self._activity: threading.Thread | None = None
        if seed:
            self.directory.seed()
        self.identity_header = secrets.token_urlsafe(24)
        self.incidents = IncidentWorld()
        self.urls: dict[str, str] = {}
        self.ca: SandboxCA | None = None
        self._servers: list[_StandInServer] = []
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Sandbox:
        if self._thread is not None:
            raise RuntimeError("sandbox already started")
        self.ca = create_ca(self.state_dir)
        apps = self._build_apps()
        for name in apps:
            sock = _listen(self.host)
            self._sockets.append(sock)
            scheme = "https" if name in HTTPS_SERVICES else "http"
            self.urls[name] = f"{scheme}://{self.host}:{sock.getsockname()[1]}"
        self.directory.authority_host = self.urls["entra"]

        for name, app in apps.items():
            tls: dict[str, Any] = {}
            if name in HTTPS_SERVICES:
                tls = {"ssl_certfile": str(self.ca.cert_path), "ssl_keyfile": str(self.ca.key_path)}
            config = uvicorn.Config(
                app,
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
                server_header=False,
                **tls,
            )
            self._servers.append(_StandInServer(config))

        self._thread = threading.Thread(target=self._run, name="sandbox-servers", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not all(s.started for s in self._servers):
            if self._failure is not None or not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop()
                raise RuntimeError("sandbox failed to start") from failure
            time.sleep(0.005)
        if self.activity_per_minute > 0 and self.seeded:
            self._activity_stop.clear()
            self._activity = threading.Thread(target=self._simulate, name="sandbox-activity", daemon=True)
            self._activity.start()
        log.info("sandbox started %s", " ".join(f"{k}={v}" for k, v in self.urls.items()))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut every server down and join the thread (idempotent)."""
        self._activity_stop.set()
        if self._activity is not None:
            self._activity.join(timeout)
            self._activity = None
        for server in self._servers:
            server.should_exit = True
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                for server in self._servers:
                    server.force_exit = True
                thread.join(timeout)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._servers.clear()
        self._thread = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve_all())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._failure = exc
            log.exception("sandbox servers failed")

    async def _serve_all(self) -> None:
        async def serve(server: _StandInServer, sock: socket.socket) -> None:
            try:
                await server.serve(sockets=[sock])
            except BaseException as exc:
                self._failure = exc
                for other in self._servers:
                    other.should_exit = True
                raise

        await asyncio.gather(
            *(serve(server, sock) for server, sock in zip(self._servers, self._sockets, strict=True)),
            return_exceptions=True,
        )

    def _build_apps(self) -> dict[str, Any]:
        d, r = self.directory, self.recorder
        apps: dict[str, Any] = {
            "entra": create_entra_app(d, r),
            "kv": create_keyvault_app(d, r),
            "mi": create_managed_identity_app(d, r, self.identity_header),
        }
        verify = self._verify_for_cloud
        apps["defender"] = CountHosts(create_defender_app(self.incidents, r, verify), "defender", r)
        apps["graph"] = CountHosts(create_graph_app(self.incidents, r, verify), "graph", r)
        if self.seeded:
            start = None
            if self.live:  # the last two days, ending before now, so a 30-day lookback sees them all
                start = datetime.fromtimestamp(time.time() - LIVE_SEED_SPAN, UTC)
            for tenant in d.customer_tenants():
                self.incidents.seed_tenant(tenant.tenant_id, DEMO_INCIDENTS_PER_TENANT, start=start)
        apps["control"] = create_control_app(d, r, self.env, security_control_routes(self.incidents))
        return apps

    def _simulate(self) -> None:
        """Every tenant gets a few new and updated incidents, spread over each minute."""
        interval = 60.0 / self.activity_per_minute
        tenants = [t.tenant_id for t in self.directory.customer_tenants()]
        while not self._activity_stop.wait(interval):
            for tenant_id in tenants:
                created, changed = self.incidents.simulate_activity(tenant_id, new=1, updated=1)
                log.info("sandbox.activity tenant=%s new=%s updated=%s", tenant_id, created, changed)

    def _verify_for_cloud(self, token: str, audience: Any) -> dict[str, Any]:
        """The security stand-ins name the public resources; in another cloud's shape, expect its own."""
        shape = self.directory.shape
        renamed = {DEFENDER_RESOURCE: shape.defender_resource, GRAPH_RESOURCE: shape.graph_resource}
        wanted = renamed.get(audience, audience) if isinstance(audience, str) else audience
        return self.directory.verify_access_token(token, wanted)

    # -- what clients need ---------------------------------------------------------------------------

    @property
    def control_url(self) -> str:
        return self.urls["control"]

    @property
    def ca_bundle(self) -> str:
        if self.ca is None:
            raise RuntimeError("sandbox not started")
        return str(self.ca.bundle_path)

    def env(self) -> dict[str, str]:
        """The broker's settings (and the standard CA variables) pointing at the stand-ins."""
        if not self.urls:
            raise RuntimeError("sandbox not started")
        d = self.directory
        env = {
            "AZURE_CLOUD": d.shape.name,
            "AUTHORITY_HOST": self.urls["entra"],
            "KEY_VAULT_URL": self.urls["kv"],
            "IDENTITY_ENDPOINT": self.urls["mi"] + MI_PATH,
            "IDENTITY_HEADER": self.identity_header,
            "BROKER_CLIENT_ID": d.broker.client_id,
            "CLIENT_SECRET_NAME": d.client_secret_name,
            "CLIENT_CERTIFICATE_NAME": d.client_certificate_name,
            "AUDIT_KEY_NAME": d.audit_key_name,
            "MANAGED_IDENTITY_CLIENT_ID": d.broker_identity.client_id,
            "CALLER_TENANT_ID": d.home.tenant_id,
            "CALLER_AUDIENCE": d.broker_audience,
            "REQUESTS_CA_BUNDLE": self.ca_bundle,
            "CURL_CA_BUNDLE": self.ca_bundle,
            "SSL_CERT_FILE": self.ca_bundle,
        }
        if "defender" in self.urls:
            env["DEFENDER_API_URL"] = self.urls["defender"]
            env["GRAPH_API_URL"] = self.urls["graph"] + "/v1.0"
        return env
