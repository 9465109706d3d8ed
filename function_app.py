"""Azure Functions entry point: registers the broker's functions and delegates.

Importing this module reads no settings and touches no network; the broker builds its dependencies on
first use (``broker.wiring.container``). Callers authenticate with Entra ID inside the app, so the HTTP
function itself is anonymous at the host (function keys would be a second, weaker shared secret).
"""

import azure.functions as func

from broker import wiring
from broker.http.app import create_app

app = func.AsgiFunctionApp(app=create_app(), http_auth_level=func.AuthLevel.ANONYMOUS, function_name="broker_http")


@app.timer_trigger(arg_name="timer", schedule="%INCIDENT_SYNC_SCHEDULE%", run_on_startup=False, use_monitor=True)
def incident_sync_timer(timer: func.TimerRequest) -> None:
    """Fan out: one queue message per enabled tenant."""
    wiring.container().incidents.fan_out()


@app.queue_trigger(arg_name="msg", queue_name="%INCIDENT_SYNC_QUEUE%", connection="AzureWebJobsStorage")
def incident_sync_tenant(msg: func.QueueMessage) -> None:
    """Sync the one tenant the message names; a failure is raised so the host retries, then poisons it."""
    wiring.container().incidents.handle_message(msg.get_body(), msg.dequeue_count)
