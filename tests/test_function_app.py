"""The Functions app indexes the way the worker indexes it, from an empty environment and from a clean venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The worker imports function_app, finds its one FunctionRegister and calls get_functions() once (a second
# call raises), then reads each function's raw bindings. This script does the same and prints them.
INDEX_SCRIPT = """
import json, sys
import azure.functions as func
import function_app
apps = [v for v in vars(function_app).values() if isinstance(v, func.FunctionRegister)]
assert len(apps) == 1, apps
out = {}
for f in apps[0].get_functions():
    out[f.get_function_name()] = {
        "bindings": [json.loads(b) for b in f.get_raw_bindings()],
        "http_type": getattr(f, "http_type", None),
        "retry": f.get_settings_dict("retry_policy"),
    }
json.dump(out, sys.stdout)
"""


def _index(python: str) -> dict[str, Any]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(
        [python, "-c", INDEX_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def functions() -> dict[str, Any]:
    return _index(sys.executable)


def test_http_function_is_one_anonymous_catch_all_route(functions: dict[str, Any]) -> None:
    """The ASGI app is registered as one anonymous HTTP function whose route hands every path to FastAPI."""
    http = functions["broker_http"]
    trigger = next(b for b in http["bindings"] if b["type"] == "httpTrigger")
    assert trigger["route"] == "/{*route}"
    assert trigger["authLevel"].lower() == "anonymous"
    assert {"GET", "POST"} <= {m.upper() for m in trigger["methods"]}
    assert any(b["type"] == "http" and b["direction"] == "OUT" for b in http["bindings"])
    assert http["http_type"] == "asgi"


def test_host_json_gives_fastapi_the_whole_path() -> None:
    """routePrefix "" is required: with the default "api" the host builds "api//{*route}" and refuses to start."""
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == ""
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"


def test_importing_function_app_reads_no_settings() -> None:
    """Import with an empty environment: no settings are needed until the first request."""
    proc = subprocess.run(
        [sys.executable, "-c", "import function_app, broker.wiring as w; assert w.current() is None"],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_requirements_txt_alone_is_enough_to_index(tmp_path: Path) -> None:
    """A venv built from requirements.txt only (what Azure builds) imports and indexes function_app."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = str(target / "bin" / "python")
    install = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(ROOT / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    indexed = _index(python)
    assert "broker_http" in indexed
    dev_only = subprocess.run([python, "-c", "import pytest"], capture_output=True, text=True, timeout=60, check=False)
    assert dev_only.returncode != 0, "the clean venv must not contain dev dependencies"


def test_incident_sync_timer_and_queue_trigger_are_indexed(functions: dict[str, Any]) -> None:
    """The timer reads its schedule from INCIDENT_SYNC_SCHEDULE and never runs at startup; the queue trigger
    listens on INCIDENT_SYNC_QUEUE through the AzureWebJobsStorage connection (identity-based in Flex)."""
    timer = next(b for b in functions["incident_sync_timer"]["bindings"] if b["type"] == "timerTrigger")
    assert timer["schedule"] == "%INCIDENT_SYNC_SCHEDULE%"
    assert timer["runOnStartup"] is False
    queue = next(b for b in functions["incident_sync_tenant"]["bindings"] if b["type"] == "queueTrigger")
    assert queue["queueName"] == "%INCIDENT_SYNC_QUEUE%"
    assert queue["connection"] == "AzureWebJobsStorage"
    assert queue["name"] == "msg"
    assert queue["direction"] == "IN"
