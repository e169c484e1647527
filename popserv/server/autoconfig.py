"""
The documents mail clients configure themselves from, built from a
:class:`~popserv.server.clientsetup.ClientSetup`; no I/O (the listener that
serves them is :mod:`popserv.server.autoconfigweb`).

- Thunderbird's ``config-v1.1.xml`` (the ``clientConfig`` format of
  Mozilla's autoconfig project, as its ``readFromXML`` reads it): one
  ``emailProvider`` with at least one ``domain``, ``incomingServer``
  elements in order of preference, each with ``hostname``, ``port``,
  ``socketType`` (``SSL``, ``STARTTLS`` or ``plain``), ``username`` and
  ``authentication``, and at least one ``outgoingServer`` of type
  ``smtp``: Thunderbird rejects the whole document without one, so it is
  the ``--submission`` server.
- Outlook's Autodiscover answer (the "POX" response schema of Exchange
  2006: ``Autodiscover/Response/Account/Protocol``), one ``Protocol`` per
  way in, POP3S first.
- The e-mail address out of Outlook's Autodiscover request, which comes
  from anyone on the network: see :func:`requested_address`.

Only TLS is ever offered: POP3 on its own port (``SSL``) first, as RFC 8314
section 5.1 prefers, then STLS (``STARTTLS``).  Never ``plain``, even with
``--allow-cleartext-auth``: what autoconfig says, clients store, and a
client told ``plain`` sends the password in the clear for ever after (the
option is for old clients set up by hand, not for new ones).
"""

from __future__ import annotations

import re
from xml.etree.ElementTree import Element, SubElement, indent, tostring

from popserv.server.clientsetup import (
    ADDRESS,
    LOCAL_PART,
    ClientSetup,
    Service,
    Submission,
    domain_name,
    is_hostname,
)

#: Longest Autodiscover request body read.  Outlook's request is one
#: ``EMailAddress`` and one ``AcceptableResponseSchema`` (about 350 octets);
#: 16 KiB leaves room for any client's whitespace and namespaces, and keeps
#: what a stranger can make the server buffer small.
MAX_REQUEST_BODY = 16 * 1024

#: RFC 5321 section 4.5.3.1.3: a path is at most 256 octets, so an address
#: (without the angle brackets) at most 254.
MAX_ADDRESS_LENGTH = 254

#: Exchange's Autodiscover namespaces (request, and the two of the response).
REQUEST_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"

#: Thunderbird's placeholders for the login name.
USERNAMES = {ADDRESS: "%EMAILADDRESS%", LOCAL_PART: "%EMAILLOCALPART%"}

#: Thunderbird's names for how the connection is secured.
SSL, STARTTLS = "SSL", "STARTTLS"

#: The user name and password, sent inside TLS (USER/PASS, SASL PLAIN).
PASSWORD_CLEARTEXT = "password-cleartext"  # noqa: S105  # a method's name
#: A challenge-response (CRAM-MD5): only when the server offers it.
PASSWORD_ENCRYPTED = "password-encrypted"  # noqa: S105  # a method's name

# Only the element's text is wanted, so no XML parser reads the body: a
# DTD (the billion laughs, external entities) is refused before this runs,
# and this matches the one element, with or without a namespace prefix.
_EMAIL_ADDRESS = re.compile(
    rb"<(?:[A-Za-z_][\w.-]*:)?EMailAddress\s*>([^<]*)</(?:[A-Za-z_][\w.-]*:)?EMailAddress\s*>"
)
_PREDEFINED = {b"&amp;": b"&", b"&lt;": b"<", b"&gt;": b">", b"&quot;": b'"', b"&apos;": b"'"}
_REFERENCE = re.compile(rb"&[^;]{0,8};")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class BadRequest(Exception):
    """A request that names no usable address; its text says why (safe to send back)."""


def checked_address(text: str) -> str:
    """
    ``text`` as an address a client is answered for: ``local@domain``, the
    domain a host name, no spaces or control characters, at most
    :data:`MAX_ADDRESS_LENGTH` characters.  :class:`BadRequest` otherwise.
    """
    if len(text) > MAX_ADDRESS_LENGTH:
        raise BadRequest("the address is too long")
    local, at, domain = text.rpartition("@")
    if not at or not local or _CONTROL.search(text) or not is_hostname(domain):
        raise BadRequest("not an e-mail address")
    return f"{local}@{domain_name(domain)}"


