"""The sandbox's world model: tenants, app registrations, managed identities, signing keys and the vault.

One ``Directory`` is shared (thread-safely) by the Entra, managed-identity and Key Vault stand-ins::

    home tenant (the partner's)
    ├── broker app (multi-tenant): client secrets, certificates (by thumbprint, or trusted by subject
    │   name and issuer), federated identity credentials
    ├── caller apps (single-tenant): a secret each, app roles on the broker's API
    └── managed identities: system-assigned, the broker's user-assigned one, callers' user-assigned ones
    customer tenants: GUID, domain, consented?, app roles granted per resource
    signing keys: RS256, one current ``kid`` (rotation keeps old keys published unless retired)
    vault: the Key Vault secrets (``sandbox.keyvault.Vault``)

``Directory(cloud="usgovernment")`` (or ``"china"``) plays that cloud's shape (``CloudShape``): its sign-in
host in issuers and vault challenges, its token-exchange audience, and its Defender, Graph and Key Vault
resource URIs. Everything that mints a token lives here, so tests can forge tokens the stand-ins would never issue
(``mint_caller_token(exp=..., signing="bad-signature")``) and every stand-in checks bearers with
``verify_access_token``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from sandbox.keyvault import Vault

ENTRA_PUBLIC_HOST = "https://login.microsoftonline.com"
DEFENDER_RESOURCE = "https://api.security.microsoft.com"
GRAPH_RESOURCE = "https://graph.microsoft.com"
VAULT_RESOURCE = "https://vault.azure.net"
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
VAULT_APP_ID = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093"
VAULT_AUDIENCES = (VAULT_RESOURCE, VAULT_RESOURCE + "/", VAULT_APP_ID)
#: Resources a token can be asked for (v1 tokens), besides the broker's own API (v2 tokens).
KNOWN_RESOURCES = (
    DEFENDER_RESOURCE,
    GRAPH_RESOURCE,
    VAULT_RESOURCE,
    "https://management.azure.com",
    "https://storage.azure.com",
)


@dataclass(frozen=True)
class CloudShape:
    """What differs between Microsoft clouds as the stand-ins play them: the sign-in host named in issuers
    and Key Vault challenges, the token-exchange audience, and the resource URIs tokens are issued for.
    The stand-ins are still reached over loopback; only names and checks change."""

    name: str
    login_host: str
    token_exchange_audience: str
    defender_resource: str
    graph_resource: str
    vault_resource: str
    other_resources: tuple[str, ...] = ()

    @property
    def known_resources(self) -> tuple[str, ...]:
        named = (self.defender_resource, self.graph_resource, self.vault_resource, *self.other_resources)
        return tuple(r for r in named if r)

    @property
    def vault_audiences(self) -> tuple[str, ...]:
        return (self.vault_resource, self.vault_resource + "/", VAULT_APP_ID)

    def default_roles(self) -> dict[str, list[str]]:
        roles = {self.defender_resource: ["Incident.Read.All"], self.graph_resource: ["SecurityIncident.Read.All"]}
        return {resource: granted for resource, granted in roles.items() if resource}


CLOUD_SHAPES = {
    "public": CloudShape(
        "public",
        ENTRA_PUBLIC_HOST,
        TOKEN_EXCHANGE_AUDIENCE,
        DEFENDER_RESOURCE,
        GRAPH_RESOURCE,
        VAULT_RESOURCE,
        KNOWN_RESOURCES[3:],
    ),
    "usgovernment": CloudShape(
        "usgovernment",
        "https://login.microsoftonline.us",
        "api://AzureADTokenExchangeUSGov",
        "https://api-gov.security.microsoft.us",
        "https://graph.microsoft.us",
        "https://vault.usgovcloudapi.net",
        ("https://management.usgovcloudapi.net", "https://storage.azure.com"),
    ),
    "china": CloudShape(
        "china",
        "https://login.chinacloudapi.cn",
        "api://AzureADTokenExchangeChina",
        "",
        "https://microsoftgraph.chinacloudapi.cn",
        "https://vault.azure.cn",
        ("https://management.chinacloudapi.cn", "https://storage.azure.com"),
    ),
}
# The app roles the broker defines for its callers (docs/app-registration.md).
DEFAULT_CALLER_ROLES = ("Broker.Token.Request", "Broker.Incidents.Read")
DEMO_TENANTS = ("contoso", "fabrikam", "northwind")  # the consented customer tenants seed() makes
SIGNATURE_MODES = ("valid", "bad-signature", "unknown-kid", "none")
#: What the administrator who opens an admin-consent link does: approve; press Cancel (Entra then redirects
#: with ``error=access_denied``); or turn out not to be allowed to consent (``error=consent_required``).
ADMIN_ANSWERS = ("accept", "decline", "consent_required")

_NAMESPACE = uuid.UUID("6f1d3a52-93c4-4e0b-9a57-5b0c2a61d0e1")


def stable_guid(*parts: str) -> str:
    """A GUID that is the same in every run for the same names (demo tenants, seeded apps)."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def default_roles() -> dict[str, list[str]]:
    return {DEFENDER_RESOURCE: ["Incident.Read.All"], GRAPH_RESOURCE: ["SecurityIncident.Read.All"]}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64url(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _opaque() -> str:
    return _b64url(secrets.token_bytes(24))


def _is_guid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


@dataclass
class Tenant:
    """An Entra tenant. ``roles`` are the application permissions admin-consented to the broker app."""

    tenant_id: str
    name: str
    domain: str
    consented: bool = True
    roles: dict[str, list[str]] = field(default_factory=default_roles)
    home: bool = False
    #: How this tenant's administrator answers the admin-consent page (see ``ADMIN_ANSWERS``).
    admin_answer: str = "accept"

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "name": self.name,
            "domain": self.domain,
            "consented": self.consented,
            "roles": {k: list(v) for k, v in self.roles.items()},
            "home": self.home,
            "admin_answer": self.admin_answer,
        }


