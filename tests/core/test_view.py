"""
A session's view of its maildrop capped by ``--max-listed``: the newest
messages, numbered from 1, over indexes into the whole listing; and the
per-user ``max_listed`` setting it comes from.
"""

from __future__ import annotations

from array import array

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from popserv.core import errors
from popserv.core.view import SECONDS_PER_DAY, MaildropView
from popserv.interfaces import IAccountSettings, Listing
from popserv.logins.accounts import (
    AccountSettings,
    Announcement,
    parse_max_listed,
    session_settings,
)
from popserv.logins.sqlaccounts import entry_of

NOW = 1_800_000_000.0


def listing(count: int = 10, **columns: object) -> Listing:
    """``count`` messages ``u1``... of sizes 1, 2, 3 ..., oldest first."""
    return Listing(
        uids=[f"u{n}" for n in range(1, count + 1)],
        sizes=array("q", range(1, count + 1)),
        **columns,  # type: ignore[arg-type]
    )


class CappedViewTests(SynchronousTestCase):
    def test_newest_numbered_from_one(self):
        """The last 3 of 10 are messages 1-3; the store's indexes are 7-9."""
        view = MaildropView(listing(), 3)
        self.assertTrue(view.capped)
        self.assertEqual(view.stat(), (3, 8 + 9 + 10))
        self.assertEqual([view.uid(n) for n in (1, 2, 3)], ["u8", "u9", "u10"])
        self.assertEqual([view.size(n) for n in (1, 2, 3)], [8, 9, 10])
        self.assertEqual([view.index(n) for n in (1, 2, 3)], [7, 8, 9])
        self.assertEqual([list(run) for run in view.live_runs()], [[0, 1, 2]])
        for number in (0, 4, 10):
            self.assertRaises(errors.NoSuchMessage, view.index, number)

    def test_dele_and_rset(self):
        """Deletions are marked on the messages shown and given as the store's indexes."""
        view = MaildropView(listing(), 3)
        view.delete(2)
        self.assertEqual(view.stat(), (2, 18))
        self.assertRaises(errors.MessageDeleted, view.uid, 2)
        self.assertEqual([list(run) for run in view.live_runs()], [[0], [2]])
        self.assertEqual(view.deleted_indexes(), [8])
        view.reset()
        self.assertEqual(view.stat(), (3, 27))
        self.assertEqual(view.deleted_indexes(), [])
        view.retrieved(3)
        self.assertEqual(view.retrieved_indexes(), [9])

    def test_expire_only_what_is_shown(self):
        """EXPIRE removes no message the session did not show, however old or seen."""
        old = NOW - 5 * SECONDS_PER_DAY
        view = MaildropView(listing(received=[old] * 10, seen=[True] * 10), 3)
        self.assertEqual(view.expired_indexes(1, NOW), [7, 8, 9])
        view.delete(1)
        self.assertEqual(view.expired_indexes(1, NOW), [8, 9])
        fresh = MaildropView(listing(received=[old] * 10), 3)
        fresh.retrieved(2)
        self.assertEqual(fresh.expired_indexes(0, NOW), [8])
        self.assertEqual(fresh.expired_indexes(1, NOW), [8])

    def test_cap_at_or_above_the_size(self):
        """A cap of 0, or one the maildrop does not reach, shows everything, uncopied."""
        whole = listing()
        for cap in (0, 10, 11, 100_000):
            view = MaildropView(whole, cap)
            self.assertFalse(view.capped)
            self.assertEqual(view.stat(), (10, 55))
            self.assertIs(view.sizes, whole.sizes)
            self.assertIs(view.uids, whole.uids)
            self.assertEqual(view.index(1), 0)

    def test_empty_maildrop(self):
        view = MaildropView(listing(0), 3)
        self.assertEqual(view.stat(), (0, 0))
        self.assertEqual(list(view.live_runs()), [])

    def test_marks_cost_the_cap(self):
        """
        Capped at 250, a 100,000-message maildrop's marks are 250 bytes each,
        and the columns shown are copies of 250 entries, not of 100,000.
        """
        view = MaildropView(listing(100_000), 250)
        self.assertEqual((len(view._deleted), len(view._retrieved)), (250, 250))
        self.assertEqual((len(view.sizes), len(view.uids)), (250, 250))
        self.assertEqual(view.uid(1), "u99751")


class MaxListedSettingTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(parse_max_listed("250"), 250)
        self.assertEqual(parse_max_listed("0"), 0)
        for bad in ("-1", "many", ""):
            self.assertRaises(ValueError, parse_max_listed, bad)

    def test_override(self):
        """``max_listed=N`` in the password file overrides the server's, 0 included."""
        server = AccountSettings(max_listed=250)
        self.assertEqual(server.override({"max_listed": "0"}).max_listed, 0)
        self.assertEqual(server.override({"max_listed": "50"}).max_listed, 50)
        self.assertEqual(server.override({}).max_listed, 250)
        self.assertRaises(ValueError, server.override, {"max_listed": "-3"})

    def test_not_announced(self):
        """A user's own max_listed does not make CAPA say LOGIN-DELAY/EXPIRE differ per user."""
        announced = Announcement.of(AccountSettings(), [AccountSettings(max_listed=5)])
        self.assertFalse(announced.per_user)

    def test_mailbox_without_it(self):
        """An embedding application's settings without max_listed get the server's."""

        @implementer(IAccountSettings)
        class Old:
            login_delay = 60
            expire_days = 3

        server = AccountSettings(max_listed=250)
        settings = session_settings(Old(), server)
        self.assertEqual(
            (settings.login_delay, settings.expire_days, settings.max_listed), (60, 3, 250)
        )
        own = AccountSettings(max_listed=0)
        self.assertIs(session_settings(own, server), own)
        broken = Old()
        broken.max_listed = -1  # type: ignore[attr-defined]
        self.assertEqual(session_settings(broken, server).max_listed, 250)

    def test_database_column(self):
        """A ``max_listed`` column of the accounts query is the same extra field."""
        entry = entry_of({"password": "x", "max_listed": 250}, "alice")
        self.assertEqual(entry.extra["max_listed"], "250")
