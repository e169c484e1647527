"""
PostgreSQL from the reactor: one bounded pool of connections per process,
used from a thread pool of its own.

psycopg 3's blocking API runs in those threads, as ``twisted.enterprise.adbapi``
does it, so the reactor never waits on the database.  Its async API would
need an asyncio loop under the reactor; the threads keep the plain epoll
reactor and cost one thread hop a query, which is small beside the round
trip to the server.  The pool (psycopg_pool) holds at most
``max_connections`` connections however many sessions there are, checks a
connection before lending it, and reconnects when the database comes back.

A database that cannot be reached is a :class:`DatabaseUnavailable`, a
``TemporaryFailure``: a login answers ``-ERR [SYS/TEMP]``, a delivery 4xx.

The password never comes from the command line: libpq reads ``PGPASSWORD``
or the password file (``PGPASSFILE``, ``~/.pgpass``); :func:`check_url`
refuses a URL that carries one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from popserv.core.errors import TemporaryFailure

log = Logger()

T = TypeVar("T")

#: Connections a process may hold: enough for the thread pool's queries in
#: flight, far below PostgreSQL's default ``max_connections`` (100) for a
#: few nodes with a few workers each.
MAX_CONNECTIONS = 8
#: Seconds a query waits for a connection (the database down, or every
#: connection busy) before the login or delivery is told to try later.
WAIT = 5.0
#: What each connection is opened with, so that no query waits for ever:
#: a statement over 10 s is cancelled by the server, and a database that
#: stops answering (a cut network) is given up within about a minute
#: (TCP keepalives, and unacknowledged data for 30 s).
CONNECTION_OPTIONS: dict[str, Any] = {
    "autocommit": True,
    "options": "-c statement_timeout=10000",
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}


#: Seconds a pooled connection may have been idle and still be lent
#: without a check (an empty query, one round trip).  Under load every
#: connection is back in use within milliseconds, and the check doubled
#: the round trips of a session of small queries (bench/README.rst,
#: "PostgreSQL store"); one idle longer (a firewall's or the server's idle
#: timeout, a restart overnight) is checked first.  A connection broken in
#: the last seconds fails its query: that login or delivery is told to try
#: again later, and the pool checks all its idle connections at once.
CHECK_AFTER_IDLE = 2.0


def _check_if_idle(connection: Any) -> None:
    """The pool's check: an empty query, for a connection idle over :data:`CHECK_AFTER_IDLE`."""
    from psycopg_pool import ConnectionPool

    used = getattr(connection, "_popserv_used", None)
    if used is None or time.monotonic() - used > CHECK_AFTER_IDLE:
        ConnectionPool.check_connection(connection)


class DatabaseUnavailable(TemporaryFailure):
    """The database cannot be reached, or failed: try again later."""


