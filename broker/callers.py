"""Who is asking: the caller identity every tenant-scoped request carries, and the caller kill switch.

``CALLER_AUTH=none`` serves a loopback-only development broker as the single caller ``local``; the
broker refuses that mode on any other bind. ``CALLER_AUTH=entra`` validates the Entra ID bearer token
internal services obtain for the broker with their own managed identity (``EntraAuthenticator``):

- RS256 only, signed by a key of the home tenant's JWKS (found through OIDC discovery at
  ``{AUTHORITY_HOST}/{CALLER_TENANT_ID}/v2.0/.well-known/openid-configuration``). Decoded keys are held
  in memory; an unknown ``kid`` triggers one refetch at most every ``min_refetch_seconds`` (so garbage
  kids cannot make the broker hammer Entra), and the set is re-read after ``max_age_seconds`` (24 h).
  Fetches run in a worker thread, never on the event loop. TLS trust is the platform's default context,
  which honours the standard ``SSL_CERT_FILE``/``SSL_CERT_DIR`` variables.
- ``aud`` is ``CALLER_AUDIENCE`` (the app ID URI, v1 tokens) or the broker's client id (v2 tokens);
  ``iss`` is exactly the discovered v2 issuer (``ver`` 2.0) or ``https://sts.windows.net/{tid}/``
  (``ver`` 1.0); ``tid`` is ``CALLER_TENANT_ID``; ``exp``/``nbf`` with ``LEEWAY_SECONDS``.
- App-only tokens only, recognised positively as Microsoft documents them (access-token claims reference,
  "Secure applications and APIs by validating claims", "Protected web API: verify scopes and app
  roles"): ``idtyp`` is ``app`` when the optional claim is present; without it, ``scp`` is absent and
  ``oid`` equals ``sub`` (a user's token has a pairwise ``sub`` that differs from its ``oid``). Anything
  else is refused as ``not_app_only``, so a token's ``azp``/``appid`` is trusted as the caller's
  application only for the application itself, never for a user signed in to it.

A token already verified is remembered (by its exact text, until it expires, for at most
``VERIFIED_TTL_SECONDS``), so the hot path is a dictionary lookup.

The caller kill switch (``CallerSwitches``) lives in the ``callers`` table; each instance re-reads it
every ``refresh_seconds`` (10 s), the bound within which a disable reaches every instance.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from azure.data.tables import TableClient, UpdateMode

from broker.errors import CallerDisabled, Unauthenticated, UpstreamUnavailable
from broker.identifiers import parse_guid
from broker.storage import PartitionSnapshot, SnapshotBacked

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 60
VERIFIED_TTL_SECONDS = 300.0
MAX_VERIFIED = 4096
MAX_DOCUMENT_BYTES = 512 * 1024
_BEARER = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Caller:
    """An authenticated internal service."""

    id: str
    tenant_id: str | None = None
    app_id: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    app_only: bool = False  # set only once the token was recognised as the application's own

    @property
    def label(self) -> str:
        return self.app_id or self.id

    @property
    def principals(self) -> tuple[str, ...]:
        """The ids a policy entry or a kill switch may name this caller by."""
        return (self.id,) if not self.app_id or self.app_id == self.id else (self.id, self.app_id)


LOCAL_CALLER = Caller(
    id="local", roles=frozenset({"Broker.Admin", "Broker.Token.Request", "Broker.Incidents.Read"}), app_only=True
)


class Authenticator(Protocol):
    async def authenticate(self, headers: Mapping[str, str]) -> Caller: ...


class LoopbackOnly:
    """No authentication: every request is the local developer. Only ever built for a loopback bind."""

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        return LOCAL_CALLER


def _refused(detail: str, reason: str) -> Unauthenticated:
    return Unauthenticated(detail, diagnostic=reason)


def fetch_json(url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document over https with the platform's default trust (honours ``SSL_CERT_FILE``)."""
    if urlsplit(url).scheme != "https":
        raise ValueError("only https URLs are fetched")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (https only)
    with urllib.request.urlopen(request, timeout=timeout, context=ssl.create_default_context()) as response:  # noqa: S310
        return json.loads(response.read(MAX_DOCUMENT_BYTES + 1)[:MAX_DOCUMENT_BYTES])


