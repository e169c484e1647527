"""
Traffic for the crash tests: SMTP senders and POP3 sessions that DELE about
half of what they see, run in threads against a server that is killed under
them, and a ledger of what the server acknowledged to each.

The crash tests of the Maildir store (tests/clients/test_crash.py) and of
the PostgreSQL store (tests/clients/test_postgres_faults.py) both run it;
each checks the ledger against its own store.
"""

from __future__ import annotations

import contextlib
import poplib
import random
import re
import smtplib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>$", re.MULTILINE | re.IGNORECASE)


class Ledger:
    """What the clients were told, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Every message sent or being sent: Message-ID -> body (CRLF form).
        self.bodies: dict[str, bytes] = {}
        #: Message-IDs the server answered 250 to.
        self.accepted: set[str] = set()
        #: Message-IDs whose DELE a QUIT answered +OK committed.
        self.deleted: set[str] = set()
        #: Message-IDs whose DELE was followed by a QUIT with no answer.
        self.maybe_deleted: set[str] = set()


def crash_body(rng: random.Random, sizes: Sequence[int]) -> bytes:
    """A body of about one of ``sizes`` octets, in 72-octet lines, some starting with a dot."""
    size = rng.choice(sizes)
    line = b"".join(rng.choice([b"a", b"b", b".", b" ", b"x"]) for _ in range(70))
    return b"".join(b"%d %s\r\n" % (i, line) for i in range(max(size // 72, 1)))


def crash_message(message_id: str, body: bytes) -> bytes:
    return (
        b"From: sender@example.net\r\nTo: alice@example.org\r\nMessage-ID: <%s>\r\n"
        b"Subject: crash\r\n\r\n%s" % (message_id.encode(), body)
    )


@frozen
class Traffic:
    """
    Clients of ``server`` (anything with ``pop3`` and ``smtp`` ports, read
    anew at each connection, as a restarted server has new ones): SMTP to
    alice@example.org, POP3 as ``user``.
    """

    server: Any
    user: str
    password: str
    #: Body sizes to choose from (see :func:`crash_body`).
    sizes: Sequence[int]
    #: Seconds (at most, at random) between one POP3 session and the next.
    between_sessions: float = 0.0

    def sender(self, ledger: Ledger, name: str, rng: random.Random, stop: threading.Event) -> None:
        """Send messages one after the other until the server dies (or ``stop``)."""
        count = 0
        with contextlib.suppress(OSError, smtplib.SMTPException):
            with smtplib.SMTP("127.0.0.1", self.server.smtp, timeout=10) as client:
                while not stop.is_set():
                    count += 1
                    message_id = f"{name}.{count}@crash.test"
                    body = crash_body(rng, self.sizes)
                    with ledger.lock:
                        ledger.bodies[message_id] = body
                    client.sendmail(
                        "sender@example.net", ["alice@example.org"], crash_message(message_id, body)
                    )
                    with ledger.lock:
                        ledger.accepted.add(message_id)

    def deleter(self, ledger: Ledger, rng: random.Random, stop: threading.Event) -> None:
        """Sessions that DELE about half the messages and QUIT, until the server dies."""
        while not stop.is_set():
            chosen: set[str] = set()
            quitting = False
            try:
                client = poplib.POP3("127.0.0.1", self.server.pop3, timeout=10)
                try:
                    client.user(self.user)
                    client.pass_(self.password)
                    for entry in client.list()[1]:
                        number = int(entry.split()[0])
                        if rng.random() < 0.5:
                            continue
                        found = MESSAGE_ID.search(b"\n".join(client.top(number, 0)[1]))
                        if found is not None:
                            client.dele(number)
                            chosen.add(found.group(1).decode())
                    quitting = True
                    client.quit()
                finally:
                    client.close()
            except poplib.error_proto as e:
                if str(e.args[0]).startswith("b'-ERR [IN-USE]"):  # a dead session's lease
                    time.sleep(0.2)
                    continue
                if quitting:
                    with ledger.lock:
                        ledger.maybe_deleted |= chosen
                return
            except (OSError, EOFError):
                if quitting:
                    with ledger.lock:
                        ledger.maybe_deleted |= chosen
                return
            with ledger.lock:
                ledger.deleted |= chosen
            if self.between_sessions:
                time.sleep(rng.uniform(0, self.between_sessions))

    def round(
        self,
        ledger: Ledger,
        rng: random.Random,
        name: str,
        running: tuple[float, float],
        kill: Callable[[], None],
    ) -> None:
        """
        Two senders and a deleter for a random time within ``running``
        seconds, then ``kill()`` the server under them; AssertionError if a
        client thread then hangs.
        """
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=self.sender, args=(ledger, f"{name}s{i}", random.Random(rng.random()), stop)
            )
            for i in range(2)
        ]
        threads.append(
            threading.Thread(target=self.deleter, args=(ledger, random.Random(rng.random()), stop))
        )
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(*running))
        kill()
        stop.set()
        for thread in threads:
            thread.join(30)
            if thread.is_alive():
                raise AssertionError("a client thread hung")
