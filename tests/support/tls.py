"""Shared test fixtures: tls."""

from __future__ import annotations

import poplib
import socket
import ssl
from pathlib import Path

from twisted.internet import reactor
from twisted.protocols.tls import TLSMemoryBIOFactory

from tests.support.certs import CA
from tests.support.servers import ServerTestCase


class TLSTestCase(ServerTestCase):
    """
    The e2e server with a certificate for ``pop.test`` and 127.0.0.1 (so
    STLS is on), and a second listener speaking TLS from the first byte.
    """

    extra_options: dict = {}

    def setUp(self):
        self.certs = Path(self.mktemp())
        self.ca = CA()
        self.cafile = self.ca.write(self.certs / "ca.pem")
        self.server_cert = self.ca.issue("pop.test", "127.0.0.1")
        self.cert_path, self.key_path = self.server_cert.write(self.certs, "server")
        self.options = {
            "tls-cert": [str(self.cert_path)],
            "tls-key": [str(self.key_path)],
            **self.extra_options,
        }
        super().setUp()
        self.tls_port = reactor.listenTCP(
            0, TLSMemoryBIOFactory(self.factory.tls, False, self.factory), interface="127.0.0.1"
        )
        self.addCleanup(self.tls_port.stopListening)
        self.tls_portno = self.tls_port.getHost().port

    def context(self, alpn: list[str] | None = None, **settings) -> ssl.SSLContext:
        """A client context that trusts the test CA and checks host names."""
        context = ssl.create_default_context(cafile=str(self.cafile))
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        for name, value in settings.items():
            setattr(context, name, value)
        return context

    def pop3s(self, context=None, host="127.0.0.1") -> poplib.POP3_SSL:
        client = poplib.POP3_SSL.__new__(poplib.POP3_SSL)
        client.context = context or self.context()
        # poplib checks the certificate against the host it connects to; use
        # a name of our choosing for SNI and the hostname check.
        poplib.POP3.__init__(client, "127.0.0.1", self.tls_portno, timeout=10)
        return client

    def tls_socket(self, port: int, server_hostname="pop.test", **context_settings):
        """A raw TLS socket to an implicit-TLS port."""
        context = self.context(**context_settings)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        return context.wrap_socket(raw, server_hostname=server_hostname)

    def session_info(self):
        """The TLS facts of the one open session on the server."""
        (session,) = self.factory.sessions
        return session.info
