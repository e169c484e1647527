"""The probe's table and JSON."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from popserv.probe.report import (
    Result,
    as_json,
    exit_status,
    failed,
    passed,
    skipped,
    table,
    warned,
)

RESULTS = [
    passed("greeting", "APOP timestamp <1@h>"),
    warned("login-delay", "-ERR after 0.01 s:\n guesses cost nothing"),
    failed("uidl", "UIDL 'x' is given to more than one message"),
    skipped("dele-rset", "needs --allow-delete"),
]


class TableTests(SynchronousTestCase):
    def test_table(self):
        """Aligned columns, one line per check (details on one line), the counts last."""
        self.assertEqual(
            table("popserv probe pop3://h:110", RESULTS),
            "popserv probe pop3://h:110\n"
            "CHECK        RESULT  DETAIL\n"
            "greeting     pass    APOP timestamp <1@h>\n"
            "login-delay  warn    -ERR after 0.01 s: guesses cost nothing\n"
            "uidl         fail    UIDL 'x' is given to more than one message\n"
            "dele-rset    skip    needs --allow-delete\n"
            "1 pass, 1 warn, 1 fail, 1 skip\n",
        )

    def test_exit_status(self):
        self.assertEqual(exit_status(RESULTS), 1)
        self.assertEqual(exit_status([r for r in RESULTS if r.status != "fail"]), 0)
        self.assertEqual(exit_status([]), 0)

    def test_json(self):
        document = json.loads(as_json("pop3://h:110", RESULTS))
        self.assertEqual(document["target"], "pop3://h:110")
        self.assertEqual(document["counts"], {"pass": 1, "warn": 1, "fail": 1, "skip": 1})
        self.assertEqual(document["exit_status"], 1)
        self.assertEqual(
            document["results"][1],
            {
                "check": "login-delay",
                "status": "warn",
                "detail": "-ERR after 0.01 s: guesses cost nothing",
            },
        )

    def test_unknown_status(self):
        with self.assertRaises(ValueError):
            Result("x", "ok", "")
