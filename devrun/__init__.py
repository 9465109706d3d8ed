"""``make run`` (``python -m devrun``): the broker on http://127.0.0.1:7071 with Azurite and the sandbox.

It lives outside ``sandbox/`` because it wires the broker to the stand-ins: the sandbox never imports the
broker, and the broker never imports the sandbox; this package is the one place that knows both.
"""
