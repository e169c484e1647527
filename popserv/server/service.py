"""
Build the popserv service from options: what ``twistd popserv`` runs, and
what an application embedding popserv may call.  The pieces it puts
together: the POP3 factory and the SMTP/LMTP receiver (made here), the
listeners (:mod:`popserv.server.listeners`), the certificate reloader
(:mod:`popserv.server.certreload`) and the start-up checks
(:mod:`popserv.server.startchecks`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.usage import UsageError

from popserv.logins.accounts import AccountSettings
from popserv.logins.database import Database
from popserv.logins.oauth import TokenChecker
from popserv.logins.passwords import PasswdFile, PasswdFileChecker
from popserv.logins.sasl import EXTERNAL, MECHANISMS, external_mechanism
from popserv.logins.sqlaccounts import SQLAccounts
from popserv.server.admission import IAdmission, LocalAdmission
from popserv.server.autoconfigweb import autoconfig_setup, serve_autoconfig
from popserv.server.capabilities import enabled_mechanisms
from popserv.server.certreload import CertificateReloader
from popserv.server.configure import (
    DEFAULT_POP3_ENDPOINT,
    LISTENER_OPTIONS,
    database_accounts,
    database_store,
    endpoint,
    layout_of,
    pop3_endpoints,
    service_owner,
    tls_server,
    token_validator,
    username_rules,
)
from popserv.server.control import LocalSessions, WorkerSessions, control_service
from popserv.server.drain import SHUTDOWN_GRACE, DrainingService
from popserv.server.factory import POP3Factory
from popserv.server.firstrun import admin_command, announce, bootstrap, make_data_dir
from popserv.server.health import Health
from popserv.server.lastlogin import LAST_LOGIN_FILE, LastLogins, LastLoginWriter
from popserv.server.listeners import Listener, PopservService
from popserv.server.metrics import Metrics, serve_metrics
from popserv.server.policy import Policy
from popserv.server.receiving import ReceiverFactory, ReceiverSettings
from popserv.server.sharedadmission import SharedAdmission
from popserv.server.startchecks import (
    AccessCheck,
    TmpCleaner,
    ensure_fd_limit,
    warn_about_cleartext,
)
from popserv.server.startup import StartupError, exit_on_startup_error, strerror

# The plugin's ServiceMaker reads Options from the module it names (this one).
from popserv.server.tap import Options
from popserv.server.tls import ALPN_SMTP, TLSServer
from popserv.stores.delivery import Directory, MaildirStore
from popserv.stores.layout import Layout, Owner
from popserv.stores.maildir.locktable import table_in
from popserv.stores.maildir.uidls import DOVECOT
from popserv.stores.postgres.delivery import PostgresStore
from popserv.stores.postgres.mailbox import LEASE_SECONDS
from popserv.stores.postgres.realm import PostgresRealm
from popserv.stores.quota import Quota
from popserv.stores.realm import AccountRealm, MaildirRealm

if TYPE_CHECKING:
    from popserv.server.workers.admission import RemoteAdmission

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
    options: Mapping[str, Any],
    reactor: Any = None,
    *,
    owner: Owner | None = None,
    admission: IAdmission | None = None,
) -> POP3Factory:
    """
    The POP3 factory for ``options`` (the keys of :class:`popserv.server.tap.Options`).
    ``owner`` (uid, gid) is who will run it, when root starts it and drops
    privileges: files made on the first start are given to that user.
    ``admission`` answers for the limits (a worker's
    :class:`~popserv.server.workers.RemoteAdmission`); by default the
    factory's own, for this process alone.
    """
    if reactor is None:
        from twisted.internet import reactor
    layout = layout_of(options)
    hostname = options.get("hostname") or socket.getfqdn()
    rules = username_rules(options)
    accounts: PasswdFile | SQLAccounts | None = database_accounts(options, reactor)
    if accounts is not None:
        # In PostgreSQL: no password file, no first account to make.
        try:
            make_data_dir(layout, owner)
        except OSError as e:
            why = strerror(e)
            raise StartupError(f"--data {options['data']}: cannot create it: {why}") from None
    elif options.get("passwd"):
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
                f"--data {options['data']}: cannot create {where}: {strerror(e)}"
            ) from None
        if account is not None:
            announce(account, (options.get("pop3") or [DEFAULT_POP3_ENDPOINT])[0], command)
    if accounts is None:
        accounts = PasswdFile(layout.passwd_path, rules)
    defaults = AccountSettings(
        options.get("login-delay", 0), options.get("expire"), options.get("max-listed", 0)
    )
    store = database_store(options, accounts)
    realm = _realm(options, layout, accounts, defaults, store=store, reactor=reactor)
    masters = options.get("master-user") or []
    passwords = PasswdFileChecker(accounts, reactor=reactor, masters=masters)
    checkers: list[Any] = [passwords]
    validator = options["oauth"] if "oauth" in options else token_validator(options)
    if validator is not None:
        checkers.append(TokenChecker(validator, accounts.rules))
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
    if admission is None and store is not None:
        # Mail in the database: the failed-login penalty is every node's.
        admission = SharedAdmission(policy, reactor, store)
    tls = options["tls"] if "tls" in options else tls_server(options)
    rule = options.get("external-identity") or "cn"
    mechanisms = [external_mechanism(rule) if m is EXTERNAL else m for m in MECHANISMS]
    factory = POP3Factory(
        portal,
        policy,
        clock=reactor,
        announce=realm.announcement,
        tls=tls,
        sasl=mechanisms,
        accounts=passwords,
        admission=admission,
    )
    factory.last_logins = LastLogins.load(layout.data_dir / LAST_LOGIN_FILE)
    return factory


def _realm(
    options: Mapping[str, Any],
    layout: Layout,
    accounts: PasswdFile | SQLAccounts,
    defaults: AccountSettings,
    *,
    store: Database | None,
    reactor: Any,
) -> AccountRealm:
    """The realm of ``--store``: maildrops in ``store`` (a database), or Maildirs."""
    shared = options.get("maildrop-lock", "shared") == "shared"
    if store is not None:
        lease = options.get("maildrop-lease") or LEASE_SECONDS
        return PostgresRealm(store, accounts, defaults, reactor=reactor, lease=lease, shared=shared)
    return MaildirRealm(
        layout,
        accounts,
        defaults,
        reactor=reactor,
        uidl_format=options.get("uidl-format") or DOVECOT,
        shared=shared,
        locks=table_in(layout.data_dir),
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
    # The POP3 server's accounts (a database's pool is shared), or the file's.
    checker = pop3.accounts
    accounts = (
        checker.passwd
        if isinstance(checker, PasswdFileChecker)
        else PasswdFile(layout.passwd_path, username_rules(options))
    )
    directory = Directory(
        layout,
        accounts,
        domains,
        quota=quota,
        delimiter=options.get("recipient-delimiter", "+") or "",
        store=(
            PostgresStore(accounts.database)
            if options.get("store") == "postgresql" and isinstance(accounts, SQLAccounts)
            else MaildirStore(layout, reactor)
        ),
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

    plain = pop3_endpoints(options)
    # Every endpoint made before anything is created on disk (the first
    # start's account): a systemd socket that was not passed is found here.
    endpoints = {}
    for option in LISTENER_OPTIONS:
        for description in plain if option == "pop3" else options.get(option) or []:
            try:
                endpoints[option, description] = endpoint(option, description, reactor)
            except UsageError as e:
                raise StartupError(str(e)) from None
    workers = options.get("workers") or 1
    if workers > 1:
        return _make_parent(options, workers, plain, endpoints, reactor)
    factory = make_factory(options, reactor, owner=service_owner(options))
    top = PopservService(options, reactor, grace=shutdown_grace(options))
    layout = layout_of(options)
    receiving = bool(options.get("smtp") or options.get("lmtp"))
    children: list[Service] = [
        control_service(layout, LocalSessions(factory, username_rules(options)), reactor),
        *_tmp_cleaner(options, layout, reactor),
        AccessCheck(
            layout,
            layout.data_dir / SPOOL_DIR if receiving else None,
            passwd=not options.get("database"),
        ),
    ]
    if factory.last_logins is not None:
        children.append(LastLoginWriter(factory.last_logins, reactor))
    listeners, receivers, reloader = _serving(options, plain, factory, reactor)
    if reloader is not None:
        children.append(reloader)
    for child in children:
        child.setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's Service
    for option, description, listener in listeners:
        top.serve(Listener(endpoints[option, description], listener, description))
    top.drained = [factory, *receivers]
    serve_metrics(
        options.get("metrics"),
        top,
        pop3=factory,
        receivers=receivers,
        reactor=reactor,
        listener=Listener,
        health=Health(
            reactor,
            _database_of(factory),
            lambda: None if factory.draining is None else "the server is stopping",
        ),
    )
    _serve_autoconfig(options, top, factory, reactor)
    warn_about_cleartext(plain, factory)
    ensure_fd_limit(factory.policy.max_connections)
    return top


def _serve_autoconfig(
    options: Mapping[str, Any], top: MultiService, factory: POP3Factory, reactor: Any
) -> None:
    """``--autoconfig``: the clients' set-up, in one process or the workers' parent."""
    serve_autoconfig(
        options.get("autoconfig"),
        top,
        setup=lambda: autoconfig_setup(options),
        encrypted=lambda: any(m.name == "CRAM-MD5" for m in enabled_mechanisms(factory)),
        reactor=reactor,
        listener=Listener,
    )


def _database_of(factory: POP3Factory) -> Database | None:
    """The database whose cluster state ``factory``'s admission keeps (None: no database)."""
    admission = factory.admission
    return admission.database if isinstance(admission, SharedAdmission) else None


