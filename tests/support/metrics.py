"""Reading a metrics page: fetch it, parse its samples, have promtool check it."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.support.peers import missing


def http_get(url: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) to value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def promtool_check(case: TestCase, text: str) -> None:
    """``promtool check metrics`` must accept ``text`` with no problem at all."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise missing("promtool is not installed (Debian's prometheus package)")
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        check=False,
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    case.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
    case.assertEqual(checked.stdout.strip() + checked.stderr.strip(), "")
