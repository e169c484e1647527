"""
The control socket: how ``popserv who`` and ``popserv kick`` reach a
running server.

A UNIX socket in the data directory (:data:`CONTROL_SOCKET`, mode 0600,
made by the user the server runs as), speaking AMP
(:mod:`twisted.protocols.amp`) with two commands: :class:`Who` lists the
POP3 sessions open now, :class:`Kick` ends some of them.  The server side
is :class:`ControlService`, a child of the service ``twistd popserv`` runs;
the ``popserv`` command's side is :class:`ControlClient`, a blocking client
(the command runs no reactor) that speaks the same boxes.

Only the owner gets answers: the socket's mode and the data directory's
(0700) keep others from connecting, and a connection whose peer is neither
this user nor root (``SO_PEERCRED``, where the system has it) is closed
unanswered.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from popserv.core.errors import InvalidUsername
from popserv.core.usernames import UsernameRules, loggable_username
from popserv.server.policy import peer_address
from popserv.server.protocol import POP3Protocol
from popserv.server.startup import EXIT_CANNOT_LISTEN, StartupError, strerror
from popserv.stores.layout import Layout

log = Logger()

#: The control socket's name in the data directory.
CONTROL_SOCKET = "control.sock"

#: Sessions per :class:`Who` answer.  An AMP value is at most 65,535 bytes
#: (``amp.MAX_VALUE_LENGTH``); a row is under 400 bytes even with a
#: 255-octet user name (RFC 2449's longest line bounds what USER can send),
#: so 100 rows fit with room to spare, and the client asks again for more.
WHO_PAGE = 100

#: How long the client waits for the server (seconds): it answers from
#: memory, at once, unless it is stuck.
CLIENT_TIMEOUT = 10.0

#: Longest path a UNIX socket can have (``sun_path``: 108 bytes on Linux,
#: 104 on the BSDs and macOS; the smaller, to say the same everywhere).
MAX_SOCKET_PATH = 103


def control_path(layout: Layout) -> Path:
    """Where the server of ``layout``'s data directory listens for admin commands."""
    return layout.data_dir / CONTROL_SOCKET


# The commands


class Who(amp.Command):
    """
    The POP3 sessions open now, oldest first: at most :data:`WHO_PAGE`,
    after the one that started at ``after_since`` from ``after_client``
    (the last of the previous answer).  ``more`` says whether to ask again.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"after_since", amp.Float(optional=True)),
        (b"after_client", amp.Unicode(optional=True)),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (
            b"sessions",
            amp.AmpList(
                [
                    (b"user", amp.Unicode()),
                    (b"client", amp.Unicode()),
                    (b"since", amp.Float()),
                    (b"tls", amp.Boolean()),
                    (b"state", amp.Unicode()),
                    (b"mechanism", amp.Unicode()),
                    (b"worker", amp.Integer()),
                ]
            ),
        ),
        (b"more", amp.Boolean()),
    ]


class Kick(amp.Command):
    """
    End the sessions of ``user``, or from ``address`` (an IP address, a
    network such as ``192.0.2.0/24``, or one connection's ``host:port``),
    at once and without applying their deletions; answer how many.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"user", amp.Unicode(optional=True)),
        (b"address", amp.Unicode(optional=True)),
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"kicked", amp.Integer())]
    errors: ClassVar[dict[type[Exception], bytes]] = {ValueError: b"BAD_TARGET"}


# What the commands do, on the sessions of a factory


@frozen(kw_only=True)
class SessionRow:
    """One line of ``popserv who``."""

    user: str
    client: str
    since: float
    tls: bool
    state: str
    mechanism: str
    worker: int

    @classmethod
    def of(cls, session: POP3Protocol) -> SessionRow:
        pop3 = getattr(session, "session", None)
        user = session.logged_in_as
        return cls(
            user="" if user is None else loggable_username(user),
            client=session.info.where,
            since=session.started,
            tls=session.info.secure,
            state="" if pop3 is None else pop3.state.name,
            mechanism=(pop3.mechanism or "") if pop3 is not None and user is not None else "",
            # With --workers, each worker answers for its own sessions.
            worker=os.getpid(),
        )

    def as_amp(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "client": self.client,
            "since": self.since,
            "tls": self.tls,
            "state": self.state,
            "mechanism": self.mechanism,
            "worker": self.worker,
        }


