"""
The PostgreSQL behind ``popserv-pg``: a private cluster in the bench's data
directory (Debian's ``initdb`` and ``pg_ctl``, as ``tests/support/postgres.py``
runs one), set up as production would be, and the bench's mail loaded into
it.

Unlike the tests' cluster, nothing durable is turned off: ``fsync``,
``synchronous_commit`` and ``full_page_writes`` keep their defaults (on),
so every commit (a lease taken, a QUIT's commit, a delivery) waits for its
WAL to reach the disk, as it would in production.  What is set (see
:data:`SETTINGS`) is what a DBA would size for a dedicated mail database.

The mail is the same as the other servers': every user's messages from the
master Maildirs (:class:`bench._dataset.Dataset`), with the same bytes, the
same ``seen`` flags (``cur/...:2,S``) and their unique names as UIDLs.  It
is loaded with ``COPY ... (FORMAT BINARY)``, a few statements per maildrop
whatever its size (100,000 messages in seconds), then vacuumed, so the
listing is an index-only scan from the first login, as it would be once
autovacuum has passed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._dataset import Dataset, password
from bench._servers import HOST, free_port

#: PostgreSQL's settings for the bench (``postgres -c``): durable commits,
#: memory sized for this machine's 24 GiB as the usual guides size it for a
#: dedicated database host that shares its cores with its clients.
SETTINGS: dict[str, str] = {
    # The defaults, spelled out: what makes a commit durable.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    # B3's two maildrops and their index are about 600 MB: they fit, as a
    # busy mail database's hot maildrops would.  PostgreSQL's guides say
    # 25% of RAM on a dedicated host; this machine runs the clients and
    # the other servers too.
    "shared_buffers": "1GB",
    "effective_cache_size": "8GB",
    # The load writes ~1 GB of WAL: no forced checkpoint in the middle of it.
    "max_wal_size": "4GB",
    "max_connections": "200",
    # Where the database's time goes, per statement (see bench/README.rst).
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
}

#: Postfixadmin's ``mailbox`` table (PostgreSQL flavour), as the tests make it.
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


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def unavailable() -> str | None:
    """None when PostgreSQL and psycopg are installed here, else why not."""
    if _binary("initdb") is None or _binary("pg_ctl") is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install '.[postgresql]')"
    return None


class Cluster:
    """One PostgreSQL cluster under ``root``, run as ``postgres`` when we are root."""

    def __init__(self, root: Path) -> None:
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        assert initdb is not None and pg_ctl is not None
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.user: pwd.struct_passwd | None = None
        root.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(root, self.user.pw_uid, self.user.pw_gid)
        self.running = False

    def _run(self, *command: str) -> str:
        ids: dict[str, Any] = {}
        if self.user is not None:
            ids = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=self.root,
            **ids,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
        options = [f"-c listen_addresses={HOST}", f"-c port={self.port}",
                   f"-c unix_socket_directories={self.root}"]  # fmt: skip
        options += [f"-c {k}={v}" for k, v in SETTINGS.items()]
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", " ".join(options), "-w", "-t", "120", "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self.running = False
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stopped and started again: nothing of the data left in its buffers."""
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def postmaster(self) -> int | None:
        """The postmaster's pid (its children are the backends), None when stopped."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def connection(self, database: str = "postgres") -> Iterator[Any]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as connection:
            yield connection

    def version(self) -> str:
        with self.connection() as c:
            return str(c.execute("SHOW server_version").fetchone()[0])


def database_name(server: str) -> str:
    """The database a popserv-pg variant serves (``popserv-pg-w2``: ``popserv_pg_w2``)."""
    return server.replace("-", "_")


def create_store(
    cluster: Cluster, name: str, tree: Path, dataset: Dataset, say: Callable[[str], None]
) -> None:
    """
    Database ``name`` with Postfixadmin's table, popserv's tables (made by
    ``popserv db init``) and the dataset; a copy of the first one made, for
    the variants after it (``CREATE DATABASE ... TEMPLATE``, a file copy).
    """
    with cluster.connection() as c:
        made = [
            r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname LIKE 'popserv%'")
        ]
        if made:
            began = time.monotonic()
            c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{made[0]}"')
            say(f"  {name}: copied from {made[0]} in {time.monotonic() - began:.1f} s")
            return
        c.execute(f'CREATE DATABASE "{name}"')
    url = cluster.url(name)
    with cluster.connection(name) as c:
        c.execute(POSTFIXADMIN_MAILBOX)
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-m", "popserv.server.cli", "db", "init", "--database", url],
        capture_output=True, text=True, env=env, check=False, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"popserv db init: {done.stdout}{done.stderr}")
    began = time.monotonic()
    count = load(cluster, name, dataset)
    say(f"  {name}: {count:,} messages loaded and vacuumed in {time.monotonic() - began:.1f} s")


def _messages(maildir: Path) -> list[tuple[str, Path, bool]]:
    """(unique name, path, seen) of a Maildir's messages, in the order delivered."""
    found = []
    for sub in ("cur", "new"):
        for entry in os.scandir(maildir / sub):
            base, _, flags = entry.name.partition(":2,")
            found.append((base, Path(entry.path), "S" in flags))
    found.sort(key=lambda m: _order(m[0]))
    return found


