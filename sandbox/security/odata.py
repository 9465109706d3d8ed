"""The OData the two APIs accept: ``$filter`` (comparisons joined with ``and``, parenthesised), ``$orderby`` and
the ``$top`` limit, with the 400 messages the real services give for what they refuse."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sandbox.security.records import DEFENDER_STATUSES, GRAPH_STATUSES, Incident, camel, graph_determination
from sandbox.security.timestamps import parse_timestamp


class ODataError(ValueError):
    """A request the real service would refuse with 400."""


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    value: Any  # ticks for times, str or None otherwise


_TOKEN_RE = re.compile(r"\s*(?:(\()|(\))|('(?:[^']|'')*')|([^\s()']+))")
_COMPARISONS = ("eq", "ne", "ge", "gt", "le", "lt")


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if not match or match.end() == pos:
            raise ODataError(f"Syntax error at position {pos} in '{text}'.")
        tokens.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    return tokens


@dataclass(frozen=True)
class Schema:
    """What one API lets ``$filter`` touch: field name → (record attribute, kind)."""

    times: dict[str, str]  # field → attribute ("created" / "last_update")
    enums: dict[str, tuple[str, tuple[str, ...], Callable[[str], str | None]]]  # field → (attr, allowed, render)
    strings: dict[str, str]  # field → attribute


DEFENDER_SCHEMA = Schema(
    times={"lastUpdateTime": "last_update", "createdTime": "created"},
    enums={"status": ("status", DEFENDER_STATUSES, lambda v: v)},
    strings={"assignedTo": "assigned_to"},
)
GRAPH_SCHEMA = Schema(
    times={"lastUpdateDateTime": "last_update", "createdDateTime": "created"},
    enums={
        "status": ("status", GRAPH_STATUSES, lambda v: camel(v)),
        "severity": ("severity", ("unknown", "informational", "low", "medium", "high"), lambda v: camel(v)),
        "classification": (
            "classification",
            ("unknown", "falsePositive", "truePositive", "informationalExpectedActivity"),
            lambda v: camel(v),
        ),
        "determination": (
            "determination",
            ("unknown", "apt", "malware", "securityPersonnel", "securityTesting", "unwantedSoftware", "other"),
            graph_determination,
        ),
    },
    strings={"assignedTo": "assigned_to"},
)


def parse_filter(text: str, schema: Schema) -> list[Clause]:
    """``a ge X and (b eq 'y')`` → clauses, all of which must hold. Anything else → :class:`ODataError`."""
    tokens = _tokenize(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ODataError(f"Syntax error: unexpected end of the $filter expression '{text}'.")
        pos += 1
        return tokens[pos - 1]

    def expr() -> list[Clause]:
        clauses = term()
        while peek() is not None and peek() != ")":
            word = take()
            if word.lower() != "and":
                raise ODataError(
                    f"The query specified in the URI is not valid. Operator '{word}' is not supported in $filter."
                )
            clauses += term()
        return clauses

    def term() -> list[Clause]:
        if peek() == "(":
            take()
            inner = expr()
            if take() != ")":
                raise ODataError(f"Syntax error: ')' expected in '{text}'.")
            return inner
        return [clause()]

    def clause() -> Clause:
        name = take()
        if peek() == "(":
            raise ODataError(f"The query specified in the URI is not valid. Function '{name}' is not supported.")
        op = take().lower()
        raw = take()
        if op not in _COMPARISONS:
            raise ODataError(f"The query specified in the URI is not valid. Operator '{op}' is not supported.")
        if name in schema.times:
            if raw.startswith("'"):
                raise ODataError(
                    f"A binary operator with incompatible types was detected. Found operand types "
                    f"'Edm.DateTimeOffset' and 'Edm.String' for operator kind '{op}'."
                )
            try:
                return Clause(name, op, parse_timestamp(raw))
            except ValueError:
                raise ODataError(f"Syntax error: the DateTimeOffset literal '{raw}' is not valid.") from None
        if name in schema.enums or name in schema.strings:
            if op not in ("eq", "ne"):
                raise ODataError(f"The query specified in the URI is not valid. Operator '{op}' on '{name}'.")
            if raw == "null":
                return Clause(name, op, None)
            if not (raw.startswith("'") and raw.endswith("'") and len(raw) >= 2):
                raise ODataError(f"Syntax error: a quoted string was expected for '{name}', found '{raw}'.")
            value = raw[1:-1].replace("''", "'")
            if name in schema.enums:
                allowed = schema.enums[name][1]
                canonical = next((a for a in allowed if a.lower() == value.lower()), None)
                if canonical is None:
                    raise ODataError(f"The string '{value}' is not a valid enumeration value for '{name}'.")
                value = canonical
            return Clause(name, op, value)
        raise ODataError(
            f"The query specified in the URI is not valid. Could not find a property named '{name}' usable in $filter."
        )

    result = expr()
    if pos != len(tokens):
        raise ODataError(f"Syntax error at position {pos} in '{text}'.")
    return result


def matches(inc: Incident, clauses: Iterable[Clause], schema: Schema) -> bool:
    for c in clauses:
        if c.field in schema.times:
            left: Any = getattr(inc, schema.times[c.field])
        elif c.field in schema.enums:
            attr, _allowed, render = schema.enums[c.field]
            left = render(getattr(inc, attr))
        else:
            left = getattr(inc, schema.strings[c.field])
        right = c.value
        if c.op == "eq":
            ok = left == right
        elif c.op == "ne":
            ok = left != right
        elif left is None or right is None:
            ok = False
        elif c.op == "ge":
            ok = left >= right
        elif c.op == "gt":
            ok = left > right
        elif c.op == "le":
            ok = left <= right
        else:
            ok = left < right
        if not ok:
            return False
    return True


def top_exceeded(limit: int, value: int) -> str:
    return f"The limit of '{limit}' for Top query has been exceeded. The value from the incoming request is '{value}'."


def parse_orderby(raw: str | None, fields: dict[str, str], default: str) -> tuple[str, bool]:
    """``$orderby`` → (record attribute, descending). Default: ``default`` descending (most recent first)."""
    if raw is None:
        return fields[default], True
    parts = raw.split()
    if not parts or len(parts) > 2 or parts[0] not in fields:
        raise ODataError(f"The query specified in the URI is not valid. $orderby '{raw}' is not supported.")
    direction = parts[1].lower() if len(parts) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise ODataError(f"The query specified in the URI is not valid. $orderby '{raw}' is not supported.")
    return fields[parts[0]], direction == "desc"
