"""Incident prefetch benchmark: backfill, incremental run and memory, against the sandbox and Azurite.

    python bench/sync.py            # the issue's size: 200 tenants x 2,000 incidents, 100 ms API latency
    python bench/sync.py --quick    # 10 tenants x 400 incidents (a minute or so)

The sandbox runs in its own process (``python -m sandbox``), Azurite in its own; the broker syncs in this
process exactly as ``python -m broker sync`` does. Figures printed:

- backfill wall time against two lower bounds: the budget/page-size bound (every tenant in parallel, its
  ``ceil(N / page)`` calls back to back at the API latency, plus a minute for every ``SYNC_BUDGET_PER_MINUTE``
  calls beyond the first minute's), and the same with this run's ``--parallel`` tenants at a time;
- an incremental run after 1 % of each tenant's incidents changed: API calls against ``tenants + extra
  pages`` (one page per tenant holds the overlap plus the changes);
- peak traced memory of one tenant's backfill at two sizes (pages are streamed: it should not grow with N);
- the most calls the sandbox saw for one tenant in any 60 s window, against the budget.
"""

# ruff: noqa: E402  (sys.path is fixed before anything imports the token module)

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where bench/token.py would shadow the
# standard library's token module (imported by tracemalloc, inspect, ...): put the repository there instead.
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse
import json
import math
import os
import random
import subprocess
import tempfile
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from broker import wiring
from broker.errors import BrokerError
from broker.incidents.sync import MAX_DEQUEUE_COUNT, RunReport
from broker.settings import Settings
from broker.tenants import Tenant
from sandbox.azurite import start_azurite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 tenants x 400 incidents")
    parser.add_argument("--tenants", type=int, default=None)
    parser.add_argument("--incidents", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.1, help="Defender API latency (s)")
    parser.add_argument("--alerts", type=int, default=1, help="alerts per incident (pages are inline-heavy)")
    parser.add_argument("--parallel", type=int, default=8, help="tenants synced at once")
    args = parser.parse_args()
    tenants_n = args.tenants or (10 if args.quick else 200)
    incidents_n = args.incidents or (400 if args.quick else 2000)
    mem_sizes = (200, 800) if args.quick else (1000, 4000)

    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    azurite = start_azurite(work / "azurite")
    env_file = work / "sandbox.json"
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--state-dir", str(work / "sandbox"), "--env-file", str(env_file)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            if sandbox.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox did not start")
            time.sleep(0.1)
        box_env: dict[str, str] = json.loads(env_file.read_text())
        return run(box_env, azurite.connection_string, tenants_n, incidents_n, mem_sizes, args)
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=30)
        azurite.stop()


