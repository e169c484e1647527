"""
What a mail client needs to know to use this server, read from the
``twistd popserv`` options: the public host name, the ports of POP3 over
TLS (995) and of POP3 with STLS (110), the form of the login name, and the
submission server clients send through.  ``popserv dns``
(:mod:`popserv.server.dnscommand`) publishes it as SRV records, and
``--autoconfig`` (:mod:`popserv.server.autoconfig`) as Thunderbird's and
Outlook's XML; both take it from here, so they never disagree.

Nothing here listens or resolves names: it reads options, and the names of
certificates already loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen

from popserv.server.configure import pop3_endpoints
from popserv.server.proxied import inner_description

#: RFC 8314 section 3.3 (POP3S) and RFC 1939 section 3 (POP3): the ports a
#: client is told when a listener's own port does not say what clients
#: reach (a systemd socket, a listener behind HAProxy).
STANDARD_PORTS = {"pop3s": 995, "pop3": 110}

#: RFC 8314 section 3.3: submission with TLS from the first byte.  Any other
#: submission port is taken to be STARTTLS (RFC 6409: 587).
SUBMISSIONS_PORT = 465

#: Login names are the whole address (``%EMAILADDRESS%``) or its local part.
ADDRESS, LOCAL_PART = "address", "local"

#: Endpoint types whose port is the one clients connect to.
_PORTED = ("tcp", "tcp6", "ssl")

#: An RFC 1035 host name, as clients are told it (letters, digits, hyphens).
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
    re.IGNORECASE,
)


class SetupError(Exception):
    """What makes the options unusable for clients' set-up; one line, naming the option."""


@frozen
class Service:
    """One way in for clients: a port, and whether TLS starts at once (or by STLS)."""

    port: int
    implicit_tls: bool
    #: Where the port came from when it was not an endpoint's own (for notes).
    assumed: str | None = None


@frozen
class Submission:
    """The SMTP submission server clients send through (not popserv's)."""

    hostname: str
    port: int

    @property
    def implicit_tls(self) -> bool:
        return self.port == SUBMISSIONS_PORT


@frozen
class ClientSetup:
    """What clients are told: see the module."""

    hostname: str
    #: POP3S first, then POP3 with STLS; empty when there is no TLS.
    services: tuple[Service, ...]
    #: A plain ``--pop3`` listener that has no TLS to offer (no certificate).
    cleartext_only: Service | None
    login: str
    submission: Submission | None
    #: The ``--domain`` values, lower-cased; empty: any domain.
    domains: tuple[str, ...]
    #: The host names the TLS certificates serve (empty: no TLS).
    certificate_names: tuple[str, ...]

    def serves(self, domain: str) -> bool:
        """Whether clients of ``domain`` are told about this server (any, without ``--domain``)."""
        return not self.domains or domain_name(domain) in self.domains

    def login_name(self, address: str) -> str:
        """What a client with ``address`` logs in as."""
        return address if self.login == ADDRESS else address.rpartition("@")[0]

    def certificate_covers(self) -> bool:
        """Whether a certificate names :attr:`hostname` (clients check it, RFC 6125)."""
        return any(name_matches(name, self.hostname) for name in self.certificate_names)


def domain_name(domain: str) -> str:
    """A domain as compared: lower case, no trailing dot."""
    return domain.strip().rstrip(".").lower()


def is_hostname(name: str) -> bool:
    """Whether ``name`` is a host name (an RFC 1035 one; no address, no wildcard)."""
    name = name.rstrip(".")
    # RFC 3696 section 2: a top-level domain is never all digits (192.0.2.1 is no name).
    return _HOSTNAME.fullmatch(name) is not None and not name.rpartition(".")[2].isdigit()


def name_matches(pattern: str, hostname: str) -> bool:
    """Whether a certificate name (``*.example.org`` covers one label) names ``hostname``."""
    pattern, hostname = domain_name(pattern), domain_name(hostname)
    if pattern.startswith("*."):
        first, dot, rest = hostname.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == hostname


