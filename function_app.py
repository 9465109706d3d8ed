"""Azure Functions entry point: registers the broker's functions and delegates.

Importing this module reads no settings and touches no network; the broker builds its dependencies on
first use (``broker.wiring.container``). Callers authenticate with Entra ID inside the app, so the HTTP
function itself is anonymous at the host (function keys would be a second, weaker shared secret).
"""

import azure.functions as func

from broker.api import create_app

app = func.AsgiFunctionApp(app=create_app(), http_auth_level=func.AuthLevel.ANONYMOUS, function_name="broker_http")
