"""
``GET /health`` on the ``--metrics`` listener (:mod:`popserv.server.health`):
200 while the node can serve, 503 with the reason when it is stopping or
its database does not answer, over real HTTP; every other path still the
metrics.  tests/clients/test_cluster.py has HAProxy act on it.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from popserv.logins.database import DatabaseUnavailable
from popserv.server.health import Health
from popserv.server.metrics import Metrics


class _Database:
    """Answers each query as told: "ok", "down" (DatabaseUnavailable) or "hang"."""

    def __init__(self) -> None:
        self.state = "ok"
        self.queries = 0
        self.hanging: list[Deferred[Any]] = []

    def run(self, work: Any) -> Deferred[Any]:
        self.queries += 1
        if self.state == "ok":
            return succeed(None)
        if self.state == "down":
            return fail(DatabaseUnavailable("the database is unavailable: connection refused"))
        hung: Deferred[Any] = Deferred()
        self.hanging.append(hung)
        return hung


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class HealthTests(TestCase):
    def serve(self, health: Health) -> str:
        port = reactor.listenTCP(0, Metrics(reactor).site(health), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def test_without_a_database(self) -> None:
        """No database: 200 while serving; 503 saying so once it stops."""
        stopping: list[str] = []
        url = self.serve(Health(reactor, None, lambda: stopping[0] if stopping else None))
        self.assertEqual(await deferToThread(get, url + "/health"), (200, "OK\n"))
        stopping.append("the server is stopping")
        self.assertEqual(
            await deferToThread(get, url + "/health"), (503, "the server is stopping\n")
        )

    async def test_the_database_is_asked_each_time(self) -> None:
        """Each check asks the database (nothing cached): down is 503, back is 200."""
        database = _Database()
        url = self.serve(Health(reactor, database))  # type: ignore[arg-type]
        self.assertEqual((await deferToThread(get, url + "/health"))[0], 200)
        database.state = "down"
        status, text = await deferToThread(get, url + "/health")
        self.assertEqual(status, 503)
        self.assertIn("the database did not answer", text)
        self.assertIn("connection refused", text)
        database.state = "ok"
        self.assertEqual((await deferToThread(get, url + "/health"))[0], 200)
        self.assertEqual(database.queries, 3)

    async def test_a_database_that_hangs_is_503_after_the_wait(self) -> None:
        """A query that never answers (a cut network): 503 once the wait is over."""
        database = _Database()
        database.state = "hang"
        url = self.serve(Health(reactor, database, wait=0.2))  # type: ignore[arg-type]
        status, text = await deferToThread(get, url + "/health")
        self.assertEqual(status, 503)
        self.assertIn("the database did not answer", text)
        # The hung query answering late changes nothing, and raises nothing.
        database.hanging[0].callback(None)

    async def test_stopping_wins_without_asking_the_database(self) -> None:
        database = _Database()
        url = self.serve(Health(reactor, database, lambda: "the server is stopping"))  # type: ignore[arg-type]
        self.assertEqual((await deferToThread(get, url + "/health"))[0], 503)
        self.assertEqual(database.queries, 0)

    async def test_other_paths_are_still_the_metrics(self) -> None:
        url = self.serve(Health(reactor))
        for path in ("/metrics", "/", "/health/x"):
            status, text = await deferToThread(get, url + path)
            self.assertEqual(status, 200)
            self.assertIn("popserv_connections_total", text)


class ParentHealthTests(TestCase):
    def test_workers_parent(self) -> None:
        """--workers: the parent is healthy while it runs and has a worker."""
        from types import SimpleNamespace

        from popserv.server.service import _supervisor_health

        running = SimpleNamespace(running=True, workers={1: object()})
        self.assertIsNone(_supervisor_health(running))
        no_worker = SimpleNamespace(running=True, workers={})
        self.assertEqual(_supervisor_health(no_worker), "no worker is running")
        stopping = SimpleNamespace(running=False, workers={1: object()})
        self.assertEqual(_supervisor_health(stopping), "the server is stopping")
