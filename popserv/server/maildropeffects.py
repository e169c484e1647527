"""
What a POP3 connection does with the logged-in maildrop: send a message
exactly as large as the listing said, and apply QUIT's deletions.  A mixin
of :class:`~popserv.server.protocol.POP3Protocol`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.core import effects as pop3
from popserv.core import errors, wire
from popserv.core.retrieval import MessageBody
from popserv.interfaces import ChunkStream, IChunkSource, IMailbox, MessageStream
from popserv.server.maybe import resolve

if TYPE_CHECKING:
    from popserv.core.session import Session
    from popserv.server.factory import POP3Factory
    from popserv.server.protocol import SessionInfo

log = Logger()


class MaildropEffects:
    """The maildrop half of a POP3 connection."""

    factory: POP3Factory
    info: SessionInfo
    session: Session
    octets_sent: int
    _mailbox: IMailbox | None

    if TYPE_CHECKING:  # Provided by the protocol.

        def send(self, data: bytes) -> None: ...

        def stream(self, chunks: Iterator[bytes | Deferred[bytes]]) -> Deferred[None] | None: ...

        def _release(self) -> None: ...

    @property
    def mailbox(self) -> IMailbox:
        """The maildrop, in TRANSACTION (and UPDATE until it is released)."""
        assert self._mailbox is not None
        return self._mailbox

    def _do_send_message(self, effect: pop3.SendMessage) -> Deferred[int]:
        return Deferred.fromCoroutine(self._send_message(effect))

    async def _send_message(self, effect: pop3.SendMessage) -> int:
        """
        Send a message's +OK and body, exactly as large as the listing said
        (see popserv.core.retrieval): a mismatch found before the +OK is an
        -ERR, one found after it cuts the connection.
        """
        index = effect.index
        opening = self.mailbox.open_message(index)
        message: MessageStream | ChunkStream = (
            await opening if isinstance(opening, Deferred) else opening
        )
        try:
            chunked = IChunkSource.providedBy(message)
            body = MessageBody(
                None if chunked else cast(MessageStream, message),
                effect.encoder,
                effect.listed,
                self.factory.policy.chunk_size,
            )
            try:
                if chunked:
                    chunks = await _start_reading(body, cast(ChunkStream, message))
                else:
                    chunks = body.start()
            except errors.MessageChanged as e:
                self._message_changed(index, e, "refused")
                raise
            except OSError as e:
                log.failure("Reading a message failed")
                raise errors.storage_failure("cannot read a message", e) from None
            self.send(wire.ok(effect.text))
            before = self.octets_sent
            try:
                streaming = self.stream(chunks)
                if streaming is not None:
                    await streaming
            except errors.MessageChanged as e:
                self._message_changed(index, e, "connection cut")
                raise
            except (OSError, errors.TemporaryFailure):
                log.failure("Reading a message failed while sending it, connection cut")
                raise CancelledError() from None
            return self.octets_sent - before
        finally:
            # Also when the connection dropped before the stream started.
            try:
                message.close()
            except Exception:
                log.failure("Closing a message stream failed")

    def _message_changed(self, index: int, error: errors.MessageChanged, outcome: str) -> None:
        """Log a message not sent because its size is not the listed one."""
        log.warn(
            "Message {uid} for {peer} is not the size listed ({detail}): {outcome}",
            uid=wire.loggable(self.session.maildrop.listing.uids[index]),
            peer=self.info.where,
            detail=error.detail,
            outcome=outcome,
        )

    def _do_commit(self, effect: pop3.Commit) -> Deferred[None]:
        return Deferred.fromCoroutine(self._commit(effect))

    async def _commit(self, effect: pop3.Commit) -> None:
        """UPDATE: apply the deletions and release the maildrop, whatever happens."""
        try:
            await resolve(self.mailbox.commit(effect.deleted, effect.retrieved))
        except Exception:
            failure = Failure()
            if not failure.check(errors.PopError):
                log.failure("Applying deletions failed", failure)
            raise errors.CommitFailed() from None
        finally:
            self._release()


__all__ = ["MaildropEffects"]


async def _start_reading(
    body: MessageBody, message: ChunkStream
) -> Iterator[bytes | Deferred[bytes]]:
    """
    :meth:`MessageBody.start` for an :class:`~popserv.interfaces.IChunkSource`:
    the first chunk read (and, for a short message, checked) before the
    ``+OK``; then each further one a Deferred the stream waits for.
    """
    first = [body.feed(await message.read(body.chunk_size))]
    while not body.ended and body.read_octets < body.chunk_size:
        first.append(body.feed(await message.read(body.chunk_size)))
    return _chunks(body, message, first)


def _chunks(
    body: MessageBody, message: Any, first: list[bytes]
) -> Iterator[bytes | Deferred[bytes]]:
    for out in first:
        if out:
            yield out
    while not body.ended:
        chunk: Deferred[bytes] = message.read(body.chunk_size)
        yield chunk.addCallback(body.feed)
