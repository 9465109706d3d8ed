"""The callers' contract: ``GET /api/openapi.json`` describes every route completely, is checked against the
running broker by schemathesis with all its checks, and a client generated from it gets a token.

Each route declares its contract beside itself (``broker.http.contract.contract``); the document refuses a
route that declared none, so a new route fails here until it is described. OPENAPI_FUZZ_EXAMPLES (default
250) sets schemathesis's examples per operation, for a quicker run by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEFENDER, GRAPH, ROOT, BrokerServer, decode_claims
from entra_callers import ALL_ROLES, Identity, grant, new_identity, policy, start_entra_broker, token_for
from fastapi.routing import iter_route_contexts

from broker.errors import BrokerError, NotConfigured
from broker.http.app import create_app
from broker.http.contract import UndocumentedRoute
from broker.wiring import Container
from sandbox.server import Sandbox

PROBLEM = "application/problem+json"
# Anonymous by design: liveness, readiness (probes) and the consent callback (a customer's browser).
PUBLIC = {"/api/health", "/api/health/ready", "/api/consent/callback"}


def _codes() -> set[str]:
    """Every problem code the error tree defines."""
    found: set[str] = set()
    stack: list[type[BrokerError]] = [BrokerError]
    while stack:
        cls = stack.pop()
        found.add(cls.code)
        stack.extend(cls.__subclasses__())
    return found


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def _unconfigured() -> Container:
    raise NotConfigured()


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document as an unconfigured broker serves it (no deployment's scopes in it)."""
    return create_app(_unconfigured).openapi()


def test_every_route_is_in_the_document(document: dict[str, Any]) -> None:
    """Each route the app serves is an operation, with an id fit for a generated client's function name."""
    served = {
        (method, route.path)
        for route in iter_route_contexts(create_app(_unconfigured).routes)
        if getattr(route, "include_in_schema", False)
        for method in getattr(route, "methods", ())
        if method != "HEAD"
    }
    described = {(method, path) for method, path, _ in _operations(document)}
    assert served == described
    ids = [op["operationId"] for _, _, op in _operations(document)]
    assert len(ids) == len(set(ids))
    assert all(i.isidentifier() for i in ids)


def test_every_operation_states_who_may_call_and_every_answer(document: dict[str, Any]) -> None:
    """Summary, security and app role, a typed 200, and per error status a problem+json schema whose ``code``
    is one of the listed codes (each with an example); never FastAPI's 422, which the app never sends."""
    assert document["components"]["securitySchemes"]["entraBearer"]["scheme"] == "bearer"
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "code", "detail"}
    known = _codes()
    for method, path, op in _operations(document):
        where = f"{method} {path}"
        assert op["summary"], where
        assert "422" not in op["responses"], where
        (success,) = [status for status in op["responses"] if status.startswith("2")]
        ok = op["responses"][success]["content"]["application/json"]["schema"]
        assert ok.get("$ref") or ok.get("type"), where
        if path in PUBLIC:
            assert op["security"] == [], where
            assert "x-app-role" not in op, where
            continue
        assert op["security"] == [{"entraBearer": []}], where
        assert op["x-app-role"].startswith("Broker."), where
        assert op["x-app-role"] in op["description"], where
        assert {"401", "403", "429", "503"} <= set(op["responses"]), where
        assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
        for status, response in op["responses"].items():
            if status.startswith("2"):
                continue
            media = response["content"][PROBLEM]
            codes = media["schema"]["allOf"][1]["properties"]["code"]["enum"]
            assert codes, where
            assert set(codes) <= known, where
            assert set(media["examples"]) == set(codes), where
            for code, example in media["examples"].items():
                assert example["value"]["code"] == code
                assert example["value"]["status"] == int(status)


