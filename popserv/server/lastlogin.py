"""
Each user's last successful login: when, from which address, by which
mechanism, like Dovecot's last_login plugin.  It is how an operator finds
the forgotten device that empties a mailbox (``popserv user list``).

The server records logins in memory (:class:`LastLogins`) and
:class:`LastLoginWriter` writes them to ``DATA/lastlogin`` at most every
:data:`WRITE_INTERVAL` seconds when something changed, and at shutdown, so
a busy server does not write a file per login.  A crash loses the logins
of those last seconds: the file keeps the ones before.

The file has one line per user, tab-separated::

    alice<TAB>1765008000<TAB>192.0.2.1<TAB>PLAIN

(the time in whole seconds since the epoch, UTC).  It is replaced
atomically (:func:`popserv.core.files.replace_file`), so a reader sees
the old file or the new, never half of one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from popserv.core.files import read_regular, replace_file

log = Logger()

#: The file's name in the data directory.
LAST_LOGIN_FILE = "lastlogin"

#: Seconds between writes of the file while logins happen: what a crash may
#: lose, against one write per login on a server that takes hundreds a
#: second (each write of a 1,000-user file is one 40 KB file and a rename).
WRITE_INTERVAL = 5.0

#: The largest file read back (about 200,000 users); a larger one is ignored.
MAX_FILE_SIZE = 16 * 1024 * 1024

#: Characters that would break the file's lines or columns.
_SEPARATORS = frozenset("\t\r\n")


@frozen
class LastLogin:
    """One user's last successful login."""

    #: Seconds since the epoch.
    time: float
    #: The client's address (no port: it changes with every connection).
    address: str
    #: USER, APOP, or the SASL mechanism.
    mechanism: str

    def shown(self) -> str:
        """``2026-12-06T08:00:00Z 192.0.2.1 PLAIN``: time (UTC), address, mechanism."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return f"{when} {self.address} {self.mechanism}"


def parse(data: bytes) -> dict[str, LastLogin]:
    """The entries of a ``lastlogin`` file; malformed lines are skipped."""
    entries = {}
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split("\t")
        if len(fields) != 4:
            continue
        user, when, address, mechanism = fields
        try:
            entries[user] = LastLogin(float(when), address, mechanism)
        except ValueError:
            continue
    return entries


def render(entries: dict[str, LastLogin]) -> bytes:
    """A ``lastlogin`` file's content, one line per user, sorted by name."""
    lines = (
        f"{user}\t{int(entry.time)}\t{entry.address}\t{entry.mechanism}\n"
        for user, entry in sorted(entries.items())
    )
    return "".join(lines).encode("utf-8")


def read_last_logins(path: Path) -> dict[str, LastLogin]:
    """The file at ``path`` (empty when there is none or it is not a regular file)."""
    try:
        data = read_regular(path, MAX_FILE_SIZE)
    except FileNotFoundError:
        return {}
    return {} if data is None else parse(data)


class LastLogins:
    """
    The last login of each user, in memory, saved to ``path`` (when given)
    by :meth:`save`.  The factory holds one (``POP3Factory.last_logins``);
    an application that does not want them leaves that None.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, LastLogin] = {}
        #: Logins recorded since the last save.
        self.changed = False

    @classmethod
    def load(cls, path: Path) -> LastLogins:
        """The logins ``path`` holds; empty, with a warning, when it cannot be read."""
        last = cls(path)
        try:
            last._entries = read_last_logins(path)
        except OSError as e:
            log.warn("Cannot read {path}: {error}", path=str(path), error=e.strerror or str(e))
        return last

    def record(self, user: str, when: float, address: str, mechanism: str) -> None:
        """``user`` logged in at ``when`` from ``address`` by ``mechanism``."""
        if _SEPARATORS.intersection(user + address + mechanism):
            # Names popserv accepts have no control characters; another
            # portal's might: never written where it would break the file.
            return
        self._entries[user] = LastLogin(when, address, mechanism)
        self.changed = True

    def get(self, user: str) -> LastLogin | None:
        return self._entries.get(user)

    def __iter__(self) -> Iterator[tuple[str, LastLogin]]:
        return iter(sorted(self._entries.items()))

    def save(self) -> None:
        """Write the file if anything changed (``OSError`` if that fails)."""
        if not self.changed or self.path is None:
            return
        data = render(self._entries)
        # Cleared first: a login recorded while the file is written is not
        # lost (the reactor thread does both, but an embedder may not).
        self.changed = False
        try:
            replace_file(self.path, data)
        except BaseException:
            self.changed = True
            raise


class LastLoginWriter(Service):
    """Saves :class:`LastLogins` every :data:`WRITE_INTERVAL` seconds when changed, and at stop."""

    def __init__(
        self, last_logins: LastLogins, clock: IReactorTime, interval: float = WRITE_INTERVAL
    ) -> None:
        self.last_logins = last_logins
        self.interval = interval
        self._loop = LoopingCall(self._save)
        self._loop.clock = clock
        #: The last error logged, so a full disk is not logged every few seconds.
        self._failing: str | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        self._save()
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's, unannotated

    def _save(self) -> None:
        try:
            self.last_logins.save()
        except OSError as e:
            error = e.strerror or str(e)
            if error != self._failing:
                log.warn(
                    "Cannot write the last logins to {path}: {error}",
                    path=os.fspath(self.last_logins.path or ""),
                    error=error,
                )
            self._failing = error
        else:
            self._failing = None


__all__ = [
    "LAST_LOGIN_FILE",
    "WRITE_INTERVAL",
    "LastLogin",
    "LastLoginWriter",
    "LastLogins",
    "read_last_logins",
]
