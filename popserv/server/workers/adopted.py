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
from typing import Any

from twisted.application.service import Service
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
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)
        self.fd = None

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()


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
