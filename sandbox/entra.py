"""Entra ID stand-in (https): OIDC discovery, JWKS and the v2.0 token endpoint for client credentials.

Routes (``{tenant}`` is a GUID or a domain; documents and tokens always name the GUID):

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (``common``/``organizations`` give the
  ``{tenantid}`` issuer template); unknown tenant → 400 ``invalid_tenant`` AADSTS90002;
- ``GET /{tenant}/discovery/v2.0/keys`` and ``/common/discovery/v2.0/keys``;
- ``POST /{tenant}/oauth2/v2.0/token``: ``grant_type=client_credentials`` with a client secret (form
  or HTTP Basic), a certificate assertion or a federated assertion. Exactly one ``…/.default`` scope.
  Microsoft resources get v1 tokens, the broker's own API v2 tokens.

  Certificate assertions (PS256/RS256, ``x5t#S256`` or ``x5t``, padded or not) are checked as Microsoft's
  "certificate credentials" page lists: the key is a certificate registered on the app (by thumbprint),
  or — subject-name/issuer trust — the ``x5c`` leaf, when the app trusts its subject and it was issued by
  the trusted CA; then signature, ``aud`` = this token endpoint, ``iss`` = ``sub`` = client id, ``exp``
  (30 s leeway) and ``jti``, which is refused if seen before (AADSTS700030 is this stand-in's choice: the
  real code for a replayed assertion is not in the documentation searched).

  Federated assertions (a managed identity's token from the sandbox, signed by its key) must carry the
  cloud's token-exchange audience (``api://AzureADTokenExchange`` in the public cloud) and match one of
  the app's federated identity credentials on issuer, subject *and* audience (AADSTS70021 otherwise).
- ``GET /{tenant}/v2.0/adminconsent?client_id=&scope=&redirect_uri=&state=``: the v2 admin-consent endpoint.
  The tenant's administrator answers as the directory says (``Tenant.admin_answer``): on approval the app is
  consented with its required permissions and the browser is sent (302) to ``redirect_uri`` with
  ``admin_consent=True&tenant=<GUID>&scope=…&state=…``; on refusal with ``error``, ``error_description``,
  ``admin_consent=True`` and ``state``. As in Entra, a request whose app or redirect URI cannot be trusted
  (unknown or single-tenant ``client_id``, a ``redirect_uri`` not registered exactly on the app, an unknown
  tenant) is answered with an error page and never redirected.

Errors carry Entra's body (``error``, ``error_description`` with trace/correlation/timestamp lines,
``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``, ``error_uri``).

Counters: ``entra.discovery``, ``entra.jwks``, ``entra.token``, ``entra.adminconsent``, each also
``:<tenant GUID>``; refused token requests: ``entra.token:error`` (and ``…:error:<AADSTS code>``); accepted
assertions by kind: ``entra.assertion:x5t#S256``, ``…:x5t#S256+x5c``,
``…:x5t``, ``…:federated``; a token request carrying ``claims`` (a claims challenge) also counts as
``entra.token.claims:<tenant GUID>``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import threading
import time
import uuid
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from sandbox.directory import Application, Directory, Tenant
from sandbox.state import FaultsAndLatency, Recorder

ENTRA_SERVICE = "entra"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MULTI_TENANT_SEGMENTS = ("common", "organizations")


@dataclass
class OAuthError(Exception):
    """An Entra error response: HTTP status, OAuth ``error`` and AADSTS number with its text."""

    status: int
    error: str
    code: int
    message: str


def error_response(exc: OAuthError, request: Request) -> JSONResponse:
    now = dt.datetime.now(dt.UTC)
    timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    description = (
        f"AADSTS{exc.code}: {exc.message}\r\nTrace ID: {trace_id}\r\n"
        f"Correlation ID: {correlation_id}\r\nTimestamp: {now.strftime('%Y-%m-%d %H:%M:%S.%fZ')}"
    )
    body = {
        "error": exc.error,
        "error_description": description,
        "error_codes": [exc.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={exc.code}",
    }
    return JSONResponse(body, status_code=exc.status, headers={"Cache-Control": "no-store, no-cache"})


def tenant_not_found(ref: str, error: str = "invalid_tenant") -> OAuthError:
    return OAuthError(
        400,
        error,
        90002,
        f"Tenant '{ref}' not found. Check to make sure you have the correct tenant ID and are signing into "
        "the correct cloud. Check with your subscription administrator, this may happen if there are no "
        "active subscriptions for the tenant.",
    )


class TokenIssuer:
    """The token endpoint's decisions, independent of HTTP."""

    def __init__(self, directory: Directory, recorder: Recorder | None = None) -> None:
        self.directory = directory
        self.recorder = recorder or Recorder()
        self._lock = threading.Lock()
        #: (client id, jti) of certificate assertions already used, until they expire.
        self._used: dict[tuple[str, str], float] = {}

    def _first_use(self, client_id: str, claims: dict[str, Any]) -> None:
        """A certificate assertion is good for one request: its ``jti`` may not come back before ``exp``."""
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _missing_claim("jti")
        now = time.time()
        with self._lock:
            for key in [k for k, exp in self._used.items() if exp < now - 60]:
                del self._used[key]
            if (client_id, jti) in self._used:
                raise OAuthError(
                    401,
                    "invalid_client",
                    700030,
                    f"The client assertion with identifier '{jti}' has already been used. A client assertion "
                    "may be presented only once.",
                )
            self._used[(client_id, jti)] = float(claims.get("exp", now))

    def issue(
        self, tenant_ref: str, form: dict[str, str], basic: tuple[str, str] | None, endpoint_urls: set[str]
    ) -> tuple[Tenant, dict[str, Any]]:
        d = self.directory
        tenant = d.tenant(tenant_ref)
        if tenant is None or tenant_ref.lower() in MULTI_TENANT_SEGMENTS:
            raise tenant_not_found(tenant_ref, "invalid_request")
        grant_type = form.get("grant_type", "")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type != "client_credentials":
            raise OAuthError(
                400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant_type}'."
            )
        client_id = (form.get("client_id") or (basic[0] if basic else "")).strip().lower()
        if not client_id:
            raise _missing("client_id")
        scope = form.get("scope", "")
        if not scope:
            raise _missing("scope")
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise OAuthError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must have a "
                "scope value with /.default suffixed to the resource identifier (application ID URI).",
            )
        resource = scopes[0][: -len("/.default")]

        app = d.application(client_id)
        if app is None or (not tenant.home and not (app.multi_tenant and tenant.consented)):
            raise OAuthError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant.domain}'. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant. You may have sent your authentication "
                "request to the wrong tenant.",
            )
        appidacr = self._authenticate(app, tenant, form, basic, endpoint_urls)

        if d.is_broker_api(resource):
            if not tenant.home:
                raise _resource_not_found(resource, tenant)
            roles = app.api_roles
            token = d.mint_access_token(
                tenant_id=tenant.tenant_id,
                audience=d.broker.client_id,
                client_id=app.client_id,
                roles=roles,
                version="2.0",
                appidacr=appidacr,
            )
        else:
            known = resource.rstrip("/")
            if known not in d.shape.known_resources and known not in tenant.roles:
                raise _resource_not_found(resource, tenant)
            roles = tenant.roles.get(known, []) if app is d.broker else []
            token = d.mint_access_token(
                tenant_id=tenant.tenant_id,
                audience=known,
                client_id=app.client_id,
                roles=roles,
                version="1.0",
                appidacr=appidacr,
            )
        lifetime = d.token_lifetime
        return tenant, {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": d.ext_expires_in if d.ext_expires_in is not None else lifetime,
            "access_token": token,
        }

    def _authenticate(
        self,
        app: Application,
        tenant: Tenant,
        form: dict[str, str],
        basic: tuple[str, str] | None,
        endpoint_urls: set[str],
    ) -> str:
        """Check the client credential; returns ``appidacr`` ("1" secret, "2" assertion)."""
        secret = form.get("client_secret") or (basic[1] if basic else "")
        assertion = form.get("client_assertion", "")
        if secret:
            if any(hmac.compare_digest(secret, s.value) for s in list(app.secrets)):
                return "1"
            raise OAuthError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
            )
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise OAuthError(
                    400,
                    "invalid_request",
                    50027,
                    "Invalid client_assertion_type; expected " + JWT_BEARER + ".",
                )
            self._check_assertion(app, assertion, endpoint_urls)
            return "2"
        raise OAuthError(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )

    def _check_assertion(self, app: Application, assertion: str, endpoint_urls: set[str]) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise OAuthError(401, "invalid_client", 50027, f"Invalid JWT token. {exc}") from exc
        s256 = str(header.get("x5t#S256", "")).rstrip("=")
        sha1 = str(header.get("x5t", "")).rstrip("=")
        if s256 or sha1:
            cert = next(
                (
                    c
                    for c in list(app.certificates)
                    if (s256 and c.x5t_s256 == s256) or (not s256 and sha1 and c.x5t == sha1)
                ),
                None,
            )
            public_key = cert.public_key() if cert is not None else self._trusted_by_subject(app, header)
            if public_key is None:
                raise _bad_signature(f"The key was not found., Thumbprint of key used by client: '{s256 or sha1}'")
            if header.get("alg") not in ("RS256", "PS256"):
                raise _bad_signature(f"Unsupported algorithm {header.get('alg')!r}")
            claims = self._decode(assertion, public_key, [str(header["alg"])], None)
            if claims.get("aud") not in endpoint_urls:
                raise OAuthError(
                    401,
                    "invalid_client",
                    700023,
                    "Client assertion audience claim does not match Realm issuer. Review the documentation at "
                    "https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
                )
            if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
                raise OAuthError(
                    401,
                    "invalid_client",
                    700021,
                    "Client assertion application identifier doesn't match 'client_id' parameter.",
                )
            self._first_use(app.client_id, claims)
            kind = ("x5t#S256" if s256 else "x5t") + ("+x5c" if header.get("x5c") else "")
            self.recorder.hit(f"entra.assertion:{kind}")  # ':' keeps it out of the request totals
            return
        # A federated assertion: issued by the sandbox (a managed identity's exchange token).
        key = self.directory.key_by_kid(header.get("kid"))
        if key is None or header.get("alg") != "RS256":
            raise _bad_signature("The key was not found.")
        claims = self._decode(assertion, key.public_key, ["RS256"], self.directory.shape.token_exchange_audience)
        if not any(
            f.issuer == claims.get("iss") and f.subject == claims.get("sub") and claims.get("aud") in f.audiences
            for f in list(app.federated)
        ):
            raise OAuthError(
                400,
                "invalid_request",
                70021,
                "No matching federated identity record found for presented assertion. Assertion Issuer: "
                f"'{claims.get('iss')}'. Assertion Subject: '{claims.get('sub')}'. Assertion Audience: "
                f"'{claims.get('aud')}'.",
            )
        self.recorder.hit("entra.assertion:federated")

    @staticmethod
    def _trusted_by_subject(app: Application, header: dict[str, Any]) -> Any:
        """The leaf's key when ``x5c`` carries a certificate the app trusts by subject name and issuer."""
        chain = header.get("x5c")
        if not app.trusted_subjects or not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
            return None
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0]))
        except ValueError:
            return None
        thumbprint = base64.urlsafe_b64encode(hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest())
        if thumbprint.rstrip(b"=").decode() != str(header.get("x5t#S256", "")).rstrip("="):
            return None  # the thumbprint must name the certificate that x5c carries
        if any(trust.accepts(leaf) for trust in list(app.trusted_subjects)):
            return leaf.public_key()
        return None

    @staticmethod
    def _decode(assertion: str, key: Any, algorithms: list[str], audience: str | None) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key,
                algorithms=algorithms,
                audience=audience,
                options={"require": ["exp"], "verify_aud": audience is not None},
                leeway=30,
            )
        except jwt.ExpiredSignatureError as exc:
            raise OAuthError(
                401, "invalid_client", 700024, "Client assertion is not within its valid time range."
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise OAuthError(
                401,
                "invalid_client",
                700212,
                f"No matching federated identity record found for the assertion audience. {exc}",
            ) from exc
        except jwt.PyJWTError as exc:
            raise _bad_signature(str(exc)) from exc
        return claims


class AdminConsent:
    """The admin-consent endpoint's decisions, independent of HTTP: an error page or a redirect URL."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def answer(self, tenant_ref: str, params: dict[str, str]) -> str:
        """The URL the administrator's browser is sent to; ``OAuthError`` when Entra would not redirect."""
        d = self.directory
        tenant = None if tenant_ref.lower() in ("common", "consumers") else d.tenant(tenant_ref)
        if tenant is None:
            raise tenant_not_found(tenant_ref)
        client_id = params.get("client_id", "").strip().lower()
        if not client_id:
            raise _missing("client_id")
        app = d.application(client_id)
        if app is None or not app.multi_tenant:
            raise OAuthError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant.domain}'.",
            )
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in app.redirect_uris:
            raise OAuthError(
                400,
                "invalid_request",
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs "
                f"configured for the application '{client_id}'.",
            )
        state = params.get("state")
        scope = params.get("scope", "")
        scopes = scope.split()
        resources = [s[: -len("/.default")].rstrip("/") for s in scopes if s.endswith("/.default")]
        if (
            not scopes
            or len(resources) != len(scopes)
            or not all(r in self.directory.shape.known_resources for r in resources)
        ):
            return _redirect(
                redirect_uri,
                _error_fields(
                    OAuthError(400, "invalid_request", 70011, f"The provided value for scope {scope} is not valid."),
                    state,
                ),
            )
        if tenant.admin_answer == "decline":
            refusal = OAuthError(400, "access_denied", 65004, "User declined to consent to access the app.")
            return _redirect(redirect_uri, {**_error_fields(refusal, state), "error_subcode": "cancel"})
        if tenant.admin_answer == "consent_required":
            refusal = OAuthError(
                400, "consent_required", 65004, "The resource owner or authorization server denied the request."
            )
            return _redirect(redirect_uri, _error_fields(refusal, state))
        if not tenant.home:
            d.grant_consent(tenant.tenant_id, app.required_permissions)
        fields = {"admin_consent": "True", "tenant": tenant.tenant_id, "scope": scope}
        if state is not None:
            fields["state"] = state
        return _redirect(redirect_uri, fields)