def test_the_token_route_documents_its_body_and_its_failures(document: dict[str, Any]) -> None:
    """The body a caller sends, with its constraints and an example, and the tenant-state answers."""
    op = document["paths"]["/api/token"]["post"]
    body = op["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/TokenRequest"}
    schema = document["components"]["schemas"]["TokenRequest"]
    assert schema["required"] == ["tenant", "scope"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["min_ttl_seconds"]["maximum"] == 3000
    assert props["tenant"]["pattern"].startswith("^(?:[0-9a-fA-F]{8}-")
    assert body["example"]["tenant"] == "contoso"
    conflict = op["responses"]["409"]["content"][PROBLEM]["schema"]["allOf"][1]["properties"]["code"]["enum"]
    assert conflict == ["consent_required", "role_missing", "tenant_not_found"]
    assert "Retry-After" in op["responses"]["503"]["headers"]


def test_query_parameters_carry_their_constraints(document: dict[str, Any]) -> None:
    """The incident and audit queries: what each parameter accepts, as the routes check it."""
    params = {p["name"]: p for p in document["paths"]["/api/incidents"]["get"]["parameters"]}
    assert params["tenant"]["required"] is True
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}
    assert "resolved" in params["status"]["schema"]["enum"]
    audit = {p["name"]: p for p in document["paths"]["/api/audit"]["get"]["parameters"]}
    assert set(audit) == {"from", "to", "tenant", "caller", "limit", "cursor"}
    assert audit["limit"]["schema"]["maximum"] == 1000
    (principal,) = document["paths"]["/api/admin/callers/{principal}/disable"]["post"]["parameters"]
    assert principal["in"] == "path"
    assert "pattern" in principal["schema"]


def test_a_route_without_a_contract_fails_loudly() -> None:
    """A route added without describing itself stops the document from being built, naming the route."""
    app = create_app(_unconfigured)

    @app.get("/api/undescribed")
    async def undescribed() -> dict[str, str]:
        return {}

    with pytest.raises(UndocumentedRoute, match=r"\['GET'\] /api/undescribed"):
        app.openapi()


def test_the_document_names_this_deployments_scopes(broker: BrokerServer) -> None:
    """Served by a configured broker, the token body's ``scope`` is one of its ALLOWED_SCOPES."""
    document = broker.client.get("/api/openapi.json").json()
    body = document["components"]["schemas"]["TokenRequest"]
    assert body["properties"]["scope"]["enum"] == list(broker.container.settings.allowed_scopes)


def test_405_names_the_allowed_methods(broker: BrokerServer) -> None:
    """A method a path does not serve is a 405 problem with ``Allow`` (RFC 9110)."""
    response = broker.client.get("/api/token")
    assert response.status_code == 405
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["allow"] == "POST"
    assert response.json()["code"] == "method_not_allowed"
    assert broker.client.delete("/api/incidents").headers["allow"] == "GET"
    assert broker.client.delete("/api/admin/tenants").headers["allow"] == "GET, POST"


# -- against the running broker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_caller(sandbox: Sandbox) -> Identity:
    """A caller holding every app role, the policy's admin, granted every tenant and scope."""
    return new_identity(sandbox, "fuzz", ALL_ROLES)


@pytest.fixture(scope="module")
def fuzz_broker(sandbox: Sandbox, azurite: str, fuzz_caller: Identity) -> Iterator[BrokerServer]:
    """A broker checking Entra caller tokens as in Azure, with a rate limit no fuzzer reaches."""
    text = policy(grant(fuzz_caller, ["*"], ["*"], admin=True))
    server = start_entra_broker(
        sandbox,
        azurite,
        text,
        CALLER_RATE_PER_MINUTE="1000000",
        # Consent links are made, never followed, in this run.
        CONSENT_REDIRECT_URI="http://127.0.0.1:9/api/consent/callback",
    )
    try:
        yield server
    finally:
        server.stop()


