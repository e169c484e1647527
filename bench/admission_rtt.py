"""
The workers' admission round trip: how long a worker waits for the parent's
answer to ``connection()`` (and ``user_session()``), over a UNIX socketpair.

    python -m bench.admission_rtt [--count N]

Three numbers per question:

- *local*: ``LocalAdmission`` asked directly (what one process pays);
- *one process*: a ``RemoteAdmission`` and the ``AdmissionServer`` on one
  reactor, one question at a time (both sides' CPU in one process);
- *two processes*: the parent in its own process, as with ``--workers``:
  one question at a time (latency), then 100 in flight (what one worker
  can ask per second when its connections arrive together).

Each question is followed by its lease's ``Release`` (sent without answer),
as a connection's life asks for both.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from popserv.server.admission import IAdmission, LocalAdmission
from popserv.server.policy import Policy
from popserv.server.workers import connect_admission, serve_admission

POLICY = Policy(
    hostname="bench", max_connections=10**9, max_connections_per_ip=10**9, max_user_sessions=10**9
)

PARENT = """
import sys
from twisted.internet import reactor
from popserv.server.admission import LocalAdmission
from popserv.server.policy import Policy
from popserv.server.workers import serve_admission
import socket
policy = Policy(hostname="bench", max_connections=10**9, max_connections_per_ip=10**9,
                max_user_sessions=10**9)
sock = socket.socket(fileno=int(sys.argv[1]))
server = serve_admission(sock, LocalAdmission(policy, reactor), reactor)
server.when_lost().addCallback(lambda _: reactor.stop())
reactor.run()
"""

Ask = Callable[[IAdmission, int], Deferred[Any]]


def connection(admission: IAdmission, i: int) -> Deferred[Any]:
    return admission.connection("pop3", f"192.0.2.{i % 250}")


def user_session(admission: IAdmission, i: int) -> Deferred[Any]:
    return admission.user_session(f"user{i % 1000}")


async def one_at_a_time(admission: IAdmission, ask: Ask, count: int) -> float:
    """Microseconds per question, each awaited before the next."""
    began = time.perf_counter()
    for i in range(count):
        lease = await ask(admission, i)
        lease.release()
    return (time.perf_counter() - began) / count * 1e6


async def in_flight(admission: IAdmission, ask: Ask, count: int, width: int) -> float:
    """Questions per second with ``width`` of them in flight."""
    began = time.perf_counter()
    for start in range(0, count, width):
        leases = await gatherResults([ask(admission, i) for i in range(start, start + width)])
        for lease in leases:
            lease.release()
    return count / (time.perf_counter() - began)


async def run(count: int) -> None:
    questions: dict[str, Ask] = {"connection": connection, "user_session": user_session}
    local = LocalAdmission(POLICY, reactor)
    parent_end, worker_end = socket.socketpair()
    serve_admission(parent_end, local, reactor)
    same_process = connect_admission(worker_end.detach(), reactor)

    parent_end, worker_end = socket.socketpair()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(parent_end.fileno())],
        pass_fds=[parent_end.fileno()],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    parent_end.close()
    other_process = connect_admission(worker_end.detach(), reactor)
    try:
        for name, ask in questions.items():
            await one_at_a_time(other_process, ask, count // 10)  # Warm up.
            print(f"{name}():")
            print(f"  local             {await one_at_a_time(local, ask, count):8.1f} us")
            same = await one_at_a_time(same_process, ask, count)
            print(f"  one process       {same:8.1f} us/round trip")
            other = await one_at_a_time(other_process, ask, count)
            print(f"  two processes     {other:8.1f} us/round trip ({1e6 / other:,.0f}/s)")
            rate = await in_flight(other_process, ask, count, 100)
            print(f"  100 in flight     {rate:8,.0f} questions/s from one worker")
    finally:
        other_process.protocol.transport.loseConnection()
        # The reactor closes the socket; then the parent reads EOF and stops.
        await other_process.when_lost()
        parent.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()

    def done(_: object) -> None:
        reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(run(args.count)).addErrback(print).addBoth(done)

    reactor.callWhenRunning(start)
    reactor.run()


if __name__ == "__main__":
    main()
