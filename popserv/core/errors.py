"""
Failures that become ``-ERR`` responses.

Each class carries its fixed response text and, where RFC 2449 or RFC 3206
define one, its response code.  The wire only ever sees these texts, never
``str(exception)``, so nothing internal (paths, tracebacks, the client's own
bytes) reaches the client.
"""

from __future__ import annotations

import errno


class PopError(Exception):
    """A failure with a fixed ``-ERR`` text and an optional response code."""

    code: str | None = None
    text: str = "Command failed"
    #: Log detail for the operator; never sent to the client.
    detail: str

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.text)
        self.detail = detail


# Command syntax and state


class UnknownCommand(PopError):
    text = "Unknown command"


class BadState(PopError):
    text = "Command not valid in this state"


class BadArguments(PopError):
    text = "Invalid arguments"


class LineTooLong(PopError):
    text = "Line too long"


class TooManyBadCommands(PopError):
    """:attr:`Policy.max_bad_commands` bad lines in a row: the session closes."""

    text = "Too many bad commands, closing connection"


class TLSUnavailable(PopError):
    """STLS on a server with no certificate (RFC 2595 allows a plain -ERR)."""

    text = "TLS is not available on this server"


class TLSAfterUTF8(PopError):
    """RFC 6856 section 2.1: clients must not send STLS after UTF8."""

    text = "STLS is not allowed after UTF8"


class UnknownLanguage(PopError):
    text = "Invalid language"


class TLSActive(PopError):
    """A second STLS, once TLS is up (RFC 2595 section 4)."""

    text = "TLS is already active"


class TLSRequired(PopError):
    """A login that would expose a password on a connection that is not private."""

    code = "AUTH"
    text = "Cleartext logins are disabled on this connection, use TLS (STLS or port 995)"


class NoSuchMessage(PopError):
    text = "No such message"


class MessageDeleted(PopError):
    text = "Message is deleted"


class MessageGone(PopError):
    """The store lost the message between listing and reading it."""

    code = "SYS/TEMP"
    text = "Message is no longer available"


class MessageChanged(PopError):
    """
    The stored message no longer has the size the listing announced (a
    writer changed it in place, or the store's recorded size is wrong), so
    it is not sent: the client would read a message of a length LIST did
    not give.  See :mod:`popserv.core.retrieval`.
    """

    code = "SYS/TEMP"
    text = "Message changed since it was listed, try again later"


# Logins


class AuthFailed(PopError):
    code = "AUTH"
    text = "Authentication failed"


class APOPFailed(AuthFailed):
    """
    An APOP login failed: a wrong digest, or an account whose stored password
    APOP cannot check.  One text for both, so it does not tell which.
    """

    text = "Authentication failed (APOP works only for accounts set up for it; try USER/PASS)"


class APOPUnavailable(PopError):
    """APOP when the greeting offered no timestamp."""

    text = "APOP is not available on this connection, use USER/PASS or AUTH"


class InvalidUsername(PopError):
    code = "AUTH"
    text = "Authentication failed"


class MailboxInUse(PopError):
    """
    Another session holds the maildrop (``--maildrop-lock exclusive``, or
    ``popserv migrate`` copying it).  The text says so plainly, since
    clients show a refused login as a wrong password; where the other
    session is from stays out of it, as every ``-ERR`` text is fixed
    (``popserv who`` shows it to the operator).
    """

    code = "IN-USE"
    text = "Another session of this user is open; try again when it ends"


class TooManySessions(PopError):
    """
    The user already has :attr:`Policy.max_user_sessions` sessions.  IN-USE
    (RFC 2449 section 8.1.2) rather than SYS/TEMP: the login was right and
    the maildrop is busy with other sessions, which is what IN-USE tells a
    client (do not ask for the password again; close another session).
    """

    code = "IN-USE"
    text = "Too many sessions for this user, try again later"


class LoginDelayed(PopError):
    code = "LOGIN-DELAY"
    text = "Logged in too recently, try again later"


class TooManyFailures(PopError):
    code = "AUTH"
    text = "Too many failed logins, closing connection"


# Server side


class TemporaryFailure(PopError):
    code = "SYS/TEMP"
    text = "Temporary server failure, try again later"


class TooManyConnections(TemporaryFailure):
    """A connection over the server's or one client's connection limit (RFC 3206 SYS/TEMP)."""

    text = "Too many connections, try again later"


class ShuttingDown(TemporaryFailure):
    """
    The server is stopping and ends this session (SYS/TEMP, RFC 3206: the
    client may try again later, when it is back).
    """

    text = "Server shutting down"


class PermanentFailure(PopError):
    """A fault that will not clear without an administrator (RFC 3206 SYS/PERM)."""

    code = "SYS/PERM"
    text = "Mailbox is not available, please contact the administrator"


#: ``errno`` values that trying again will not cure: permissions, a file
#: where a directory should be (EEXIST from mkdir, ENOTDIR below it), a
#: read-only file system, a symlink loop, a path too long.
PERMANENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EROFS,
        errno.ELOOP,
        errno.EMLINK,
        errno.ENAMETOOLONG,
    }
)


def storage_failure(what: str, error: OSError) -> PopError:
    """The ``-ERR`` for an I/O error on a maildrop: SYS/PERM or SYS/TEMP by its errno."""
    detail = f"{what}: {error.strerror or type(error).__name__}"
    if error.errno in PERMANENT_ERRNOS:
        return PermanentFailure(detail)
    return TemporaryFailure(detail)


class InternalError(TemporaryFailure):
    text = "Internal server error"


class CommitFailed(TemporaryFailure):
    text = "Some deleted messages were not removed"