class SigningKeys:
    """The home tenant's token-signing keys, from OIDC discovery and the JWKS it names."""

    def __init__(
        self,
        discovery_url: str,
        tenant_id: str,
        *,
        fetch: Callable[[str], Any] = fetch_json,
        min_refetch_seconds: float = 10.0,
        max_age_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery_url = discovery_url
        self.tenant_id = tenant_id
        self._fetch = fetch
        self._min_refetch = min_refetch_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self.issuer: str | None = None
        self._fetched_at = float("-inf")
        self.fetches = 0

    def get(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)

    def should_fetch(self, kid: str) -> bool:
        """Fetch when never fetched, too old, or ``kid`` is unknown and the last fetch is not too recent."""
        age = self._clock() - self._fetched_at
        return age >= self._max_age or (kid not in self._keys and age >= self._min_refetch)

    def refresh(self, kid: str | None = None) -> None:
        """Re-read discovery and the JWKS (blocking; single-flight: a waiter that finds it done returns)."""
        with self._lock:
            if kid is not None and not self.should_fetch(kid):
                return
            self._fetched_at = self._clock()  # a failed fetch also waits min_refetch_seconds
            self.fetches += 1
            try:
                discovery = self._fetch(self.discovery_url)
                issuer = str(discovery["issuer"]).replace("{tenantid}", self.tenant_id)
                jwks_uri = str(discovery["jwks_uri"])
                if urlsplit(jwks_uri).scheme != "https":
                    raise ValueError("jwks_uri is not https")
                document = self._fetch(jwks_uri)
                keys: dict[str, jwt.PyJWK] = {}
                for data in document["keys"]:
                    kid_value = data.get("kid")
                    if data.get("kty") != "RSA" or data.get("use", "sig") != "sig" or not isinstance(kid_value, str):
                        continue
                    key_issuer = data.get("issuer")
                    if key_issuer is not None and str(key_issuer).replace("{tenantid}", self.tenant_id) != issuer:
                        continue  # a key published for another issuer must not sign ours
                    try:
                        keys[kid_value] = jwt.PyJWK(data, algorithm="RS256")
                    except jwt.PyJWTError:
                        continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("callers.jwks outcome=failed error=%s", exc.__class__.__name__)
                raise UpstreamUnavailable(
                    "the caller-token signing keys cannot be read; retry later",
                    diagnostic=f"jwks fetch failed: {exc!r}",
                    retry_after=5,
                ) from exc
            self._keys = keys
            self.issuer = issuer
            log.info("callers.jwks outcome=fetched keys=%d", len(keys))


class EntraAuthenticator:
    """Validates ``Authorization: Bearer`` Entra tokens from internal services of the home tenant."""

    def __init__(
        self,
        *,
        tenant_id: str,
        audiences: tuple[str, ...],
        keys: SigningKeys,
        leeway: int = LEEWAY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenant_id = tenant_id
        self.audiences = audiences
        self.keys = keys
        self.leeway = leeway
        self._clock = clock
        self._v1_issuer = f"https://sts.windows.net/{tenant_id}/"
        self._verified: OrderedDict[str, tuple[Caller, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        token = self._bearer(headers)
        now = self._clock()
        hit = self._verified.get(token)
        if hit is not None:
            caller, expires, verified_at = hit
            if now < expires + self.leeway and now - verified_at < VERIFIED_TTL_SECONDS:
                return caller
        key = await self._key_for(token)
        caller, expires = self._verify(token, key)
        with self._lock:
            self._verified[token] = (caller, float(expires), now)
            while len(self._verified) > MAX_VERIFIED:
                self._verified.popitem(last=False)
        return caller

    @staticmethod
    def _bearer(headers: Mapping[str, str]) -> str:
        value = headers.get("authorization")
        if not value:
            raise _refused("send 'Authorization: Bearer <token>' (an Entra token for the broker)", "no_token")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 16_384 or not _BEARER.fullmatch(token):
            raise _refused("the Authorization header is not 'Bearer <JWT>'", "malformed_header")
        return token

    async def _key_for(self, token: str) -> jwt.PyJWK:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _refused("the bearer token is not a JWT", "malformed_token") from exc
        if header.get("alg") != "RS256":
            raise _refused("the token's algorithm is not RS256", "alg_not_allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 128:
            raise _refused("the token names no signing key", "no_kid")
        if self.keys.should_fetch(kid):
            try:
                await asyncio.to_thread(self.keys.refresh, kid)
            except UpstreamUnavailable:
                if self.keys.issuer is None:
                    raise
        key = self.keys.get(kid)
        if key is None:
            raise _refused("the token is not signed by a key of the home tenant", "unknown_kid")
        return key

    def _verify(self, token: str, key: jwt.PyJWK) -> tuple[Caller, int]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self.audiences,
                leeway=self.leeway,
                options={"require": ["exp", "nbf", "iss", "aud", "tid", "oid"], "verify_iss": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _refused("the token has expired", "token_expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _refused("the token is not valid yet", "token_not_yet_valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise _refused("the token is not for the broker", "wrong_audience") from exc
        except jwt.InvalidSignatureError as exc:
            raise _refused("the token's signature is not valid", "bad_signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _refused(f"the token lacks the {exc.claim!r} claim", "missing_claim") from exc
        except jwt.PyJWTError as exc:
            raise _refused("the token is not valid", "invalid_token") from exc
        tid = claims["tid"]
        if tid != self.tenant_id:
            raise _refused("the token is not from the broker's home tenant", "wrong_tenant")
        expected = self.keys.issuer if claims.get("ver") == "2.0" else self._v1_issuer
        if claims["iss"] != expected:
            raise _refused("the token's issuer is not the home tenant's", "wrong_issuer")
        oid = claims["oid"]
        if parse_guid(oid) != oid:  # the canonical form only, as Entra writes it
            raise _refused("the token's oid is not a GUID", "bad_oid")
        if not app_only(claims):
            raise _refused("only app-only tokens (a service's own identity) are accepted", "not_app_only")
        app_id = claims.get("azp") if claims.get("ver") == "2.0" else claims.get("appid")
        raw_roles = claims.get("roles", [])
        roles = frozenset(r for r in raw_roles if isinstance(r, str)) if isinstance(raw_roles, list) else frozenset()
        caller = Caller(
            id=oid,
            tenant_id=tid,
            app_id=app_id if parse_guid(app_id) == app_id else None,
            roles=roles,
            app_only=True,
        )
        return caller, int(claims["exp"])


def app_only(claims: Mapping[str, Any]) -> bool:
    """Whether verified claims are an application's own token (no user), per Microsoft's documented test:
    ``idtyp`` says so where the optional claim is configured; otherwise no ``scp`` and ``oid`` == ``sub``."""
    if "scp" in claims:
        return False
    if "idtyp" in claims:
        return bool(claims["idtyp"] == "app")
    oid, sub = claims.get("oid"), claims.get("sub")
    return isinstance(oid, str) and isinstance(sub, str) and bool(oid) and oid == sub


# -- the caller kill switch ----------------------------------------------------------------------------

SWITCH_PARTITION = "caller"


def normalize_principal(value: str) -> str:
    """A caller's object id or app id (a GUID), or ``local``; ``ValueError`` otherwise."""
    text = value.strip().lower()
    if text != "local" and parse_guid(text) is None:
        raise ValueError(f"{value!r} is not a caller object id or app id (a GUID)")
    return text


@dataclass(frozen=True)
class CallerSwitch:
    principal: str
    enabled: bool
    updated_at: str
    updated_by: str


def _disabled(entities: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    return frozenset(str(e["RowKey"]) for e in entities if not e.get("Enabled", True))


class CallerSwitches(SnapshotBacked):
    """Disabled callers, in a storage table, served from a snapshot re-read every ``refresh_seconds``."""

    def __init__(
        self,
        table: Callable[[], TableClient],
        *,
        refresh_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self._snapshot: PartitionSnapshot[frozenset[str]] = PartitionSnapshot(
            table, SWITCH_PARTITION, _disabled, what="caller switches", refresh_seconds=refresh_seconds, clock=clock
        )

    def fresh(self) -> bool:
        return self._snapshot.fresh()

    def check(self, caller: Caller) -> None:
        """Raise ``CallerDisabled`` if any id of ``caller`` is switched off (snapshot only, no I/O)."""
        disabled = self._snapshot.value or frozenset()
        if any(p in disabled for p in caller.principals):
            raise CallerDisabled(f"caller {caller.label} is disabled", diagnostic="caller_disabled")

    async def ensure_fresh(self) -> None:
        """Re-read the switches when due (in a thread); ``KillSwitchesStale`` once they are too old to trust."""
        if self._snapshot.current() is None:
            await asyncio.to_thread(self.reload)

    def reload(self) -> None:
        self._snapshot.get()

    def set_enabled(self, principal: str, enabled: bool, *, by: str) -> CallerSwitch:
        switch = CallerSwitch(
            principal=normalize_principal(principal),
            enabled=enabled,
            updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
            updated_by=by,
        )
        entity = {
            "PartitionKey": SWITCH_PARTITION,
            "RowKey": switch.principal,
            "Enabled": enabled,
            "UpdatedAt": switch.updated_at,
            "UpdatedBy": by,
        }
        self._table().upsert_entity(entity, mode=UpdateMode.REPLACE)
        self._snapshot.invalidate()
        return switch

    def all(self) -> list[CallerSwitch]:
        entities = self._table().query_entities(f"PartitionKey eq '{SWITCH_PARTITION}'")
        return sorted(
            (
                CallerSwitch(
                    str(e["RowKey"]),
                    bool(e.get("Enabled", True)),
                    str(e.get("UpdatedAt", "")),
                    str(e.get("UpdatedBy", "")),
                )
                for e in entities
            ),
            key=lambda s: s.principal,
        )
