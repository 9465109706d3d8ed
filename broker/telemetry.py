"""Telemetry: OpenTelemetry to Application Insights through azure-monitor-opentelemetry, or nothing at all.

With ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set, ``setup`` calls Microsoft's distro
(``configure_azure_monitor``) once per process, which gives:

- **requests**: a server span per HTTP request, from ``broker.http.tracing.TracedApp`` around the FastAPI
  app (the app object is built when ``function_app`` is imported, before any setting is read, so the
  FastAPI instrumentor's class patch would come too late; the ASGI middleware it uses is applied there
  instead, on first use);
- **dependencies**: Entra ID (MSAL and the Defender/Graph client use ``requests``: the requests
  instrumentation), Key Vault and Storage (the Azure SDKs' own tracing, ``azure_sdk``), Defender and
  Graph (``requests``);
- **the existing log lines**: the ``broker`` loggers, exported as traces.

Without it nothing is imported (the distro sets process-wide state on import) and nothing is wrapped:
``TracedApp`` then costs one dictionary lookup per request.

What spans may carry: no query string of an incoming request ever reaches a span (the consent callback's
``state`` is a bearer of trust until it is used), because ``TracedApp`` hides the query from the
OpenTelemetry middleware and hands it back to the app (FastAPI's own, newer span support records the
query, so it is switched off). Outgoing URLs carry no secrets (tokens travel in headers and form bodies,
which the instrumentations do not record). A test drives every path through an in-memory exporter and
looks for tokens and secrets in every attribute.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

CONNECTION_STRING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
#: The distro's defaults include web frameworks the broker does not use; FastAPI is wrapped by TracedApp.
INSTRUMENTATION_OPTIONS: dict[str, dict[str, bool]] = {
    "azure_sdk": {"enabled": True},
    "requests": {"enabled": True},
    "fastapi": {"enabled": False},
    "django": {"enabled": False},
    "flask": {"enabled": False},
    "psycopg2": {"enabled": False},
    "httpx": {"enabled": False},
    "urllib": {"enabled": False},
    "urllib3": {"enabled": False},
}

_lock = threading.Lock()
_state: dict[str, bool] = {}


def setup(connection_string: str | None, *, span_processors: Sequence[Any] = (), **distro_options: Any) -> bool:
    """Configure OpenTelemetry once if ``connection_string`` is set; True when telemetry is on.

    ``span_processors`` and ``distro_options`` go to ``configure_azure_monitor`` (tests add an in-memory
    exporter and switch live metrics off); the app passes neither.
    """
    if _state.get("configured"):
        return True
    if not connection_string:
        return False
    with _lock:
        if not _state.get("configured"):
            from azure.monitor.opentelemetry import configure_azure_monitor

            configure_azure_monitor(
                connection_string=connection_string,
                logger_name="broker",
                instrumentation_options=INSTRUMENTATION_OPTIONS,
                span_processors=list(span_processors),
                **distro_options,
            )
            _state["configured"] = True
            log.info("telemetry.start exporter=azure_monitor")
    return True


def enabled() -> bool:
    """Whether telemetry is on; the first call looks at the environment (local.settings.json included)."""
    if "checked" not in _state:
        from broker.settings import read_environment

        try:
            setup(read_environment().get(CONNECTION_STRING))
        except Exception:  # telemetry must never take the app down
            log.exception("telemetry.start outcome=failed")
        _state["checked"] = True
    return bool(_state.get("configured"))
