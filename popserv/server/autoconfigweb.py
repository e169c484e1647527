"""
``--autoconfig ENDPOINT``: the HTTP listener mail clients configure
themselves from, serving the documents of :mod:`popserv.server.autoconfig`:

- ``GET /mail/config-v1.1.xml?emailaddress=ADDRESS`` (Thunderbird asks
  ``autoconfig.DOMAIN`` for it) and ``GET
  /.well-known/autoconfig/mail/config-v1.1.xml`` (asked of ``DOMAIN``
  itself); without ``emailaddress``, the domain is the ``Host`` less its
  ``autoconfig.``;
- ``POST /autodiscover/autodiscover.xml`` (any capitalisation: Outlook
  writes ``/Autodiscover/Autodiscover.xml``), with the request XML.

Answers: 200 with the document; 400 for a request that names no usable
address; 404 for a domain not among ``--domain`` (when given) or any other
path; 405 for another method; 413, and the connection closed before the
body is read, for a body over
:data:`~popserv.server.autoconfig.MAX_REQUEST_BODY`.

A listener of its own, apart from ``--metrics``: metrics are for the
operator's network, this is for anyone's clients, usually behind the web
server or HAProxy that holds the ``https://`` certificate for
``autoconfig.DOMAIN`` (clients ask over HTTPS first).  No access log line
carries an address: one line per answer names the domain and the status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger
from twisted.python.usage import UsageError
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from popserv.server.autoconfig import (
    MAX_REQUEST_BODY,
    BadRequest,
    autodiscover_response,
    checked_address,
    requested_address,
    thunderbird_config,
)
from popserv.server.clientsetup import (
    ClientSetup,
    SetupError,
    client_setup,
    domain_name,
    is_hostname,
)
from popserv.server.configure import endpoint
from popserv.server.startup import StartupError

log = Logger()

#: Paths, lower-cased, of each document.
THUNDERBIRD_PATHS = (b"/mail/config-v1.1.xml", b"/.well-known/autoconfig/mail/config-v1.1.xml")
AUTODISCOVER_PATHS = (b"/autodiscover/autodiscover.xml",)

#: Seconds an idle HTTP connection stays open.  A client sends its one
#: request at once; twisted.web's default (60 s) would let idle strangers
#: hold connections longer than any client needs.
IDLE_TIMEOUT = 15

_TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BoundedRequest(Request):
    """
    A request whose body may be at most ``MAX_REQUEST_BODY`` octets: one
    announced longer (``Content-Length``) is answered 413 before any of it
    is read, and one that grows longer (chunked) as soon as it does; the
    connection is then closed, so a stranger cannot make the server buffer
    (or spool to disk, as twisted.web does past 100 KB) what it will not read.
    """

    refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_REQUEST_BODY:
            # No "100 Continue" after the refusal.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]  # twisted.web

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        if self.content is None or self.content.tell() + len(data) > MAX_REQUEST_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]  # twisted.web

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.refused:
            super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def _refuse(self) -> None:
        self.refused = True
        log.info("Autoconfig: refused a request body over {limit} octets", limit=MAX_REQUEST_BODY)
        channel = self.channel
        if channel.transport is not None:
            channel.transport.write(_TOO_LARGE)
        channel.loseConnection()  # type: ignore[no-untyped-call]  # twisted.web


class AutoconfigPage(Resource):
    """Both documents, for ``setup()`` as it is at each request (see the module)."""

    isLeaf = True

    def __init__(self, setup: ClientSetup, encrypted: Callable[[], bool] = lambda: False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web
        self._setup = setup
        #: Whether CRAM-MD5 is offered now (it follows the accounts' secrets).
        self._encrypted = encrypted

    def render(self, request: Request) -> bytes:
        path = (request.path or b"").lower()
        method = request.method
        allowed: tuple[bytes, ...]
        if path in THUNDERBIRD_PATHS:
            allowed = (b"GET", b"HEAD")
            answer = self._thunderbird
        elif path in AUTODISCOVER_PATHS:
            allowed = (b"POST",)
            answer = self._autodiscover
        else:
            return _plain(request, http.NOT_FOUND, "not found")
        if method not in allowed:
            request.setHeader(b"Allow", b", ".join(allowed))  # type: ignore[no-untyped-call]
            return _plain(request, http.NOT_ALLOWED, "method not allowed")
        try:
            return answer(request)
        except BadRequest as e:
            return _plain(request, http.BAD_REQUEST, str(e))

    def _thunderbird(self, request: Request) -> bytes:
        args = request.args or {}
        given = args.get(b"emailaddress") or []
        if given:
            domain = _domain_of(given[0])
        else:
            host = (request.getRequestHostname() or b"").decode("ascii", "replace")  # type: ignore[no-untyped-call]
            domain = domain_name(host.removeprefix("autoconfig."))
            if not is_hostname(domain):
                raise BadRequest("no emailaddress, and no host name to take the domain from")
        if not self._setup.serves(domain):
            return self._unknown(request, domain)
        log.info("Autoconfig: Thunderbird's configuration for {domain}", domain=domain)
        body = thunderbird_config(self._setup, domain, encrypted=self._encrypted())
        return _xml(request, body)

    def _autodiscover(self, request: Request) -> bytes:
        body = request.content.read(MAX_REQUEST_BODY + 1) if request.content else b""
        address = requested_address(body)
        domain = address.rpartition("@")[2]
        if not self._setup.serves(domain):
            return self._unknown(request, domain)
        log.info("Autoconfig: Outlook's Autodiscover answer for {domain}", domain=domain)
        return _xml(request, autodiscover_response(self._setup, address))

    def _unknown(self, request: Request, domain: str) -> bytes:
        log.info("Autoconfig: asked for a domain not served: {domain}", domain=domain)
        return _plain(request, http.NOT_FOUND, "no such mail domain here")


def _domain_of(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the address is not UTF-8") from None
    return checked_address(text).rpartition("@")[2]


def _xml(request: Request, body: bytes) -> bytes:
    request.setHeader(b"Content-Type", b"application/xml; charset=utf-8")  # type: ignore[no-untyped-call]
    # The Autodiscover answer names the user's login: no shared cache keeps it.
    request.setHeader(b"Cache-Control", b"no-store")  # type: ignore[no-untyped-call]
    request.setHeader(b"X-Content-Type-Options", b"nosniff")  # type: ignore[no-untyped-call]
    return body


def _plain(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
    return f"{text}\n".encode()


class AutoconfigSite(Site):
    """The listener's site: bounded bodies, a short idle timeout, no access log."""

    requestFactory = BoundedRequest

    def __init__(self, page: AutoconfigPage) -> None:
        super().__init__(page, timeout=IDLE_TIMEOUT)  # type: ignore[no-untyped-call]  # twisted.web

    def log(self, request: http.Request) -> None:
        # The access log would carry ?emailaddress=: AutoconfigPage logs without it.
        pass


