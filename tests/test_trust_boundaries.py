"""Trust boundaries, attacked as an outsider would: each test reproduces one hole found by attacking the
broker on loopback (cross-tenant, cross-site, bad input) through real HTTP, and shows it closed."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.data.tables import TableClient
from azure.storage.blob import ContainerClient
from conftest import DEFENDER, ROOT, BrokerServer, broker_environment, decode_claims, start_broker
from entra_callers import Identity, bearer, grant, new_identity, policy, start_entra_broker, token_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.audit import AuditLog, AuditStore
from broker.audit.records import Key, PushedKey
from broker.callers import CallerSwitches
from broker.changes import CLI_OPERATOR, RegistryChanges
from broker.errors import AuditUnavailable
from broker.settings import Secret, StorageSettings
from broker.storage import StorageAccount
from broker.tenants import TenantRegistry
from sandbox.azurite import free_port, start_azurite
from sandbox.server import Sandbox


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m broker ARGS`` in its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cli_env(box: Sandbox, azurite: str, broker: BrokerServer) -> dict[str, str]:
    """The CLI's settings: the same storage (prefix included) as the running broker's."""
    return {**broker_environment(box, azurite), "STORAGE_PREFIX": broker.container.storage.prefix}


def _problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body: dict[str, Any] = response.json()
    return body


# -- 1. names and GUIDs never confused ------------------------------------------------------------------


@pytest.fixture(scope="module")
def victim(sandbox: Sandbox) -> Any:
    """A consented customer tenant nobody is granted."""
    return sandbox.directory.add_customer_tenant(f"victim{time.monotonic_ns()}")


@pytest.mark.slow
def test_a_guid_shaped_name_cannot_borrow_another_tenants_grant(
    sandbox: Sandbox, azurite: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A row naming the victim tenant by fabrikam's GUID gives a caller granted fabrikam's GUID nothing of
    the victim's; the row is reported at load, and the CLI refuses to write such a name."""
    fabrikam = sandbox.directory.tenant("fabrikam")
    assert fabrikam is not None
    caller = new_identity(sandbox, "guid-grant")
    broker = start_entra_broker(sandbox, azurite, policy(grant(caller, [fabrikam.tenant_id])))
    victim = sandbox.directory.add_customer_tenant(f"victim{time.monotonic_ns()}")  # registered only as below
    try:
        # The row `tenants add <fabrikam's GUID> <victim GUID>` wrote before names were kept apart.
        broker.container.storage.table("tenants").upsert_entity(
            {"PartitionKey": "tenant", "RowKey": fabrikam.tenant_id, "TenantId": victim.tenant_id, "Enabled": True}
        )
        with caplog.at_level(logging.ERROR, logger="broker.tenants"):
            broker.container.tenants.all()  # a reload, as every instance does within 10 s

        headers = bearer(token_for(sandbox, caller))
        stolen = broker.token(victim.tenant_id, headers=headers)
        assert stolen.status_code == 403, stolen.text
        reported = [r.getMessage() for r in caplog.records if "row_refused" in r.getMessage()]
        assert any(fabrikam.tenant_id in line and "GUID" in line for line in reported), reported
        own = broker.token(fabrikam.tenant_id, headers=headers)
        assert own.status_code == 200, own.text
        assert decode_claims(own.json()["access_token"])["tid"] == fabrikam.tenant_id

        env = cli_env(sandbox, azurite, broker)
        listed = cli(["tenants", "list"], env)
        assert fabrikam.tenant_id in listed.stderr, listed.stderr
        other = str(uuid.uuid4())
        for name in (other, other.replace("-", ""), other.upper()):
            added = cli(["tenants", "add", name, str(uuid.uuid4())], env)
            assert added.returncode == 2, added.stdout
            assert "looks like a GUID" in added.stderr
    finally:
        broker.stop()


