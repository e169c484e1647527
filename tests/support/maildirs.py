"""Shared test fixtures: maildirs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.cred.portal import IRealm
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from popserv.core.body import BodyEncoder
from popserv.interfaces import IMailbox, MessageStream
from popserv.server.maybe import resolve
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir import (
    MaildirMailbox,
    MaildropLock,
)
from popserv.stores.maildir import scan as maildir_scan
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.scan import Scan
from popserv.stores.maildir.uidls import UidlScheme


class _SyncThreads:
    """A reactor whose "thread pool" runs work at once, so Maildir calls finish synchronously."""

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


SYNC = _SyncThreads()


def retr_size(stored: bytes) -> int:
    """
    The octets RETR sends for ``stored``, less the terminator and stuffing,
    taken from the encoder that really produces RETR responses.
    """
    encoder = BodyEncoder()
    out = encoder.feed(stored) + encoder.finish()
    assert out.endswith(b".\r\n")
    body = out[:-3]
    return len(re.sub(rb"(^|\n)\.", rb"\1", body))


def acquire(maildir: Path) -> MaildropLock:
    """Lock the Maildir at ``maildir`` as a session does."""
    with MaildirPath.of(maildir).opened() as (top,):
        return MaildropLock.acquire(top)


def scan(maildir: Path, scheme: UidlScheme, use_index: bool) -> Scan:
    """Scan the Maildir at ``maildir`` as a login does."""
    with MaildirPath.of(maildir).opened("new", "cur") as (top, *places):
        return maildir_scan.scan(top, places, scheme, use_index)


class MaildirTestCase(TestCase):
    """Helpers for tests on a fresh Maildir."""

    def maildir(self) -> Path:
        return ensure_maildir(Path(self.mktemp()))

    def put(self, maildir: Path, sub: str, name: str, data: bytes = b"x\n") -> Path:
        path = maildir / sub / name
        path.write_bytes(data)
        return path

    async def open(self, maildir: Path, **kwargs: object) -> MaildirMailbox:
        mailbox = await MaildirMailbox.open(maildir, **kwargs)
        self.addCleanup(mailbox.close)
        return mailbox

    async def read(self, mailbox: MaildirMailbox, index: int) -> bytes:
        stream = await resolve(mailbox.open_message(index))
        try:
            return stream.read()
        finally:
            stream.close()

    def files(self, maildir: Path, sub: str) -> list[str]:
        return sorted(os.listdir(maildir / sub))


@implementer(IRealm)
class _MaildirRealm:
    """alice's Maildir, opened and locked (``shared`` or not) without threads."""

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path = path
        self.shared = shared

    def requestAvatar(self, avatarId, mind, *interfaces):
        opened = MaildirMailbox.open(self.path, reactor=SYNC, shared=self.shared)
        return opened.addCallback(lambda mailbox: (IMailbox, mailbox, mailbox.close))


def maildir_contents(path: Path, shared: bool = False) -> list[bytes]:
    """The messages of a Maildir, as the store lists and reads them (``shared``: a shared lock)."""
    result = MaildirMailbox.open(path, reactor=SYNC, shared=shared)
    mailboxes: list[MaildirMailbox] = []
    result.addCallback(mailboxes.append)
    (mailbox,) = mailboxes
    try:
        contents = []
        for index in range(len(mailbox.listing())):
            opened: list[MessageStream] = []
            maybeDeferred(mailbox.open_message, index).addCallback(opened.append)
            with opened[0] as stream:
                contents.append(stream.read())
        return contents
    finally:
        mailbox.close()