def _supervisor_health(supervisor: Any) -> str | None:
    if not supervisor.running:
        return "the server is stopping"
    if not supervisor.workers:
        return "no worker is running"
    return None


def shutdown_grace(options: Mapping[str, Any]) -> float:
    """``--shutdown-grace``: the seconds sessions have to finish when the server stops."""
    grace = options.get("shutdown-grace")
    return SHUTDOWN_GRACE if grace is None else float(grace)


def _tmp_cleaner(options: Mapping[str, Any], layout: Layout, reactor: Any) -> list[Service]:
    """
    The start-up clean-up of every user's ``tmp/``: the password file's users.
    A database's cannot be listed (its query finds one user); none then.
    """
    if options.get("database"):
        return []
    return [TmpCleaner(layout, PasswdFile(layout.passwd_path, username_rules(options)), reactor)]


def _serving(
    options: Mapping[str, Any], plain: list[str], factory: POP3Factory, reactor: Any
) -> tuple[list[tuple[str, str, Any]], list[ReceiverFactory], CertificateReloader | None]:
    """
    What serves each listener (option, description, factory), the
    receivers, and the certificate reloader when there is TLS: the same in
    one process and in each worker.
    """
    listeners: list[tuple[str, str, Any]] = [("pop3", d, factory) for d in plain]
    receivers = []
    for key, lmtp in (("smtp", False), ("lmtp", True)):
        if options.get(key):
            receiver = make_receiver(options, factory, lmtp=lmtp, reactor=reactor)
            receivers.append(receiver)
            listeners += [(key, d, receiver) for d in options[key]]
    reloader = None
    if factory.tls is not None:
        secure = TLSMemoryBIOFactory(factory.tls, False, factory)
        listeners += [("pop3s", d, secure) for d in options.get("pop3s") or []]
        interval = options.get("tls-reload-interval") or 60.0
        others = [r.tls for r in receivers if r.tls is not None]
        reloader = CertificateReloader(factory.tls, interval, reactor, others)
    return listeners, receivers, reloader


