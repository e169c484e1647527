"""
What a worker serves with that one process does not need: listening on a
socket the parent bound (:class:`AdoptedListener`), and last logins saved
without overwriting another worker's (:class:`SharedLastLogins`).

Apart from :mod:`popserv.server.workers.child`, which runs as ``__main__``:
its own classes would be other classes than the ones
:func:`popserv.server.service.worker_service` imports.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort

from popserv.server.lastlogin import LastLogins, read_last_logins


class AdoptedListener(Service):
    """Serves ``factory`` on the listening socket ``fd`` the parent bound."""

    def __init__(self, fd: int, family: int, factory: Any, description: str, reactor: Any) -> None:
        self.fd: int | None = fd
        self.family = family
        self.factory = factory
        self.description = description
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service
        if self.fd is None:
            return
        # The reactor serves a duplicate; ours is closed.  Stopping closes only
        # this worker's copy: the parent's keeps the port open for the others.
        if self.family == socket.AF_UNIX:
            self.port = _SharedUNIXPort.adopt(self.reactor, self.fd, self.factory)
        else:
            self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)
        self.fd = None

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()


class _SharedUNIXPort(unix.Port):
    """
    A UNIX socket the parent bound, served here.  Twisted's adopted UNIX port
    would make its path mode 0666 when it starts and remove the path when it
    stops: the mode is the parent's to set, and the path must stay for the
    other workers (the parent removes it).
    """

    @classmethod
    def adopt(cls, reactor: Any, fd: int, factory: Any) -> _SharedUNIXPort:
        port: _SharedUNIXPort = cls._fromListeningDescriptor(reactor, fd, factory)  # type: ignore[no-untyped-call]  # Twisted's
        path = port._bindPath
        if path and path[:1] not in (b"\0", "\0"):
            port.mode = stat.S_IMODE(os.stat(path).st_mode)
        port.startListening()  # type: ignore[no-untyped-call]  # Twisted's
        return port

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)  # type: ignore[no-untyped-call]  # Twisted's


class SharedLastLogins(LastLogins):
    """
    :class:`LastLogins` shared by the workers: each saves what the file
    holds merged with its own, the newer login of each user kept, so one
    worker does not overwrite what another wrote.  Two saving at the same
    instant can still lose one's last few seconds (no lock): the file is a
    record for operators, not an account.
    """

    def save(self) -> None:
        if self.changed and self.path is not None:
            try:
                on_disk = read_last_logins(self.path)
            except OSError:
                on_disk = {}
            for user, entry in on_disk.items():
                ours = self._entries.get(user)
                if ours is None or entry.time > ours.time:
                    self._entries[user] = entry
        super().save()


__all__ = ["AdoptedListener", "SharedLastLogins"]
