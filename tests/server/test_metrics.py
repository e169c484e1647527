"""
``--metrics``: real POP3, SMTP and LMTP sessions against real listeners,
then the metrics scraped over real HTTP and their values checked; the text
checked by ``promtool check metrics``, and scraped by a real Prometheus.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.metrics import Metrics
from popserv.server.service import Listener, makeService
from popserv.server.tap import Options, StartupError
from tests.support.metrics import http_get, parse, promtool_check, value
from tests.support.peers import missing
from tests.support.receiver import ReceiverTestCase
from tests.support.servers import ServerTestCase, command, login
from tests.support.tls import TLSTestCase

#: Every metric the server exposes (docs/production.rst lists each; a test checks).
METRIC_NAMES = {
    "popserv_connections",
    "popserv_connections_open",
    "popserv_connections_refused",
    "popserv_pop3_commands",
    "popserv_logins",
    "popserv_login_seconds",
    "popserv_login_penalties",
    "popserv_maildrop_open_seconds",
    "popserv_pop3_sessions",
    "popserv_pop3_sessions_ended",
    "popserv_pop3_sent_octets",
    "popserv_pop3_messages",
    "popserv_pop3_message_octets",
    "popserv_tls_handshakes",
    "popserv_tls_certificate_expiry_timestamp_seconds",
    "popserv_deliveries",
    "popserv_delivery_seconds",
    "popserv_quota_refusals",
    "popserv_threadpool_queued_tasks",
    "popserv_threadpool_busy_threads",
    "popserv_threadpool_max_threads",
}


def in_own_thread(f, *args, **kwargs) -> Deferred:
    """Run ``f`` in a new thread (not the reactor's pool, which a test may fill)."""
    done: Deferred = Deferred()

    def run():
        try:
            result = f(*args, **kwargs)
        except BaseException as e:
            reactor.callFromThread(done.errback, e)
        else:
            reactor.callFromThread(done.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return done


class MetricsMixin:
    """Metrics on the test's server, served on 127.0.0.1 over HTTP."""

    def serve_metrics(self, *receivers) -> Metrics:
        self.metrics = Metrics(reactor)
        self.metrics.watch_pop3(self.pop3_factory())
        for receiver in receivers:
            self.metrics.watch_receiver(receiver)
        port = reactor.listenTCP(0, self.metrics.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.metrics_url = f"http://127.0.0.1:{port.getHost().port}/metrics"
        return self.metrics

    def pop3_factory(self):
        return self.factory

    async def scrape(self, accept: str | None = None) -> str:
        content_type, text = await in_own_thread(http_get, self.metrics_url, accept)
        self.content_type = content_type
        return text


class POP3MetricsTests(MetricsMixin, ServerTestCase):
    """Counters after real poplib sessions."""

    def setUp(self):
        super().setUp()
        self.serve_metrics()

    def session(self):
        client = self.pop()
        self.assertTrue(login(client, "alice", "secret").startswith(b"+OK"))
        client.stat()
        client.list()
        client.retr(1)
        client.top(2, 0)
        client.dele(1)
        self.assertTrue(command(client, "XYZZY").startswith(b"-ERR"))
        self.assertTrue(command(client, "\x01\x02").startswith(b"-ERR"))
        client.quit()

    def failed_login(self):
        client = self.pop()
        self.assertTrue(login(client, "alice", "wrong").startswith(b"-ERR"))
        client.quit()

    async def test_counters(self):
        """Connections, commands by verb, logins, RETR/TOP/DELE and octets are counted."""
        await in_own_thread(self.session)
        await in_own_thread(self.failed_login)
        await self.wait_idle()
        samples = parse(await self.scrape())
        self.assertEqual(value(samples, "popserv_connections_total", listener="pop3"), 2)
        self.assertEqual(value(samples, "popserv_connections_total", listener="pop3s"), 0)
        self.assertEqual(value(samples, "popserv_connections_open", listener="pop3"), 0)
        for verb, count in {"USER": 2, "PASS": 2, "STAT": 1, "LIST": 1, "RETR": 1}.items():
            self.assertEqual(value(samples, "popserv_pop3_commands_total", verb=verb), count, verb)
        self.assertEqual(value(samples, "popserv_pop3_commands_total", verb="TOP"), 1)
        self.assertEqual(value(samples, "popserv_pop3_commands_total", verb="QUIT"), 2)
        # XYZZY and the control characters: bounded to one label value.
        self.assertEqual(value(samples, "popserv_pop3_commands_total", verb="other"), 2)
        logins = {"mechanism": "USER"}
        self.assertEqual(value(samples, "popserv_logins_total", **logins, outcome="success"), 1)
        self.assertEqual(value(samples, "popserv_logins_total", **logins, outcome="failure"), 1)
        self.assertEqual(value(samples, "popserv_login_seconds_count"), 2)
        self.assertEqual(value(samples, "popserv_maildrop_open_seconds_count"), 1)
        self.assertEqual(value(samples, "popserv_pop3_messages_total", command="RETR"), 1)
        self.assertEqual(value(samples, "popserv_pop3_messages_total", command="TOP"), 1)
        self.assertEqual(value(samples, "popserv_pop3_messages_total", command="DELE"), 1)
        self.assertGreater(value(samples, "popserv_pop3_message_octets_total", command="RETR"), 0)
        self.assertEqual(value(samples, "popserv_pop3_sessions_ended_total"), 2)
        self.assertGreater(value(samples, "popserv_pop3_sent_octets_total"), 500)
        # The failed login left the client (127.0.0.1) penalised.
        self.assertEqual(value(samples, "popserv_login_penalties"), 1)
        # No user name or address in any label value.
        text = await self.scrape()
        for private in ("alice", "127.0.0.1"):
            self.assertNotIn(private, text)

    async def test_sessions_by_state(self):
        """A scrape reads the sessions open now, by state."""
        client = await in_own_thread(self.pop)
        try:
            await in_own_thread(login, client, "alice", "secret")
            other = await in_own_thread(self.pop)
            await in_own_thread(other.user, "alice")
            samples = parse(await self.scrape())
            self.assertEqual(value(samples, "popserv_pop3_sessions", state="transaction"), 1)
            self.assertEqual(value(samples, "popserv_pop3_sessions", state="user_given"), 1)
            self.assertEqual(value(samples, "popserv_pop3_sessions", state="authorization"), 0)
            self.assertEqual(value(samples, "popserv_connections_open", listener="pop3"), 2)
            await in_own_thread(other.quit)
        finally:
            await in_own_thread(client.quit)

    async def test_promtool(self):
        """``promtool check metrics`` accepts the text after real sessions."""
        await in_own_thread(self.session)
        await in_own_thread(self.failed_login)
        await self.wait_idle()
        text = await self.scrape()
        self.assertTrue(self.content_type.startswith("text/plain; version=0.0.4"))
        promtool_check(self, text)

    async def test_openmetrics(self):
        """A scraper that asks for OpenMetrics gets it."""
        text = await self.scrape("application/openmetrics-text; version=1.0.0")
        self.assertTrue(self.content_type.startswith("application/openmetrics-text"))
        self.assertTrue(text.endswith("# EOF\n"))

    async def test_saturated_thread_pool(self):
        """
        A scrape answers, and shows the queue, while every thread of the
        reactor's pool is busy: it is rendered on the reactor, not in the pool.
        """
        pool = reactor.getThreadPool()
        release = threading.Event()
        self.addCleanup(release.set)
        blocked = pool.max + 3
        for _ in range(blocked):
            pool.callInThread(release.wait, 30)
        samples = parse(await self.scrape())
        self.assertEqual(value(samples, "popserv_threadpool_queued_tasks"), 3)
        self.assertEqual(value(samples, "popserv_threadpool_busy_threads"), pool.max)
        self.assertEqual(value(samples, "popserv_threadpool_max_threads"), pool.max)
        release.set()
        for _ in range(200):
            if not pool.working and not pool._queue.qsize():
                break
            await deferLater(reactor, 0.01, lambda: None)



class RefusalMetricsTests(MetricsMixin, ServerTestCase):
    """Refusals over the connection limits."""

    options = {"max-connections": 1}

    def setUp(self):
        super().setUp()
        self.serve_metrics()

    def refused(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.portno), timeout=10) as sock:
            return sock.recv(1000)

    async def test_refusals(self):
        """Connections over the limit are counted by reason, with no address."""
        first = await in_own_thread(self.pop)
        try:
            self.assertTrue((await in_own_thread(self.refused)).startswith(b"-ERR"))
        finally:
            await in_own_thread(first.quit)
        text = await self.scrape()
        samples = parse(text)
        refused = {"service": "pop3", "reason": "max_connections"}
        self.assertEqual(value(samples, "popserv_connections_refused_total", **refused), 1)
        self.assertNotIn("127.0.0.1", text)


class TLSMetricsTests(MetricsMixin, TLSTestCase):
    """TLS handshakes and the certificate's expiry."""

    def setUp(self):
        super().setUp()
        self.serve_metrics()

    def pop3s_session(self):
        client = self.pop3s()
        client.quit()

    def bad_handshake(self):
        context = ssl.create_default_context()  # does not trust the test CA
        raw = socket.create_connection(("127.0.0.1", self.tls_portno), timeout=10)
        with self.assertRaises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="pop.test")
        raw.close()

    def stls_session(self):
        client = self.pop()
        client.stls(self.context())
        client.quit()

    async def test_handshakes(self):
        await in_own_thread(self.pop3s_session)
        await in_own_thread(self.stls_session)
        await in_own_thread(self.bad_handshake)
        await self.wait_idle()
        samples = parse(await self.scrape())
        handshakes = "popserv_tls_handshakes_total"
        self.assertEqual(value(samples, handshakes, listener="pop3s", outcome="success"), 1)
        self.assertEqual(value(samples, handshakes, listener="pop3", outcome="success"), 1)
        self.assertEqual(value(samples, handshakes, listener="pop3s", outcome="failure"), 1)
        self.assertEqual(value(samples, "popserv_connections_total", listener="pop3s"), 2)
        expiry = self.server_cert.certificate.not_valid_after_utc.timestamp()
        self.assertEqual(
            value(
                samples,
                "popserv_tls_certificate_expiry_timestamp_seconds",
                certificate=str(self.cert_path),
            ),
            expiry,
        )
        promtool_check(self, await self.scrape())


class ReceiverMetricsTests(MetricsMixin, ReceiverTestCase):
    """Deliveries over SMTP and LMTP, and quota refusals."""

    def setUp(self):
        super().setUp()
        self.serve_metrics(self.smtp, self.lmtp)

    def pop3_factory(self):
        return self.pop3

    async def test_deliveries(self):
        message = b"Subject: hi\r\n\r\nhello\r\n"
        await in_own_thread(self.smtplib_send, "x@example.net", ["alice@example.org"], message)
        await in_own_thread(
            self.smtplib_send, "x@example.net", ["bob@example.org"], message, lmtp=True
        )
        # carol may hold 1 KiB: refused at RCPT (SIZE) by quota.
        big = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
        with self.assertRaises(Exception):
            await in_own_thread(self.smtplib_send, "x@example.net", ["carol@example.org"], big)
        samples = parse(await self.scrape())
        deliveries = "popserv_deliveries_total"
        self.assertEqual(value(samples, deliveries, path="smtp", outcome="stored"), 1)
        self.assertEqual(value(samples, deliveries, path="lmtp", outcome="stored"), 1)
        self.assertEqual(value(samples, "popserv_delivery_seconds_count", path="smtp"), 1)
        self.assertEqual(value(samples, "popserv_delivery_seconds_count", path="lmtp"), 1)
        quota = "popserv_quota_refusals_total"
        self.assertEqual(value(samples, quota, path="smtp", stage="rcpt"), 1)
        self.assertEqual(value(samples, "popserv_connections_total", listener="smtp"), 2)
        self.assertEqual(value(samples, "popserv_connections_total", listener="lmtp"), 1)
        self.assertNotIn("carol", await self.scrape())
        promtool_check(self, await self.scrape())

    async def test_quota_at_data(self):
        """A message that does not fit once received is refused by quota after DATA."""
        big = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"

        def send_without_size():
            import smtplib

            client = smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10)
            try:
                client.ehlo()
                client.esmtp_features.pop("size", None)  # no SIZE=: checked after DATA
                client.sendmail("x@example.net", ["carol@example.org"], big)
            finally:
                client.quit()

        with self.assertRaises(Exception):
            await in_own_thread(send_without_size)
        samples = parse(await self.scrape())
        self.assertEqual(
            value(samples, "popserv_quota_refusals_total", path="smtp", stage="data"), 1
        )
        self.assertEqual(
            value(samples, "popserv_deliveries_total", path="smtp", outcome="mailbox_full"), 1
        )


