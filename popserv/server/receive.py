"""
The optional mail receiver: ESMTP for other mail servers (``--smtp``) and
LMTP for the local MTA (``--lmtp``), delivering into the users' Maildirs.

Built on Twisted's ESMTP server class (address parsing, EHLO, STARTTLS,
timeouts), with what a receiving server on the open internet needs on top:

- mail only for local users of the configured domains, never relayed;
- SIZE, PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES and STARTTLS;
- one command at a time: while a command waits on the disk (a quota look,
  a delivery), later pipelined input is held, and reading pauses;
- DATA read in chunks with C-speed unstuffing (:class:`BodyDecoder`), so
  a 25 MB message is not 300,000 Python calls, and no line limit inside it;
- DATA written to a spool file as it arrives (:mod:`popserv.server.spool`), the
  size limit enforced on the way, so a session holds at most about 64 KiB
  of message in memory however large the message;
- LMTP (RFC 2033): LHLO, and after DATA one reply per recipient.

Delivery runs in the reactor's thread pool through :mod:`popserv.stores.delivery`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from attrs import frozen
from twisted.internet import interfaces, protocol
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.core.body import BodyDecoder
from popserv.core.wire import loggable
from popserv.server.admission import (
    IAdmission,
    ILease,
    LocalAdmission,
    RefusalLog,
    RefusedConnection,
    ask,
    client_key,
    wait_for_admission,
)
from popserv.server.coalesce import write_now
from popserv.server.policy import Policy
from popserv.server.spool import Spool
from popserv.server.tls import TLSServer
from popserv.server.transports import IStreamTransport
from popserv.stores.delivery import (
    BadAddress,
    DeliveryError,
    Directory,
    MailboxFull,
    MessageTooBig,
    Recipient,
    StorageFailed,
    check_room,
    deliver_message,
    has_control,
    received_field,
    trace_header,
)

log = Logger()

#: RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets; a
#: little slack for the ESMTP parameters clients add.
MAX_COMMAND_LINE = 2048

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

#: The refusal of a connection over the limits.
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"

#: RFC 6531 section 3.7.4.1: without SMTPUTF8, UTF-8 addresses are refused so.
NON_ASCII = "5.6.7 Non-ASCII addresses are not supported"

#: Commands that move no mail.  Past :attr:`ReceiverSettings.max_junk_commands`
#: of them (unknown commands count too) without a message taken, the session
#: is closed.  Postfix counts NOOP, VRFY, ETRN and RSET; a client can stall
#: as well with HELP or by greeting again and again.
JUNK_COMMANDS = frozenset((b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP", b"HELO", b"EHLO", b"LHLO"))


@frozen
class ReceiverSettings:
    """Limits and names of one SMTP or LMTP listener."""

    hostname: str
    #: SIZE (RFC 1870): the largest message accepted, in octets.
    max_message_size: int = 25 * 1024 * 1024
    #: RFC 5321 section 4.5.3.1.8: at least 100 must be accepted.
    max_recipients: int = 100
    #: RFC 5321 section 4.5.3.2: 5 minutes for a command, 10 for DATA blocks.
    timeout: float = 300.0
    #: Errors in one session before it is closed (Postfix: 20).
    max_errors: int = 20
    #: Commands that move no mail (:data:`JUNK_COMMANDS`, and unknown ones)
    #: before the session is closed; counted afresh after each message taken.
    #: Postfix's smtpd_junk_command_limit is 100 too.
    max_junk_commands: int = 100
    #: The longest a session may last, whatever it does, so that a client
    #: dripping NOOPs inside the idle timeout cannot hold a connection slot
    #: for ever.  30 minutes still carries a 25 MB message at 15 KB/s; MTAs
    #: reuse a connection for 5 minutes at most (Postfix's
    #: smtp_connection_reuse_time_limit: 300 s).
    max_session_time: float = 30 * 60.0
    #: Where DATA is spooled (made, mode 0700, if missing).  None is the
    #: system's temporary directory, which is often a tmpfs, so memory;
    #: ``twistd popserv`` uses ``.spool`` in the data directory.
    spool_dir: Path | None = None


@implementer(interfaces.IPushProducer)
class _OutputGate:
    """Tells the session when the transport's send buffer is full, and when it has drained."""

    def __init__(self, session: ReceiverProtocol) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session.output_blocked = True

    def resumeProducing(self) -> None:
        self._session.output_blocked = False
        self._session.unblocked()

    def stopProducing(self) -> None:
        pass


