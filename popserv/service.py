"""
Build the popserv service from options: what ``twistd popserv`` runs, and
what an application embedding popserv may call.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from popserv.accounts import AccountSettings
from popserv.firstrun import announce, bootstrap
from popserv.layout import Layout, Owner
from popserv.oauth import TokenChecker
from popserv.passwords import PasswdFile, PasswdFileChecker
from popserv.policy import Policy
from popserv.protocol import POP3Factory
from popserv.realm import MaildirRealm
from popserv.sasl import EXTERNAL, MECHANISMS, external_mechanism
from popserv.tap import DEFAULT_POP3_ENDPOINT, Options, tls_server, token_validator
from popserv.tls import TLSServer

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
    "trusted-network": "trusted_networks",
}


def make_factory(
    options: Mapping[str, Any], reactor: Any = None, *, owner: Owner | None = None
) -> POP3Factory:
    """
    The POP3 factory for ``options`` (the keys of :class:`popserv.tap.Options`).
    ``owner`` (uid, gid) is who will run it, when root starts it and drops
    privileges: files made on the first start are given to that user.
    """
    if reactor is None:
        from twisted.internet import reactor
    layout = layout_of(options)
    hostname = options.get("hostname") or socket.getfqdn()
    if not options.get("passwd"):
        account = bootstrap(layout, hostname, owner)
        if account is not None:
            announce(account, (options.get("pop3") or [DEFAULT_POP3_ENDPOINT])[0])
    passwd = PasswdFile(layout.passwd_path)
    defaults = AccountSettings(options.get("login-delay", 0), options.get("expire"))
    realm = MaildirRealm(layout, passwd, defaults, reactor=reactor)
    masters = options.get("master-user") or []
    checkers: list[Any] = [PasswdFileChecker(passwd, reactor=reactor, masters=masters)]
    validator = options["oauth"] if "oauth" in options else token_validator(options)
    if validator is not None:
        checkers.append(TokenChecker(validator))
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
        portal, policy, clock=reactor, announce=realm.announcement, tls=tls, sasl=mechanisms
    )


def layout_of(options: Mapping[str, Any]) -> Layout:
    """Where the options say the data lives."""
    return Layout.create(options["data"], options.get("passwd"), options.get("maildir"))


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

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def startService(self) -> None:
        super().startService()
        for problem in self.problems():
            log.error(
                "{problem}: give the files to the user popserv runs as (uid {uid}), for"
                " example chown -R that user {data}",
                problem=problem,
                uid=os.getuid(),
                data=str(self.layout.data_dir),
            )

    def problems(self) -> list[str]:
        """What this process cannot do that serving mail needs."""
        # os.access and os.path answer False where pathlib would raise EACCES.
        found = []
        passwd = self.layout.passwd_path
        if not os.access(passwd, os.R_OK):
            found.append(f"Cannot read the password file {passwd}")
        # The server creates a new user's Maildir in the data directory (not
        # in, say, /home for a /home/{user}/Maildir template).
        head = self.layout.maildir_template.split("{user}", 1)[0]
        parent = Path(head) if head.endswith(os.sep) else Path(head).parent
        inside = parent == self.layout.data_dir or self.layout.data_dir in parent.parents
        if inside and os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
            found.append(f"Cannot create Maildirs in {parent}")
        return found


class CertificateReloader(Service):
    """
    Reloads the TLS certificates on SIGHUP, and whenever their files change
    (checked every ``interval`` seconds), so renewals need no restart.
    """

    def __init__(self, tls: TLSServer, interval: float, reactor: Any) -> None:
        self.tls = tls
        self._reactor = reactor
        self._interval = interval
        self._loop = LoopingCall(tls.reload_if_changed)
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

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.tls.reload)


def makeService(options: Mapping[str, Any]) -> MultiService:
    """
    One listening service per ``--pop3`` and ``--pop3s`` endpoint, all
    sharing one factory; ``--pop3s`` ones speak TLS from the first byte.
    """
    from twisted.internet import reactor

    factory = make_factory(options, reactor, owner=service_owner(options))
    top = MultiService()
    AccessCheck(layout_of(options)).setServiceParent(top)
    plain = options.get("pop3") or ([] if options.get("pop3s") else [DEFAULT_POP3_ENDPOINT])
    for description in plain:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    if factory.tls is not None:
        secure = TLSMemoryBIOFactory(factory.tls, False, factory)
        for description in options.get("pop3s") or []:
            endpoint = serverFromString(reactor, description)
            StreamServerEndpointService(endpoint, secure).setServiceParent(top)
        interval = options.get("tls-reload-interval") or 60.0
        CertificateReloader(factory.tls, interval, reactor).setServiceParent(top)
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


__all__ = ["Options", "makeService", "make_factory"]
