"""The caller policy, deny by default: which caller may have which tenants and scopes, app roles as a
precondition, the admin role, the caller and tenant kill switches and the per-caller rate limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import DEFENDER, GRAPH, ROOT, BrokerServer, broker_environment
from entra_callers import ALL_ROLES, Identity, bearer, grant, new_identity, policy, start_entra_broker, token_for

from broker.policy import Policy, PolicyError, RateLimiter
from broker.settings import Settings, SettingsError
from sandbox.server import Sandbox

SCOPES = (DEFENDER, GRAPH)
GUID = "11111111-2222-3333-4444-555555555555"


# -- parsing ------------------------------------------------------------------------------------------


def test_empty_policy_denies_everyone() -> None:
    """No entry, no access: deny by default."""
    decision = Policy.parse("", SCOPES).decide(
        object_id=GUID,
        app_id=None,
        roles=frozenset(ALL_ROLES),
        action="token",
        tenant_name="contoso",
        scope=DEFENDER,
        app_only=True,
    )
    assert not decision.allowed
    assert decision.reason == "no_policy_entry"


def test_groups_names_and_star_are_expanded() -> None:
    """A grant by group, by name and by ``*`` each cover what they say, and nothing more."""
    text = json.dumps(
        {
            "groups": {"eu": ["contoso", "fabrikam"]},
            "callers": [
                {"name": "a", "object_id": GUID, "tenants": ["group:eu"], "scopes": [DEFENDER]},
                {"name": "b", "app_id": GUID.replace("1", "9"), "tenants": ["*"], "scopes": ["*"], "admin": True},
            ],
        }
    )
    p = Policy.parse(text, SCOPES)
    roles = frozenset(ALL_ROLES)

    def allowed(principal: str, tenant: str, scope: str = DEFENDER) -> bool:
        return (
            p.decide(
                object_id="0" * 8,
                app_id=principal,
                roles=roles,
                action="token",
                tenant_name=tenant,
                scope=scope,
                app_only=True,
            ).allowed
            or p.decide(
                object_id=principal,
                app_id=None,
                roles=roles,
                action="token",
                tenant_name=tenant,
                scope=scope,
                app_only=True,
            ).allowed
        )

    assert allowed(GUID, "fabrikam")
    assert not allowed(GUID, "northwind")
    assert not allowed(GUID, "contoso", GRAPH)
    assert allowed(GUID.replace("1", "9"), "anything", GRAPH)
    assert p.decide(object_id=GUID, app_id=None, roles=roles, action="admin", app_only=True).reason == "not_admin"


def test_role_is_a_precondition() -> None:
    """A policy grant without the app role in the token is refused."""
    p = Policy.parse(
        json.dumps({"callers": [{"name": "a", "object_id": GUID, "tenants": ["*"], "scopes": ["*"]}]}), SCOPES
    )
    decision = p.decide(
        object_id=GUID, app_id=None, roles=frozenset(), action="token", tenant_name="x", scope=DEFENDER, app_only=True
    )
    assert decision.reason == "role_missing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "not JSON"),
        ('{"callers": [{"name": "x", "tenants": ["*"]}]}', "callers[0] (x): needs 'object_id' or 'app_id'"),
        ('{"callers": [{"name": "x", "object_id": "nope", "tenants": ["*"]}]}', "callers[0] (x): object_id 'nope'"),
        (f'{{"callers": [{{"name": "x", "object_id": "{GUID}", "tenants": ["group:eu"]}}]}}', "unknown group 'eu'"),
        (f'{{"callers": [{{"name": "x", "object_id": "{GUID}", "tenants": ["../common"]}}]}}', "'../common'"),
        (
            f'{{"callers": [{{"name": "x", "object_id": "{GUID}", "tenants": ["a"], "scopes": ["https://x/.default"]}}]}}',
            "not in ALLOWED_SCOPES",
        ),
        (f'{{"callers": [{{"name": "x", "object_id": "{GUID}", "tenants": []}}]}}', "grants nothing"),
        (
            f'{{"callers": [{{"name": "x", "object_id": "{GUID}", "tenants": ["a"], "color": 1}}]}}',
            "unknown key(s) color",
        ),
    ],
)
def test_malformed_policy_is_reported_by_entry(text: str, expected: str) -> None:
    """Every problem names the entry at fault."""
    with pytest.raises(PolicyError) as caught:
        Policy.parse(text, SCOPES)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_policy_problems_are_settings_problems(sandbox: Sandbox, azurite: str) -> None:
    """A bad CALLER_POLICY stops the broker at start, named among the settings problems."""
    env = broker_environment(sandbox, azurite, CALLER_AUTH="entra", CALLER_POLICY='{"callers": [1]}')
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ(env)
    assert "CALLER_POLICY: callers[0]: must be an object" in caught.value.problems


def test_rate_limiter_refills() -> None:
    """The bucket holds a minute's worth and refills continuously; the wait is reported in seconds."""
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.take("a") is None
    assert limiter.take("a") is None
    assert limiter.take("a") == 30
    assert limiter.take("b") is None
    now[0] += 30
    assert limiter.take("a") is None