def _peer_text(peer: IAddress | None) -> str:
    """The client as Received fields show it (RFC 5321 section 4.1.3 address literals)."""
    host = getattr(peer, "host", None)
    if not host:
        return "local"
    return f"[IPv6:{host}]" if ":" in host else f"[{host}]"


class ReceiverProtocol(smtp.ESMTP):
    """One ESMTP session with a mail client or another server."""

    factory: ReceiverFactory
    #: Set by makeConnection before any method below runs (see popserv.server.transports).
    transport: IStreamTransport
    #: The ``with`` protocol of Received fields (RFC 3848), without the S for TLS.
    protocol_name = "ESMTP"
    #: The verbs this receiver answers and the method of each: a table, so
    #: that client input never names a method.
    VERBS: ClassVar[dict[bytes, str]] = {
        verb: f"cmd_{verb.decode()}"
        for verb in (
            b"HELO",
            b"EHLO",
            b"MAIL",
            b"RCPT",
            b"DATA",
            b"RSET",
            b"NOOP",
            b"VRFY",
            b"EXPN",
            b"HELP",
            b"QUIT",
            b"STARTTLS",
        )
    }

    def __init__(self, factory: ReceiverFactory) -> None:
        super().__init__(chal={}, contextFactory=factory.tls)
        self.factory = factory
        self.host = factory.settings.hostname.encode("idna")
        # SMTP.timeout is inferred int from its default; TimeoutMixin takes any seconds.
        self.timeout = factory.settings.timeout  # type: ignore[assignment]
        self._pending: Deferred[Any] | None = None
        #: The client is not reading its replies: no more commands are run
        #: (their replies would pile up here) until it does.
        self.output_blocked = False
        self._held: list[bytes] = []
        self._held_size = 0
        self._reading = True
        #: Replies held while a batch of input is run (see REPLY_BATCH).
        self._replies: bytearray | None = None
        self._reader: BodyDecoder | None = None
        #: The message of the DATA under way, until it is handed to delivery.
        self._spool: Spool | None = None
        self._greeted = False
        self._extended = False
        self._declared_size = 0
        self._recipients: list[Recipient] = []
        self._errors = 0
        self._junk = 0
        #: The end of :attr:`ReceiverSettings.max_session_time`; it came while
        #: a command was waiting on the disk (``_expired``), so the session
        #: ends once that one is answered.
        self._deadline: IDelayedCall | None = None
        self._expired = False
        self._discard = False
        #: What admission granted this connection, given back when it ends;
        #: or, until it answers, the question.
        self.lease: ILease | None = None
        self.admitting: Deferred[ILease] | None = None
        self._gone = False

    def connectionMade(self) -> None:
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
        super().connectionMade()
        self.transport.registerProducer(_OutputGate(self), True)
        self._deadline = self.factory.clock.callLater(
            self.factory.settings.max_session_time, self._session_expired
        )

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._gone = True
        super().connectionLost(reason)
        self._drop_spool()
        self._reader = None
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        self.factory.session_closed(self)

    # The session's words

    def greeting(self) -> bytes:
        return self.host + b" " + self.protocol_name.encode() + b" popserv"

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.factory.settings.max_message_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        return ext

    def reply(self, code: int, text: str) -> None:
        """
        Send one reply line.  Permanent refusals count towards
        :attr:`ReceiverSettings.max_errors` over SMTP (the MTA on LMTP is
        trusted); temporary ones, like 452 for too many recipients, do not
        (those count as commands without mail).
        """
        self._write(f"{code} {text}\r\n".encode("utf-8", "replace"))
        if code >= 500 and not self.per_recipient_replies:
            self._errors += 1

    def sendLine(self, line: bytes) -> None:
        """Twisted's own replies (EHLO's, 354) take the same way as ours, in order."""
        self._write(line + b"\r\n")

    def _write(self, data: bytes) -> None:
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
        if self._errors >= self.factory.settings.max_errors and not self.transport.disconnecting:
            self._close(b"421 4.7.0 Too many errors, closing\r\n")

    def _close(self, last: bytes = b"") -> None:
        """
        Send ``last`` and close once it is out; at once if the client does
        not read (its send buffer full), or it could hold the connection for
        ever.  The output gate is unregistered first: it would hold it too.
        """
        if last:
            self._write(last)
        self._flush()
        self.transport.unregisterProducer()
        if self.output_blocked:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # Input: commands one at a time, DATA in chunks

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
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
            self._command(line)
            if self._pending is None:
                self._check_errors()
            if self._discard:
                return

    def _blocked(self) -> bool:
        """Input waits: for a command's answer from the disk, or for the client to read."""
        return self._pending is not None or self.output_blocked

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_size += len(data)
        self._set_reading(False)
        if self._held_size > MAX_HELD:
            self._close(b"421 4.7.0 Too much pipelined input, closing\r\n")

    def _set_reading(self, reading: bool) -> None:
        if reading != self._reading and not self.transport.disconnecting:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def unblocked(self) -> None:
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
        self._check_errors()
        self.unblocked()

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.strip().partition(b" ")
        name = verb.upper()
        method = self.VERBS.get(name)
        handler = None if method is None else getattr(self, method)
        if (handler is None or name in JUNK_COMMANDS) and self._too_much_junk():
            return
        if not verb:
            self.reply(500, "5.5.2 Syntax error")
        elif handler is None:
            self.reply(500, "5.5.1 Command unrecognized")
        else:
            self._run(handler, rest.strip())

    def _too_much_junk(self) -> bool:
        """Count one command that moves no mail; close the session past the limit."""
        self._junk += 1
        if self._junk <= self.factory.settings.max_junk_commands:
            return False
        log.info(
            "Closing a session from {peer}: too many commands without mail",
            peer=_peer_text(self.transport.getPeer()),
        )
        self._close(b"421 4.7.0 Too many commands without mail, closing\r\n")
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
            peer=_peer_text(self.transport.getPeer()),
        )
        self._close(b"421 4.4.2 " + self.host + b" Session too long, closing\r\n")

    def _line_too_long(self) -> None:
        self.reply(500, "5.5.2 Line too long")
        self._close()

    def timeoutConnection(self) -> None:
        self._close(b"421 4.4.2 " + self.host + b" Timeout, closing\r\n")

    # Commands

    def cmd_HELO(self, rest: bytes) -> None:
        self._hello(rest, extended=False)

    def cmd_EHLO(self, rest: bytes) -> None:
        self._hello(rest, extended=True)

    def _hello(self, rest: bytes, *, extended: bool) -> None:
        if not rest:
            self.reply(501, "5.5.4 Say who you are")
            return
        peer = _peer_text(self.transport.getPeer())
        self._helo = (rest, peer.encode())
        self._greeted = True
        self._extended = extended
        self._reset_transaction()
        if extended:
            self.sendCode(
                250, self.host + b" Hello " + peer.encode() + b"\n" + self.listExtensions()
            )
        else:
            self.sendCode(250, self.host + b" Hello " + peer.encode())

    def cmd_MAIL(self, rest: bytes) -> None:
        if not self._greeted:
            self.reply(503, "5.5.1 Send EHLO first")
            return
        if self._from is not None:
            self.reply(503, "5.5.1 Sender already given")
            return
        if not rest.isascii():
            self.reply(553, NON_ASCII)
            return
        match = self.mail_re.match(rest)
        if match is None:
            self.reply(501, "5.5.2 Syntax: MAIL FROM:<address>")
            return
        address = self._address(match["path"], "5.1.7 Bad sender address syntax")
        if address is None:
            return
        declared = 0
        for parameter in (match["opts"] or b"").split():
            key, _, value = parameter.partition(b"=")
            key = key.upper()
            if not self._extended:
                self.reply(555, "5.5.4 Parameters need EHLO")
                return
            if key == b"SIZE" and value.isdigit() and len(value) <= 20:
                declared = int(value)
            elif key == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME"):
                pass
            else:
                self.reply(555, "5.5.4 Unsupported parameter")
                return
        if declared > self.factory.settings.max_message_size:
            self.reply(552, "5.3.4 Message size exceeds fixed maximum message size")
            return
        self._from = address
        self._declared_size = declared
        self._recipients = []
        self.reply(250, "2.1.0 Sender OK")

    def cmd_RCPT(self, rest: bytes) -> Deferred[None] | None:
        if self._from is None:
            self.reply(503, "5.5.1 Need MAIL before RCPT")
            return None
        if not rest.isascii():
            self.reply(553, NON_ASCII)
            return None
        match = self.rcpt_re.match(rest)
        if match is None:
            self.reply(501, "5.5.2 Syntax: RCPT TO:<address>")
            return None
        if match["opts"]:
            self.reply(555, "5.5.4 Unsupported parameter")
            return None
        if len(self._recipients) >= self.factory.settings.max_recipients:
            if self._too_much_junk():
                return None
            self.reply(452, "4.5.3 Too many recipients")
            return None
        address = self._address(match["path"], "5.1.3 Bad recipient address syntax")
        if not address:
            if address == "":
                self.reply(501, "5.1.3 Bad recipient address syntax")
            return None
        try:
            recipient = self.factory.resolve(address, self.transport.getPeer())
        except DeliveryError as e:
            log.info(
                "Refused recipient {address}: {reason}",
                address=loggable(address, 128),
                reason=e.text,
            )
            self.refuse(e)
            return None
        if recipient.quota.unlimited:
            self._accept(recipient)
            return None
        # Quota: refuse at once when the mailbox is full, or when the SIZE
        # the client declared would not fit.
        room = self.factory.in_thread(check_room, recipient, self._declared_size)
        return room.addCallbacks(
            lambda _: self._accept(recipient), lambda f: self._refuse_recipient(f, recipient)
        )

    def _accept(self, recipient: Recipient) -> None:
        self._recipients.append(recipient)
        self.reply(250, "2.1.5 Recipient OK")

    def _refuse_recipient(self, failure: Failure, recipient: Recipient) -> None:
        if not failure.check(DeliveryError):
            log.failure("Quota check for {user} failed", failure, user=loggable(recipient.user))
        error = failure.value if isinstance(failure.value, DeliveryError) else StorageFailed()
        if isinstance(error, MailboxFull):
            log.info("Refused recipient {user}: mailbox full", user=loggable(recipient.user))
        self.refuse(error)

    def refuse(self, error: DeliveryError) -> None:
        """Answer with a delivery error's fixed reply."""
        self.reply(error.reply, f"{error.status} {error.text}")

    def _address(self, path: bytes, bad: str) -> str | None:
        """The address in a MAIL or RCPT path (``""`` for ``<>``); None after replying."""
        # A CR in a quoted local part would become a header field of its own
        # in Return-Path or Delivered-To: refused before anything else.
        if has_control(path.decode("latin-1")):
            self.reply(501, bad)
            return None
        try:
            address = smtp.Address(path, b"")
        except smtp.AddressError:
            self.reply(501, bad)
            return None
        local = address.local.decode("ascii")
        domain = address.domain.decode("ascii") if address.domain else ""
        return f"{local}@{domain}" if domain else local

    def cmd_DATA(self, rest: bytes) -> None:
        if rest:
            self.reply(501, "5.5.4 DATA takes no parameters")
            return
        if self._from is None:
            self.reply(503, "5.5.1 Need MAIL before DATA")
            return
        if not self._recipients:
            self.reply(554, "5.5.1 No valid recipients")
            return
        try:
            spool = self.factory.open_spool()
        except OSError as e:
            log.error(
                "Cannot make a spool file in {directory}: {error}",
                directory=str(self.factory.settings.spool_dir or "the temporary directory"),
                error=e.strerror or str(e),
            )
            self.refuse(DeliveryError())
            return
        self._spool = spool
        self._reader = BodyDecoder(self.factory.settings.max_message_size, sink=spool.write)
        self.setTimeout(max(self.timeout, 600.0))
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _drop_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def _end_of_data(self) -> Deferred[None] | None:
        reader, self._reader = self._reader, None
        spool, self._spool = self._spool, None
        assert reader is not None
        self.setTimeout(self.timeout)
        recipients, sender = self._recipients, self._from or ""
        self._reset_transaction()
        if reader.overflow:
            self._answer(recipients, [MessageTooBig()] * len(recipients))
            return None
        assert spool is not None
        try:
            message = spool.finish()
        except OSError as e:
            spool.close()
            log.error("Cannot write a spool file: {error}", error=e.strerror or str(e))
            self._answer(recipients, [StorageFailed()] * len(recipients))
            return None
        queue_id = secrets.token_hex(6).upper()
        try:
            copies = [(r, self._trace(sender, r, queue_id)) for r in recipients]
            work = self.factory.in_thread(
                deliver_message,
                copies,
                message,
                atomic=not self.per_recipient_replies,
            )
        except BaseException:
            spool.close()
            raise

        def delivery_over(result: object) -> object:
            # The thread reads the spool: it is closed (and its space freed)
            # only now, even if the client has gone meanwhile.
            spool.close()
            return result

        work.addBoth(delivery_over)

        def failed(failure: Failure) -> list[DeliveryError | None]:
            log.failure("Delivery of message {id} failed", failure, id=queue_id)
            return [DeliveryError()] * len(copies)

        def delivered(results: list[DeliveryError | None]) -> None:
            stored = sum(1 for r in results if r is None)
            log.info(
                "Message {id}: {size} octets from {sender}, stored for {stored} of"
                " {count} recipients",
                id=queue_id,
                size=reader.size,
                sender=loggable(sender or "<>", 128),
                stored=stored,
                count=len(results),
            )
            self._answer(recipients, results)

        return work.addErrback(failed).addCallback(delivered)

    #: LMTP answers DATA once per recipient; SMTP once for all.
    per_recipient_replies = False

    def _answer(
        self, recipients: Sequence[Recipient], results: Sequence[DeliveryError | None]
    ) -> None:
        if any(result is None for result in results):
            self._junk = 0  # a message was taken: the client is doing real work
        if self.per_recipient_replies:
            for result in results:
                self._reply_result(result)
        else:
            self._reply_result(next((r for r in results if r is not None), None))

    def _reply_result(self, result: DeliveryError | None) -> None:
        if result is None:
            self.reply(250, "2.0.0 Message accepted for delivery")
        else:
            self.refuse(result)

    def _trace(self, sender: str, recipient: Recipient, queue_id: str) -> bytes:
        assert self._helo is not None  # SMTP takes no MAIL before HELO
        helo = (self._helo[0] or b"").decode("ascii", "replace")
        helo = "".join(c for c in helo if "!" <= c <= "~")[:100] or "unknown"
        name = self.protocol_name + ("S" if self.startedTLS else "")
        received = received_field(
            helo=helo,
            peer=_peer_text(self.transport.getPeer()),
            host=self.factory.settings.hostname,
            protocol=name,
            queue_id=queue_id,
            recipient=recipient.address,
        )
        return trace_header(sender, recipient.address, received)

    def cmd_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(250, "2.0.0 OK")

    def _reset_transaction(self) -> None:
        self._from = None
        self._declared_size = 0
        self._recipients = []

    def cmd_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0 OK")

    def cmd_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.5.2 Cannot VRFY user, but will accept message")

    def cmd_EXPN(self, rest: bytes) -> None:
        self.reply(502, "5.5.1 EXPN not available")

    def cmd_HELP(self, rest: bytes) -> None:
        self.reply(214, "2.0.0 See RFC 5321")

    def cmd_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0 Bye")
        self._close()

    def cmd_STARTTLS(self, rest: bytes) -> None:
        """
        STARTTLS (RFC 3207).  Whatever the client sent after the command in
        clear is thrown away, and everything learned before is forgotten.
        """
        if rest:
            self.reply(501, "5.5.4 STARTTLS takes no parameters")
            return
        if self.startedTLS:
            self.reply(503, "5.5.1 TLS already active")
            return
        if not self.canStartTLS:
            self.reply(454, "4.7.0 TLS not available")
            return
        self._discard = True
        self._buffer = b""
        self._greeted = False
        self._reset_transaction()
        self.reply(220, "2.0.0 Ready to start TLS")
        self._flush()  # in clear, before TLS starts
        assert self.ctx is not None  # canStartTLS: there is a context
        self.transport.startTLS(self.ctx)
        self.startedTLS = True