def test_admin_routes_refuse_a_guid_shaped_name(sandbox: Sandbox, azurite: str) -> None:
    """Over HTTP as from the CLI: a GUID spelled without hyphens (or in braces) is neither a GUID nor a name
    (400 invalid_tenant), and no tenant is registered or configured under a name that looks like a GUID."""
    broker = start_broker(sandbox, azurite, WEBSITE_HOSTNAME="broker-test.azurewebsites.net")
    try:
        guid = str(uuid.uuid4())
        for ref in (guid.replace("-", ""), "{" + guid + "}"):
            response = broker.client.post(f"/api/admin/tenants/{ref}/disable", json={})
            assert response.status_code == 400, response.text
            assert _problem(response)["code"] == "invalid_tenant"
        victim = str(uuid.uuid4())
        for name in (guid, guid.replace("-", "")):
            added = broker.client.post("/api/admin/tenants", json={"name": name, "tenant_id": victim})
            assert added.status_code == 400, added.text
            configured = broker.client.put(f"/api/admin/tenants/{name}", json={"tenant_id": victim})
            assert configured.status_code == 400, configured.text
        assert victim not in {t.tenant_id for t in broker.container.tenants.all()}
    finally:
        broker.stop()


# -- 4. one wording for "not granted" ---------------------------------------------------------------


def test_not_granted_reads_the_same_whether_or_not_the_tenant_exists(
    sandbox: Sandbox, azurite: str, victim: Any
) -> None:
    """A caller granted contoso probes other tenants by name and GUID, registered or not: every answer is
    the same 403 with the same words, and none names a tenant."""
    caller = new_identity(sandbox, "probe")
    broker = start_entra_broker(sandbox, azurite, policy(grant(caller, ["contoso"])))
    try:
        fabrikam = sandbox.directory.tenant("fabrikam")
        assert fabrikam is not None
        broker.container.tenants.add(victim.name, victim.tenant_id)  # registered, and not granted
        headers = bearer(token_for(sandbox, caller))
        probes = [fabrikam.tenant_id, "fabrikam", victim.tenant_id, str(uuid.uuid4()), "no-such-tenant"]
        answers = []
        for ref in probes:
            response = broker.token(ref, headers=headers)
            assert response.status_code == 403, (ref, response.text)
            body = _problem(response)
            for name in ("fabrikam", "victim", "northwind", fabrikam.tenant_id, victim.tenant_id):
                assert name not in response.text.replace(ref, "<asked>"), (ref, response.text)
            answers.append((body["code"], body["title"], body["detail"]))
        assert len(set(answers)) == 1, answers
        assert broker.token("contoso", headers=headers).status_code == 200
    finally:
        broker.stop()


# -- 7. app-only callers recognised positively ------------------------------------------------------


@pytest.fixture(scope="module")
def app_caller(sandbox: Sandbox) -> Identity:
    return new_identity(sandbox, "by-app-id")


@pytest.fixture(scope="module")
def app_broker(sandbox: Sandbox, azurite: str, app_caller: Identity) -> Iterator[BrokerServer]:
    """A broker whose only policy entry is keyed by ``app_caller``'s application ID."""
    entry = {"name": "by-app", "app_id": app_caller.app_id, "tenants": ["contoso"], "scopes": [DEFENDER]}
    broker = start_entra_broker(sandbox, azurite, policy(entry))
    try:
        yield broker
    finally:
        broker.stop()


def test_a_token_that_is_not_app_only_gets_nothing_from_its_applications_grant(
    sandbox: Sandbox, app_broker: BrokerServer, app_caller: Identity
) -> None:
    """A token carrying the application's ``azp`` but neither ``scp`` nor ``idtyp``, whose ``oid`` is not
    its ``sub`` (someone other than the application), is refused; the application's own token works."""
    own = app_broker.token("contoso", headers=bearer(token_for(sandbox, app_caller)))
    assert own.status_code == 200, own.text
    someone = str(uuid.uuid4())
    borrowed = token_for(sandbox, app_caller, idtyp=None, oid=someone, sub="l3_roISQU222bULS9yi2k0XpqpOiMz5H3ZACo1GeXA")
    response = app_broker.token("contoso", headers=bearer(borrowed))
    assert response.status_code == 401, response.text
    assert _problem(response)["code"] == "unauthenticated"


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"idtyp": "app"}, True),
        ({"idtyp": None}, True),  # optional claim not configured: oid == sub decides
        ({"idtyp": "user"}, False),
        ({"idtyp": "app", "scp": "access_as_user"}, False),
        ({"idtyp": None, "scp": "access_as_user"}, False),
        ({"idtyp": None, "sub": None}, False),
        ({"idtyp": "device"}, False),
    ],
)
def test_app_only_is_recognised_by_microsofts_documented_claims(
    sandbox: Sandbox, app_broker: BrokerServer, app_caller: Identity, claims: dict[str, Any], accepted: bool
) -> None:
    """``idtyp=app`` where present; otherwise no ``scp`` and ``oid`` equal to ``sub``."""
    response = app_broker.token("contoso", headers=bearer(token_for(sandbox, app_caller, **claims)))
    assert response.status_code == (200 if accepted else 401), response.text


