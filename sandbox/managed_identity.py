"""The App Service / Functions managed-identity endpoint (plain http, as the real local endpoint is).

``GET /msi/token?api-version=2019-08-01&resource=…[&client_id=…|&principal_id=…|&mi_res_id=…]`` with
header ``X-IDENTITY-HEADER``; the reply is ``{access_token, expires_on, resource, token_type, client_id}``.

- ``resource=https://vault.azure.net`` (or any Microsoft resource): a v1 token from the home tenant;
- ``resource=api://AzureADTokenExchange`` (the cloud's token-exchange audience): the v2 assertion a
  federated identity credential accepts (``iss=https://login.microsoftonline.com/{home}/v2.0`` with the
  cloud's sign-in host, ``sub`` = principal id); user-assigned only;
- ``resource=api://<broker client id>``: a v2 caller token carrying the identity's roles on the broker.

Errors follow the endpoint's ``{"statusCode", "message"}`` shape. Counter: ``mi.token`` (and
``mi.token:<identity client id>``).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.directory import Directory
from sandbox.state import FaultsAndLatency, Recorder

MI_SERVICE = "mi"
MI_PATH = "/msi/token"
API_VERSION = "2019-08-01"


def _fail(status: int, message: str) -> Response:
    return JSONResponse({"statusCode": status, "message": message}, status_code=status)


def create_managed_identity_app(directory: Directory, recorder: Recorder, identity_header: str) -> Any:
    """The managed-identity endpoint as an ASGI app (wrapped for faults and latency)."""

    async def token(request: Request) -> Response:
        params = request.query_params
        if request.headers.get("x-identity-header") != identity_header:
            recorder.hit("mi.token")
            return _fail(401, "Unauthorized request")
        identity = directory.managed_identity(
            client_id=params.get("client_id", ""),
            principal_id=params.get("principal_id", "") or params.get("object_id", ""),
            resource_id=params.get("mi_res_id", ""),
        )
        recorder.hit("mi.token", identity.client_id if identity else None)
        if params.get("api-version") != API_VERSION:
            return _fail(400, f"The api-version '{params.get('api-version', '')}' could not be found.")
        resource = params.get("resource", "").strip()
        if not resource:
            return _fail(400, "resource is required")
        if identity is None:
            return _fail(400, "Unable to load the proper Managed Identity.")
        resource = resource.removesuffix("/.default")
        home = directory.home.tenant_id
        lifetime = directory.mi_token_lifetime
        exchange_audience = directory.shape.token_exchange_audience
        if resource == exchange_audience:
            if not identity.user_assigned:
                return _fail(
                    400, "Only user-assigned managed identities can be used as a federated identity credential."
                )
            access_token = directory.mint_access_token(
                tenant_id=home,
                audience=exchange_audience,
                client_id=identity.client_id,
                version="2.0",
                appidacr="2",
                object_id=identity.principal_id,
                lifetime=lifetime,
                issuer=directory.exchange_issuer,
                idtyp=None,
            )
        elif directory.is_broker_api(resource):
            access_token = directory.mint_access_token(
                tenant_id=home,
                audience=directory.broker.client_id,
                client_id=identity.client_id,
                roles=identity.api_roles,
                version="2.0",
                appidacr="2",
                object_id=identity.principal_id,
                lifetime=lifetime,
            )
        elif resource.rstrip("/") in directory.shape.known_resources:
            access_token = directory.mint_access_token(
                tenant_id=home,
                audience=resource.rstrip("/"),
                client_id=identity.client_id,
                version="1.0",
                appidacr="2",
                object_id=identity.principal_id,
                lifetime=lifetime,
            )
        else:
            return _fail(400, f"AADSTS500011: The resource principal named {resource} was not found in the tenant.")
        return JSONResponse(
            {
                "access_token": access_token,
                "expires_on": str(int(time.time()) + lifetime),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )

    app = Starlette(routes=[Route(MI_PATH, token, methods=["GET"])])
    return FaultsAndLatency(app, MI_SERVICE, recorder)
