"""
A cluster as docs/cluster.rst describes it: two ``twistd popserv`` nodes on
one real PostgreSQL (``--store postgresql``, a short ``--maildrop-lease``),
behind a real HAProxy run with ``contrib/haproxy/cluster.cfg`` (its
addresses and ports replaced, nothing else).

Sessions through HAProxy land on both nodes; the clients work through it;
a maildrop's lease and the failed-login penalty hold across nodes; a node
killed with SIGKILL releases its users within the lease and loses nothing;
a node cut off from the database ends its sessions before another node may
take their maildrops, and HAProxy takes it out of rotation (``GET
/health``); and a soak test (``POPSERV_SOAK_SECONDS``, a minute by default)
checks that every message acknowledged is still there or was deleted by a
QUIT answered +OK, none twice, across a kill and a restart.

Timing: only lower bounds are asserted (a penalty's wait).  Waits for what
must happen (a lease expiring, HAProxy marking a node) have a patience far
above the bound, and fail only if it never happens.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import random
import shutil
import smtplib
import ssl
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import psycopg
from twisted.python.log import msg
from twisted.trial.unittest import SynchronousTestCase

from popserv.stores.maildir.deliver import lf_chunks
from popserv.stores.postgres import queries
from tests.support.certs import CA
from tests.support.cluster import Forwarder, HAProxy, Node, NodePOP3
from tests.support.crashtraffic import MESSAGE_ID
from tests.support.mail import mbox_messages
from tests.support.peers import missing
from tests.support.postgres import postgresql, store_database, stored_whole
from tests.support.processes import subprocess_env

PASSWORD = "pw"
USERS = ("alice@example.org", "bob@example.org", "carol@example.org")
#: --maildrop-lease: short, so that a dead node's users wait little; a
#: session ends itself 2/3 of it after its last renewal, one second before
#: the lease runs out.
LEASE = 3.0
#: How long a test waits for what must happen within the lease (or for
#: HAProxy to mark a node: at most about 8 s with cluster.cfg's checks).
PATIENCE = LEASE * 3 + 20
#: --auth-failure-delay: the first failure waits this, each more doubles it.
FAILURE_DELAY = 0.5
#: The soak test's length; POPSERV_SOAK_SECONDS for a longer run.
SOAK_SECONDS = float(os.environ.get("POPSERV_SOAK_SECONDS") or 60)


def message(message_id: str, body: bytes = b"body\r\n") -> bytes:
    return (
        b"From: sender@example.net\r\nTo: someone@example.org\r\n"
        b"Message-ID: <%s>\r\nSubject: cluster\r\n\r\n%s" % (message_id.encode(), body)
    )


def answer(call, *args) -> bytes:
    """
    A poplib call's answer, +OK or -ERR (poplib raises on -ERR); EOFError
    if the connection closed instead (poplib's own ``-ERR EOF``, a str).
    """
    try:
        return call(*args)
    except poplib.error_proto as e:
        said = e.args[0]
        if isinstance(said, str):
            raise EOFError(said) from None
        return said


class ClusterTestCase(SynchronousTestCase):
    """Two nodes (``node1``, ``node2``) and HAProxy, on a new database per test."""

    def setUp(self) -> None:
        if shutil.which("haproxy") is None:
            raise missing("haproxy is not installed (Debian: apt-get install haproxy)")
        self.url = store_database()
        with self.connect() as connection:
            for user in USERS:
                connection.execute(
                    "INSERT INTO mailbox (username, password) VALUES (%s, %s)",
                    (user, "{PLAIN}" + PASSWORD),
                )
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        authority = CA("popserv cluster test CA")
        self.ca = authority.write(self.base / "ca.pem")
        self.tls = authority.issue("127.0.0.1", "localhost").write(self.base, "server")

    def start_cluster(self, database_of_node2: str | None = None) -> None:
        options = [
            *("--maildrop-lock", "exclusive", "--maildrop-lease", str(LEASE)),
            *("--auth-failure-delay", str(FAILURE_DELAY)),
        ]
        self.nodes = [
            Node(name, url, self.base, options=options, tls=self.tls)
            for name, url in (("node1", self.url), ("node2", database_of_node2 or self.url))
        ]
        for node in self.nodes:
            self.addCleanup(node.stop)
            node.launch()
        for node in self.nodes:
            node.wait_started()
        self.haproxy = HAProxy(self.base, self.nodes)
        self.addCleanup(self.haproxy.stop)
        self.haproxy.start()
        # Both up: cluster.cfg's rise 2 at 2 s intervals.
        for node in self.nodes:
            self.haproxy.wait_status(node.name, "UP", PATIENCE)

    # The database

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def put(self, user: str, *messages: bytes) -> None:
        """Store ``messages`` as a delivery does."""
        with self.connect() as connection:
            for data in messages:
                with connection.transaction():
                    queries.store(connection, user, lf_chunks(data), uidl=f"u{time.time_ns()}")

    def stored(self, user: str) -> dict[str, list[bytes]]:
        """``user``'s messages by Message-ID, each checked whole (see stored_whole)."""
        return stored_whole(self.url, user)

    def leased(self, user: str) -> bool:
        """Whether a live lease holds ``user``'s maildrop (the popserv.sessions view)."""
        with self.connect() as connection:
            row = connection.execute(
                'SELECT count(*) FROM popserv.sessions WHERE "user" = %s', (user,)
            ).fetchone()
        return bool(row and row[0])

    def who(self) -> list[list[str]]:
        """``popserv who --store postgresql``'s rows: USER, CLIENT, SINCE, NODE."""
        done = subprocess.run(
            [sys.executable, "-m", "popserv.server.cli", "who", "--database", self.url,
             "--store", "postgresql"],
            capture_output=True, env=subprocess_env(), timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        header, *rows = done.stdout.decode().splitlines()
        self.assertEqual(header.split(), ["USER", "CLIENT", "SINCE", "NODE"])
        return [row.split() for row in rows]

    # Clients

    def pop(self, user: str | None = None) -> poplib.POP3:
        """A POP3 session through HAProxy; logged in as ``user`` if given."""
        client = poplib.POP3("127.0.0.1", self.haproxy.fronts["pop3"], timeout=15)
        if user is not None:
            client.user(user)
            client.pass_(PASSWORD)
        return client

    def pop_on(self, node: Node, user: str) -> poplib.POP3:
        """A session logged in on ``node`` itself (past HAProxy, with its PROXY header)."""
        client = NodePOP3("127.0.0.1", node.ports["pop3"], timeout=15)
        client.user(user)
        client.pass_(PASSWORD)
        return client

    def log_in_once_free(self, user: str) -> tuple[poplib.POP3, int]:
        """
        A session through HAProxy once ``user``'s maildrop is free (a dead
        or cut-off session's lease expired); with the refusals met first.
        """
        deadline = time.monotonic() + PATIENCE
        refused = 0
        while True:
            client = self.pop()
            client.user(user)
            said = answer(client.pass_, PASSWORD)
            if said.startswith(b"+OK"):
                return client, refused
            client.close()
            self.assertTrue(said.startswith((b"-ERR [IN-USE]", b"-ERR [SYS/TEMP]")), said)
            self.assertLess(time.monotonic(), deadline, f"still refused: {said!r}")
            refused += 1
            time.sleep(0.1)


class ClusterTests(ClusterTestCase):
    def test_both_nodes_serve_and_a_maildrop_is_in_use_across_them(self) -> None:
        """
        With leastconn, a second connection while the first is open goes to
        the other node: bob's session lands there (popserv who shows both
        nodes), and alice's second session there is refused [IN-USE]; once
        alice QUITs, the other node serves her.
        """
        self.start_cluster()
        self.put("alice@example.org", message("one@cluster.test"))
        first = self.pop("alice@example.org")
        [here] = [node for node in self.nodes if node.logins("alice@example.org") == 1]
        [there] = [node for node in self.nodes if node is not here]
        second = self.pop("bob@example.org")
        self.assertEqual(there.logins("bob@example.org"), 1)
        rows = self.who()
        self.assertEqual(sorted(row[0] for row in rows), ["alice@example.org",
                                                           "bob@example.org"])  # fmt: skip
        pids = {int(row[-1].rsplit(":", 1)[1]) for row in rows}
        self.assertEqual(pids, {node.pids[-1] for node in self.nodes})
        second.quit()

        # On the other node (reached past HAProxy, to be sure of it): in use.
        refused = NodePOP3("127.0.0.1", there.ports["pop3"], timeout=15)
        refused.user("alice@example.org")
        said = answer(refused.pass_, PASSWORD)
        refused.close()
        self.assertTrue(said.startswith(b"-ERR [IN-USE]"), said)
        self.assertEqual(there.logins("alice@example.org"), 0)

        self.assertTrue(first.quit().startswith(b"+OK"))
        again = self.pop_on(there, "alice@example.org")
        self.assertEqual(again.stat()[0], 1)
        again.quit()
        self.assertEqual(there.logins("alice@example.org"), 1)

    def test_the_failed_login_penalty_holds_across_nodes(self) -> None:
        """
        Two failed logins on one node (the connection kept open, so leastconn
        sends the next to the other node): the other node's answer to the
        next login, with the right password, waits at least the penalty two
        failures earn.  Without the shared count it would answer at once.
        """
        self.start_cluster()
        guessing = self.pop()
        for _ in range(2):
            guessing.user("bob@example.org")
            self.assertTrue(answer(guessing.pass_, "wrong").startswith(b"-ERR"))
        [here] = [n for n in self.nodes if "Failed login for bob@example.org" in n.output()]
        [there] = [node for node in self.nodes if node is not here]
        client = self.pop()
        client.user("bob@example.org")
        started = time.monotonic()
        said = answer(client.pass_, PASSWORD)
        waited = time.monotonic() - started
        self.assertTrue(said.startswith(b"+OK"), said)
        self.assertEqual(there.logins("bob@example.org"), 1)
        self.assertNotIn("Failed login", there.output())
        # Two failures: 0.5 s then 1 s, and the next attempt waits 1 s.
        self.assertGreaterEqual(waited, FAILURE_DELAY * 2 * 0.95)
        client.quit()
        guessing.close()

    def test_clients_through_haproxy(self) -> None:
        """
        SMTP and LMTP through HAProxy land in the store; poplib (POP3 and
        POP3S), curl and mpop read them through HAProxy, byte for byte.
        """
        self.start_cluster()
        fronts = self.haproxy.fronts
        with smtplib.SMTP("127.0.0.1", fronts["smtp"], timeout=15) as smtp:
            smtp.sendmail("s@example.net", ["alice@example.org", "bob@example.org"],
                          message("smtp@cluster.test"))  # fmt: skip
        with smtplib.LMTP("127.0.0.1", fronts["lmtp"], timeout=15) as lmtp:
            lmtp.sendmail("s@example.net", ["alice@example.org"], message("lmtp@cluster.test"))
        self.assertEqual(sorted(self.stored("alice@example.org")),
                         ["lmtp@cluster.test", "smtp@cluster.test"])  # fmt: skip
        self.assertEqual(sorted(self.stored("bob@example.org")), ["smtp@cluster.test"])

        client = self.pop("alice@example.org")
        retrieved = [b"\r\n".join(client.retr(i)[1]) for i in (1, 2)]
        client.quit()
        self.assertTrue(any(b"Message-ID: <smtp@cluster.test>" in m for m in retrieved))

        context = ssl.create_default_context(cafile=str(self.ca))
        secure = poplib.POP3_SSL("127.0.0.1", fronts["pop3s"], timeout=15, context=context)
        secure.user("bob@example.org")
        secure.pass_(PASSWORD)
        self.assertEqual(secure.stat()[0], 1)
        secure.quit()

        curl = shutil.which("curl")
        if curl is None:
            raise missing("curl is not installed")
        listed = subprocess.run(
            [curl, "-sS", "--max-time", "20", f"pop3://127.0.0.1:{fronts['pop3']}/1",
             "-u", f"alice@example.org:{PASSWORD}"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn(listed.stdout, [m + b"\r\n" for m in retrieved])

        mpop = shutil.which("mpop")
        if mpop is None:
            raise missing("mpop is not installed")
        home = self.base / "mpop"
        home.mkdir()
        fetched = subprocess.run(
            [mpop, "--host=127.0.0.1", f"--port={fronts['pop3']}", "--timeout=10", "--tls=off",
             "--auth=user", "--user=alice@example.org", f"--passwordeval=echo {PASSWORD}",
             "--received-header=off", f"--delivery=mbox,{home / 'mbox'}",
             f"--uidls-file={home / 'uidls'}", "--keep=off", "--only-new=off"],
            capture_output=True, timeout=60, check=False, cwd=home,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)},
        )  # fmt: skip
        self.assertEqual(fetched.returncode, 0, fetched.stdout + fetched.stderr)
        got = mbox_messages((home / "mbox").read_bytes())
        self.assertEqual(sorted(got), sorted(m.replace(b"\r\n", b"\n") + b"\n" for m in retrieved))
        self.assertEqual(self.stored("alice@example.org"), {})  # mpop deleted them

    def test_kill_9_releases_the_lease_within_the_bound_and_loses_nothing(self) -> None:
        """
        A session on a node DELEs and the node is killed: the other node
        refuses the user while the dead session's lease lasts (never two
        sessions), then serves every message (the DELE not applied); there a
        DELE and QUIT +OK deletes exactly one, which stays deleted.
        """
        self.start_cluster()
        ids = [f"m{i}@kill.test" for i in range(3)]
        self.put("alice@example.org", *(message(i) for i in ids))
        victim, survivor = self.nodes
        client = self.pop_on(victim, "alice@example.org")
        self.assertEqual(client.stat()[0], 3)
        client.dele(1)
        client.dele(2)
        with self.connect() as connection:
            # The lease runs out within LEASE of now (by the database's clock).
            (left,) = connection.execute(
                "SELECT date_part('epoch', expires - now()) FROM popserv.sessions"
            ).fetchone()
        self.assertLessEqual(left, LEASE)
        victim.kill()
        client.close()

        # Through HAProxy: the dead node's connections fail, so it goes to the other.
        again, refused = self.log_in_once_free("alice@example.org")
        self.assertGreater(refused, 0, "the dead session's lease was not held")
        self.assertEqual(victim.logins("alice@example.org"), 1)
        self.assertEqual(survivor.logins("alice@example.org"), 1)
        self.assertEqual(again.stat()[0], 3)
        self.assertEqual(sorted(self.stored("alice@example.org")), ids)
        again.dele(1)
        self.assertTrue(again.quit().startswith(b"+OK Bye, 1 deleted"))
        self.assertEqual(sorted(self.stored("alice@example.org")), ids[1:])

        victim.start()
        for node in self.nodes:
            self.haproxy.wait_status(node.name, "UP", PATIENCE)
        for node in self.nodes:
            client = self.pop_on(node, "alice@example.org")
            self.assertEqual(client.stat()[0], 2)
            client.quit()
        self.assertEqual(sorted(self.stored("alice@example.org")), ids[1:])
        for node in self.nodes:
            self.assertNotIn("Traceback", node.output())

    def test_a_node_cut_off_from_the_database_stops_serving(self) -> None:
        """
        node2 reaches PostgreSQL through a forwarder.  Logged in there, the
        forwarder cut (nothing carried, no RST): node2 ends the session
        before node1 can log the user in, which it does once the lease
        expired; node2's DELEs were not applied; and HAProxy takes node2 out
        of rotation (its /health answers 503), so new sessions go to node1.
        """
        database = postgresql()
        forwarder = Forwarder(("127.0.0.1", database.port))
        self.start_cluster(database_of_node2=forwarder.url(self.url))
        # After start_cluster's: run first, so node2's hung queries end before it stops.
        self.addCleanup(forwarder.close)
        ids = [f"m{i}@cut.test" for i in range(3)]
        self.put("alice@example.org", *(message(i) for i in ids))
        node1, node2 = self.nodes
        cut_session = self.pop_on(node2, "alice@example.org")
        self.assertEqual(cut_session.stat()[0], 3)
        cut_session.dele(1)
        cut_session.dele(3)

        times: dict[str, float] = {}
        answers: list[bytes] = []

        def until_closed() -> None:
            cut_session.sock.settimeout(PATIENCE)
            with contextlib.suppress(OSError):
                while cut_session.sock.recv(4096):
                    pass
            times["closed"] = time.monotonic()

        def log_in_on_node1() -> None:
            deadline = time.monotonic() + PATIENCE
            while time.monotonic() < deadline:
                client = NodePOP3("127.0.0.1", node1.ports["pop3"], timeout=15)
                client.user("alice@example.org")
                said = answer(client.pass_, PASSWORD)
                answers.append(said)
                if said.startswith(b"+OK"):
                    times["logged in"] = time.monotonic()
                    times["count"] = client.stat()[0]
                    client.quit()
                    return
                client.close()
                time.sleep(0.05)

        forwarder.cut()
        threads = [threading.Thread(target=f) for f in (until_closed, log_in_on_node1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PATIENCE + 30)
            self.assertFalse(thread.is_alive(), "a client hung")
        self.assertIn("closed", times, "node2 never ended the session")
        self.assertIn("logged in", times, f"node1 never served alice: {answers}")
        self.assertLess(times["closed"], times["logged in"])
        self.assertTrue(answers[0].startswith(b"-ERR [IN-USE]"), answers[0])
        self.assertEqual(times["count"], 3)
        self.assertEqual(sorted(self.stored("alice@example.org")), ids)
        self.assertIn("could not be renewed", node2.output())

        # Out of rotation: every new session through HAProxy goes to node1.
        self.haproxy.wait_status("node2", "DOWN", PATIENCE)
        self.assertEqual(self.haproxy.status("popserv_smtp")["node2"], "DOWN")
        before = node1.logins("bob@example.org")
        for _ in range(3):
            self.pop("bob@example.org").quit()
        self.assertEqual(node1.logins("bob@example.org"), before + 3)
        self.assertEqual(node2.logins("bob@example.org"), 0)
        self.assertNotIn("Traceback", node2.output())


class _Ledger:
    """What the soak test's clients were told, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: dict[str, bytes] = {}
        self.accepted: dict[str, str] = {}  # message id: user
        self.deleted: set[str] = set()
        self.maybe_deleted: set[str] = set()
        self.deleted_twice: set[str] = set()
        self.miscounted: list[bytes] = []
        self.sessions = 0
        self.refused = 0
        self.errors: list[str] = []


class SoakTests(ClusterTestCase):
    def test_soak(self) -> None:
        """
        Deliveries to three users through HAProxy and POP3 sessions that DELE
        about half of what they see (several per user, so [IN-USE] is met);
        halfway through a node is killed, and restarted a few seconds later.
        At the end: every message acknowledged is stored once and whole, or
        was deleted by a QUIT answered +OK (or one whose answer was lost);
        none deleted twice, every QUIT +OK deleted as many as it was told.
        """
        self.start_cluster()
        ledger = _Ledger()
        stop = threading.Event()
        rng = random.Random(16)

        def send(name: str, seed: float) -> None:
            local = random.Random(seed)
            count = 0
            while not stop.is_set():
                try:
                    with smtplib.SMTP("127.0.0.1", self.haproxy.fronts["smtp"], timeout=15) as s:
                        for _ in range(local.randint(1, 5)):
                            count += 1
                            message_id = f"{name}.{count}@soak.test"
                            user = local.choice(USERS)
                            body = b"%d %s\r\n" % (count, name.encode()) * local.randint(1, 2000)
                            with ledger.lock:
                                ledger.bodies[message_id] = body
                            s.sendmail("s@example.net", [user], message(message_id, body))
                            with ledger.lock:
                                ledger.accepted[message_id] = user
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.1)  # the node died under it: again, elsewhere

        def fetch(seed: float) -> None:
            local = random.Random(seed)
            try:
                while not stop.is_set():
                    self._one_session(ledger, local)
            except Exception:
                with ledger.lock:
                    ledger.errors.append(traceback.format_exc())

        threads = [
            threading.Thread(target=send, args=(f"s{i}", rng.random())) for i in range(2)
        ] + [threading.Thread(target=fetch, args=(rng.random(),)) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(SOAK_SECONDS / 2)
            victim = self.nodes[rng.randrange(2)]
            victim.kill()
            time.sleep(min(5.0, SOAK_SECONDS / 6))
            victim.start()
            time.sleep(SOAK_SECONDS / 2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        self.assertFalse(any(thread.is_alive() for thread in threads), "a client hung")

        # In _trial_temp/test.log: what the run did.
        msg(
            f"soak: {SOAK_SECONDS:g} s, {len(ledger.accepted)} delivered, {ledger.sessions}"
            f" sessions, {len(ledger.deleted)} deleted, {len(ledger.maybe_deleted)} maybe"
            f" deleted (QUIT unanswered), {ledger.refused} logins refused"
        )
        self.assertEqual(ledger.errors, [])
        self.assertEqual(ledger.deleted_twice, set())
        self.assertEqual(ledger.miscounted, [])
        self.assertGreater(len(ledger.accepted), 20)
        self.assertGreater(len(ledger.deleted), 10)
        self.assertGreater(ledger.sessions, 20)
        # The killed node's leases expire; then the store is checked.
        deadline = time.monotonic() + PATIENCE
        while any(self.leased(user) for user in USERS):
            self.assertLess(time.monotonic(), deadline, "leases never expired")
            time.sleep(0.2)
        for user in USERS:
            stored = self.stored(user)
            for message_id, copies in stored.items():
                self.assertEqual(len(copies), 1, f"{message_id} stored twice")
                self.assertNotIn(message_id, ledger.deleted, f"{message_id}: deletion undone")
                if message_id in ledger.bodies:
                    body = ledger.bodies[message_id].replace(b"\r\n", b"\n")
                    self.assertTrue(copies[0].endswith(b"\n\n" + body), f"{message_id} not whole")
            mine = {m for m, owner in ledger.accepted.items() if owner == user}
            lost = mine - ledger.deleted - ledger.maybe_deleted - set(stored)
            self.assertEqual(lost, set(), f"acknowledged messages of {user} lost")
            # What a client sees is what is stored.
            client, _ = self.log_in_once_free(user)
            self.assertEqual(client.stat()[0], len(stored))
            client.quit()
        for node in self.nodes:
            self.assertNotIn("Traceback", node.output())

    def _one_session(self, ledger: _Ledger, rng: random.Random) -> None:
        """One POP3 session through HAProxy: LIST, RETR or TOP some, DELE about half, QUIT."""
        user = rng.choice(USERS)
        chosen: set[str] = set()
        quitting = False
        try:
            client = self.pop()
        except (OSError, EOFError, poplib.error_proto):
            time.sleep(0.1)  # a node killed under the connection: again, elsewhere
            return
        try:
            client.user(user)
            said = answer(client.pass_, PASSWORD)
            if not said.startswith(b"+OK"):
                with ledger.lock:
                    ledger.refused += 1
                if not said.startswith((b"-ERR [IN-USE]", b"-ERR [SYS/TEMP]")):
                    with ledger.lock:
                        ledger.errors.append(f"login: {said!r}")
                time.sleep(0.05)
                return
            for entry in client.list()[1]:
                number = int(entry.split()[0])
                if rng.random() < 0.5:
                    continue
                if rng.random() < 0.3:
                    lines = client.retr(number)[1]
                else:
                    lines = client.top(number, 0)[1]
                found = MESSAGE_ID.search(b"\n".join(lines))
                if found is None:
                    continue
                message_id = found.group(1).decode()
                client.dele(number)
                chosen.add(message_id)
            quitting = True
            said = answer(client.quit)
        except (OSError, EOFError, poplib.error_proto):
            if quitting:  # the QUIT may have committed, its answer lost
                with ledger.lock:
                    ledger.maybe_deleted |= chosen
            return
        finally:
            client.close()
        with ledger.lock:
            ledger.sessions += 1
            if said.startswith(b"+OK"):
                if not said.startswith(b"+OK Bye, %d deleted" % len(chosen)):
                    ledger.miscounted.append(said)
                ledger.deleted_twice |= ledger.deleted & chosen
                ledger.deleted |= chosen
            elif not said.startswith(b"-ERR [SYS/TEMP]"):
                ledger.errors.append(f"quit: {said!r}")
