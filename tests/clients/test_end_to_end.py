"""
End to end: the real server on loopback TCP, a real Maildir and password
file on disk, and real clients (Python's poplib, raw sockets, curl).
"""

from __future__ import annotations

import base64
import hmac
import os
import poplib
import re
import shutil
import socket
from hashlib import md5

import scramp
from twisted.internet import reactor

from popserv.core import errors, wire
from popserv.core.body import wire_size
from popserv.logins.passwords import PasswdFile
from popserv.server.service import make_factory
from tests.support.servers import (
    RAW_MESSAGES,
    CurlTestCase,
    PostgresServer,
    RawClient,
    ServerTestCase,
    command,
    crlf,
    login,
)


class PoplibTests(ServerTestCase):
    async def test_stat_list_uidl_retr_top(self):
        def session():
            c = self.pop()
            c.user("alice")
            c.pass_("secret")
            stat = c.stat()
            listing = c.list()[1]
            uidl = c.uidl()[1]
            bodies = [c.retr(n)[1] for n in range(1, 5)]
            top = c.top(3, 1)[1]
            caps = c.capa()
            c.quit()
            return stat, listing, uidl, bodies, top, caps

        stat, listing, uidl, bodies, top, caps = await self.run_in_thread(session)
        sizes = [wire_size(m) for m in self.messages]
        self.assertEqual(stat, (4, sum(sizes)))
        self.assertEqual(listing, [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)])
        uids = [line.split()[1] for line in uidl]
        self.assertEqual(uids[:3], [name.encode() for name in RAW_MESSAGES])
        self.assertEqual(len(set(uids)), 4)
        for body, message in zip(bodies, self.messages, strict=True):
            self.assertEqual(b"\r\n".join(body) + b"\r\n", crlf(message))
        self.assertEqual(top, [b"From: c@x", b"Subject: mixed", b"", b"line"])
        self.assertIn("PIPELINING", caps)
        self.assertEqual(len(self.stored_uids()), 4)

    async def test_dele_quit_removes_exactly_those(self):
        def session():
            c = self.pop()
            c.user("alice")
            c.pass_("secret")
            c.dele(1)
            c.dele(3)
            c.rset()
            c.dele(2)
            c.dele(4)
            c.quit()

        before = self.stored_uids()
        await self.run_in_thread(session)
        self.assertEqual(self.stored_uids(), [before[0], before[2]])

    async def test_drop_without_quit_deletes_nothing(self):
        def session():
            c = RawClient(self.portno)
            c.send(b"USER alice\r\nPASS secret\r\nDELE 1\r\nDELE 2\r\n")
            for _ in range(4):
                c.line()
            c.close()

        before = self.stored_uids()
        await self.run_in_thread(session)
        await self.wait_idle()
        self.assertEqual(self.stored_uids(), before)

    async def test_retr_marks_seen_and_uidl_stable(self):
        def session():
            c = self.pop()
            c.user("alice")
            c.pass_("secret")
            uidl = c.uidl()[1]
            c.retr(1)
            c.quit()
            c = self.pop()
            c.user("alice")
            c.pass_("secret")
            again = c.uidl()[1]
            c.quit()
            return uidl, again

        uidl, again = await self.run_in_thread(session)
        self.assertEqual(uidl, again)
        self.assertEqual(self.seen_uids(), ["1700000001.M1P1.test"])

    async def test_apop(self):
        def session():
            c = self.pop()
            ok = c.apop("bob", "bob pw")
            c.quit()
            c = self.pop()
            try:
                c.apop("alice", "secret")
            except poplib.error_proto as e:
                return ok, e.args[0]

        ok, refused = await self.run_in_thread(session)
        self.assertTrue(ok.startswith(b"+OK"))
        self.assertEqual(refused, wire.err(errors.APOPFailed()).rstrip())

    async def test_failed_logins_close_connection(self):
        def session():
            c = RawClient(self.portno)
            answers = []
            for _ in range(3):
                c.send(b"USER alice\r\nPASS nope\r\n")
                c.line()
                answers.append(c.line())
            return answers, c.closed()

        answers, closed = await self.run_in_thread(session)
        self.assertEqual(answers[0], b"-ERR [AUTH] Authentication failed\r\n")
        self.assertTrue(answers[2].startswith(b"-ERR [AUTH]"))
        self.assertTrue(closed)

    async def test_unknown_user_same_answer(self):
        def session():
            c = RawClient(self.portno)
            c.send(b"USER mallory\r\nPASS x\r\nUSER ../etc\r\nPASS x\r\nQUIT\r\n")
            return [c.line() for _ in range(5)]

        answers = await self.run_in_thread(session)
        self.assertEqual(answers[1], b"-ERR [AUTH] Authentication failed\r\n")
        self.assertEqual(answers[3], b"-ERR [AUTH] Authentication failed\r\n")


