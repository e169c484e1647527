"""
The parent and a worker talk over one socket, in short tab-separated lines.

Every connection and login asks the parent something, so the exchange must
cost little: AMP (what this replaced) took about 120 us of CPU a question
and its release, spent mostly in building and parsing its boxes; a line
here takes a few.  A message is one line::

    OP <TAB> ID [<TAB> FIELD]... <LF>

``OP`` is one ASCII letter or sign; ``ID`` a decimal integer the sender
chose; each ``FIELD`` text, or ``-`` for None.  Text is UTF-8 with ``\\``,
TAB and LF escaped as ``\\\\``, ``\\t`` and ``\\n``, and a text beginning
with ``-`` gets one more ``-`` in front, so None and ``"-"`` differ.

Both ends may ask.  A question's answer is ``+ ID [FIELD]...`` or
``! ID CODE [TEXT]``; the ids of each end's questions are its own, so an
answer is always to the receiver's question with that id.  Which ops are
answered is fixed per op (:attr:`Channel.answered`); the others (a release,
a verdict) are sent without one.
"""

from __future__ import annotations

import itertools
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

Fields = Sequence[str | None]

ANSWER = b"+"
ERROR = b"!"

_NONE = b"-"
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n"}
_UNESCAPES = {v.encode(): k.encode() for k, v in _ESCAPES.items()}
_NEEDS_ESCAPE = re.compile("[\\\\\t\n]")
_ESCAPED = re.compile(rb"\\.")


def _field(value: str | None) -> bytes:
    if value is None:
        return _NONE
    if _NEEDS_ESCAPE.search(value):
        value = _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()], value)
    if value[:1] == "-":
        value = "-" + value
    return value.encode("utf-8")


def _value(field: bytes) -> str | None:
    if field[:1] == b"-":
        if field == _NONE:
            return None
        field = field[1:]
    if b"\\" in field:
        field = _ESCAPED.sub(lambda m: _UNESCAPES.get(m.group(), m.group()[1:]), field)
    return field.decode("utf-8")


def encode(op: bytes, id: int, fields: Fields = ()) -> bytes:
    """One message, its LF included."""
    if not fields:
        return b"%s\t%d\n" % (op, id)
    return b"%s\t%d\t%s\n" % (op, id, b"\t".join([_field(f) for f in fields]))


def decode(line: bytes) -> tuple[bytes, int, list[str | None]]:
    """A message's op, id and fields, from one line without its LF; ValueError if malformed."""
    op, id, *fields = line.split(b"\t")
    return op, int(id), [_value(f) for f in fields]


