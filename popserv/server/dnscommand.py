"""
``popserv dns DOMAIN [twistd popserv options]``: the DNS records a mail
domain served by this configuration needs, as zone-file lines.

- RFC 6186 SRV records, so clients find the POP3 server from the address
  alone: ``_pop3s._tcp`` (POP3 over TLS) preferred to ``_pop3._tcp``
  (STLS), as RFC 8314 section 5.1 asks, by a lower priority; a service not
  offered is published with the target ``.`` (RFC 6186 section 3.4: "not
  available"), IMAP always, so clients do not try it.
- ``_submissions._tcp`` or ``_submission._tcp`` for ``--submission``.
- The MX, when ``--smtp`` receives mail.
- As comments: what is assumed (a port), what will not work (a host name
  no certificate names, MX on a port other than 25), and the host names
  ``--autoconfig`` clients look up.

The options are those the server runs with (parsed by the same
:class:`~popserv.server.tap.Options`, as ``popserv check`` does), so the
records say what the server does.  Exit status 0; 78 when the options name
no public host name or the domain is not served; 64 for a bad option.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from popserv.server.clientsetup import (
    ClientSetup,
    SetupError,
    client_setup,
    domain_name,
    endpoint_port,
    is_hostname,
)
from popserv.server.startup import EXIT_CONFIG, StartupError
from popserv.server.tap import Options
from popserv.stores.delivery import EX_USAGE

#: Seconds resolvers keep the records: an hour, the common default, so a
#: change of server reaches clients within one.
TTL = 3600

#: SRV priorities: lower is tried first (RFC 2782), so POP3S before POP3.
PREFERRED, FALLBACK = 0, 10

#: The MX preference of the one receiving host.
MX_PREFERENCE = 10

#: An endpoint bound to a loopback address (``interface=127.0.0.1``, ``::1``).
_LOOPBACK = re.compile(r"interface=(127\.|(\\?:){2}1(:|$)|localhost)")

#: RFC 5321 section 4.5.4.1: other servers deliver to the MX on port 25.
SMTP_PORT = 25

DNS_HELP = (
    "Prints the DNS records DOMAIN needs for mail clients and senders, from the options"
    " of twistd popserv: RFC 6186 SRV records (_pop3s._tcp preferred to _pop3._tcp, as"
    " RFC 8314 asks; IMAP and services not offered published as '.'), the submission"
    " server's, and the MX when --smtp receives mail. Exit status 0; 78 when the options"
    " name no public host name (--hostname or a certificate's) or do not serve DOMAIN."
)


class DnsError(Exception):
    """What ``popserv dns`` says before it exits with status 78."""


def _srv(service: str, domain: str, priority: int, port: int, target: str) -> tuple[str, str]:
    return f"_{service}._tcp.{domain}.", f"SRV {priority} 1 {port} {target}."


def _absent(service: str, domain: str) -> tuple[str, str]:
    # RFC 6186 section 3.4: target "." for a service decidedly not offered.
    return f"_{service}._tcp.{domain}.", "SRV 0 0 0 ."


def records(setup: ClientSetup, domain: str, options: Any) -> list[str]:
    """The zone-file lines (records and ``;`` comments) for ``domain``."""
    domain = domain_name(domain)
    host = setup.hostname
    rows: list[tuple[str, str]] = []
    notes: list[str] = []
    secure = [s for s in setup.services if s.implicit_tls]
    starttls = [s for s in setup.services if not s.implicit_tls]
    rows.append(
        _srv("pop3s", domain, PREFERRED, secure[0].port, host)
        if secure
        else _absent("pop3s", domain)
    )
    if starttls:
        rows.append(_srv("pop3", domain, FALLBACK, starttls[0].port, host))
    elif setup.cleartext_only is not None and options.get("allow-cleartext-auth"):
        rows.append(_srv("pop3", domain, FALLBACK, setup.cleartext_only.port, host))
        notes.append("warning: no --tls-cert: POP3 passwords cross the network in the clear")
    else:
        rows.append(_absent("pop3", domain))
        if setup.cleartext_only is not None:
            notes.append(
                "warning: no --tls-cert, and without --allow-cleartext-auth no client"
                " elsewhere can log in: POP3 is published as not offered"
            )
    rows += [_absent("imaps", domain), _absent("imap", domain)]
    for option in ("pop3s", "pop3"):
        for description in options.get(option) or []:
            if _LOOPBACK.search(description):
                notes.append(f"warning: --{option} {description} is reached only from this host")
    notes += [f"{s.assumed}" for s in (*setup.services, setup.cleartext_only) if s and s.assumed]
    submission = setup.submission
    if submission is None:
        notes.append(
            "no --submission: publish _submissions._tcp (or _submission._tcp) for the"
            " server clients send mail through"
        )
    elif submission.implicit_tls:
        rows.append(_srv("submissions", domain, PREFERRED, submission.port, submission.hostname))
    else:
        rows.append(_srv("submission", domain, PREFERRED, submission.port, submission.hostname))
    if options.get("smtp"):
        rows.append((f"{domain}.", f"MX {MX_PREFERENCE} {host}."))
        for description in options["smtp"]:
            port = endpoint_port(description)
            if port is not None and port != SMTP_PORT:
                notes.append(
                    f"warning: --smtp {description} listens on port {port}; other servers"
                    f" deliver to the MX on port {SMTP_PORT}"
                )
    if setup.certificate_names and not setup.certificate_covers():
        notes.append(f"warning: no --tls-cert names {host}: clients will refuse the server")
    width = max(len(name) for name, _ in rows)
    lines = [f"; {domain}: mail records from popserv's options (RFC 6186, RFC 8314)"]
    lines += [f"{name:<{width}} {TTL} IN {data}" for name, data in rows]
    lines += [f"; {note}" for note in notes]
    if options.get("autoconfig"):
        lines += [
            "; --autoconfig: clients also ask these hosts over HTTPS; point them at the web",
            "; server in front of the --autoconfig listener, e.g.:",
            f";   autoconfig.{domain}. {TTL} IN CNAME {host}.",
            f";   autodiscover.{domain}. {TTL} IN CNAME {host}.",
        ]
    return lines


def _served(setup: ClientSetup, domain: str, options: Any) -> None:
    if not is_hostname(domain):
        raise DnsError(f"{domain!r} is not a domain name")
    if not setup.serves(domain):
        raise DnsError(f"{domain} is not among the --domain values: {', '.join(setup.domains)}")
    if options.get("smtp") and not options.get("domain"):
        # The receiver's own default (popserv.server.service.make_receiver).
        accepted = {setup.hostname, "localhost"}
        if domain_name(domain) not in accepted:
            raise DnsError(f"--smtp accepts no mail for {domain}: give --domain {domain}")


def main(argv: Sequence[str]) -> int:
    """``popserv dns DOMAIN OPTIONS``: print the records; see the module for the status."""
    arguments = list(argv)
    if not arguments or arguments[0] in ("--help", "-h"):
        print("Usage: popserv dns DOMAIN [twistd popserv options]")
        print(textwrap.fill(DNS_HELP, 79))
        return 0 if arguments else EX_USAGE
    domain, rest = arguments[0], arguments[1:]
    if domain.startswith("-"):
        print("popserv dns: give the domain first: popserv dns DOMAIN [options]", file=sys.stderr)
        return EX_USAGE
    options = Options()
    try:
        options.parseOptions(rest)
    except usage.UsageError as e:
        print(f"popserv dns: {e}", file=sys.stderr)
        return EX_USAGE
    except StartupError as e:
        print(f"popserv dns: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        setup = client_setup(options)
        _served(setup, domain, options)
    except (SetupError, DnsError) as e:
        print(f"popserv dns: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print("\n".join(records(setup, domain, options)))
    return 0


__all__ = ["DNS_HELP", "main", "records"]