def endpoint_port(description: str) -> int | None:
    """
    The port an endpoint string listens on when clients reach that port
    (``tcp:995``, ``tcp6:port=995:interface=::``); None when it does not
    say (``systemd:``, ``unix:``) or clients reach another one
    (``haproxy:``: the public port is HAProxy's).
    """
    if inner_description(description) is not None:
        return None
    kind, _, rest = description.partition(":")
    if kind not in _PORTED:
        return None
    for argument in re.split(r"(?<!\\):", rest):
        name, equals, value = argument.partition("=")
        text = value if equals and name == "port" else None if equals else name
        if text is not None:
            return int(text) if text.isdigit() else None
    return None


def parse_public_port(value: str) -> tuple[str, int]:
    """``--public-port pop3s=995``: (the service, the port); ValueError naming what is wrong."""
    service, equals, port = value.partition("=")
    if not equals or service not in STANDARD_PORTS:
        raise ValueError(f"not SERVICE=PORT with SERVICE pop3 or pop3s: {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not a port (1 to 65535): {port!r}")
    return service, int(port)


def parse_submission(value: str) -> Submission:
    """``--submission HOST:PORT``; ValueError naming what is wrong."""
    host, colon, port = value.rpartition(":")
    if not colon:
        host, port = value, str(SUBMISSIONS_PORT)
    if not is_hostname(host):
        raise ValueError(f"not a host name: {host!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"not a port (1 to 65535): {port!r}")
    return Submission(domain_name(host), int(port))


def _service(option: str, descriptions: Sequence[str], public: Mapping[str, int]) -> Service:
    implicit = option == "pop3s"
    if option in public:
        return Service(public[option], implicit)
    description = descriptions[0]
    port = endpoint_port(description)
    if port == 0:
        raise SetupError(
            f"--{option} {description}: port 0 is chosen when listening;"
            f" give the port clients use with --public-port {option}=PORT"
        )
    if port is None:
        standard = STANDARD_PORTS[option]
        return Service(standard, implicit, f"--{option} {description}: port {standard} assumed")
    return Service(port, implicit)


def login_form(options: Mapping[str, Any]) -> str:
    """
    Whether users log in with their whole address: when the Maildir
    template splits names into ``{local}`` and ``{domain}`` (or takes
    Postfixadmin's ``{maildir}``), or accounts are in a database (whose
    accounts are addresses, as Postfixadmin's); otherwise the local part.
    """
    template = options.get("maildir") or ""
    if options.get("database") or any(
        f"{{{name}}}" in template for name in ("local", "domain", "maildir")
    ):
        return ADDRESS
    return LOCAL_PART


def public_hostname(options: Mapping[str, Any]) -> str:
    """``--hostname``, else the first name of the first certificate; SetupError when neither."""
    hostname = options.get("hostname")
    if hostname:
        if not is_hostname(hostname):
            raise SetupError(f"--hostname {hostname!r}: not a host name clients can be given")
        return domain_name(hostname)
    for name in _certificate_names(options):
        if not name.startswith("*."):
            return name
    raise SetupError(
        "no public host name: give --hostname (or a --tls-cert whose certificate names one)"
    )


def _certificate_names(options: Mapping[str, Any]) -> tuple[str, ...]:
    tls = options.get("tls")
    return tuple(tls.names) if tls is not None else ()


def client_setup(options: Mapping[str, Any]) -> ClientSetup:
    """What :class:`ClientSetup` the parsed ``options`` describe; SetupError when none can be."""
    hostname = public_hostname(options)
    public = dict(options.get("public-port") or [])
    tls = options.get("tls") is not None
    plain = pop3_endpoints(options)
    services = []
    if tls and options.get("pop3s"):
        services.append(_service("pop3s", options["pop3s"], public))
    cleartext_only = None
    if plain:
        service = _service("pop3", plain, public)
        if tls:
            services.append(service)
        else:
            cleartext_only = service
    return ClientSetup(
        hostname=hostname,
        services=tuple(services),
        cleartext_only=cleartext_only,
        login=login_form(options),
        submission=options.get("submission"),
        domains=tuple(domain_name(d) for d in options.get("domain") or []),
        certificate_names=_certificate_names(options),
    )


__all__ = [
    "ADDRESS",
    "LOCAL_PART",
    "STANDARD_PORTS",
    "ClientSetup",
    "Service",
    "SetupError",
    "Submission",
    "client_setup",
    "domain_name",
    "endpoint_port",
    "is_hostname",
    "name_matches",
    "parse_public_port",
    "parse_submission",
]
