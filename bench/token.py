"""Benchmark: POST /api/token, cached, against the two baselines measured in the same run.

Identity-provider latency is 100 ms (the sandbox injects it). Figures:
  - the broker, cached, 1 tenant and 1,000 tenants: requests/s (16 connections) and p50/p99 (1 connection);
  - baseline A: a caller going to the identity provider itself on every request;
  - baseline B: MSAL's in-process cache hit (what the broker adds on top is HTTP and checks);
  - 1,000 concurrent cold requests over 100 tenants: identity-provider calls (must be exactly 100).

Run with ``make bench`` or ``.venv/bin/python -m bench.token [--quick]``.
"""

from __future__ import annotations

import sys

# Run as a script, this folder would come first on sys.path and this file would shadow the standard
# library's ``token`` module (imported by ``logging`` via ``tokenize``): put the repository root there.
if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    sys.path[0] = sys.path[0].rstrip("/")[: -len("bench")] or "."

import argparse
import random
import statistics
import time
import uuid

import msal
import requests

from bench.harness import broker_process, post_json, run_load, stack
from broker import wiring
from broker.settings import Settings

DEFENDER = "https://api.security.microsoft.com/.default"
IDP_LATENCY = 0.1


def _register(env: dict[str, str], names_and_ids: list[tuple[str, str]]) -> None:
    container = wiring.build(Settings.from_environ(env), bind_host="127.0.0.1")
    try:
        for name, tid in names_and_ids:
            container.tenants.add(name, tid)
    finally:
        container.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    n_requests = 2_000 if args.quick else 20_000
    n_tenants = 1_000

    with stack() as s:
        # The issuance path alone; what a strict audit write adds is bench/auth.py's measurement.
        s.env["AUDIT_MODE"] = "best_effort"
        print(f"setting up {n_tenants} + 100 tenants in the sandbox and the registry…", flush=True)
        warm = [(f"w{i:04d}", s.control.add_tenant(f"w{i:04d}")["tenant_id"]) for i in range(n_tenants)]
        cold = [(f"c{i:03d}", s.control.add_tenant(f"c{i:03d}")["tenant_id"]) for i in range(100)]
        secret = s.control.rotate_client_secret()["value"]  # the broker reads this newest version
        _register(s.env, warm + cold)

        with broker_process(s.env) as (host, port):
            s.control.set_latency("entra", IDP_LATENCY)
            # Warm every tenant's token (100 ms each at the identity provider, 50 at a time).
            warmed = run_load(
                host,
                port,
                [
                    [post_json("/api/token", {"tenant": n, "scope": DEFENDER}, host, port) for n, _ in warm[i::50]]
                    for i in range(50)
                ],
            )
            failed = sorted({status for status in warmed.statuses if status != 200})
            if failed:
                raise SystemExit(
                    f"warm-up: {sum(1 for x in warmed.statuses if x != 200)} requests failed with {failed}"
                )

            def requests_for(tenants: list[tuple[str, str]], count: int) -> list[bytes]:
                rng = random.Random(7)
                bodies = [post_json("/api/token", {"tenant": n, "scope": DEFENDER}, host, port) for n, _ in tenants]
                return [bodies[rng.randrange(len(bodies))] for _ in range(count)]

            results = {}
            for label, tenants in (("1 tenant", warm[:1]), (f"{n_tenants} tenants", warm)):
                before = s.control.count("entra.token")
                latency = run_load(host, port, [requests_for(tenants, n_requests // 4)])
                throughput = run_load(host, port, [requests_for(tenants, n_requests // 16) for _ in range(16)])
                spent = s.control.count("entra.token") - before
                bad = sorted({x for x in latency.statuses + throughput.statuses if x != 200})
                if spent or bad:
                    raise SystemExit(f"cached path ({label}): {spent} identity-provider calls, statuses {bad}")
                results[label] = (latency, throughput)

            # 1,000 concurrent cold requests over 100 tenants: single flight per tenant.
            before = s.control.count("entra.token")
            cold_reqs = [
                [post_json("/api/token", {"tenant": n, "scope": DEFENDER}, host, port)]
                for n, _ in cold
                for _ in range(10)
            ]
            random.Random(3).shuffle(cold_reqs)
            cold_run = run_load(host, port, cold_reqs)
            cold_calls = s.control.count("entra.token") - before

        # Baseline A: the caller goes to the identity provider itself, every time.
        token_url = f"{s.env['AUTHORITY_HOST']}/{warm[0][1]}/oauth2/v2.0/token"
        form = {
            "grant_type": "client_credentials",
            "client_id": s.env["BROKER_CLIENT_ID"],
            "client_secret": secret,
            "scope": DEFENDER,
        }
        session = requests.Session()
        session.trust_env = False
        session.verify = s.env["REQUESTS_CA_BUNDLE"]
        direct = []
        for _ in range(20 if args.quick else 50):
            started = time.perf_counter()
            session.post(token_url, data=form, timeout=10).raise_for_status()
            direct.append(time.perf_counter() - started)
        direct_p50 = statistics.median(direct) * 1000

        # Baseline B: MSAL's own in-process cache hit.
        app = msal.ConfidentialClientApplication(
            s.env["BROKER_CLIENT_ID"],
            client_credential=secret,
            authority=f"{s.env['AUTHORITY_HOST']}/{warm[0][1]}",
            instance_discovery=False,
            http_client=session,
        )
        app.acquire_token_for_client([DEFENDER])
        hits = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(4_000):
                app.acquire_token_for_client([DEFENDER])
            hits.append((time.perf_counter() - started) / 4_000)
        msal_us = statistics.median(hits) * 1e6

    print(
        f"\nPOST /api/token, identity-provider latency {IDP_LATENCY * 1000:.0f} ms, CALLER_AUTH=none, "
        f"AUDIT_MODE=best_effort, run {uuid.uuid4().hex[:6]}"
    )
    print(f"{'':<44} {'throughput (16 conn)':>15}   latency (1 conn)")
    for label, (latency, throughput) in results.items():
        print(throughput.line(f"broker cached, {label}, 16 connections"))
        print(latency.line(f"broker cached, {label}, 1 connection"))
    one = results["1 tenant"][0]
    print(
        f"baseline A: direct to identity provider      p50 {direct_p50:7.2f} ms  ->  broker is {direct_p50 / one.p50:6.0f}x faster at p50"
    )
    print(
        f"baseline B: MSAL in-process cache hit        {msal_us:7.1f} us/call  (the broker adds HTTP, parsing and checks on top)"
    )
    print(
        f"cold: 1000 concurrent requests over 100 tenants -> {cold_calls} identity-provider calls "
        f"(expected 100), wall {cold_run.wall * 1000:.0f} ms, ok {sum(1 for x in cold_run.statuses if x == 200)}/1000"
    )
    best = results[f"{n_tenants} tenants"][1]
    verdict = [
        ("p50 <= 2 ms (1 conn, 1 tenant)", one.p50 <= 2.0),
        (">= 1000 req/s cached (1000 tenants)", best.rps >= 1000),
        (">= 50x the direct baseline", direct_p50 / one.p50 >= 50),
        ("exactly 100 identity-provider calls for the cold burst", cold_calls == 100),
    ]
    for label, ok in verdict:
        print(f"  [{'ok' if ok else 'MISS'}] {label}")


if __name__ == "__main__":
    main()
