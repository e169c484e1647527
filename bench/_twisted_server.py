"""
A POP3 server built from ``twisted.mail.pop3``, the baseline popserv replaces.

``twisted.mail.maildir.MaildirMailbox`` cannot serve these Maildirs
correctly on Python 3: it opens messages in text mode (the protocol needs
bytes), its LIST sizes are file sizes while RETR turns LF into CRLF (so
every size is short by the line count and clients desync), and its
``getUidl`` hashes a ``str`` path.  So the mailbox here is a small
``twisted.mail.pop3.Mailbox`` of its own: sizes from ``,W=`` in the name
(read and counted otherwise), messages opened in binary, UIDLs the unique
names, deletions applied at QUIT.  ``POP3.transformChunk`` stuffs dots only
after a CRLF inside one chunk, missing a ``.`` line that starts a chunk; the
protocol subclass fixes that too.  Everything else is stock twisted.mail.

Run as ``python -m bench._twisted_server --port P --passwd FILE --root DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol
from twisted.mail import pop3
from twisted.python import log
from zope.interface import implementer

from bench._wire import wire_size


def _size_from_name(name: str) -> int | None:
    unique = name.split(":", 1)[0]
    for part in unique.split(",")[1:]:
        if part.startswith("W="):
            return int(part[2:])
    return None


class BenchMailbox(pop3.Mailbox):
    """One user's Maildir, listed once at login."""

    def __init__(self, path: Path) -> None:
        self.path = path
        entries = []
        for sub in ("new", "cur"):
            for entry in os.scandir(path / sub):
                if entry.name.startswith("."):
                    continue
                size = _size_from_name(entry.name)
                if size is None:
                    with open(entry.path, "rb") as f:
                        size = wire_size(f.read())
                entries.append((entry.name, entry.path, size))
        entries.sort()
        self.names = [e[0].split(":", 1)[0].encode("ascii") for e in entries]
        self.paths = [e[1] for e in entries]
        self.sizes = [e[2] for e in entries]
        self.deleted: set[int] = set()

    def listMessages(self, i: int | None = None) -> Any:
        if i is None:
            return [0 if n in self.deleted else s for n, s in enumerate(self.sizes)]
        if i in self.deleted:
            return 0
        return self.sizes[i]

    def getMessage(self, i: int) -> Any:
        return open(self.paths[i], "rb")

    def getUidl(self, i: int) -> bytes:
        return self.names[i]

    def deleteMessage(self, i: int) -> None:
        self.deleted.add(i)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> None:
        for i in self.deleted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths[i])
        self.deleted.clear()


@implementer(IRealm)
class BenchRealm:
    def __init__(self, root: Path) -> None:
        self.root = root

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError()
        user = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        mailbox = BenchMailbox(self.root / user / "Maildir")
        return pop3.IMailbox, mailbox, lambda: None


class BenchPOP3(pop3.POP3):
    """
    Stock twisted.mail POP3, with dot-stuffing that survives chunk boundaries,
    and TCP_NODELAY: without it each RETR's final ``.`` line, written after
    the body has gone out, waits for the client's delayed ACK (40 ms on
    Linux), which caps a 10-RETR session at about 2 per second per client.
    """

    _at_line_start = True

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def transformChunk(self, chunk: bytes) -> bytes:
        out = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and chunk.startswith(b"."):
            out = b"." + out
        self._at_line_start = chunk.endswith(b"\n")
        return out


class BenchFactory(protocol.ServerFactory):
    protocol = BenchPOP3

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr: Any) -> BenchPOP3:
        p = BenchPOP3()
        p.portal = self.portal
        p.factory = self
        return p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--passwd", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    users = {}
    for line in Path(args.passwd).read_text().splitlines():
        name, secret = line.split(":")[:2]
        users[name] = secret.removeprefix("{PLAIN}").encode()
    checker = InMemoryUsernamePasswordDatabaseDontUse(**users)
    portal = Portal(BenchRealm(Path(args.root)), [checker])
    log.startLogging(open(args.log, "a") if args.log else sys.stdout, setStdout=False)  # noqa: SIM115
    from twisted.internet import reactor

    reactor.listenTCP(args.port, BenchFactory(portal), backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
