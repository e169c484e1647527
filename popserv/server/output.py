"""
Writing to a POP3 client: answers coalesced per batch of work, multi-line
bodies streamed as fast as the client reads them (the transport's
producer tells when its send buffer is full or drained), and Nagle's
algorithm off.  A mixin of :class:`~popserv.server.protocol.POP3Protocol`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core import wire
from popserv.server.coalesce import Coalescer
from popserv.server.transports import IStreamTransport


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under ``transport``
    (a TLS wrapper's too).  An answer is written whole, so there is nothing
    to coalesce; with it on, the small last write of a long response (the
    final ``.`` of a RETR) waits for the client's ACK of what went before,
    up to the client's delayed-ACK timer (40 ms on Linux).
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        set_no_delay = getattr(candidate, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # OSError: not TCP after all (a UNIX socket), or already closing.
            with contextlib.suppress(OSError):
                set_no_delay(True)
            return


class Gated(Protocol):
    """A connection that stops writing while its transport's send buffer is full."""

    output_paused: bool

    def output_resumed(self) -> None: ...


@implementer(interfaces.IPushProducer)
class OutputGate:
    """
    Tells a connection (POP3's, or the receiver's) when the transport's send
    buffer is full or drained: registered as the transport's producer.
    """

    def __init__(self, output: Gated) -> None:
        self._output = output

    def pauseProducing(self) -> None:
        self._output.output_paused = True

    def resumeProducing(self) -> None:
        self._output.output_paused = False
        self._output.output_resumed()

    def stopProducing(self) -> None:
        pass


class Output:
    """The sending half of a POP3 connection."""

    transport: IStreamTransport
    output_paused: bool
    _output: Coalescer
    _lost: bool
    _closing: bool
    _queue: deque[wire.Line]
    _stream: Iterator[bytes | Deferred[bytes]] | None
    _stream_done: Deferred[None] | None
    #: The chunk the stream waits for (a store's read that does not block).
    _chunk_awaited: Deferred[bytes] | None = None
    #: How a stream that ended before stream() returned failed, if it did.
    _stream_failure: Failure | None = None

    if TYPE_CHECKING:  # Provided by the protocol (and TimeoutMixin).

        def resetTimeout(self) -> None: ...

        def _run_queue(self) -> None: ...

    #: Octets written to the connection (the session summary's ``sent``).
    octets_sent = 0

    def send(self, data: bytes) -> None:
        if not self._closing:
            self.octets_sent += len(data)
            self._output.write(self.transport, data)

    def output_resumed(self) -> None:
        self._output.hold()
        try:
            if self._stream is not None:
                self._pump_stream()
            if self._stream is None:
                self._run_queue()
        finally:
            self._output.release(self.transport)

    def stream(self, chunks: Iterator[bytes | Deferred[bytes]]) -> Deferred[None] | None:
        """
        Send ``chunks`` as fast as the client reads them: None when they all
        went at once (or the connection is gone), else a Deferred that fires
        when they have.  A chunk may be a Deferred (a read that does not
        block): the stream waits for it, and a failure ends the connection.
        """
        if self._lost:
            return None
        self._stream = chunks
        self._stream_failure = None
        self._pump_stream()
        if self._stream is None:
            failure, self._stream_failure = self._stream_failure, None
            return None if failure is None else fail(failure)
        self._stream_done = done = Deferred[None]()
        return done

    def _pump_stream(self) -> None:
        stream = self._stream
        assert stream is not None
        while not self.output_paused and not self._lost and self._chunk_awaited is None:
            try:
                chunk = next(stream)
            except StopIteration:
                self._end_stream()
                return
            except Exception:
                self._stream_broke(Failure())
                return
            if isinstance(chunk, Deferred):
                # A store that reads without blocking (IChunkSource): the
                # stream goes on when the chunk is there.
                self._chunk_awaited = chunk
                chunk.addCallbacks(
                    self._chunk_read,
                    self._chunk_failed,
                    callbackArgs=(stream,),
                    errbackArgs=(stream,),
                )
                return
            self.send(chunk)
            self.resetTimeout()

    def _chunk_read(self, chunk: bytes, stream: object) -> None:
        if self._stream is not stream:  # ended meanwhile (the connection lost)
            return
        self._chunk_awaited = None
        self._output.hold()
        try:
            if chunk:
                self.send(chunk)
                self.resetTimeout()
            self._pump_stream()
            if self._stream is None:
                self._run_queue()
        finally:
            self._output.release(self.transport)

    def _chunk_failed(self, failure: Failure, stream: object) -> None:
        if self._stream is stream:
            self._chunk_awaited = None
            self._stream_broke(failure)

    def _stream_broke(self, failure: Failure) -> None:
        """
        Half a response is out: an -ERR now would be read as message data, so
        the only honest answer is to close the connection.  The command that
        streamed gets the failure, to log it.
        """
        self._closing = True
        self._queue.clear()
        self._end_stream(failure)
        self.transport.abortConnection()

    def _end_stream(self, failure: Failure | None = None) -> None:
        stream, self._stream = self._stream, None
        self._chunk_awaited = None
        done, self._stream_done = self._stream_done, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # A generator: its owner closes what it reads from.
        if done is not None:
            if failure is None:
                done.callback(None)
            else:
                done.errback(failure)
        elif failure is not None:
            self._stream_failure = failure


__all__ = ["Gated", "Output", "OutputGate", "no_delay"]
