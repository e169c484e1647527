"""
--metrics with --workers: real Metrics of two "workers" asked over real
channels (socketpairs on the reactor), merged by the parent's WorkerMetrics.
"""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from popserv.server.admission import LocalAdmission
from popserv.server.metrics import Metrics
from popserv.server.policy import Policy
from popserv.server.workers import AdmissionServer, connect_admission, serve_admission
from popserv.server.workers.metrics import WorkerMetrics, families
from tests.support.metrics import promtool_check


def samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class WorkerMetricsTests(TestCase):
    def setUp(self) -> None:
        self.admission = LocalAdmission(Policy(hostname="pop.example.org"), reactor)
        self.links: list[AdmissionServer] = []
        self.counts: list[Metrics] = []
        self.exits = 0
        self.page = WorkerMetrics(lambda: self.links, self.admission,
                                  lambda: len(self.links), lambda: self.exits)
        for _ in range(2):
            self.worker()

    def worker(self) -> Metrics:
        parent_end, worker_end = socket.socketpair()
        link = serve_admission(parent_end, self.admission, reactor)
        remote = connect_admission(worker_end.detach(), reactor)
        metrics = Metrics(reactor)
        remote.answer("metrics", lambda _: families(metrics))
        self.links.append(link)
        self.counts.append(metrics)
        self.addCleanup(self.end, link)
        return metrics

    async def end(self, link: AdmissionServer) -> None:
        if not link.lost:
            link.transport.loseConnection()
            await link.when_lost()

    async def scrape(self) -> dict:
        body, _ = await Deferred.fromCoroutine(self.page.render())
        text = body.decode()
        promtool_check(self, text)
        return samples(text)

    async def test_sums(self) -> None:
        a, b = self.counts
        a.connection_opened("pop3")
        b.connection_opened("pop3")
        b.connection_opened("smtp")
        a.login("USER", "success")
        a.login_checked(0.002)
        b.login_checked(0.2)
        self.admission.penalties.failed("192.0.2.1", "x")
        got = await self.scrape()
        self.assertEqual(got["popserv_connections_total", (("listener", "pop3"),)], 2)
        self.assertEqual(got["popserv_connections_total", (("listener", "smtp"),)], 1)
        self.assertEqual(got["popserv_login_seconds_count", ()], 2)
        self.assertAlmostEqual(got["popserv_login_seconds_sum", ()], 0.202)
        self.assertEqual(got["popserv_login_seconds_bucket", (("le", "0.0025"),)], 1)
        self.assertEqual(got["popserv_login_seconds_bucket", (("le", "+Inf"),)], 2)
        self.assertEqual(got["popserv_workers", ()], 2)
        self.assertEqual(got["popserv_login_penalties", ()], 1)

    async def test_counters_survive_a_departed_worker(self) -> None:
        """A worker that dies after a scrape leaves its counts; its replacement adds to them."""
        a, b = self.counts
        for _ in range(3):
            a.connection_opened("pop3")
        b.connection_opened("pop3")
        key = ("popserv_connections_total", (("listener", "pop3"),))
        self.assertEqual((await self.scrape())[key], 4)
        dead = self.links.pop(0)
        await self.end(dead)
        self.exits += 1
        fresh = self.worker()
        fresh.connection_opened("pop3")
        got = await self.scrape()
        self.assertEqual(got[key], 5)
        self.assertEqual(got["popserv_worker_exits_total", ()], 1)

    async def test_all_workers_replaced(self) -> None:
        """Every worker gone since the last scrape: their counts are still on the page."""
        a, b = self.counts
        a.connection_opened("pop3")
        b.connection_opened("smtp")
        await self.scrape()
        for link in list(self.links):
            self.links.remove(link)
            await self.end(link)
        self.exits += 2
        got = await self.scrape()
        self.assertEqual(got["popserv_connections_total", (("listener", "pop3"),)], 1)
        self.assertEqual(got["popserv_connections_total", (("listener", "smtp"),)], 1)
        self.assertEqual(got["popserv_workers", ()], 0)

    async def test_scrapes_at_once_count_once(self) -> None:
        """Two scrapes at once (two Prometheus servers) see the same totals."""
        a, _ = self.counts
        for _ in range(3):
            a.connection_opened("pop3")
        await self.scrape()
        dead = self.links.pop(0)
        await self.end(dead)
        first, second = await gatherResults([
            Deferred.fromCoroutine(self.page.render()), Deferred.fromCoroutine(self.page.render())])
        key = ("popserv_connections_total", (("listener", "pop3"),))
        self.assertEqual(samples(first[0].decode())[key], 3)
        self.assertEqual(samples(second[0].decode())[key], 3)

    async def test_a_silent_worker_keeps_its_last_samples(self) -> None:
        a, _ = self.counts
        a.connection_opened("pop3")
        key = ("popserv_connections_total", (("listener", "pop3"),))
        self.assertEqual((await self.scrape())[key], 1)
        # The first worker answers nothing now (its channel answers FAILED).
        self.links[0].ask = lambda kind, argument=None: self.links[1].ask("nothing")
        got = await self.scrape()
        self.flushLoggedErrors(LookupError)
        self.assertEqual(got[key], 1)
