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
def broker_process(env: dict[str, str], *, request_log: bool = True) -> Iterator[tuple[str, int]]:
    """``python -m broker serve`` on a free loopback port: (host, port); ``request_log=False`` silences the
    per-request summary line (``bench.serve``), to measure what it costs."""
    port = free_port()
    command = ["broker", "serve"] if request_log else ["bench.serve", "--no-request-log"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *command, "--host", "127.0.0.1", "--port", str(port)],
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


@dataclass
class WrkResult:
    """What one wrk run measured: requests/s, latency percentiles (ms), and any non-2xx answers."""

    rps: float
    p50: float
    p99: float
    requests: int
    errors: int

    def line(self, label: str) -> str:
        return f"{label:<52} {self.rps:>8.0f} req/s   p50 {self.p50:>6.2f} ms   p99 {self.p99:>6.2f} ms"


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    body: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """Run wrk (one thread: the broker needs the other core) against ``url``; POST ``body`` when given."""
    lines = []
    if body is not None:
        lines += ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in (headers or {}).items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        run = subprocess.run(
            [
                "wrk",
                "-t1",
                "--timeout",
                "10s",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        os.unlink(script.name)
    out = run.stdout

    def latency(pct: str) -> float:
        match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            raise RuntimeError(f"wrk printed no {pct}% latency:\n{out}")
        return float(match.group(1)) * _WRK_UNITS[match.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not rps or not total:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return WrkResult(float(rps.group(1)), latency("50"), latency("99"), int(total.group(1)), errors)