SCHEMATHESIS_CONFIG = """
[generation]
max-examples = {examples}

[phases.stateful]
enabled = false

# Rules no JSON schema states: a consent state must be one the broker signed, a claims value a JSON object,
# a cursor one the API issued for that tenant, `from` before `to`, a date one that exists, a region or
# Defender URL one the deployment's cloud documents (and not both), a name or GUID not already registered
# with another. A request valid by the schema may still be a 400 on these operations (and only on these).
# A body over the 16 KiB limit is a 413 before its fields are looked at.
[[operations]]
include-operation-id = ["issue_token", "configure_tenant", "create_tenant"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
checks.negative_data_rejection.expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]

[[operations]]
include-operation-id = ["list_incidents", "query_audit", "consent_callback"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about 4,000 requests, minutes on a busy two-core machine
def test_schemathesis_finds_nothing_with_all_checks(
    sandbox: Sandbox, fuzz_broker: BrokerServer, fuzz_caller: Identity, tmp_path: Path
) -> None:
    """schemathesis (examples, coverage and fuzzing phases, every check) against the live broker: no server
    error, no undocumented status, no response off its schema, no header or content type off the document."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG.format(examples=int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", "250"))))
    junit = tmp_path / "junit.xml"
    token = token_for(sandbox, fuzz_caller, lifetime=3600)
    ran = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{fuzz_broker.url}/api/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {token}",
            # One worker: CPython 3.11.7's ast.parse is not thread-safe (gh-106905, "AST constructor recursion
            # depth mismatch"), and hypothesis parses lambdas while describing strategies.
            "--workers",
            "1",
            "--seed",
            "1313",
            "--report",
            "junit",
            "--report-junit-path",
            str(junit),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    tree = ET.parse(junit).getroot()  # noqa: S314 (schemathesis wrote it, in this test's own folder)
    cases = tree.findall(".//testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    (tmp_path / "schemathesis.out").write_text(ran.stdout)
    assert ran.returncode == 0, _failures(ran.stdout)
    operations = len(list(_operations(create_app(_unconfigured).openapi())))
    assert len(cases) == operations
    assert failed == []
    generated = re.search(r"(\d+) generated", ran.stdout)
    assert generated is not None
    assert int(generated.group(1)) >= 100 * operations, "the run must not pass by testing next to nothing"
    print(f"schemathesis: {generated.group(1)} cases over {operations} operations, all checks, no failure")
    assert "server error" not in ran.stdout.lower()


def _failures(output: str) -> str:
    """schemathesis's report of what failed, without the repetition (each case's reproduction command)."""
    starts = [i for i in (output.find("ERRORS"), output.find("FAILURES")) if i >= 0]
    section = output[min(starts) if starts else 0 :]
    lines = [line[:300] for line in section.splitlines() if line.strip()]
    return "\n".join(lines[:200])


@pytest.mark.slow
def test_a_client_generated_from_the_document_gets_a_token(
    sandbox: Sandbox, fuzz_broker: BrokerServer, fuzz_caller: Identity, tmp_path: Path
) -> None:
    """openapi-python-client, given the served document, generates a client whose ``issue_token`` takes the
    body (the scope an enum of this deployment's scopes) and returns a typed token, or the problem."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(fuzz_broker.client.get("/api/openapi.json").json()))
    generated = subprocess.run(
        [
            str(Path(sys.executable).parent / "openapi-python-client"),
            "generate",
            "--path",
            str(spec),
            "--output-path",
            str(tmp_path / "generated"),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    program = f"""
import json, sys
sys.path.insert(0, {str(tmp_path)!r})
from generated import AuthenticatedClient
from generated.api.default import issue_token
from generated.models import TokenRequest, TokenRequestScope, TokenResponse
client = AuthenticatedClient(base_url={fuzz_broker.url!r}, token={token_for(sandbox, fuzz_caller)!r})
with client:
    body = TokenRequest(tenant="fabrikam", scope=TokenRequestScope({GRAPH!r}), min_ttl_seconds=600)
    answer = issue_token.sync_detailed(client=client, body=body)
    token = answer.parsed
    assert isinstance(token, TokenResponse), (answer.status_code, answer.content[:300])
    unknown = TokenRequest(tenant="no-such-tenant", scope=TokenRequestScope({GRAPH!r}))
    refused = issue_token.sync_detailed(client=client, body=unknown)
print(json.dumps({{"token": token.access_token, "tenant_id": token.tenant_id, "refused": refused.status_code,
                  "code": json.loads(refused.content)["code"]}}))
"""
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout)
    fabrikam = sandbox.directory.tenant("fabrikam")
    assert fabrikam is not None
    assert answer["tenant_id"] == fabrikam.tenant_id
    assert decode_claims(answer["token"])["tid"] == fabrikam.tenant_id
    assert (answer["refused"], answer["code"]) == (404, "unknown_tenant")


def test_the_runbook_knows_every_documented_code(document: dict[str, Any]) -> None:
    """Every code the document promises has its entry in docs/operations.md."""
    runbook = (ROOT / "docs" / "operations.md").read_text()
    codes = {code for _, _, op in _operations(document) for code in op.get("x-contract", {}).get("codes", [])}
    assert codes
    assert {c for c in codes if f"`{c}`" not in runbook} == set()
    assert DEFENDER
