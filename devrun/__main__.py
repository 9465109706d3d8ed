"""``make run``: the broker on http://127.0.0.1:7071, and everything it needs.

With no real Azure configured (no ``KEY_VAULT_URL`` in the environment or ``local.settings.json``), it
starts Azurite and the sandbox (Entra ID, managed identity, Key Vault, Defender and Graph stand-ins),
registers the sandbox's demo tenants and serves the broker against them. With real settings it serves
the broker against real Azure (starting Azurite only for ``UseDevelopmentStorage=true``). Ctrl-C stops
everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from broker import wiring
from broker.clouds import is_loopback_host
from broker.settings import SETTINGS, Settings, SettingsError, read_environment
from devrun.functions_host import binding_settings, index_triggers
from sandbox.azurite import Azurite, port_is_free, start_azurite, wait_for_port
from sandbox.server import Sandbox

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
AZURITE_DEFAULT_PORTS = (10000, 10001, 10002)
SANDBOX_SCHEDULE = "*/20 * * * * *"  # every 20 s: the first incidents arrive well within a minute
SESSION_DIR = ROOT / ".devrun"
# What a Functions app needs beside the broker's own settings (Core Tools reads them from Values).
HOST_VALUES = {"FUNCTIONS_WORKER_RUNTIME": "python", "AzureWebJobsFeatureFlags": "EnableWorkerIndexing"}
# The environment a session file carries: the broker's settings and the standard variables that reach the
# stand-ins (CA bundle, managed-identity endpoint); nothing else from the shell that started make run.
SESSION_EXTRA = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER")


def session_values(env: Mapping[str, str], bound: set[str]) -> dict[str, str]:
    """The settings a second terminal (the CLI, ``func start``) needs to reach this make run's sandbox.

    ``bound`` names the app settings the function bindings refer to: the Functions host resolves those
    from app settings alone, so each is written even where the broker's default would do.
    """
    names = {s.name for s in SETTINGS} | set(SESSION_EXTRA)
    values = dict(HOST_VALUES)
    values.update({s.name: s.default for s in SETTINGS if s.name in bound and s.default})
    values.update({k: v for k, v in sorted(env.items()) if k in names and v != ""})
    return values


def bound_settings() -> set[str]:
    """The app settings function_app's bindings name, read from its index as the worker reads it."""
    import function_app

    return binding_settings(index_triggers(function_app))


def write_session(env: Mapping[str, str], port: int, bound: set[str]) -> None:
    """``.devrun/local.settings.json`` (Core Tools' shape) and ``.devrun/env.sh`` (the same, for a shell),
    readable by this user only: the identity header in them lets a process get managed-identity tokens
    from the sandbox. Removed when make run stops. A user's own ``local.settings.json`` is never touched."""
    values = session_values(env, bound)
    SESSION_DIR.mkdir(mode=0o700, exist_ok=True)
    document = {"IsEncrypted": False, "Values": values, "Host": {"LocalHttpPort": port}}
    shell = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    for name, text in (("local.settings.json", json.dumps(document, indent=2) + "\n"), ("env.sh", shell)):
        tmp = SESSION_DIR / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, SESSION_DIR / name)


def functions_host_auth(box: Sandbox) -> dict[str, str]:
    """Under the Functions host callers must authenticate (the broker refuses ``CALLER_AUTH=none`` there),
    so the session's settings ask for Entra caller tokens from the sandbox's home tenant, with a policy
    that grants the sandbox's demo caller app (``soc-dashboard``) every demo tenant and scope."""
    callers = [
        {"name": app.display_name, "app_id": app.client_id, "tenants": ["*"], "scopes": ["*"]}
        for app in box.directory.caller_apps()
    ]
    return {"CALLER_AUTH": "entra", "CALLER_POLICY": json.dumps({"callers": callers})}


def remove_session() -> None:
    for name in ("local.settings.json", "env.sh"):
        (SESSION_DIR / name).unlink(missing_ok=True)


def _azurite() -> Azurite:
    ports = AZURITE_DEFAULT_PORTS if all(port_is_free(p) for p in AZURITE_DEFAULT_PORTS) else None
    return start_azurite(ROOT / ".azurite", ports=ports)