def _make_parent(
    options: Mapping[str, Any],
    workers: int,
    plain: list[str],
    endpoints: Mapping[tuple[str, str], Any],
    reactor: Any,
) -> MultiService:
    """
    ``--workers N``, N >= 2: the parent, which binds the listeners, keeps N
    workers serving them, and holds the admission they share; it serves no
    session itself.
    """
    from popserv.server.workers.supervisor import WorkerSupervisor

    arguments = getattr(options, "arguments", None)
    if arguments is None:
        raise StartupError("--workers needs the twistd popserv command line")
    # Made here as in one process: the first start's account, the
    # certificates and the options are checked once, before any worker
    # starts; its admission is the one every worker asks.
    factory = make_factory(options, reactor, owner=service_owner(options))
    top = PopservService(options, reactor)
    layout = layout_of(options)
    receiving = bool(options.get("smtp") or options.get("lmtp"))
    listeners = [
        (option, description, endpoints[option, description])
        for option in LISTENER_OPTIONS
        for description in (plain if option == "pop3" else options.get(option) or [])
    ]
    supervisor = WorkerSupervisor(
        workers,
        listeners,
        factory.admission,
        arguments,
        reactor,
        options=options,
        grace=shutdown_grace(options),
    )
    children: list[Service] = [
        control_service(layout, WorkerSessions(supervisor.links, username_rules(options)), reactor),
        *_tmp_cleaner(options, layout, reactor),
        AccessCheck(
            layout,
            layout.data_dir / SPOOL_DIR if receiving else None,
            passwd=not options.get("database"),
        ),
        supervisor,
    ]
    if options.get("metrics"):
        children.append(_worker_metrics(options["metrics"], supervisor, factory, reactor))
    for child in children:
        child.setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's Service
    _serve_autoconfig(options, top, factory, reactor)
    warn_about_cleartext(plain, factory)
    return top


