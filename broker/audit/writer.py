"""Group commit, in this process (a thread) or in a writer process fed over a pipe.

``GroupCommit`` is the loop both run: it takes every pending record of a day (up to a block's worth),
commits them as one block, and tells each record's waiter; between blocks it appends anchors when due.
A record nobody waits for (best effort) is dropped, counted and logged once a second when more than
``MAX_PENDING`` wait; a record somebody waits for is never dropped. On ``close`` it drains for at most
``drain_seconds`` and counts what it could not write as lost.

``ProcessTransport`` is the broker's side of the writer process (``python -m broker.audit``): one
JSON line per record into the child's stdin, acknowledgements (for awaited records only) back on its
stdout. The child lives exactly as long as the pipe: when the broker closes it, or dies, the child sees
end-of-file, drains and exits; SIGTERM starts its drain clock.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from broker.audit.anchors import Anchors
from broker.audit.chain import ChainWriter
from broker.audit.records import AuditRecord, Key, KeyRing, PushedKey, Written, size
from broker.errors import AuditUnavailable

log = logging.getLogger(__name__)

MAX_RECORDS_PER_BLOCK = 100
MAX_BLOCK_CHARS = 300_000  # JSON per row; stored as UTF-16, well under the 1 MiB entity limit
MAX_PENDING = 10_000
MAX_PIPE_BACKLOG = 4 * 1024 * 1024  # bytes the broker buffers when the writer process reads too slowly
DRAIN_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 30.0
COALESCE_SECONDS = 0.005
GROUP_LINGER_SECONDS = 0.002
_DROP_LOG_SECONDS = 1.0

Done = Callable[[Written | None, BaseException | None], None]


@dataclass
class _Item:
    record: AuditRecord
    required: bool
    done: Done


class DropCounter:
    """Counts best-effort records that were not kept; logs the count at most once a second."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self._logged = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.count += n
            now = time.monotonic()
            if now - self._last < _DROP_LOG_SECONDS:
                return
            self._last = now
            new, self._logged = self.count - self._logged, self.count
        log.error(
            "audit.drop where=%s dropped=%d total=%d (best effort; waited-for records are never dropped)",
            self.where,
            new,
            self.count,
        )


