"""
Start-up failures, in one line: :class:`StartupError`, and how ``twistd
popserv`` ends with it (one line on stderr, the status pipe told, the PID
file removed, an exit status systemd can act on).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from twisted.logger import Logger

from popserv.stores.delivery import EX_CONFIG, EX_TEMPFAIL

log = Logger()

#: Exit status of ``twistd popserv`` when the configuration is wrong (an
#: option, or a file one names): sysexits.h EX_CONFIG.  Restarting cannot
#: help, so the systemd unit lists it in RestartPreventExitStatus=.
EXIT_CONFIG = EX_CONFIG
#: Exit status when a listener cannot listen (port in use, no permission):
#: sysexits.h EX_TEMPFAIL, since the port may be free a moment later (an old
#: instance still shutting down) and Restart=on-failure retries.
EXIT_CANNOT_LISTEN = EX_TEMPFAIL


class StartupError(Exception):
    """
    A reason popserv cannot start, told in one line (no traceback): under
    ``twistd popserv`` it is printed as ``popserv: LINE`` and the process
    exits with ``status``; an application embedding popserv gets the
    exception.
    """

    def __init__(self, message: str, status: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


def under_twistd(options: object) -> bool:
    """True when ``options`` are the ``popserv`` subcommand of a twistd command line."""
    return getattr(options, "parent", None) is not None


def exit_at_startup(
    options: object, message: str, status: int, *, usage_line: str | None = None
) -> NoReturn:
    """
    End ``twistd popserv`` before it serves: ``popserv: MESSAGE`` as one line
    on the real stderr (after an optional usage line), in the log when
    twistd's logging has begun, and to a daemonizing twistd's waiting parent
    through its status pipe; the PID file removed; exit ``status``.
    """
    line = f"popserv: {message}"
    config: Any = getattr(options, "parent", None) or {}
    # Once twistd logs, sys.stderr is a file that writes log events; the
    # process's own stderr is still sys.__stderr__ (the terminal, the journal).
    stderr = sys.__stderr__ or sys.stderr
    if usage_line:
        stderr.write(usage_line + "\n")
    stderr.write(line + "\n")
    stderr.flush()
    if sys.stderr is not sys.__stderr__:
        log.critical("{line}", line=line)
    # Before the parent hears of it: once it has exited, whoever started it
    # may look for the PID file (and find a stale one).
    remove_pidfile(options)
    pipe = config.get("statusPipe")
    if pipe is not None:
        # The parent of a daemonizing twistd waits for this and prints it
        # (it reads at most 100 bytes, then exits 1 whatever we send).
        os.write(pipe, b"1 " + line.encode("utf-8", "replace")[:98])
        os.close(pipe)
        config["statusPipe"] = None
    raise SystemExit(status)


def remove_pidfile(options: object) -> None:
    """Remove twistd's PID file if it is this process's (twistd would, on a normal exit)."""
    config: Any = getattr(options, "parent", None) or {}
    pidfile = config.get("pidfile")
    if pidfile and os.path.exists(pidfile):
        try:
            with open(pidfile) as f:
                ours = f.read().strip() == str(os.getpid())
            if ours:
                os.unlink(pidfile)
        except OSError:
            pass


@contextmanager
def exit_on_startup_error(options: object) -> Iterator[None]:
    """
    Under twistd, a :class:`StartupError` raised inside ends the process in
    one line (:func:`exit_at_startup`); elsewhere it propagates.
    """
    try:
        yield
    except StartupError as e:
        if not under_twistd(options):
            raise
        exit_at_startup(options, e.message, e.status)


def strerror(error: OSError) -> str:
    """``No such file or directory`` as ``no such file or directory``."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]
