"""
Results, targets and the table (pure, no I/O).

Each measurement keeps every repetition's value; the table shows the median
and the ratios of medians, popserv over each other server.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from attrs import define, field, frozen


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank (no interpolation); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


@frozen
class Target:
    """A goal for popserv: a ratio to another server, or an absolute bound."""

    #: "ratio": popserv / ``other``; "absolute": popserv's own value.
    kind: str
    bound: float
    #: ">=" or "<=".
    op: str
    other: str = "dovecot"

    def describe(self) -> str:
        if self.kind == "ratio":
            return f"{self.op} {self.bound:g}x {self.other}"
        return f"{self.op} {self.bound:g}"

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


@define
class Measurement:
    """One metric of one benchmark, for every server, every repetition."""

    bench: str
    metric: str
    unit: str
    higher_is_better: bool
    target: Target | None = None
    values: dict[str, list[float]] = field(factory=dict)
    notes: dict[str, str] = field(factory=dict)

    def add(self, server: str, value: float) -> None:
        self.values.setdefault(server, []).append(value)

    def median(self, server: str) -> float | None:
        values = self.values.get(server)
        return statistics.median(values) if values else None

    def best(self, server: str) -> float | None:
        values = self.values.get(server)
        if not values:
            return None
        return max(values) if self.higher_is_better else min(values)

    def ratio(self, other: str, server: str = "popserv") -> float | None:
        mine, theirs = self.median(server), self.median(other)
        if mine is None or theirs is None or theirs == 0:
            return None
        return mine / theirs

    def verdict(self, server: str = "popserv") -> str:
        """``met``, ``MISSED`` (with the ratio or value), or empty without a target."""
        t = self.target
        if t is None:
            return ""
        value = self.ratio(t.other, server) if t.kind == "ratio" else self.median(server)
        if value is None:
            return "n/a"
        return "met" if t.met(value) else "MISSED"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:#.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(measurements: Sequence[Measurement], servers: Sequence[str]) -> str:
    """An RST simple table: medians, ratios popserv/other, target and verdict."""
    others = [s for s in servers if s != "popserv"]
    header = ["bench", "metric", *servers]
    if "popserv" in servers:
        header += [f"pop/{_short(o)}" for o in others] + ["target", "verdict"]
    # The PostgreSQL store's variants get their own ratios to Dovecot and
    # verdicts: their targets are the same as popserv's.
    stores = [s for s in servers if s.startswith("popserv-pg")]
    if "dovecot" in servers:
        header += [f"{_short(s)}/dov" for s in stores]
    header += [f"{_short(s)} verdict" for s in stores]
    rows = [header]
    for m in measurements:
        row = [m.bench, f"{m.metric} ({m.unit})"]
        for s in servers:
            note = m.notes.get(s)
            row.append(note if note and m.median(s) is None else _number(m.median(s)))
        if "popserv" in servers:
            row += [_ratio(m.ratio(o)) for o in others]
            row += [m.target.describe() if m.target else "", m.verdict()]
        if "dovecot" in servers:
            row += [_ratio(m.ratio("dovecot", s)) for s in stores]
        row += [m.verdict(s) for s in stores]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, _row(rows[0], widths), rule]
    lines += [_row(r, widths) for r in rows[1:]]
    lines.append(rule)
    return "\n".join(lines)


def _short(server: str) -> str:
    """A column's name: ``dov``, ``twi``; ``w2`` for ``popserv-w2``."""
    return server.removeprefix("popserv-") if server.startswith("popserv-") else server[:3]


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    # RST simple tables need the first column non-empty; "-" keeps cells aligned.
    return "  ".join((c or "..").ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def details(measurements: Sequence[Measurement]) -> str:
    """Every repetition's value, and each server's best, one line per cell."""
    lines = []
    for m in measurements:
        for server, values in m.values.items():
            shown = ", ".join(_number(v) for v in values)
            lines.append(
                f"{m.bench} {m.metric} {server}: median {_number(m.median(server))},"
                f" best {_number(m.best(server))} {m.unit} [{shown}]"
            )
        for server, note in m.notes.items():
            lines.append(f"{m.bench} {m.metric} {server}: {note}")
    return "\n".join(lines)
