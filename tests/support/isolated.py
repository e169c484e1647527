"""Python run in a child process that imports this tree's popserv: for what must load alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import popserv

ROOT = Path(popserv.__file__).resolve().parent.parent

#: Prepended to a child's code: Twisted and zope.interface cannot be imported.
WITHOUT_TWISTED = "import sys; sys.modules['twisted'] = None; sys.modules['zope'] = None\n"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` with this tree first on the path; its output as text."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=path),
        check=False,
    )