class BrokenMaildirTests(ServerTestCase):
    """A Maildir that is not one (Maildir only)."""

    async def test_broken_maildir_is_sys_perm(self):
        """A file where alice's Maildir should be: -ERR [SYS/PERM], no traceback, no path."""
        shutil.rmtree(self.maildir)
        self.maildir.write_bytes(b"")

        def session():
            c = self.pop()
            try:
                return login(c, "alice", "secret")
            finally:
                c.close()

        answer = await self.run_in_thread(session)
        self.assertEqual(answer, wire.err(errors.PermanentFailure()).rstrip())
        self.assertTrue(answer.startswith(b"-ERR [SYS/PERM] "))


#: Every SASL mechanism that takes a password (RFC 5034), offered whatever is stored.
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256")
#: Every way to log in with a password: RFC 1939's two, and each mechanism.
LOGIN_KINDS = ("USER", "APOP", *PASSWORD_MECHANISMS)


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def log_in(c: RawClient, kind: str, user: str, password: str) -> bytes:
    """Log in with ``kind`` (one of :data:`LOGIN_KINDS`); the server's last answer."""
    if kind == "USER":
        c.send(f"USER {user}\r\nPASS {password}\r\n".encode())
        c.line()
        return c.line()
    if kind == "APOP":
        timestamp = re.search(rb"<[^>]+>", c.greeting).group(0)
        c.send(f"APOP {user} {md5(timestamp + password.encode()).hexdigest()}\r\n".encode())
        return c.line()
    if kind == "PLAIN":
        c.send(b"AUTH PLAIN " + b64(f"\0{user}\0{password}") + b"\r\n")
        return c.line()
    if kind == "LOGIN":
        c.send(b"AUTH LOGIN\r\n")
        for answer in (user, password):
            challenge = c.line()
            if not challenge.startswith(b"+ "):
                return challenge
            c.send(b64(answer) + b"\r\n")
        return c.line()
    if kind == "CRAM-MD5":
        c.send(b"AUTH CRAM-MD5\r\n")
        challenge = base64.b64decode(c.line()[2:])
        digest = hmac.new(password.encode(), challenge, md5).hexdigest()
        c.send(b64(f"{user} {digest}") + b"\r\n")
        return c.line()
    client = scramp.ScramClient([kind], user, password)
    c.send(f"AUTH {kind} ".encode() + b64(client.get_client_first()) + b"\r\n")
    client.set_server_first(base64.b64decode(c.line()[2:]).decode())
    c.send(b64(client.get_client_final()) + b"\r\n")
    answer = c.line()
    if answer.startswith(b"+ "):
        client.set_server_final(base64.b64decode(answer[2:]).decode())  # the server knew the key
        c.send(b"\r\n")
        answer = c.line()
    return answer


