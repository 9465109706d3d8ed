"""``python -m devrun.functions_host``: run the non-HTTP functions ``function_app.py`` declares, the way the
Functions host runs them, for ``make run`` (where Core Tools may not be installed).

It indexes the app as the worker does (import ``function_app``, find its one ``FunctionRegister``, call
``get_functions()`` once) and reads every trigger from the bindings — nothing is restated here:

- **timer**: the binding's NCRONTAB ``schedule``, with ``%NAME%`` resolved from the settings; UTC; a tick
  that comes late (the previous invocation overran) is delivered with ``past_due=True``; never at start-up
  unless the binding says ``runOnStartup``.
- **queue**: the binding's ``queueName`` (``%NAME%`` resolved) through its ``connection`` setting, polled with
  the Storage SDK. host.json's ``extensions.queues`` applies as the host applies it: ``batchSize`` messages
  at a time, each received invisible for the function timeout; on success the message is deleted; on
  failure it becomes visible again after ``visibilityTimeout``, and after ``maxDequeueCount`` attempts it
  moves to ``<queue>-poison``; the poll interval backs off to ``maxPollingInterval`` while the queue is
  empty. Messages are base64, the host's default ``messageEncoding``.

One line per invocation (``function=… outcome=… duration_ms=…``), never a message body.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import azure.functions as func
from azure.functions.queue import QueueMessage as TriggerMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueClient, QueueMessage

from devrun.ncrontab import Schedule

log = logging.getLogger("devrun.host")

ROOT = Path(__file__).resolve().parent.parent
_SETTING = re.compile(r"%([A-Za-z0-9_]+)%")
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})$")


@dataclass(frozen=True)
class QueueOptions:
    """host.json ``extensions.queues``, with the host's defaults for what it leaves out."""

    batch_size: int = 16
    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    max_polling_interval: float = 60.0
    function_timeout: float = 300.0

    @classmethod
    def from_host_json(cls, host: Mapping[str, Any]) -> QueueOptions:
        queues = host.get("extensions", {}).get("queues", {})
        return cls(
            batch_size=int(queues.get("batchSize", cls.batch_size)),
            max_dequeue_count=int(queues.get("maxDequeueCount", cls.max_dequeue_count)),
            visibility_timeout=timespan(queues.get("visibilityTimeout", "00:00:00")),
            max_polling_interval=timespan(queues.get("maxPollingInterval", "00:01:00")),
            function_timeout=timespan(host.get("functionTimeout", "00:05:00")),
        )


