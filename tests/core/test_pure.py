"""
The pure core imports nothing but the standard library and small pure
packages: no Twisted, no zope.interface, and no other layer of popserv.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import popserv
import popserv.core
from tests.support.isolated import WITHOUT_TWISTED, run_python

#: The checkout (or install) whose popserv the test process imported.
#: Run with Twisted and zope.interface blocked (``import twisted.x`` then
#: fails): imports each module named on the command line, and prints, for
#: each, what it brought in from outside the core.
CHECK = WITHOUT_TWISTED + """
import importlib
ALLOWED = ("popserv", "popserv._version", "popserv.core")


def outside():
    return {
        m for m, module in sys.modules.items()
        if module is not None
        and (m.partition(".")[0] in ("twisted", "zope")
             or (m.startswith("popserv") and not m.startswith(ALLOWED)))
    }


for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as e:
        print(name, "fails:", e)
        continue
    if outside():
        print(name, "imports", sorted(outside()))
"""


def core_modules() -> list[str]:
    """``popserv.core`` and every module in it."""
    folder = Path(popserv.core.__file__).parent
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    return ["popserv.core", *(f"popserv.core.{name}" for name in names)]


class PureCoreTests(SynchronousTestCase):
    def test_every_core_module_imports_without_twisted(self):
        """Each module of popserv.core imports where Twisted and zope.interface cannot."""
        modules = core_modules()
        self.assertIn("popserv.core.wire", modules)
        self.assertIn("popserv.core.view", modules)
        done = run_python(CHECK, *modules)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout, "")

    def test_import_popserv_needs_no_twisted(self):
        """``import popserv`` stays lazy: the public names load only when used."""
        code = WITHOUT_TWISTED + (
            "import popserv, popserv.core.wire\n"
            "assert set(popserv.__all__) >= {'POP3Factory', 'deliver'}\n"
            "print(sorted(m for m in sys.modules if m.startswith('popserv')))\n"
        )
        done = run_python(code)
        done.check_returncode()
        loaded = ast.literal_eval(done.stdout)
        self.assertIn("popserv.core.wire", loaded)
        self.assertEqual(
            [m for m in loaded if m != "popserv._version" and not m.startswith("popserv.core")],
            ["popserv"],
        )
