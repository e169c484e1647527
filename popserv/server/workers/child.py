"""
A worker of ``twistd popserv --workers N``: ``python -m popserv.server.workers.child``,
started by :class:`~popserv.server.workers.supervisor.WorkerSupervisor`.

It parses the same ``twistd popserv`` arguments as its parent, builds what
one process would serve (:func:`popserv.server.service.worker_service`) on
the listening sockets the parent bound, and asks the parent's admission
(:func:`~popserv.server.workers.connect_admission`).  Its log events go to
the parent as JSON records on standard output; the parent logs them with
this worker's pid.  It stops on SIGTERM (as twistd would), and by itself
when the parent goes away: it stops listening, lets its sessions finish
for at most :data:`ORPHAN_GRACE` seconds, and exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

from popserv.server.lastlogin import LastLogins, read_last_logins

log = Logger()

#: Seconds a worker whose parent is gone lets its sessions finish: logged-in
#: sessions can still RETR and QUIT (a QUIT that commits DELE matters), but a
#: worker nobody supervises must not linger (admission refuses everything new).
ORPHAN_GRACE = 30.0


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


def _leave_when_orphaned(service: Service, pop3: Any, reactor: Any) -> None:
    """The parent is gone: stop listening, let sessions end (bounded), then exit."""
    log.warn("The parent is gone: no new connections; stopping within {grace:g} s",
             grace=ORPHAN_GRACE)
    for child in service:  # type: ignore[attr-defined]  # MultiService iterates
        if isinstance(child, AdoptedListener):
            child.stopService()
    deadline = reactor.seconds() + ORPHAN_GRACE

    def check() -> None:
        if not getattr(pop3, "sessions", None) or reactor.seconds() >= deadline:
            if reactor.running:
                reactor.stop()
        else:
            reactor.callLater(0.5, check)

    check()


def main() -> None:
    """Run one worker, configured by the parent (see the supervisor's CONFIG_VARIABLE)."""
    from twisted.internet import reactor

    from popserv.server.service import worker_service
    from popserv.server.startup import StartupError
    from popserv.server.tap import Options
    from popserv.server.workers.admission import connect_admission
    from popserv.server.workers.supervisor import CONFIG_VARIABLE

    config = json.loads(os.environ.pop(CONFIG_VARIABLE))
    # Ctrl-C in a terminal reaches the whole process group: the parent
    # stops its workers itself (SIGTERM), so one ^C is one orderly stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One JSON record a line (JSON escapes newlines): flushed as each ends,
    # so the parent logs it now, not when a pipe's buffer fills.
    out: Any = sys.stdout
    out.reconfigure(line_buffering=True)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(out)], redirectStandardIO=False)
    options = Options()
    try:
        options.parseOptions(config["arguments"])
        admission = connect_admission(config["admission"], reactor)  # type: ignore[arg-type]  # the installed reactor
        service = worker_service(options, config["listeners"], admission, reactor)
    except StartupError as e:
        sys.stderr.write(f"popserv: {e.message}\n")
        sys.exit(e.status)
    pop3 = next(
        (c.factory for c in service if isinstance(c, AdoptedListener)), None
    )
    pop3 = getattr(pop3, "wrappedFactory", pop3)
    stopping: list[bool] = []

    def orphaned(_: object) -> None:
        # Stopping (SIGTERM) closes the connection too: that is no orphan.
        if not stopping:
            _leave_when_orphaned(service, pop3, reactor)

    def stop() -> Any:
        stopping.append(True)
        return service.stopService()  # type: ignore[no-untyped-call]  # Twisted's Service

    admission.when_lost().addCallback(orphaned)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    # A second SIGTERM (to the whole process group, and from the parent) must
    # not kill a worker that has stopped already and is exiting.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()