class MetricsUnitTests(SynchronousTestCase):
    def test_own_registry(self):
        """Each Metrics has its own registry: many servers in one process."""
        one, two = Metrics(reactor), Metrics(reactor)
        one.connection_opened("pop3")
        self.assertIsNot(one.registry, REGISTRY)
        first = parse(one.render()[0].decode())
        second = parse(two.render()[0].decode())
        self.assertEqual(value(first, "popserv_connections_total", listener="pop3"), 1)
        self.assertEqual(value(second, "popserv_connections_total", listener="pop3"), 0)
        self.assertIsNone(REGISTRY.get_sample_value("popserv_connections_total"))

    def test_every_metric(self):
        """The metrics exposed are exactly the documented list."""
        text = Metrics(reactor).render()[0].decode()
        # prometheus_client's _created series (when each counter began) aside.
        names = {
            family.name
            for family in text_string_to_metric_families(text)
            if not family.name.endswith("_created")
        }
        self.assertEqual(names, METRIC_NAMES - {"popserv_login_penalties"})

    def test_documented(self):
        """docs/production.rst names every metric."""
        docs = (Path(__file__).parents[2] / "docs" / "production.rst").read_text()
        for name in METRIC_NAMES:
            self.assertIn(name, docs)

    def test_bounded_labels(self):
        """Unknown verbs, mechanisms and refusal texts become one label value each."""
        metrics = Metrics(reactor)
        metrics.command(b"NOTAVERB x")
        metrics.command(b"retr 1")
        metrics.login("SOMETHING", "failure")
        metrics.refused("pop3", "9 connections from 192.0.2.1")
        metrics.refused("pop3", "whatever another admission says")
        samples = parse(metrics.render()[0].decode())
        self.assertEqual(value(samples, "popserv_pop3_commands_total", verb="other"), 1)
        self.assertEqual(value(samples, "popserv_pop3_commands_total", verb="RETR"), 1)
        self.assertEqual(
            value(samples, "popserv_logins_total", mechanism="other", outcome="failure"), 1
        )
        refused = "popserv_connections_refused_total"
        self.assertEqual(
            value(samples, refused, service="pop3", reason="max_connections_per_ip"), 1
        )
        self.assertEqual(value(samples, refused, service="pop3", reason="other"), 1)

    def test_name_filter(self):
        """``?name[]=`` restricts the answer, as prometheus_client's own handler does."""
        body, _ = Metrics(reactor).render(names=["popserv_pop3_sessions"])
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        self.assertEqual(names, {"popserv_pop3_sessions"})