# -- 8. kill switches fail closed ---------------------------------------------------------------------


@pytest.mark.slow
def test_kill_switches_fail_closed_once_storage_has_been_unreadable_too_long(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Storage goes away: the last switch snapshot serves for its documented staleness, then every request
    is 503 ``kill_switches_stale`` (logged) instead of running on switches nobody can change."""
    storage = start_azurite(tmp_path / "azurite")
    broker = start_broker(sandbox, storage.connection_string, AUDIT_MODE="best_effort")
    try:
        for switches in (broker.container.callers, broker.container.tenants):
            switches.refresh_seconds = 0.2
            switches.max_stale_seconds = 3.0
        time.sleep(0.3)
        assert broker.token("contoso").status_code == 200  # both snapshots re-read just now
        read_at = time.monotonic()
        storage.process.kill()  # the outage begins at once (a graceful stop keeps serving a while)
        storage.process.wait(timeout=10)
        assert broker.token("contoso").status_code == 200  # within the staleness: the last snapshot holds
        time.sleep(max(0.0, read_at + 3.5 - time.monotonic()))
        with caplog.at_level(logging.WARNING):
            response = broker.token("contoso")
        assert response.status_code == 503, response.text
        body = _problem(response)
        assert body["code"] == "kill_switches_stale"
        assert int(response.headers["Retry-After"]) >= 1
        assert any("outcome=stale_refused" in r.getMessage() for r in caplog.records)
    finally:
        broker.stop()
        storage.stop()


# -- 2. development mode stays on this machine ---------------------------------------------------------


def test_a_rebound_dns_name_gets_nothing_from_a_development_broker(dev_broker: BrokerServer) -> None:
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1; its requests then carry
    ``Host: evil.example``. A development broker answers only loopback hosts."""
    port = dev_broker.url.rsplit(":", 1)[1]
    for host in (
        "evil.example",
        f"evil.example:{port}",
        f"127.0.0.1.nip.io:{port}",
        "",
        f"127.0.0.1@evil.example:{port}",
    ):
        response = dev_broker.token("contoso", headers={"Host": host})
        assert response.status_code == 403, (host, response.text)
        assert _problem(response)["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.2"):
        assert dev_broker.token("contoso", headers={"Host": host}).status_code == 200, host


def test_a_cross_site_page_cannot_use_a_development_broker(dev_broker: BrokerServer) -> None:
    """A form on another site posting to the admin API (no preflight for a form), and script from another
    origin, are refused; the tenant stays enabled. Loopback origins (a local tool) are served."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for headers, status, code in (
        ({**form, "Origin": "https://evil.example"}, 415, "unsupported_media_type"),
        (form, 415, "unsupported_media_type"),
        ({"Content-Type": "text/plain", "Origin": "null"}, 415, "unsupported_media_type"),
        ({"Content-Type": "application/json", "Origin": "https://evil.example"}, 403, "origin_not_allowed"),
        ({"Content-Type": "application/json", "Origin": "null"}, 403, "origin_not_allowed"),
    ):
        response = dev_broker.client.post("/api/admin/tenants/contoso/disable", content=b"x=1", headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert _problem(response)["code"] == code
    assert {t.name: t.enabled for t in dev_broker.container.tenants.all()}["contoso"] is True
    stolen = dev_broker.token("contoso", headers={"Origin": "http://evil.example"})
    assert stolen.status_code == 403
    assert _problem(stolen)["code"] == "origin_not_allowed"
    local = dev_broker.token("contoso", headers={"Origin": f"http://localhost:{dev_broker.url.rsplit(':', 1)[1]}"})
    assert local.status_code == 200


def test_host_and_origin_are_not_development_checks_under_entra(
    sandbox: Sandbox, app_broker: BrokerServer, app_caller: Identity
) -> None:
    """Behind Azure's front ends ``Host`` is the app's name; a bearer token is what keeps browsers out."""
    headers = {
        **bearer(token_for(sandbox, app_caller)),
        "Host": "broker.azurewebsites.net",
        "Origin": "https://x.example",
    }
    assert app_broker.token("contoso", headers=headers).status_code == 200
    form = app_broker.client.post(
        "/api/token", content=b"tenant=contoso", headers={**headers, "Content-Type": "text/plain"}
    )
    assert form.status_code == 415


def _devrun(env: dict[str, str], port: int, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "devrun", "--port", str(port), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "real",
    [
        {"KEY_VAULT_URL": "https://contoso-broker.vault.azure.net"},
        {
            "CLIENT_CREDENTIAL_MODE": "federated",
            "MANAGED_IDENTITY_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
            "KEY_VAULT_URL": "https://contoso-broker.vault.azure.net",  # the audit key's vault
        },
    ],
)
def test_make_run_refuses_no_caller_auth_in_front_of_a_real_credential(azurite: str, real: dict[str, str]) -> None:
    """``make run`` with ``CALLER_AUTH=none`` and a real Key Vault (or a federated credential) starts nothing
    unless told so explicitly with ``--no-caller-auth-with-real-azure``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "KEY_VAULT", "BROKER_", "CALLER_"))}
    env.update({"CALLER_AUTH": "none", "BROKER_CLIENT_ID": str(uuid.uuid4()), "AzureWebJobsStorage": azurite, **real})
    port = free_port()
    refused = _devrun(env, port)
    try:
        out, err = refused.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        refused.send_signal(signal.SIGINT)
        out, err = refused.communicate(timeout=30)
        pytest.fail(f"make run served CALLER_AUTH=none in front of a real credential:\n{out}{err}")
    assert refused.returncode == 2, out + err
    assert "CALLER_AUTH=none" in err
    assert "--no-caller-auth-with-real-azure" in err

    # Told explicitly, it goes past the refusal to its next check; the port is held so it stops there and
    # nothing is started against the made-up vault.
    with socket.create_server(("127.0.0.1", port)):
        told = _devrun(env, port, "--no-caller-auth-with-real-azure")
        out, err = told.communicate(timeout=30)
    assert told.returncode == 1, out + err
    assert f"port {port} is in use" in err
    assert "refusing" not in err


