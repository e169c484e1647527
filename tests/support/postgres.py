"""
A real PostgreSQL for the tests: Debian's ``initdb`` and ``pg_ctl`` in a
temporary directory, listening on a free loopback port and a socket in that
directory, with ``trust`` authentication (nothing but this process's tests
can reach it).  Run as the ``postgres`` user (or ``nobody``) when the tests
run as root, since PostgreSQL refuses to run as root.

One server per test process, started by the first test that asks
(:func:`postgresql`) and stopped when the process exits; each test gets a
database of its own (:meth:`PostgreSQL.database`).

Where PostgreSQL is not installed the tests skip, or fail in CI (see
:mod:`tests.support.peers`).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.crashtraffic import MESSAGE_ID
from tests.support.peers import missing
from tests.support.processes import free_port


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


#: The columns of Postfixadmin's ``mailbox`` table (PostgreSQL flavour).
POSTFIXADMIN_MAILBOX = """
CREATE TABLE mailbox (
    username varchar(255) NOT NULL PRIMARY KEY,
    password varchar(255) NOT NULL DEFAULT '',
    name varchar(255) NOT NULL DEFAULT '',
    maildir varchar(255) NOT NULL DEFAULT '',
    quota bigint NOT NULL DEFAULT 0,
    local_part varchar(255) NOT NULL DEFAULT '',
    domain varchar(255) NOT NULL DEFAULT '',
    created timestamp with time zone DEFAULT now(),
    modified timestamp with time zone DEFAULT now(),
    active boolean NOT NULL DEFAULT true
)
"""


class PostgreSQL:
    """One PostgreSQL server in a temporary directory."""

    def __init__(self) -> None:
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise missing("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="popserv-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = None
        if os.getuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._names = itertools.count(1)

    def _run(self, *command: str) -> None:
        ids = {}
        if self.user is not None:
            ids = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, check=False,
            cwd=self.root, **ids,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self._certificates()
        self.resume()

    def _certificates(self) -> None:
        """TLS on the same port, for clients that ask (``sslmode``), with :attr:`ca` to trust."""
        from tests.support.certs import CA

        authority = CA("popserv test PostgreSQL CA")
        self.ca = authority.write(self.root / "ca.pem")
        self.cert, self.key = authority.issue("127.0.0.1", "localhost").write(self.root, "server")
        self.key.chmod(0o600)
        if self.user is not None:
            for path in (self.ca, self.cert, self.key):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def pause(self) -> None:
        """
        Stop the server: its clients' connections are cut, as by a crash or
        a network cut (a fast shutdown, so what was committed stays).
        """
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start it (again), on the same port."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.root} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            f" -c ssl=on -c ssl_cert_file={self.cert} -c ssl_key_file={self.key}"
        )
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"test{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


_servers: list[PostgreSQL] = []


def postgresql() -> PostgreSQL:
    """This test process's PostgreSQL, started at the first call."""
    if not _servers:
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise missing("psycopg is not installed (pip install '.[postgresql]')") from None
        server = PostgreSQL()
        server.start()
        atexit.register(server.stop)
        _servers.append(server)
    return _servers[0]


def store_database() -> str:
    """A new database with Postfixadmin's table and the mail store's tables; its URL."""
    import psycopg

    from popserv.stores.postgres.schema import upgrade

    url = postgresql().database()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(POSTFIXADMIN_MAILBOX)
        upgrade(connection)
    return url



def stored_whole(url: str, user: str) -> dict[str, list[bytes]]:
    """
    ``user``'s messages in the mail store by Message-ID (``#ID`` without
    one), each checked whole: its chunks numbered from 0 without a gap, as
    many octets as its row says, its wire size the one listed; and every
    maildrop's counters the sums of its messages.  AssertionError if not.
    """
    import psycopg

    from popserv.core.body import wire_size

    found: dict[str, list[bytes]] = {}
    with psycopg.connect(url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT m.id, m.octets, m.wire_size FROM popserv.messages m"
            " JOIN popserv.maildrops d ON d.id = m.maildrop WHERE d.name = %s",
            (user,),
        ).fetchall()
        for row_id, octets, wire in rows:
            chunks = connection.execute(
                "SELECT seq, data FROM popserv.message_chunks WHERE message = %s ORDER BY seq",
                (row_id,),
            ).fetchall()
            if [seq for seq, _ in chunks] != list(range(len(chunks))):
                raise AssertionError(f"message {row_id}: chunks missing")
            data = b"".join(bytes(chunk) for _, chunk in chunks)
            if (len(data), wire_size(data)) != (octets, wire):
                raise AssertionError(f"message {row_id}: half-stored")
            match = MESSAGE_ID.search(data)
            key = match.group(1).decode() if match else f"#{row_id}"
            found.setdefault(key, []).append(data)
        counters = connection.execute(
            "SELECT d.name, d.octets, d.messages, coalesce(sum(m.octets), 0), count(m.id)"
            " FROM popserv.maildrops d LEFT JOIN popserv.messages m ON m.maildrop = d.id"
            " GROUP BY d.id"
        ).fetchall()
    for name, octets, messages, total, count in counters:
        if (octets, messages) != (total, count):
            raise AssertionError(f"{name}: counters out of step")
    return found
