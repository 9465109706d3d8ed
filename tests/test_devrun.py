"""make run: one command brings up Azurite, the sandbox and the broker, prints a curl that works, and
Ctrl-C stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sandbox.azurite import free_port, port_is_free

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_run_serves_a_working_curl_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "KEY_VAULT", "BROKER_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "devrun", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    curl = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("curl "):
            curl = line.strip()
            break
    try:
        assert curl, "".join(lines)
        assert f"http://127.0.0.1:{port}/api/token" in curl
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert body["token_type"] == "Bearer"
        assert body["access_token"].count(".") == 2
        assert any("tenant contoso" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped." in out
    assert port_is_free(port), "the broker is still listening"
    leftovers = subprocess.run(
        ["pgrep", "-f", f"broker serve --host 127.0.0.1 --port {port}"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""


def _first_run_commands() -> list[str]:
    """The README's second-terminal commands, exactly as written (one command per line)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- first-run: a test runs these commands as written -->", 1)[1]
    body = block.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


@pytest.mark.slow
def test_make_run_is_the_whole_system_and_the_readme_first_screen_works() -> None:
    """Under make run the timer and the queue trigger run: incidents reach /api/incidents within a minute
    and /api/sync/status shows the runs; the README's second-terminal commands work as written (the port
    aside); the session file fits the settings catalogue and host.json; stopping removes it."""
    from broker.settings import SETTING_NAMES, Settings
    from devrun.__main__ import HOST_VALUES, SESSION_DIR, SESSION_EXTRA

    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AZURE_", "KEY_VAULT", "BROKER_", "INCIDENT_SYNC", "CALLER_"))
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "devrun", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    try:
        while time.monotonic() - started < 120:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        assert any(line.startswith("mode: sandbox (no KEY_VAULT_URL") for line in lines), "".join(lines)
        reader.start()

        # The session file: Core Tools' shape, only known settings, every binding's setting, host.json's port.
        document = json.loads((SESSION_DIR / "local.settings.json").read_text())
        values = document["Values"]
        assert document["IsEncrypted"] is False
        assert document["Host"]["LocalHttpPort"] == port
        unknown = set(values) - SETTING_NAMES - set(HOST_VALUES) - set(SESSION_EXTRA)
        assert not unknown, unknown
        for name in ("INCIDENT_SYNC_SCHEDULE", "INCIDENT_SYNC_QUEUE", "AzureWebJobsStorage"):
            assert values.get(name), name  # %NAME% and connection settings of function_app's bindings
        assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
        host = json.loads((ROOT / "host.json").read_text())
        assert host["extensions"]["http"]["routePrefix"] == ""  # so the printed /api/... URLs hold there too
        settings = Settings.from_environ(values)
        assert settings.caller_auth == "entra"  # the Functions host serves authenticated callers only
        assert os.stat(SESSION_DIR / "env.sh").st_mode & 0o077 == 0

        commands = [c.replace("127.0.0.1:7071", f"127.0.0.1:{port}") for c in _first_run_commands()]
        assert len(commands) == 4, commands
        token = json.loads(_bash(commands[0]))
        assert token["token_type"] == "Bearer"
        assert token["access_token"].count(".") == 2

        deadline = started + 60
        incidents: list[object] = []
        while time.monotonic() < deadline and not incidents:
            incidents = json.loads(_bash(commands[1]))["value"]
            if not incidents:
                time.sleep(1)
        assert incidents, f"no incident within a minute of start:\n{''.join(lines[-40:])}"
        status = json.loads(_bash(commands[2]))
        contoso = next(t for t in status["tenants"] if t["tenant"] == "contoso")
        assert contoso["last_outcome"] == "complete"
        assert contoso["api_calls"]["total"] >= 1
        assert contoso["counts"]["stored"] >= len(incidents)
        listing = _bash(commands[3])
        assert "contoso" in listing
        assert "fabrikam" in listing
        assert any("invocation function=incident_sync_tenant outcome=succeeded" in x for x in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if reader.is_alive():
            reader.join(10)
        proc.stdout.close()
    assert proc.returncode == 0, "".join(lines[-40:])
    assert not (SESSION_DIR / "local.settings.json").exists()
    assert not (SESSION_DIR / "env.sh").exists()
    leftovers = subprocess.run(["pgrep", "-f", "devrun.functions_host"], capture_output=True, text=True, check=False)
    assert str(proc.pid) not in leftovers.stdout


def _bash(command: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "KEY_VAULT", "BROKER_"))}
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result.stdout