@dataclass
class ClientSecret:
    key_id: str
    value: str = field(repr=False)
    created: float


@dataclass(frozen=True)
class RegisteredCertificate:
    """A public certificate on the app registration, found by its SHA-1 or SHA-256 thumbprint."""

    pem: str = field(repr=False)
    x5t: str
    x5t_s256: str
    thumbprint: str  # SHA-1, upper-case hex, as the portal shows it

    @classmethod
    def from_pem(cls, pem: str | bytes) -> RegisteredCertificate:
        data = pem.encode() if isinstance(pem, str) else pem
        cert = x509.load_pem_x509_certificate(data)
        der = cert.public_bytes(serialization.Encoding.DER)
        sha1 = hashlib.sha1(der, usedforsecurity=False).digest()
        return cls(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            x5t=_b64url(sha1),
            x5t_s256=_b64url(hashlib.sha256(der).digest()),
            thumbprint=sha1.hex().upper(),
        )

    def public_key(self) -> Any:
        return x509.load_pem_x509_certificate(self.pem.encode()).public_key()


@dataclass(frozen=True)
class CertificateMaterial:
    """A client certificate made by the sandbox: what a credential holder keeps."""

    private_key_pem: str = field(repr=False)
    certificate_pem: str
    thumbprint: str

    def pem_bundle(self) -> str:
        """Key and certificate in one PEM (Key Vault's ``application/x-pem-file`` certificate secret)."""
        return self.private_key_pem + self.certificate_pem

    def pfx_base64(self) -> str:
        """Base64 PKCS#12 without password (Key Vault's default ``application/x-pkcs12`` secret)."""
        key = serialization.load_pem_private_key(self.private_key_pem.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("the sandbox makes RSA keys only")
        cert, *extra = x509.load_pem_x509_certificates(self.certificate_pem.encode())
        blob = pkcs12.serialize_key_and_certificates(b"broker", key, cert, extra or None, serialization.NoEncryption())
        return base64.b64encode(blob).decode()


@dataclass(frozen=True)
class FederatedCredential:
    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...] = (TOKEN_EXCHANGE_AUDIENCE,)


@dataclass(frozen=True)
class TrustedSubject:
    """Subject-name/issuer trust: any certificate with this subject CN issued by this CA is the app's."""

    subject: str
    issuer_pem: str = field(repr=False)

    def accepts(self, leaf: x509.Certificate) -> bool:
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or names[0].value != self.subject:
            return False
        issuer = x509.load_pem_x509_certificate(self.issuer_pem.encode())
        try:
            leaf.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return False
        now = dt.datetime.now(dt.UTC)
        return leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc


