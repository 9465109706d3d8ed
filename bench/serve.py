"""``python -m bench.serve``: ``python -m broker serve``, optionally without the per-request summary line.

The benchmark serves the broker both ways in one run to measure what that line costs a cached request.
"""

from __future__ import annotations

import argparse
import logging

from broker.cli import main

REQUEST_LOGGERS = ("broker.api", "broker.http")  # the routes' loggers (and their children)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-request-log", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="7071")
    args = parser.parse_args()
    if args.no_request_log:
        for name in REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    raise SystemExit(main(["serve", "--host", args.host, "--port", args.port]))
