"""
The objects the options describe, for :class:`popserv.server.tap.Options`
(to check them while parsing) and :func:`popserv.server.service.makeService`
(to build with them): endpoints, user-name rules, where the data lives, the
TLS server, the OAuth token validator, and who twistd runs as.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from popserv.core.usernames import FOLD, UsernameRules
from popserv.logins.database import MAX_CONNECTIONS, Database, DatabaseUnavailable
from popserv.logins.oauth import JWTValidator
from popserv.logins.sqlaccounts import DEFAULT_QUERY, SQLAccounts
from popserv.server.proxied import ProxyHeaderEndpoint, inner_description
from popserv.server.startup import StartupError
from popserv.server.tls import INTERMEDIATE_CIPHERS, TLSConfig, TLSServer, find_certificates
from popserv.stores.layout import Layout, Owner

#: Loopback only, on a port that needs no root: safe for a first start.
DEFAULT_POP3_ENDPOINT = "tcp:1110:interface=127.0.0.1"

#: The options that name endpoints to listen on.
LISTENER_OPTIONS = ("pop3", "pop3s", "smtp", "lmtp")

log = Logger()


def pop3_endpoints(options: Mapping[str, Any]) -> list[str]:
    """
    The plain POP3 listeners: those ``--pop3`` gave, or the default one when
    neither ``--pop3`` nor ``--pop3s`` did (as ``Options`` fills it in, for
    options an application builds by hand).
    """
    return list(options.get("pop3") or ([] if options.get("pop3s") else [DEFAULT_POP3_ENDPOINT]))


def endpoint(option: str, description: str, reactor: Any = None) -> Any:
    """
    The server endpoint ``description`` names (nothing listens yet), or a
    usage error naming ``--option``: an unknown type (``tpc:110``), a
    missing or impossible port, a systemd socket that was not passed.
    """
    from twisted.internet.endpoints import serverFromString

    if reactor is None:
        from twisted.internet import reactor
    inner = inner_description(description)
    if inner is not None:  # haproxy:...: the client's address from the PROXY header
        return ProxyHeaderEndpoint(endpoint(option, inner, reactor), reactor)
    try:
        made = serverFromString(reactor, description)  # type: ignore[no-untyped-call]  # Twisted's endpoints
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"--{option} {description!r}: {e}") from None
    except (IndexError, KeyError):
        raise usage.UsageError(
            f"--{option} {description!r}: systemd passed no such socket"
            " (LISTEN_FDS; start popserv from its .socket unit)"
        ) from None
    # TCP endpoints keep the port as given; the kernel would refuse it only
    # when listening (as OverflowError: port must be 0-65535).
    port = getattr(made, "_port", 0)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(f"--{option} {description!r}: the port must be 0 to 65535")
    return made


def username_rules(options: Mapping[str, Any]) -> UsernameRules:
    """How user names match: ``--username-case`` and ``--allow-mixed-script-names``."""
    return UsernameRules(
        options.get("username-case") or FOLD, bool(options.get("allow-mixed-script-names"))
    )


def database_accounts(options: Mapping[str, Any], reactor: Any) -> SQLAccounts | None:
    """
    With ``--database``: the accounts in PostgreSQL, read with
    ``--database-query`` through a pool of ``--database-connections``.
    None without it (the password file holds them).
    """
    url = options.get("database")
    if not url:
        return None
    if options.get("passwd"):
        raise StartupError("--database and --passwd: accounts come from one of them, not both")
    try:
        database = Database(url, reactor, options.get("database-connections") or MAX_CONNECTIONS)
    except ImportError:
        raise StartupError("--database needs psycopg: pip install 'popserv[postgresql]'") from None
    query = options.get("database-query") or DEFAULT_QUERY
    return SQLAccounts(database, username_rules(options), query)


def database_store(options: Mapping[str, Any], accounts: object) -> Database | None:
    """
    With ``--store postgresql``: the database the accounts are read from,
    whose schema must be this popserv's (checked now when it can be
    reached; one that cannot is only warned about, as it may come up later).
    """
    if options.get("store", "maildir") != "postgresql":
        return None
    if not isinstance(accounts, SQLAccounts):
        raise StartupError("--store postgresql needs --database")
    database = accounts.database
    from popserv.stores.postgres.schema import SchemaError, check

    try:
        with database.connect_here() as connection:
            check(connection)
    except SchemaError as e:
        raise StartupError(f"--store postgresql: {e}") from None
    except DatabaseUnavailable as e:
        log.warn("Cannot check the database's schema now: {error}", error=str(e))
    return database


def tls_server(options: Mapping[str, Any]) -> TLSServer | None:
    """
    The TLS server the options describe, certificates loaded, or None when
    there is no ``tls-cert``.  Raises :class:`CertificateError` (one line).
    """
    certs = options.get("tls-cert") or []
    if not certs:
        return None
    client_ca = options.get("tls-client-ca")
    config = TLSConfig(
        find_certificates(certs, options.get("tls-key") or []),
        min_version=options.get("tls-min-version") or "1.2",
        ciphers=options.get("tls-ciphers") or INTERMEDIATE_CIPHERS,
        client_ca=Path(client_ca) if client_ca else None,
    )
    return TLSServer(config)


def token_validator(options: Mapping[str, Any]) -> JWTValidator | None:
    """The OAuth token validator the options describe, or None; StartupError if unusable."""
    key = options.get("oauth-key")
    if not key:
        return None
    try:
        return JWTValidator.from_file(
            key,
            issuer=options.get("oauth-issuer"),
            audience=options.get("oauth-audience"),
            claim=options.get("oauth-user-claim") or "sub",
        )
    except OSError as e:
        raise StartupError(f"--oauth-key {key}: {(e.strerror or str(e)).lower()}") from None
    except ValueError as e:
        raise StartupError(f"--oauth-key {key}: {e}") from None


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
