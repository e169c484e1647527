"""The probe's URL: pop3:// and pop3s://, the user, the port; what is refused."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from popserv.probe.target import BadTarget, Target, parse_target


class ParseTests(SynchronousTestCase):
    def test_forms(self):
        for url, expected in {
            "pop3://pop.example.org": Target("pop3", "pop.example.org", 110),
            "pop3s://pop.example.org": Target("pop3s", "pop.example.org", 995),
            "POP3://alice@Pop.Example.org:1110": Target("pop3", "pop.example.org", 1110, "alice"),
            "pop3s://alice%40example.org@[::1]:995/": Target(
                "pop3s", "::1", 995, "alice@example.org"
            ),
            "pop3://127.0.0.1:1": Target("pop3", "127.0.0.1", 1),
        }.items():
            self.assertEqual(parse_target(url), expected, url)

    def test_shown(self):
        self.assertEqual(str(parse_target("pop3s://a%40b@[::1]")), "pop3s://a@b@[::1]:995")
        self.assertTrue(parse_target("pop3s://h").implicit_tls)
        self.assertTrue(parse_target("pop3://[::1]").is_address)
        self.assertFalse(parse_target("pop3://h").is_address)

    def test_refused(self):
        for url, said in {
            "pop.example.org": "is not a URL",
            "imap://host": "unknown scheme 'imap'",
            "pop3://alice:secret@host": "a password in the URL is refused",
            "pop3://host/INBOX": "nothing may follow",
            "pop3://host?x=1": "nothing may follow",
            "pop3://": "names no host",
            "pop3://host:99999": "the port is not a number",
            "pop3://host:0": "the port is not a number",
            "pop3://host:x": "the port is not a number",
            "pop3://al%20ice@host": "spaces or control characters",
            "pop3://%ff@host": "not UTF-8",
        }.items():
            with self.assertRaises(BadTarget, msg=url) as caught:
                parse_target(url)
            self.assertIn(said, str(caught.exception), url)