def run(
    box_env: dict[str, str],
    connection: str,
    tenants_n: int,
    incidents_n: int,
    mem_sizes: tuple[int, int],
    args: argparse.Namespace,
) -> int:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
        os.environ[name] = box_env[name]
    control = httpx.Client(base_url=box_env["SANDBOX_CONTROL_URL"] + "/_sandbox", trust_env=False, timeout=300)
    env = {
        **{k: v for k, v in box_env.items() if k != "SANDBOX_CONTROL_URL"},
        "AzureWebJobsStorage": connection,
        "STORAGE_PREFIX": "b" + uuid.uuid4().hex[:10],
        "CALLER_AUTH": "none",
        "SYNC_LOOKBACK_DAYS": "3650",
    }
    settings = Settings.from_environ(env)
    c = wiring.build(settings, bind_host="127.0.0.1")
    per_minute = settings.sync_budget_per_minute

    def add_tenant(count: int) -> Tenant:
        name = "b" + uuid.uuid4().hex[:10]
        made = control.post("/tenants", json={"name": name}).raise_for_status().json()
        body = {"count": count, "alerts_per_incident": args.alerts, "return_incidents": False}
        control.post(f"/security/tenants/{made['tenant_id']}/seed", json=body).raise_for_status()
        return c.tenants.add(name, made["tenant_id"])

    # -- memory at two sizes (no latency: only the streaming matters) ----------------------------------
    peaks = []
    for size in mem_sizes:
        tenant = add_tenant(size)
        tracemalloc.start()
        tracemalloc.reset_peak()
        report = c.incidents.run(tenant, max_wait=3600)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        if report.outcome != "complete" or report.stored != size:
            raise RuntimeError(report.summary())
    print(
        f"memory: peak traced during one tenant's backfill: {mem_sizes[0]} incidents {peaks[0] / 1e6:.1f} MB, "
        f"{mem_sizes[1]} incidents {peaks[1] / 1e6:.1f} MB (ratio {peaks[1] / peaks[0]:.2f} for "
        f"{mem_sizes[1] / mem_sizes[0]:.0f}x the incidents)",
        flush=True,
    )

    # -- backfill ------------------------------------------------------------------------------------------
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        tenants = list(pool.map(lambda _: add_tenant(incidents_n), range(tenants_n)))
    print(f"seeded {tenants_n} tenants x {incidents_n} incidents in {time.perf_counter() - started:.1f} s", flush=True)
    control.post("/latency", json={"service": "defender", "seconds": args.latency}).raise_for_status()
    control.delete("/counters").raise_for_status()

    def sync_all() -> tuple[float, list[RunReport]]:
        begun = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            reports = list(pool.map(one, tenants))
        return time.perf_counter() - begun, reports

    def one(tenant: Tenant) -> RunReport:
        """As the queue would: a failed run (storage hiccup) is delivered again and resumes."""
        for _ in range(MAX_DEQUEUE_COUNT - 1):
            try:
                return c.incidents.run(tenant, max_wait=3600)
            except BrokerError as exc:
                print(f"retrying {tenant.name} after {exc.code}", flush=True)
        return c.incidents.run(tenant, max_wait=3600)

    c.storage.requests.clear()
    wall, reports = sync_all()
    requests = dict(c.storage.requests)
    failed = [r for r in reports if r.outcome != "complete"]
    calls = sum(r.calls for r in reports)
    pages = math.ceil(incidents_n / 100)
    budget_wait = max(0, math.ceil(pages / per_minute) - 1) * 60.0
    bound_parallel = pages * args.latency + budget_wait
    bound_ours = math.ceil(tenants_n / args.parallel) * pages * args.latency + budget_wait
    stored = sum(r.stored for r in reports)
    print(
        f"backfill: {tenants_n} tenants x {incidents_n} incidents, latency {args.latency * 1000:.0f} ms: "
        f"wall {wall:.1f} s, {stored} stored, {calls} API calls ({calls / tenants_n:.1f}/tenant, minimum "
        f"{pages}), failed {len(failed)}",
        flush=True,
    )
    print(
        f"backfill: lower bound (budget {per_minute}/min, page 100, all tenants at once) {bound_parallel:.1f} s "
        f"-> ratio {wall / bound_parallel:.1f}; with {args.parallel} tenants at a time {bound_ours:.1f} s "
        f"-> ratio {wall / bound_ours:.2f}",
        flush=True,
    )
    print(
        f"backfill: throughput {stored / wall:.0f} incidents/s; API-budget lower bound with {args.parallel} tenants "
        f"at a time {stored / bound_ours:.0f} incidents/s",
        flush=True,
    )
    all_pages = sum(r.pages for r in reports)
    print(
        f"backfill: storage requests {sum(requests.values())} for {all_pages} pages = "
        f"{sum(requests.values()) / all_pages:.2f} per page ("
        + ", ".join(f"{k} {v / all_pages:.2f}" for k, v in sorted(requests.items()))
        + ")",
        flush=True,
    )

    # -- incremental with 1 % changed ----------------------------------------------------------------------
    rng = random.Random(7)
    changed_per_tenant = max(1, incidents_n // 100)
    control.post("/latency", json={"service": "defender", "seconds": 0}).raise_for_status()

    def change(tenant: Tenant) -> None:
        truth = control.get(f"/security/tenants/{tenant.tenant_id}/truth").raise_for_status().json()["incidents"]
        for doc in rng.sample(truth, changed_per_tenant):
            control.patch(
                f"/security/tenants/{tenant.tenant_id}/incidents/{doc['incidentId']}", json={"severity": "High"}
            ).raise_for_status()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(change, tenants))
    control.post("/latency", json={"service": "defender", "seconds": args.latency}).raise_for_status()
    control.delete("/counters").raise_for_status()
    wall2, reports2 = sync_all()
    counted = control.get("/counters", params={"prefix": "defender.incidents"}).json()["counts"]
    seen = sum(v for k, v in counted.items() if ":" in k and any(k.endswith(t.tenant_id) for t in tenants))
    extra = sum(max(0, r.pages - 1) for r in reports2)
    print(
        f"incremental: {changed_per_tenant} changed per tenant: wall {wall2:.1f} s, API calls {seen} "
        f"(tenants {tenants_n} + extra pages {extra} = {tenants_n + extra}), stored {sum(r.stored for r in reports2)}",
        flush=True,
    )
    worst = 0
    for tenant in tenants[: min(10, len(tenants))]:
        stats = control.get(f"/security/tenants/{tenant.tenant_id}/stats", params={"api": "defender"}).json()
        worst = max(worst, int(stats["max_per_minute"]))
    print(f"quota: most calls one tenant made in any 60 s window: {worst} (budget {per_minute})", flush=True)
    c.close()
    return 0 if not failed and seen == tenants_n + extra and worst <= per_minute else 1


if __name__ == "__main__":
    raise SystemExit(main())
