"""
What ``popserv probe`` connects to: ``pop3://[user@]host[:port]`` or
``pop3s://...``, parsed into a :class:`Target`.

The user name may be percent-encoded (``pop3://alice%40example.org@host``);
a password in the URL is refused, so that it never shows in a process
list or a CI log.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote, urlsplit

from attrs import frozen

#: The schemes, and each one's default port (RFC 1939, RFC 8314).
PORTS = {"pop3": 110, "pop3s": 995}


class BadTarget(ValueError):
    """The URL cannot be probed; the message says why, in one line."""


@frozen
class Target:
    """A POP3 server, and the user to log in as (None: check without logging in)."""

    scheme: str
    host: str
    port: int
    user: str | None = None

    @property
    def implicit_tls(self) -> bool:
        """``pop3s://``: TLS from the first byte."""
        return self.scheme == "pop3s"

    @property
    def is_address(self) -> bool:
        """The host is an IP address, not a name."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = "" if self.user is None else f"{self.user}@"
        return f"{self.scheme}://{user}{host}:{self.port}"


def parse_target(url: str) -> Target:
    """The :class:`Target` of ``url``; :class:`BadTarget` saying what is wrong."""
    if "://" not in url:
        raise BadTarget(f"{url!r} is not a URL: give pop3://[user@]host[:port] or pop3s://...")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in PORTS:
        raise BadTarget(f"unknown scheme {parts.scheme!r}: give pop3:// or pop3s://")
    if parts.password is not None:
        raise BadTarget(
            "a password in the URL is refused; give it on the terminal, on standard input"
            " or in POPSERV_PROBE_PASSWORD"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadTarget(f"{url!r}: nothing may follow the host and port")
    host = parts.hostname
    if not host:
        raise BadTarget(f"{url!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise BadTarget(f"{url!r}: the port is not a number from 1 to 65535") from None
    if port == 0:
        raise BadTarget(f"{url!r}: the port is not a number from 1 to 65535")
    try:
        user = None if parts.username is None else unquote(parts.username, errors="strict")
    except UnicodeDecodeError:
        raise BadTarget("the user name is not UTF-8 (once its %XX are decoded)") from None
    if user is not None and (not user or any(ord(c) < 0x21 or ord(c) == 0x7F for c in user)):
        raise BadTarget("the user name is empty or has spaces or control characters")
    return Target(scheme, host, port or PORTS[scheme], user)


__all__ = ["PORTS", "BadTarget", "Target", "parse_target"]