class LoginKindsTests(ServerTestCase):
    """
    Every login kind against the real server: bob's PLAIN-scheme password
    lets challenge-response logins (APOP, CRAM-MD5, SCRAM) check him; alice's
    argon2id one only those that send the password.
    """

    options = {"sasl": PASSWORD_MECHANISMS}

    def sessions(self, user: str, password: str, kinds=LOGIN_KINDS) -> dict[str, tuple]:
        """Per kind: the answer to the login, and to STAT and QUIT after it."""
        found = {}
        for kind in kinds:
            c = RawClient(self.portno)
            try:
                answer = log_in(c, kind, user, password)
                after = ()
                if answer.startswith(b"+OK"):
                    c.send(b"STAT\r\nQUIT\r\n")
                    after = (c.line(), c.line())
                found[kind] = (answer, *after)
            finally:
                c.close()
        return found

    async def test_every_kind_with_a_plain_password(self):
        self.add_message("bob", b"Subject: for bob\n\nhello\n")
        found = await self.run_in_thread(self.sessions, "bob", "bob pw")
        for kind, (answer, stat, bye) in found.items():
            self.assertTrue(answer.startswith(b"+OK"), (kind, answer))
            self.assertEqual(stat, b"+OK 1 %d\r\n" % wire_size(b"Subject: for bob\n\nhello\n"))
            self.assertTrue(bye.startswith(b"+OK"), (kind, bye))

    async def test_hashed_password(self):
        """alice: every kind that sends the password works; challenge-response fails [AUTH]."""
        found = await self.run_in_thread(self.sessions, "alice", "secret")
        for kind, (answer, *after) in found.items():
            if kind in ("USER", "PLAIN", "LOGIN"):
                self.assertTrue(answer.startswith(b"+OK"), (kind, answer))
                self.assertTrue(after[0].startswith(b"+OK 4 "), (kind, after))
            else:
                self.assertTrue(answer.startswith(b"-ERR [AUTH] "), (kind, answer))

    async def test_wrong_password(self):
        found = await self.run_in_thread(
            self.sessions, "bob", "wrong", ("USER", "APOP", "CRAM-MD5", "SCRAM-SHA-256")
        )
        for kind, (answer,) in found.items():
            self.assertTrue(answer.startswith(b"-ERR [AUTH] "), (kind, answer))


class RawProtocolTests(ServerTestCase):
    async def test_exact_bytes_and_stuffing(self):
        def session():
            c = RawClient(self.portno)
            c.send(b"USER alice\r\nPASS secret\r\n")
            c.line(), c.line()
            out = {}
            for n in (1, 2, 3):
                c.send(b"LIST %d\r\nRETR %d\r\n" % (n, n))
                out[n] = (c.line(), c.line(), c.multi())
            c.send(b"QUIT\r\n")
            c.line()
            return out

        out = await self.run_in_thread(session)
        self.assertEqual(
            out[1][2], b"From: a@x\r\nSubject: lf\r\n\r\n..starts with dot\r\nend\r\n.\r\n"
        )
        self.assertEqual(
            out[2][2], b"From: b@x\r\nSubject: crlf\r\n\r\n...two dots\r\nend\r\n.\r\n"
        )
        self.assertEqual(
            out[3][2], b"From: c@x\r\nSubject: mixed\r\n\r\nline\r\n..\r\nlast, no newline\r\n.\r\n"
        )
        for n, (listed, _, body) in out.items():
            size = int(listed.split()[2])
            unstuffed = b"\r\n".join(
                line[1:] if line.startswith(b".") else line for line in body[:-3].split(b"\r\n")
            )
            self.assertEqual(size, len(unstuffed), n)

    async def test_half_close(self):
        """printf '...QUIT' | nc -N: every answer comes back, and QUIT's deletions apply."""
        def session():
            c = RawClient(self.portno)
            c.send(b"USER alice\r\nPASS secret\r\nDELE 1\r\nQUIT\r\n")
            c.sock.shutdown(socket.SHUT_WR)
            answers = [c.line() for _ in range(4)]
            return answers, c.closed()

        answers, closed = await self.run_in_thread(session)
        self.assertTrue(answers[3].startswith(b"+OK Bye, 1 deleted"), answers)
        self.assertTrue(closed)
        self.assertEqual(len(self.stored_uids()), 3)

    async def test_pipelining_and_long_lines(self):
        def session():
            c = RawClient(self.portno)
            c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\n" + b"NOOP " + b"x" * 1000
                   + b"\r\nLAST\r\nRETR 0\r\nUIDL 1\r\nQUIT\r\n")
            return [c.line() for _ in range(8)]

        lines = await self.run_in_thread(session)
        self.assertTrue(lines[2].startswith(b"+OK 4 "))
        self.assertEqual(lines[3:6], [b"-ERR Line too long\r\n", b"-ERR Unknown command\r\n",
                                      b"-ERR No such message\r\n"])
        self.assertEqual(lines[6], b"+OK 1 1700000001.M1P1.test\r\n")
        self.assertTrue(lines[7].startswith(b"+OK"))