def _error_fields(exc: OAuthError, state: str | None) -> dict[str, str]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    description = (
        f"AADSTS{exc.code}: {exc.message}\r\nTrace ID: {uuid.uuid4()}\r\nCorrelation ID: {uuid.uuid4()}"
        f"\r\nTimestamp: {now}"
    )
    fields = {"admin_consent": "True", "error": exc.error, "error_description": description}
    if state is not None:
        fields["state"] = state
    return fields


def _redirect(redirect_uri: str, fields: dict[str, str]) -> str:
    return redirect_uri + ("&" if "?" in redirect_uri else "?") + urlencode(fields)


def error_page(exc: OAuthError) -> HTMLResponse:
    """Entra's own error page: what a browser shows when it is not sent back to the app."""
    text = escape(f"AADSTS{exc.code}: {exc.message}")
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in to your account</title>'
        f"</head><body><main><h1>Sorry, but we're having trouble signing you in.</h1><p>{text}</p></main>"
        "</body></html>"
    )
    return HTMLResponse(body, status_code=exc.status, headers={"Cache-Control": "no-store, no-cache"})


def _missing_claim(name: str) -> OAuthError:
    return OAuthError(401, "invalid_client", 50027, f"Invalid JWT token. The token has no '{name}' claim.")


def _missing(name: str) -> OAuthError:
    return OAuthError(
        400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
    )


