"""
TLS certificates renewed without a restart: reloaded on SIGHUP, and when
their files change.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from popserv.server.tls import TLSServer

log = Logger()


class CertificateReloader(Service):
    """
    Reloads the TLS certificates on SIGHUP, and whenever their files change
    (checked every ``interval`` seconds), so renewals need no restart.
    ``also`` are other servers (the receiver's) built from the same files.
    """

    def __init__(
        self, tls: TLSServer, interval: float, reactor: Any, also: Sequence[TLSServer] = ()
    ) -> None:
        self.tls = tls
        self.also = tuple(also)
        self._reactor = reactor
        self._interval = interval
        self._loop = LoopingCall(self._reload_if_changed)
        self._loop.clock = reactor
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service
        log.info("TLS certificates for {names}", names=", ".join(self.tls.names) or "-")
        # twistd --uid drops privileges after the files were first read: say
        # so now if renewals could never be read again.
        unreadable = [str(p) for p in self.tls.paths() if not os.access(p, os.R_OK)]
        if unreadable:
            log.warn(
                "This user cannot read {files}: renewed certificates will not be picked up"
                " until a restart; make them readable (for example by a group)",
                files=", ".join(unreadable),
            )
        self._loop.start(self._interval, now=False)
        if hasattr(signal, "SIGHUP"):
            self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service
        if self._loop.running:
            self._loop.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _reload_if_changed(self) -> None:
        if self.tls.reload_if_changed():
            for other in self.also:
                other.reload()

    def _reload(self) -> None:
        for server in (self.tls, *self.also):
            server.reload()

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._reload)
