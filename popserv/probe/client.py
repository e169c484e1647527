"""
A small blocking POP3 client that keeps the bytes: ``popserv probe``
checks what a server sends octet by octet, which :mod:`poplib` hides
(it strips line ends and byte-stuffing, and accepts bare LFs).

Every status line read is recorded in the :class:`Transcript` the
connection was given, so that one check can look at all of them at the
end.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Sequence

from attrs import define, field

from popserv.probe.syntax import Reply, parse_reply

#: The longest line read before the server is called broken: a message's
#: lines may be long (RFC 5322 allows 998 octets, Maildirs hold longer).
MAX_LINE = 1 << 20

#: The most a multi-line answer may hold (``--max-size`` keeps RETR below it).
MAX_ANSWER = 256 << 20


class ProbeError(Exception):
    """The server did something the probe cannot go on from; one line saying what."""


class Closed(ProbeError):
    """The server closed the connection."""


class TimedOut(ProbeError):
    """No answer came within the timeout."""


@define
class Transcript:
    """Every status line the server sent, with the command it answered."""

    lines: list[tuple[str, bytes]] = field(factory=list)

    def add(self, command: str, raw: bytes) -> None:
        self.lines.append((command, raw))


def tls_context(
    cafile: str | None = None,
    *,
    verify: bool = True,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """
    A client context: the system's CAs (or ``cafile``) and host name
    checks when ``verify``; only ``version`` when given (with OpenSSL's
    security level lowered so that TLS 1.0 and 1.1 can be offered at all).
    ALPN offers ``pop3`` (RFC 7301, as servers that check it want).
    """
    if verify:
        context = ssl.create_default_context(cafile=cafile)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = version
        context.maximum_version = version
    context.set_alpn_protocols(["pop3"])
    return context


class Connection:
    """One connection to a POP3 server: raw lines in, raw bytes out."""

    def __init__(
        self,
        sock: socket.socket,
        transcript: Transcript,
        timeout: float,
    ) -> None:
        self.sock = sock
        self.transcript = transcript
        self.timeout = timeout
        self.buffer = b""
        self.greeting: Reply | None = None
        self.greeting_raw = b""
        self.closed = False
        #: A login on this connection succeeded (it is in the TRANSACTION state).
        self.logged_in = False

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        transcript: Transcript,
        timeout: float,
        context: ssl.SSLContext | None = None,
        *,
        greeted: bool = True,
    ) -> Connection:
        """
        Connect (with TLS from the first byte when given a ``context``) and
        read the greeting, which must be +OK unless not ``greeted``.
        """
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ProbeError(f"cannot connect to {_where(host, port)}: {reason(e)}") from None
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        connection = cls(sock, transcript, timeout)
        try:
            connection.greeting_raw = connection.line()
        except ProbeError:
            connection.close()
            raise
        connection.transcript.add("(greeting)", connection.greeting_raw)
        connection.greeting = parse_reply(connection.greeting_raw)
        if greeted and (connection.greeting is None or not connection.greeting.ok):
            connection.close()
            shown = connection.greeting_raw[:80].decode("utf-8", "replace").rstrip("\r\n")
            raise ProbeError(f"the server greeted with {shown!r}")
        return connection

    @property
    def tls(self) -> ssl.SSLSocket | None:
        return self.sock if isinstance(self.sock, ssl.SSLSocket) else None

    @property
    def peer(self) -> str:
        return str(self.sock.getpeername()[0])

    # Reading

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut(f"no answer within {self.timeout:g} s")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimedOut(f"no answer within {self.timeout:g} s") from None
        except ssl.SSLError as e:
            raise Closed(f"the TLS connection failed: {reason(e)}") from None
        except OSError as e:
            raise Closed(f"the connection failed: {reason(e)}") from None
        if not data:
            self.closed = True
            raise Closed("the server closed the connection")
        self.buffer += data

    def line(self, deadline: float | None = None) -> bytes:
        """One line as received, its LF (and CR, if any) included."""
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        searched = 0
        while (end := self.buffer.find(b"\n", searched)) < 0:
            if len(self.buffer) > MAX_LINE:
                raise ProbeError(f"a line longer than {MAX_LINE} octets")
            searched = len(self.buffer)
            self._fill(deadline)
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
        return line

    def status(self, command: str, raw: bytes) -> Reply:
        self.transcript.add(command, raw)
        reply = parse_reply(raw)
        if reply is None:
            shown = raw[:80].decode("utf-8", "replace").rstrip("\r\n")
            raise ProbeError(f"{command}: not a status line: {shown!r}")
        return reply

    def reply(self, command: str) -> Reply:
        """The status line answering ``command``."""
        return self.status(command, self.line())

    def data(self) -> list[bytes]:
        """
        The lines of a multi-line answer up to the terminating ``.``, as
        received but without their line ends (which must be CRLF: a bare
        LF is a :class:`ProbeError`).
        """
        deadline = time.monotonic() + self.timeout
        lines: list[bytes] = []
        total = 0
        while True:
            raw = self.line(deadline)
            if not raw.endswith(b"\r\n"):
                raise ProbeError(f"a line of a multi-line answer ends with a bare LF: {raw[:60]!r}")
            line = raw[:-2]
            if line == b".":
                return lines
            lines.append(line)
            total += len(raw)
            if total > MAX_ANSWER:
                raise ProbeError(f"a multi-line answer longer than {MAX_ANSWER} octets")

    # Writing

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Closed(f"cannot send: {reason(e)}") from None

    def command(self, line: str) -> Reply:
        """Send one command; its status line."""
        self.send(line.encode("utf-8") + b"\r\n")
        # The transcript keeps no password: PASS (and AUTH's data) by its verb only.
        secret = line.upper().startswith(("PASS ", "AUTH "))
        return self.reply(line.split(" ", maxsplit=1)[0] if secret else line)

    def multi(self, line: str) -> tuple[Reply, list[bytes]]:
        """Send a command with a multi-line answer; its status and, after +OK, its lines."""
        reply = self.command(line)
        return reply, self.data() if reply.ok else []

    def pipelined(self, lines: Sequence[str]) -> None:
        """Send every line in one write."""
        self.send(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def arriving(self, quiet: float) -> bytes:
        """
        What the server sends without being asked: everything buffered, and
        what arrives until ``quiet`` seconds pass with nothing new, or the
        server closes the connection.
        """
        found, self.buffer = self.buffer, b""
        last = time.monotonic()
        while not self.closed and (remaining := last + quiet - time.monotonic()) > 0:
            tls = self.tls
            if tls is None or not tls.pending():
                ready, _, _ = select.select([self.sock], [], [], remaining)
                if not ready:
                    break
            self.sock.settimeout(max(remaining, 0.01))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            found += data
            last = time.monotonic()
        return found

    # TLS

    def start_tls(self, context: ssl.SSLContext, host: str) -> ssl.SSLSocket:
        """The TLS handshake on this connection (after STLS was answered +OK)."""
        if self.buffer:
            raise ProbeError("data after the +OK to STLS, before the TLS handshake")
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=host)
        return self.sock

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


def tls_facts(sock: ssl.SSLSocket) -> str:
    """``TLS 1.3, TLS_AES_256_GCM_SHA384``"""
    version = (sock.version() or "?").replace("TLSv", "TLS ")
    cipher = sock.cipher()
    return f"{version}, {cipher[0]}" if cipher else version


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reason(error: BaseException) -> str:
    """One short line for a socket or TLS error."""
    verify_message = getattr(error, "verify_message", None)
    if verify_message:
        return str(verify_message).rstrip(".")
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).lower().replace("_", " ")
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


__all__ = [
    "MAX_ANSWER",
    "MAX_LINE",
    "Closed",
    "Connection",
    "ProbeError",
    "TimedOut",
    "Transcript",
    "reason",
    "tls_context",
    "tls_facts",
]
