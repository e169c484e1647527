"""
``GET /health`` on the ``--metrics`` listener: whether this node can serve,
for a load balancer's health check (HAProxy's ``option httpchk``, see
``contrib/haproxy/cluster.cfg``).

200 when it can; 503, with one line saying why, when it cannot:

- the server is stopping (SIGTERM: its listeners are closed or closing,
  so new clients belong elsewhere);
- with ``--workers``, no worker is running;
- with a database (``--database``), the database did not answer
  ``SELECT 1``, through the pool the sessions use, within
  :data:`DATABASE_WAIT` seconds.  A node cut off from its database can
  neither log anyone in nor renew its leases (it ends its sessions, see
  :mod:`popserv.stores.postgres.mailbox`): out of rotation, its clients go
  to the nodes that can serve them rather than meet ``-ERR [SYS/TEMP]``.

The answer is computed per request, never cached: HAProxy asks every two
seconds per node (one query a node, next to a session's few), and a cached
200 would hide a database lost since.  No access log line per check, as for
scrapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from popserv.logins.database import Database

log = Logger()

#: Seconds the database has to answer ``SELECT 1``.  Far above a healthy
#: round trip (well under a millisecond on a LAN), below HAProxy's check
#: timeout in contrib/haproxy/cluster.cfg (``timeout check 3s``), so that a
#: slow database is a 503 with a reason, not a check timing out.  A pool
#: whose connections are all busy for this long is a node that would make
#: its next logins wait as long.
DATABASE_WAIT = 2.0


def _select_one(connection: Any) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


class Health:
    """
    What ``/health`` answers: :meth:`check` fires with None when this node
    can serve, or with the reason it cannot.  ``stopped()`` says why the
    process cannot serve whatever the database does (None: it can).
    """

    def __init__(
        self,
        reactor: Any,
        database: Database | None = None,
        stopped: Callable[[], str | None] = lambda: None,
        wait: float = DATABASE_WAIT,
    ) -> None:
        self.reactor = reactor
        self.database = database
        self.stopped = stopped
        self.wait = wait

    def check(self) -> Deferred[str | None]:
        why = self.stopped()
        if why is not None or self.database is None:
            return succeed(why)
        asked = self.database.run(_select_one)
        # A query that hangs (the network to the database cut, no RST) is
        # left to the pool's own timeouts; this answer does not wait for it.
        asked.addTimeout(self.wait, self.reactor)

        def failed(failure: Failure) -> str:
            return f"the database did not answer: {failure.getErrorMessage() or 'timed out'}"

        return asked.addCallbacks(lambda _: None, failed)


class HealthPage(Resource):
    """``GET /health``: 200 ``OK``, or 503 and the reason (see the module)."""

    isLeaf = True

    def __init__(self, health: Health) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web
        self._health = health
        self._said: str | None = None

    def render_GET(self, request: Request) -> Any:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(why: str | None) -> None:
            self._log_change(why)
            if gone:  # The checker gave up waiting.
                return
            request.setHeader("Content-Type", "text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
            request.setHeader("Cache-Control", "no-store")  # type: ignore[no-untyped-call]
            if why is not None:
                request.setResponseCode(503)
            request.write(f"{why or 'OK'}\n".encode())  # type: ignore[no-untyped-call]
            request.finish()  # type: ignore[no-untyped-call]  # twisted.web

        self._health.check().addCallback(answer)
        return NOT_DONE_YET

    def _log_change(self, why: str | None) -> None:
        # Once per change, not once per check (every 2 s, for ever).
        if why != self._said:
            if why is None:
                log.info("Health: serving again")
            else:
                log.warn("Health: cannot serve: {why}", why=why)
            self._said = why


class MetricsRoot(Resource):
    """
    The ``--metrics`` listener's root: ``/health`` answered by ``health``,
    every other path by ``page`` (the metrics, as before ``/health``).
    """

    def __init__(self, page: Resource, health: Health) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web
        self._page = page
        self._health = HealthPage(health)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path == b"health" and not request.postpath:
            return self._health
        return self._page


__all__ = ["DATABASE_WAIT", "Health", "HealthPage", "MetricsRoot"]
