"""The probe is a plain client: no Twisted, no zope.interface, none of the server's code."""

from __future__ import annotations

import ast

from twisted.trial.unittest import SynchronousTestCase

from tests.support.isolated import WITHOUT_TWISTED, run_python

CODE = WITHOUT_TWISTED + """
import popserv.probe.command
print(sorted(m for m in sys.modules if m.startswith("popserv")))
"""


class StandaloneTests(SynchronousTestCase):
    def test_imports_without_twisted(self):
        done = run_python(CODE)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        loaded = ast.literal_eval(done.stdout)
        self.assertIn("popserv.probe.checks", loaded)
        others = [m for m in loaded if not m.startswith("popserv.probe")]
        self.assertEqual(others, ["popserv", "popserv._version"])