def _print_banner(env: dict[str, str], sandboxed: bool, port: int) -> None:
    scope = "https://api.security.microsoft.com/.default"
    auth = "" if env.get("CALLER_AUTH") == "none" else ' -H "Authorization: Bearer $CALLER_TOKEN"'
    base = f"http://{HOST}:{port}"
    print(f"\nbroker:  {base}   ({'sandbox' if sandboxed else 'real Azure'})")
    print("try:")
    print(
        f"  curl -s -X POST {base}/api/token -H 'Content-Type: application/json'{auth} "
        f"""-d '{{"tenant": "contoso", "scope": "{scope}"}}'"""
    )
    print(f"  curl -s{auth} '{base}/api/incidents?tenant=contoso&limit=5'")
    print(f"  curl -s{auth} '{base}/api/sync/status'")
    if sandboxed:
        print(
            f"the CLI, in another terminal:  source {SESSION_DIR.name}/env.sh && .venv/bin/python -m broker tenants list"
        )
    print("Ctrl-C stops everything.\n", flush=True)


def choose_mode(configured: Mapping[str, str]) -> tuple[bool, str]:
    """Sandbox or real Azure, and why, in words ``make run`` prints."""
    vault = configured.get("KEY_VAULT_URL", "").strip()
    if configured.get("CLIENT_CREDENTIAL_MODE", "").strip().lower() == "federated":
        return False, "CLIENT_CREDENTIAL_MODE=federated: the app's credential is a real managed identity"
    if not vault:
        return True, "no KEY_VAULT_URL in the environment or local.settings.json"
    host = urlsplit(vault).hostname or ""
    if is_loopback_host(host):
        return True, f"KEY_VAULT_URL {vault} is a loopback stand-in (a sandbox's settings); a new sandbox replaces it"
    where = "the environment" if os.environ.get("KEY_VAULT_URL") else "local.settings.json"
    return False, f"KEY_VAULT_URL {vault} from {where}"


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
        "--activity-per-minute",
        type=float,
        default=2.0,
        help="sandbox mode: new and updated incidents per minute in each demo tenant (0: none)",
    )
    parser.add_argument(
        "--no-caller-auth-with-real-azure",
        action="store_true",
        help="serve CALLER_AUTH=none against the real credential configured: every process on this machine "
        "(and every web page its browser opens) could then get customer tokens",
    )
    args = parser.parse_args(argv)
    port: int = args.port
    configured = read_environment(ROOT)
    sandboxed, why = choose_mode(configured)
    print(f"mode: {'sandbox' if sandboxed else 'real Azure'} ({why})", flush=True)
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
    host: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        env = dict(configured)
        if sandboxed:
            print("starting Azurite and the sandbox…", flush=True)
            azurite = _azurite()
            box = Sandbox(ROOT / ".sandbox", live=True, activity_per_minute=args.activity_per_minute).start()
            env.update(box.env())
            env.update({"AzureWebJobsStorage": azurite.connection_string, "CALLER_AUTH": "none"})
            # Admin consent returns to this broker: its callback is registered on the sandbox's app.
            env.setdefault("CONSENT_REDIRECT_URI", f"http://{HOST}:{port}/api/consent/callback")
            box.directory.add_redirect_uri(env["CONSENT_REDIRECT_URI"])
            if not os.environ.get("INCIDENT_SYNC_SCHEDULE"):
                env["INCIDENT_SYNC_SCHEDULE"] = SANDBOX_SCHEDULE
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
            [sys.executable, "-m", "devrun.child", "broker", "serve", "--host", HOST, "--port", str(port)],
            cwd=ROOT,
            env=env,
        )
        wait_for_port(port, 30, broker)
        host = subprocess.Popen(  # this interpreter, fixed arguments
            [sys.executable, "-m", "devrun.child", "devrun.functions_host"], cwd=ROOT, env=env
        )
        if sandboxed:
            assert box is not None
            write_session({**env, **functions_host_auth(box)}, port, bound_settings())
        _print_banner(env, sandboxed, port)
        while broker.poll() is None and host.poll() is None:
            time.sleep(0.5)
        return broker.returncode or host.returncode or 0
    except SettingsError as exc:
        print("The broker's settings are not usable:", *exc.problems, sep="\n  - ", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        remove_session()
        for child in (host, broker):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in (host, broker):
            if child is not None:
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
        if box is not None:
            box.stop()
        if azurite is not None:
            azurite.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