#: The issue's example: a message listed at 32 octets, then rewritten to 1,332.
SMALL_NAME = "1700000010.M1P1.small"
SMALL = b"Subject: small\n\nshort messag\n"
SMALL_GROWN = (
    b"Subject: small\n\n" + b"rewritten, and much longer\n" * 46 + b"the end of it, rewritten\n"
)
#: Larger than the chunk read before the +OK (64 KiB); a CR more a line on the wire.
BIG_NAME = "1700000011.M1P1.big"
BIG = b"Subject: big\n\n" + b"0123456789 abcdef\n" * 20_000


class ChangedMessageTests(ServerTestCase):
    """
    A message file rewritten in place between LIST and RETR, as a
    non-atomic writer does: the client gets -ERR [SYS/TEMP] when that shows
    before the +OK, or a connection closed without the final '.', never a
    complete answer of a size LIST did not announce.
    """

    def setUp(self):
        super().setUp()
        (self.maildir / "new" / SMALL_NAME).write_bytes(SMALL)
        (self.maildir / "new" / BIG_NAME).write_bytes(BIG)

    def rewrite(self, name: str, data: bytes) -> None:
        """The same file (same name and inode) truncated and written again."""
        with open(self.maildir / "new" / name, "r+b") as f:
            f.truncate(0)
            f.write(data)

    @staticmethod
    def number(client: poplib.POP3, name: str) -> int:
        for line in client.uidl()[1]:
            number, uid = line.split()
            if uid == name.encode():
                return int(number)
        raise AssertionError(f"{name} not listed")

    def refused(self, name: str, data: bytes, *commands: str) -> tuple[bytes, list[bytes]]:
        """LIST the message, rewrite it, send ``commands`` ({n}: its number); their answers."""
        c = self.pop()
        try:
            c.user("alice")
            c.pass_("secret")
            n = self.number(c, name)
            listed = c.list(n)
            self.rewrite(name, data)
            answers = [command(c, line.format(n=n)) for line in commands]
            # The session goes on: another message comes whole.
            retr = c.retr(1)
            answers.append(b"\r\n".join(retr[1]) + b"\r\n" == crlf(self.messages[0]))
            answers.append(c.quit())
            return listed, answers
        finally:
            c.close()

    def cut(self, name: str, data: bytes) -> tuple[int, bytes, bytes]:
        """LIST the message, rewrite it, RETR it: (listed size, status line, all that followed)."""
        c = RawClient(self.portno)
        try:
            c.send(b"USER alice\r\nPASS secret\r\nUIDL\r\n")
            c.line(), c.line(), c.line()
            uids = c.multi().split(b"\r\n")
            n = next(u.split()[0] for u in uids if u.endswith(b" " + name.encode()))
            c.send(b"LIST " + n + b"\r\n")
            listed = int(c.line().split()[2])
            self.rewrite(name, data)
            c.send(b"RETR " + n + b"\r\n")
            status, received = c.line(), c.buffer
            try:
                while not received.endswith(b"\r\n.\r\n"):
                    chunk = c.sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except ConnectionResetError:
                pass
            return listed, status, received
        finally:
            c.close()

    async def assert_nothing_lost(self) -> None:
        """The session ended without deleting anything, and the next one logs in."""
        await self.wait_idle()
        self.assertEqual(len(self.files()), 6)

        def session():
            c = self.pop()
            c.user("alice")
            c.pass_("secret")
            stat = c.stat()
            c.quit()
            return stat

        self.assertEqual((await self.run_in_thread(session))[0], 6)

    async def test_small_message_grown(self):
        """Listed at 32 octets, 1,332 now: RETR and TOP answer -ERR [SYS/TEMP]."""
        self.assertEqual((wire_size(SMALL), wire_size(SMALL_GROWN)), (32, 1332))
        listed, answers = await self.run_in_thread(
            self.refused, SMALL_NAME, SMALL_GROWN, "RETR {n}", "TOP {n} 0", "TOP {n} 99", "NOOP"
        )
        self.assertTrue(listed.endswith(b" 32"), listed)
        changed = wire.err(errors.MessageChanged()).rstrip()
        self.assertEqual(answers[:3], [changed] * 3)
        self.assertEqual(answers[3:], [b"+OK", True, b"+OK Bye, 0 deleted, 6 left"])
        await self.assert_nothing_lost()

    async def test_small_message_shrunk(self):
        """Shorter now: RETR, and a TOP that runs to its end, answer -ERR [SYS/TEMP]."""
        _, answers = await self.run_in_thread(
            self.refused, SMALL_NAME, SMALL[:-4] + b"\n", "RETR {n}", "TOP {n} 99"
        )
        changed = wire.err(errors.MessageChanged()).rstrip()
        self.assertEqual(answers, [changed, changed, True, b"+OK Bye, 0 deleted, 6 left"])
        await self.assert_nothing_lost()

    async def test_big_message_much_longer(self):
        """A file too long for the listed size is refused before the +OK, however big."""
        _, answers = await self.run_in_thread(self.refused, BIG_NAME, BIG * 3, "RETR {n}")
        self.assertEqual(answers[0], wire.err(errors.MessageChanged()).rstrip())
        await self.assert_nothing_lost()

    async def test_big_message_grown_while_sent(self):
        """
        A line more, which only reading to the end shows: the connection is
        cut before anything past the listed size, and without the final '.'.
        """
        listed, status, received = await self.run_in_thread(
            self.cut, BIG_NAME, BIG + b"one line more\n"
        )
        self.assertEqual((listed, status), (wire_size(BIG), b"+OK %d octets\r\n" % listed))
        self.assertEqual(received.count(b"\r\n.\r\n"), 0, "a complete answer")
        self.assertLessEqual(len(received), listed)
        self.assertTrue(crlf(BIG).startswith(received))
        await self.assert_nothing_lost()

    async def test_big_message_shrunk_while_sent(self):
        """A line less: the body goes out short, and the connection is cut before its '.'."""
        listed, status, received = await self.run_in_thread(self.cut, BIG_NAME, BIG[:-18])
        self.assertEqual(status, b"+OK %d octets\r\n" % listed)
        self.assertEqual(received.count(b"\r\n.\r\n"), 0, "a complete answer")
        self.assertLess(len(received), listed)
        await self.assert_nothing_lost()