# -- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people(sandbox: Sandbox) -> dict[str, Identity]:
    return {
        "a": new_identity(sandbox, "policy-a"),
        "b": new_identity(sandbox, "policy-b"),
        "admin": new_identity(sandbox, "policy-admin", ALL_ROLES),
    }


@pytest.fixture(scope="module")
def server(sandbox: Sandbox, azurite: str, people: dict[str, Identity]) -> Iterator[BrokerServer]:
    text = policy(
        grant(people["a"], ["contoso"]),
        grant(people["b"], ["group:b-tenants"], [DEFENDER, GRAPH]),
        grant(people["admin"], [], admin=True),
        groups={"b-tenants": ["fabrikam", "northwind"]},
    )
    broker = start_entra_broker(sandbox, azurite, text)
    try:
        yield broker
    finally:
        broker.stop()


def test_caller_cannot_have_another_callers_tenant(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """A asks for fabrikam, which only B may have: 403 and no token request to Entra."""
    before = sandbox.recorder.count("entra.token")
    response = server.token("fabrikam", headers=bearer(token_for(sandbox, people["a"])))
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert sandbox.recorder.count("entra.token") == before
    assert server.token("fabrikam", GRAPH, headers=bearer(token_for(sandbox, people["b"]))).status_code == 200


def test_unknown_tenant_looks_like_any_other_refusal(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """A caller without ``*`` cannot probe the registry: an unregistered name is 403, not 404."""
    response = server.token("no-such-tenant", headers=bearer(token_for(sandbox, people["a"])))
    assert response.status_code == 403


def test_admin_routes_need_role_and_policy(sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]) -> None:
    """Admin needs ``Broker.Admin`` in the token *and* ``admin: true``; a token caller gets 403."""
    a_with_role = bearer(token_for(sandbox, people["a"], roles=list(ALL_ROLES)))
    assert (
        server.client.post(
            f"/api/admin/callers/{people['b'].object_id}/disable", json={}, headers=a_with_role
        ).status_code
        == 403
    )
    no_role = bearer(token_for(sandbox, people["admin"], roles=["Broker.Token.Request"]))
    assert server.client.get("/api/audit", headers=no_role).status_code == 403
    assert server.client.get("/api/audit").status_code == 401


def test_caller_kill_switch_through_the_admin_api(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """Disabling a caller refuses its next request (403 caller_disabled); enabling restores it."""
    admin = bearer(token_for(sandbox, people["admin"]))
    a = bearer(token_for(sandbox, people["a"]))
    assert server.token("contoso", headers=a).status_code == 200
    response = server.client.post(f"/api/admin/callers/{people['a'].app_id}/disable", json={}, headers=admin)
    assert response.status_code == 200, response.text
    refused = server.token("contoso", headers=a)
    assert refused.status_code == 403
    assert refused.json()["code"] == "caller_disabled"
    assert (
        server.client.post(f"/api/admin/callers/{people['a'].app_id}/enable", json={}, headers=admin).status_code == 200
    )
    assert server.token("contoso", headers=a).status_code == 200


def test_tenant_kill_switch_through_the_admin_api(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """Disabling a tenant refuses the next token for it (403 tenant_disabled)."""
    admin = bearer(token_for(sandbox, people["admin"]))
    b = bearer(token_for(sandbox, people["b"]))
    assert server.client.post("/api/admin/tenants/northwind/disable", json={}, headers=admin).status_code == 200
    try:
        response = server.token("northwind", headers=b)
        assert response.status_code == 403
        assert response.json()["code"] == "tenant_disabled"
    finally:
        assert server.client.post("/api/admin/tenants/northwind/enable", json={}, headers=admin).status_code == 200
    assert server.token("northwind", headers=b).status_code == 200


def test_caller_kill_switch_from_the_cli_reaches_a_running_broker(
    sandbox: Sandbox, azurite: str, people: dict[str, Identity]
) -> None:
    """``python -m broker callers disable ID`` in another process; the running broker sees it within 10 s."""
    broker = start_entra_broker(sandbox, azurite, policy(grant(people["b"], ["fabrikam"])))
    try:
        b = bearer(token_for(sandbox, people["b"]))
        assert broker.token("fabrikam", headers=b).status_code == 200
        env = {**os.environ, **broker_environment(sandbox, azurite), "STORAGE_PREFIX": broker.container.storage.prefix}
        run = subprocess.run(
            [sys.executable, "-m", "broker", "callers", "disable", people["b"].object_id],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        broker.container.callers.refresh_seconds = 0.0  # stands for "10 s later"
        assert broker.token("fabrikam", headers=b).json()["code"] == "caller_disabled"
    finally:
        broker.stop()


def test_rate_limit_answers_429_with_retry_after(sandbox: Sandbox, azurite: str, people: dict[str, Identity]) -> None:
    """Past ``CALLER_RATE_PER_MINUTE`` a caller gets 429 ``rate_limited`` with ``Retry-After``."""
    broker = start_entra_broker(sandbox, azurite, policy(grant(people["b"], ["fabrikam"])), CALLER_RATE_PER_MINUTE="3")
    try:
        b = bearer(token_for(sandbox, people["b"]))
        statuses = [broker.token("fabrikam", headers=b).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        limited = broker.token("fabrikam", headers=b)
        assert limited.status_code == 429
        assert limited.json()["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
    finally:
        broker.stop()


def test_caller_cannot_read_another_callers_incidents(
    sandbox: Sandbox, server: BrokerServer, people: dict[str, Identity]
) -> None:
    """A may not read fabrikam's incidents (only B's grant names fabrikam): 403, no outbound call."""
    before = sandbox.recorder.total("defender") + sandbox.recorder.count("entra.token")
    response = server.client.get(
        "/api/incidents", params={"tenant": "fabrikam"}, headers=bearer(token_for(sandbox, people["a"]))
    )
    assert response.status_code == 403, response.text
    assert sandbox.recorder.total("defender") + sandbox.recorder.count("entra.token") == before
    allowed = server.client.get(
        "/api/incidents", params={"tenant": "fabrikam"}, headers=bearer(token_for(sandbox, people["b"]))
    )
    assert allowed.status_code == 200, allowed.text


def test_names_and_guids_are_separate_namespaces_in_grants() -> None:
    """A GUID in a grant matches only a tenant's GUID, never a tenant whose *name* is that text."""
    other = "22222222-3333-4444-5555-666666666666"
    p = Policy.parse(json.dumps({"callers": [{"name": "a", "object_id": GUID, "tenants": [other, "contoso"]}]}), SCOPES)
    roles = frozenset(ALL_ROLES)

    def allowed(name: str, tenant_id: str) -> bool:
        return p.decide(
            object_id=GUID,
            app_id=None,
            roles=roles,
            action="token",
            tenant_name=name,
            tenant_id=tenant_id,
            app_only=True,
        ).allowed

    victim = "33333333-4444-5555-6666-777777777777"
    assert allowed("fabrikam", other)
    assert not allowed(other, victim)
    assert allowed("contoso", victim)
    assert not allowed("fabrikam", "contoso")


@pytest.mark.parametrize("ref", ["22222222333344445555666666666666", "{22222222-3333-4444-5555-666666666666}"])
def test_a_guid_shaped_name_in_the_policy_is_refused(ref: str) -> None:
    with pytest.raises(PolicyError, match="is not a tenant name"):
        Policy.parse(json.dumps({"callers": [{"name": "a", "object_id": GUID, "tenants": [ref]}]}), SCOPES)


def test_app_id_entries_apply_only_to_app_only_tokens() -> None:
    """An entry keyed by app ID grants nothing to a token that is not the application's own."""
    app = "44444444-5555-6666-7777-888888888888"
    p = Policy.parse(json.dumps({"callers": [{"name": "a", "app_id": app, "tenants": ["*"], "scopes": ["*"]}]}), SCOPES)
    ask = {"object_id": GUID, "app_id": app, "roles": frozenset(ALL_ROLES), "action": "token", "tenant_name": "x"}
    assert p.decide(**ask, app_only=True).allowed  # type: ignore[arg-type]
    assert p.decide(**ask, app_only=False).reason == "no_policy_entry"  # type: ignore[arg-type]
    assert not p.sees_all_tenants(GUID, app, app_only=False)