def _worker_metrics(
    description: str, supervisor: Any, factory: POP3Factory, reactor: Any
) -> Service:
    """The parent's ``--metrics`` listener: the sum of its workers' metrics."""
    from popserv.server.workers.metrics import WorkerMetrics

    try:
        where = endpoint("metrics", description, reactor)
    except UsageError as e:
        raise StartupError(str(e)) from None
    admission = factory.admission if isinstance(factory.admission, LocalAdmission) else None
    metrics = WorkerMetrics(
        supervisor.links, admission, lambda: len(supervisor.workers), lambda: supervisor.exits
    )
    health = Health(reactor, _database_of(factory), lambda: _supervisor_health(supervisor))
    return Listener(where, metrics.site(health), description)


def worker_service(
    options: Mapping[str, Any],
    adopted: Sequence[Mapping[str, Any]],
    admission: RemoteAdmission,
    reactor: Any,
) -> DrainingService:
    """
    A worker's services (:mod:`popserv.server.workers.child`): what one
    process would run, on the listening sockets ``adopted`` from the parent
    (:meth:`popserv.server.workers.supervisor.Bound.describe`), with the
    parent's ``admission``; stopping, its sessions drain as in one process.
    No control socket and no metrics page of its own: it answers the
    parent's questions (``who``, ``kick``, ``metrics``) over
    ``admission``'s channel, and the parent serves them.
    """
    from popserv.server.proxied import ProxyHeaderFactory
    from popserv.server.workers.adopted import AdoptedListener, SharedLastLogins

    plain = pop3_endpoints(options)
    factory = make_factory(options, reactor, admission=admission)
    top = DrainingService(shutdown_grace(options), reactor)
    children: list[Service] = []
    if factory.last_logins is not None:
        factory.last_logins = SharedLastLogins.load(layout_of(options).data_dir / LAST_LOGIN_FILE)
        children.append(LastLoginWriter(factory.last_logins, reactor))
    listeners, receivers, reloader = _serving(options, plain, factory, reactor)
    if reloader is not None:
        children.append(reloader)
    LocalSessions(factory, username_rules(options)).answer_for(admission)
    if options.get("metrics"):
        from popserv.server.workers.metrics import families

        metrics = Metrics(reactor)
        metrics.watch_pop3(factory)
        for receiver in receivers:
            metrics.watch_receiver(receiver)
        admission.answer("metrics", lambda _: families(metrics))
    for child in children:
        child.setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's Service
    serving = {(option, description): listener for option, description, listener in listeners}
    for socket_ in adopted:
        listener = serving[socket_["option"], socket_["description"]]
        if socket_["proxied"]:
            listener = ProxyHeaderFactory(listener, reactor)
        top.serve(
            AdoptedListener(
                socket_["fd"], socket_["family"], listener, socket_["description"], reactor
            )
        )
    top.drained = [factory, *receivers]
    ensure_fd_limit(factory.policy.max_connections)
    return top


__all__ = ["Options", "makeService", "make_factory", "make_receiver", "worker_service"]
