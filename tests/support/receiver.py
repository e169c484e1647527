"""Shared test fixtures: receiver."""

from __future__ import annotations

import os
import poplib
import smtplib
import socket
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server.service import make_factory, make_receiver
from popserv.stores.layout import Layout
from tests.support.sockets import MarkedReader

START_DATA = b"354 End data with <CR><LF>.<CR><LF>"


class SMTPClient(MarkedReader):
    """A raw SMTP/LMTP client that returns the server's reply lines as they are."""

    def __init__(self, address: int | str) -> None:
        if isinstance(address, int):
            self.sock = socket.create_connection(("127.0.0.1", address), timeout=10)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(address)
        self.buffer = b""
        self.greeting = self.reply()

    def line(self) -> bytes:
        return self.until(b"\r\n")

    def reply(self) -> list[bytes]:
        """One whole reply, all its lines."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def codes(self, count: int) -> list[bytes]:
        """The first line (code and text) of the next ``count`` replies."""
        return [self.reply()[0] for _ in range(count)]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)



class ReceiverTestCase(TestCase):
    """
    POP3, SMTP and LMTP listeners over one data directory, for alice and
    bob (PLAIN passwords) and carol (at most 1 message, 1 KiB).
    """

    options: dict = {}

    def hold_deliveries(self) -> tuple[threading.Event, threading.Event]:
        """
        Deliveries wait, once they have started, until the second event is
        set; the first is set when one has started.
        """
        from popserv.stores import delivery

        entered, release = threading.Event(), threading.Event()
        real = delivery.deliver_message

        def held(*args, **kwargs):
            entered.set()
            release.wait(10)
            return real(*args, **kwargs)

        self.patch(delivery, "deliver_message", held)
        return entered, release

    def setUp(self):
        self.layout = Layout.create(self.mktemp())
        self.layout.data_dir.mkdir(parents=True)
        passwd = PasswdFile(self.layout.passwd_path)
        passwd.add("alice", hash_password("alice pw", "PLAIN"))
        passwd.add("bob", hash_password("bob pw", "PLAIN"))
        passwd.add(
            "carol",
            hash_password("carol pw", "PLAIN"),
            {"quota_messages": "1", "quota_bytes": "1k"},
        )
        self.all_options = {
            "data": str(self.layout.data_dir),
            "passwd": str(self.layout.passwd_path),
            "hostname": "mx.example.org",
            "domain": ["example.org"],
            "max-message-size": 100_000,
            **self.options,
        }
        self.pop3 = make_factory(self.all_options, reactor)
        self.smtp = make_receiver(self.all_options, self.pop3, lmtp=False, reactor=reactor)
        self.lmtp = make_receiver(self.all_options, self.pop3, lmtp=True, reactor=reactor)
        self.ports = {}
        for name, factory in (("pop3", self.pop3), ("smtp", self.smtp), ("lmtp", self.lmtp)):
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.ports[name] = port.getHost().port

    def maildir(self, user: str) -> Path:
        return self.layout.maildir_for(user)

    def stored(self, user: str) -> list[bytes]:
        """The messages in a Maildir, oldest first (names start with the time)."""
        maildir = self.maildir(user)
        paths = [
            maildir / sub / name
            for sub in ("new", "cur")
            if (maildir / sub).exists()
            for name in os.listdir(maildir / sub)
        ]
        return [p.read_bytes() for p in sorted(paths, key=lambda p: p.name)]

    def tmp_files(self, user: str) -> list[str]:
        tmp = self.maildir(user) / "tmp"
        return os.listdir(tmp) if tmp.exists() else []

    def fetch(self, user: str, password: str) -> list[tuple[int, bytes]]:
        """Every message over POP3: (LIST size, RETR body with CRLF line ends)."""
        client = poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=10)
        try:
            client.user(user)
            client.pass_(password)
            sizes = [int(item.split()[1]) for item in client.list()[1]]
            messages = []
            for number, size in enumerate(sizes, 1):
                lines = client.retr(number)[1]
                messages.append((size, b"".join(line + b"\r\n" for line in lines)))
            return messages
        finally:
            client.quit()

    def in_thread(self, f, *args, **kwargs) -> Deferred:
        return deferToThread(f, *args, **kwargs)

    def smtplib_send(self, sender, recipients, message, *, lmtp=False, **kwargs):
        if lmtp:
            client = smtplib.LMTP("127.0.0.1", self.ports["lmtp"], timeout=10)
        else:
            client = smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10)
        try:
            return client.sendmail(sender, recipients, message, **kwargs)
        finally:
            client.quit()