def _bad_signature(reason: str) -> OAuthError:
    return OAuthError(
        401, "invalid_client", 700027, f"Client assertion failed signature validation. [Reason - {reason}]"
    )


def _resource_not_found(resource: str, tenant: Tenant) -> OAuthError:
    return OAuthError(
        400,
        "invalid_resource",
        500011,
        f"The resource principal named {resource} was not found in the tenant named {tenant.domain}. This can "
        "happen if the application has not been installed by the administrator of the tenant or consented "
        "to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
    )


def _basic_auth(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip()).decode().partition(":")
    except ValueError:
        return None
    return unquote_plus(user), unquote_plus(password)


def create_entra_app(directory: Directory, recorder: Recorder) -> Any:
    """The Entra stand-in as an ASGI app (wrapped for faults and latency)."""
    issuer_v2 = directory.issuer_v2
    issuer = TokenIssuer(directory, recorder)
    consent = AdminConsent(directory)

    def resolve(request: Request) -> tuple[str, Tenant | None]:
        ref = request.path_params["tenant"]
        return ref, None if ref.lower() in MULTI_TENANT_SEGMENTS else directory.tenant(ref)

    async def openid_configuration(request: Request) -> Response:
        ref, tenant = resolve(request)
        base = directory.authority_host
        if tenant is None and ref.lower() not in MULTI_TENANT_SEGMENTS:
            recorder.hit("entra.discovery")
            return error_response(tenant_not_found(ref), request)
        recorder.hit("entra.discovery", tenant.tenant_id if tenant else None)
        segment = tenant.tenant_id if tenant else ref.lower()
        document = {
            "token_endpoint": f"{base}/{segment}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/{segment}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer_v2(tenant.tenant_id) if tenant else f"{base}/{{tenantid}}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/{segment}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/{segment}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/{segment}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "ver", "oid", "roles"],
            "kerberos_endpoint": f"{base}/{segment}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        return JSONResponse(document)

    async def keys(request: Request) -> Response:
        ref, tenant = resolve(request)
        if tenant is None and ref.lower() not in MULTI_TENANT_SEGMENTS:
            recorder.hit("entra.jwks")
            return error_response(tenant_not_found(ref), request)
        recorder.hit("entra.jwks", tenant.tenant_id if tenant else None)
        template = issuer_v2(tenant.tenant_id) if tenant else f"{directory.authority_host}/{{tenantid}}/v2.0"
        return JSONResponse(directory.jwks(template))

    async def token(request: Request) -> Response:
        ref = request.path_params["tenant"]
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        tenant = directory.tenant(ref)
        recorder.hit("entra.token", tenant.tenant_id if tenant else None)
        if form.get("claims") and tenant is not None:
            recorder.hit(f"entra.token.claims:{tenant.tenant_id}")  # per tenant only: ``total`` counts requests
        urls = {str(request.url).split("?")[0]}
        if tenant is not None:
            urls.add(directory.token_endpoint(tenant.tenant_id))
            urls.add(f"{directory.authority_host}/{ref}/oauth2/v2.0/token")
        try:
            _, payload = issuer.issue(ref, form, _basic_auth(request), urls)
        except OAuthError as exc:
            recorder.hit("entra.token:error", str(exc.code))
            return error_response(exc, request)
        return JSONResponse(payload, headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})

    async def admin_consent(request: Request) -> Response:
        ref = request.path_params["tenant"]
        tenant = directory.tenant(ref)
        recorder.hit("entra.adminconsent", tenant.tenant_id if tenant else None)
        try:
            location = consent.answer(ref, dict(request.query_params))
        except OAuthError as exc:
            return error_page(exc)
        return RedirectResponse(location, status_code=302, headers={"Cache-Control": "no-store, no-cache"})

    routes = [
        Route("/{tenant}/v2.0/adminconsent", admin_consent, methods=["GET"]),
        Route("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/{tenant}/discovery/v2.0/keys", keys, methods=["GET"]),
        Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"]),
    ]
    return FaultsAndLatency(Starlette(routes=routes), ENTRA_SERVICE, recorder)
