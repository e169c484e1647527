"""
``twistd popserv --workers 2``, end to end: real twistd, real worker
processes, real poplib clients.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.processes import REPO, _Twistd, free_port, stop_at_cleanup, twistd_script

#: A worker's log lines: ``[worker 4711]`` or ``[worker 4711,POP3Protocol,...]``.
WORKER_LINE = re.compile(rb"\[worker (\d+)[,\]][^\n]*(Disconnected|Logged out)")
STARTED = re.compile(rb"Started worker (\d+)")


def worker_pids(output: bytes) -> set[int]:
    return {int(m.group(1)) for m in STARTED.finditer(output)}


def session_pids(output: bytes) -> set[int]:
    """The workers that logged a session's closing line."""
    return {int(m.group(1)) for m in WORKER_LINE.finditer(output)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead, but not reaped yet.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def serving_pid(client: socket.socket, candidates: set[int]) -> int | None:
    """Which of ``candidates`` holds the server's end of ``client``'s TCP connection (Linux)."""
    port = client.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        # Only an established connection: a TIME_WAIT one left by an earlier
        # connection from the same port has no socket (inode 0).
        if remote_port == port and fields[3] == "01":
            inode = fields[9]
    if inode is None:
        return None
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class WorkersTests(TestCase):
    """``twistd -n popserv --workers 2`` on a loopback port, in a fresh data directory."""

    def setUp(self):
        self.twistd = twistd_script()
        if not Path("/proc/net/tcp").exists():
            raise SkipTest("needs Linux's /proc")
        self.workdir = Path(tempfile.mkdtemp(prefix="popserv-workers-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def start(self, *argv: str, twistd: tuple[str, ...] = ()) -> _Twistd:
        self.port = free_port()
        process = _Twistd()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        command = [self.twistd, "-n", "--pidfile", "", *twistd, "popserv",
                   "--pop3", f"tcp:{self.port}:interface=127.0.0.1", "--hostname", "pop.test",
                   "--data", str(self.workdir / "data"), "--workers", "2", *argv]
        transport = reactor.spawnProcess(process, self.twistd, command, env, str(self.workdir))
        self.process = process
        self.transport = transport

        stop_at_cleanup(self, process, transport)
        return process

    async def started(self, *argv: str, twistd: tuple[str, ...] = ()) -> tuple[str, str]:
        """Start, wait for both workers to listen; the first start's user and password."""
        process = self.start(*argv, twistd=twistd)
        await process.wait_for(b"Started worker")
        await self.process.until(lambda: process.output.count(b"Starting factory") >= 2)
        match = re.search(rb"user:\s+(\S+)\n\s+password:\s+(\S+)\n", process.output)
        self.assertIsNotNone(match, process.output)
        user, password = (g.decode() for g in match.groups())
        return user, password

    def connect(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.port, timeout=10)

    def log_in(self, user: str, password: str) -> poplib.POP3:
        """A session logged in with USER/PASS (blocking: run it in a thread)."""
        client = self.connect()
        client.user(user)
        client.pass_(password)
        return client

    async def test_sessions_are_served_by_both_workers(self):
        """Many short sessions on the one port land on both workers, each logging with its pid."""
        await self.started()
        pids = worker_pids(self.process.output)
        self.assertEqual(len(pids), 2, self.process.output)

        def sessions():
            for _ in range(20):
                client = self.connect()
                client.quit()

        for _ in range(20):
            await deferToThread(sessions)
            if len(session_pids(self.process.output)) == 2:
                break
        await self.process.until(lambda: session_pids(self.process.output) == pids)
        self.assertNotIn(b"Traceback", self.process.output)

    async def test_json_log_keeps_the_workers_fields(self):
        """With --log-format json, a worker's summary line has its fields and its pid."""
        import json

        process = self.start("--log-format", "json")
        await self.process.until(lambda: process.output.count(b"Starting factory") >= 2)
        pids = {json.loads(line)["pid"] for line in process.output.splitlines()
                if line.startswith(b"{") and b'"Started worker' in line}

        def session():
            client = self.connect()
            client.capa()
            client.quit()

        await deferToThread(session)

        def summaries():
            return [event for event in map(json.loads, (
                line for line in process.output.splitlines() if line.startswith(b"{")))
                if "ended" in event]

        await self.process.until(summaries)
        event = summaries()[0]
        self.assertIn(event["worker"], pids)
        self.assertTrue(event["peer"].startswith("127.0.0.1:"), event)
        self.assertEqual((event["ended"], event["failures"]), ("QUIT", 0))
        self.assertEqual(event["level"], "info")
        self.assertNotIn("Traceback", process.output.decode())

    async def test_who_and_kick_reach_every_worker(self):
        """popserv who lists the sessions of both workers; kick ends them wherever they are."""
        from popserv.server.control import ControlClient

        await self.started()
        pids = worker_pids(self.process.output)
        path = self.workdir / "data" / "control.sock"
        await self.process.until(path.exists)
        clients = []
        try:
            for _ in range(30):
                clients.append(self.connect())
                if len({serving_pid(c.sock, pids) for c in clients}) == 2 and len(clients) >= 6:
                    break
            served_by = {serving_pid(c.sock, pids) for c in clients}
            self.assertEqual(served_by, pids)
            rows = await deferToThread(lambda: ControlClient(path).who())
            self.assertEqual(len(rows), len(clients))
            self.assertEqual({row["worker"] for row in rows}, pids)
            self.assertEqual({row["state"] for row in rows}, {"AUTHORIZATION"})
            kicked = await deferToThread(
                lambda: ControlClient(path).kick(address="127.0.0.1"))
            self.assertEqual(kicked, len(clients))
            for client in clients:
                try:
                    ended = await deferToThread(client.sock.recv, 1024)
                except ConnectionResetError:
                    ended = b""
                self.assertEqual(ended, b"")
            for _ in range(100):
                if not await deferToThread(lambda: ControlClient(path).who()):
                    break
                await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(await deferToThread(lambda: ControlClient(path).who()), [])
        finally:
            for client in clients:
                client.close()

    async def test_metrics_sum_the_workers(self):
        """--metrics on the parent: one page with both workers' counts, kept past a kill -9."""
        from tests.support.metrics import http_get, parse, promtool_check, value

        metrics_port = free_port()
        await self.started("--metrics", f"tcp:{metrics_port}:interface=127.0.0.1")
        pids = worker_pids(self.process.output)
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def sessions():
            for _ in range(10):
                client = self.connect()
                client.capa()
                client.quit()

        await deferToThread(sessions)
        await self.process.until(
            lambda: self.process.output.count(b"Disconnected 127.0.0.1") >= 10)

        async def scrape():
            _, text = await deferToThread(http_get, url)
            promtool_check(self, text)
            return parse(text)

        got = await scrape()
        self.assertEqual(value(got, "popserv_connections_total", listener="pop3"), 10)
        self.assertEqual(value(got, "popserv_pop3_commands_total", verb="CAPA"), 10)
        self.assertEqual(value(got, "popserv_pop3_sessions_ended_total"), 10)
        self.assertEqual(value(got, "popserv_workers"), 2)
        self.assertEqual(value(got, "popserv_connections_open", listener="pop3"), 0)
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        await self.process.wait_for(b"Worker %d was killed by signal SIGKILL" % victim)
        await self.process.until(lambda: len(worker_pids(self.process.output)) == 3)
        await self.process.until(lambda: self.process.output.count(b"Starting factory") >= 3)
        got = await scrape()
        self.assertEqual(value(got, "popserv_connections_total", listener="pop3"), 10)
        self.assertEqual(value(got, "popserv_worker_exits_total"), 1)
        self.assertEqual(value(got, "popserv_workers"), 2)

    async def test_per_ip_limit_holds_across_workers(self):
        """With --max-connections-per-ip 4 the fifth connection is refused, whichever worker."""
        await self.started("--max-connections-per-ip", "4")

        def fill():
            held = [self.connect() for _ in range(4)]
            refused = []
            for _ in range(6):
                try:
                    extra = self.connect()
                except poplib.error_proto as e:
                    refused.append(str(e))
                else:
                    extra.quit()
                    refused.append(None)
            holders = {serving_pid(c.sock, worker_pids(self.process.output)) for c in held}
            held.pop().quit()
            # The slot is given back when the worker sees the connection end
            # and tells the parent: a moment after QUIT's answer.
            for _ in range(100):
                try:
                    again = self.connect()
                except poplib.error_proto:
                    time.sleep(0.05)
                else:
                    again.quit()
                    break
            else:
                raise AssertionError("the freed slot was never given back")
            for client in held:
                client.quit()
            return refused, holders

        refused, holders = await deferToThread(fill)
        self.assertNotIn(None, refused, self.process.output)
        self.assertTrue(all("-ERR" in r for r in refused), refused)
        self.assertTrue(holders <= worker_pids(self.process.output), holders)

    async def test_killed_worker_is_replaced_and_gives_back(self):
        """kill -9 a worker mid-session: another starts, and the user logs in again at once."""
        user, password = await self.started("--max-user-sessions", "1")
        first = worker_pids(self.process.output)

        log_in = partial(self.log_in, user, password)

        client = await deferToThread(log_in)
        before = await deferToThread(client.uidl)
        self.assertGreater(len(before[1]), 0)
        await deferToThread(client.dele, 1)  # never QUIT: must not be applied
        victim = serving_pid(client.sock, first)
        self.assertIsNotNone(victim)
        os.kill(victim, signal.SIGKILL)
        await self.process.wait_for(b"Worker %d was killed by signal SIGKILL" % victim)

        def uidls_again():
            # The user's session and the Maildir lock are given back: a
            # login now is not over the limit, nor [IN-USE].
            again = log_in()
            try:
                return again.uidl()[1]
            finally:
                again.quit()

        self.assertEqual(await deferToThread(uidls_again), before[1])
        await self.process.until(lambda: len(worker_pids(self.process.output)) == 3)
        replacement = worker_pids(self.process.output) - first
        self.assertTrue(all(alive(pid) for pid in replacement))
        client.sock.close()

    async def test_deliveries_and_logins_across_workers(self):
        """
        SMTP deliveries and POP3 logins to one user, back to back, served by
        both workers: every login sees every message delivered before it,
        and the UIDLs it saw before, whichever worker wrote the listing cache
        and the index last.
        """
        import smtplib

        smtp_port = free_port()
        user, password = await self.started(
            "--smtp", f"tcp:{smtp_port}:interface=127.0.0.1", "--domain", "pop.test")
        pids = worker_pids(self.process.output)

        log_in = partial(self.log_in, user, password)

        def rounds() -> dict[int, int]:
            first = log_in()
            seen = {line.split()[1] for line in first.uidl()[1]}
            first.quit()
            served: dict[int, int] = {}
            for i in range(60):
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
                    smtp.sendmail("sender@example.org", [f"{user}@pop.test"],
                                  f"Subject: {i}\r\n\r\nmessage {i}\r\n")
                client = log_in()
                pid = serving_pid(client.sock, pids)
                served[pid] = served.get(pid, 0) + 1
                count = client.stat()[0]
                listing = {line.split()[1] for line in client.uidl()[1]}
                client.quit()
                self.assertEqual(count, len(listing))
                self.assertTrue(seen < listing, (i, seen - listing))
                self.assertEqual(len(listing), len(seen) + 1)
                seen = listing
                if len(served) == 2 and min(served.values()) >= 3:
                    break
            return served

        served = await deferToThread(rounds)
        self.assertEqual(set(served), pids)
        self.assertGreaterEqual(min(served.values()), 3)
        self.assertNotIn(b"Traceback", self.process.output)

    async def test_sigterm_stops_parent_and_workers(self):
        """SIGTERM: the parent stops its workers and exits 0."""
        await self.started()
        pids = worker_pids(self.process.output)
        self.transport.signalProcess(signal.SIGTERM)
        self.assertEqual(await self.process.ended, 0, self.process.output)
        self.assertFalse(any(alive(pid) for pid in pids))

    async def test_workers_run_as_the_dropped_user(self):
        """With --uid/--gid the parent binds as root; its workers run as the dropped user."""
        if os.getuid() != 0:
            raise SkipTest("needs root")
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            raise SkipTest("no user nobody") from None
        os.chmod(self.workdir, 0o755)
        for directory in self.workdir.parents:
            if not os.stat(directory).st_mode & 0o001:
                raise SkipTest(f"nobody cannot enter {directory}")
        uid, gid = entry.pw_uid, entry.pw_gid
        python = Path(sys.executable).resolve()
        if not all(os.stat(p).st_mode & 0o001 for p in [python, *python.parents]):
            # This Python is root's alone: that the worker cannot run it
            # shows it is started after the drop, as the dropped user.
            self.start(twistd=("--uid", str(uid), "--gid", str(gid)))
            await self.process.wait_for(b"Cannot start a worker")
            self.assertIn(b"permission denied", self.process.output)
            return
        await self.started(twistd=("--uid", str(uid), "--gid", str(gid)))
        for pid in worker_pids(self.process.output):
            status = Path(f"/proc/{pid}/status").read_text()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
            self.assertEqual({int(u) for u in uids}, {uid})
        await deferToThread(lambda: self.connect().quit())
        self.assertNotIn(b"Traceback", self.process.output)

    async def test_lmtp_on_a_unix_socket(self):
        """A UNIX socket listener: served by the workers, kept when one dies, removed at stop."""
        path = self.workdir / "lmtp.sock"
        await self.started("--lmtp", f"unix:{path}:mode=660")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)

        def lhlo():
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(str(path))
                greeting = client.recv(200)
                client.sendall(b"QUIT\r\n")
                client.recv(200)
                return greeting

        self.assertTrue((await deferToThread(lhlo)).startswith(b"220 "))
        first = worker_pids(self.process.output)
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        await self.process.until(lambda: len(worker_pids(self.process.output)) == 3)
        # The dead worker's port did not take the path with it.
        self.assertTrue(path.exists())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)
        for _ in range(4):
            self.assertTrue((await deferToThread(lhlo)).startswith(b"220 "))
        self.transport.signalProcess(signal.SIGTERM)
        self.assertEqual(await self.process.ended, 0)
        self.assertFalse(path.exists())

    async def test_pop3s_and_proxy_listeners(self):
        """--pop3s and haproxy: listeners are served by the workers, TLS and header handled."""
        import ssl

        from tests.support.certs import CA

        ca = CA()
        cert, key = ca.issue("pop.test").write(self.workdir / "certs", "server")
        ca_path = ca.write(self.workdir / "certs" / "ca.pem")
        tls_port, proxy_port = free_port(), free_port()
        await self.started("--tls-cert", str(cert), "--tls-key", str(key),
                           "--pop3s", f"tcp:{tls_port}:interface=127.0.0.1",
                           "--pop3", f"haproxy:tcp:{proxy_port}:interface=127.0.0.1")

        def sessions():
            context = ssl.create_default_context(cafile=str(ca_path))
            context.check_hostname = False
            secure = poplib.POP3_SSL("127.0.0.1", tls_port, context=context, timeout=10)
            greeting = secure.getwelcome()
            secure.quit()
            raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
            raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n")
            proxied = raw.recv(100)
            raw.sendall(b"QUIT\r\n")
            raw.recv(100)
            raw.close()
            return greeting, proxied

        greeting, proxied = await deferToThread(sessions)
        self.assertTrue(greeting.startswith(b"+OK"), greeting)
        self.assertTrue(proxied.startswith(b"+OK"), proxied)
        await self.process.wait_for(b"Disconnected 192.0.2.7:40000")
        self.assertNotIn(b"Traceback", self.process.output)

    async def test_orphaned_workers_exit(self):
        """The parent killed with SIGKILL: its workers see the admission socket close and exit."""
        await self.started()
        pids = worker_pids(self.process.output)
        self.transport.signalProcess(signal.SIGKILL)
        await self.process.ended
        await self.process.until(lambda: not any(alive(pid) for pid in pids))

    async def test_orphaned_worker_finishes_its_session(self):
        """The parent gone mid-session: the session goes on to its QUIT, then the worker exits."""
        user, password = await self.started()
        pids = worker_pids(self.process.output)

        log_in = partial(self.log_in, user, password)

        client = await deferToThread(log_in)
        serving = serving_pid(client.sock, pids)
        self.transport.signalProcess(signal.SIGKILL)
        await self.process.ended
        await self.process.until(lambda: not any(alive(p) for p in pids - {serving}))
        self.assertTrue(alive(serving))
        count, _ = await deferToThread(client.stat)
        self.assertEqual(count, 1)  # the first start's welcome message
        await deferToThread(client.quit)
        await self.process.until(lambda: not alive(serving))

    async def test_sighup_reaches_every_worker(self):
        """SIGHUP to the parent: each worker reloads its certificates."""
        from tests.support.certs import CA

        cert, key = CA().issue("pop.test").write(self.workdir / "certs", "server")
        await self.started("--tls-cert", str(cert), "--tls-key", str(key))
        pids = worker_pids(self.process.output)
        reloaded = re.compile(rb"\[worker (\d+)[^\n]*TLS certificates loaded for")

        def reloads() -> set[int]:
            return {int(m.group(1)) for m in reloaded.finditer(self.process.output)}

        self.assertEqual(reloads(), set())
        self.transport.signalProcess(signal.SIGHUP)
        await self.process.until(lambda: reloads() == pids)

    async def test_port_in_use(self):
        """The parent cannot bind: one line and status 75, as one process, no worker started."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        self.start("--pop3", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(await self.process.ended, 75)
        self.assertIn(b"popserv: cannot listen on 127.0.0.1:%d: address already in use" % port,
                      self.process.output)
        self.assertNotIn(b"Started worker", self.process.output)