def check_url(url: str) -> str:
    """
    ``url`` if it is a PostgreSQL URL without a password; ValueError
    otherwise (whose text never repeats the value: it may hold one).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("not a postgresql:// URL")
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ValueError(
            "the URL carries a password, which the command line would show to every user"
            " of the machine: give it in PGPASSWORD or a password file (PGPASSFILE)"
        )
    return url


@contextmanager
def connect(url: str, wait: float = WAIT) -> Iterator[Any]:
    """
    One connection of its own, blocking (a command, a check at startup),
    closed after; DatabaseUnavailable if the database cannot be reached.
    """
    import psycopg

    try:
        connection = psycopg.connect(
            check_url(url), **{**CONNECTION_OPTIONS, "connect_timeout": max(1, round(wait))}
        )
    except psycopg.OperationalError as e:
        # libpq's message has a hint on a second line: one line is what is shown.
        raise DatabaseUnavailable(
            f"cannot reach the database: {' '.join(str(e).split())}"
        ) from None
    with connection:
        yield connection


class Database:
    """A connection pool to ``url``, used from the reactor (see the module)."""

    def __init__(
        self,
        url: str,
        reactor: Any,
        max_connections: int = MAX_CONNECTIONS,
        wait: float = WAIT,
    ) -> None:
        from psycopg_pool import ConnectionPool

        self.url = check_url(url)
        self.reactor = reactor
        self.wait = wait
        self.pool = ConnectionPool(
            url,
            min_size=0,
            max_size=max_connections,
            open=False,
            timeout=wait,
            # The pool retries a failed connection with a backoff that
            # doubles each time (1, 2, 4 ... s, for up to five minutes by
            # default), and starts no other attempt meanwhile: a database
            # back after a minute's outage would be used only at the next
            # retry, a minute later, every login failing until then.  Giving
            # up once a query would have stopped waiting anyway lets the
            # next query try at once.
            reconnect_timeout=wait,
            check=_check_if_idle,
            kwargs={**CONNECTION_OPTIONS, "connect_timeout": max(1, round(wait))},
            name="popserv",
        )
        # The pool says each failed connection attempt through the logging
        # module, which twistd does not route: to stderr, once per retry.
        # The failure reaches the login or delivery that waited instead.
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        self.threads = ThreadPool(minthreads=0, maxthreads=max_connections, name="popserv-db")
        self.running = False

    def start(self) -> None:
        """
        Open the pool and its threads: on the reactor thread, once it runs
        (threads made before twistd forks would not exist in the daemon).
        """
        if not self.running:
            self.running = True
            self.pool.open(wait=False)
            self.threads.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.threads.stop()
            self.pool.close()

    def connect_here(self) -> AbstractContextManager[Any]:
        """A connection outside the pool (:func:`connect`), blocking."""
        return connect(self.url, self.wait)

    def run(self, work: Callable[[Any], T]) -> Deferred[T]:
        """``work(connection)`` in a database thread; DatabaseUnavailable if it cannot run."""
        return self.in_thread(self._with_connection, work)

    def in_thread(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """
        ``f`` in one of the database's threads (from the reactor thread):
        code that looks things up with :meth:`fetch_one_here`, bounded by
        the pool's size rather than filling the reactor's own thread pool.
        """
        self.start()
        return deferToThreadPool(self.reactor, self.threads, f, *args, **kwargs)

    def _with_connection(self, work: Callable[[Any], T]) -> T:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as connection:
                try:
                    return work(connection)
                finally:
                    connection._popserv_used = time.monotonic()
        except (psycopg.OperationalError, PoolTimeout) as e:
            if not isinstance(e, PoolTimeout):  # (a PoolTimeout is an OperationalError too)
                # The others may be cut too (the server restarted): drop
                # them now rather than fail one query each.
                self.pool.check()
            raise DatabaseUnavailable(f"the database is unavailable: {e}") from e
        except psycopg.Error as e:
            # A query the database refuses (a --database-query that does not
            # fit the schema, a grant missing): the operator's to fix, so
            # said loudly, and to the client a temporary failure.
            log.error("The database refused a query: {error}", error=" ".join(str(e).split()))
            raise DatabaseUnavailable(f"the database refused a query: {e}") from e

    def fetch_one(self, query: str, parameters: dict[str, Any]) -> Deferred[dict[str, Any] | None]:
        """The first row ``query`` returns, as a dict by column name; None if none."""
        return self.run(lambda connection: _first_row(connection, query, parameters))

    def fetch_one_here(self, query: str, parameters: dict[str, Any]) -> dict[str, Any] | None:
        """:meth:`fetch_one`, blocking: for code in one of :meth:`in_thread`'s threads."""
        if not self.running:
            raise DatabaseUnavailable("the database's pool is not started")
        return self._with_connection(lambda connection: _first_row(connection, query, parameters))


def _first_row(connection: Any, query: str, parameters: dict[str, Any]) -> dict[str, Any] | None:
    from psycopg.rows import dict_row

    with connection.cursor(row_factory=dict_row) as cursor:
        cursor.execute(query, parameters)
        row: dict[str, Any] | None = cursor.fetchone()
        return row


__all__ = ["Database", "DatabaseUnavailable", "check_url", "connect"]
