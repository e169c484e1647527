"""How many examples a property or stateful test runs."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def examples(normal: int, share: int = 1) -> int:
    """``normal`` examples, or ``POPSERV_FUZZ_EXAMPLES // share`` for a long run."""
    configured = os.environ.get("POPSERV_FUZZ_EXAMPLES")
    if not configured:
        return normal
    return max(int(configured) // share, normal)


def stateful_settings(normal: int) -> settings:
    """Settings of a stateful test of whole sessions: ``normal`` runs (a fifth of a long run's)."""
    return settings(
        max_examples=examples(normal, share=5),
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
