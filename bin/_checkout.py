"""Run an s6tls command from this checkout, with the checkout's .venv.

The scripts of bin/ start with whatever ``python3`` is first on PATH, which
may lack pyOpenSSL: they re-execute themselves with ``.venv/bin/python``
(made by ``./scripts/install``), or say in one line that it is missing.
``S6TLS_VENV`` names another venv to run with instead: ``scripts/floors``
runs the tests on the lowest versions of the dependencies that way.
"""

import os
import sys
from importlib import import_module


def run(module: str, script: str) -> None:
    """Call ``module``'s ``main`` under the checkout's .venv (or S6TLS_VENV); ``script``
    is the caller's file."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(script)))
    venv = os.environ.get("S6TLS_VENV") or os.path.join(root, ".venv")
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        python = os.path.join(venv, "bin", "python")
        if not os.access(python, os.X_OK):
            name = os.path.basename(script)
            sys.stderr.write(f"{name}: fatal: no {venv}: run ./scripts/install first\n")
            sys.exit(111)
        os.execv(python, [python, script, *sys.argv[1:]])
    sys.path.insert(0, root)
    import_module(module).main()
