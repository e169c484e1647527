"""
What an SMTP or LMTP session's commands mean: HELO/EHLO (LHLO), MAIL, RCPT,
DATA and the rest, the mail transaction they build, and its delivery.

- mail only for local users of the configured domains, never relayed;
- SIZE, PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES and STARTTLS;
- a full mailbox refused at RCPT, before the message is sent;
- LMTP (RFC 2033): LHLO, and after DATA one reply per recipient.

The wire grammar is :mod:`popserv.core.smtpwire`; the connection's input,
output and time limits are :mod:`popserv.server.receiving.connection`.
Delivery runs in the reactor's thread pool through
:mod:`popserv.stores.delivery`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING, ClassVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.core.smtpwire import (
    LMTP_VERBS,
    NON_ASCII,
    SMTP_VERBS,
    UNSUPPORTED_PARAMETER,
    Refused,
    ehlo_extensions,
    extension_lines,
    mail_size,
    parse_mail,
    parse_path,
    parse_rcpt,
    trace_helo,
)
from popserv.core.wire import loggable
from popserv.server.receiving.connection import ReceiverConnection, peer_text
from popserv.stores.delivery import (
    DeliveryError,
    LookupFailed,
    MailboxFull,
    MessageTooBig,
    Recipient,
    StorageFailed,
    has_control,
    received_field,
    trace_header,
)

if TYPE_CHECKING:
    from popserv.server.receiving.factory import ReceiverFactory

log = Logger()


class ReceiverProtocol(ReceiverConnection):
    """One ESMTP session with a mail client or another server."""

    #: The ``with`` protocol of Received fields (RFC 3848), without the S for TLS.
    protocol_name = "ESMTP"
    VERBS: ClassVar[dict[bytes, str]] = {verb: f"cmd_{verb.decode()}" for verb in SMTP_VERBS}

    def __init__(self, factory: ReceiverFactory) -> None:
        super().__init__(factory)
        self._greeted = False
        self._extended = False
        self._declared_size = 0
        self._recipients: list[Recipient] = []

    # The session's words

    def greeting(self) -> bytes:
        return self.host + b" " + self.protocol_name.encode() + b" popserv"

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return ehlo_extensions(
            self.factory.settings.max_message_size,
            starttls=self.canStartTLS and not self.startedTLS,
        )

    # Commands

    def cmd_HELO(self, rest: bytes) -> None:
        self._hello(rest, extended=False)

    def cmd_EHLO(self, rest: bytes) -> None:
        self._hello(rest, extended=True)

    def _hello(self, rest: bytes, *, extended: bool) -> None:
        if not rest:
            self.reply(501, "5.5.4 Say who you are")
            return
        peer = peer_text(self.transport.getPeer())
        self._helo = (rest, peer.encode())
        self._greeted = True
        self._extended = extended
        self._reset_transaction()
        hello = self.host + b" Hello " + peer.encode()
        if extended:
            self.sendCode(250, b"\n".join([hello, *extension_lines(self.extensions())]))
        else:
            self.sendCode(250, hello)

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
        arguments = parse_mail(rest)
        if arguments is None:
            self.reply(501, "5.5.2 Syntax: MAIL FROM:<address>")
            return
        path, parameters = arguments
        address = self._address(path, "5.1.7 Bad sender address syntax")
        if address is None:
            return
        try:
            declared = mail_size(
                parameters,
                extended=self._extended,
                max_size=self.factory.settings.max_message_size,
            )
        except Refused as e:
            self.reply(e.reply.code, e.reply.text)
            return
        self._from = address
        self._declared_size = declared
        self._recipients = []
        self.reply(250, "2.1.0 Sender OK")

    def cmd_RCPT(self, rest: bytes) -> Deferred[None] | None:
        self.tally.rcpt_commands += 1
        if self._from is None:
            self.reply(503, "5.5.1 Need MAIL before RCPT")
            return None
        if not rest.isascii():
            self.reply(553, NON_ASCII)
            return None
        arguments = parse_rcpt(rest)
        if arguments is None:
            self.reply(501, "5.5.2 Syntax: RCPT TO:<address>")
            return None
        path, parameters = arguments
        if parameters:
            self.reply(UNSUPPORTED_PARAMETER.code, UNSUPPORTED_PARAMETER.text)
            return None
        if len(self._recipients) >= self.factory.settings.max_recipients:
            if self._too_much_junk():
                return None
            self.reply(452, "4.5.3 Too many recipients")
            return None
        address = self._address(path, "5.1.3 Bad recipient address syntax")
        if not address:
            if address == "":
                self.reply(501, "5.1.3 Bad recipient address syntax")
            return None
        try:
            found = self.factory.resolve(address, self.transport.getPeer(), self.transport)
        except DeliveryError as e:
            self._unknown_recipient(e, address)
            return None
        if isinstance(found, Deferred):  # looked up in a database, in a thread
            return found.addCallbacks(self._found, self._not_found, errbackArgs=(address,))
        return self._found(found)

    def _unknown_recipient(self, error: DeliveryError, address: str) -> None:
        log.info(
            "Refused recipient {address}: {reason}",
            address=loggable(address, 128),
            reason=error.text,
        )
        self.refuse(error)

    def _not_found(self, failure: Failure, address: str) -> None:
        if not failure.check(DeliveryError):
            log.failure("Looking up {address} failed", failure, address=loggable(address, 128))
        error = failure.value if isinstance(failure.value, DeliveryError) else LookupFailed()
        self._unknown_recipient(error, address)

    def _found(self, recipient: Recipient) -> Deferred[None] | None:
        if recipient.quota.unlimited:
            self._accept(recipient)
            return None
        # Quota: refuse at once when the mailbox is full, or when the SIZE
        # the client declared would not fit.
        room = self.factory.directory.store.check_room(recipient, self._declared_size)
        return room.addCallbacks(
            lambda _: self._accept(recipient), lambda f: self._refuse_recipient(f, recipient)
        )

    def _accept(self, recipient: Recipient) -> None:
        self._recipients.append(recipient)
        self.tally.recipients += 1
        self.reply(250, "2.1.5 Recipient OK")

    def _refuse_recipient(self, failure: Failure, recipient: Recipient) -> None:
        if not failure.check(DeliveryError):
            log.failure("Quota check for {user} failed", failure, user=loggable(recipient.user))
        error = failure.value if isinstance(failure.value, DeliveryError) else StorageFailed()
        if isinstance(error, MailboxFull):
            log.info("Refused recipient {user}: mailbox full", user=loggable(recipient.user))
            metrics = self.factory.metrics
            if metrics is not None:
                metrics.quota_refused(self.factory.service, "rcpt")
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
        address = parse_path(path)
        if address is None:
            self.reply(501, bad)
        return address

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
        self._receive_body(spool)
        self._set_timeout(max(self.timeout, 600.0))
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _end_of_data(self) -> Deferred[None] | None:
        reader, spool = self._take_body()
        self._set_timeout(self.timeout)
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
        started = perf_counter()
        try:
            copies = [(r, self._trace(sender, r, queue_id)) for r in recipients]
            work = self.factory.directory.store.deliver(
                copies, message, atomic=not self.per_recipient_replies
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
            metrics = self.factory.metrics
            if metrics is not None:
                metrics.delivery_took(self.factory.service, perf_counter() - started)
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
            self._answer(recipients, results, reader.size)

        return work.addErrback(failed).addCallback(delivered)

    def _answer(
        self,
        recipients: Sequence[Recipient],
        results: Sequence[DeliveryError | None],
        size: int = 0,
    ) -> None:
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.delivered(self.factory.service, results)
        if any(result is None for result in results):
            self._counters.message_taken()
            self.tally.accepted += 1
            self.tally.octets += size
        else:
            self.tally.refused += 1
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
        helo = trace_helo(self._helo[0])
        name = self.protocol_name + ("S" if self.startedTLS else "")
        received = received_field(
            helo=helo,
            peer=peer_text(self.transport.getPeer()),
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
        self._close(ended="QUIT")

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
    VERBS: ClassVar[dict[bytes, str]] = {verb: f"cmd_{verb.decode()}" for verb in LMTP_VERBS}

    def cmd_HELO(self, rest: bytes) -> None:
        self.reply(500, "5.5.1 Use LHLO")

    cmd_EHLO = cmd_HELO

    def cmd_LHLO(self, rest: bytes) -> None:
        self._hello(rest, extended=True)
