"""
Listening: one service per endpoint, and the service above them that turns
a failure to listen into one line and an exit status, never a server left
running with nothing listening, and that stops them first when the server
stops (:class:`~popserv.server.drain.DrainingService`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.server.drain import SHUTDOWN_GRACE, DrainingService, log_repeated_stops
from popserv.server.startup import (
    EXIT_CANNOT_LISTEN,
    StartupError,
    exit_at_startup,
    remove_pidfile,
    strerror,
    under_twistd,
)

log = Logger()


def cannot_listen(description: str, failure: Failure) -> str:
    """``cannot listen on 127.0.0.1:1110: address already in use``, from a listen failure."""
    error = failure.value
    if isinstance(error, CannotListenError):
        interface, port = error.interface, error.port
        if port is None or isinstance(port, str):  # a UNIX socket's path
            where = str(port or description)
        else:
            # Only words for the message: the port listened on every address.
            host = interface or "0.0.0.0"  # noqa: S104
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = error.socketError
    else:
        where, reason = description, error
    text = strerror(reason) if isinstance(reason, OSError) else str(reason) or type(reason).__name__
    return f"cannot listen on {where}: {text}"


class Listener(StreamServerEndpointService):
    """
    Listens on one endpoint; a failure to listen is a :class:`StartupError`
    (status :data:`EXIT_CANNOT_LISTEN`), never a traceback logged by a
    server that then runs with nothing listening.
    """

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]  # Twisted's Service
        self.description = description
        #: Told of a failure that comes after start-up (an endpoint whose
        #: listen() answers later); set by :class:`PopservService`.
        self.failed: Any = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)  # type: ignore[no-untyped-call]  # Twisted's Service
        waiting: Deferred[Any] = self.endpoint.listen(self.factory)
        self._waitingForPort = waiting
        early: list[Failure] = []
        starting = True

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            if starting:
                early.append(failure)
            elif self.failed is not None:
                self.failed(cannot_listen(self.description, failure))
            else:
                log.critical("{line}", line=cannot_listen(self.description, failure))

        waiting.addErrback(failed)
        starting = False
        if early:
            # TCP, UNIX and systemd endpoints all fail here, synchronously.
            raise StartupError(cannot_listen(self.description, early[0]), EXIT_CANNOT_LISTEN)

    def close(self) -> Deferred[None] | None:
        """Stop listening, if listening (after another listener failed)."""
        if self._waitingForPort is None:
            return None
        closed: Deferred[None] = Deferred()
        self._waitingForPort.addCallback(lambda port: port and port.stopListening()).addBoth(
            lambda _: closed.callback(None)
        )
        return closed


class PopservService(DrainingService):
    """
    What :func:`makeService` returns.  Under twistd (``exit_on_error``), a
    listener that cannot listen ends the process with one line and a
    non-zero status, instead of leaving it running with nothing listening
    (which systemd or a supervisor would take for a working server).
    Stopping, its sessions drain for ``grace`` seconds.
    """

    def __init__(
        self, options: object = None, reactor: Any = None, *, grace: float = SHUTDOWN_GRACE
    ) -> None:
        super().__init__(grace, reactor)
        self._options = options
        self._reactor = reactor
        #: After a listener failed: fires when those that did start have stopped.
        self.closed: Deferred[Any] | None = None

    @property
    def exit_on_error(self) -> bool:
        return under_twistd(self._options)

    def privilegedStartService(self) -> None:
        for listener in self.listeners():
            listener.failed = self._failed_later
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's Service
        except StartupError as e:
            closing = [listener.close() or succeed(None) for listener in self.listeners()]
            self.closed = DeferredList(closing)
            if not self.exit_on_error:
                raise
            exit_at_startup(self._options, e.message, e.status)

    def stopService(self) -> Deferred[Any]:
        stopped = super().stopService()
        if self.exit_on_error and self.drain is not None:
            log_repeated_stops(self.drain)
        return stopped

    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def _failed_later(self, message: str) -> None:
        """A listen() that failed after start-up: the same line, then stop."""
        line = f"popserv: {message}"
        log.critical("{line}", line=line)
        if not self.exit_on_error:
            return
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(line + "\n")
            stderr.flush()
        # twistd has no exit status to set, and a SystemExit raised in a
        # shutdown trigger is logged and ignored: once the services have
        # stopped, do what twistd would still do (remove its PID file) and
        # leave with the status.
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_now)
        self._reactor.stop()

    def _exit_now(self) -> None:
        remove_pidfile(self._options)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        self._exit(EXIT_CANNOT_LISTEN)

    #: How the process ends after a late listen failure (tests replace it).
    _exit = staticmethod(os._exit)
