"""
The connection under a receiving session: Twisted's ESMTP class with the
input, output and time discipline a server on the open internet needs.
What the commands mean is :mod:`popserv.server.receiving.protocol`.

- admission first: the greeting waits until the connection is granted;
- one command at a time: while a command waits on the disk (a quota look,
  a delivery), later pipelined input is held, and reading pauses;
- replies to pipelined commands written in batches, and no command run
  while the client does not read its replies (:class:`~popserv.server.output.OutputGate`);
- DATA read in chunks with C-speed unstuffing (:class:`BodyDecoder`), so
  a 25 MB message is not 300,000 Python calls, and no line limit inside it,
  written to a spool file as it arrives (:mod:`popserv.server.spool`), the
  size limit enforced on the way, so a session holds at most about 64 KiB
  of message in memory however large the message;
- sessions that only err, only stall, or last too long are closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from OpenSSL import SSL
from twisted.internet import error, interfaces, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core.body import BodyDecoder
from popserv.core.smtpwire import (
    JUNK_COMMANDS,
    MAX_COMMAND_LINE,
    SHUTTING_DOWN,
    TOO_MANY,
    CommandCounters,
    address_literal,
    reply_line,
    reply_lines,
    split_command,
)
from popserv.server.admission import ILease, wait_for_admission
from popserv.server.coalesce import write_now
from popserv.server.drain import SHUTTING_DOWN as SHUT_DOWN_BY_SERVER
from popserv.server.output import OutputGate
from popserv.server.receiving.summary import ReceiverTally, receiver_summary
from popserv.server.spool import Spool
from popserv.server.summary import log_summary
from popserv.server.transports import IStreamTransport

if TYPE_CHECKING:
    from popserv.server.receiving.factory import ReceiverFactory

log = Logger()

#: Input held while a command waits for the disk or the client's reading,
#: before the connection is considered abusive.  Reading pauses at once, so
#: what is held is the rest of one read (64 KiB); this is the bound that
#: keeps a session's memory under 256 KiB whatever the client does.
MAX_HELD = 128 * 1024

#: Replies to pipelined commands are joined up to this many octets before
#: they are written: fewer system calls, and few enough objects in Twisted's
#: send buffer that a client not reading its replies costs little memory
#: before the output gate stops the session (each 27-octet reply written
#: alone took 68 octets there).
REPLY_BATCH = 4 * 1024


def peer_text(peer: IAddress | None) -> str:
    """The client as Received fields show it (RFC 5321 section 4.1.3 address literals)."""
    return address_literal(getattr(peer, "host", None))


@implementer(interfaces.IHandshakeListener)
class ReceiverConnection(smtp.ESMTP):
    """
    One receiving connection's I/O.  A subclass gives the verbs (:attr:`VERBS`,
    each naming a ``cmd_`` method that takes the argument and answers now or
    returns a Deferred), and what ends a transaction
    (:meth:`_reset_transaction`) and a message (:meth:`_end_of_data`).
    """

    factory: ReceiverFactory
    #: Set by makeConnection before any method below runs (see popserv.server.transports).
    transport: IStreamTransport
    #: The verbs answered and the method of each: a table, so that client
    #: input never names a method.
    VERBS: ClassVar[dict[bytes, str]] = {}
    #: LMTP answers DATA once per recipient; SMTP once for all.  The LMTP
    #: client is the local MTA, trusted: its refusals do not count as errors.
    per_recipient_replies: ClassVar[bool] = False
    #: Twisted's SMTP sets it, unannotated; this receiver's host name (IDNA).
    host: bytes

    def __init__(self, factory: ReceiverFactory) -> None:
        # Twisted's ESMTP is unannotated.
        super().__init__(chal={}, contextFactory=factory.tls)  # type: ignore[no-untyped-call]
        self.factory = factory
        self.host = factory.settings.hostname.encode("idna")
        # SMTP.timeout is inferred int from its default; TimeoutMixin takes any seconds.
        self.timeout = factory.settings.timeout  # type: ignore[assignment]
        self._pending: Deferred[Any] | None = None
        #: The client is not reading its replies: no more commands are run
        #: (their replies would pile up here) until it does.
        self.output_paused = False
        self._held: list[bytes] = []
        self._held_size = 0
        self._reading = True
        #: Replies held while a batch of input is run (see REPLY_BATCH).
        self._replies: bytearray | None = None
        self._reader: BodyDecoder | None = None
        #: The message of the DATA under way, until it is handed to delivery.
        self._spool: Spool | None = None
        self._counters = CommandCounters(
            max_errors=factory.settings.max_errors,
            max_junk=factory.settings.max_junk_commands,
            trusted=self.per_recipient_replies,
        )
        #: The end of :attr:`ReceiverSettings.max_session_time`; it came while
        #: a command was waiting on the disk (``_expired``), so the session
        #: ends once that one is answered.
        self._deadline: IDelayedCall | None = None
        self._expired = False
        #: The server is stopping: closed once no mail transaction is under
        #: way; at the end of the grace, once the command waiting is answered.
        self._draining = False
        self._cut_when_answered = False
        #: The 421 of a stopping server is out: nothing more is said.
        self._silenced = False
        self._discard = False
        #: What admission granted this connection, given back when it ends;
        #: or, until it answers, the question.
        self.lease: ILease | None = None
        self.admitting: Deferred[ILease] | None = None
        self._gone = False
        #: The STARTTLS handshake completed.
        self._handshaken = False
        #: For the session's summary line: when it was admitted (None until
        #: then), what it did, and how it ended when the server ended it.
        self.started: float | None = None
        self.tally = ReceiverTally()
        self.ended: str | None = None
        self.peer = "-"

    def connectionMade(self) -> None:
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.connection_opened(self.factory.service)
        admitting, self.admitting = self.admitting, None
        if admitting is None:
            self._start()
        else:
            wait_for_admission(self.transport, admitting, self._admitted, TOO_MANY, self._left)

    def _left(self) -> bool:
        return self._gone

    def _admitted(self, lease: ILease) -> None:
        self.lease = lease
        self._start()

    def _start(self) -> None:
        """The connection is admitted: greet, and start the session's clock."""
        self.started = self.factory.clock.seconds()
        self.peer = peer_text(self.transport.getPeer())
        if self.factory.draining is not None:
            # Admitted after the server began to stop: refused as a greeting.
            self._shut_down()
            return
        super().connectionMade()  # type: ignore[no-untyped-call]  # Twisted's SMTP: the greeting
        self.transport.registerProducer(OutputGate(self), True)
        self._deadline = self.factory.clock.callLater(
            self.factory.settings.max_session_time, self._session_expired
        )

    def handshakeCompleted(self) -> None:
        """STARTTLS's handshake is over (counted; Twisted's SMTP needs nothing)."""
        self._handshaken = True
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.handshake(self.factory.service, True)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        metrics = self.factory.metrics
        if metrics is not None and self.startedTLS and not self._handshaken:
            metrics.handshake(self.factory.service, False)
        self._gone = True
        if self.ended is None and not reason.check(error.ConnectionDone):
            self.ended = "TLS failed" if reason.check(SSL.Error) else "connection lost"
        log_summary(log, receiver_summary(self, self.factory.clock.seconds()))
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted's SMTP
        self._drop_spool()
        self._reader = None
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        self.factory.session_closed(self)

    def reply(self, code: int, text: str) -> None:
        """
        Send one reply line.  Permanent refusals count towards
        :attr:`ReceiverSettings.max_errors` over SMTP (the MTA on LMTP is
        trusted); temporary ones, like 452 for too many recipients, do not
        (those count as commands without mail).
        """
        self._write(reply_line(code, text))
        self._counters.replied(code)

    def sendLine(self, line: bytes) -> None:
        """Twisted's own replies (the greeting) take the same way as ours, in order."""
        self._write(line + b"\r\n")

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """A reply of one or more lines, one line of ``message`` each."""
        for line in reply_lines(code, message):
            self.sendLine(line)

    def _write(self, data: bytes) -> None:
        if self._silenced:
            return
        if self._replies is None:
            write_now(self.transport, data)
            return
        self._replies += data
        if len(self._replies) >= REPLY_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._replies:
            data = bytes(self._replies)
            self._replies.clear()
            write_now(self.transport, data)

    def _run_batch(self, data: bytes) -> None:
        """Run ``data``; the replies it makes go out together at the end."""
        if self._replies is not None:  # re-entered from a command that answered at once
            self._process(data)
            return
        self._replies = bytearray()
        try:
            self._process(data)
        finally:
            self._flush()
            self._replies = None

    def _check_errors(self) -> None:
        """Close a session that only errs, between replies, never inside one group."""
        if self._counters.too_many_errors() and not self.transport.disconnecting:
            self._close(b"421 4.7.0 Too many errors, closing\r\n", "too many errors")

    def _close(self, last: bytes = b"", ended: str | None = None) -> None:
        """
        Send ``last`` and close once it is out; at once if the client does
        not read (its send buffer full), or it could hold the connection for
        ever.  The output gate is unregistered first: it would hold it too.
        ``ended`` is how the summary line says the session ended.
        """
        self.ended = self.ended or ended
        if last:
            self._write(last)
        self._flush()
        self.transport.unregisterProducer()
        if self.output_paused:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # Input: commands one at a time, DATA in chunks

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()  # type: ignore[no-untyped-call]  # Twisted's TimeoutMixin
        self._discard = False
        if self._blocked():
            self._hold(data)
            return
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        self._run_batch(data)

    def _process(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and not self.transport.disconnecting:
            if self._blocked():
                self._hold(data[pos:])
                return
            if self._reader is not None:
                rest = self._reader.feed(data[pos:] if pos else data)
                if self._reader.overflow:
                    # Too big: nothing more is kept, and the disk is freed
                    # now rather than at the end.
                    self._drop_spool()
                if rest is None:
                    return
                data, pos, end = rest, 0, len(rest)
                self._run(self._end_of_data)
                continue
            newline = data.find(b"\r\n", pos)
            if newline < 0:
                self._buffer = data[pos:]
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._line_too_long()
                return
            if newline - pos > MAX_COMMAND_LINE:
                self._line_too_long()
                return
            line = data[pos:newline]
            pos = newline + 2
            if self._draining and self._drained_between_transactions():
                return
            self._command(line)
            if self._pending is None:
                self._check_errors()
            if self._discard:
                return

    def _blocked(self) -> bool:
        """Input waits: for a command's answer from the disk, or for the client to read."""
        return self._pending is not None or self.output_paused

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_size += len(data)
        self._set_reading(False)
        if self._held_size > MAX_HELD:
            self._close(b"421 4.7.0 Too much pipelined input, closing\r\n", "too much input")

    def _set_reading(self, reading: bool) -> None:
        if reading != self._reading and not self.transport.disconnecting:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def output_resumed(self) -> None:
        """Nothing waits any more: run the input held meanwhile, then read on."""
        if self._blocked() or self.transport.disconnecting:
            return
        held, self._held, self._held_size = b"".join(self._held), [], 0
        if held:
            data, self._buffer = self._buffer + held, b""
            self._run_batch(data)
        if not self._blocked():
            self._set_reading(True)

    def _run(self, handler: Callable[..., Any], *args: Any) -> None:
        """Call a command handler; if it answers later, hold input until it has."""
        try:
            result = handler(*args)
        except Exception:
            log.failure("SMTP command failed")
            self.reply(451, "4.3.0 Internal error, try again later")
            self._reset_transaction()
            return
        if isinstance(result, Deferred) and not result.called:
            self._pending = result
            result.addErrback(self._internal_error)
            result.addBoth(self._resume)
        elif isinstance(result, Deferred):
            result.addErrback(self._internal_error)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("SMTP command failed", failure)
        self.reply(451, "4.3.0 Internal error, try again later")
        self._reset_transaction()

    def _resume(self, _: object) -> None:
        self._pending = None
        if self._expired:
            self._session_expired()
            return
        if self._cut_when_answered:
            self._shut_down()
            return
        if self._draining and self._drained_between_transactions():
            return
        self._check_errors()
        self.output_resumed()

    def _command(self, line: bytes) -> None:
        verb, rest = split_command(line)
        method = self.VERBS.get(verb)
        handler = None if method is None else getattr(self, method)
        if (handler is None or verb in JUNK_COMMANDS) and self._too_much_junk():
            return
        if not verb:
            self.reply(500, "5.5.2 Syntax error")
        elif handler is None:
            self.reply(500, "5.5.1 Command unrecognized")
        else:
            self._run(handler, rest)

    def _too_much_junk(self) -> bool:
        """Count one command that moves no mail; close the session past the limit."""
        if not self._counters.junk_command():
            return False
        log.info(
            "Closing a session from {peer}: too many commands without mail",
            peer=peer_text(self.transport.getPeer()),
        )
        self._close(b"421 4.7.0 Too many commands without mail, closing\r\n", "too much junk")
        return True

    def _session_expired(self) -> None:
        """
        :attr:`ReceiverSettings.max_session_time` is over: a 421 and a close,
        at once (inside DATA too: the sender keeps the message and retries),
        but never while a delivery is under way, which must get its answer.
        """
        self._deadline = None
        if self.transport.disconnecting:
            return
        if self._pending is not None:
            self._expired = True
            return
        log.info(
            "Closing a session from {peer}: it lasted too long",
            peer=peer_text(self.transport.getPeer()),
        )
        self._close(b"421 4.4.2 " + self.host + b" Session too long, closing\r\n", "too long")

    # Stopping the server (see popserv.server.drain)

    def drain_start(self) -> bool:
        """
        The server stops.  With no mail transaction under way, a 421 and a
        close at once: the client (an MTA, or a mail client submitting)
        keeps its mail and tries again.  In a transaction, the session goes
        on, and closes with a 421 as soon as its message is answered.
        """
        self._draining = True
        return self._drained_between_transactions()

    def _drained_between_transactions(self) -> bool:
        if self._gone or self.transport.disconnecting or self.started is None:
            return False
        if self._reader is not None or self._pending is not None or self._from is not None:
            return False
        self._shut_down()
        return True

    def drain_cut(self) -> bool:
        """
        The grace is over: a 421 and a close, inside DATA too (the message
        is dropped unanswered, and the sender retries).  A command waiting
        on the disk, a delivery above all, is answered first: cut, a stored
        message would be delivered again when the sender retries.
        """
        if self._gone or self.transport.disconnecting:
            return False
        if self._pending is not None:
            self._cut_when_answered = True
            # A delivery has its message: it finishes.  A RCPT's quota look
            # does not: the transaction it is part of is cut.
            return self._from is not None
        self._shut_down()
        return True

    def drain_abort(self) -> None:
        """Told to close but still connected (the client does not read): abort."""
        if not self._gone and self._pending is None:
            self.ended = self.ended or SHUT_DOWN_BY_SERVER
            self.transport.abortConnection()

    def _shut_down(self) -> None:
        """421 and close; a message being read is dropped, and nothing more is said."""
        self._reader = None
        self._drop_spool()
        self._close(SHUTTING_DOWN, SHUT_DOWN_BY_SERVER)
        self._silenced = True

    def _line_too_long(self) -> None:
        self.reply(500, "5.5.2 Line too long")
        self._close(ended="line too long")

    def _set_timeout(self, seconds: float) -> None:
        self.setTimeout(seconds)  # type: ignore[no-untyped-call]  # Twisted's TimeoutMixin

    def timeoutConnection(self) -> None:
        self._close(b"421 4.4.2 " + self.host + b" Timeout, closing\r\n", "timeout")

    # DATA: the message's bytes, and the hooks a subclass fills

    def _receive_body(self, spool: Spool) -> None:
        """Read what follows as DATA's message, into ``spool``, until its final dot."""
        self._spool = spool
        self._reader = BodyDecoder(self.factory.settings.max_message_size, sink=spool.write)

    def _take_body(self) -> tuple[BodyDecoder, Spool | None]:
        """The decoder and spool of the message just ended (the spool None if it overflowed)."""
        reader, self._reader = self._reader, None
        spool, self._spool = self._spool, None
        assert reader is not None
        return reader, spool

    def _drop_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def _end_of_data(self) -> Deferred[None] | None:
        """DATA's message has ended: deliver it (:meth:`_take_body`) and answer."""
        raise NotImplementedError

    def _reset_transaction(self) -> None:
        """Forget the sender and recipients given so far."""
        raise NotImplementedError