def autoconfig_setup(options: Mapping[str, Any]) -> ClientSetup:
    """
    What ``--autoconfig`` tells clients, from ``options``; StartupError
    when it could tell them nothing they should use: no host name, no TLS
    listener (only TLS is offered, see :mod:`popserv.server.autoconfig`),
    no ``--submission`` (Thunderbird refuses a configuration without an
    outgoing server).  A host name no certificate names, and ports assumed,
    are logged.
    """
    try:
        setup = client_setup(options)
    except SetupError as e:
        raise StartupError(f"--autoconfig: {e}") from None
    if not setup.services:
        raise StartupError(
            "--autoconfig offers clients only POP3 over TLS: give --tls-cert (and --pop3s)"
        )
    if setup.submission is None:
        raise StartupError(
            "--autoconfig needs --submission HOST:PORT, the server clients send mail"
            " through: Thunderbird refuses a configuration without one"
        )
    if not setup.certificate_covers():
        log.warn(
            "--autoconfig: no certificate names {hostname}; clients will refuse it",
            hostname=setup.hostname,
        )
    for service in setup.services:
        if service.assumed:
            log.info("--autoconfig: {assumed}", assumed=service.assumed)
    return setup


def serve_autoconfig(
    description: str | None,
    parent: Any,
    *,
    setup: Callable[[], ClientSetup],
    encrypted: Callable[[], bool],
    reactor: Any,
    listener: Callable[[Any, Any, str], Any],
) -> AutoconfigSite | None:
    """
    With ``--autoconfig ENDPOINT``: serve the documents on it, as a
    ``listener(endpoint, site, description)`` service under ``parent``.
    ``setup`` is called once, now: it raises StartupError for options
    clients cannot be configured from.  Without: nothing (None).
    """
    if not description:
        return None
    try:
        where = endpoint("autoconfig", description, reactor)
    except UsageError as e:
        raise StartupError(str(e)) from None
    site = AutoconfigSite(AutoconfigPage(setup(), encrypted))
    listener(where, site, description).setServiceParent(parent)
    return site


__all__ = [
    "AutoconfigPage",
    "AutoconfigSite",
    "BoundedRequest",
    "autoconfig_setup",
    "serve_autoconfig",
]
