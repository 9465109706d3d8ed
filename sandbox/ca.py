"""The sandbox's own certificate authority, so every https stand-in is reached with ordinary TLS checks.

``create_ca(state_dir)`` makes a fresh CA and one server certificate for ``127.0.0.1`` and ``localhost``
and writes into the state directory:

- ``ca.pem``: the sandbox CA alone;
- ``ca-bundle.pem``: the sandbox CA followed by the CAs already trusted (the environment's bundle, else certifi's). Put this one file in
  ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` / ``SSL_CERT_FILE`` and both the stand-ins and the public
  internet still verify;
- ``server.pem`` / ``server-key.pem``: the stand-ins' certificate chain and key (for uvicorn).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import certifi
import trustme

SERVER_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class SandboxCA:
    """Paths of the CA material one sandbox run uses."""

    ca_path: Path
    bundle_path: Path
    cert_path: Path
    key_path: Path

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext that trusts the sandbox CA (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.ca_path))


def create_ca(state_dir: Path) -> SandboxCA:
    """Make a CA and a loopback server certificate; write them into ``state_dir``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="Partner token broker sandbox")
    leaf = ca.issue_cert(*SERVER_HOSTS)
    ca_pem = ca.cert_pem.bytes()
    ca_path = state_dir / "ca.pem"
    bundle_path = state_dir / "ca-bundle.pem"
    cert_path = state_dir / "server.pem"
    key_path = state_dir / "server-key.pem"
    _write(ca_path, ca_pem)
    _write(bundle_path, ca_pem.rstrip(b"\n") + b"\n" + _existing_trust())
    _write(cert_path, b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    _write(key_path, leaf.private_key_pem.bytes(), mode=0o600)
    return SandboxCA(ca_path=ca_path, bundle_path=bundle_path, cert_path=cert_path, key_path=key_path)


def _existing_trust() -> bytes:
    """The CAs this process already trusts: the bundle its environment names, else certifi's.

    The sandbox bundle replaces REQUESTS_CA_BUNDLE / SSL_CERT_FILE, so it must keep what those trusted
    (on some machines a private CA in front of the package registries), not only the public roots.
    """
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        path = os.environ.get(name)
        if path and Path(path).is_file():
            data = Path(path).read_bytes()
            if b"BEGIN CERTIFICATE" in data:
                return data
    return Path(certifi.where()).read_bytes()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write atomically, so a reader never sees half a bundle."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
