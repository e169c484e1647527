"""
The parent of ``twistd popserv --workers N``: binds the listeners once,
starts N worker processes (:mod:`popserv.server.workers.child`) that serve
them, answers their admission, and keeps them running.

Why the parent binds and the workers adopt (and not ``SO_REUSEPORT``, each
worker binding its own): a measurement on Linux showed the kernel spreads
the accepts of one shared listening socket well enough across N
processes, and one socket keeps what one process had: a port below 1024
bound as root before ``--uid`` drops privileges, systemd's sockets passed
as they are, and a restarted worker that finds the port already there
(no window where connections are refused, no port stolen by another
program).

Order under twistd: ``privilegedStartService`` (as root, if started so)
binds; twistd then drops privileges; ``startService`` spawns the workers,
which inherit the dropped ids.  The parent serves no session itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from popserv.server.admission import IAdmission
from popserv.server.drain import SHUTDOWN_GRACE
from popserv.server.proxied import inner_description
from popserv.server.startup import EXIT_CANNOT_LISTEN, StartupError, remove_pidfile, strerror
from popserv.server.workers.admission import AdmissionServer, serve_admission
from popserv.server.workers.logrelay import event_of

log = Logger()

#: The environment variable a worker finds its configuration in (JSON:
#: :meth:`Bound.describe` of each listener, the admission socket's fd, the
#: ``twistd popserv`` arguments to parse again).
CONFIG_VARIABLE = "POPSERV_WORKER"

#: Where a worker finds its end of the admission socket; the listeners follow.
ADMISSION_FD = 3

#: A dead worker is restarted after this many seconds, doubled after each
#: death of the same worker up to :data:`MAX_RESTART_DELAY` (systemd's
#: RestartSec= is 100 ms; a crashing worker would spin at that rate, and a
#: second is not noticed by clients: the other workers serve meanwhile).
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
#: A worker up this long starts its back-off again from RESTART_DELAY.
STABLE_AFTER = 60.0

#: More deaths than this within :data:`DEATH_WINDOW` seconds, in all: the
#: workers cannot run (a configuration only they see fails, the disk is
#: gone), so the parent stops with :data:`EXIT_WORKERS_FAILED` for the
#: supervisor above it to see, as systemd's StartLimitBurst=5 in 10 s.
MAX_DEATHS = 5
DEATH_WINDOW = 60.0
#: sysexits.h EX_SOFTWARE: the server failed, not its configuration.
EXIT_WORKERS_FAILED = 70

#: Seconds a worker has to exit after its sessions' grace (``--shutdown-grace``)
#: before SIGKILL: to close the sessions cut at its end (1 s), let a QUIT
#: commit or a delivery under way finish, and save the last logins.  A
#: worker is never killed within its grace.  With the default grace, 15 s
#: in all: systemd's TimeoutStopSec= is 90 s, for the whole service.
KILL_MARGIN = 5.0


@frozen
class Bound:
    """One listener's socket, bound by the parent, for every worker to adopt."""

    option: str
    description: str
    family: int
    #: The listening descriptor in the parent.
    fd: int
    #: ``haproxy:``: the worker reads a PROXY header first.
    proxied: bool
    #: The socket object, when the parent made it (None: systemd's).
    sock: socket.socket | None = None
    #: A UNIX socket's path, removed when the parent closes it, and its lock.
    path: str | None = None
    lock: Any = None

    def describe(self, fd: int) -> dict[str, Any]:
        """What a worker needs to adopt it, as the descriptor ``fd`` in the worker."""
        return {
            "option": self.option,
            "description": self.description,
            "family": self.family,
            "fd": fd,
            "proxied": self.proxied,
        }

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        if self.lock is not None:
            self.lock.unlock()


def bind(option: str, description: str, endpoint: Any) -> Bound:
    """
    Bind and listen on what ``endpoint`` (made by
    :func:`popserv.server.configure.endpoint` from ``description``)
    describes, as Twisted's endpoint would; :class:`StartupError` naming
    the address when it cannot.
    """
    proxied = inner_description(description) is not None
    inner = getattr(endpoint, "endpoint", endpoint) if proxied else endpoint
    family = getattr(inner, "addressFamily", None)
    if family is not None:  # systemd's socket: listening already, adopted as it is
        # As Twisted's endpoint does; a blocking one would hang the worker
        # whose accept() loses the race for a connection to another worker.
        os.set_blocking(inner.fileno, False)
        return Bound(option, description, family, inner.fileno, proxied)
    if hasattr(inner, "_address"):
        return _bind_unix(option, description, inner, proxied)
    interface = inner._interface
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    if type(inner).__name__ == "TCP6ServerEndpoint":
        family = socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As twisted.internet.tcp.Port: a restart need not wait for TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, inner._port))
        sock.listen(inner._backlog)
        # Non-blocking is the open file's, shared by every worker, as Twisted wants.
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")  # noqa: S104
        where = f"[{host}]:{inner._port}" if ":" in host else f"{host}:{inner._port}"
        raise StartupError(
            f"cannot listen on {where}: {strerror(e)}", EXIT_CANNOT_LISTEN
        ) from None
    return Bound(option, description, family, sock.fileno(), proxied, sock)


