"""The failed-login penalty table, on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from popserv.server.penalty import PenaltyTable


class PenaltyTableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = PenaltyTable(self.clock)

    def test_delays_double_up_to_the_maximum(self):
        """Dovecot's auth_penalty: 2, 4, 8, then 15 s for every further failure."""
        self.assertEqual(self.table.delay("192.0.2.1"), 0)
        answers = [self.table.failed("192.0.2.1") for _ in range(6)]
        self.assertEqual(answers, [2, 4, 8, 15, 15, 15])
        self.assertEqual(self.table.delay("192.0.2.1"), 15)

    def test_huge_failure_counts_do_not_overflow(self):
        self.assertEqual(self.table.penalty(100_000), 15)
        self.assertEqual(self.table.penalty(0), 0)

    def test_clients_are_separate(self):
        self.table.failed("192.0.2.1")
        self.table.failed("192.0.2.1")
        self.assertEqual(self.table.delay("192.0.2.2"), 0)
        self.assertEqual(self.table.failed("192.0.2.2"), 2)

    def test_success_forgets_that_users_failures(self):
        self.table.failed("192.0.2.1", "alice")
        self.table.failed("192.0.2.1", "alice")
        self.table.succeeded("192.0.2.1", "alice")
        self.assertEqual(self.table.delay("192.0.2.1"), 0)
        self.assertEqual(self.table.failed("192.0.2.1", "alice"), 2)
        self.table.succeeded("198.51.100.1", "alice")  # never failed: nothing happens

    def test_success_as_another_user_forgives_nothing_else(self):
        """Guesses at alice, then a login as the attacker's own bob: alice's stay."""
        for _ in range(3):
            self.table.failed("192.0.2.1", "alice")
        self.table.failed("192.0.2.1", "bob")
        self.table.succeeded("192.0.2.1", "bob")
        self.assertEqual(self.table.failures("192.0.2.1"), 3)
        self.assertEqual(self.table.delay("192.0.2.1"), 8)
        self.table.succeeded("192.0.2.1", "alice")
        self.assertEqual(self.table.failures("192.0.2.1"), 0)

    def test_many_user_names_share_one_unforgiven_count(self):
        from popserv.server.penalty import MAX_USERS_PER_CLIENT

        for n in range(MAX_USERS_PER_CLIENT + 10):
            self.table.failed("192.0.2.1", f"user{n}")
        for n in range(MAX_USERS_PER_CLIENT, MAX_USERS_PER_CLIENT + 10):
            self.table.succeeded("192.0.2.1", f"user{n}")
        self.assertEqual(self.table.failures("192.0.2.1"), MAX_USERS_PER_CLIENT + 10)

    def test_expiry_after_the_last_failure(self):
        self.table.failed("a")
        self.clock.advance(800)
        self.table.failed("a")  # keeps it: expiry counts from the last failure
        self.clock.advance(800)
        self.assertEqual(self.table.failures("a"), 2)
        self.clock.advance(101)
        self.assertEqual(self.table.failures("a"), 0)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.failed("a"), 2)

    def test_expired_entries_are_dropped_while_others_fail(self):
        """The table sheds old entries on its own, without timers."""
        for n in range(100):
            self.table.failed(f"old{n}")
        self.clock.advance(901)
        self.table.failed("new")
        self.assertEqual(len(self.table), 1)

    def test_bounded_least_recently_failing_forgotten(self):
        table = PenaltyTable(self.clock, capacity=3)
        for key in "abc":
            table.failed(key)
        table.failed("a")  # now the most recent
        table.failed("d")
        self.assertEqual(len(table), 3)
        self.assertEqual(table.failures("b"), 0)
        self.assertEqual((table.failures("a"), table.failures("c")), (2, 1))

    def test_many_clients_stay_bounded(self):
        """A spoofing flood of distinct clients never grows the table past its capacity."""
        table = PenaltyTable(self.clock, capacity=1000)
        for n in range(20_000):
            table.failed(str(n))
        self.assertEqual(len(table), 1000)

    def test_own_initial_and_maximum(self):
        table = PenaltyTable(self.clock, initial=0.5, maximum=3)
        self.assertEqual([table.failed("a") for _ in range(5)], [0.5, 1, 2, 3, 3])