def who(
    sessions: Iterable[POP3Protocol], after: tuple[float, str] | None = None
) -> tuple[list[SessionRow], bool]:
    """
    Up to :data:`WHO_PAGE` rows, oldest first, after ``after`` (the last
    row's ``(since, client)``), and whether there are more.  Sessions that
    open between pages start later, so they come last; none is listed twice.
    """
    rows = sorted(
        (SessionRow.of(s) for s in sessions if getattr(s, "session", None) is not None),
        key=lambda row: (row.since, row.client),
    )
    if after is not None:
        rows = [row for row in rows if (row.since, row.client) > after]
    return rows[:WHO_PAGE], len(rows) > WHO_PAGE


def matching(
    sessions: Iterable[POP3Protocol],
    rules: UsernameRules,
    *,
    user: str | None = None,
    address: str | None = None,
) -> list[POP3Protocol]:
    """
    The sessions logged in as ``user`` (matched as logins match it), or
    from ``address``: an IP address, a network, or ``host:port`` as ``who``
    shows it.  :class:`ValueError` for a target that is neither.
    """
    if (user is None) == (address is None):
        raise ValueError("give a user or an address")
    if user is not None:
        try:
            wanted = rules.normalize(user)
        except InvalidUsername as e:
            raise ValueError(f"not a user name: {e.detail}") from None
        return [s for s in sessions if _user_key(s, rules) == wanted]
    assert address is not None
    network = _network(address)
    if network is None:
        # One connection, as who shows it: 192.0.2.7:50123, [2001:db8::7]:50123.
        return [s for s in sessions if s.info.where == address]
    return [s for s in sessions if _in(s, network)]


def _user_key(session: POP3Protocol, rules: UsernameRules) -> str | None:
    name = session.logged_in_as
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if name is None:
        return None
    try:
        return rules.normalize(name)
    except InvalidUsername:
        return None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(address: str) -> IPNetwork | None:
    """An address or network; None for ``host:port``; ValueError for anything else."""
    try:
        return ipaddress.ip_network(address.strip("[]"), strict=False)
    except ValueError:
        pass
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit():
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            return None
    raise ValueError(f"not an address, network or host:port: {address!r}")


def _in(session: POP3Protocol, network: IPNetwork) -> bool:
    address = peer_address(session.info.peer)
    return address is not None and address in network


# Where the sessions are: this process, or the workers


class SessionSource(Protocol):
    """The POP3 sessions ``popserv who`` lists and ``popserv kick`` ends."""

    def who(self, after: tuple[float, str] | None) -> Deferred[dict[str, Any]]:
        """A :class:`Who` answer: ``sessions`` (rows as dicts) and ``more``."""

    def kick(self, user: str | None, address: str | None, by: str) -> Deferred[int]:
        """End the matching sessions (see :func:`matching`); how many. ValueError: bad target."""


class LocalSessions:
    """The sessions of a POP3 factory in this process."""

    def __init__(self, pop3: Any, rules: UsernameRules) -> None:
        #: The POP3 factory, whose ``sessions`` are listed and kicked.
        self.pop3 = pop3
        self.rules = rules

    def who(self, after: tuple[float, str] | None) -> Deferred[dict[str, Any]]:
        return succeed(self.page(after))

    def page(self, after: tuple[float, str] | None) -> dict[str, Any]:
        rows, more = who(self.pop3.sessions, after)
        return {"sessions": [row.as_amp() for row in rows], "more": more}

    def kick(self, user: str | None, address: str | None, by: str) -> Deferred[int]:
        return maybeDeferred(self.kick_now, user, address, by)

    def kick_now(self, user: str | None, address: str | None, by: str) -> int:
        found = matching(self.pop3.sessions, self.rules, user=user, address=address)
        for session in found:
            session.kick(by)
        return len(found)

    def answer_for(self, admission: Any) -> None:
        """Answer the parent's ``who`` and ``kick`` (in a worker: ``admission`` is its link)."""
        admission.answer("who", lambda after: self.page(None if after is None else tuple(after)))
        admission.answer("kick", lambda target: self.kick_now(**target))


class WorkerSessions:
    """
    The sessions of every worker of ``twistd popserv --workers N``: the
    parent asks each (``supervisor.links()``) and merges the answers.
    """

    def __init__(self, links: Callable[[], Iterable[Any]], rules: UsernameRules) -> None:
        self.links = links
        self.rules = rules

    def who(self, after: tuple[float, str] | None) -> Deferred[dict[str, Any]]:
        async def merged() -> dict[str, Any]:
            answers = await _gathered(link.ask("who", after) for link in self.links())
            rows = sorted(
                (row for answer in answers for row in answer["sessions"]),
                key=lambda row: (row["since"], row["client"]),
            )
            more = len(rows) > WHO_PAGE or any(answer["more"] for answer in answers)
            return {"sessions": rows[:WHO_PAGE], "more": more}

        return Deferred.fromCoroutine(merged())

    def kick(self, user: str | None, address: str | None, by: str) -> Deferred[int]:
        try:
            matching((), self.rules, user=user, address=address)  # the target's check alone
        except ValueError as e:
            return fail(e)
        target = {"user": user, "address": address, "by": by}

        async def kicked() -> int:
            return sum(await _gathered(link.ask("kick", target) for link in self.links()))

        return Deferred.fromCoroutine(kicked())