class RemoteError(Exception):
    """The other end answered a question with an error ``code`` (and ``text``)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


#: What a question is answered with: its answer's fields, or an error.
Handler = Callable[..., "Deferred[Fields] | Fields | None"]


class Channel(Protocol):
    """
    One end of the socket: sends questions and notices, answers the other
    end's from :attr:`handlers` (op to a callable taking the id and the
    fields).  A handler of an op in :attr:`answered` returns the answer's
    fields (or a Deferred of them), or raises (fails with) an exception
    whose :meth:`error_code` says how to answer.
    """

    #: The ops whose messages are answered.
    answered: ClassVar[frozenset[bytes]] = frozenset()

    def __init__(self) -> None:
        self.handlers: dict[bytes, Handler] = {}
        #: This end's questions waiting for an answer, by id.
        self.waiting: dict[int, Deferred[list[str | None]]] = {}
        self._ids = itertools.count(1)
        self._buffer = b""
        #: The connection is gone: nothing more is sent.
        self.lost = False
        self._socket: socket.socket | None = None

    def next_id(self) -> int:
        return next(self._ids)

    # Sending

    def call(self, op: bytes, id: int, *fields: str | None) -> Deferred[list[str | None]]:
        """Ask; fires with the answer's fields, or fails with :class:`RemoteError`."""
        if self.lost:
            return fail(ConnectionLost("the other end is gone"))
        line = encode(op, id, fields)
        # Cancelled (a timeout): forgotten, so a late answer finds no question.
        def forget(_: object) -> None:
            self.waiting.pop(id, None)

        answer: Deferred[list[str | None]] = Deferred(forget)
        self.waiting[id] = answer
        self._write(line, now=True)
        return answer

    def send(self, op: bytes, id: int, *fields: str | None) -> None:
        """
        Tell, with no answer; nothing is sent once the other end is gone.
        Sent with whatever else this turn of the reactor sends (a session's
        releases go together), unless a question follows at once.
        """
        if not self.lost:
            self._write(encode(op, id, fields), now=False)

    def _write(self, data: bytes, now: bool) -> None:
        """
        Send ``now`` if nothing is waiting in the transport's buffer: a write
        through Twisted waits for the next turn of the reactor and costs two
        more system calls (to watch for, then stop watching for, writability),
        and the other end is waiting for a question or an answer.  Otherwise,
        and for what the socket does not take now, through the transport: in
        order after what is there.
        """
        transport: Any = self.transport
        if now and self._socket is not None and not transport._tempDataLen and (
            transport.offset == len(transport.dataBuffer)
        ):
            try:
                sent = self._socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # The transport finds the error and ends the connection.
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def makeConnection(self, transport: Any) -> None:
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        # Only a socket Twisted's FileDescriptor buffers for (see _write).
        if isinstance(sock, socket.socket) and hasattr(transport, "_tempDataLen"):
            self._socket = sock
        super().makeConnection(transport)  # type: ignore[no-untyped-call]  # Twisted's

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                op, id, fields = decode(line)
            except (ValueError, UnicodeDecodeError):
                log.error("Dropped a malformed message from {peer}: {line!r}",
                          peer=self.peer_name(), line=line[:200])
                continue
            if op in (ANSWER, ERROR):
                self._answer(op, id, fields)
            else:
                self._handle(op, id, fields)

    def _answer(self, op: bytes, id: int, fields: list[str | None]) -> None:
        waiting = self.waiting.pop(id, None)
        if waiting is None:
            log.error("An answer to no question ({id}) from {peer}", id=id, peer=self.peer_name())
        elif op == ANSWER:
            waiting.callback(fields)
        else:
            code, text = [*fields, None, None][:2]
            waiting.errback(RemoteError(code or "", text or ""))

    def _handle(self, op: bytes, id: int, fields: list[str | None]) -> None:
        handler = self.handlers.get(op)
        if op not in self.answered:
            if handler is None:
                log.error("Unknown message {op!r} from {peer}", op=op, peer=self.peer_name())
                return
            try:
                handler(id, *fields)
            except Exception:
                log.failure("Handling {op!r} from {peer} failed", op=op, peer=self.peer_name())
            return
        if handler is None:
            self._reply_error(Failure(LookupError(f"unknown question {op!r}")), id)
            return
        result: Deferred[Any] = maybeDeferred(handler, id, *fields)
        # An answer that cannot be sent (its fields cannot be encoded) is an error answer.
        result.addCallback(self._reply, id).addErrback(self._reply_error, id)

    def _reply(self, fields: Fields | None, id: int) -> None:
        if not self.lost:
            self._write(encode(ANSWER, id, fields or ()), now=True)

    def _reply_error(self, failure: Failure, id: int) -> None:
        code = self.error_code(failure)
        if code is None:
            log.failure("Answering {peer} failed", failure, peer=self.peer_name())
            code = "FAILED"
        if not self.lost:
            self._write(encode(ERROR, id, (code, failure.getErrorMessage())), now=True)

    def error_code(self, failure: Failure) -> str | None:
        """The code ``failure`` is answered with; None: unexpected (logged, answered FAILED)."""
        return None

    def peer_name(self) -> str:
        return "the other end"

    # The end

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:  # noqa: B008
        self.lost = True
        waiting, self.waiting = self.waiting, {}
        for answer in waiting.values():
            answer.errback(reason)


__all__ = ["ANSWER", "ERROR", "Channel", "RemoteError", "decode", "encode"]