@dataclass
class Application:
    """An app registration in the home tenant."""

    client_id: str
    display_name: str
    multi_tenant: bool = False
    secrets: list[ClientSecret] = field(default_factory=list)
    certificates: list[RegisteredCertificate] = field(default_factory=list)
    federated: list[FederatedCredential] = field(default_factory=list)
    trusted_subjects: list[TrustedSubject] = field(default_factory=list)
    api_roles: list[str] = field(default_factory=list)  # roles granted on the broker's API (callers)
    redirect_uris: list[str] = field(default_factory=list)  # web redirect URIs (admin consent returns here)
    #: The application permissions the app registration requires; admin consent grants exactly these.
    required_permissions: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ManagedIdentity:
    """A managed identity the App Service endpoint can issue tokens for."""

    client_id: str
    principal_id: str
    name: str
    user_assigned: bool
    api_roles: list[str] = field(default_factory=list)

    @property
    def resource_id(self) -> str:
        return (
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/sandbox/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{self.name}"
        )


class SigningKey:
    """An RS256 key with the self-signed certificate Entra publishes in ``x5c``."""

    def __init__(self) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self.private_key.public_key()
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accounts.sandbox.invalid")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .sign(self.private_key, hashes.SHA256())
        )
        self.certificate_der = cert.public_bytes(serialization.Encoding.DER)
        self.x5t = _b64url(hashlib.sha1(self.certificate_der, usedforsecurity=False).digest())
        self.kid = self.x5t  # Entra uses the SHA-1 thumbprint as kid

    def jwk(self, issuer: str) -> dict[str, Any]:
        numbers = self.public_key.public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.x5t,
            "n": _int_b64url(numbers.n),
            "e": _int_b64url(numbers.e),
            "x5c": [base64.b64encode(self.certificate_der).decode()],
            "issuer": issuer,
        }