class LoginDelayTests(ServerTestCase):
    """--login-delay 900, with bob exempted in the password file."""

    options = {"login-delay": 900}

    def setUp(self):
        super().setUp()
        PasswdFile(self.layout.passwd_path).set_extra("bob", "login_delay", "0")

    async def test_second_login_refused(self):
        def sessions():
            c = self.pop()
            before = c.capa()
            first = login(c, "alice", "secret")
            after = c.capa()
            c.quit()
            c = self.pop()
            second = login(c, "alice", "secret")
            c.quit()
            return before, first, after, second

        before, first, after, second = await self.run_in_thread(sessions)
        self.assertTrue(first.startswith(b"+OK"))
        self.assertEqual(second, wire.err(errors.LoginDelayed()).rstrip())
        self.assertTrue(second.startswith(b"-ERR [LOGIN-DELAY] "))
        # Before login: the longest delay of any user, marked per-user.
        self.assertEqual(before["LOGIN-DELAY"], ["900", "USER"])
        self.assertEqual(after["LOGIN-DELAY"], ["900"])

    async def test_exempt_user_and_wrong_password(self):
        """bob's own login_delay=0 wins; a wrong password is [AUTH], never [LOGIN-DELAY]."""
        def sessions():
            answers = []
            for password in ("bob pw", "bob pw", "wrong"):
                c = self.pop()
                answers.append(login(c, "bob", password))
                answers.append(c.capa()["LOGIN-DELAY"])
                c.quit()
            return answers

        answers = await self.run_in_thread(sessions)
        self.assertTrue(answers[0].startswith(b"+OK") and answers[2].startswith(b"+OK"))
        self.assertEqual(answers[1], ["0"])
        self.assertTrue(answers[4].startswith(b"-ERR [AUTH] "))

    async def test_broken_maildir_is_sys_perm(self):
        """With LOGIN-DELAY on, a file in place of the Maildir is still [SYS/PERM]."""
        shutil.rmtree(self.maildir)
        self.maildir.write_bytes(b"")
        c = await self.run_in_thread(self.pop)
        answer = await self.run_in_thread(login, c, "alice", "secret")
        await self.run_in_thread(c.quit)
        self.assertTrue(answer.startswith(b"-ERR [SYS/PERM] "), answer)

    async def test_survives_restart(self):
        """The last login time is kept in the Maildir, so a restart does not reset it."""
        c = await self.run_in_thread(self.pop)
        self.assertTrue((await self.run_in_thread(login, c, "alice", "secret")).startswith(b"+OK"))
        await self.run_in_thread(c.quit)
        await self.wait_idle()
        await self.port.stopListening()
        self.factory = make_factory({"data": str(self.layout.data_dir), "login-delay": 900,
                                     "hostname": "pop.test"}, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.portno = self.port.getHost().port
        c = await self.run_in_thread(self.pop)
        refused = await self.run_in_thread(login, c, "alice", "secret")
        await self.run_in_thread(c.quit)
        self.assertTrue(refused.startswith(b"-ERR [LOGIN-DELAY] "))


class ExpireTests(ServerTestCase):
    """--expire 30: retrieved messages delivered over 30 days ago go at QUIT."""

    options = {"expire": 30}

    async def test_retrieved_old_messages_expire(self):
        def sessions():
            c = self.pop()
            login(c, "alice", "secret")
            capa = c.capa()
            c.retr(1)  # 2023: expires
            c.retr(4)  # delivered now: stays, marked seen
            c.quit()
            first = self.stored_uids()
            c = self.pop()
            login(c, "alice", "secret")
            c.quit()  # message 2 and 3 were never retrieved: they stay
            return capa, first, self.stored_uids()

        capa, first, second = await self.run_in_thread(sessions)
        self.assertEqual(capa["EXPIRE"], ["30"])
        self.assertEqual(len(first), 3)
        self.assertFalse(any(name.startswith("1700000001") for name in first))
        self.assertEqual(second, first)

    async def test_drop_expires_nothing(self):
        def session():
            c = RawClient(self.portno)
            c.send(b"USER alice\r\nPASS secret\r\nRETR 1\r\n")
            c.line(), c.line(), c.line(), c.multi()
            c.close()

        before = self.stored_uids()
        await self.run_in_thread(session)
        await self.wait_idle()
        self.assertEqual(self.stored_uids(), before)


class ExpireZeroTests(ServerTestCase):
    """--expire 0: an implicit DELE of each message retrieved with RETR (RFC 2449 6.7)."""

    options = {"expire": 0}

    async def test_only_what_this_session_retrieved(self):
        # A message another program (an IMAP client, webmail) marked seen.
        name = "1700000002.M1P1.test"
        os.rename(self.maildir / "new" / name, self.maildir / "cur" / (name + ":2,S"))

        def session():
            c = self.pop()
            login(c, "alice", "secret")
            capa = c.capa()
            c.top(1, 0)  # TOP is not RETR: message 1 stays
            c.retr(3)
            c.quit()
            return capa

        capa = await self.run_in_thread(session)
        self.assertEqual(capa["EXPIRE"], ["0"])
        remaining = self.files()
        self.assertEqual(len(remaining), 3)
        self.assertFalse(any(n.startswith("1700000003") for n in remaining))
        self.assertTrue(any(n.startswith(name) for n in remaining))


class CurlTests(CurlTestCase):
    """
    curl with no options, as a newcomer runs it.  Only hashed passwords are
    stored, so APOP is not offered and curl logs in with USER/PASS (it uses
    APOP whenever the greeting has a timestamp, and cannot fall back).
    """

    apop_user = False
    #: Whether the greeting offers APOP all the same: with accounts that
    #: cannot be listed (a database's), it cannot tell that none could pass.
    apop_offered = False

    async def test_apop_timestamp(self):
        def greeting():
            c = RawClient(self.portno)
            c.close()
            return c.greeting

        self.assertEqual(b"<" in await self.run_in_thread(greeting), self.apop_offered)

    async def test_list_and_fetch(self):
        listing = await self.curl("")
        sizes = [wire_size(m) for m in self.messages]
        self.assertEqual(listing, b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes)))
        for n, message in enumerate(self.messages, 1):
            self.assertEqual(await self.curl(str(n)), crlf(message))

    async def test_uidl_top_dele(self):
        uidl = await self.curl("", "-X", "UIDL")
        self.assertEqual(uidl.splitlines()[0], b"1 1700000001.M1P1.test")
        top = await self.curl("", "-X", "TOP 2 0")
        self.assertEqual(top, b"From: b@x\r\nSubject: crlf\r\n\r\n")
        await self.curl("", "-X", "DELE 1", "-I")
        self.assertEqual(len(self.stored_uids()), 3)

    async def test_wrong_password(self):
        _, err, code = await self.run_curl("", user="alice:wrong")
        self.assertEqual(code, 67, err)