def timespan(text: str) -> float:
    """A .NET ``TimeSpan`` as host.json writes it (``[d.]hh:mm:ss``), in seconds."""
    match = _TIMESPAN.match(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a [d.]hh:mm:ss time span")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def resolve(value: str, settings: Mapping[str, str]) -> str:
    """Replace every ``%NAME%`` with that app setting, as the host does; a missing one is an error."""

    def setting(match: re.Match[str]) -> str:
        name = match.group(1)
        if not settings.get(name):
            raise LookupError(f"binding refers to app setting {name}, which is not set")
        return settings[name]

    return _SETTING.sub(setting, value)


@dataclass(frozen=True)
class Trigger:
    function: str
    kind: str  # "timerTrigger" | "queueTrigger"
    binding: dict[str, Any]
    call: Callable[..., Any]


def index_triggers(app_module: Any) -> list[Trigger]:
    """The app's timer and queue triggers, from the one ``FunctionRegister`` the module holds."""
    apps = [v for v in vars(app_module).values() if isinstance(v, func.FunctionRegister)]
    if len(apps) != 1:
        raise RuntimeError(f"function_app must hold exactly one FunctionApp, found {len(apps)}")
    triggers = []
    for function in apps[0].get_functions():
        for raw in function.get_raw_bindings():
            binding = json.loads(raw)
            if binding.get("type") in ("timerTrigger", "queueTrigger"):
                triggers.append(
                    Trigger(str(function.get_function_name()), binding["type"], binding, function.get_user_function())
                )
    return triggers


def binding_settings(triggers: list[Trigger]) -> set[str]:
    """Every app setting the triggers' bindings name: ``%NAME%`` expressions and ``connection`` settings."""
    names: set[str] = set()
    for trigger in triggers:
        for key, value in trigger.binding.items():
            if isinstance(value, str):
                names.update(_SETTING.findall(value))
                if key == "connection" and value:
                    names.add(value)
    return names


class FunctionsHost:
    """Runs the app's timer and queue triggers until ``stop()``."""

    def __init__(
        self,
        triggers: list[Trigger],
        settings: Mapping[str, str],
        options: QueueOptions,
        *,
        queue_client: Callable[[str, str], QueueClient] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.triggers = triggers
        self.settings = settings
        self.options = options
        self._queue_client = queue_client or self._client_from_settings
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client_from_settings(self, connection: str, queue: str) -> QueueClient:
        conn = self.settings.get(connection, "")
        if not conn:
            raise LookupError(f"queue trigger connection {connection} is not set (a storage connection string)")
        return QueueClient.from_connection_string(conn, queue)

    def start(self) -> FunctionsHost:
        for trigger in self.triggers:
            target = self._timer if trigger.kind == "timerTrigger" else self._queue
            thread = threading.Thread(target=target, args=(trigger,), name=trigger.function, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling and scheduling; invocations under way finish first (as on host shutdown)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    # -- timer ---------------------------------------------------------------------------------------

    def _timer(self, trigger: Trigger) -> None:
        schedule = Schedule.parse(resolve(trigger.binding["schedule"], self.settings))
        arg = trigger.binding["name"]
        due = self._clock() if trigger.binding.get("runOnStartup") else schedule.next_after(self._clock())
        log.info("timer function=%s schedule=%r next=%s", trigger.function, schedule.expression, _stamp(due))
        while not self._stop.is_set():
            wait = (due - self._clock()).total_seconds()
            if wait > 0 and self._stop.wait(wait):
                return
            now = self._clock()
            past_due = (now - due).total_seconds() > 1
            following = schedule.next_after(now)
            status = {"Last": due.isoformat(), "Next": following.isoformat(), "LastUpdated": now.isoformat()}
            request = TimerRequest(past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True})
            self._invoke(trigger, {arg: request})
            self._wake.set()  # the host notices messages its own functions queued; so do we
            due = following

    # -- queue ---------------------------------------------------------------------------------------

    def _queue(self, trigger: Trigger) -> None:
        name = resolve(trigger.binding["queueName"], self.settings)
        queue = self._queue_client(trigger.binding.get("connection") or "AzureWebJobsStorage", name)
        poison = self._queue_client(trigger.binding.get("connection") or "AzureWebJobsStorage", name + "-poison")
        for client in (queue, poison):
            try:
                client.create_queue()
            except Exception as exc:  # already there, or storage not up yet: polling will tell
                log.debug("queue create %s: %s", client.queue_name, exc.__class__.__name__)
        log.info("queue function=%s queue=%s", trigger.function, name)
        opts = self.options
        interval = 0.1
        with ThreadPoolExecutor(max_workers=opts.batch_size, thread_name_prefix=trigger.function) as pool:
            while not self._stop.is_set():
                try:
                    batch = list(
                        queue.receive_messages(
                            messages_per_page=opts.batch_size,
                            max_messages=opts.batch_size,
                            visibility_timeout=int(opts.function_timeout),
                        )
                    )
                except Exception as exc:  # storage hiccup: back off and poll again
                    log.warning("queue poll queue=%s error=%s", name, exc.__class__.__name__)
                    batch = []
                if not batch:
                    self._wake.wait(interval)
                    self._wake.clear()
                    interval = min(opts.max_polling_interval, interval * 2)
                    continue
                interval = 0.1
                list(pool.map(lambda m: self._deliver(trigger, queue, poison, m), batch))

    def _deliver(self, trigger: Trigger, queue: QueueClient, poison: QueueClient, message: QueueMessage) -> None:
        body = _decode(message.content)
        msg = TriggerMessage(  # type: ignore[no-untyped-call]  # the worker's own type, with the dequeue count
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            expiration_time=message.expires_on,
            insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        ok = self._invoke(trigger, {trigger.binding["name"]: msg}, dequeue_count=message.dequeue_count)
        if ok:
            queue.delete_message(message)
        elif (message.dequeue_count or 0) >= self.options.max_dequeue_count:
            poison.send_message(base64.b64encode(body).decode("ascii"))
            queue.delete_message(message)
            log.error("queue function=%s message=%s moved_to=%s", trigger.function, message.id, poison.queue_name)
        else:
            queue.update_message(message, visibility_timeout=int(self.options.visibility_timeout))

    # -- invocation ----------------------------------------------------------------------------------

    def _invoke(self, trigger: Trigger, kwargs: dict[str, Any], *, dequeue_count: int | None = None) -> bool:
        started = time.perf_counter()
        extra = f" dequeue_count={dequeue_count}" if dequeue_count is not None else ""
        try:
            trigger.call(**kwargs)
        except Exception as exc:  # the host logs a failed invocation and carries on
            log.warning(
                "invocation function=%s outcome=failed error=%s%s duration_ms=%.0f",
                trigger.function,
                exc.__class__.__name__,
                extra,
                (time.perf_counter() - started) * 1000,
            )
            return False
        log.info(
            "invocation function=%s outcome=succeeded%s duration_ms=%.0f",
            trigger.function,
            extra,
            (time.perf_counter() - started) * 1000,
        )
        return True


def _decode(content: Any) -> bytes:
    raw = content if isinstance(content, bytes) else str(content).encode()
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw  # the host hands a message that is not base64 over as it is


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s host %(message)s", datefmt="%H:%M:%S")
    for noisy in ("azure", "urllib3", "msal"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    import function_app  # indexed here, as the worker indexes it
    from broker import wiring
    from broker.settings import SETTINGS, Settings

    # Built here, as `broker serve` builds it, because this process listens on no address at all: the
    # loopback-only check on CALLER_AUTH=none holds for it as for the CLI.
    wiring.install(wiring.build(Settings.from_environ(), bind_host="127.0.0.1"))

    options = QueueOptions.from_host_json(json.loads((ROOT / "host.json").read_text()))
    # Azure's host resolves %NAME% from app settings alone (the Bicep sets every one the bindings name);
    # here the broker's own defaults stand in for those the environment leaves unset.
    settings = {s.name: s.default for s in SETTINGS if s.default} | dict(os.environ)
    host = FunctionsHost(index_triggers(function_app), settings, options).start()
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    stopped.wait()
    host.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
