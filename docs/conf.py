"""Sphinx configuration for popserv's documentation (``sphinx-build docs build/docs``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from popserv._version import __version__

project = "popserv"
author = "the popserv developers"
release = version = __version__
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
