"""
The seams of popserv: what a maildrop store must provide.

An embedding application plugs its own store in by giving the POP3 factory
a ``twisted.cred`` portal whose realm answers ``requestAvatar(..., IMailbox)``
with an object providing :class:`IMailbox`.  Everything else (the protocol,
timeouts, TLS, limits) comes from popserv.

The interface is shaped for large maildrops and for asynchronous back ends:

- one call, :meth:`IMailbox.listing`, returns every message's size and
  unique id at once (no call per message);
- :meth:`IMailbox.open_message` gives a readable binary stream, which the
  server reads in chunks, so no message is held in memory whole;
- :meth:`IMailbox.commit` applies all deletions of a session in one call,
  in the UPDATE state after ``QUIT``;
- :meth:`IMailbox.close` always runs when the session ends, however it ends,
  and releases the maildrop.

Every method may return its result directly or as a ``Deferred``.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from attrs import field, frozen
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    import attrs
    from twisted.internet.defer import Deferred


class PortalLike(Protocol):
    """
    What the POP3 factory needs of a portal: ``twisted.cred.portal.Portal``
    or any object with its two public methods (an application's own login
    service, say).  Only these are called; a Portal's checkers are never read.
    """

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred[Any]: ...

    def listCredentialsInterfaces(self) -> list[Any]: ...


class MessageStream(Protocol):
    """A message opened for reading: a binary file-like object."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ChunkStream(Protocol):
    """A message read a chunk at a time without blocking: see :class:`IChunkSource`."""

    def read(self, size: int, /) -> Deferred[bytes]: ...

    def close(self) -> None: ...


_Column = TypeVar("_Column", bound=Sized | None)


def _same_length(instance: Listing, attribute: attrs.Attribute[_Column], value: _Column) -> None:
    # Generic, so that attrs keeps each column's own type for its field.
    if value is not None and len(value) != len(instance.uids):
        raise ValueError("every Listing column must have one entry per message")


@frozen
class Listing:
    """
    The messages of a maildrop as of the moment it was opened, in maildrop order.

    Columns rather than an object per message, so that a 100,000-message
    maildrop costs little memory: the caller may pass arrays or tuples.

    ``sizes`` are the exact octets ``RETR`` sends for each message with CRLF
    line ends and before byte-stuffing; ``RETR`` sends exactly that many or
    fails (see :mod:`popserv.core.retrieval`).  ``exact_sizes=False`` says they
    are only what the store reports (``twisted.mail``'s stored sizes, see
    :mod:`popserv.stores.compat`): messages are then sent as they are, unchecked.
    ``uids`` are unique ids for ``UIDL``: stable across sessions, 1 to 70
    characters in the range 0x21-0x7E.  ``received`` (delivery times,
    seconds since the epoch) and ``seen`` (retrieved in an earlier session)
    are optional and only needed for the EXPIRE policy.
    """

    uids: Sequence[str]
    sizes: Sequence[int] = field(validator=_same_length)
    received: Sequence[float] | None = field(default=None, validator=_same_length)
    seen: Sequence[bool] | None = field(default=None, validator=_same_length)
    exact_sizes: bool = field(default=True, kw_only=True)

    def __len__(self) -> int:
        return len(self.uids)


class IMailbox(Interface):
    """
    One user's maildrop, opened (and locked) for one POP3 session.

    Message indexes are 0-based positions in :meth:`listing`; the protocol
    turns them into the 1-based numbers clients see.
    """

    def listing() -> Listing | Deferred[Listing]:
        """
        Return (or fire a ``Deferred`` with) the :class:`Listing` of all messages.

        Called once, right after login.  Mail delivered later belongs to the
        next session.
        """

    def open_message(
        index: int,
    ) -> MessageStream | ChunkStream | Deferred[MessageStream] | Deferred[ChunkStream]:
        """
        Return (or fire a ``Deferred`` with) a readable binary stream of one
        message: a file-like object read on the reactor thread (a local
        file), or an :class:`IChunkSource` for a store whose reads would block
        (a database).

        The stored bytes may use LF or CRLF line ends; the server converts
        them.  Fail with :class:`popserv.core.errors.MessageGone` if the message
        vanished meanwhile, or a :class:`popserv.core.errors.TemporaryFailure`.
        """

    def commit(deleted: Sequence[int], retrieved: Sequence[int]) -> Deferred[None] | None:
        """
        Apply the session's changes, in the UPDATE state after ``QUIT``.

        Remove the ``deleted`` messages; remember that the ``retrieved`` ones
        were downloaded (a store may mark them as seen, or ignore this).
        Fail with :class:`popserv.core.errors.TemporaryFailure` if some deletions
        could not be done.  Not called when the connection drops.
        """

    def close() -> None:
        """
        Release the maildrop (its lock, open files).  Always called, once.
        """


