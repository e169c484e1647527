"""
The clients' set-up (:mod:`popserv.server.clientsetup`) and its documents
(:mod:`popserv.server.autoconfig`): what is read from the options, and the
XML as Thunderbird and Outlook read it; the hostile request bodies refused.
"""

from __future__ import annotations

from pathlib import Path

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.autoconfig import (
    MAX_REQUEST_BODY,
    BadRequest,
    autodiscover_response,
    requested_address,
    thunderbird_config,
)
from popserv.server.clientsetup import (
    ADDRESS,
    LOCAL_PART,
    ClientSetup,
    Service,
    SetupError,
    Submission,
    client_setup,
    endpoint_port,
    name_matches,
    parse_public_port,
    parse_submission,
)
from popserv.server.tap import Options
from tests.support.autoconfig import (
    autodiscover_request,
    billion_laughs,
    read_autodiscover,
    read_thunderbird,
)
from tests.support.certs import CA

SETUP = ClientSetup(
    hostname="mail.example.org",
    services=(Service(995, True), Service(110, False)),
    cleartext_only=None,
    login=LOCAL_PART,
    submission=Submission("smtp.example.org", 465),
    domains=("example.org",),
    certificate_names=("mail.example.org",),
)


class EndpointPortTests(SynchronousTestCase):
    def test_ports_given(self):
        """tcp, tcp6 and port= forms give their port."""
        self.assertEqual(endpoint_port("tcp:995"), 995)
        self.assertEqual(endpoint_port("tcp:110:interface=192.0.2.1"), 110)
        self.assertEqual(endpoint_port(r"tcp6:port=995:interface=\:\:"), 995)
        self.assertEqual(endpoint_port("tcp:interface=192.0.2.1:port=110"), 110)

    def test_ports_unknown(self):
        """systemd, unix and haproxy (HAProxy's port is the public one) say nothing."""
        for description in ("systemd:domain=INET:index=0", "unix:/run/p.sock", "haproxy:tcp:10995"):
            self.assertIsNone(endpoint_port(description), description)


class ParserTests(SynchronousTestCase):
    def test_public_port(self):
        self.assertEqual(parse_public_port("pop3s=995"), ("pop3s", 995))
        for bad in ("imap=993", "pop3s", "pop3=0", "pop3=70000", "pop3=x"):
            with self.assertRaises(ValueError, msg=bad):
                parse_public_port(bad)

    def test_submission(self):
        """465 is TLS from the first byte; any other port STARTTLS; no port is 465."""
        self.assertTrue(parse_submission("SMTP.example.org:465").implicit_tls)
        self.assertEqual(parse_submission("smtp.example.org").port, 465)
        self.assertFalse(parse_submission("smtp.example.org:587").implicit_tls)
        for bad in ("<b>:465", "smtp.example.org:0", ":587", "a b:587"):
            with self.assertRaises(ValueError, msg=bad):
                parse_submission(bad)

    def test_name_matches(self):
        self.assertTrue(name_matches("*.example.org", "mail.example.org"))
        self.assertFalse(name_matches("*.example.org", "a.mail.example.org"))
        self.assertFalse(name_matches("*.example.org", "example.org"))
        self.assertTrue(name_matches("Mail.Example.org", "mail.example.org."))


