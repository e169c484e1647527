"""
``popserv migrate`` against a real PostgreSQL: a Maildir that Dovecot
served copied into the PostgreSQL store and back, every UIDL, size, place
in the listing, delivery time and seen flag as the source's store served
them; twice without copying twice, resumed after an interruption, and
users in use skipped.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path

import psycopg
from attrs import evolve
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from popserv.core.body import wire_size
from popserv.core.errors import MailboxInUse
from popserv.logins.database import Database, connect
from popserv.server.cli import main
from popserv.stores.layout import ensure_maildir
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.uidlist import UIDLIST_FILE, parse_uidlist
from popserv.stores.maildir.uidls import parse_uidl_format
from popserv.stores.postgres import migrate, queries, schema
from popserv.stores.postgres.delivery import new_uidl
from popserv.stores.postgres.mailbox import PostgresMailbox
from tests.support.maildirs import acquire
from tests.support.mailstores import Seen, maildir_seen, postgres_seen, released
from tests.support.postgres import store_database

DOVECOT = parse_uidl_format("dovecot")

#: Dovecot 2.3's uidlist for the first four messages (UIDVALIDITY 0x6b05669f).
UIDLIST = (
    b"3 V1795516063 N5 G301bef0c9f66056bfe05000083ecc375\n"
    b"1 :1700000001.M1P1.host\n"
    b"2 :1700000002.M2P1.host,S=25,W=28\n"
    b"3 :plainname\n"
    b"4 P0badc0ffee :1700000003.M3P1.host\n"
)

#: The messages the UIDLs above served, and Dovecot's UIDLs for them.
DOVECOT_UIDLS = ["000000016b05669f", "000000026b05669f", "000000036b05669f", "0badc0ffee"]


def fill(maildir: Path) -> None:
    """A Maildir Dovecot served (seen and unseen, CRLF and LF), then popserv."""
    second = b"Subject: two\n\n.dot first\n"
    assert (len(second), wire_size(second)) == (25, 28)
    files = [
        ("cur", "1700000001.M1P1.host:2,S", b"Subject: one\r\n\r\nread already\r\n"),
        ("new", "1700000002.M2P1.host,S=25,W=28", second),
        ("cur", "plainname:2,", b"Subject: three\n\nno name time\n"),
        ("cur", "1700000003.M3P1.host:2,RS", b"Subject: four\n\nsaved UIDL\n" * 15000),
        ("new", "1700000100.M9P9.host", b"Subject: five\n\narrived after\n"),
        ("new", "1700000200.M1P9.host", b""),
    ]
    for sub, name, data in files:
        (maildir / sub / name).write_bytes(data)
    os.utime(maildir / "cur" / "plainname:2,", (1700000050, 1700000050))
    (maildir / UIDLIST_FILE).write_bytes(UIDLIST)


def run_cli(test: TestCase, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    test.patch(sys, "stdout", out)
    test.patch(sys, "stderr", err)
    code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class MigrateTests(TestCase):
    def setUp(self) -> None:
        self.url = store_database()
        self.database = Database(self.url, reactor)
        self.addCleanup(self.database.stop)
        self.root = Path(self.mktemp())
        self.maildir = ensure_maildir(self.root / "example.org" / "alice")
        fill(self.maildir)
        with psycopg.connect(self.url, autocommit=True) as connection:
            for user in ("alice@example.org", "bob@example.org"):
                connection.execute("INSERT INTO mailbox (username) VALUES (%s)", (user,))

    def to_postgresql(self, user: str = "alice@example.org", **options: object) -> migrate.Tally:
        with connect(self.url) as connection:
            return migrate.to_postgresql(
                connection, user, MaildirPath.of(self.maildir), DOVECOT, **options
            )

    def to_maildir(
        self, path: Path, user: str = "alice@example.org", scheme=DOVECOT, **options: object
    ) -> migrate.Tally:
        with connect(self.url) as connection:
            return migrate.to_maildir(connection, user, MaildirPath.of(path), scheme, **options)

    def assertSame(self, got: Seen, expected: Seen) -> None:
        """
        The same maildrop; delivery times as close as a file name keeps them
        (whole seconds, and popserv's UIDL is made just before the row).
        """
        self.assertEqual(evolve(got, received=[]), evolve(expected, received=[]))
        for a, b in zip(got.received, expected.received, strict=True):
            self.assertLess(abs(a - b), 2)

    def count(self) -> int:
        with psycopg.connect(self.url, autocommit=True) as connection:
            return connection.execute("SELECT count(*) FROM popserv.messages").fetchone()[0]

    async def test_dovecot_uidls_carry_over(self) -> None:
        """The store serves what the Maildir served: UIDLs, sizes, order, times, flags, bytes."""
        before = maildir_seen(self.maildir)
        self.assertEqual(before.uids[:4], DOVECOT_UIDLS)
        tally = self.to_postgresql()
        self.assertEqual((tally.copied, tally.already, tally.failed), (6, 0, 0))
        self.assertEqual(await postgres_seen(self.database, "alice@example.org"), before)
        self.assertEqual(before.seen, [True, False, False, True, False, False])
        self.assertEqual(before.received[:3], [1700000001, 1700000002, 1700000050])
        self.assertEqual(maildir_seen(self.maildir), before)  # copied, not moved

    async def test_twice_copies_nothing_twice(self) -> None:
        self.to_postgresql()
        tally = self.to_postgresql()
        self.assertEqual((tally.copied, tally.already, tally.failed), (0, 6, 0))
        self.assertEqual(self.count(), 6)
        with psycopg.connect(self.url, autocommit=True) as connection:
            logins = connection.execute("SELECT last_login FROM popserv.maildrops").fetchall()
        self.assertEqual(logins, [(None,)])  # a migration is no login: no LOGIN-DELAY

    async def test_interrupted_then_resumed(self) -> None:
        """A run that dies keeps its committed batches; the next run copies only the rest."""
        before = maildir_seen(self.maildir)
        store = queries.store
        calls = 0

        def dies_at_the_fourth(*args: object, **kwargs: object) -> int:
            nonlocal calls
            calls += 1
            if calls == 4:
                raise KeyboardInterrupt
            return store(*args, **kwargs)

        self.patch(migrate.queries, "store", dies_at_the_fourth)
        tally = migrate.Tally()
        with self.assertRaises(KeyboardInterrupt):
            self.to_postgresql(batch=migrate.Batch(messages=2), tally=tally)
        self.assertEqual((tally.copied, self.count()), (2, 2))  # the second batch was undone
        self.patch(migrate.queries, "store", store)
        tally = self.to_postgresql()  # the lease was given back: not in use
        self.assertEqual((tally.copied, tally.already, tally.failed), (4, 2, 0))
        self.assertEqual(await postgres_seen(self.database, "alice@example.org"), before)

    async def test_unreadable_messages_skipped(self) -> None:
        """One file fails to open, one halfway through: both reported, the rest copied."""
        opening = migrate._open_message

        def refuse(places, where, name):
            if name.startswith("plainname"):
                raise PermissionError(errno.EACCES, "Permission denied")
            return opening(places, where, name)

        class Breaking(migrate._MessageFile):
            """A file that fails halfway through when it is big."""

            def __iter__(self):
                # Past the first database chunk: a row was written, then undone.
                read = 0
                for chunk in super().__iter__():
                    yield chunk
                    read += len(chunk)
                    if read > schema.CHUNK_SIZE:
                        raise OSError(errno.EIO, "Input/output error")

        self.patch(migrate, "_open_message", refuse)
        self.patch(migrate, "_MessageFile", Breaking)
        notes: list[str] = []
        tally = self.to_postgresql(note=notes.append)
        self.assertEqual((tally.copied, tally.failed), (4, 2))
        self.assertEqual(
            notes,
            [
                "cur/plainname:2,: cannot open: Permission denied",
                "cur/1700000003.M3P1.host:2,RS: cannot read: Input/output error",
            ],
        )
        seen = await postgres_seen(self.database, "alice@example.org")
        self.assertEqual(
            seen.uids, [u for i, u in enumerate(maildir_seen(self.maildir).uids) if i not in (2, 3)]
        )

    async def test_back_to_maildir(self) -> None:
        """Into an empty Maildir: Dovecot's UIDLs by dovecot-uidlist records, popserv's by name."""
        native = new_uidl()
        with psycopg.connect(self.url, autocommit=True) as connection, connection.transaction():
            queries.store(
                connection,
                "alice@example.org",
                [b"Subject: pg\n\nnative\n"],
                uidl=native,
                seen=True,
            )
        self.to_postgresql()
        stored = await postgres_seen(self.database, "alice@example.org")
        self.assertEqual(stored.uids[0], native)
        target = self.root / "restored"
        tally = self.to_maildir(target)
        self.assertEqual((tally.copied, tally.already, tally.failed), (7, 0, 0))
        self.assertSame(maildir_seen(target), stored)
        self.assertIn(f"{native}:2,S", os.listdir(target / "cur"))  # named by its UIDL
        self.assertEqual(len(os.listdir(target / "cur")), 3)
        uidlist = parse_uidlist((target / UIDLIST_FILE).read_bytes())
        assert uidlist is not None
        self.assertEqual([r.pop3_uidl for r in uidlist.records.values()], stored.uids)
        # Again, and into the Maildir it all came from: nothing to copy but the new one.
        self.assertEqual(self.to_maildir(target).already, 7)
        tally = self.to_maildir(self.maildir)
        self.assertEqual((tally.copied, tally.already), (1, 6))
        restored = os.stat(self.maildir / "cur" / f"{native}:2,S").st_mtime
        self.assertAlmostEqual(restored, stored.received[0], places=5)
        self.assertEqual(sorted(maildir_seen(self.maildir).uids), sorted(stored.uids))

    async def test_back_to_maildir_by_names_alone(self) -> None:
        """popserv's own UIDLs need no dovecot-uidlist: the files are named by them."""
        uidls = [new_uidl() for _ in range(3)]
        with psycopg.connect(self.url, autocommit=True) as connection, connection.transaction():
            for i, uidl in enumerate(uidls):
                queries.store(
                    connection, "bob@example.org", [b"Subject: %d\n\n." % i], uidl=uidl, seen=i == 1
                )
        target = self.root / "bob"
        self.to_maildir(target, "bob@example.org")
        self.assertFalse((target / UIDLIST_FILE).exists())
        self.assertEqual(sorted(os.listdir(target / "new")), sorted([uidls[0], uidls[2]]))
        self.assertSame(maildir_seen(target), await postgres_seen(self.database, "bob@example.org"))
        self.assertEqual(maildir_seen(target, "maildir").uids, uidls)

    async def test_resumed_into_maildir_reuses_its_records(self) -> None:
        """Records written before an interruption are used again: no second record, no duplicate."""
        self.to_postgresql()
        stored = await postgres_seen(self.database, "alice@example.org")
        target = self.root / "restored"
        write = migrate.write_named
        calls = 0

        def dies_at_the_third(*args: object, **kwargs: object) -> int:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise KeyboardInterrupt
            return write(*args, **kwargs)

        self.patch(migrate, "write_named", dies_at_the_third)
        with self.assertRaises(KeyboardInterrupt):
            self.to_maildir(target)
        self.patch(migrate, "write_named", write)
        tally = self.to_maildir(target)
        self.assertEqual((tally.copied, tally.already), (4, 2))
        self.assertSame(maildir_seen(target), stored)
        uidlist = parse_uidlist((target / UIDLIST_FILE).read_bytes())
        assert uidlist is not None
        self.assertEqual(len(uidlist.records), 6)
        self.assertEqual(len(os.listdir(target / "tmp")), 0)

    async def test_uidls_that_are_no_file_names(self) -> None:
        """
        A UIDL that cannot name a file (or would name it wrongly) is kept by a
        dovecot-uidlist record; with --uidl-format maildir, which reads none,
        it cannot be kept: reported, not copied.
        """
        uidls = ["a/b", ".hidden", "x:2,S", "y,W=1", "fine"]
        with psycopg.connect(self.url, autocommit=True) as connection, connection.transaction():
            for uidl in uidls:
                queries.store(connection, "bob@example.org", [b"x\n"], uidl=uidl, delivered=1e9)
        stored = await postgres_seen(self.database, "bob@example.org")
        notes: list[str] = []
        plain = self.root / "plain"
        tally = self.to_maildir(
            plain, "bob@example.org", scheme=parse_uidl_format("maildir"), note=notes.append
        )
        self.assertEqual((tally.copied, tally.failed), (1, 4))
        self.assertEqual(len(notes), 4)
        self.assertIn("--uidl-format maildir", notes[0])
        self.assertEqual(maildir_seen(plain, "maildir").uids, ["fine"])
        target = self.root / "bob"
        self.assertEqual(self.to_maildir(target, "bob@example.org").copied, 5)
        self.assertSame(maildir_seen(target), stored)

    async def test_in_use_skipped(self) -> None:
        """A session's lease, or a Maildir session's lock: that user waits for another run."""
        session = await PostgresMailbox.open(self.database, "alice@example.org")
        with self.assertRaises(MailboxInUse):
            self.to_postgresql()
        session.close()
        await released(self.database)
        lock = acquire(self.maildir)
        with self.assertRaises(MailboxInUse):
            self.to_postgresql()
        lock.release()
        self.assertEqual(self.count(), 0)
        await released(self.database)  # the migration gave its lease back too

    async def test_command(self) -> None:
        """Every user of the accounts; one line each, the totals; 1 when one was in use."""
        bob = ensure_maildir(self.root / "example.org" / "bob")
        (bob / "new" / "1700000000.M1P1.host").write_bytes(b"Subject: bob\n\n")
        template = f"{self.root}/{{domain}}/{{local}}"
        args = ("migrate", "--database", self.url, "--maildir", template)
        lock = acquire(bob)
        code, out, err = run_cli(self, *args)
        lock.release()
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "alice@example.org: 6 copied, 0 already there, 0 failed",
                "bob@example.org: skipped, in use by a POP3 session: run the command again later",
                "1 user: 6 copied, 0 already there, 0 failed; 1 skipped (in use).",
                "The Maildirs were copied, not moved: they are unchanged.",
            ],
        )
        code, out, err = run_cli(self, *args, "--quiet")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[0], "2 users: 1 copied, 6 already there, 0 failed.")
        code, out, err = run_cli(self, *args, "--to", "maildir", "bob@example.org", "carol")
        self.assertEqual(code, 1)
        self.assertEqual(err, "carol: no such user\n")
        self.assertIn("bob@example.org: 0 copied, 1 already there, 0 failed", out)
        self.assertIn("still in PostgreSQL too", out)

    def test_command_refuses_without_schema(self) -> None:
        bare = self.url.rsplit("/", 1)[0] + "/postgres"
        code, _, err = run_cli(self, "migrate", "--database", bare)
        self.assertEqual(code, 1)
        self.assertIn("popserv db init", err)
