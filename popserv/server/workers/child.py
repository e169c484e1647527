"""
A worker of ``twistd popserv --workers N``: ``python -m popserv.server.workers.child``,
started by :class:`~popserv.server.workers.supervisor.WorkerSupervisor`.

It parses the same ``twistd popserv`` arguments as its parent, builds what
one process would serve (:func:`popserv.server.service.worker_service`) on
the listening sockets the parent bound, and asks the parent's admission
(:func:`~popserv.server.workers.connect_admission`).  Its log events go to
the parent as JSON records on standard output; the parent logs them with
this worker's pid.  It stops on SIGTERM as one process would (its
sessions drain for ``--shutdown-grace`` seconds, see
:mod:`popserv.server.drain`), and by itself, the same way, when the parent
goes away, given :data:`ORPHAN_GRACE` seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    globalLogBeginner,
)
from zope.interface import implementer

from popserv.server.drain import DrainingService, log_repeated_stops
from popserv.server.logformat import JSON
from popserv.server.workers.logrelay import record

log = Logger()

#: Seconds a worker whose parent is gone lets its sessions finish: logged-in
#: sessions can still RETR and QUIT (a QUIT that commits DELE matters), but a
#: worker nobody supervises must not linger (admission refuses everything new).
ORPHAN_GRACE = 30.0


def _leave_when_orphaned(service: DrainingService, reactor: Any) -> None:
    """The parent is gone: stop as on SIGTERM (the service drains), with ORPHAN_GRACE."""
    log.warn("The parent is gone: no new connections; stopping within {grace:g} s",
             grace=ORPHAN_GRACE)
    service.grace = ORPHAN_GRACE
    reactor.stop()


@implementer(ILogObserver)
class _ToParent:
    """
    Log events to the parent, one :mod:`~popserv.server.workers.logrelay`
    record a line; once it is gone (the pipe broken) they are dropped: an
    orphan finishing its sessions has nowhere to log, and a failing observer
    would only log its own failure again.
    """

    def __init__(self, out: IO[str], fields: bool) -> None:
        self._out: IO[str] | None = out
        self._fields = fields

    def __call__(self, event: LogEvent) -> None:
        if self._out is not None:
            try:
                self._out.write(record(event, self._fields) + "\n")
            except OSError:
                self._out = None


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
    # One record a line (JSON escapes newlines): flushed as each ends,
    # so the parent logs it now, not when a pipe's buffer fills.
    out: Any = sys.stdout
    out.reconfigure(line_buffering=True)
    options = Options()
    try:
        options.parseOptions(config["arguments"])
        # Events logged meanwhile wait in the log beginner's buffer.
        globalLogBeginner.beginLoggingTo(
            [_ToParent(out, fields=options["log-format"] == JSON)], redirectStandardIO=False
        )
        admission = connect_admission(config["admission"], reactor)  # type: ignore[arg-type]  # the installed reactor
        service = worker_service(options, config["listeners"], admission, reactor)
    except StartupError as e:
        sys.stderr.write(f"popserv: {e.message}\n")
        sys.exit(e.status)
    stopping: list[bool] = []

    def orphaned(_: object) -> None:
        # Stopping (SIGTERM) closes the connection too: that is no orphan.
        if not stopping:
            _leave_when_orphaned(service, reactor)

    def stop() -> Any:
        stopping.append(True)
        stopped = service.stopService()
        if service.drain is not None:
            log_repeated_stops(service.drain)
        return stopped

    admission.when_lost().addCallback(orphaned)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    # A second SIGTERM (to the whole process group, and from the parent) must
    # not kill a worker that has stopped already and is exiting.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()