def make_client_certificate(
    common_name: str = "partner-token-broker", *, issuer: CertificateMaterial | None = None, ca: bool = False
) -> CertificateMaterial:
    """A fresh RSA-2048 key and certificate, self-signed or issued by ``issuer`` (whose certificate then
    follows the leaf in ``certificate_pem``, as a chain); ``ca`` makes a certificate authority."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer: Any = key
    issuer_name = name
    if issuer is not None:
        signer = serialization.load_pem_private_key(issuer.private_key_pem.encode(), password=None)
        issuer_name = x509.load_pem_x509_certificate(issuer.certificate_pem.encode()).subject
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    chain_pem = cert_pem + (issuer.certificate_pem if issuer is not None else "")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return CertificateMaterial(key_pem, chain_pem, RegisteredCertificate.from_pem(cert_pem).thumbprint)


class Directory:
    """Tenants, apps, identities, keys and the vault of one sandbox; every method is thread-safe."""

    def __init__(
        self,
        *,
        home_name: str = "partner",
        authority_host: str = ENTRA_PUBLIC_HOST,
        token_lifetime: int = 3599,
        ext_expires_in: int | None = None,
        mi_token_lifetime: int = 86399,
        client_secret_name: str = "broker-client-secret",  # noqa: S107 (a name, not a secret)
        client_certificate_name: str = "broker-client-certificate",
        cloud: str = "public",
        audit_key_name: str = "broker-audit-key",
    ) -> None:
        self._lock = threading.RLock()
        self.shape = CLOUD_SHAPES[cloud]
        self.authority_host = authority_host.rstrip("/")
        self.token_lifetime = token_lifetime
        self.ext_expires_in = ext_expires_in
        self.mi_token_lifetime = mi_token_lifetime
        self.client_secret_name = client_secret_name
        self.client_certificate_name = client_certificate_name
        self.audit_key_name = audit_key_name
        self.vault = Vault()
        self.home = Tenant(
            tenant_id=stable_guid("tenant", home_name),
            name=home_name,
            domain=f"{home_name}.onmicrosoft.com",
            roles={},
            home=True,
        )
        self._tenants: dict[str, Tenant] = {self.home.tenant_id: self.home}
        self.broker = Application(
            stable_guid("app", "broker"),
            "partner-token-broker",
            multi_tenant=True,
            required_permissions=self.shape.default_roles(),
        )
        self._callers: dict[str, Application] = {}
        self.system_identity = ManagedIdentity(
            stable_guid("mi", "system"), stable_guid("mi-principal", "system"), "system", user_assigned=False
        )
        self._identities: dict[str, ManagedIdentity] = {self.system_identity.client_id: self.system_identity}
        self.broker_identity = self.add_managed_identity("broker-uami")
        self._keys: list[SigningKey] = [SigningKey()]
        self._impostor: SigningKey | None = None

    # -- seeding -------------------------------------------------------------------------------------

    def seed(self) -> None:
        """The demo world: broker credentials (secret and certificate in the vault, a FIC for its UAMI),
        three consented customer tenants and one caller app with its own UAMI."""
        self.rotate_client_secret()
        self.vault.set_secret(self.audit_key_name, secrets.token_urlsafe(48))
        material = self.create_client_certificate()
        self.vault.set_secret(
            self.client_certificate_name, material.pem_bundle(), content_type="application/x-pem-file"
        )
        self.add_federated_credential(issuer=self.exchange_issuer, subject=self.broker_identity.principal_id)
        for name in DEMO_TENANTS:
            self.add_customer_tenant(name)
        self.add_caller_app("soc-dashboard")
        self.add_managed_identity("soc-automation-uami", api_roles=DEFAULT_CALLER_ROLES)

    # -- tenants -------------------------------------------------------------------------------------

    def add_customer_tenant(
        self,
        name: str,
        *,
        consented: bool = True,
        roles: dict[str, list[str]] | None = None,
        tenant_id: str | None = None,
    ) -> Tenant:
        """Create a customer tenant ``name.onmicrosoft.com`` (GUID stable per name unless given)."""
        tenant = Tenant(
            tenant_id=(tenant_id or stable_guid("tenant", name)).lower(),
            name=name,
            domain=f"{name}.onmicrosoft.com",
            consented=consented,
            roles=self.shape.default_roles() if roles is None else {k: list(v) for k, v in roles.items()},
        )
        with self._lock:
            if tenant.tenant_id in self._tenants:
                raise ValueError(f"tenant {tenant.tenant_id} exists")
            self._tenants[tenant.tenant_id] = tenant
        return tenant

    def tenant(self, ref: str) -> Tenant | None:
        """A tenant by GUID, domain or short name (case-insensitive)."""
        ref = ref.lower()
        with self._lock:
            found = self._tenants.get(ref)
            if found is None:
                for tenant in self._tenants.values():
                    if ref in (tenant.domain.lower(), tenant.name.lower()):
                        return tenant
            return found

    def _require_tenant(self, ref: str) -> Tenant:
        tenant = self.tenant(ref)
        if tenant is None:
            raise KeyError(f"unknown tenant {ref!r}")
        return tenant

    def tenants(self) -> list[Tenant]:
        with self._lock:
            return list(self._tenants.values())

    def customer_tenants(self) -> list[Tenant]:
        return [t for t in self.tenants() if not t.home]

    def grant_consent(self, ref: str, roles: dict[str, list[str]] | None = None) -> Tenant:
        """Admin consent in ``ref``; ``roles`` replaces the granted permissions when given."""
        with self._lock:
            tenant = self._require_tenant(ref)
            tenant.consented = True
            if roles is not None:
                tenant.roles = {k: list(v) for k, v in roles.items()}
        return tenant

    def set_admin_answer(self, ref: str, answer: str) -> Tenant:
        """How the tenant's administrator will answer the next admin-consent request."""
        if answer not in ADMIN_ANSWERS:
            raise ValueError(f"answer must be one of {ADMIN_ANSWERS}")
        with self._lock:
            tenant = self._require_tenant(ref)
            tenant.admin_answer = answer
        return tenant

    def add_redirect_uri(self, uri: str, client_id: str | None = None) -> None:
        """Register a web redirect URI on an app (the broker app by default)."""
        with self._lock:
            app = self._require_app(client_id or self.broker.client_id)
            if uri not in app.redirect_uris:
                app.redirect_uris.append(uri)

    def revoke_consent(self, ref: str) -> Tenant:
        """The customer removed the broker's service principal."""
        with self._lock:
            tenant = self._require_tenant(ref)
            if tenant.home:
                raise ValueError("the home tenant owns the app")
            tenant.consented = False
        return tenant

    def set_roles(self, ref: str, resource: str, roles: Iterable[str]) -> Tenant:
        """Grant exactly ``roles`` on ``resource`` in a tenant (empty: the token carries no ``roles``)."""
        with self._lock:
            tenant = self._require_tenant(ref)
            tenant.roles[resource.rstrip("/")] = list(roles)
        return tenant

    def remove_tenant(self, ref: str) -> None:
        with self._lock:
            tenant = self._require_tenant(ref)
            if tenant.home:
                raise ValueError("cannot remove the home tenant")
            del self._tenants[tenant.tenant_id]

    def service_principal_id(self, tenant_id: str, client_id: str) -> str:
        """Object id of an app's service principal in a tenant (the token's ``oid``/``sub``)."""
        return stable_guid("sp", tenant_id, client_id)

    # -- the broker app's credentials ----------------------------------------------------------------

    def add_client_secret(self, value: str | None = None) -> ClientSecret:
        secret = ClientSecret(str(uuid.uuid4()), value or _client_secret_value(), time.time())
        with self._lock:
            self.broker.secrets.append(secret)
        return secret

    def revoke_client_secret(self, value_or_key_id: str) -> bool:
        with self._lock:
            before = len(self.broker.secrets)
            self.broker.secrets = [s for s in self.broker.secrets if value_or_key_id not in (s.value, s.key_id)]
            return len(self.broker.secrets) != before

    def rotate_client_secret(self, *, revoke_old: bool = False) -> str:
        """Add a new app secret, store it as a new vault version, optionally revoke the older ones."""
        with self._lock:
            old = list(self.broker.secrets)
            new = self.add_client_secret()
            self.vault.set_secret(self.client_secret_name, new.value)
            if revoke_old:
                for secret in old:
                    self.revoke_client_secret(secret.key_id)
        return new.value

    def client_secret(self) -> str | None:
        """The newest valid app secret."""
        with self._lock:
            return self.broker.secrets[-1].value if self.broker.secrets else None

    def register_certificate(self, pem: str | bytes, client_id: str | None = None) -> RegisteredCertificate:
        cert = RegisteredCertificate.from_pem(pem)
        with self._lock:
            self._require_app(client_id or self.broker.client_id).certificates.append(cert)
        return cert

    def unregister_certificate(self, thumbprint: str, client_id: str | None = None) -> None:
        with self._lock:
            app = self._require_app(client_id or self.broker.client_id)
            app.certificates = [c for c in app.certificates if c.thumbprint != thumbprint.upper()]

    def create_client_certificate(self, *, register: bool = True) -> CertificateMaterial:
        """A new key and certificate; registered on the broker app unless ``register`` is false."""
        material = make_client_certificate()
        if register:
            self.register_certificate(material.certificate_pem)
        return material

    def add_federated_credential(
        self,
        issuer: str,
        subject: str,
        *,
        name: str | None = None,
        client_id: str | None = None,
        audiences: tuple[str, ...] | None = None,
    ) -> FederatedCredential:
        """A FIC on an app (the broker by default), for the cloud's token-exchange audience by default."""
        fic = FederatedCredential(
            name or f"fic-{len(self.broker.federated) + 1}",
            issuer,
            subject,
            audiences or (self.shape.token_exchange_audience,),
        )
        with self._lock:
            self._require_app(client_id or self.broker.client_id).federated.append(fic)
        return fic

    def trust_subject_name(self, subject: str, issuer_pem: str, client_id: str | None = None) -> TrustedSubject:
        """Subject-name/issuer trust on an app: certificates are accepted by subject and CA, not thumbprint."""
        trust = TrustedSubject(subject, issuer_pem)
        with self._lock:
            self._require_app(client_id or self.broker.client_id).trusted_subjects.append(trust)
        return trust

    def remove_federated_credentials(self, client_id: str | None = None) -> None:
        with self._lock:
            self._require_app(client_id or self.broker.client_id).federated.clear()

    # -- caller apps and managed identities ----------------------------------------------------------

    def add_caller_app(self, name: str, roles: Iterable[str] = DEFAULT_CALLER_ROLES) -> Application:
        """An internal service's app registration in the home tenant, with one secret."""
        app = Application(stable_guid("app", name), name, api_roles=list(roles))
        app.secrets.append(ClientSecret(str(uuid.uuid4()), _client_secret_value(), time.time()))
        with self._lock:
            self._callers[app.client_id] = app
        return app

    def caller_apps(self) -> list[Application]:
        with self._lock:
            return list(self._callers.values())

    def application(self, client_id: str) -> Application | None:
        with self._lock:
            if client_id.lower() == self.broker.client_id:
                return self.broker
            return self._callers.get(client_id.lower())

    def _require_app(self, client_id: str) -> Application:
        app = self.application(client_id)
        if app is None:
            raise KeyError(f"unknown application {client_id!r}")
        return app

    def add_managed_identity(self, name: str, *, api_roles: Iterable[str] = ()) -> ManagedIdentity:
        """A user-assigned identity (stable ids per name)."""
        identity = ManagedIdentity(
            stable_guid("mi", name), stable_guid("mi-principal", name), name, True, list(api_roles)
        )
        with self._lock:
            self._identities[identity.client_id] = identity
        return identity

    def managed_identities(self) -> list[ManagedIdentity]:
        with self._lock:
            return list(self._identities.values())

    def managed_identity(
        self, *, client_id: str = "", principal_id: str = "", resource_id: str = ""
    ) -> ManagedIdentity | None:
        """The identity a request names; none named: the system-assigned one."""
        with self._lock:
            for identity in self._identities.values():
                if (
                    (client_id and identity.client_id == client_id.lower())
                    or (principal_id and identity.principal_id == principal_id.lower())
                    or (resource_id and identity.user_assigned and identity.resource_id == resource_id)
                ):
                    return identity
            if client_id or principal_id or resource_id:
                return None
            return self.system_identity

    # -- vault ---------------------------------------------------------------------------------------

    def set_secret(self, name: str, value: str, **kwargs: Any) -> str:
        """Store a new version of a vault secret; returns the version id."""
        return self.vault.set_secret(name, value, **kwargs)

    # -- signing keys --------------------------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        with self._lock:
            return self._keys[-1]

    def rotate_signing_key(self, *, retire_old: bool = False) -> str:
        """Sign with a new key from now on; the old ones stay published unless ``retire_old``."""
        key = SigningKey()
        with self._lock:
            self._keys = [key] if retire_old else [*self._keys, key]
        return key.kid

    def jwks(self, issuer: str) -> dict[str, Any]:
        with self._lock:
            keys = list(self._keys)
        return {"keys": [k.jwk(issuer) for k in reversed(keys)]}

    def key_by_kid(self, kid: str | None) -> SigningKey | None:
        with self._lock:
            return next((k for k in self._keys if k.kid == kid), None)

    # -- issuers -------------------------------------------------------------------------------------

    def issuer_v1(self, tenant_id: str) -> str:
        return f"https://sts.windows.net/{tenant_id}/"

    def issuer_v2(self, tenant_id: str) -> str:
        return f"{self.authority_host}/{tenant_id}/v2.0"

    @property
    def exchange_issuer(self) -> str:
        """The issuer of managed-identity tokens for the token exchange: the cloud's sign-in host, home tenant."""
        return f"{self.shape.login_host}/{self.home.tenant_id}/v2.0"

    def token_endpoint(self, tenant_id: str) -> str:
        return f"{self.authority_host}/{tenant_id}/oauth2/v2.0/token"

    @property
    def broker_audience(self) -> str:
        return f"api://{self.broker.client_id}"

    def is_broker_api(self, resource: str) -> bool:
        return resource.rstrip("/") in (self.broker_audience, self.broker.client_id)

    # -- minting -------------------------------------------------------------------------------------

    def sign(self, claims: dict[str, Any], *, signing: str = "valid", x5t: bool = False) -> str:
        """Sign ``claims`` with the current key; ``signing`` forges: bad-signature, unknown-kid, none."""
        if signing not in SIGNATURE_MODES:
            raise ValueError(f"signing must be one of {SIGNATURE_MODES}")
        key = self.signing_key
        if signing == "none":
            header = {"typ": "JWT", "alg": "none", "kid": key.kid}
            segments = [json.dumps(part, separators=(",", ":")).encode() for part in (header, claims)]
            return ".".join(_b64url(s) for s in segments) + "."
        headers: dict[str, Any] = {"typ": "JWT", "kid": key.kid}
        if x5t:
            headers["x5t"] = key.x5t
        private = key.private_key
        if signing in ("bad-signature", "unknown-kid"):
            with self._lock:
                if self._impostor is None:
                    self._impostor = SigningKey()
                private = self._impostor.private_key
            if signing == "unknown-kid":
                headers["kid"] = self._impostor.kid
                headers.pop("x5t", None)
        return jwt.encode(claims, private, algorithm="RS256", headers=headers)

    def mint_access_token(
        self,
        *,
        tenant_id: str,
        audience: str,
        client_id: str,
        roles: Iterable[str] | None = None,
        version: str = "1.0",
        appidacr: str = "1",
        object_id: str | None = None,
        lifetime: int | None = None,
        issuer: str | None = None,
        signing: str = "valid",
        **overrides: Any,
    ) -> str:
        """An app-only access token shaped like Entra's (v1 for Microsoft resources, v2 for our API).

        ``overrides`` replace claims; an override of ``None`` removes the claim.
        """
        now = int(time.time())
        oid = object_id or self.service_principal_id(tenant_id, client_id)
        claims: dict[str, Any] = {"aud": audience}
        if version == "1.0":
            iss = issuer or self.issuer_v1(tenant_id)
            claims.update(iss=iss, idp=iss)
        else:
            claims["iss"] = issuer or self.issuer_v2(tenant_id)
        claims.update(iat=now, nbf=now, exp=now + (lifetime if lifetime is not None else self.token_lifetime))
        claims["aio"] = _opaque()
        if version == "1.0":
            claims.update(appid=client_id, appidacr=appidacr)
        else:
            claims.update(azp=client_id, azpacr=appidacr)
        claims.update(idtyp="app", oid=oid)
        claims["rh"] = "0." + _opaque() + "."
        role_list = list(roles or [])
        if role_list:
            claims["roles"] = role_list
        claims.update(sub=oid, tid=tenant_id, uti=_opaque()[:22], ver=version)
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return self.sign(claims, signing=signing, x5t=version == "1.0")

    def mint_caller_token(
        self,
        client_id: str | None = None,
        *,
        roles: Iterable[str] | None = None,
        lifetime: int | None = None,
        signing: str = "valid",
        **overrides: Any,
    ) -> str:
        """A v2 token for the broker's API as a caller app would get it (first caller app by default)."""
        if client_id is None:
            callers = self.caller_apps()
            if not callers:
                raise LookupError("no caller app registered")
            client_id = callers[0].client_id
        app = self.application(client_id)
        identity = None if app else self.managed_identity(client_id=client_id)
        granted = app.api_roles if app else identity.api_roles if identity else []
        object_id = identity.principal_id if identity else None
        return self.mint_access_token(
            tenant_id=self.home.tenant_id,
            audience=self.broker.client_id,
            client_id=client_id,
            roles=list(granted) if roles is None else roles,
            version="2.0",
            appidacr="1",
            object_id=object_id,
            lifetime=lifetime,
            signing=signing,
            **overrides,
        )

    # -- verification --------------------------------------------------------------------------------

    def verify_access_token(self, token: str, audience: str | Iterable[str]) -> dict[str, Any]:
        """Check a bearer the sandbox issued: RS256, known ``kid``, signature, ``aud``, times, ``iss``/``tid``.

        Raises ``ValueError`` with the reason.
        """
        audiences = [audience] if isinstance(audience, str) else list(audience)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise ValueError(f"malformed token: {exc}") from exc
        if header.get("alg") != "RS256":
            raise ValueError(f"algorithm {header.get('alg')!r} not allowed")
        key = self.key_by_kid(header.get("kid"))
        if key is None:
            raise ValueError("unknown signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.public_key,
                algorithms=["RS256"],
                audience=audiences,
                leeway=30,
                options={"require": ["aud", "exp", "iat", "iss", "tid"]},
            )
        except jwt.PyJWTError as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        tid = str(claims["tid"])
        if not _is_guid(tid):
            raise ValueError("tid is not a GUID")
        if claims.get("ver") == "1.0":
            expected = {self.issuer_v1(tid)}
        else:
            expected = {self.issuer_v2(tid), f"{self.shape.login_host}/{tid}/v2.0"}
        if claims["iss"] not in expected:
            raise ValueError("issuer does not match tid")
        return claims


def _client_secret_value() -> str:
    """Shaped like an Entra client secret: 40 characters with a ``~`` after a three-character hint."""
    return secrets.token_urlsafe(3)[:3] + "8Q~" + secrets.token_urlsafe(30)[:34]