def requested_address(body: bytes) -> str:
    """
    The ``EMailAddress`` of an Autodiscover request body (:class:`BadRequest`
    when there is none, or the body is not one to read).

    The body comes from anyone: it is read only up to
    :data:`MAX_REQUEST_BODY` octets (the listener refuses longer ones before
    reading them), a document with a DTD or entity declarations is refused
    outright (``xml.etree`` would expand internal entities, the "billion
    laughs"), and only the five entities XML predefines are decoded.
    """
    if len(body) > MAX_REQUEST_BODY:
        raise BadRequest("the request is too large")
    if b"<!" in body:
        raise BadRequest("document type declarations are not accepted")
    found = _EMAIL_ADDRESS.search(body)
    if found is None:
        raise BadRequest("the request has no EMailAddress")
    raw = found.group(1).strip()
    unknown = [r for r in _REFERENCE.findall(raw) if r not in _PREDEFINED]
    if unknown:
        raise BadRequest("only the predefined XML entities are accepted")
    for reference, character in _PREDEFINED.items():
        raw = raw.replace(reference, character)
    try:
        return checked_address(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the address is not UTF-8") from None


def _text(parent: Element, tag: str, text: str) -> Element:
    element = SubElement(parent, tag)
    element.text = text
    return element


def _document(root: Element) -> bytes:
    # ElementTree escapes every text and attribute it writes (&, <, >, ").
    indent(root)
    body = tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'.encode()


def thunderbird_config(setup: ClientSetup, domain: str, *, encrypted: bool = False) -> bytes:
    """
    ``config-v1.1.xml`` for the users of ``domain``, in Thunderbird's
    format (see the module).  ``encrypted``: CRAM-MD5 is on, so
    ``password-encrypted`` is listed too, after ``password-cleartext``
    (Thunderbird takes the first it knows; the password goes inside TLS,
    and any account can log in so).
    """
    domain = domain_name(domain)
    root = Element("clientConfig", version="1.1")
    provider = SubElement(root, "emailProvider", id=domain)
    _text(provider, "domain", domain)
    _text(provider, "displayName", domain)
    _text(provider, "displayShortName", domain.split(".")[0])
    for service in setup.services:
        server = _server(
            provider, "incomingServer", "pop3", setup.hostname, service=service, login=setup.login
        )
        if encrypted:
            _text(server, "authentication", PASSWORD_ENCRYPTED)
    submission = setup.submission
    if submission is not None:
        _server(
            provider,
            "outgoingServer",
            "smtp",
            submission.hostname,
            service=submission,
            login=setup.login,
        )
    return _document(root)


def _server(
    provider: Element,
    tag: str,
    kind: str,
    hostname: str,
    *,
    service: Service | Submission,
    login: str,
) -> Element:
    """An ``incomingServer`` or ``outgoingServer``: where, how secured, who, with a password."""
    server = SubElement(provider, tag, type=kind)
    _text(server, "hostname", hostname)
    _text(server, "port", str(service.port))
    _text(server, "socketType", SSL if service.implicit_tls else STARTTLS)
    _text(server, "username", USERNAMES[login])
    _text(server, "authentication", PASSWORD_CLEARTEXT)
    return server


def _protocol(
    account: Element, kind: str, hostname: str, service: Service, login: str, *, spa: bool
) -> None:
    protocol = SubElement(account, "Protocol")
    _text(protocol, "Type", kind)
    _text(protocol, "Server", hostname)
    _text(protocol, "Port", str(service.port))
    _text(protocol, "DomainRequired", "off")
    _text(protocol, "LoginName", login)
    _text(protocol, "SPA", "on" if spa else "off")
    # Encryption, when present, says which TLS; SSL=on alone means TLS from
    # the first byte to older Outlooks, hence both.
    _text(protocol, "SSL", "on")
    _text(protocol, "Encryption", "SSL" if service.implicit_tls else "TLS")
    _text(protocol, "AuthRequired", "on")


def autodiscover_response(setup: ClientSetup, address: str) -> bytes:
    """
    Outlook's Autodiscover answer for ``address`` (already checked): one
    POP3 ``Protocol`` per way in, POP3S first, and the submission server's
    SMTP one.  ``SPA`` (NTLM) is always off: popserv has none.
    """
    login = setup.login_name(address)
    root = Element("Autodiscover", xmlns=RESPONSE_SCHEMA)
    response = SubElement(root, "Response", xmlns=OUTLOOK_SCHEMA)
    account = SubElement(response, "Account")
    _text(account, "AccountType", "email")
    _text(account, "Action", "settings")
    for service in setup.services:
        _protocol(account, "POP3", setup.hostname, service, login, spa=False)
    submission = setup.submission
    if submission is not None:
        _protocol(
            account,
            "SMTP",
            submission.hostname,
            Service(submission.port, submission.implicit_tls),
            login,
            spa=False,
        )
    return _document(root)


__all__ = [
    "MAX_ADDRESS_LENGTH",
    "MAX_REQUEST_BODY",
    "OUTLOOK_SCHEMA",
    "REQUEST_SCHEMA",
    "RESPONSE_SCHEMA",
    "BadRequest",
    "autodiscover_response",
    "checked_address",
    "requested_address",
    "thunderbird_config",
]
