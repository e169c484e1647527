"""
Sampling popserv while a benchmark runs (``--profile DIR``), with py-spy.

py-spy attaches to the running twistd from outside, so the server runs
unchanged; each benchmark's first run on popserv leaves a collapsed-stack
file (``DIR/B1.txt``: one stack and its sample count a line, which
speedscope and flamegraph.pl read) and the summary printed after the table:
the functions where samples fall (self) and those they pass through
(inclusive), as percentages of the samples.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

#: Samples per second: enough for a 10 s run, cheap for the server.
RATE = 200

_LINE_NUMBER = re.compile(r":\d+\)$")
#: The part of a file name before the package: site-packages, the stdlib, the tree.
_PREFIX = re.compile(r"\((?:[^()]*/site-packages/|[^()]*/lib/python3\.\d+/|[^()]*/(?=popserv/))")


def find_py_spy(given: str | None) -> str | None:
    """The py-spy to use: ``given``, or one on PATH; None if there is none."""
    if given:
        return given
    return shutil.which("py-spy")


class Profiler:
    """Records one process at a time into ``directory``."""

    def __init__(self, py_spy: str, directory: Path) -> None:
        self.py_spy = py_spy
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._process: subprocess.Popen[bytes] | None = None
        self._output: Path | None = None
        self.summaries: list[tuple[str, str]] = []

    def start(self, pid: int, label: str) -> None:
        name = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        self._output = self.directory / f"{name}.txt"
        self._label = label
        self._process = subprocess.Popen(
            [
                self.py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--format",
                "raw",
                "--output",
                str(self._output),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop recording (py-spy writes its file on SIGINT) and summarise it."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._output is not None and self._output.exists():
            text = self._output.read_text(errors="replace").splitlines()
            self.summaries.append((self._label, summarize(text)))


#: Leaf frames of threads that wait for work: not where time goes.
_IDLE = frozenset({"Condition.wait (threading.py)"})


def _short(frame: str) -> str:
    """``func (/long/path/popserv/x.py:12)`` as ``func (popserv/x.py)``."""
    return _PREFIX.sub("(", _LINE_NUMBER.sub(")", frame))


def summarize(lines: Iterable[str], top: int = 12) -> str:
    """The ``top`` functions by self and by inclusive samples, from collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    through: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        if frames[-1] in _IDLE:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            through[frame] += n
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples (idle pool threads left out); self:"]
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive (popserv and Twisted frames):")
    shown = [
        (f, n)
        for f, n in through.most_common()
        if "popserv/" in f or "twisted/internet/tcp" in f or "twisted/_threads" in f
    ]
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in shown[:top]]
    return "\n".join(out)
