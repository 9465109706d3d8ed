"""Benchmark: what caller authentication, the policy and the audit log add to the cached ``POST /api/token``.

One run, the same sandbox process and Azurite, three brokers (each ``python -m broker serve`` in its own
process, own storage prefix), the same cached token requests:

  - baseline: ``CALLER_AUTH=none``, ``AUDIT_MODE=best_effort`` (no check, the record is not waited for);
  - entra + best effort: bearer validation (cached), caller switch, rate limit, policy, record queued;
  - entra + strict: as above, and the response waits for its audit record in Azure Storage (Azurite).

Figures: p50/p99 at 1 connection (latency) and requests/s at 16 connections (throughput), and what each
adds to the baseline. Strict mode waits for one durable write, so its figure is read against the floor
this run measures on the same Azurite: the time of one insert of an audit row. ``--compare-writes`` also
times the two ways to store N records in one round trip (a transaction of N rows, one row holding N).
Run with ``make bench`` or ``.venv/bin/python -m bench.auth [--quick] [--compare-writes]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from azure.data.tables import TableClient, TableServiceClient

from bench.harness import LoadResult, broker_process, post_json, run_load, stack
from broker import wiring
from broker.audit.records import ZERO_MAC, AuditRecord, Key, block_entity, chain, chain_key
from broker.settings import Settings

DEFENDER = "https://api.security.microsoft.com/.default"
ROLES = ["Broker.Token.Request"]


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _timed(write: Callable[[], object], reps: int) -> tuple[float, float]:
    """p50 and p99 of ``write`` in ms, after a few unmeasured calls."""
    for _ in range(5):
        write()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        write()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


class _Rows:
    """Audit rows as the broker writes them (a realistic record), each with a fresh key."""

    def __init__(self) -> None:
        self.seq = 0
        self.key = Key("bench-audit-key/1", uuid.uuid4().hex.encode() * 2)

    def records(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            self.seq += 1
            record = AuditRecord(
                action="token",
                outcome="issued",
                code="ok",
                caller=str(uuid.uuid4()),
                caller_app=str(uuid.uuid4()),
                tenant=str(uuid.uuid4()),
                tenant_name="contoso",
                scope=DEFENDER,
                request_id=uuid.uuid4().hex,
                expires_on=int(time.time()) + 3600,
                fingerprint="0f" * 8,
            )
            out.append(chain(record, "20000101", self.seq, ZERO_MAC, "-", self.key))
        return out

    def block(self, n: int) -> dict[str, Any]:
        rows = self.records(n)
        return block_entity("20000101", chain_key(self.seq), rows, self.seq)

    def singles(self, n: int) -> list[dict[str, Any]]:
        return [block_entity("20000101", chain_key(r["seq"]), [r], r["seq"]) for r in self.records(n)]


def storage_floor(connection_string: str, *, reps: int, compare: bool) -> tuple[float, float]:
    """The p50/p99 of one insert of an audit row on this Azurite; with ``compare`` also print N-record writes."""
    service = TableServiceClient.from_connection_string(connection_string)
    table: TableClient = service.create_table(f"benchfloor{uuid.uuid4().hex[:8]}")
    rows = _Rows()
    try:
        floor = _timed(lambda: table.create_entity(rows.block(1)), reps)
        if compare:
            print("\nstoring N records in one round trip on Azurite (p50 / p99 ms, per record at p50):")
            for n in (1, 4, 16, 32):

                def transaction(n: int = n) -> object:
                    return table.submit_transaction([("create", e) for e in rows.singles(n)])

                def one_row(n: int = n) -> object:
                    return table.create_entity(rows.block(n))

                tx = _timed(transaction, reps)
                block = _timed(one_row, reps)
                print(
                    f"  N={n:<3} transaction of N rows {tx[0]:7.2f} / {tx[1]:7.2f} ({tx[0] / n:5.2f})   "
                    f"one row holding N {block[0]:6.2f} / {block[1]:6.2f} ({block[0] / n:5.2f})"
                )
        return floor
    finally:
        service.delete_table(table.table_name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument(
        "--compare-writes", action="store_true", help="also time a transaction of N rows against one row of N"
    )
    args = parser.parse_args()
    n = 2_000 if args.quick else 10_000

    with stack(storage_prefix="benchauth") as s:
        name = next(t["name"] for t in s.control.tenants() if not t.get("home"))
        token = s.control.mint_caller_token(roles=ROLES, lifetime=3 * 3600)
        app_id = str(_claims(token)["azp"])
        caller_policy = json.dumps(
            {"callers": [{"name": "bench", "app_id": app_id, "tenants": [name], "scopes": [DEFENDER]}]}
        )
        configs = {
            "baseline (auth off, audit not awaited)": {"CALLER_AUTH": "none", "AUDIT_MODE": "best_effort"},
            "entra + policy + audit best_effort": {"CALLER_AUTH": "entra", "AUDIT_MODE": "best_effort"},
            "entra + policy + audit strict": {"CALLER_AUTH": "entra", "AUDIT_MODE": "strict"},
        }
        results: dict[str, tuple[LoadResult, LoadResult]] = {}
        for index, (label, extra) in enumerate(configs.items()):
            env = {
                **s.env,
                **extra,
                "STORAGE_PREFIX": f"benchauth{index}",
                "CALLER_POLICY": caller_policy,
                "CALLER_RATE_PER_MINUTE": "1000000",
            }
            container = wiring.build(Settings.from_environ(env), bind_host="127.0.0.1")
            tid = next(t["tenant_id"] for t in s.control.tenants() if t["name"] == name)
            container.tenants.add(name, tid)
            container.close()
            headers = {"Authorization": f"Bearer {token}"} if extra["CALLER_AUTH"] == "entra" else {}
            with broker_process(env) as (host, port):
                request = post_json("/api/token", {"tenant": name, "scope": DEFENDER}, host, port, headers)
                warm = run_load(host, port, [[request] * 50])
                assert all(code == 200 for code in warm.statuses), f"{label}: warm-up failed {set(warm.statuses)}"
                before = s.control.count("entra.token")
                latency = run_load(host, port, [[request] * n])
                throughput = run_load(host, port, [[request] * (n // 8) for _ in range(16)])
                assert s.control.count("entra.token") == before, "the cached path called the identity provider"
                results[label] = (latency, throughput)
            time.sleep(0.2)
        floor = storage_floor(
            s.env["AzureWebJobsStorage"], reps=100 if args.quick else 300, compare=args.compare_writes
        )

    print(f"\nPOST /api/token, cached, {n} requests at 1 connection, {n * 2} at 16 connections")
    base_latency, base_throughput = results["baseline (auth off, audit not awaited)"]
    for label, (latency, throughput) in results.items():
        print(latency.line(f"{label}, 1 conn"))
        print(throughput.line(f"{label}, 16 conn"))
    print()
    for label, (latency, throughput) in list(results.items())[1:]:
        print(
            f"added by {label:<38} p50 {latency.p50 - base_latency.p50:+7.3f} ms   "
            f"p99 {latency.pct(0.99) - base_latency.pct(0.99):+7.3f} ms   "
            f"16-conn p50 {throughput.p50 - base_throughput.p50:+7.3f} ms   "
            f"throughput {throughput.rps / base_throughput.rps * 100:5.1f}% of baseline"
        )
    strict = results["entra + policy + audit strict"][0]
    added = strict.p50 - base_latency.p50
    print(
        f"floor: one Azurite insert of an audit row, same run: p50 {floor[0]:.3f} ms   p99 {floor[1]:.3f} ms"
        f"   (strict adds {added:.3f} ms at p50 = {added / floor[0]:.2f}x the floor)"
    )
    print(
        f"  [{'ok' if added <= 0.5 else 'MISS'}] <= 0.5 ms added at p50 (strict, 1 conn): strict waits for one "
        "durable remote write, so it cannot beat the floor above; best effort is the mode that can"
    )


if __name__ == "__main__":
    main()
