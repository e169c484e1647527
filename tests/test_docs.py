"""The documentation in docs/ builds with Sphinx, warnings counted as errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

DOCS = Path(__file__).resolve().parent.parent / "docs"


class DocsTests(TestCase):
    def test_builds_without_warnings(self):
        try:
            import sphinx  # noqa: F401
        except ImportError:
            raise SkipTest("sphinx is not installed (pip install '.[docs]')") from None
        out = Path(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
             str(DOCS), str(out)],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue((out / "index.html").exists())
        self.assertTrue((out / "architecture.html").exists())

    def test_readme_links_exist(self):
        """Every docs/ page the README links to is there."""
        readme = (DOCS.parent / "README.rst").read_text()
        import re

        for page in re.findall(r"<docs/([a-z]+)\.rst>", readme):
            self.assertTrue((DOCS / f"{page}.rst").exists(), page)