class CurlAPOPTests(CurlTestCase):
    """curl's APOP against an account with a PLAIN password."""

    async def test_apop_login(self):
        self.add_message("bob", b"Subject: hi\n\nbob\n")
        fetched = await self.curl("1", "--login-options", "AUTH=+APOP", user="bob:bob pw")
        self.assertEqual(fetched, b"Subject: hi\r\n\r\nbob\r\n")

    async def test_apop_refused_for_hashed_password(self):
        """An argon2id account cannot pass APOP, with curl forced to use it."""
        _, err, code = await self.run_curl("", "--login-options", "AUTH=+APOP")
        self.assertEqual(code, 67, err)

    async def test_sasl_preferred_to_apop(self):
        """With SASL offered, plain curl logs in by SASL even though APOP is offered too."""
        listing = await self.curl("")
        self.assertEqual(len(listing.splitlines()), 4)


# The same on the PostgreSQL store: all but the tests of Maildir files
# (a broken Maildir, a file rewritten under a session, flags set by another
# program) and of settings kept in the password file (LOGIN-DELAY).


class PoplibPostgresTests(PostgresServer, PoplibTests):
    pass


class LoginKindsPostgresTests(PostgresServer, LoginKindsTests):
    pass


class RawProtocolPostgresTests(PostgresServer, RawProtocolTests):
    pass


class ExpirePostgresTests(PostgresServer, ExpireTests):
    pass


class CurlPostgresTests(PostgresServer, CurlTests):
    apop_offered = True  # curl logs in by SASL then (see CurlAPOPTests)


class CurlAPOPPostgresTests(PostgresServer, CurlAPOPTests):
    pass