async def _gathered(answers: Iterable[Deferred[Any]]) -> list[Any]:
    """Every worker's answer; one that fails (it is stopping) is left out, and logged."""
    results = await DeferredList(list(answers), consumeErrors=True)
    kept = []
    for ok, value in results:
        if ok:
            kept.append(value)
        else:
            log.warn("A worker did not answer: {why}", why=value.getErrorMessage())
    return kept


# The server side


def peer_uid(transport: Any) -> int | None:
    """The user id of a UNIX socket's peer (``SO_PEERCRED``); None where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        handle = transport.getHandle()
        # struct ucred: pid, uid, gid.
        _, uid, _ = struct.unpack("3i", handle.getsockopt(socket.SOL_SOCKET, option, 12))
    except (OSError, AttributeError, struct.error):
        return None
    return int(uid)


class ControlProtocol(amp.AMP):
    """One admin connection: answers :class:`Who` and :class:`Kick`."""

    factory: ControlFactory

    def connectionMade(self) -> None:
        uid = peer_uid(self.transport)
        if uid is not None and uid not in (0, os.getuid()):
            log.warn("Refused a control connection from uid {uid}", uid=uid)
            self.transport.abortConnection()  # type: ignore[union-attr]  # set by makeConnection
            return
        self.peer = "root" if uid == 0 else f"uid {uid}" if uid is not None else "the owner"
        super().connectionMade()  # type: ignore[no-untyped-call]  # Twisted's AMP

    def makeConnection(self, transport: Any) -> None:
        # Not AMP's: it logs every connection and its end, twice per command here.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any = None) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @Who.responder
    def who(self, after_since: float | None = None, after_client: str | None = None) -> Any:
        after = None if after_since is None else (after_since, after_client or "")
        return self.factory.sessions.who(after)

    @Kick.responder
    def kick(self, user: str | None = None, address: str | None = None) -> Any:
        target = f"user {user}" if user is not None else f"address {address}"

        def kicked(count: int) -> dict[str, int]:
            log.info(
                "Kicked {count} session(s) of {target}, asked by {who} on the control socket",
                count=count,
                target=target,
                who=self.peer,
            )
            return {"kicked": count}

        answer = self.factory.sessions.kick(user, address, f"admin ({self.peer})")
        return answer.addCallback(kicked)


class ControlFactory(Factory[ControlProtocol]):
    protocol = ControlProtocol
    noisy = False

    def __init__(self, sessions: SessionSource) -> None:
        #: The sessions listed and kicked.
        self.sessions = sessions


def probe(path: Path, timeout: float = 2.0) -> bool | None:
    """
    Whether a server answers on the UNIX socket at ``path``: True, False
    (a stale socket: connection refused), or None when there is no socket.
    """
    if not path.is_socket():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            return False
        except OSError as e:
            # EACCES: someone else's live socket; anything else: not ours to judge.
            return e.errno != errno.ENOENT
        return True


class ControlService(Service):
    """
    Listens on the control socket while the server runs.

    Before privileges are dropped it only looks: a socket that answers is
    another server on the same data directory, and this one does not
    start (taking its socket would leave that one unreachable by the
    admin tools, and two servers on one data directory is a mistake
    more often than a plan).  Once running as its own user, it removes a
    stale socket (nothing answers: a crash) and listens, mode 0600.  A
    socket that cannot be made (a path too long, no permission) is logged:
    the server serves mail without admin tools rather than not at all.
    """

    def __init__(self, path: Path, factory: ControlFactory, reactor: Any) -> None:
        self.path = path
        self.factory = factory
        self._reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's Service
        self._refuse_live()

    def _refuse_live(self) -> None:
        if probe(self.path):
            raise StartupError(
                f"another popserv serves this data directory: its control socket {self.path}"
                " answers (stop it first, or give this one its own --data)",
                EXIT_CANNOT_LISTEN,
            )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service
        try:
            self._listen()
        except OSError as e:
            log.warn(
                "No control socket, so no popserv who or kick: cannot listen on {path}: {why}",
                path=str(self.path),
                why=strerror(e),
            )
        except StartupError as e:
            log.warn("No control socket, so no popserv who or kick: {why}", why=e.message)

    def _listen(self) -> None:
        path = self.path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, "the path is too long for a UNIX socket")
        live = probe(path)
        if live:
            # Not seen before privileges were dropped: started since.
            self._refuse_live()
        if live is False:
            os.unlink(path)
            log.info("Removed a stale control socket {path}", path=str(path))
        elif os.path.lexists(path):
            raise StartupError(f"{path} is there and is not a socket: not replacing it")
        # No moment with a looser mode: the umask applies at bind() time,
        # Twisted's chmod only after it.
        old = os.umask(0o177)
        try:
            from twisted.internet.error import CannotListenError

            try:
                self.port = self._reactor.listenUNIX(str(path), self.factory, mode=0o600)
            except CannotListenError as e:
                error = e.socketError
                raise error if isinstance(error, OSError) else OSError(str(error)) from None
        finally:
            os.umask(old)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service
        port, self.port = self.port, None
        if port is not None:
            # Twisted's UNIX port removes the socket file when it closes.
            return port.stopListening()
        return None


# The client side (no reactor: the popserv command is blocking)


class ControlError(Exception):
    """The server could not be reached, or refused a command; ``str()`` is one line."""


class ControlClient:
    """
    A blocking AMP client for the control socket: :meth:`who` and
    :meth:`kick`.  The boxes are made and read by the commands' own
    argument types, so both sides agree by construction.
    """

    def __init__(self, path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = b""
        self._tag = 0
        try:
            self._sock.connect(str(path))
        except FileNotFoundError:
            self._sock.close()
            raise ControlError(
                f"no control socket at {path}: is popserv running with this --data?"
            ) from None
        except ConnectionRefusedError:
            self._sock.close()
            raise ControlError(f"nothing answers on {path}: popserv is not running") from None
        except OSError as e:
            self._sock.close()
            raise ControlError(f"cannot connect to {path}: {strerror(e)}") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def who(self) -> list[dict[str, Any]]:
        """Every session, oldest first (in pages of :data:`WHO_PAGE`)."""
        rows: list[dict[str, Any]] = []
        arguments: dict[str, Any] = {}
        while True:
            answer = self.call(Who, **arguments)
            rows += answer["sessions"]
            if not answer["more"] or not answer["sessions"]:
                return rows
            last = answer["sessions"][-1]
            arguments = {"after_since": last["since"], "after_client": last["client"]}

    def kick(self, *, user: str | None = None, address: str | None = None) -> int:
        """End the sessions of ``user`` or from ``address``; how many ended."""
        kicked: int = self.call(Kick, user=user, address=address)["kicked"]
        return kicked

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        self._tag += 1
        tag = str(self._tag).encode()
        given = {k: v for k, v in arguments.items() if v is not None}
        box = command.makeArguments(given, None)
        box[amp.COMMAND] = command.commandName
        box[amp.ASK] = tag
        try:
            self._sock.sendall(box.serialize())
            answer = self._read_box()
        except TimeoutError:
            raise ControlError(f"{self.path}: no answer in time") from None
        except OSError as e:
            raise ControlError(f"{self.path}: {strerror(e)}") from None
        if amp.ERROR in answer:
            text = answer.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
            raise ControlError(text or answer.get(amp.ERROR_CODE, b"?").decode("ascii", "replace"))
        parsed: dict[str, Any] = command.parseResponse(answer, None)
        return parsed

    def _read_box(self) -> dict[bytes, bytes]:
        """One AMP box: pairs of 16-bit-length-prefixed key and value, ended by an empty key."""
        box: dict[bytes, bytes] = {}
        while True:
            key = self._read(self._length())
            if not key:
                return box
            box[key] = self._read(self._length())

    def _length(self) -> int:
        length: int = struct.unpack("!H", self._read(2))[0]
        return length

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            data = self._sock.recv(65536)
            if not data:
                raise ControlError(f"{self.path}: the server closed the connection")
            self._buffer += data
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data


def control_service(layout: Layout, sessions: SessionSource, reactor: Any) -> Service:
    """The control socket service for a server on ``layout`` with ``sessions``."""
    return ControlService(control_path(layout), ControlFactory(sessions), reactor)


__all__ = [
    "CONTROL_SOCKET",
    "ControlClient",
    "ControlError",
    "ControlService",
    "Kick",
    "LocalSessions",
    "SessionSource",
    "Who",
    "WorkerSessions",
    "control_path",
    "control_service",
]