def _order(unique: str) -> tuple[int, int, str]:
    """Dovecot names sort by their time, then their counter (``Q<n>``)."""
    seconds, _, rest = unique.partition(".")
    q = rest.split(".", 1)[0].rpartition("Q")[2]
    return (int(seconds) if seconds.isdigit() else 0, int(q) if q.isdigit() else 0, unique)


def load(cluster: Cluster, database: str, dataset: Dataset) -> int:
    """Every user of ``dataset`` and their messages into ``database``; how many messages."""
    from popserv.core.body import WireSizeCounter
    from popserv.stores.maildir.names import uidl_for
    from popserv.stores.postgres.schema import CHUNK_SIZE

    users = dataset.mutable + dataset.shared
    total = 0
    # Wire sizes by content: B3's 100,000 messages share 1,000 bodies.
    wire: dict[bytes, int] = {}
    with cluster.connection(database) as c:
        with c.cursor() as cursor, cursor.copy(
            "COPY mailbox (username, password, local_part, domain) FROM STDIN"
        ) as copy:
            for user in users:
                copy.write_row((user, "{PLAIN}" + password(user), user, "example.org"))
        for user in users:
            messages = _messages(dataset.master_maildir(user))
            with c.transaction(), c.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO popserv.maildrops (name) VALUES (%s) RETURNING id", (user,)
                )
                (maildrop,) = cursor.fetchone()
                bodies = []
                octets = 0
                with cursor.copy(
                    "COPY popserv.messages (maildrop, uidl, octets, wire_size, delivered, seen)"
                    " FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["int8", "text", "int8", "int8", "timestamptz", "bool"])
                    for unique, path, seen in messages:
                        data = path.read_bytes()
                        if data not in wire:
                            counter = WireSizeCounter()
                            counter.feed(data)
                            wire[data] = counter.result()
                        uidl, when = uidl_for(unique), _delivered(unique)
                        copy.write_row((maildrop, uidl, len(data), wire[data], when, seen))
                        bodies.append(data)
                        octets += len(data)
                # One loader, one session: the ids come out in the order written.
                cursor.execute(
                    "SELECT id FROM popserv.messages WHERE maildrop = %s ORDER BY id", (maildrop,)
                )
                ids = [row[0] for row in cursor.fetchall()]
                with cursor.copy(
                    "COPY popserv.message_chunks (message, seq, data) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["int8", "int4", "bytea"])
                    for message, data in zip(ids, bodies, strict=True):
                        for seq, at in enumerate(range(0, max(len(data), 1), CHUNK_SIZE)):
                            copy.write_row((message, seq, data[at : at + CHUNK_SIZE]))
                cursor.execute(
                    "UPDATE popserv.maildrops SET octets = %s, messages = %s WHERE id = %s",
                    (octets, len(ids), maildrop),
                )
            total += len(messages)
        c.execute("VACUUM (ANALYZE)")
        c.execute("CHECKPOINT")
    return total


def _delivered(unique: str) -> Any:
    import datetime

    seconds = unique.partition(".")[0]
    stamp = int(seconds) if seconds.isdigit() else 0
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC)