def _bind_unix(option: str, description: str, inner: Any, proxied: bool) -> Bound:
    """A UNIX socket listener, as twisted.internet.unix.Port binds one (lock file, mode)."""
    from twisted.python.lockfile import FilesystemLock

    path = inner._address
    lock = None
    if inner._wantPID:
        # As Twisted: PATH.lock names the running server; a stale socket is removed.
        lock = FilesystemLock(path + ".lock")  # type: ignore[no-untyped-call]  # Twisted's
        if not lock.lock():  # type: ignore[no-untyped-call]  # Twisted's
            raise StartupError(f"cannot listen on {path}: in use by a running server",
                               EXIT_CANNOT_LISTEN)
        if not lock.clean and os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, inner._mode)
        sock.listen(inner._backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if lock is not None:
            lock.unlock()  # type: ignore[no-untyped-call]  # Twisted's
        raise StartupError(f"cannot listen on {path}: {strerror(e)}", EXIT_CANNOT_LISTEN) from None
    return Bound(option, description, socket.AF_UNIX, sock.fileno(), proxied, sock, path, lock)


def _how(reason: Failure) -> str:
    """``exited with status 1`` or ``was killed by signal SIGKILL``."""
    error = reason.value
    if isinstance(error, ProcessTerminated) and error.signal is not None:
        try:
            name = signal.Signals(error.signal).name
        except ValueError:
            name = str(error.signal)
        return f"was killed by signal {name}"
    code = getattr(error, "exitCode", 0) if not isinstance(error, ProcessDone) else 0
    return f"exited with status {code}"


class _Worker(ProcessProtocol):
    """One worker process: its log lines republished in the parent's log, its end told."""

    def __init__(self, supervisor: WorkerSupervisor, slot: int, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.pid: int | None = None
        self.admission: AdmissionServer | None = None
        self._records = b""
        self._errors = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._records += data
            # A record is one line of JSON (which escapes newlines).
            *whole, self._records = self._records.split(b"\n")
            for record in whole:
                self._republish(record)
        elif childFD == 2:
            self._errors += data
            *lines, self._errors = self._errors.split(b"\n")
            for line in lines:
                self._stderr(line)

    def _republish(self, record: bytes) -> None:
        """A worker's log event, into the parent's log, marked with the worker's pid."""
        if not record.strip():
            return
        try:
            event = event_of(record, self.pid)
        except ValueError:  # Not a record: something the worker printed.
            self._stderr(record)
            return
        globalLogPublisher(event)

    def _stderr(self, line: bytes) -> None:
        if line.strip():
            log.warn(
                "worker {pid}: {line}", pid=self.pid, line=line.decode("utf-8", "replace")
            )

    def processEnded(self, reason: Failure) -> None:
        self._republish(self._records)
        self._stderr(self._errors)
        self.supervisor._ended(self, reason)


class WorkerSupervisor(Service):
    """
    Binds ``listeners`` (option, description, endpoint) at privileged
    start, and keeps ``count`` workers serving them with the parent's
    ``admission``; ``arguments`` are the ``twistd popserv`` arguments the
    workers parse again.  Stopping, it gives the workers ``grace`` seconds
    (their ``--shutdown-grace``) and :data:`KILL_MARGIN` more.
    """

    name = "workers"

    def __init__(
        self,
        count: int,
        listeners: Sequence[tuple[str, str, Any]],
        admission: IAdmission,
        arguments: Sequence[str],
        reactor: Any,
        *,
        options: object = None,
        grace: float = SHUTDOWN_GRACE,
    ) -> None:
        self.count = count
        self.listeners = list(listeners)
        self.admission = admission
        self.arguments = list(arguments)
        self.reactor = reactor
        self._options = options
        #: Seconds from SIGTERM to SIGKILL.
        self.stop_timeout = grace + KILL_MARGIN
        self.bound: list[Bound] = []
        self.workers: dict[int, _Worker] = {}
        self._delays = [RESTART_DELAY] * count
        self._restarts: dict[int, IDelayedCall] = {}
        self._deaths: list[float] = []
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._killer: IDelayedCall | None = None
        self._previous_hup: Any = None
        self.failed = False
        #: Workers that ended without being asked to (restarted, or the parent gave up).
        self.exits = 0
        #: How the parent ends when the workers keep dying (tests replace it).
        self.exit: Callable[[int], Any] = self._exit_now

    # Start

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's Service
        try:
            for option, description, endpoint in self.listeners:
                self.bound.append(bind(option, description, endpoint))
        except StartupError:
            self._close()
            raise

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        parent_end, child_end = socket.socketpair()
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", ADMISSION_FD: child_end.fileno()}
        described = []
        for i, bound in enumerate(self.bound):
            fds[ADMISSION_FD + 1 + i] = bound.fd
            described.append(bound.describe(ADMISSION_FD + 1 + i))
        config = {"admission": ADMISSION_FD, "listeners": described, "arguments": self.arguments}
        worker = _Worker(self, slot, self.reactor.seconds())
        argv = [sys.executable, "-m", "popserv.server.workers.child"]
        try:
            transport = self.reactor.spawnProcess(
                worker, sys.executable, argv, _environment(config), childFDs=fds
            )
        except OSError as e:
            # Not executable as the user privileges were dropped to, say:
            # counted as a death, so retried, and the parent stops if it lasts.
            parent_end.close()
            log.error("Cannot start a worker: {python}: {error}", python=sys.executable,
                      error=strerror(e))
            failed = ProcessTerminated(exitCode=127)  # type: ignore[no-untyped-call]  # Twisted's
            self._ended(worker, Failure(failed))
            return
        finally:
            # The parent keeps no copy of the worker's end, or its death is never seen.
            child_end.close()
        worker.pid = transport.pid
        worker.admission = serve_admission(
            parent_end, self.admission, self.reactor, name=f"worker {transport.pid}"
        )
        self.workers[slot] = worker
        log.info("Started worker {pid} ({slot} of {count})", pid=worker.pid,
                 slot=slot + 1, count=self.count)

    def links(self) -> list[AdmissionServer]:
        """The connections to the workers running now, to ask them (who, kick, metrics)."""
        return [
            worker.admission
            for worker in self.workers.values()
            if worker.admission is not None and not worker.admission.lost
        ]

    # A worker's end

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        how = _how(reason) if worker.pid is not None else "could not start"
        if self._stopping:
            log.info("Worker {pid} {how}", pid=worker.pid, how=how)
            if not self.workers and self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        self.exits += 1
        now = self.reactor.seconds()
        self._deaths = [t for t in self._deaths if now - t < DEATH_WINDOW] + [now]
        if len(self._deaths) > MAX_DEATHS:
            log.critical(
                "Worker {pid} {how}: {deaths} workers died within {window:.0f} s; stopping",
                pid=worker.pid, how=how, deaths=len(self._deaths), window=DEATH_WINDOW,
            )
            self._give_up()
            return
        if now - worker.started >= STABLE_AFTER:
            self._delays[worker.slot] = RESTART_DELAY
        delay = self._delays[worker.slot]
        self._delays[worker.slot] = min(delay * 2, MAX_RESTART_DELAY)
        log.error(
            "Worker {pid} {how}; starting another in {delay:g} s",  # pid None: never started
            pid=worker.pid, how=how, delay=delay,
        )
        self._restarts[worker.slot] = self.reactor.callLater(delay, self._spawn, worker.slot)

    def _give_up(self) -> None:
        #: The parent stopped because the workers kept dying.
        self.failed = True
        self.reactor.addSystemEventTrigger(
            "after", "shutdown", lambda: self.exit(EXIT_WORKERS_FAILED)
        )
        self.reactor.stop()

    def _exit_now(self, status: int) -> None:
        remove_pidfile(self._options)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os._exit(status)

    # Signals

    def _hangup(self, signum: int, frame: Any) -> None:
        """SIGHUP: passed on to every worker (each reloads its certificates)."""
        for worker in list(self.workers.values()):
            self._signal(worker, "HUP")
        previous = self._previous_hup
        if callable(previous):
            previous(signum, frame)

    def _signal(self, worker: _Worker, name: str) -> None:
        # It may have ended meanwhile, its end not seen yet.
        with contextlib.suppress(ProcessExitedAlready):
            worker.transport.signalProcess(name)  # type: ignore[union-attr]

    # Stop

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service
        self._stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for pending in self._restarts.values():
            if pending.active():
                pending.cancel()
        self._restarts.clear()
        # The parent's copies of the listening sockets close now: once the
        # workers have closed theirs, new connections are refused while the
        # workers' sessions drain (a UNIX socket's path goes at once).
        self._close()
        if not self.workers:
            return None
        self._stopped = Deferred()
        for worker in list(self.workers.values()):
            self._signal(worker, "TERM")
        self._killer = self.reactor.callLater(self.stop_timeout, self._kill)
        stopped = self._stopped

        def done(result: object) -> object:
            if self._killer is not None and self._killer.active():
                self._killer.cancel()
            return result

        return stopped.addBoth(done)

    def _kill(self) -> None:
        for worker in list(self.workers.values()):
            log.warn(
                "Worker {pid} still running {timeout:g} s after SIGTERM: SIGKILL",
                pid=worker.pid, timeout=self.stop_timeout,
            )
            self._signal(worker, "KILL")

    def _close(self) -> None:
        bound, self.bound = self.bound, []
        for one in bound:
            one.close()


def _environment(config: dict[str, Any]) -> dict[str, str]:
    """The worker's environment: ours, where to import popserv from, its configuration."""
    import popserv

    env = dict(os.environ)
    # The worker's sockets are given by number in its configuration.
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    here = str(Path(popserv.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    env[CONFIG_VARIABLE] = json.dumps(config)
    return env


__all__ = [
    "ADMISSION_FD",
    "CONFIG_VARIABLE",
    "EXIT_WORKERS_FAILED",
    "Bound",
    "WorkerSupervisor",
    "bind",
]
