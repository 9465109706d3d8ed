"""make run: one command brings up Azurite, the sandbox and the broker, prints a curl that works, and
Ctrl-C stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