class LMTPProtocol(ReceiverProtocol):
    """One LMTP session (RFC 2033) with the local MTA."""

    protocol_name = "LMTP"
    per_recipient_replies = True
    VERBS: ClassVar[dict[bytes, str]] = {**ReceiverProtocol.VERBS, b"LHLO": "cmd_LHLO"}

    def cmd_HELO(self, rest: bytes) -> None:
        self.reply(500, "5.5.1 Use LHLO")

    cmd_EHLO = cmd_HELO

    def cmd_LHLO(self, rest: bytes) -> None:
        self._hello(rest, extended=True)


class ReceiverFactory(protocol.ServerFactory):
    """
    Makes SMTP (or, with ``lmtp``, LMTP) sessions that deliver through
    ``directory``, within the connection limits of ``policy`` (the POP3
    ones: in all, and per client IP or IPv6 network, trusted ones exempt).
    ``clock`` times the session limit (default: ``reactor``).
    """

    def __init__(
        self,
        directory: Directory,
        settings: ReceiverSettings,
        *,
        lmtp: bool = False,
        tls: TLSServer | None = None,
        policy: Policy | None = None,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
        admission: IAdmission | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        self.directory = directory
        self.settings = settings
        self.lmtp = lmtp
        self.tls = tls
        self.policy = policy or Policy(hostname=settings.hostname)
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        #: Connection limits, shared with POP3 when the service gives both one.
        self.admission: IAdmission = admission or LocalAdmission(self.policy, self.clock)
        self.service = "lmtp" if lmtp else "smtp"
        self._refusals = RefusalLog(self.clock, self.service.upper())
        #: Sessions open now.
        self.sessions = 0

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol:
        admitted = ask(self.admission, self.service, client_key(self.policy, addr))
        if admitted.refused is not None:
            self._refusals.refused(_peer_text(addr), admitted.refused)
            return RefusedConnection(TOO_MANY)
        session = (LMTPProtocol if self.lmtp else ReceiverProtocol)(self)
        session.lease, session.admitting = admitted.lease, admitted.pending
        self.sessions += 1
        return session

    def session_closed(self, session: ReceiverProtocol) -> None:
        self.sessions -= 1
        lease, session.lease = session.lease, None
        if lease is not None:
            lease.release()

    def resolve(self, address: str, peer: IAddress) -> Recipient:
        """
        The local recipient for ``address``.  Over LMTP the MTA has routed
        the mail already, so any domain is taken; over SMTP only ours, and
        a bare local part only from a local client.
        """
        if not address:
            raise BadAddress("empty")
        if self.lmtp:
            return self.directory.resolve(address, any_domain=True)
        # RFC 5321 section 4.5.1: "postmaster" alone must be accepted from anyone.
        local = isinstance(peer, UNIXAddress) or self.policy.is_local(peer)
        return self.directory.resolve(address, bare=local or address.lower() == "postmaster")

    def open_spool(self) -> Spool:
        """A new spool file for one message (raises OSError)."""
        return Spool.open(self.settings.spool_dir)

    def in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        reactor: Any = self.reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)
