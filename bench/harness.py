"""What the benchmarks share: the sandbox and the broker in their own processes, Azurite, a load generator.

The load generator speaks HTTP/1.1 keep-alive over raw asyncio streams so that the client costs a few
microseconds per request and the figures are the broker's, not the client library's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox.azurite import free_port, start_azurite, wait_for_port
from sandbox.client import ControlClient

ROOT = Path(__file__).resolve().parent.parent

_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)


@dataclass
class Stack:
    """A sandbox process, Azurite, and the environment a broker needs to use them."""

    env: dict[str, str]
    control: ControlClient
    workdir: Path


@contextmanager
def stack(*, storage_prefix: str = "bench") -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        work = Path(tmp)
        env_file = work / "sandbox.json"
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--state-dir", str(work / "sandbox"), "--env-file", str(env_file)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        azurite = None
        try:
            deadline = time.monotonic() + 60
            while not env_file.exists():
                if sandbox.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the sandbox did not start")
                time.sleep(0.05)
            sandbox_env = json.loads(env_file.read_text())
            azurite = start_azurite(work / "azurite")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MSI_"))}
            env.update(sandbox_env)
            env.update(
                {
                    "AzureWebJobsStorage": azurite.connection_string,
                    "STORAGE_PREFIX": storage_prefix,
                    "CALLER_AUTH": "none",
                    # One client stands in for many callers here: the benchmarks measure the token
                    # path, not the per-caller rate limit (tests cover that).
                    "CALLER_RATE_PER_MINUTE": "1000000",
                }
            )
            control = ControlClient(sandbox_env["SANDBOX_CONTROL_URL"])
            try:
                yield Stack(env, control, work)
            finally:
                control.close()
        finally:
            if azurite is not None:
                azurite.stop()
            sandbox.terminate()
            sandbox.wait(timeout=15)


@contextmanager
def broker_process(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``python -m broker serve`` on a free loopback port: (host, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 30, proc)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def post_json(path: str, body: dict[str, object], host: str, port: int, headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{extra}\r\n"
    )
    return head.encode() + payload


async def _connection(
    host: str, port: int, requests: Sequence[bytes], latencies: list[float], statuses: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH.search(head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            latencies.append(time.perf_counter() - started)
            statuses.append(int(head[9:12]))
    finally:
        writer.close()
        await writer.wait_closed()


@dataclass
class LoadResult:
    latencies: list[float]
    statuses: list[int]
    wall: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000

    def line(self, label: str) -> str:
        ok = sum(1 for s in self.statuses if s == 200)
        return (
            f"{label:<44} {self.rps:>9.0f} req/s   p50 {self.p50:>7.2f} ms   p99 {self.pct(0.99):>7.2f} ms"
            f"   ok {ok}/{len(self.statuses)}"
        )


def run_load(host: str, port: int, per_connection: Sequence[Sequence[bytes]]) -> LoadResult:
    """Send each connection's requests in order, all connections at once; time every request."""
    latencies: list[float] = []
    statuses: list[int] = []

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(_connection(host, port, reqs, latencies, statuses) for reqs in per_connection))
        return time.perf_counter() - started

    wall = asyncio.run(main())
    return LoadResult(latencies, statuses, wall)