class ClientSetupTests(SynchronousTestCase):
    def setUp(self):
        self.base = Path(self.mktemp())
        self.cert, self.key = CA().issue("pop.example.org").write(self.base / "tls", "pop")

    def options(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--data", str(self.base / "data"), *args])
        return options

    def tls(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def test_from_options(self):
        """POP3S first, then STLS, ports from the endpoints; the certificate's name."""
        setup = client_setup(self.options("--pop3", "tcp:110", "--pop3s", "tcp:995", *self.tls()))
        self.assertEqual(setup.hostname, "pop.example.org")
        self.assertEqual(setup.services, (Service(995, True), Service(110, False)))
        self.assertIsNone(setup.cleartext_only)
        self.assertTrue(setup.certificate_covers())

    def test_public_port_and_assumed(self):
        """--public-port wins; a systemd socket's port is the standard one, said so."""
        setup = client_setup(
            self.options(
                "--hostname",
                "mail.example.org",
                "--pop3s",
                "tcp:10995",
                "--public-port",
                "pop3s=995",
                "--pop3",
                "systemd:domain=INET:index=0",
                *self.tls(),
            )
        )
        self.assertEqual([s.port for s in setup.services], [995, 110])
        self.assertIsNone(setup.services[0].assumed)
        self.assertIn("port 110 assumed", setup.services[1].assumed or "")
        self.assertFalse(setup.certificate_covers())

    def test_no_tls(self):
        """Without a certificate nothing is offered over TLS: the plain listener aside."""
        setup = client_setup(self.options("--hostname", "mail.example.org", "--pop3", "tcp:110"))
        self.assertEqual(setup.services, ())
        self.assertEqual(setup.cleartext_only, Service(110, False))

    def test_no_hostname(self):
        with self.assertRaises(SetupError) as caught:
            client_setup(self.options("--pop3", "tcp:110"))
        self.assertIn("--hostname", str(caught.exception))

    def test_port_zero(self):
        with self.assertRaises(SetupError) as caught:
            client_setup(self.options("--hostname", "h.example", "--pop3", "tcp:0"))
        self.assertIn("--public-port pop3=PORT", str(caught.exception))

    def test_login_form(self):
        """Addresses with {local}/{domain} or {maildir} templates and a database."""
        self.assertEqual(client_setup(self.options("--hostname", "h.example")).login, LOCAL_PART)
        for template in ("/var/vmail/{domain}/{local}", "/var/vmail/{maildir}"):
            options = self.options("--hostname", "h.example", "--maildir", template)
            self.assertEqual(client_setup(options).login, ADDRESS, template)


class ThunderbirdTests(SynchronousTestCase):
    def test_as_thunderbird_reads_it(self):
        """Every element Thunderbird needs, SSL on 995 first, then STARTTLS, never plain."""
        config = read_thunderbird(thunderbird_config(SETUP, "Example.ORG"))
        self.assertEqual(config.provider, "example.org")
        self.assertEqual(config.domains, ("example.org",))
        self.assertEqual(
            [(s.kind, s.hostname, s.port, s.socket_type) for s in config.incoming],
            [
                ("pop3", "mail.example.org", 995, "SSL"),
                ("pop3", "mail.example.org", 110, "STARTTLS"),
            ],
        )
        self.assertEqual({s.username for s in config.incoming}, {"%EMAILLOCALPART%"})
        self.assertEqual({s.authentication for s in config.incoming}, {("password-cleartext",)})
        [smtp] = config.outgoing
        self.assertEqual(
            (smtp.hostname, smtp.port, smtp.socket_type), ("smtp.example.org", 465, "SSL")
        )

    def test_encrypted_password_when_cram_md5(self):
        """password-encrypted only when CRAM-MD5 is on, after password-cleartext."""
        config = read_thunderbird(thunderbird_config(SETUP, "example.org", encrypted=True))
        self.assertEqual(
            config.incoming[0].authentication, ("password-cleartext", "password-encrypted")
        )

    def test_address_logins(self):
        setup = evolve(SETUP, login=ADDRESS)
        config = read_thunderbird(thunderbird_config(setup, "example.org"))
        self.assertEqual({s.username for s in config.incoming}, {"%EMAILADDRESS%"})


class AutodiscoverTests(SynchronousTestCase):
    def test_as_outlook_reads_it(self):
        """POP3S first, then STLS, then the submission server; the login name in full."""
        protocols = read_autodiscover(autodiscover_response(SETUP, "alice@example.org"))
        self.assertEqual(
            [(p.kind, p.server, p.port, p.ssl, p.encryption, p.login) for p in protocols],
            [
                ("POP3", "mail.example.org", 995, "on", "SSL", "alice"),
                ("POP3", "mail.example.org", 110, "on", "TLS", "alice"),
                ("SMTP", "smtp.example.org", 465, "on", "SSL", "alice"),
            ],
        )

    def test_escaped(self):
        """What the client sent is escaped where it is written back."""
        body = autodiscover_response(evolve(SETUP, login=ADDRESS), "a<b>&'\"@example.org")
        self.assertIn(b"<LoginName>a&lt;b&gt;&amp;'\"@example.org</LoginName>", body)
        self.assertEqual(read_autodiscover(body)[0].login, "a<b>&'\"@example.org")


class RequestTests(SynchronousTestCase):
    def test_outlook_request(self):
        self.assertEqual(
            requested_address(autodiscover_request("Alice@Example.ORG")), "Alice@example.org"
        )

    def test_prefixed_and_predefined_entities(self):
        body = (
            b"<a:Autodiscover xmlns:a='x'><a:Request>"
            b"<a:EMailAddress> t&amp;j@example.org </a:EMailAddress>"
            b"</a:Request></a:Autodiscover>"
        )
        self.assertEqual(requested_address(body), "t&j@example.org")

    def test_refused(self):
        """No address, not an address, a DTD, other entities, too large, not UTF-8."""
        for body in (
            b"",
            b"<Autodiscover/>",
            autodiscover_request("alice"),
            autodiscover_request("alice@"),
            autodiscover_request("alice@exa mple.org"),
            autodiscover_request("al\x01ice@example.org"),
            autodiscover_request("x" * 300 + "@example.org"),
            b'<!DOCTYPE a SYSTEM "file:///etc/passwd"><a/>',
            autodiscover_request("&#x61;lice@example.org"),
            autodiscover_request("&ext;@example.org"),
            b"<EMailAddress>\xff@example.org</EMailAddress>",
            autodiscover_request("a@example.org") + b" " * MAX_REQUEST_BODY,
        ):
            with self.assertRaises(BadRequest, msg=body[:80]):
                requested_address(body)

    def test_billion_laughs_at_once(self):
        """An entity bomb is refused for its DTD, before anything could expand it."""
        with self.assertRaises(BadRequest) as caught:
            requested_address(billion_laughs())
        self.assertIn("document type", str(caught.exception))
