"""Anchors: the chain's heads and sequence reservations, appended outside the table.

One append blob per UTC day (``<day>.jsonl``) in the container ``<prefix>-audit``, which the Bicep puts
under a time-based immutability policy with protected append writes: lines can be added, never changed
or removed, not even by the account's owner, until the policy's period ends. Each line is JSON with a MAC
under the audit key::

    {"day": "20261202", "seq": 1234, "head": "<mac of record 1234>", "reserved": 20000,
     "time": "...", "key": "<name>/<version>", "sig": "<HMAC of the rest>"}

``seq``/``head`` say the chain held this record at ``time`` (0/"" for a reservation made before the day's
first record); ``reserved`` is the highest sequence number the writer may use before it appends again.
A writer that starts numbers from above every reservation in the blob, so a number is never used twice,
even after the newest records were deleted. The list of day blobs is also how a new day finds the day
it links to.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import ContainerClient

from broker.audit.records import Key, now_iso


@dataclass(frozen=True)
class Anchor:
    day: str
    seq: int
    head: str
    reserved: int
    time: str
    key: str
    sig: str
    line: int  # 1-based position in the day's blob

    def payload(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "seq": self.seq,
            "head": self.head,
            "reserved": self.reserved,
            "time": self.time,
            "key": self.key,
        }


class Anchors:
    """The anchor blobs of one audit log."""

    def __init__(self, container: Callable[[], ContainerClient]) -> None:
        self._container = container

    @staticmethod
    def blob_name(day: str) -> str:
        return f"{day}.jsonl"

    def append(self, key: Key, day: str, seq: int, head: str, reserved: int) -> None:
        body: dict[str, Any] = {
            "day": day,
            "seq": seq,
            "head": head,
            "reserved": reserved,
            "time": now_iso(),
            "key": key.id,
        }
        body["sig"] = key.mac(body)
        data = (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode()
        blob = self._container().get_blob_client(self.blob_name(day))
        try:
            blob.append_block(data)
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                blob.create_append_blob(if_none_match="*")
            blob.append_block(data)

    def read(self, day: str) -> tuple[list[Anchor], list[str]]:
        """A day's anchors (unverified) and the lines that could not be parsed."""
        try:
            raw = self._container().get_blob_client(self.blob_name(day)).download_blob().readall()
        except ResourceNotFoundError:
            return [], []
        anchors: list[Anchor] = []
        bad: list[str] = []
        for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
            try:
                data = json.loads(line)
                anchors.append(
                    Anchor(
                        day=str(data["day"]),
                        seq=int(data["seq"]),
                        head=str(data["head"]),
                        reserved=int(data["reserved"]),
                        time=str(data["time"]),
                        key=str(data["key"]),
                        sig=str(data["sig"]),
                        line=number,
                    )
                )
            except (ValueError, KeyError, TypeError):
                bad.append(f"line {number}")
        return anchors, bad

    def days(self) -> list[str]:
        """Every day that has an anchor blob, oldest first."""
        names = (b.name for b in self._container().list_blobs())
        return sorted(n.removesuffix(".jsonl") for n in names if n.endswith(".jsonl"))