class OptionTests(SynchronousTestCase):
    def options(self, *args: str) -> Options:
        data = Path(self.mktemp())
        data.mkdir()
        (data / "passwd").write_text("")
        options = Options()
        options.parseOptions(["--data", str(data), "--passwd", str(data / "passwd"), *args])
        return options

    def test_off_by_default(self):
        """Without --metrics nothing listens for it and the factory counts nothing."""
        service = makeService(self.options())
        listeners = [s for s in service if isinstance(s, Listener)]
        self.assertEqual([s.description for s in listeners], ["tcp:1110:interface=127.0.0.1"])
        factories = {s.factory for s in listeners}
        self.assertEqual([f.metrics for f in factories], [None])

    def test_metrics_listener(self):
        """--metrics adds a listener on its endpoint, and the factories count."""
        service = makeService(
            self.options("--metrics", "tcp:9110:interface=127.0.0.1", "--smtp", "tcp:2525")
        )
        by_description = {s.description: s for s in service if isinstance(s, Listener)}
        site = by_description["tcp:9110:interface=127.0.0.1"].factory
        pop3 = by_description["tcp:1110:interface=127.0.0.1"].factory
        smtp = by_description["tcp:2525"].factory
        self.assertIsNotNone(pop3.metrics)
        self.assertIs(smtp.metrics, pop3.metrics)
        self.assertIsNotNone(site.resource)

    def test_bad_endpoint(self):
        """A --metrics endpoint that cannot be parsed is a one-line start-up error."""
        with self.assertRaises(StartupError) as caught:
            makeService(self.options("--metrics", "tpc:9110"))
        self.assertIn("--metrics 'tpc:9110'", str(caught.exception))


