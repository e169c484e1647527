"""
What ``--metrics`` costs a POP3 session: ``python -m bench.metrics``.

Whole POP3 sessions (greeting, USER/PASS, STAT, LIST, UIDL, RETR, TOP,
DELE, RSET, NOOP, QUIT, the connection's end) run in-process on a
StringTransport over the in-memory store, with no network and no disk, so
that popserv's own per-command work is all that is timed: the worst case
for any overhead.  Rounds of metrics off (``factory.metrics`` None) and on
alternate; the fastest rounds (least disturbed) and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popserv.server.factory import POP3Factory
from popserv.server.metrics import Metrics
from popserv.server.policy import Policy
from popserv.stores.memory import MemoryMaildrop, MemoryRealm

PEER = IPv4Address("TCP", "127.0.0.1", 4321)
MESSAGES = [b"Subject: %d\r\n\r\n" % i + b"body line\r\n" * 20 for i in range(5)]
SESSION = (
    b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\n"
    b"DELE 1\r\nRSET\r\nNOOP\r\nQUIT\r\n"
)


def factory(metrics: bool) -> POP3Factory:
    clock = Clock()
    realm = MemoryRealm({"alice": MemoryMaildrop(MESSAGES)})
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    made = POP3Factory(
        Portal(realm, [checker]), Policy(hostname="pop.example.org"), clock=clock
    )
    if metrics:
        Metrics(clock).watch_pop3(made)
    return made


def run(server: POP3Factory, sessions: int) -> float:
    """CPU seconds per session, over ``sessions`` whole sessions."""
    # CPU time, not wall time: other processes on a shared machine then
    # disturb it far less (they still share the caches).
    started = time.thread_time()
    for _ in range(sessions):
        transport = StringTransport(peerAddress=PEER)
        protocol = server.buildProtocol(PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(SESSION)
        protocol.connectionLost(None)
    return (time.thread_time() - started) / sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=500, help="sessions a round")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    servers = {False: factory(False), True: factory(True)}
    # Check the session ran whole, then warm up.
    probe = StringTransport(peerAddress=PEER)
    protocol = servers[True].buildProtocol(PEER)
    protocol.makeConnection(probe)
    protocol.dataReceived(SESSION)
    assert probe.value().count(b"+OK") == 12, probe.value()
    protocol.connectionLost(None)
    for server in servers.values():
        run(server, args.sessions // 4)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            times[on].append(run(servers[on], args.sessions))
    # The fastest round is the least disturbed by other work on the machine;
    # the median shows how noisy it was.
    for name, pick in (("fastest round", min), ("median", statistics.median)):
        off, on = (pick(times[key]) for key in (False, True))
        print(
            f"{name:>13}: off {off * 1e6:.1f} us a session, on {on * 1e6:.1f} us,"
            f" overhead {(on / off - 1) * 100:+.2f} %"
        )


if __name__ == "__main__":
    main()
