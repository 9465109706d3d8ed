"""Telemetry: nothing at all without APPLICATIONINSIGHTS_CONNECTION_STRING; with it, spans for requests and
every dependency, and no token, secret or consent state in any span."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
# Loopback only: the exporter's ingestion and live endpoints are a closed local port; statsbeat, the SDK's
# remote settings and the Azure VM metadata detector (all of which would leave the machine) are off.
CONNECTION = (
    "InstrumentationKey=5f1c2a9e-7d3b-4e8a-9c61-2b0f4d7e8a13;"
    "IngestionEndpoint=http://127.0.0.1:9/;LiveEndpoint=http://127.0.0.1:9/"
)
QUIET = {
    "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
    "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel",
}


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "APPLICATIONINSIGHTS_", "OTEL_"))}
    env.update(QUIET)
    env.update(extra)
    return env


def test_without_a_connection_string_nothing_is_configured_or_wrapped(tmp_path: Path) -> None:
    """Importing function_app and serving a request load neither the distro nor the SDK, set no provider
    and wrap nothing (FastAPI itself imports the inert opentelemetry-api when it is installed)."""
    script = (
        "import asyncio, sys, httpx\n"
        "import function_app\n"
        "from broker.http.app import create_app\n"
        "async def main():\n"
        "    transport = httpx.ASGITransport(app=create_app())\n"
        "    async with httpx.AsyncClient(transport=transport, base_url='http://127.0.0.1') as client:\n"
        "        assert (await client.get('/api/health')).status_code == 200\n"
        "asyncio.run(main())\n"
        "import requests\n"
        "from opentelemetry import trace\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.instrumentation', 'azure.monitor')))\n"
        "print(loaded, type(trace.get_tracer_provider()).__name__, hasattr(requests.Session.send, '__wrapped__'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # no local.settings.json here
        env={**_child_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] ProxyTracerProvider False"


def test_spans_cover_requests_and_dependencies_and_carry_no_secret(azurite: str) -> None:
    """Tokens, consent, sync and readiness traced: server spans, Entra ID, Key Vault, Storage, Defender and
    Graph dependencies; no token, client secret or consent state in any span name, attribute or event."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "telemetry_probe.py")],
        cwd=ROOT,
        env={
            **_child_env(APPLICATIONINSIGHTS_CONNECTION_STRING=CONNECTION, AZURITE_CONNECTION_STRING=azurite),
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    spans: list[dict[str, Any]] = result["spans"]
    secrets: list[str] = result["secrets"]
    assert len(secrets) >= 5
    assert all(len(s) >= 20 for s in secrets)

    def strings(span: dict[str, Any]) -> list[str]:
        values = [span["name"]]
        for attributes in [span["attributes"], *span["events"]]:
            for key, value in attributes.items():
                values.append(key)
                values.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        return values

    leaks = [(span["name"], s[:12]) for span in spans for s in secrets for text in strings(span) if s in text]
    assert leaks == []

    server = [s for s in spans if s["kind"] == "SERVER"]
    routes = {str(s["attributes"].get("http.route") or s["name"]) for s in server}
    assert any("/api/token" in r for r in routes), routes
    assert any("/api/consent/callback" in r for r in routes), routes
    assert any("/api/health/ready" in r for r in routes), routes
    assert not any("state=" in text for s in server for text in strings(s))

    def hosts(span: dict[str, Any]) -> set[str]:
        found = set()
        for key in ("http.url", "url.full", "server.address", "net.peer.name"):
            value = span["attributes"].get(key)
            if isinstance(value, str):
                parts = urlsplit(value) if "://" in value else None
                found.add(f"{parts.hostname}:{parts.port}" if parts else value)
        port = span["attributes"].get("server.port") or span["attributes"].get("net.peer.port")
        if port and span["attributes"].get("server.address"):
            found.add(f"{span['attributes']['server.address']}:{port}")
        return found

    outgoing = [s for s in spans if s["kind"] == "CLIENT"]
    seen = set().union(*(hosts(s) for s in outgoing))
    for service, url in result["urls"].items():
        parts = urlsplit(url)
        assert f"{parts.hostname}:{parts.port}" in seen, (service, seen)
    azurite_table = urlsplit(next(p.split("=", 1)[1] for p in azurite.split(";") if p.startswith("TableEndpoint=")))
    assert f"{azurite_table.hostname}:{azurite_table.port}" in seen, seen
