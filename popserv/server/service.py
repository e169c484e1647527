"""
Build the popserv service from options: what ``twistd popserv`` runs, and
what an application embedding popserv may call.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from popserv.core.errors import InvalidUsername
from popserv.logins.accounts import AccountSettings
from popserv.logins.oauth import TokenChecker
from popserv.logins.passwords import PasswdFile, PasswdFileChecker
from popserv.logins.sasl import EXTERNAL, MECHANISMS, external_mechanism
from popserv.server.factory import POP3Factory
from popserv.server.firstrun import admin_command, announce, bootstrap
from popserv.server.metrics import serve_metrics
from popserv.server.policy import Policy
from popserv.server.receiving import ReceiverFactory, ReceiverSettings
from popserv.server.tap import (
    DEFAULT_POP3_ENDPOINT,
    EXIT_CANNOT_LISTEN,
    LISTENER_OPTIONS,
    Options,
    StartupError,
    endpoint,
    exit_at_startup,
    exit_on_startup_error,
    remove_pidfile,
    tls_server,
    token_validator,
    under_twistd,
    username_rules,
)
from popserv.server.tls import ALPN_SMTP, TLSServer
from popserv.stores.delivery import Directory
from popserv.stores.layout import Layout, Owner
from popserv.stores.maildir import clean_tmp
from popserv.stores.maildir.uidls import DOVECOT
from popserv.stores.quota import Quota
from popserv.stores.realm import MaildirRealm

log = Logger()

#: twistd options that set a Policy field of the same meaning.
LIMIT_OPTIONS = {
    "idle-timeout": "idle_timeout",
    "login-timeout": "login_timeout",
    "auth-failure-delay": "auth_failure_delay",
    "auth-failure-max-delay": "auth_failure_max_delay",
    "max-auth-failures": "max_auth_failures",
    "max-connections": "max_connections",
    "max-connections-per-ip": "max_connections_per_ip",
    "ipv6-prefix": "ipv6_prefix",
    "max-user-sessions": "max_user_sessions",
    "max-line-length": "max_line_length",
    "max-auth-line-length": "max_auth_line_length",
    "max-queued-commands": "max_queued_commands",
    "max-bad-commands": "max_bad_commands",
    "trusted-network": "trusted_networks",
}


def make_factory(
    options: Mapping[str, Any], reactor: Any = None, *, owner: Owner | None = None
) -> POP3Factory:
    """
    The POP3 factory for ``options`` (the keys of :class:`popserv.server.tap.Options`).
    ``owner`` (uid, gid) is who will run it, when root starts it and drops
    privileges: files made on the first start are given to that user.
    """
    if reactor is None:
        from twisted.internet import reactor
    layout = layout_of(options)
    hostname = options.get("hostname") or socket.getfqdn()
    rules = username_rules(options)
    if options.get("passwd"):
        # Given by name: a typo must not start a server that fails every
        # login with [SYS/TEMP] (and, unlike DIR/passwd, it is not created).
        if not layout.passwd_path.exists():
            raise StartupError(f"--passwd {options['passwd']}: no such file")
    else:
        command = admin_command(admin_options(options))
        try:
            account = bootstrap(layout, hostname, owner, rules, command)
        except OSError as e:
            where = e.filename or layout.data_dir
            raise StartupError(
                f"--data {options['data']}: cannot create {where}: {_strerror(e)}"
            ) from None
        if account is not None:
            announce(account, (options.get("pop3") or [DEFAULT_POP3_ENDPOINT])[0], command)
    passwd = PasswdFile(layout.passwd_path, rules)
    defaults = AccountSettings(options.get("login-delay", 0), options.get("expire"))
    realm = MaildirRealm(
        layout, passwd, defaults, reactor=reactor, uidl_format=options.get("uidl-format") or DOVECOT
    )
    masters = options.get("master-user") or []
    passwords = PasswdFileChecker(passwd, reactor=reactor, masters=masters)
    checkers: list[Any] = [passwords]
    validator = options["oauth"] if "oauth" in options else token_validator(options)
    if validator is not None:
        checkers.append(TokenChecker(validator, passwd.rules))
    portal = Portal(realm, checkers)
    limits = {
        field: options[option] for option, field in LIMIT_OPTIONS.items() if option in options
    }
    policy = Policy(
        hostname=hostname,
        **limits,
        account=defaults,
        apop=options.get("apop"),
        allow_cleartext_auth=bool(options.get("allow-cleartext-auth")),
        allow_cleartext_apop=bool(options.get("allow-cleartext-apop")),
        sasl=options.get("sasl"),
    )
    tls = options["tls"] if "tls" in options else tls_server(options)
    rule = options.get("external-identity") or "cn"
    mechanisms = [external_mechanism(rule) if m is EXTERNAL else m for m in MECHANISMS]
    return POP3Factory(
        portal,
        policy,
        clock=reactor,
        announce=realm.announcement,
        tls=tls,
        sasl=mechanisms,
        accounts=passwords,
    )


#: Where the receiver spools DATA, in the data directory: on the disk that
#: holds the mail, where the system's /tmp may be a tmpfs, so memory.  The
#: dot keeps it apart from any user's Maildir (user names cannot start so).
SPOOL_DIR = ".spool"


def make_receiver(
    options: Mapping[str, Any], pop3: POP3Factory, *, lmtp: bool, reactor: Any = None
) -> ReceiverFactory:
    """
    The SMTP (or LMTP) receiver for ``options``, delivering to the Maildirs
    and users ``pop3`` serves; its TLS uses the same certificates.
    """
    if reactor is None:
        from twisted.internet import reactor
    layout = layout_of(options)
    hostname = pop3.policy.hostname
    domains = options.get("domain") or [hostname, "localhost"]
    quota = Quota(options.get("quota-bytes"), options.get("quota-messages"))
    directory = Directory(
        layout,
        PasswdFile(layout.passwd_path, username_rules(options)),
        domains,
        quota=quota,
        delimiter=options.get("recipient-delimiter", "+") or "",
    )
    settings = ReceiverSettings(
        hostname=hostname,
        max_message_size=options.get("max-message-size") or 25 * 1024 * 1024,
        spool_dir=layout.data_dir / SPOOL_DIR,
    )
    tls = TLSServer(pop3.tls.config, alpn=ALPN_SMTP) if pop3.tls is not None else None
    return ReceiverFactory(
        directory,
        settings,
        lmtp=lmtp,
        tls=tls,
        policy=pop3.policy,
        reactor=reactor,
        admission=pop3.admission,
    )


class TmpCleaner(Service):
    """
    At start, removes from every user's ``tmp/`` the deliveries a crash or
    kill left half-written (they were never visible, and never will be).
    """

    def __init__(self, layout: Layout, passwd: PasswdFile, reactor: Any) -> None:
        self.layout = layout
        self.passwd = passwd
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        pool = self._reactor.getThreadPool()
        deferToThreadPool(self._reactor, pool, self._clean).addCallbacks(
            self._cleaned, lambda f: log.failure("Cleaning tmp/ failed", f)
        )

    def _clean(self) -> int:
        removed = 0
        try:
            users = self.passwd.users()
        except OSError:
            return 0
        for entry in users:
            try:
                removed += clean_tmp(self.layout.maildir_location(entry.name))
            except (OSError, InvalidUsername):
                continue
        return removed

    def _cleaned(self, removed: int) -> None:
        if removed:
            log.info("Removed {count} unfinished deliveries from tmp/", count=removed)


def layout_of(options: Mapping[str, Any]) -> Layout:
    """Where the options say the data lives; :class:`StartupError` for a bad ``--maildir``."""
    try:
        return Layout.create(
            options["data"],
            options.get("passwd"),
            options.get("maildir"),
            follow_symlinks=bool(options.get("follow-maildir-symlinks")),
        )
    except ValueError as e:
        raise StartupError(f"--maildir {options.get('maildir')!r}: {e}") from None


def admin_options(options: Mapping[str, Any]) -> list[str]:
    """
    The options the ``popserv`` admin command needs to find the same users
    as this server: ``--data`` unless it is the default, and the name rules
    unless they are.
    """
    from popserv.stores.layout import DEFAULT_DATA_DIR

    found = []
    if options.get("data", DEFAULT_DATA_DIR) != DEFAULT_DATA_DIR:
        found += ["--data", str(options["data"])]
    if options.get("maildir"):
        found += ["--maildir", str(options["maildir"])]
    if options.get("username-case") not in (None, "fold"):
        found += ["--username-case", str(options["username-case"])]
    if options.get("allow-mixed-script-names"):
        found.append("--allow-mixed-script-names")
    return found


def _strerror(error: OSError) -> str:
    """``No such file or directory`` as ``no such file or directory``."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def service_owner(options: Any) -> Owner | None:
    """
    Who twistd will run as after binding its ports (``twistd --uid/--gid``,
    read from the twistd options above ours), when it starts as root; None
    when privileges are not dropped.
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("uid") is None or os.getuid() != 0:
        return None
    uid, gid = parent["uid"], parent.get("gid")
    if gid is None:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


class AccessCheck(Service):
    """
    At start-up, after twistd dropped privileges: says so, loudly, when this
    user cannot read the password file or create Maildirs under the data
    directory, instead of failing every login with a puzzling [SYS/PERM].
    """

    def __init__(self, layout: Layout, spool_dir: Path | None = None) -> None:
        self.layout = layout
        #: The receiver's spool directory, when SMTP or LMTP is on.
        self.spool_dir = spool_dir

    def startService(self) -> None:
        super().startService()
        for problem, owner in self._problems():
            if owner:
                log.error(
                    "{problem}: give the files to the user popserv runs as (uid {uid}), for"
                    " example chown -R that user {data}",
                    problem=problem,
                    uid=os.getuid(),
                    data=str(self.layout.data_dir),
                )
            else:
                log.error("{problem}", problem=problem)

    def problems(self) -> list[str]:
        """What this process cannot do that serving mail needs."""
        return [problem for problem, _ in self._problems()]

    def _problems(self) -> list[tuple[str, bool]]:
        """Each problem, and whether giving the files to this user would solve it."""
        # os.access and os.path answer False where pathlib would raise EACCES.
        found = []
        passwd = self.layout.passwd_path
        if not os.path.lexists(passwd) and os.access(passwd.parent, os.X_OK):
            # Not a permission problem: chown would not help.
            found.append(
                (
                    f"There is no password file {passwd}: every login fails until one"
                    " is made (popserv user add NAME)",
                    False,
                )
            )
        elif not os.access(passwd, os.R_OK):
            found.append((f"Cannot read the password file {passwd}", True))
        # The server creates a new user's Maildir in the data directory (not
        # in, say, /home for a /home/{user}/Maildir template).
        head = self.layout.maildir_template.split("{user}", 1)[0]
        parent = Path(head) if head.endswith(os.sep) else Path(head).parent
        inside = parent == self.layout.data_dir or self.layout.data_dir in parent.parents
        if inside and os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
            found.append((f"Cannot create Maildirs in {parent}", True))
        # The receiver makes its spool directory at the first DATA, and
        # answers every DATA with a 451 if it cannot.
        if self.spool_dir is not None:
            spool = self.spool_dir
            where = spool if os.path.isdir(spool) else spool.parent
            if os.path.isdir(where) and not os.access(where, os.W_OK | os.X_OK):
                found.append((f"Cannot spool incoming mail in {spool}", True))
        return found


class CertificateReloader(Service):
    """
    Reloads the TLS certificates on SIGHUP, and whenever their files change
    (checked every ``interval`` seconds), so renewals need no restart.
    ``also`` are other servers (the receiver's) built from the same files.
    """

    def __init__(
        self, tls: TLSServer, interval: float, reactor: Any, also: Sequence[TLSServer] = ()
    ) -> None:
        self.tls = tls
        self.also = tuple(also)
        self._reactor = reactor
        self._interval = interval
        self._loop = LoopingCall(self._reload_if_changed)
        self._loop.clock = reactor
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        log.info("TLS certificates for {names}", names=", ".join(self.tls.names) or "-")
        # twistd --uid drops privileges after the files were first read: say
        # so now if renewals could never be read again.
        unreadable = [str(p) for p in self.tls.paths() if not os.access(p, os.R_OK)]
        if unreadable:
            log.warn(
                "This user cannot read {files}: renewed certificates will not be picked up"
                " until a restart; make them readable (for example by a group)",
                files=", ".join(unreadable),
            )
        self._loop.start(self._interval, now=False)
        if hasattr(signal, "SIGHUP"):
            self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _reload_if_changed(self) -> None:
        if self.tls.reload_if_changed():
            for other in self.also:
                other.reload()

    def _reload(self) -> None:
        for server in (self.tls, *self.also):
            server.reload()

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._reload)


def cannot_listen(description: str, failure: Failure) -> str:
    """``cannot listen on 127.0.0.1:1110: address already in use``, from a listen failure."""
    error = failure.value
    if isinstance(error, CannotListenError):
        interface, port = error.interface, error.port
        if port is None or isinstance(port, str):  # a UNIX socket's path
            where = str(port or description)
        else:
            # Only words for the message: the port listened on every address.
            host = interface or "0.0.0.0"  # noqa: S104
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = error.socketError
    else:
        where, reason = description, error
    if isinstance(reason, OSError):
        text = _strerror(reason)
    else:
        text = str(reason) or type(reason).__name__
    return f"cannot listen on {where}: {text}"


class Listener(StreamServerEndpointService):
    """
    Listens on one endpoint; a failure to listen is a :class:`StartupError`
    (status :data:`EXIT_CANNOT_LISTEN`), never a traceback logged by a
    server that then runs with nothing listening.
    """

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        #: Told of a failure that comes after start-up (an endpoint whose
        #: listen() answers later); set by :class:`PopservService`.
        self.failed: Any = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        waiting: Deferred[Any] = self.endpoint.listen(self.factory)
        self._waitingForPort = waiting
        early: list[Failure] = []
        starting = True

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            if starting:
                early.append(failure)
            elif self.failed is not None:
                self.failed(cannot_listen(self.description, failure))
            else:
                log.critical("{line}", line=cannot_listen(self.description, failure))

        waiting.addErrback(failed)
        starting = False
        if early:
            # TCP, UNIX and systemd endpoints all fail here, synchronously.
            raise StartupError(cannot_listen(self.description, early[0]), EXIT_CANNOT_LISTEN)

    def close(self) -> Deferred[None] | None:
        """Stop listening, if listening (after another listener failed)."""
        if self._waitingForPort is None:
            return None
        closed: Deferred[None] = Deferred()
        self._waitingForPort.addCallback(lambda port: port and port.stopListening()).addBoth(
            lambda _: closed.callback(None)
        )
        return closed


class PopservService(MultiService):
    """
    What :func:`makeService` returns.  Under twistd (``exit_on_error``), a
    listener that cannot listen ends the process with one line and a
    non-zero status, instead of leaving it running with nothing listening
    (which systemd or a supervisor would take for a working server).
    """

    def __init__(self, options: object = None, reactor: Any = None) -> None:
        super().__init__()
        self._options = options
        self._reactor = reactor
        #: After a listener failed: fires when those that did start have stopped.
        self.closed: Deferred[Any] | None = None

    @property
    def exit_on_error(self) -> bool:
        return under_twistd(self._options)

    def privilegedStartService(self) -> None:
        for listener in self.listeners():
            listener.failed = self._failed_later
        try:
            super().privilegedStartService()
        except StartupError as e:
            closing = [listener.close() or succeed(None) for listener in self.listeners()]
            self.closed = DeferredList(closing)
            if not self.exit_on_error:
                raise
            exit_at_startup(self._options, e.message, e.status)

    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def _failed_later(self, message: str) -> None:
        """A listen() that failed after start-up: the same line, then stop."""
        line = f"popserv: {message}"
        log.critical("{line}", line=line)
        if not self.exit_on_error:
            return
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(line + "\n")
            stderr.flush()
        # twistd has no exit status to set, and a SystemExit raised in a
        # shutdown trigger is logged and ignored: once the services have
        # stopped, do what twistd would still do (remove its PID file) and
        # leave with the status.
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_now)
        self._reactor.stop()

    def _exit_now(self) -> None:
        remove_pidfile(self._options)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        self._exit(EXIT_CANNOT_LISTEN)

    #: How the process ends after a late listen failure (tests replace it).
    _exit = staticmethod(os._exit)


def makeService(options: Mapping[str, Any]) -> MultiService:
    """
    One listening service per ``--pop3`` and ``--pop3s`` endpoint, all
    sharing one factory; ``--pop3s`` ones speak TLS from the first byte.

    A configuration that cannot work raises :class:`StartupError` (one
    line); under ``twistd popserv`` it ends the process with that line.
    """
    with exit_on_startup_error(options):
        return _make_service(options)


def _make_service(options: Mapping[str, Any]) -> MultiService:
    from twisted.internet import reactor

    plain = options.get("pop3") or ([] if options.get("pop3s") else [DEFAULT_POP3_ENDPOINT])
    # Every endpoint made before anything is created on disk (the first
    # start's account): a systemd socket that was not passed is found here.
    endpoints = {}
    for option in LISTENER_OPTIONS:
        for description in plain if option == "pop3" else options.get(option) or []:
            try:
                endpoints[option, description] = endpoint(option, description, reactor)
            except UsageError as e:
                raise StartupError(str(e)) from None
    factory = make_factory(options, reactor, owner=service_owner(options))
    top = PopservService(options, reactor)
    layout = layout_of(options)
    passwd = PasswdFile(layout.passwd_path, username_rules(options))
    TmpCleaner(layout, passwd, reactor).setServiceParent(top)
    receiving = bool(options.get("smtp") or options.get("lmtp"))
    AccessCheck(layout, layout.data_dir / SPOOL_DIR if receiving else None).setServiceParent(top)
    listeners: list[tuple[str, str, Any]] = [("pop3", d, factory) for d in plain]
    receivers = []
    for key, lmtp in (("smtp", False), ("lmtp", True)):
        if options.get(key):
            receiver = make_receiver(options, factory, lmtp=lmtp, reactor=reactor)
            receivers.append(receiver)
            listeners += [(key, d, receiver) for d in options[key]]
    if factory.tls is not None:
        secure = TLSMemoryBIOFactory(factory.tls, False, factory)
        listeners += [("pop3s", d, secure) for d in options.get("pop3s") or []]
        interval = options.get("tls-reload-interval") or 60.0
        others = [r.tls for r in receivers if r.tls is not None]
        CertificateReloader(factory.tls, interval, reactor, others).setServiceParent(top)
    for option, description, listener in listeners:
        Listener(endpoints[option, description], listener, description).setServiceParent(top)
    serve_metrics(
        options.get("metrics"), top, pop3=factory, receivers=receivers, reactor=reactor,
        listener=Listener,
    )
    _warn_about_cleartext(plain, factory)
    ensure_fd_limit(factory.policy.max_connections)
    return top


#: File descriptors a session may hold: its socket, the Maildir lock, a message.
FDS_PER_CONNECTION = 3
#: Descriptors beside the sessions': listeners, the password file, the log, threads.
FDS_SPARE = 64


def ensure_fd_limit(max_connections: int, resource_module: Any = None) -> int:
    """
    Raise the soft limit on open files (``ulimit -n``, often 1024) to what
    ``max_connections`` sessions need, as far as the hard limit allows; warn
    when that is not enough.  Return the soft limit in force.
    """
    if resource_module is None:
        try:
            import resource as resource_module
        except ImportError:  # not on POSIX
            return -1
    needed = max_connections * FDS_PER_CONNECTION + FDS_SPARE
    soft, hard = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    if soft == resource_module.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource_module.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warn(
            "Open-file limit {soft} is too low for --max-connections {connections} (needs about"
            " {needed}): raise it (LimitNOFILE= in systemd, ulimit -n) or lower --max-connections",
            soft=soft,
            connections=max_connections,
            needed=needed,
        )
    return soft


def _warn_about_cleartext(endpoints: Sequence[str], factory: POP3Factory) -> None:
    """Say so when remote clients could connect but never log in."""
    policy = factory.policy
    if factory.tls is not None or policy.allow_cleartext_auth:
        return
    remote = [e for e in endpoints if not _loopback_only(e)]
    if remote:
        log.warn(
            "Clients connecting to {endpoints} from other hosts cannot log in: there is no"
            " TLS certificate (--tls-cert) and cleartext logins are off"
            " (--allow-cleartext-auth)",
            endpoints=", ".join(remote),
        )


def _loopback_only(endpoint: str) -> bool:
    return any(
        f"interface={host}" in endpoint.replace("\\", "")
        for host in ("127.0.0.1", "::1", "localhost")
    ) or endpoint.startswith("unix:")


__all__ = ["Options", "makeService", "make_factory", "make_receiver"]
