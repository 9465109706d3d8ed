"""Admin consent: the link a customer's administrator follows, and the ``state`` that ties the answer to us.

The link is Microsoft identity platform v2 admin consent::

    {AUTHORITY_HOST}/{tenant GUID}/v2.0/adminconsent?client_id=…&scope={resource}/.default&redirect_uri=…&state=…

Entra ID sends the administrator's browser back to ``redirect_uri`` with ``admin_consent=True&tenant=…`` or
with ``error``/``error_description``. Microsoft warns that the ``tenant`` in that answer can be forged, so
nothing is believed without ``state``, and even then only the doctor's token request proves consent.

``state`` is ``<nonce>.<expiry>.<tag>``:

- ``nonce``: 32 random bytes. The pending consent (which tenant, until when, used or not) is a row in the
  ``consent`` table keyed by the nonce's SHA-256, so reading the table does not reveal a usable state;
  redeeming marks the row used under its ETag, so a state works once, on one instance, whatever the race.
- ``tag``: HMAC-SHA256 over nonce and expiry. It lets the anonymous callback refuse an altered, forged or
  expired state from memory, with no storage call, so the public route cannot be made to hammer storage.

Why not a self-contained signed state with a key in Key Vault: in ``federated`` mode the broker holds no
Key Vault secret at all (and may have no vault), and the broker's identity may only read the vault, so it
could not create the key; a key in app settings would be a plain-text secret. The HMAC key is 32 random
bytes kept in the same table (created once, first writer wins); it guards cost, not trust: what makes a
state unforgeable is the nonce, which exists only in the link and, hashed, in the row.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from broker.errors import (
    ConsentStateExpired,
    ConsentStateInvalid,
    ConsentStateMissing,
    ConsentStateUsed,
    NotConfigured,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

STATE_PARTITION = "state"
KEY_PARTITION = "key"
KEY_ROW = "state-hmac"
_TAG_BYTES = 24
_STATE = re.compile(r"^([A-Za-z0-9_-]{43})\.([0-9]{1,12})\.([A-Za-z0-9_-]{32})$")
MAX_STATE_LENGTH = 128


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def admin_consent_url(
    authority_host: str, tenant_id: str, client_id: str, *, scope: str, redirect_uri: str, state: str
) -> str:
    """The v2 admin-consent link for one registry GUID (never caller text)."""
    query = urlencode({"client_id": client_id, "scope": scope, "redirect_uri": redirect_uri, "state": state})
    return f"{authority_host.rstrip('/')}/{tenant_id}/v2.0/adminconsent?{query}"


@dataclass(frozen=True)
class PendingConsent:
    """What a redeemed state was made for."""

    tenant_name: str
    tenant_id: str
    expires_at: int


@dataclass(frozen=True)
class ConsentLink:
    url: str
    expires_at: int
    redirect_uri: str


class ConsentStates:
    """Single-use, expiring states bound to one pending tenant, kept in a storage table."""

    def __init__(
        self,
        table: Callable[[], TableClient],
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._key: bytes | None = None
        self._lock = threading.Lock()

    # -- issuing -------------------------------------------------------------------------------------

    def issue(self, tenant_name: str, tenant_id: str) -> tuple[str, int]:
        """A new state for this tenant and when it expires (epoch seconds)."""
        nonce = secrets.token_bytes(32)
        expires_at = int(self._clock()) + self.ttl_seconds
        entity = {
            "PartitionKey": STATE_PARTITION,
            "RowKey": hashlib.sha256(nonce).hexdigest(),
            "TenantName": tenant_name,
            "TenantId": tenant_id,
            "ExpiresAt": expires_at,
            "CreatedAt": int(self._clock()),
            "UsedAt": 0,
        }
        try:
            self._table().create_entity(entity)
        except AzureError as exc:
            raise UpstreamUnavailable(
                "the consent state cannot be stored", diagnostic=repr(exc), retry_after=5
            ) from exc
        payload = f"{_b64(nonce)}.{expires_at}"
        return f"{payload}.{self._tag(payload)}", expires_at

    # -- redeeming -----------------------------------------------------------------------------------

    def check(self, state: str | None) -> bytes:
        """The nonce of a well-formed, untampered, unexpired state; no storage call beyond the key."""
        if not state:
            raise ConsentStateMissing(
                "the answer carries no state, so the broker cannot tell which tenant it is for (it did not come "
                "from a link the broker made); if consent was granted, the partner's doctor check confirms it"
            )
        match = _STATE.fullmatch(state) if len(state) <= MAX_STATE_LENGTH else None
        if match is None:
            raise ConsentStateInvalid("the state is not one the broker issued", diagnostic="state_malformed")
        nonce_text, expires_text, tag = match.groups()
        if not hmac.compare_digest(tag, self._tag(f"{nonce_text}.{expires_text}")):
            raise ConsentStateInvalid("the state is not one the broker issued", diagnostic="state_bad_tag")
        if int(expires_text) < self._clock():
            raise ConsentStateExpired("the consent link has expired; ask for a new one", diagnostic="state_expired")
        return _unb64(nonce_text)

    def redeem(self, state: str | None) -> PendingConsent:
        """Use a state once: the pending consent it was made for, or a ``ConsentAnswerError``."""
        nonce = self.check(state)
        table = self._table()
        row = hashlib.sha256(nonce).hexdigest()
        try:
            entity = table.get_entity(STATE_PARTITION, row)
        except ResourceNotFoundError as exc:
            raise ConsentStateInvalid("the state is not one the broker issued", diagnostic="state_unknown") from exc
        except AzureError as exc:
            raise UpstreamUnavailable("the consent state cannot be read", diagnostic=repr(exc), retry_after=5) from exc
        if int(entity.get("UsedAt") or 0):
            raise ConsentStateUsed("this consent link was already used", diagnostic="state_replayed")
        if int(entity.get("ExpiresAt") or 0) < self._clock():
            raise ConsentStateExpired("the consent link has expired; ask for a new one", diagnostic="state_expired")
        try:
            table.update_entity(
                {"PartitionKey": STATE_PARTITION, "RowKey": row, "UsedAt": int(self._clock())},
                mode=UpdateMode.MERGE,
                etag=entity.metadata["etag"],
                match_condition=MatchConditions.IfNotModified,
            )
        except ResourceModifiedError as exc:
            raise ConsentStateUsed("this consent link was already used", diagnostic="state_replayed") from exc
        except AzureError as exc:
            raise UpstreamUnavailable("the consent state cannot be used", diagnostic=repr(exc), retry_after=5) from exc
        return PendingConsent(str(entity["TenantName"]), str(entity["TenantId"]), int(entity["ExpiresAt"]))

    # -- the tag key ---------------------------------------------------------------------------------

    def _tag(self, payload: str) -> str:
        mac = hmac.new(self._hmac_key(), b"consent-state|" + payload.encode(), hashlib.sha256).digest()
        return _b64(mac[:_TAG_BYTES])

    def _hmac_key(self) -> bytes:
        key = self._key
        if key is not None:
            return key
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create_key()
            return self._key

    def _load_or_create_key(self) -> bytes:
        table = self._table()
        try:
            with contextlib.suppress(ResourceExistsError):  # another instance made it first: use that one
                table.create_entity(
                    {"PartitionKey": KEY_PARTITION, "RowKey": KEY_ROW, "Key": _b64(secrets.token_bytes(32))}
                )
            return _unb64(str(table.get_entity(KEY_PARTITION, KEY_ROW)["Key"]))
        except AzureError as exc:
            raise UpstreamUnavailable(
                "the consent state key cannot be read", diagnostic=repr(exc), retry_after=5
            ) from exc


class ConsentLinks:
    """Builds the admin-consent link for a registered tenant: the CLI and the app make the same one."""

    def __init__(
        self,
        states: ConsentStates,
        *,
        authority_host: str,
        client_id: str,
        redirect_uri: str | None,
        scope_for: Callable[[str], str],
    ) -> None:
        self.states = states
        self._authority_host = authority_host
        self._client_id = client_id
        self.redirect_uri = redirect_uri
        self._scope_for = scope_for

    def create(self, tenant_name: str, tenant_id: str, api: str) -> ConsentLink:
        if not self.redirect_uri:
            raise NotConfigured(
                "no admin-consent redirect URI: set WEBSITE_HOSTNAME (Azure sets it) or CONSENT_REDIRECT_URI",
                diagnostic="consent_redirect_missing",
            )
        state, expires_at = self.states.issue(tenant_name, tenant_id)
        url = admin_consent_url(
            self._authority_host,
            tenant_id,
            self._client_id,
            scope=self._scope_for(api),
            redirect_uri=self.redirect_uri,
            state=state,
        )
        log.info("consent.link tenant=%s expires_at=%d", tenant_id, expires_at)
        return ConsentLink(url, expires_at, self.redirect_uri)