# -- 6. every registry and switch change audited first ----------------------------------------------


def refusing_audit(connection_string: str) -> AuditLog:
    """An audit log whose storage refuses every write: a wrong account key, which Azurite answers with 403."""
    wrong = re.sub(
        r"AccountKey=[^;]+", "AccountKey=" + base64.b64encode(b"not the key" * 6).decode(), connection_string
    )
    key = PushedKey()  # a key is not what fails here: the storage account refuses
    key.set(Key("refused-audit-key/1", b"k" * 32))
    store = AuditStore(
        lambda: TableClient.from_connection_string(wrong, table_name="refusedaudit"),
        lambda: ContainerClient.from_connection_string(wrong, "refused-audit"),
        key,  # type: ignore[arg-type]
    )
    return AuditLog(store, write_timeout=5)


def test_an_admin_change_the_audit_log_cannot_record_is_not_made(sandbox: Sandbox, azurite: str) -> None:
    """With the audit log unwritable, disabling a tenant or a caller over HTTP answers 503 and changes
    nothing (it used to disable first and fail to record afterwards)."""
    broker = start_broker(sandbox, azurite)
    try:
        working, broker.container.audit = broker.container.audit, refusing_audit(azurite)
        working.close()
        response = broker.client.post("/api/admin/tenants/contoso/disable", json={})
        assert response.status_code == 503, response.text
        assert _problem(response)["code"] == "audit_unavailable"
        assert {t.name: t.enabled for t in broker.container.tenants.all()}["contoso"] is True
        caller = str(uuid.uuid4())
        response = broker.client.post(f"/api/admin/callers/{caller}/disable", json={})
        assert response.status_code == 503, response.text
        assert caller not in {s.principal for s in broker.container.callers.all()}
    finally:
        broker.stop()


