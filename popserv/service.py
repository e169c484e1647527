"""
Build the popserv service from options: what ``twistd popserv`` runs, and
what an application embedding popserv may call.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping, Sequence
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
from popserv.layout import Layout
from popserv.maildir.uidls import DOVECOT
from popserv.oauth import TokenChecker
from popserv.passwords import PasswdFile, PasswdFileChecker
from popserv.policy import Policy
from popserv.protocol import POP3Factory
from popserv.realm import MaildirRealm
from popserv.sasl import EXTERNAL, MECHANISMS, external_mechanism
from popserv.tap import DEFAULT_POP3_ENDPOINT, Options, tls_server, token_validator
from popserv.tls import TLSServer

log = Logger()


def make_factory(options: Mapping[str, Any], reactor: Any = None) -> POP3Factory:
    """The POP3 factory for ``options`` (the keys of :class:`popserv.tap.Options`)."""
    if reactor is None:
        from twisted.internet import reactor
    layout = Layout.create(options["data"], options.get("passwd"), options.get("maildir"))
    hostname = options.get("hostname") or socket.getfqdn()
    if not options.get("passwd"):
        account = bootstrap(layout, hostname)
        if account is not None:
            announce(account, (options.get("pop3") or [DEFAULT_POP3_ENDPOINT])[0])
    passwd = PasswdFile(layout.passwd_path)
    defaults = AccountSettings(options.get("login-delay", 0), options.get("expire"))
    realm = MaildirRealm(
        layout, passwd, defaults, reactor=reactor, uidl_format=options.get("uidl-format") or DOVECOT
    )
    masters = options.get("master-user") or []
    checkers: list[Any] = [PasswdFileChecker(passwd, reactor=reactor, masters=masters)]
    validator = options["oauth"] if "oauth" in options else token_validator(options)
    if validator is not None:
        checkers.append(TokenChecker(validator))
    portal = Portal(realm, checkers)
    policy = Policy(
        hostname=hostname,
        idle_timeout=options.get("idle-timeout", 600.0),
        auth_failure_delay=options.get("auth-failure-delay", 2.0),
        max_auth_failures=options.get("max-auth-failures", 3),
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

    factory = make_factory(options, reactor)
    top = MultiService()
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
    return top


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
