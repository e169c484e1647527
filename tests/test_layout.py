"""The test suite's own layout."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import TestCase

TESTS = Path(__file__).resolve().parent


def imported_modules(source: str, path: Path) -> set[str]:
    """
    Every module the file at ``path`` imports: relative imports resolved, and
    each name of a ``from`` import too (it may be a module).
    """
    package = path.relative_to(TESTS.parent).parent.parts
    found = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_a_test_module(name: str) -> bool:
    return any(part.startswith("test_") for part in name.split("."))


class LayoutTests(TestCase):
    def test_no_test_module_imports_another(self):
        """Shared fixtures live in tests/support, so each test module stands alone."""
        for module in sorted(TESTS.rglob("*.py")):
            for name in imported_modules(module.read_text(), module):
                self.assertFalse(
                    imports_a_test_module(name), f"{module.relative_to(TESTS)} imports {name}"
                )

    def test_every_test_folder_is_a_package(self):
        """Trial finds test modules only in packages: each folder of them has an __init__.py."""
        for module in TESTS.rglob("test_*.py"):
            self.assertTrue((module.parent / "__init__.py").exists(), str(module.parent))

    def test_sees_every_spelling(self):
        """The check above catches each way of importing a test module."""
        here = TESTS / "server" / "sample.py"
        for code, name in [
            ("import tests.core.test_wire", "tests.core.test_wire"),
            ("from tests.core.test_wire import X", "tests.core.test_wire"),
            ("from tests.core import test_wire", "tests.core.test_wire"),
            ("from ..core.test_wire import X", "tests.core.test_wire"),
            ("from .test_tls import X", "tests.server.test_tls"),
            ("from . import (\n    x,\n    test_tls,\n)", "tests.server.test_tls"),
        ]:
            self.assertIn(name, imported_modules(code, here), code)
        self.assertFalse(
            any(map(imports_a_test_module, imported_modules("from tests.support import x", here)))
        )
