"""make run's local Functions host: the app's own triggers, delivered the way the Functions host delivers
them (schedule from the binding, base64 queue messages, dequeue count, retry delay, poison queue)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from devrun.functions_host import FunctionsHost, QueueOptions, Trigger, resolve, timespan

ROOT = Path(__file__).resolve().parent.parent


def test_host_json_queue_options_are_read_as_the_host_reads_them() -> None:
    """batchSize, maxDequeueCount, visibilityTimeout, maxPollingInterval and functionTimeout come from host.json."""
    host = json.loads((ROOT / "host.json").read_text())
    options = QueueOptions.from_host_json(host)
    queues = host["extensions"]["queues"]
    assert options.batch_size == queues["batchSize"]
    assert options.max_dequeue_count == queues["maxDequeueCount"]
    assert options.visibility_timeout == timespan(queues["visibilityTimeout"])
    assert options.max_polling_interval == timespan(queues["maxPollingInterval"])
    assert options.function_timeout == timespan(host["functionTimeout"]) == 600.0
    assert timespan("1.02:03:04") == 93784.0
    with pytest.raises(ValueError, match="time span"):
        timespan("10 minutes")


def test_binding_expressions_resolve_from_app_settings_only() -> None:
    """%NAME% is an app setting; a missing one stops that trigger with the setting's name."""
    assert resolve("%Q%-x", {"Q": "incident-sync"}) == "incident-sync-x"
    with pytest.raises(LookupError, match="INCIDENT_SYNC_QUEUE"):
        resolve("%INCIDENT_SYNC_QUEUE%", {})


def test_the_apps_own_triggers_are_indexed_from_function_app() -> None:
    """The timer and the queue trigger come from function_app's bindings, not from a list kept here."""
    script = (
        "import json, function_app\n"
        "from devrun.functions_host import index_triggers\n"
        "print(json.dumps([[t.function, t.kind, t.binding] for t in index_triggers(function_app)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {name: (kind, binding) for name, kind, binding in json.loads(proc.stdout)}
    assert found["incident_sync_timer"][0] == "timerTrigger"
    assert found["incident_sync_timer"][1]["schedule"] == "%INCIDENT_SYNC_SCHEDULE%"
    assert found["incident_sync_tenant"][0] == "queueTrigger"
    assert found["incident_sync_tenant"][1]["queueName"] == "%INCIDENT_SYNC_QUEUE%"
    assert "broker_http" not in found  # HTTP is served by uvicorn, not polled


class Recorder:
    def __init__(self, fail_times: int = 0) -> None:
        self.calls: list[tuple[bytes, int | None]] = []
        self.fail_times = fail_times
        self.lock = threading.Lock()
        self.event = threading.Event()

    def __call__(self, msg: func.QueueMessage) -> None:
        with self.lock:
            self.calls.append((msg.get_body(), msg.dequeue_count))
            self.event.set()
            if len(self.calls) <= self.fail_times:
                raise RuntimeError("boom")


def _queue_trigger(call: Any) -> Trigger:
    binding = {"type": "queueTrigger", "name": "msg", "queueName": "%Q%", "connection": "AzureWebJobsStorage"}
    return Trigger("on_message", "queueTrigger", binding, call)


@pytest.fixture
def queue_name() -> str:
    return f"q{uuid.uuid4().hex[:16]}"


@pytest.fixture
def host_factory(azurite: str, queue_name: str) -> Iterator[Any]:
    hosts: list[FunctionsHost] = []

    def make(trigger: Trigger, **options: Any) -> FunctionsHost:
        settings = {"AzureWebJobsStorage": azurite, "Q": queue_name}
        opts = QueueOptions(**{"batch_size": 4, "max_polling_interval": 0.2, "function_timeout": 30.0, **options})
        host = FunctionsHost([trigger], settings, opts).start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.stop()


def _send(azurite: str, queue: str, body: bytes) -> QueueClient:
    client = QueueClient.from_connection_string(azurite, queue)
    with contextlib.suppress(Exception):  # it may exist already; sending below tells
        client.create_queue()
    client.send_message(base64.b64encode(body).decode())
    return client


def _count(queue: QueueClient) -> int:
    """Messages in ``queue``; 0 while it does not exist yet (the host creates it as its poller starts)."""
    try:
        return queue.get_queue_properties().approximate_message_count
    except ResourceNotFoundError:
        return 0


def _wait(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_message_is_delivered_decoded_with_its_dequeue_count_and_deleted(
    azurite: str, queue_name: str, host_factory: Any
) -> None:
    """A base64 message reaches the function as bytes, dequeue count 1, and is gone after success."""
    recorder = Recorder()
    host_factory(_queue_trigger(recorder))
    client = _send(azurite, queue_name, b'{"tenant": "t"}')
    _wait(lambda: recorder.calls)
    assert recorder.calls[0] == (b'{"tenant": "t"}', 1)
    _wait(lambda: _count(client) == 0)


def test_a_failed_message_is_retried_after_the_visibility_timeout(
    azurite: str, queue_name: str, host_factory: Any
) -> None:
    """A failure makes the message visible again after visibilityTimeout, with the dequeue count grown."""
    recorder = Recorder(fail_times=1)
    host_factory(_queue_trigger(recorder), visibility_timeout=2.0)
    _send(azurite, queue_name, b"again")
    _wait(lambda: len(recorder.calls) >= 2)
    assert [count for _, count in recorder.calls[:2]] == [1, 2]


def test_after_max_dequeue_count_failures_the_message_moves_to_the_poison_queue(
    azurite: str, queue_name: str, host_factory: Any
) -> None:
    """maxDequeueCount failures, then <queue>-poison holds the message and the queue is empty."""
    recorder = Recorder(fail_times=100)
    host_factory(_queue_trigger(recorder), visibility_timeout=0.0, max_dequeue_count=3)
    client = _send(azurite, queue_name, b"poisonous")
    poison = QueueClient.from_connection_string(azurite, queue_name + "-poison")
    _wait(lambda: _count(poison) == 1)
    assert [count for _, count in recorder.calls] == [1, 2, 3], recorder.calls
    assert base64.b64decode(next(iter(poison.peek_messages())).content) == b"poisonous"
    assert client.get_queue_properties().approximate_message_count == 0


def test_the_timer_fires_on_its_schedule_and_not_at_start(azurite: str) -> None:
    """The schedule comes from the binding's app setting; the first tick is the schedule's, not start-up's."""
    ticks: list[tuple[float, func.TimerRequest]] = []
    binding = {"type": "timerTrigger", "name": "timer", "schedule": "%S%", "runOnStartup": False}
    trigger = Trigger("tick", "timerTrigger", binding, lambda timer: ticks.append((time.time(), timer)))
    started = time.time()
    host = FunctionsHost([trigger], {"S": "* * * * * *"}, QueueOptions()).start()
    try:
        _wait(lambda: len(ticks) >= 2, timeout=10)
    finally:
        host.stop()
    first_boundary = int(started) + 1  # "* * * * * *" fires on whole seconds; start-up is not one
    assert ticks[0][0] >= first_boundary - 0.01
    assert ticks[1][0] - ticks[0][0] >= 0.9
    assert not any(t.past_due for _, t in ticks)