class GroupCommit:
    def __init__(
        self,
        writer: ChainWriter,
        *,
        drain_seconds: float = DRAIN_SECONDS,
        max_pending: int = MAX_PENDING,
        where: str = "thread",
    ) -> None:
        self.writer = writer
        self.drain_seconds = drain_seconds
        self.max_pending = max_pending
        self.drops = DropCounter(where)
        self.written = 0
        self.lost = 0
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._barriers: list[tuple[int, Callable[[], None]]] = []
        self._taken = 0  # items handed to the chain so far (for barriers)
        self._queued = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline = float("inf")
        self._in_flight = False
        self._expect = 0  # records expected in the next block (see _run)
        self._linger_until = 0.0

    def submit(self, record: AuditRecord, *, required: bool, done: Done) -> bool:
        """Queue ``record``; False (and counted) when it is best effort and the queue is full."""
        with self._cond:
            if self._closed:
                if required:
                    raise AuditUnavailable(diagnostic="audit log closed")
                self.drops.add()
                return False
            if len(self._pending) >= self.max_pending and not required:
                self.drops.add()
                return False
            self._pending.append(_Item(record, required, done))
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    def barrier(self, then: Callable[[], None]) -> None:
        """Call ``then`` once every record queued so far is written (or failed), index rows included."""
        with self._cond:
            self._barriers.append((self._queued, then))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, *, drain_seconds: float | None = None) -> None:
        """Stop taking records, write what is queued within the drain window, count the rest as lost."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._deadline = time.monotonic() + (self.drain_seconds if drain_seconds is None else drain_seconds)
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, self._deadline - time.monotonic()) + 5.0)
        self.writer.close(1.0)

    def start_drain(self) -> None:
        """Start the drain clock now (SIGTERM) without closing the queue yet."""
        with self._cond:
            self._deadline = min(self._deadline, time.monotonic() + self.drain_seconds)
            self._cond.notify_all()

    def _take(self) -> list[_Item]:
        count, chars = 0, 0
        for item in self._pending:
            chars += size(item.record)
            if count and (count == MAX_RECORDS_PER_BLOCK or chars > MAX_BLOCK_CHARS):
                break
            count += 1
        batch = self._pending[:count]
        del self._pending[:count]
        self._taken += count
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed and not self._barrier_ready():
                    if self.writer.anchor_due():
                        break
                    self._cond.wait(self.writer.anchor_seconds)
                # Group commit that expects its waiters back: the requests the last block released send
                # their next records within a round trip; wait that long (at most GROUP_LINGER_SECONDS)
                # so they share this block instead of splitting into two alternating half-size groups.
                while (
                    self._pending
                    and not self._closed
                    and len(self._pending) < min(self._expect, MAX_RECORDS_PER_BLOCK)
                    and (left := self._linger_until - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
                barriers = self._due_barriers()
                if self._pending and time.monotonic() >= self._deadline:
                    self._give_up()
                    barriers += self._due_barriers()
                batch = self._take() if self._pending else []
                finished = self._closed and not batch
            for then in barriers:
                self.writer.flush_index(max(1.0, min(10.0, self._deadline - time.monotonic())))
                then()
            if batch:
                self._commit(batch)
            if (finished or self.writer.anchor_due()) and self.writer.batches:
                try:
                    self.writer.anchor()
                except Exception as exc:  # the next anchor covers it; verify bounds what it can hide
                    log.error("audit.anchor outcome=failed error=%r", exc)
            if finished:
                self.writer.flush_index(max(1.0, self._deadline - time.monotonic()))
                log.info(
                    "audit.writer outcome=stopped written=%d lost=%d dropped=%d",
                    self.written,
                    self.lost,
                    self.drops.count,
                )
                return

    def _barrier_ready(self) -> bool:
        return any(mark <= self._taken for mark, _ in self._barriers)

    def _due_barriers(self) -> list[Callable[[], None]]:
        """Barriers whose records have all been through the chain (called on the writer thread)."""
        due = [then for (mark, then) in self._barriers if mark <= self._taken]
        self._barriers = [(m, t) for (m, t) in self._barriers if m > self._taken]
        return due

    def _give_up(self) -> None:
        """Past the drain deadline: what is still queued is lost (its waiters get an error)."""
        lost, self._pending = self._pending, []
        self._taken += len(lost)
        self.lost += len(lost)
        error = AuditUnavailable(diagnostic="audit writer stopped before this record was written")
        for item in lost:
            item.done(None, error)
        log.error("audit.writer outcome=lost records=%d (drain window %.1f s over)", len(lost), self.drain_seconds)

    def _commit(self, batch: list[_Item]) -> None:
        with self._cond:
            self._in_flight = True
        try:
            by_day: dict[str, list[_Item]] = {}
            for item in batch:
                by_day.setdefault(item.record.time[:10].replace("-", ""), []).append(item)
            for day, items in by_day.items():
                try:
                    written = self.writer.commit(day, [i.record for i in items])
                except Exception as exc:  # every waiter must learn the outcome
                    log.error("audit.write outcome=failed records=%d error=%r", len(items), exc)
                    error = exc if isinstance(exc, AuditUnavailable) else AuditUnavailable(diagnostic=repr(exc))
                    for item in items:
                        if not item.required:
                            self.lost += 1
                        item.done(None, error)
                    continue
                self.written += len(items)
                for item, where in zip(items, written, strict=True):
                    item.done(where, None)
            with self._cond:
                self._expect = sum(1 for i in batch if i.required) + len(self._pending)
                self._linger_until = time.monotonic() + GROUP_LINGER_SECONDS
        finally:
            with self._cond:
                self._in_flight = False
                self._cond.notify_all()


# -- the writer process --------------------------------------------------------------------------------


class ProcessTransport:
    """The broker's end of the writer process."""

    def __init__(self, env: Mapping[str, str], keys: KeyRing, *, drain_seconds: float = DRAIN_SECONDS) -> None:
        self._env = dict(env)
        self._keys = keys
        self._key_sent = ""
        self.drain_seconds = drain_seconds
        self.drops = DropCounter("broker")
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._backlog = bytearray()
        self._backlog_cond = threading.Condition(self._lock)
        self._waiters: dict[int, Done] = {}
        self._flushes: dict[int, threading.Event] = {}
        self._next = 0
        self._closed = False
        self._ready = threading.Event()

    def submit(self, record: AuditRecord, *, required: bool, done: Done) -> bool:
        with self._lock:
            if self._closed:
                if required:
                    raise AuditUnavailable(diagnostic="audit log closed")
                self.drops.add()
                return False
            if not required and len(self._backlog) > MAX_PIPE_BACKLOG:
                self.drops.add()
                return False
            try:
                self._ensure_child()
            except AuditUnavailable:
                if required:
                    raise
                self.drops.add()
                return False
            self._next += 1
            n = self._next
            if required:
                self._waiters[n] = done
            line = {"n": n, "w": 1 if required else 0, "r": record.fields()}
            self._send((json.dumps(line, separators=(",", ":")) + "\n").encode(), urgent=required)
        return True

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Start the child and wait (at most ``timeout``) until it is ready to write."""
        with self._lock:
            if self._closed:
                return
            try:
                self._ensure_child()
            except AuditUnavailable as exc:  # no key yet: the first record tries again
                log.error("audit.writer outcome=not_started error=%s", exc.diagnostic)
                return
            ready = self._ready
        if not ready.wait(timeout):
            log.error("audit.writer outcome=slow_start waited_s=%.0f", timeout)

    def barrier(self, timeout: float) -> None:
        with self._lock:
            if self._proc is None:
                return
            self._next += 1
            n = self._next
            event = self._flushes[n] = threading.Event()
            self._send((json.dumps({"flush": n}) + "\n").encode())
        event.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        wait = self.drain_seconds + 5.0 if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._lock:
            self._closed = True
            proc = self._proc
            while self._backlog and proc is not None and proc.poll() is None and time.monotonic() < deadline:
                self._backlog_cond.wait(0.05)
            if self._backlog:
                lost = self._backlog.count(b"\n")
                self._backlog.clear()
                log.error("audit.close outcome=lost records=%d (the writer process did not read them in time)", lost)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if proc is not None:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("audit.close outcome=killed (the writer process overran its drain window)")
                proc.kill()
                proc.wait(5)

    # -- internals (called with the lock held) ------------------------------------------------------

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        key = self._keys.current()  # before the child exists: without a key it could write nothing
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.audit"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        self._proc = proc
        self._ready = threading.Event()
        self._fd = os.dup(proc.stdin.fileno())
        proc.stdin.close()
        os.set_blocking(self._fd, False)
        self._backlog.clear()
        self._send_key(key)
        threading.Thread(target=self._read_acks, args=(proc, proc.stdout), name="audit-acks", daemon=True).start()
        threading.Thread(target=self._pump, args=(proc,), name="audit-pipe", daemon=True).start()
        threading.Thread(target=self._rotate, args=(proc,), name="audit-key", daemon=True).start()

    def _send_key(self, key: Key) -> None:
        """Give the child ``key`` (called with the lock held); it uses the newest it was given."""
        secret = base64.b64encode(key.secret).decode()
        self._send((json.dumps({"key": {"id": key.id, "secret": secret}}) + "\n").encode())
        self._key_sent = key.id

    def _rotate(self, proc: subprocess.Popen[bytes]) -> None:
        """Re-read the key every refresh interval (a rotation needs no restart) and pass a new version on."""
        while True:
            time.sleep(self._keys.refresh_seconds)
            with self._lock:
                if self._proc is not proc or self._fd < 0:
                    return
            try:
                key = self._keys.current()
            except AuditUnavailable:
                continue  # logged by the key ring; the child keeps the key it has
            with self._lock:
                if self._proc is proc and self._fd >= 0 and key.id != self._key_sent:
                    self._send_key(key)

    def _send(self, data: bytes, *, urgent: bool = True) -> None:
        """Queue ``data`` for the child (called with the lock held). ``urgent`` (somebody waits) writes now;
        otherwise the pump writes within ``COALESCE_SECONDS``, many records per write: a write per record
        wakes the child once per record, and on a busy machine each wake-up can cost the broker its CPU
        for milliseconds (measured: 6 ms per write under load, most of a best-effort request)."""
        self._backlog += data
        if not urgent:
            self._backlog_cond.notify_all()
            return
        try:
            sent = os.write(self._fd, self._backlog)
        except BlockingIOError:
            sent = 0
        except BrokenPipeError:
            sent = len(self._backlog)  # the ack reader fails the waiters
        del self._backlog[:sent]
        if self._backlog:
            self._backlog_cond.notify_all()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        """Write what waits in the backlog: best-effort records, coalesced, and what the pipe could not take."""
        while True:
            with self._lock:
                while not self._backlog and self._proc is proc and self._fd >= 0:
                    self._backlog_cond.wait(1.0)
                if self._proc is not proc or self._fd < 0:
                    return
                fd = self._fd
            time.sleep(COALESCE_SECONDS)
            select.select([], [fd], [], 0.5)
            with self._lock:
                if self._fd != fd or not self._backlog:
                    continue
                try:
                    sent = os.write(fd, self._backlog)
                except BlockingIOError:
                    sent = 0
                except BrokenPipeError:
                    return
                del self._backlog[:sent]
                self._backlog_cond.notify_all()

    def _read_acks(self, proc: subprocess.Popen[bytes], stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                if "ready" in message:
                    self._ready.set()
                elif "ok" in message:
                    done = [(self._waiters.pop(n, None), Written(day, seq, mac)) for n, day, seq, mac in message["ok"]]
                    for callback, where in done:
                        if callback is not None:
                            callback(where, None)
                elif "err" in message:
                    error = AuditUnavailable(diagnostic=str(message.get("why", "audit write failed")))
                    for n in message["err"]:
                        callback = self._waiters.pop(n, None)
                        if callback is not None:
                            callback(None, error)
                elif "flushed" in message:
                    event = self._flushes.pop(int(message["flushed"]), None)
                    if event is not None:
                        event.set()
        stream.close()
        with self._lock:  # the child is gone: nothing more will be acknowledged
            proc.wait()
            waiters, self._waiters = self._waiters, {}
            for event in self._flushes.values():
                event.set()
            self._flushes.clear()
            if self._proc is proc:
                self._proc = None
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                self._backlog_cond.notify_all()
        error = AuditUnavailable(diagnostic=f"audit writer process exited ({proc.returncode})")
        for callback in waiters.values():
            callback(None, error)


def child_main(group: GroupCommit, keys: PushedKey, stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The writer process: records from ``stdin`` into ``group``, acknowledgements to ``stdout``."""
    out_lock = threading.Lock()

    def reply(message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with out_lock, contextlib.suppress(BrokenPipeError, ValueError):
            stdout.write(data)
            stdout.flush()

    def acknowledge(n: int) -> Done:
        def done(where: Written | None, error: BaseException | None) -> None:
            if where is not None:
                reply({"ok": [[n, where.day, where.seq, where.mac]]})
            else:
                reply({"err": [n], "why": getattr(error, "diagnostic", "") or repr(error)})

        return done

    def ignore(_where: Written | None, _error: BaseException | None) -> None:
        return None

    def flushed(token: int) -> Callable[[], None]:
        return lambda: reply({"flushed": token})

    reply({"ready": 1})
    signal.signal(signal.SIGTERM, lambda *_: group.start_drain())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker's Ctrl-C reaches us too: drain, don't die
    for raw in stdin:
        try:
            message = json.loads(raw)
            if "key" in message:
                keys.set(Key(str(message["key"]["id"]), base64.b64decode(message["key"]["secret"])))
                continue
            if "flush" in message:
                group.barrier(flushed(int(message["flush"])))
                continue
            record = AuditRecord.from_fields(message["r"])
            required = bool(message.get("w"))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("audit.writer outcome=bad_message error=%r", exc)
            continue
        group.submit(record, required=required, done=acknowledge(int(message["n"])) if required else ignore)
    group.close()
    return 0


def main() -> int:
    """``python -m broker.audit``: the audit writer process, configured from the environment."""
    from broker import wiring
    from broker.settings import Settings
    from broker.storage import StorageAccount

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    wiring.quiet_sdk_loggers()
    settings = Settings.from_environ()
    storage = StorageAccount(settings.storage, wiring.azure_identity(settings))
    keys = PushedKey()
    try:  # be ready before the first record arrives: the table and the anchor container exist
        storage.table("audit")
        storage.container("audit")
    except Exception as exc:  # the first write tries again, and its waiters learn why it failed
        log.error("audit.writer outcome=not_ready error=%r", exc)
    chain = ChainWriter(lambda: storage.table("audit"), Anchors(lambda: storage.container("audit")), keys)
    group = GroupCommit(chain, drain_seconds=settings.audit_drain_seconds, where="writer")
    return child_main(group, keys, sys.stdin.buffer, sys.stdout.buffer)
