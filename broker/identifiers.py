"""The identifier rules the broker applies everywhere, each written once.

A GUID (settings, tenant registry, caller policy, caller tokens, kill switches) is 32 hex digits written
8-4-4-4-12 with hyphens, in either case; its canonical form is lowercase. Nothing else ``uuid.UUID`` would
accept (braces, ``urn:uuid:``, no hyphens) is a GUID here, so the one spelling the registry stores is the
one spelling that can reach a URL.

Something that merely *looks* like a GUID (``guid_shaped``: 32 hex digits once hyphens and braces are
dropped, however they were placed) is never a tenant name, so names and GUIDs stay separate namespaces.

A tenant name's shape (registry, caller policy) is 1-63 lowercase letters, digits and hyphens, neither
first nor last a hyphen: nothing in it can change a URL's path or host.
"""

from __future__ import annotations

import re
import string

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TENANT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def parse_guid(value: object) -> str | None:
    """``value``'s canonical (lowercase) form if it is a GUID, else ``None``."""
    if not isinstance(value, str) or len(value) != 36 or not value.isascii():
        return None
    text = value.lower()
    return text if _GUID.fullmatch(text) else None


def guid_shaped(text: str) -> bool:
    """Whether ``text`` would read as a GUID to a person or a parser: 32 hex digits once hyphens and braces
    are dropped, however they were placed."""
    digits = text.strip().strip("{}").replace("-", "")
    return len(digits) == 32 and all(c in string.hexdigits for c in digits)


def is_tenant_name(value: str) -> bool:
    """Whether ``value`` has the shape of a tenant name (reserved words and GUID look-alikes are refused
    separately, each with its own message)."""
    return _TENANT_NAME.fullmatch(value) is not None
