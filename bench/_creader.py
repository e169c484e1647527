"""
B2's reader: ``bench/_reader.c``, compiled at bench time with the system's
``cc``, run once per measurement, its counts checked here.

The asyncio client (``bench/_client.py``) reads about as fast as popserv
sends, so B2 measured the client (issue 20).  The C reader reads into one
preallocated 4 MiB buffer and counts with ``memchr``: about 3x the asyncio
client against the in-memory sender here (README, "The reader"), and it
leaves the verdict to :func:`bench._wire.check_retr`, as the client does.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

from attrs import frozen

from bench._wire import Body, DesyncError, check_retr

SOURCE = Path(__file__).resolve().parent / "_reader.c"


class ReaderError(Exception):
    """The reader could not be built, or a session failed (``-ERR``, a closed connection)."""


@frozen
class Retrieved:
    """One RETR as the reader counted it."""

    number: int
    listed: int
    octets: int
    lines: int
    bare_lf: int
    seconds: float


def parse(output: str) -> list[Retrieved]:
    """The reader's lines ``N LISTED OCTETS LINES BARE_LF SECONDS``."""
    out = []
    for line in output.splitlines():
        n, listed, octets, lines, bare, seconds = line.split()
        out.append(
            Retrieved(int(n), int(listed), int(octets), int(lines), int(bare), float(seconds))
        )
    return out


def check(retrieved: Retrieved) -> None:
    """Raise :class:`DesyncError` unless a RETR matched LIST and had only CRLF line ends."""
    if retrieved.bare_lf:
        raise DesyncError(f"RETR {retrieved.number}: {retrieved.bare_lf} lines end in a bare LF")
    check_retr(retrieved.number, retrieved.listed, Body(retrieved.octets, retrieved.lines))


def compiler() -> str | None:
    """``$CC`` or ``cc`` on PATH; None without one."""
    return shutil.which(os.environ.get("CC", "cc"))


def build(directory: Path) -> Path:
    """Compile the reader into ``directory``; raise :class:`ReaderError` without a compiler."""
    cc = compiler()
    if cc is None:
        raise ReaderError("no C compiler (cc)")
    binary = directory / "_reader"
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [cc, "-O2", "-o", str(binary), str(SOURCE)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise ReaderError(f"cc failed: {done.stderr.strip()[:200]}")
    return binary


def count(binary: Path, stream: bytes, chunk: int) -> list[Retrieved]:
    """The bodies in ``stream`` as the reader counts them, read ``chunk`` octets at a time."""
    done = subprocess.run(
        [str(binary), "--count", str(chunk)], input=stream, capture_output=True, check=False
    )
    if done.returncode:
        raise ReaderError(done.stderr.decode(errors="replace").strip())
    return parse(done.stdout.decode())


def retrieve_all(
    binary: Path, host: str, port: int, user: str, password: str, rounds: int = 1
) -> tuple[list[int], list[float], float]:
    """
    B2: one session, RETR of every message ``rounds`` times over, each
    checked; returns (octets, seconds) per RETR and the reader's CPU seconds.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [str(binary), host, str(port), user, password, str(rounds)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        raise ReaderError(done.stderr.strip()[:200])
    retrieved = parse(done.stdout)
    for r in retrieved:
        check(r)
    return [r.octets for r in retrieved], [r.seconds for r in retrieved], cpu