class PrometheusServerTests(MetricsMixin, ServerTestCase):
    """A real Prometheus server scrapes the endpoint (Debian's prometheus package)."""

    def setUp(self):
        self.prometheus = shutil.which("prometheus")
        if self.prometheus is None:
            raise missing("prometheus is not installed (Debian's prometheus package)")
        super().setUp()
        self.serve_metrics()

    async def test_scraped(self):
        client = await in_own_thread(self.pop)
        await in_own_thread(login, client, "alice", "secret")
        await in_own_thread(client.quit)
        await self.wait_idle()
        target = urllib.parse.urlsplit(self.metrics_url).netloc
        here = Path(self.mktemp())
        here.mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            web = probe.getsockname()[1]
        config = here / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: popserv\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        log_file = open(here / "log", "wb")
        self.addCleanup(log_file.close)
        server = subprocess.Popen(
            [
                self.prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={here / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
                "--log.level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        self.addCleanup(server.wait, 10)
        self.addCleanup(server.terminate)

        def query(expression: str) -> list:
            url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode(
                {"query": expression}
            )
            try:
                _, body = http_get(url)
            except OSError:
                return []
            return json.loads(body)["data"]["result"]

        deadline = time.monotonic() + 20
        up = connections = []
        while time.monotonic() < deadline:
            up = await in_own_thread(query, 'up{job="popserv"}')
            connections = await in_own_thread(
                query, 'popserv_connections_total{listener="pop3"}'
            )
            if up and connections:
                break
            await deferLater(reactor, 0.25, lambda: None)
        log = (here / "log").read_text(errors="replace")
        self.assertEqual([r["value"][1] for r in up], ["1"], log)
        self.assertEqual([r["value"][1] for r in connections], ["1"], log)

