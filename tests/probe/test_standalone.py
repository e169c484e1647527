"""The probe is a plain client: no Twisted, no zope.interface, none of the server's code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import popserv

ROOT = Path(popserv.__file__).resolve().parent.parent

CODE = """
import sys
sys.modules["twisted"] = None
sys.modules["zope"] = None
import popserv.probe.command
print(sorted(m for m in sys.modules if m.startswith("popserv")))
"""


class StandaloneTests(SynchronousTestCase):
    def test_imports_without_twisted(self):
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        done = subprocess.run(
            [sys.executable, "-c", CODE],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=path),
            check=False,
        )
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        loaded = ast.literal_eval(done.stdout)
        self.assertIn("popserv.probe.checks", loaded)
        others = [m for m in loaded if not m.startswith("popserv.probe")]
        self.assertEqual(others, ["popserv", "popserv._version"])
