"""
CPU per B1 session: where the two cores go, server by server.

    python -m bench.cpu_per_session SERVER [python -m bench options...]

Runs ``python -m bench --servers SERVER --only B1 --repeat 1`` and, inside
its measured window, reads the CPU time of the server's process tree
(``utime + stime`` of each process, plus ``cutime + cstime``: what its
reaped children used, such as Dovecot's short-lived ones) and of the whole
machine (``/proc/stat``).  Prints each process's share, then milliseconds
of CPU per session for the server and for everything else (the client,
the kernel's work for both).  With the machine's cores and these two
numbers, the most sessions a second a server can reach here is
``cores / (server + rest)``; one process cannot pass ``1 / server``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
#: Seconds into the run's B1 before the first reading (after the warm-up),
#: and between the readings (inside the measured 10 s).
SETTLE = 4.0
WINDOW = 6.0


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu(pid: int) -> float:
    """Seconds of CPU of ``pid`` and its reaped children; 0 once it is gone."""
    try:
        return sum(int(x) for x in _stat(pid)[11:15]) / TICK
    except OSError:
        return 0.0


def busy() -> float:
    """Seconds of CPU the whole machine has been busy."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def listener(port: int) -> int:
    """The topmost process listening on ``port``."""
    out = subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    pids = {int(x) for x in re.findall(r"pid=(\d+)", out)}
    for pid in pids:
        if int(_stat(pid)[1]) not in pids:
            return pid
    raise LookupError(f"nothing listens on {port}")


def main() -> int:
    server, *rest = sys.argv[1:]
    command = [sys.executable, "-m", "bench", "--servers", server, "--only", "B1",
               "--repeat", "1", *rest]
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert bench.stdout is not None
    port, used, machine, pids = None, 0.0, 0.0, []
    for line in bench.stdout:
        if match := re.search(r"starting \S+ on port (\d+)", line):
            port = int(match.group(1))
        if line.startswith("B1 on") and port is not None:
            time.sleep(SETTLE)
            pids = tree(listener(port))
            before = {pid: cpu(pid) for pid in pids}
            machine, began = busy(), time.monotonic()
            time.sleep(WINDOW)
            machine, took = busy() - machine, time.monotonic() - began
            spent = {pid: cpu(pid) - before[pid] for pid in pids}
            used = sum(spent.values())
            for pid, seconds in sorted(spent.items(), key=lambda item: -item[1])[:5]:
                print(f"  pid {pid}: {seconds:.2f} CPU s in {took:.1f} s", flush=True)
        if (match := re.match(r"\s+(\d+) sessions/s", line)) and pids:
            sessions = int(match.group(1)) * took
            print(
                f"{server}: {match.group(1)} sessions/s; {len(pids)} processes;"
                f" server {used / sessions * 1e3:.2f} ms CPU a session,"
                f" everything else {(machine - used) / sessions * 1e3:.2f} ms"
                f" (machine busy {machine:.1f} of {os.cpu_count() or 1} x {took:.1f} s)",
                flush=True,
            )
            pids = []
    return bench.wait()


if __name__ == "__main__":
    sys.exit(main())
