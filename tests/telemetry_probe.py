"""Run in a child process by tests/test_telemetry.py: a broker with OpenTelemetry on (an in-memory
exporter beside the Azure Monitor one, which points at a closed loopback port), driven through every
kind of request and dependency; prints the finished spans and every secret the run handled, as JSON.

A child process because ``configure_azure_monitor`` sets process-wide providers and instruments
``requests`` and the Azure SDKs for good; the test session must not inherit that.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import DEFENDER, GRAPH, BrokerServer, build_container, loopback_socket

from broker import telemetry
from broker.changes import CLI_OPERATOR
from sandbox.server import Sandbox


def main() -> None:
    connection = os.environ["APPLICATIONINSIGHTS_CONNECTION_STRING"]
    exporter = InMemorySpanExporter()
    assert telemetry.setup(
        connection,
        span_processors=[SimpleSpanProcessor(exporter)],
        enable_live_metrics=False,
        disable_offline_storage=True,
        sampling_ratio=1.0,  # the distro's default samples 5 traces a second; here every span counts
    )
    with tempfile.TemporaryDirectory() as state, Sandbox(Path(state)) as box:
        for name, value in box.env().items():
            if name in (
                "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE",
                "SSL_CERT_FILE",
                "IDENTITY_ENDPOINT",
                "IDENTITY_HEADER",
            ):
                os.environ[name] = value
        sock = loopback_socket()
        callback = f"http://127.0.0.1:{sock.getsockname()[1]}/api/consent/callback"
        box.directory.add_redirect_uri(callback)
        container = build_container(
            box,
            os.environ["AZURITE_CONNECTION_STRING"],
            CONSENT_REDIRECT_URI=callback,
            APPLICATIONINSIGHTS_CONNECTION_STRING=connection,
        )
        contoso, fabrikam = (box.directory.tenant(n) for n in ("contoso", "fabrikam"))
        assert contoso is not None
        assert fabrikam is not None
        container.tenants.add("contoso", contoso.tenant_id)
        container.tenants.add("fabrikam", fabrikam.tenant_id, api="graph")
        server = BrokerServer(container, sock=sock).start()
        secrets: list[str] = [s.value for s in box.directory.broker.secrets]
        try:
            for tenant, scope in (("contoso", DEFENDER), ("fabrikam", GRAPH)):
                reply = server.token(tenant, scope)
                assert reply.status_code == 200, reply.text
                secrets.append(reply.json()["access_token"])
            container.incidents.run(container.tenants.resolve("contoso"), max_wait=5.0)
            container.incidents.run(container.tenants.resolve("fabrikam"), max_wait=5.0)
            newcomer = box.directory.add_customer_tenant("telemetry-newcomer", consented=False)
            box.incidents.seed_tenant(newcomer.tenant_id, 2)
            _, link = container.onboarding.start("newcomer", newcomer.tenant_id, by=CLI_OPERATOR)
            secrets.append(parse_qs(urlsplit(link.url).query)["state"][0])
            with httpx.Client(
                verify=ssl.create_default_context(cafile=box.ca_bundle), trust_env=False, follow_redirects=True
            ) as browser:
                page = browser.get(link.url)
            assert page.status_code == 200, page.text
            assert server.client.get("/api/health/ready").status_code == 200
            for tenant_id in (contoso.tenant_id, fabrikam.tenant_id, newcomer.tenant_id):
                for scope in (DEFENDER, GRAPH):
                    token = container.issuer.cached(tenant_id, scope)
                    if token is not None:
                        secrets.append(token.value)
        finally:
            server.stop()
        spans: list[dict[str, Any]] = []
        for span in exporter.get_finished_spans():
            spans.append(
                {
                    "name": span.name,
                    "kind": span.kind.name,
                    "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
                    "events": [{k: _plain(v) for k, v in (e.attributes or {}).items()} for e in span.events],
                }
            )
        urls = {name: box.urls[name] for name in ("entra", "kv", "defender", "graph")}
        print(json.dumps({"spans": spans, "secrets": secrets, "urls": urls}))


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


if __name__ == "__main__":
    main()
