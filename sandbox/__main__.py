"""``python -m sandbox --state-dir DIR [--env-file FILE] [--cloud CLOUD]``: run every stand-in in the foreground.

``--cloud usgovernment`` (or ``china``) plays that cloud's shape: issuers, token-exchange audience and
resource URIs of that cloud, and ``AZURE_CLOUD`` set to match in the settings written.

Once all ports listen, the broker's settings (``Sandbox.env()`` plus ``SANDBOX_CONTROL_URL``) are written
atomically as JSON to FILE and one summary line is printed. SIGINT or SIGTERM stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from sandbox.directory import CLOUD_SHAPES, Directory
from sandbox.server import Sandbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path, help="where the CA files are written")
    parser.add_argument("--env-file", type=Path, help="write the settings as JSON here once listening")
    parser.add_argument("--no-seed", action="store_true", help="start without the demo tenants and apps")
    parser.add_argument("--cloud", choices=sorted(CLOUD_SHAPES), default="public", help="the cloud to play")
    parser.add_argument(
        "--live",
        action="store_true",
        help="demo incidents dated over the last two days (default: from 2024-05-01, as tests expect)",
    )
    parser.add_argument(
        "--activity-per-minute",
        type=float,
        default=0.0,
        help="new and updated incidents per minute in each demo tenant while running",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    directory = Directory(cloud=args.cloud)
    sandbox = Sandbox(
        args.state_dir,
        seed=not args.no_seed,
        directory=directory,
        live=args.live,
        activity_per_minute=args.activity_per_minute,
    ).start()
    try:
        env = {**sandbox.env(), "SANDBOX_CONTROL_URL": sandbox.control_url}
        if args.env_file:
            tmp = args.env_file.with_name(args.env_file.name + ".tmp")
            tmp.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, args.env_file)
        tenants = ",".join(t.name for t in sandbox.directory.customer_tenants())
        print(
            "sandbox ready "
            + " ".join(f"{name}={url}" for name, url in sandbox.urls.items())
            + f" tenants={tenants or '-'} ca_bundle={sandbox.ca_bundle}",
            flush=True,
        )
        stop.wait()
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
