"""
What ``popserv probe`` found: one :class:`Result` per check, shown as an
aligned table or as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from attrs import frozen

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

#: Every status, in the order the summary counts them.
STATUSES = (PASS, WARN, FAIL, SKIP)


@frozen
class Result:
    """One check's outcome: its name, a status from :data:`STATUSES`, one line of detail."""

    check: str
    status: str
    detail: str

    def __attrs_post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")


def passed(check: str, detail: str) -> Result:
    return Result(check, PASS, detail)


def warned(check: str, detail: str) -> Result:
    return Result(check, WARN, detail)


def failed(check: str, detail: str) -> Result:
    return Result(check, FAIL, detail)


def skipped(check: str, detail: str) -> Result:
    return Result(check, SKIP, detail)


def counts(results: Sequence[Result]) -> dict[str, int]:
    return {status: sum(1 for r in results if r.status == status) for status in STATUSES}


def exit_status(results: Sequence[Result]) -> int:
    """0 when no check failed, 1 when any did."""
    return 1 if any(r.status == FAIL for r in results) else 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def title_lines(title: str, width: int) -> str:
    """The table's title and its header, for check names up to ``width`` characters."""
    return f"{title}\n{'CHECK':<{width}}  {'RESULT':<6}  DETAIL\n"


def row(result: Result, width: int) -> str:
    """One result's line of the table."""
    return f"{result.check:<{width}}  {result.status:<6}  {_one_line(result.detail)}\n"


def summary(results: Sequence[Result]) -> str:
    """The table's last line: how many checks had each status."""
    found = counts(results)
    return ", ".join(f"{found[status]} {status}" for status in STATUSES) + "\n"


def table(title: str, results: Sequence[Result]) -> str:
    """The whole table: title, header, one aligned line per result, the counts."""
    width = max([len("CHECK"), *(len(r.check) for r in results)])
    return title_lines(title, width) + "".join(row(r, width) for r in results) + summary(results)


def as_json(target: str, results: Sequence[Result]) -> str:
    """The results as one JSON object: the target, each check, and the counts."""
    document = {
        "target": target,
        "results": [
            {"check": r.check, "status": r.status, "detail": _one_line(r.detail)} for r in results
        ],
        "counts": counts(results),
        "exit_status": exit_status(results),
    }
    return json.dumps(document, indent=2) + "\n"


__all__ = [
    "FAIL",
    "PASS",
    "SKIP",
    "STATUSES",
    "WARN",
    "Result",
    "as_json",
    "counts",
    "exit_status",
    "failed",
    "passed",
    "row",
    "skipped",
    "summary",
    "table",
    "title_lines",
    "warned",
]
