"""The test suite's own layout."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import TestCase

TESTS = Path(__file__).resolve().parent


class LayoutTests(TestCase):
    def test_no_test_module_imports_another(self):
        """Shared fixtures live in tests/support, so each test module stands alone."""
        pattern = re.compile(r"^\s*(from|import)\s+(tests\.|\.)?test_\w+", re.MULTILINE)
        for module in TESTS.glob("*.py"):
            self.assertIsNone(pattern.search(module.read_text()), module.name)
