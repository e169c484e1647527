"""How many examples a property or stateful test runs."""

from __future__ import annotations

import os


def examples(normal: int, share: int = 1) -> int:
    """``normal`` examples, or ``POPSERV_FUZZ_EXAMPLES // share`` for a long run."""
    configured = os.environ.get("POPSERV_FUZZ_EXAMPLES")
    if not configured:
        return normal
    return max(int(configured) // share, normal)
