"""``python -m devrun.child MODULE ARGS…``: run ``python -m MODULE ARGS…`` as a child of ``make run`` that dies
with it.

On Linux the child asks the kernel for SIGTERM when its parent exits, even by SIGKILL, so neither the
broker nor the functions host outlives a ``make run`` that was killed outright (a clean stop already stops
them). It is set here, in the child's own interpreter, rather than in a ``preexec_fn``: ``make run`` has
threads running (the sandbox), and code between fork and exec is unsafe then.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m devrun.child MODULE [ARGS...]")
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            raise SystemExit(0)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
