"""Request bodies: JSON only, checked against a pydantic model, every failure a clear 4xx problem."""

from __future__ import annotations

import json
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
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidJson(f"the body is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc.errors())) from exc


def describe(errors: Any) -> str:
    """Pydantic's errors as one short detail: at most five, each ``field: message``."""
    parts = []
    for error in list(errors)[:5]:
        loc = ".".join(str(p)[:40] for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
