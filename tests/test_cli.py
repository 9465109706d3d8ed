"""python -m broker: the same settings as the app, every problem named, tenants managed from a shell."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import broker_environment

from sandbox.server import Sandbox

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_serve_reports_every_missing_setting_by_name_and_exits_2() -> None:
    """An empty environment names each required setting in one go; nothing is served."""
    proc = run(["serve", "--port", "0"], {"CALLER_AUTH": "entra"})
    assert proc.returncode == 2
    for name in ("BROKER_CLIENT_ID", "KEY_VAULT_URL", "AzureWebJobsStorage", "CALLER_TENANT_ID", "CALLER_AUDIENCE"):
        assert name in proc.stderr


def test_serve_refuses_no_caller_auth_off_loopback(sandbox: Sandbox, azurite: str) -> None:
    proc = run(["serve", "--host", "0.0.0.0", "--port", "0"], broker_environment(sandbox, azurite))
    assert proc.returncode == 2
    assert "CALLER_AUTH" in proc.stderr


@pytest.mark.slow
def test_tenants_add_list_disable(sandbox: Sandbox, azurite: str) -> None:
    """Register a tenant, see it listed with the consent link printed, disable it, remove it."""
    env = broker_environment(sandbox, azurite, WEBSITE_HOSTNAME="broker-test.azurewebsites.net")
    tid = str(uuid.uuid4())
    added = run(["tenants", "add", "acme", tid.upper()], env)
    assert added.returncode == 0, added.stderr
    link = urlsplit(next(line.strip() for line in added.stdout.splitlines() if "adminconsent" in line))
    assert f"{link.scheme}://{link.netloc}{link.path}" == f"{env['AUTHORITY_HOST']}/{tid}/v2.0/adminconsent"
    query = parse_qs(link.query)
    assert query["client_id"] == [env["BROKER_CLIENT_ID"]]
    assert query["scope"] == ["https://api.security.microsoft.com/.default"]
    assert query["redirect_uri"] == ["https://broker-test.azurewebsites.net/api/consent/callback"]
    assert len(query["state"][0]) > 64
    listed = run(["tenants", "list"], env)
    assert listed.returncode == 0
    assert "acme" in listed.stdout
    assert tid in listed.stdout
    assert "1 tenant(s)" in listed.stdout
    assert run(["tenants", "disable", "acme"], env).returncode == 0
    assert " no " in run(["tenants", "list"], env).stdout
    assert run(["tenants", "remove", "acme"], env).returncode == 0
    assert "0 tenant(s)" in run(["tenants", "list"], env).stdout


def test_tenants_add_refuses_a_bad_guid_and_a_reserved_name(sandbox: Sandbox, azurite: str) -> None:
    env = broker_environment(sandbox, azurite)
    bad_guid = run(["tenants", "add", "acme", "contoso.onmicrosoft.com"], env)
    assert bad_guid.returncode == 2
    assert "GUID" in bad_guid.stderr
    reserved = run(["tenants", "add", "common", str(uuid.uuid4())], env)
    assert reserved.returncode == 2


@pytest.mark.slow
def test_tenants_check_reports_consent_per_scope(sandbox: Sandbox, azurite: str) -> None:
    """A consented tenant checks ok for both scopes; an unconsented one prints its consent link."""
    env = broker_environment(sandbox, azurite)
    ok = sandbox.directory.add_customer_tenant("t" + uuid.uuid4().hex[:8])
    missing = sandbox.directory.add_customer_tenant("t" + uuid.uuid4().hex[:8], consented=False)
    assert run(["tenants", "add", "good", ok.tenant_id], env).returncode == 0
    assert run(["tenants", "add", "pending", missing.tenant_id], env).returncode == 0
    good = run(["tenants", "check", "good"], env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count(" ok expires_in=") == 2
    pending = run(["tenants", "check", "pending"], env)
    assert pending.returncode == 1
    assert "consent_required" in pending.stdout
    assert "adminconsent" in pending.stdout


@pytest.mark.slow
def test_doctor_passes_every_step_for_a_consented_tenant_and_marks_it_onboarded(sandbox: Sandbox, azurite: str) -> None:
    """registry, credential, token/tid/roles per scope and the $top=1 probe all pass; exit 0; list shows it."""
    env = broker_environment(sandbox, azurite)
    tenant = sandbox.directory.add_customer_tenant("t" + uuid.uuid4().hex[:8])
    sandbox.incidents.seed_tenant(tenant.tenant_id, 3)
    assert run(["tenants", "add", "good", tenant.tenant_id], env).returncode == 0
    assert " pending " in run(["tenants", "list"], env).stdout
    doctor = run(["doctor", "--tenant", "good"], env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    passed = [line.split()[1] for line in doctor.stdout.splitlines() if line.strip().startswith("PASS")]
    assert passed == ["registry", "credential", "token", "tid", "roles", "token", "tid", "roles", "probe"]
    assert "FAIL" not in doctor.stdout
    listed = run(["tenants", "list"], env).stdout
    row = next(line for line in listed.splitlines() if line.startswith("good "))
    assert " onboarded " in row
    assert " granted " in row


@pytest.mark.slow
def test_doctor_names_the_failing_step_and_its_fix_and_exits_1(sandbox: Sandbox, azurite: str) -> None:
    """No consent: the token steps fail with the consent fix; a missing role fails the roles step."""
    env = broker_environment(sandbox, azurite)
    missing = sandbox.directory.add_customer_tenant("t" + uuid.uuid4().hex[:8], consented=False)
    no_role = sandbox.directory.add_customer_tenant(
        "t" + uuid.uuid4().hex[:8], roles={"https://api.security.microsoft.com": [], "https://graph.microsoft.com": []}
    )
    assert run(["tenants", "add", "unconsented", missing.tenant_id], env).returncode == 0
    assert run(["tenants", "add", "roleless", no_role.tenant_id], env).returncode == 0
    doctor = run(["doctor"], env)
    assert doctor.returncode == 1
    lines = doctor.stdout.splitlines()
    start = lines.index(f"unconsented ({missing.tenant_id})")
    section = lines[start : start + 14]
    assert any(line.strip().startswith("FAIL token https://api.security.microsoft.com/.default") for line in section)
    assert any("fix: an administrator of the customer tenant must consent" in line for line in section)
    assert any(line.strip().startswith("SKIP probe") for line in section)
    start = lines.index(f"roleless ({no_role.tenant_id})")
    section = lines[start : start + 14]
    assert any(line.strip().startswith("PASS token https://api.security.microsoft.com/.default") for line in section)
    assert any(line.strip().startswith("FAIL roles https://api.security.microsoft.com/.default") for line in section)
    assert "2 tenant(s), 2 failing" in doctor.stdout
    listed = run(["tenants", "list"], env).stdout
    assert " missing " in next(line for line in listed.splitlines() if line.startswith("unconsented "))
    assert " role_missing " in next(line for line in listed.splitlines() if line.startswith("roleless "))


def test_tenants_add_with_a_region(sandbox: Sandbox, azurite: str) -> None:
    """--region picks the cloud's documented regional Defender host; an undocumented region is refused."""
    env = broker_environment(sandbox, azurite)
    added = run(["tenants", "add", "eu-customer", str(uuid.uuid4()), "--region", "eu"], env)
    assert added.returncode == 0, added.stderr
    assert "defender=https://api-eu.security.microsoft.com" in added.stdout
    refused = run(["tenants", "add", "mars-customer", str(uuid.uuid4()), "--region", "mars"], env)
    assert refused.returncode == 2
    assert "'mars' is not a documented Defender XDR region of the public cloud" in refused.stderr
    both = run(["tenants", "add", "x", str(uuid.uuid4()), "--region", "eu", "--defender-url", "https://a.b"], env)
    assert both.returncode == 2