def test_no_registry_or_switch_change_is_made_without_its_record(azurite: str) -> None:
    """The one path the CLI and the admin API share: add, disable, remove and caller switches each refuse
    with ``AuditUnavailable`` and leave storage as it was when the record cannot be written."""
    account = StorageAccount(StorageSettings(Secret(azurite), None, "t" + uuid.uuid4().hex[:10]))
    tenants = TenantRegistry(lambda: account.table("tenants"))
    callers = CallerSwitches(lambda: account.table("callers"))
    tenants.add("kept", str(uuid.uuid4()))
    audit = refusing_audit(azurite)
    changes = RegistryChanges(audit, tenants, callers)
    attempts = [
        lambda: changes.add_tenant("added", str(uuid.uuid4()), by=CLI_OPERATOR),
        lambda: changes.set_tenant_enabled("kept", False, by=CLI_OPERATOR),
        lambda: changes.remove_tenant("kept", by=CLI_OPERATOR),
        lambda: changes.set_caller_enabled(str(uuid.uuid4()), False, by=CLI_OPERATOR),
    ]
    try:
        for attempt in attempts:
            with pytest.raises(AuditUnavailable):
                attempt()
    finally:
        audit.close()
    assert [(t.name, t.enabled) for t in tenants.all()] == [("kept", True)]
    assert callers.all() == []


@pytest.mark.slow
def test_cli_changes_are_audited_with_the_operator_and_both_tenant_fields(
    sandbox: Sandbox, azurite: str, broker: BrokerServer
) -> None:
    """``tenants add/disable/enable/remove`` and ``callers disable`` from the CLI each leave a record, found
    by the tenant's GUID, naming the change and the operator (``cli``)."""
    env = cli_env(sandbox, azurite, broker)
    tenant_id = str(uuid.uuid4())
    caller = str(uuid.uuid4())
    for args in (
        ["tenants", "add", "audited", tenant_id],
        ["tenants", "disable", "audited"],
        ["tenants", "enable", tenant_id],
        ["tenants", "remove", "audited"],
        ["callers", "disable", caller],
    ):
        done = cli(args, env)
        assert done.returncode == 0, done.stderr
    found = broker.client.get("/api/audit", params={"tenant": tenant_id})
    assert found.status_code == 200, found.text
    records = found.json()["records"]
    changes = sorted(r["reason"] for r in records if r["caller"] == "cli")
    assert changes == ["tenant_add", "tenant_disable", "tenant_enable", "tenant_remove"], records
    assert {(r["tenant"], r["tenant_name"]) for r in records if r["caller"] == "cli"} == {(tenant_id, "audited")}
    everything = broker.client.get("/api/audit", params={"limit": "1000"}).json()["records"]
    assert f"caller_disable:{caller}" in {r["reason"] for r in everything if r["caller"] == "cli"}


# -- 3. malformed bodies are 400s with an audit record, never a 5xx ------------------------------------


@pytest.fixture(scope="module")
def dev_broker(sandbox: Sandbox, azurite: str) -> Iterator[BrokerServer]:
    """One loopback development broker for the module's many small requests."""
    server = start_broker(sandbox, azurite)
    try:
        yield server
    finally:
        server.stop()


SCOPE = DEFENDER.encode()
MALFORMED = {
    "deep nesting": b'{"tenant": ' + b"[" * 5000 + b"]" * 5000 + b', "scope": "' + SCOPE + b'"}',
    "deep nesting, unclosed": b"[" * 16_000,
    "huge integer": b'{"tenant": "contoso", "scope": "' + SCOPE + b'", "min_ttl_seconds": 1' + b"0" * 5000 + b"}",
    "huge exponent": b'{"tenant": "contoso", "scope": "' + SCOPE + b'", "min_ttl_seconds": 1e999999}',
    "invalid utf-8": b'{"tenant": "cont\xff\xfeoso", "scope": "' + SCOPE + b'"}',
    "lone surrogate": b'{"tenant": "\\ud800", "scope": "' + SCOPE + b'"}',
    "duplicate keys": b'{"tenant": "contoso", "tenant": "fabrikam", "scope": "' + SCOPE + b'"}',
    "NaN": b'{"tenant": "contoso", "scope": "' + SCOPE + b'", "min_ttl_seconds": NaN}',
    "Infinity": b'{"tenant": "contoso", "scope": "' + SCOPE + b'", "min_ttl_seconds": -Infinity}',
    "not an object": b'["contoso"]',
    "empty": b"",
}


