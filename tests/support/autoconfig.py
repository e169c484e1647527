"""
Readers of the clients' set-up documents for the tests, as strict as the
clients: :func:`read_thunderbird` refuses what Thunderbird's own reader
(``readFromXML`` of its account set-up, the format documented by Mozilla's
autoconfig project) refuses, and :func:`read_autodiscover` checks the
elements of Exchange's POX response schema.  Our own documents only: the
stdlib parser is fine for what the server wrote.
"""

from __future__ import annotations

import re
from xml.etree.ElementTree import Element, fromstring

from attrs import frozen

#: What Thunderbird accepts in each field.
INCOMING_TYPES = ("pop3", "imap", "nntp", "exchange")
SOCKET_TYPES = ("plain", "SSL", "STARTTLS")
AUTHENTICATIONS = (
    "password-cleartext",
    "plain",
    "password-encrypted",
    "secure",
    "GSSAPI",
    "NTLM",
    "OAuth2",
)
OUTGOING_AUTHENTICATIONS = (*AUTHENTICATIONS, "none", "client-IP-address", "smtp-after-pop")
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]+")

OUTLOOK_RESPONSE = (
    "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
)
RESPONSE = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"


@frozen
class Server:
    kind: str
    hostname: str
    port: int
    socket_type: str
    username: str
    authentication: tuple[str, ...]


@frozen
class Thunderbird:
    provider: str
    domains: tuple[str, ...]
    incoming: tuple[Server, ...]
    outgoing: tuple[Server, ...]


def _one(parent: Element, tag: str) -> str:
    found = parent.findall(tag)
    assert len(found) == 1, f"<{parent.tag}> needs one <{tag}>, has {len(found)}"
    return (found[0].text or "").strip()


def _server(element: Element, kinds: tuple[str, ...], authentications: tuple[str, ...]) -> Server:
    kind = element.get("type", "")
    assert kind in kinds, f"type {kind!r}"
    hostname = _one(element, "hostname")
    assert _HOSTNAME.fullmatch(hostname), f"hostname {hostname!r}"
    port = int(_one(element, "port"))
    assert 1 <= port <= 65535, port
    sockets = [(e.text or "").strip() for e in element.findall("socketType")]
    assert sockets and sockets[0] in SOCKET_TYPES, f"socketType {sockets}"
    auths = tuple((e.text or "").strip() for e in element.findall("authentication"))
    assert auths and all(a in authentications for a in auths), f"authentication {auths}"
    return Server(kind, hostname, port, sockets[0], _one(element, "username"), auths)


def read_thunderbird(body: bytes) -> Thunderbird:
    """The document as Thunderbird reads it; AssertionError for what it would refuse."""
    root = fromstring(body)
    assert root.tag == "clientConfig", root.tag
    assert root.get("version") == "1.1"
    providers = root.findall("emailProvider")
    assert len(providers) == 1
    provider = providers[0]
    provider_id = provider.get("id", "")
    assert _HOSTNAME.fullmatch(provider_id), provider_id
    domains = tuple((d.text or "").strip() for d in provider.findall("domain"))
    assert domains and all(_HOSTNAME.fullmatch(d) for d in domains), domains
    incoming = tuple(
        _server(e, INCOMING_TYPES, AUTHENTICATIONS) for e in provider.findall("incomingServer")
    )
    assert incoming, "Thunderbird needs an <incomingServer>"
    outgoing = tuple(
        _server(e, ("smtp",), OUTGOING_AUTHENTICATIONS) for e in provider.findall("outgoingServer")
    )
    assert outgoing, "Thunderbird refuses a document without an <outgoingServer>"
    return Thunderbird(provider_id, domains, incoming, outgoing)


@frozen
class Protocol:
    kind: str
    server: str
    port: int
    ssl: str
    encryption: str
    login: str


def read_autodiscover(body: bytes) -> list[Protocol]:
    """The ``Protocol`` elements of a POX Autodiscover response, each with what Outlook needs."""
    root = fromstring(body)
    assert root.tag == f"{RESPONSE}Autodiscover", root.tag
    account = root.find(f"{OUTLOOK_RESPONSE}Response/{OUTLOOK_RESPONSE}Account")
    assert account is not None
    assert _one(account, f"{OUTLOOK_RESPONSE}AccountType") == "email"
    assert _one(account, f"{OUTLOOK_RESPONSE}Action") == "settings"
    found = []
    for protocol in account.findall(f"{OUTLOOK_RESPONSE}Protocol"):

        def text(tag: str, element: Element = protocol) -> str:
            return _one(element, f"{OUTLOOK_RESPONSE}{tag}")

        assert text("SSL") in ("on", "off")
        assert text("SPA") in ("on", "off")
        assert text("AuthRequired") in ("on", "off")
        found.append(
            Protocol(
                text("Type"),
                text("Server"),
                int(text("Port")),
                text("SSL"),
                text("Encryption"),
                text("LoginName"),
            )
        )
    return found


def autodiscover_request(address: str) -> bytes:
    """What Outlook POSTs (the request schema of Exchange 2006)."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
        'requestschema/2006">\n  <Request>\n'
        f"    <EMailAddress>{address}</EMailAddress>\n"
        "    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/"
        "outlook/responseschema/2006a</AcceptableResponseSchema>\n"
        "  </Request>\n</Autodiscover>\n"
    ).encode()


def billion_laughs(levels: int = 10) -> bytes:
    """An Autodiscover request whose address is an entity that expands ten to the ``levels``."""
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels)
    ]
    return (
        '<?xml version="1.0"?>\n<!DOCTYPE Autodiscover [\n'
        + "\n".join(entities)
        + f"\n]>\n<Autodiscover><Request><EMailAddress>&lol{levels - 1};@example.org"
        "</EMailAddress></Request></Autodiscover>\n"
    ).encode()
