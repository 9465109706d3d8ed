"""``python -m broker``: serve the HTTP app, manage the tenant registry.

Settings are read as the Functions host would (environment over ``local.settings.json``); a missing or
malformed setting is reported by name, all at once, with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta

from broker import wiring
from broker.changes import CLI_OPERATOR, RegistryChanges
from broker.errors import BrokerError, NotConfigured
from broker.health import TenantHealth
from broker.settings import Settings, SettingsError
from broker.tenants import Tenant
from broker.tokens import admin_consent_url

# Commands other than ``serve`` answer no HTTP request; they run as the local operator.
_NO_LISTENER = "127.0.0.1"


def main(argv: Sequence[str] | None = None, *, prog: str = "broker") -> int:
    """The CLI: the ``broker`` command of an installed broker, and ``python -m broker`` in a checkout."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the HTTP API with uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7071)
    serve.set_defaults(run=_serve)

    tenants = commands.add_parser("tenants", help="manage the tenant registry").add_subparsers(
        dest="action", required=True
    )
    add = tenants.add_parser("add", help="register a customer tenant")
    add.add_argument("name", help="short name: lowercase letters, digits, hyphens")
    add.add_argument("tenant_id", help="the customer's tenant GUID")
    add.add_argument("--api", choices=("defender", "graph"), default="defender", help="incident API to sync")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--region", default=None, help="the tenant's Defender XDR region, one AZURE_CLOUD documents")
    where.add_argument("--defender-url", default=None, help="its Defender XDR API URL (a documented host)")
    add.set_defaults(run=_tenants_add)
    link = tenants.add_parser("link", help="a new admin-consent link for a registered tenant")
    link.add_argument("name")
    link.set_defaults(run=_tenants_link)
    tenants.add_parser("list", help="list registered tenants and their health").set_defaults(run=_tenants_list)
    for action, enabled in (("enable", True), ("disable", False)):
        switch = tenants.add_parser(action, help=f"{action} a tenant (kill switch)")
        switch.add_argument("name")
        switch.set_defaults(run=_tenants_switch, enabled=enabled)
    remove = tenants.add_parser("remove", help="remove a tenant from the registry")
    remove.add_argument("name")
    remove.set_defaults(run=_tenants_remove)
    check = tenants.add_parser("check", help="check consent: acquire a token for every allowed scope")
    check.add_argument("name", nargs="?", help="one tenant (default: all)")
    check.set_defaults(run=_tenants_check)

    callers = commands.add_parser("callers", help="caller kill switch").add_subparsers(dest="action", required=True)
    for action, enabled in (("enable", True), ("disable", False)):
        switch = callers.add_parser(action, help=f"{action} a caller by object id or app id (kill switch)")
        switch.add_argument("id", help="the caller's object id or app id (GUID)")
        switch.set_defaults(run=_callers_switch, enabled=enabled)
    callers.add_parser("list", help="list callers with a switch set").set_defaults(run=_callers_list)

    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    verify = audit.add_parser(
        "verify", help="check MACs, links and anchors: report edited, deleted, reordered or truncated records"
    )
    verify.add_argument(
        "--repair", action="store_true", help="rewrite index rows that are missing or differ, from the chain"
    )
    verify.add_argument("--from", dest="start", type=date.fromisoformat, help="first day (default: 7 days ago)")
    verify.add_argument("--to", dest="end", type=date.fromisoformat, help="last day (default: today, UTC)")
    verify.set_defaults(run=_audit_verify)

    doctor = commands.add_parser("doctor", help="check tenants step by step and say what to fix")
    doctor.add_argument("--tenant", help="one tenant (default: every registered tenant)")
    doctor.set_defaults(run=_doctor)

    sync = commands.add_parser("sync", help="prefetch incidents now, in this process (one line per tenant)")
    sync.add_argument("--tenant", help="one tenant (default: every enabled tenant)")
    sync.add_argument("--parallel", type=int, default=4, help="tenants synced at once (default: 4)")
    sync.add_argument(
        "--wait", action="store_true", help="wait for a tenant another run holds, then sync it (default: report busy)"
    )
    sync.set_defaults(run=_sync)

    args = parser.parse_args(argv)
    _configure_logging(verbose=args.command == "serve")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except SettingsError as exc:
        print("The broker's settings are not usable:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        # Let the audit writers finish (index rows included) before the process exits.
        while _opened:
            _opened.pop().close()


def _configure_logging(*, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


_opened: list[wiring.Container] = []


def _container(bind_host: str = _NO_LISTENER, *, serving: bool = False) -> wiring.Container:
    settings = Settings.from_environ()
    if not serving:  # a one-shot command writes its few audit records itself, without a writer process
        settings = dataclasses.replace(settings, audit_writer="thread")
    container = wiring.build(settings, bind_host=bind_host)
    wiring.install(container)
    _opened.append(container)
    return container


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from broker.http.app import create_app

    container = _container(args.host, serving=True)
    container.audit.start()
    try:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        container.close()  # on SIGTERM too: the audit writer drains what is queued (AUDIT_DRAIN_SECONDS)
    return 0


def _changes(c: wiring.Container) -> RegistryChanges:
    return RegistryChanges(c.audit, c.tenants, c.callers)


def _tenants_add(args: argparse.Namespace) -> int:
    c = _container()
    tenant = _changes(c).add_tenant(
        args.name,
        args.tenant_id,
        api=args.api,
        defender_url=args.defender_url,
        region=args.region,
        by=CLI_OPERATOR,
    )
    host = tenant.defender_url or c.settings.defender_api_url or "-"
    print(f"registered {tenant.name} {tenant.tenant_id} api={tenant.api} defender={host} (pending consent)")
    _print_link(c, tenant)
    return 0


def _tenants_link(args: argparse.Namespace) -> int:
    c = _container()
    _print_link(c, c.tenants.resolve(args.name))
    return 0


def _print_link(c: wiring.Container, tenant: Tenant) -> None:
    try:
        link = c.consent.create(tenant.name, tenant.tenant_id, tenant.api)
    except NotConfigured as exc:
        print(f"no consent link: {exc.detail}", file=sys.stderr)
        print(f"  (plain link, no return to the broker: {plain_consent_url(c.settings, tenant)})", file=sys.stderr)
        return
    expires = datetime.fromtimestamp(link.expires_at, UTC).isoformat(timespec="minutes")
    print(f"admin consent link (send it to an administrator of the tenant; single use, until {expires}):")
    print(f"  {link.url}")
    print(f"the administrator returns to {link.redirect_uri}, which must be registered on the app")


def plain_consent_url(settings: Settings, tenant: Tenant) -> str:
    return admin_consent_url(settings.authority_host, tenant.tenant_id, settings.broker_client_id)


def _tenants_list(args: argparse.Namespace) -> int:
    c = _container()
    registry = c.tenants
    tenants = registry.all()
    health = c.health.view()
    print(
        f"{'NAME':<24} {'TENANT ID':<36} {'ENABLED':<7} {'API':<8} {'STATE':<9} {'CONSENT':<12} "
        f"{'LAST OK':<20} {'FAILS':>5}  LAST FAILURE"
    )
    for t in tenants:
        h = health.get(t.tenant_id) or TenantHealth(t.tenant_id)
        body = h.to_json()
        failure = f"{h.last_failure_code} {body['last_failure_at']}" if h.last_failure_code else "-"
        print(
            f"{t.name:<24} {t.tenant_id:<36} {'yes' if t.enabled else 'no':<7} {t.api:<8} {t.onboarding:<9} "
            f"{h.consent:<12} {(body['last_success_at'] or '-'):<20} {h.consecutive_failures:>5}  {failure}"
        )
    print(f"{len(tenants)} tenant(s)")
    for problem in registry.refused_rows():
        print(f"warning: stored row not served: {problem}", file=sys.stderr)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    c = _container()
    reports = [c.doctor.run(args.tenant)] if args.tenant else c.doctor.run_all()
    for report in reports:
        print(f"{report.tenant} ({report.tenant_id or 'not registered'})")
        for step in report.steps:
            print(f"  {step.status.upper():<4} {step.name:<56} {step.detail}")
            if step.fix:
                print(f"       fix: {step.fix}")
    failed = [r.tenant for r in reports if not r.ok]
    print(f"{len(reports)} tenant(s), {len(failed)} failing{': ' + ', '.join(failed) if failed else ''}")
    c.health.flush()
    return 1 if failed or not reports else 0


def _tenants_switch(args: argparse.Namespace) -> int:
    tenant = _changes(_container()).set_tenant_enabled(args.name, args.enabled, by=CLI_OPERATOR)
    print(f"{tenant.name} {'enabled' if tenant.enabled else 'disabled'}")
    return 0


def _tenants_remove(args: argparse.Namespace) -> int:
    tenant = _changes(_container()).remove_tenant(args.name, by=CLI_OPERATOR)
    print(f"removed {tenant.name} {tenant.tenant_id}")
    return 0


def _tenants_check(args: argparse.Namespace) -> int:
    c = _container()
    tenants = [c.tenants.resolve(args.name)] if args.name else c.tenants.all()
    failures = 0
    for tenant in tenants:
        for scope in c.settings.allowed_scopes:
            try:
                token = c.issuer.acquire(tenant.tenant_id, scope)
                status = f"ok expires_in={token.expires_in(time.time())}"
            except BrokerError as exc:
                failures += 1
                status = f"{exc.code}: {exc.detail}"
                if "consent_url" in exc.extensions:
                    status += f"\n    consent: {exc.extensions['consent_url']}"
            print(f"{tenant.name:<24} {scope:<48} {status}")
    return 1 if failures else 0


def _callers_switch(args: argparse.Namespace) -> int:
    c = _container()
    switch = _changes(c).set_caller_enabled(args.id, args.enabled, by=CLI_OPERATOR)
    print(
        f"{switch.principal} {'enabled' if switch.enabled else 'disabled'} (every instance within {c.callers.refresh_seconds:.0f} s)"
    )
    return 0


def _callers_list(args: argparse.Namespace) -> int:
    switches = _container().callers.all()
    print(f"{'CALLER':<36} {'ENABLED':<7} {'UPDATED':<25} BY")
    for s in switches:
        print(f"{s.principal:<36} {'yes' if s.enabled else 'no':<7} {s.updated_at:<25} {s.updated_by}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    end = args.end or datetime.now(UTC).date()
    start = args.start or end - timedelta(days=7)
    report = _container().audit.verify(start, end, repair=args.repair)
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    for repaired in report.repaired:
        print(f"REPAIRED {repaired}")
    for day, (seq, digest) in sorted(report.heads.items()):
        print(f"head {day} seq={seq} hash={digest[:16]}")
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    print(
        f"audit verify {start}..{end}: {report.days} day(s), {report.records} record(s), "
        f"{report.anchors} anchor(s), {verdict}"
    )
    return 0 if report.ok else 1


def _sync(args: argparse.Namespace) -> int:
    """Run the queue trigger's sync for each tenant here, waiting out the budget instead of deferring.

    A tenant another run holds is reported busy (until when its lease lapses) and fails the command,
    unless ``--wait``, which retries it once that lease is free. SIGTERM (and Ctrl-C) stop every run at
    its last checkpoint and release its lease: the command reports them stopped and exits non-zero."""
    import signal
    from concurrent.futures import ThreadPoolExecutor, as_completed

    c = _container()
    tenants = [c.tenants.resolve(args.tenant)] if args.tenant else [t for t in c.tenants.all() if t.enabled]
    failures = 0

    def stop(signum: int, _frame: object) -> None:
        print(f"signal {signum}: stopping every run at its last checkpoint", file=sys.stderr, flush=True)
        c.incidents.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def one(tenant: Tenant) -> str:
        nonlocal failures
        while True:
            try:
                report = c.incidents.run(tenant, max_wait=3600.0)
            except BrokerError as exc:
                failures += 1
                return f"{tenant.name:<24} {tenant.api:<8} outcome=failed error={exc.code}: {exc.detail}"
            if report.outcome != "busy" or not args.wait or c.incidents.stopping.is_set():
                break
            print(f"{tenant.name:<24} {tenant.api:<8} busy until {report.busy_until or '?'}: waiting", flush=True)
            c.incidents.stopping.wait(_seconds_until(report.busy_until))
        if report.outcome != "complete":
            failures += 1
        return f"{tenant.name:<24} {tenant.api:<8} {report.summary()}"

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for future in as_completed([pool.submit(one, t) for t in tenants]):
            print(future.result(), flush=True)
    print(f"{len(tenants)} tenant(s), {failures} not synced", flush=True)
    return 1 if failures else 0


def _seconds_until(stamp: str | None) -> float:
    """How long to wait before asking again for a busy tenant: until its lease lapses (and a second
    more), but at most 5 s, since the run holding it may end sooner."""
    if not stamp:
        return 5.0
    try:
        until = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 5.0
    return min(5.0, max(1.0, until - time.time() + 1.0))