@pytest.mark.parametrize("kind", [*MALFORMED, "oversized"])
def test_a_malformed_body_is_a_4xx_problem_with_an_audit_record(dev_broker: BrokerServer, kind: str) -> None:
    """Deep nesting, huge numbers, invalid UTF-8, lone surrogates, duplicate keys and NaN are each refused
    with a 400 problem (an oversized body with 413) before anything is looked up, and the refusal is in
    the audit log."""
    rid = uuid.uuid4().hex
    content = MALFORMED[kind] if kind in MALFORMED else b'{"tenant": "' + b"a" * 20_000 + b'"}'
    response = dev_broker.client.post(
        "/api/token", content=content, headers={"Content-Type": "application/json", "X-Request-Id": rid}
    )
    assert response.status_code == (413 if kind == "oversized" else 400), response.text
    body = _problem(response)
    assert body["code"] in ("invalid_json", "bad_request", "payload_too_large")
    dev_broker.container.audit.flush()
    records = dev_broker.client.get("/api/audit", params={"limit": "1000"}).json()["records"]
    mine = [r for r in records if r["request_id"] == rid]
    assert [(r["outcome"], r["code"]) for r in mine] == [("denied", body["code"])], mine


TOKEN_FIELDS = ("tenant", "scope", "min_ttl_seconds")
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
)
token_objects = st.dictionaries(
    st.sampled_from(TOKEN_FIELDS) | st.text(max_size=12),
    json_values | st.sampled_from(["contoso", "fabrikam", DEFENDER, "../common", "0" * 32]),
    max_size=5,
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


raw_bodies = (
    token_objects.map(_encode)
    | json_values.map(_encode)
    | st.binary(max_size=512)
    | st.integers(min_value=500, max_value=8000).map(lambda depth: b"[" * depth + b"]" * depth)
    | st.tuples(token_objects.map(_encode), st.binary(max_size=16), st.integers(0, 64)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    )
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(str.strip)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain", ""]
        )
        | header_text,
        "X-Request-Id": header_text,
        "Authorization": header_text,
        "Origin": st.sampled_from(["http://127.0.0.1:7071", "https://evil.example", "null"]) | header_text,
        "Content-Encoding": st.sampled_from(["gzip", "identity"]),
        "Accept": header_text,
    },
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=raw_bodies, extra=headers)
def test_no_token_request_body_or_header_gets_a_5xx(
    dev_broker: BrokerServer, body: bytes, extra: dict[str, str]
) -> None:
    """Whatever the body and headers, the answer is a success or a 4xx problem, never a 5xx."""
    response = dev_broker.client.post("/api/token", content=body, headers=extra)
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")


# -- 9. sync status shows only what the caller may read ---------------------------------------------


def test_sync_status_lists_only_enabled_tenants_the_caller_may_read_from_the_cached_registry(
    sandbox: Sandbox, azurite: str
) -> None:
    """Without ``tenant=``, the status lists the caller's granted tenants that are enabled, read from the
    registry snapshot (a row written behind its back shows once the snapshot is due, not on every call)."""
    reader = new_identity(sandbox, "status-reader")
    broker = start_entra_broker(sandbox, azurite, policy(grant(reader, ["contoso", "fabrikam", "late"])))
    try:
        headers = bearer(token_for(sandbox, reader))

        def listed() -> list[str]:
            response = broker.client.get("/api/sync/status", headers=headers)
            assert response.status_code == 200, response.text
            return [t["tenant"] for t in response.json()["tenants"]]

        assert listed() == ["contoso", "fabrikam"]
        broker.container.tenants.set_enabled("fabrikam", False)
        assert listed() == ["contoso"]
        broker.container.storage.table("tenants").upsert_entity(
            {"PartitionKey": "tenant", "RowKey": "late", "TenantId": str(uuid.uuid4()), "Enabled": True}
        )
        assert listed() == ["contoso"]  # the snapshot is fresh: no table scan per request
        broker.container.tenants.refresh_seconds = 0.0  # stands for "10 s later"
        assert listed() == ["contoso", "late"]
    finally:
        broker.stop()