class IChunkSource(Interface):
    """
    A message that :meth:`IMailbox.open_message` gives for a store whose
    reads would block the reactor (a database over the network): read a
    chunk at a time, each read a ``Deferred``, so RETR streams a message of
    any size without holding it whole and without waiting on the store.
    """

    def read(size: int) -> Deferred[bytes]:
        """Fire with up to ``size`` octets of the message, ``b""`` at its end."""

    def close() -> None:
        """The message is no longer read (its end, or the connection gone)."""


class IAccountSettings(Interface):
    """
    Per-user policy a mailbox may carry, for CAPA, the listing and UPDATE.

    A mailbox that does not provide it gets the server-wide settings.

    It may also have ``max_listed`` (int): the session then shows only the
    newest that many messages, numbered from 1, and leaves the others
    untouched; 0 shows them all.  Optional, and so not an attribute of the
    interface (``verifyObject`` passes a mailbox written before it): one
    without it gets the server's ``--max-listed``.
    """

    login_delay = Attribute("Minimum seconds between two logins of this user (int).")
    expire_days = Attribute(
        "Days a retrieved message may stay on the server, or None for never (int | None)."
    )


#: Login kinds a secret may or may not allow (see :class:`ISecretInventory`).
SECRET_KINDS = ("apop", "cram-md5", "scram-sha-1", "scram-sha-256")


class ISecretInventory(Interface):
    """
    A checker that can tell how many of its accounts hold a secret that a
    given kind of login can check.

    Challenge-response logins (APOP, CRAM-MD5, SCRAM) need the password in
    a form the server can read back or keys derived for them; an account
    with only an argon2id hash cannot pass them.  The server uses this to
    decide what to offer, which matters in practice: curl uses APOP whenever
    the greeting carries a timestamp, and CRAM-MD5 whenever it is listed,
    and cannot fall back.
    """

    def coverage(kind: str) -> str:
        """
        ``"all"``, ``"some"`` or ``"none"``: how many accounts could log in
        with ``kind``, one of :data:`SECRET_KINDS`.  No accounts is ``"none"``.
        """


class IScramKeySource(Interface):
    """
    Where SCRAM finds a user's keys in the middle of an exchange (the salt
    and iteration count go to the client before its proof).  The checker
    that verifies ``IScramCredentials`` usually provides it.
    """

    def scram_keys(username: str, hash_name: str) -> object:
        """
        The user's ``popserv.logins.passwords.scram.ScramKeys`` for ``hash_name``
        (``SHA-1``/``SHA-256``), or None when there is no such user or no
        usable secret; directly or as a Deferred.  A source that matches
        names loosely (case, NFKC) should rather give decoy keys
        (``ScramKeys.decoy``) salted by the name as it matches it: the
        exchange's own decoys are salted by the name as the client spelt it,
        so salts that agree across spellings would tell known names apart.
        """


class ITokenValidator(Interface):
    """
    Judges OAuth 2.0 bearer tokens (SASL OAUTHBEARER and XOAUTH2).

    Plug one in with ``popserv.logins.oauth.TokenChecker(validator)`` in the portal;
    ``popserv.logins.oauth.JWTValidator`` and ``CallableValidator`` ship.
    """

    def validate(token: str, user: str | None) -> str | Deferred[str]:
        """
        The user name ``token`` is valid for (str, or a Deferred of it), or
        raise / fail with ``twisted.cred.error.UnauthorizedLogin``.  ``user``
        is the one the client named, if any; the checker compares them.
        """


class ISessionInfo(Interface):
    """
    What a realm or checker may learn about the connection a login comes from.

    Passed as the ``mind`` of ``Portal.login``.
    """

    peer = Attribute("The client's address (an IAddress).")
    secure = Attribute("True when the connection is encrypted with TLS (or STLS was accepted).")
    local = Attribute("True when the client is on a local network (loopback by default).")
    tls = Attribute(
        "The popserv.server.tls.TLSInfo of the completed handshake (version, cipher, verified"
        " client certificate, channel bindings), or None."
    )
    end = Attribute(
        "A callable taking a reason (str) that ends the session at once, as a dropped"
        " connection (marked deletions not applied), for a store that can no longer serve"
        " it: a lease on the maildrop that could not be renewed.  May be None."
    )
