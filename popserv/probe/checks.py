"""
The checks of ``popserv probe``, in the order they run: each a small
function of the :class:`~popserv.probe.session.Probe` that returns a
status and one line of detail, or raises
:class:`~popserv.probe.session.Skip` when it cannot apply (a
:class:`~popserv.probe.client.ProbeError` is a failure).

Severities: ``fail`` where an RFC says MUST (or where a client would
misread the server: wrong sizes, unstuffed dots, a confused pipeline),
``warn`` for advice (RFC SHOULDs, and what operators are told to do:
delay failed logins, no passwords in the clear over a network), ``pass``
otherwise.  docs/probe.rst describes every check.
"""

from __future__ import annotations

# Imported in the order the checks run: each registers its own.
from popserv.probe import beforelogin, loggedin, othersessions  # noqa: F401
from popserv.probe.registry import CHECKS, Check, check, names, run_check

__all__ = ["CHECKS", "Check", "check", "names", "run_check"]
