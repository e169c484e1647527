"""
Where the CPU goes during a measurement: the server's processes, its
database's (``popserv-pg``'s PostgreSQL), and the rest of the machine (the
client and the kernel's work for both), read from ``/proc``.

A process's CPU is its ``utime + stime`` plus ``cutime + cstime`` (what
its reaped children used, such as Dovecot's short-lived ones), in
seconds.  Processes are listed when the window opens and when it closes:
one started inside it (a new backend, a new Dovecot process) counts whole,
one reaped inside it is counted by its parent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from attrs import define, field

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """Seconds of CPU of ``pid`` and its reaped children; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def machine_busy() -> float:
    """Seconds of CPU the whole machine has been busy (all cores, idle and iowait left out)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


@define
class Spent:
    """CPU seconds spent in a window, by whom, and the window's length."""

    server: float
    database: float
    machine: float
    seconds: float
    #: The server's by part (HAProxy, each node), when it has parts.
    parts: dict[str, float] = field(factory=dict)

    @property
    def rest(self) -> float:
        """The client and the kernel's work for everyone: what is not the servers'."""
        return max(0.0, self.machine - self.server - self.database)


def _since(before: dict[int, float], now: list[int]) -> float:
    """
    CPU used since ``before`` by those processes and by those in ``now``
    that were not there then (a session's new Dovecot process, a new
    PostgreSQL backend): all of theirs.
    """
    return sum(process_cpu(pid) - t for pid, t in before.items()) + sum(
        process_cpu(pid) for pid in now if pid not in before
    )


class Meter:
    """Reads the CPU of a server and its database at :meth:`open` and :meth:`close`."""

    def __init__(
        self,
        server: Callable[[], list[int]],
        database: Callable[[], list[int]],
        parts: dict[str, Callable[[], list[int]]] | None = None,
    ) -> None:
        self._server_pids = server
        self._database_pids = database
        self._parts = parts or {}
        self._start: (
            tuple[dict[int, float], dict[int, float], dict[str, dict[int, float]], float, float]
            | None
        ) = None

    def open(self) -> None:
        server = {pid: process_cpu(pid) for pid in self._server_pids()}
        database = {pid: process_cpu(pid) for pid in self._database_pids()}
        parts = {
            name: {pid: process_cpu(pid) for pid in pids()} for name, pids in self._parts.items()
        }
        self._start = (server, database, parts, machine_busy(), time.monotonic())

    def close(self) -> Spent:
        assert self._start is not None
        server, database, parts, machine, began = self._start
        return Spent(
            _since(server, self._server_pids()),
            _since(database, self._database_pids()),
            machine_busy() - machine,
            time.monotonic() - began,
            {name: _since(parts[name], pids()) for name, pids in self._parts.items()},
        )

    def between(self, start: float, end: float) -> Callable[[], Spent | None]:
        """
        Read at wall-clock ``start`` and ``end`` (``time.time()``) from a
        thread, while the caller waits for a load; the returned function
        gives the result once ``end`` has passed (None if it failed).
        """
        result: list[Spent] = []

        def watch() -> None:
            time.sleep(max(0.0, start - time.time()))
            self.open()
            time.sleep(max(0.0, end - time.time()))
            result.append(self.close())

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()

        def get() -> Spent | None:
            thread.join(timeout=max(0.0, end - time.time()) + 10)
            return result[0] if result else None

        return get
