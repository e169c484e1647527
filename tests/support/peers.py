"""
Peers the tests drive (clients, HAProxy, Prometheus, PostgreSQL ...): a
test whose peer is not installed skips, saying how to install it, unless
``POPSERV_REQUIRE_PEERS`` is set, as ``.ci/run`` sets it: then it fails, so
CI always runs every test.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SkipTest

#: The environment variable that makes a missing peer fail, not skip.
REQUIRE_PEERS = "POPSERV_REQUIRE_PEERS"


def missing(what: str) -> Exception:
    """A skip, or with ``POPSERV_REQUIRE_PEERS`` set a failure, for ``what`` not installed."""
    if os.environ.get(REQUIRE_PEERS):
        return AssertionError(f"{what}, and {REQUIRE_PEERS} is set")
    return SkipTest(what)
