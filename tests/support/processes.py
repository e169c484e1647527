"""Shared test fixtures: processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

import popserv
import popserv.server.service

REPO = Path(popserv.__file__).resolve().parent.parent


def twistd_script() -> str:
    """The ``twistd`` beside this Python (the venv's), or skip the test."""
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        raise SkipTest("no twistd script beside this Python")
    return str(twistd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Twistd(ProcessProtocol):
    """A twistd process whose output is collected and can be waited on."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for pattern, d in list(self._waiting):
            if pattern in self.output:
                self._waiting.remove((pattern, d))
                d.callback(None)

    def wait_for(self, pattern: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((pattern, d))
        self._check()
        return d.addTimeout(30, reactor)

    async def until(self, condition: Any, timeout: float = 15.0) -> None:
        """Wait until ``condition()`` is true; fail with the output so far if it never is."""
        for _ in range(int(timeout / 0.05)):
            if condition():
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"timed out: {self.output.decode(errors='replace')}")

    def processEnded(self, reason) -> None:
        # After a clean shutdown on SIGTERM, twistd ends itself with that signal.
        clean = reason.check(ProcessDone) or (
            reason.check(ProcessTerminated) and reason.value.signal == signal.SIGTERM
        )
        code = 0 if clean else getattr(reason.value, "exitCode", -1)
        for _, d in self._waiting:
            d.errback(AssertionError(f"twistd ended: {self.output.decode(errors='replace')}"))
        self._waiting.clear()
        self.ended.callback(code)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def stop_at_cleanup(case: Any, process: _Twistd, transport: Any) -> None:
    """At the end of ``case``, SIGTERM the process (if still running) and wait for it."""

    async def stop() -> None:
        if transport.pid is not None:
            transport.signalProcess(signal.SIGTERM)
        await process.ended

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()) if not process.ended.called else None)



def wait_for_port(port: int, alive: Any, what: str, patience: float = 30.0) -> None:
    """Until 127.0.0.1:``port`` accepts; AssertionError if ``alive()`` turns false or never."""
    deadline = time.monotonic() + patience
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not alive() or time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start") from None
            time.sleep(0.05)


class LoggedProcess:
    """
    A child (``twistd``) run with :mod:`subprocess`, its output in
    ``base/twistd.log``, killed (SIGKILL: nothing flushed, nothing given
    back) or stopped (SIGTERM) at will.
    """

    #: Seconds :meth:`stop` waits for SIGTERM before SIGKILL.
    patience = 20.0

    def __init__(self, base: Path) -> None:
        self.base = base
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.base / "twistd.log"

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.process is None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, env=subprocess_env(), cwd=self.base, stdout=log, stderr=subprocess.STDOUT
            )
        return self.process

    def wait_for_ports(self, *ports: int, what: str = "twistd") -> None:
        """Until every port accepts; AssertionError with the output if the child ends first."""
        process = self.process
        assert process is not None
        for port in ports:
            try:
                wait_for_port(port, lambda: process.poll() is None, what)
            except AssertionError as e:
                raise AssertionError(f"{e}: {self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(self.patience)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
