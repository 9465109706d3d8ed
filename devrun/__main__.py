"""``make run``: the broker on http://127.0.0.1:7071, and everything it needs.

With no real Azure configured (no ``KEY_VAULT_URL`` in the environment or ``local.settings.json``), it
starts Azurite and the sandbox (Entra ID, managed identity, Key Vault, Defender and Graph stand-ins),
registers the sandbox's demo tenants and serves the broker against them. With real settings it serves
the broker against real Azure (starting Azurite only for ``UseDevelopmentStorage=true``). Ctrl-C stops
everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from broker import wiring
from broker.clouds import is_loopback_host
from broker.settings import Settings, SettingsError, read_environment
from sandbox.azurite import Azurite, port_is_free, start_azurite, wait_for_port
from sandbox.server import Sandbox

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
AZURITE_DEFAULT_PORTS = (10000, 10001, 10002)


def _azurite() -> Azurite:
    ports = AZURITE_DEFAULT_PORTS if all(port_is_free(p) for p in AZURITE_DEFAULT_PORTS) else None
    return start_azurite(ROOT / ".azurite", ports=ports)


def _print_banner(env: dict[str, str], sandboxed: bool, port: int) -> None:
    scope = "https://api.security.microsoft.com/.default"
    auth = "" if env.get("CALLER_AUTH") == "none" else ' -H "Authorization: Bearer $CALLER_TOKEN"'
    print(
        f"\nbroker:  http://{HOST}:{port}   ({'sandbox: stand-ins for Entra ID, Key Vault, Defender, Graph' if sandboxed else 'real Azure'})"
    )
    print("try:")
    print(
        f"  curl -s -X POST http://{HOST}:{port}/api/token -H 'Content-Type: application/json'{auth} "
        f"""-d '{{"tenant": "contoso", "scope": "{scope}"}}'"""
    )
    print("Ctrl-C stops everything.\n", flush=True)


def unauthenticated_real_azure(configured: Mapping[str, str]) -> bool:
    """Whether the settings ask for no caller authentication in front of a real app credential: a Key
    Vault that is not a loopback stand-in, or federated mode (the credential is a real managed identity)."""
    if configured.get("CALLER_AUTH", "").strip().lower() != "none":
        return False
    vault = urlsplit(configured.get("KEY_VAULT_URL", "")).hostname
    real_vault = bool(vault) and not is_loopback_host(vault or "")
    return real_vault or configured.get("CLIENT_CREDENTIAL_MODE", "").strip().lower() == "federated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devrun", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument(
        "--no-caller-auth-with-real-azure",
        action="store_true",
        help="serve CALLER_AUTH=none against the real credential configured: every process on this machine "
        "(and every web page its browser opens) could then get customer tokens",
    )
    args = parser.parse_args(argv)
    port: int = args.port
    configured = read_environment(ROOT)
    sandboxed = not configured.get("KEY_VAULT_URL") and configured.get("CLIENT_CREDENTIAL_MODE") != "federated"
    if unauthenticated_real_azure(configured) and not args.no_caller_auth_with_real_azure:
        print(
            "refusing to serve CALLER_AUTH=none with a real app credential (a Key Vault off this machine, or "
            "federated mode): callers would get real customers' tokens unchecked. Set CALLER_AUTH=entra, or "
            "pass --no-caller-auth-with-real-azure (make run ARGS=--no-caller-auth-with-real-azure) if that "
            "is what you mean.",
            file=sys.stderr,
        )
        return 2
    if not port_is_free(port):
        print(f"port {port} is in use: stop whatever listens there first", file=sys.stderr)
        return 1
    azurite: Azurite | None = None
    box: Sandbox | None = None
    broker: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        env = dict(configured)
        if sandboxed:
            print("starting Azurite and the sandbox…", flush=True)
            azurite = _azurite()
            box = Sandbox(ROOT / ".sandbox").start()
            env.update(box.env())
            env.update({"AzureWebJobsStorage": azurite.connection_string, "CALLER_AUTH": "none"})
            # Admin consent returns to this broker: its callback is registered on the sandbox's app.
            env.setdefault("CONSENT_REDIRECT_URI", f"http://{HOST}:{port}/api/consent/callback")
            box.directory.add_redirect_uri(env["CONSENT_REDIRECT_URI"])
            container = wiring.build(Settings.from_environ(env), bind_host=HOST)
            for tenant in box.directory.customer_tenants():
                container.tenants.add(tenant.name, tenant.tenant_id)
                print(f"  tenant {tenant.name:<10} {tenant.tenant_id}")
            container.close()
        elif env.get("AzureWebJobsStorage", "").replace(" ", "").lower() == "usedevelopmentstorage=true":
            print("starting Azurite for UseDevelopmentStorage=true…", flush=True)
            azurite = _azurite()
            env["AzureWebJobsStorage"] = azurite.connection_string
        broker = subprocess.Popen(  # noqa: S603 — this interpreter, fixed arguments
            [sys.executable, "-m", "broker", "serve", "--host", HOST, "--port", str(port)], cwd=ROOT, env=env
        )
        wait_for_port(port, 30, broker)
        _print_banner(env, sandboxed, port)
        return broker.wait()
    except SettingsError as exc:
        print("The broker's settings are not usable:", *exc.problems, sep="\n  - ", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if broker is not None and broker.poll() is None:
            broker.send_signal(signal.SIGINT)
            try:
                broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                broker.kill()
        if box is not None:
            box.stop()
        if azurite is not None:
            azurite.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
