"""Request bodies: JSON only, checked against a pydantic model, every failure a clear 4xx problem.

The JSON is read strictly (``parse_object``), because what Python's ``json`` tolerates is where parsers
disagree and where the standard library itself breaks:

- nesting deeper than ``MAX_DEPTH`` is refused before parsing (a few thousand ``[`` raised
  ``RecursionError``: a 500 with no audit record);
- a key given twice is refused (``json`` keeps the last, another reader the first: ``{"tenant":
  "contoso", "tenant": "fabrikam"}`` must not mean one thing to a gateway and another to the broker);
- ``NaN``, ``Infinity`` and numbers that overflow to infinity are not JSON (RFC 8259) and are refused;
  integers longer than ``MAX_INTEGER_DIGITS`` digits are refused before ``int()`` spends time on them;
- the body must be UTF-8, and no string may hold a lone surrogate (``"\\ud800"`` decodes to text that
  cannot be written back as UTF-8: to a log, the audit table, a URL).

Each is ``400 invalid_json``; the route's refusal handler writes the audit record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from broker.errors import BadRequest, InvalidJson, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request, model: type[M]) -> M:
    """The body as ``model``: ``application/json``, a JSON object, valid for the model."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType()
    data = parse_object(await request.body())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc.errors())) from exc


MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 20


class _NotJson(ValueError):
    """A body ``json`` would accept but the broker does not."""


def parse_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, read strictly (see the module docstring); ``InvalidJson`` otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJson("the body is not UTF-8") from exc
    if _deeper_than(text, MAX_DEPTH):
        raise InvalidJson(f"the body nests deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except _NotJson as exc:
        raise InvalidJson(f"the body is not valid JSON ({exc})") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidJson(f"the body is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    if any(not _encodable(text) for text in _strings(data)):
        raise InvalidJson("the body is not valid JSON (a string holds a lone surrogate)")
    return data


def _deeper_than(text: str, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case: nothing to scan
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _NotJson(f"the key {key[:40]!r} is given twice")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _NotJson(f"an integer has more than {MAX_INTEGER_DIGITS} digits")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson("a number is out of range")
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every key and string value in a parsed body (its depth is bounded by ``MAX_DEPTH``)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe(errors: Any) -> str:
    """Pydantic's errors as one short detail: at most five, each ``field: message``."""
    parts = []
    for error in list(errors)[:5]:
        loc = ".".join(str(p)[:40] for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
