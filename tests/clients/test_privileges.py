"""
Running as root, then as an unprivileged user: ``twistd --uid/--gid`` binds
the ports as root, and popserv's own files must then belong to that user.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from popserv.logins.passwords import PasswdFile, hash_password
from popserv.server.configure import service_owner
from popserv.server.firstrun import bootstrap
from popserv.server.startchecks import AccessCheck
from popserv.stores.layout import Layout, give_to, missing
from tests.support.processes import REPO, _Twistd, free_port, stop_at_cleanup, twistd_script

UNPRIVILEGED = "nobody"


def unprivileged() -> tuple[int, int]:
    """The uid and gid of the user tests drop to; skip when there is none or we are not root."""
    if not hasattr(os, "getuid") or os.getuid() != 0:
        raise SkipTest("needs root")
    try:
        entry = pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        raise SkipTest(f"no user {UNPRIVILEGED}") from None
    return entry.pw_uid, entry.pw_gid


def owners(root: Path) -> set[tuple[int, int]]:
    """The (uid, gid) of ``root`` and everything under it."""
    found = {(root.lstat().st_uid, root.lstat().st_gid)}
    for path in root.rglob("*"):
        st = path.lstat()
        found.add((st.st_uid, st.st_gid))
    return found


class OwnershipTests(SynchronousTestCase):
    def test_missing(self):
        base = Path(self.mktemp())
        base.mkdir()
        self.assertEqual(missing(base / "a" / "b"), [base / "a", base / "a" / "b"])
        self.assertEqual(missing(base), [])

    def test_first_start_gives_everything_to_the_service_user(self):
        """Root creates the first account for a server that will run as nobody."""
        owner = unprivileged()
        layout = Layout.create(Path(self.mktemp()) / "data")
        account = bootstrap(layout, "pop.test", owner)
        self.assertIsNotNone(account)
        self.assertEqual(owners(layout.data_dir), {owner})

    def test_an_existing_directory_keeps_its_owner(self):
        """Only what the first start created changes hands, never a directory given to it."""
        owner = unprivileged()
        data = Path(self.mktemp())
        data.mkdir()
        bootstrap(Layout.create(data), "pop.test", owner)
        self.assertEqual((data.stat().st_uid, data.stat().st_gid), (0, 0))
        self.assertEqual(owners(data / "mail"), {owner})
        self.assertEqual((data / "passwd").stat().st_uid, owner[0])

    def test_symlinks_are_not_followed(self):
        owner = unprivileged()
        base = Path(self.mktemp())
        (base / "tree").mkdir(parents=True)
        target = base / "elsewhere"
        target.write_text("not ours")
        (base / "tree" / "link").symlink_to(target)
        give_to(owner, [base / "tree"])
        self.assertEqual(target.stat().st_uid, 0)
        self.assertEqual((base / "tree" / "link").lstat().st_uid, owner[0])

    def test_owner_from_twistd_options(self):
        """--uid/--gid are twistd's options, the parent of popserv's."""
        class Options(dict):
            parent = None

        options = Options()
        self.assertIsNone(service_owner(options))
        self.patch(os, "getuid", lambda: 0)
        options.parent = {"uid": 65534, "gid": 65533}
        self.assertEqual(service_owner(options), (65534, 65533))
        options.parent = {"uid": None, "gid": None}
        self.assertIsNone(service_owner(options))
        root_gid = pwd.getpwuid(0).pw_gid
        options.parent = {"uid": 0, "gid": None}
        self.assertEqual(service_owner(options), (0, root_gid))

    def test_access_check_names_the_problems(self):
        layout = Layout.create(Path(self.mktemp()))
        (layout.data_dir / "mail").mkdir(parents=True)
        PasswdFile(layout.passwd_path).add("alice", hash_password("x", "PLAIN"))
        self.assertEqual(AccessCheck(layout).problems(), [])
        self.patch(os, "access", lambda path, mode: False)
        self.assertEqual(AccessCheck(layout).problems(), [
            f"Cannot read the password file {layout.passwd_path}",
            f"Cannot create Maildirs in {layout.data_dir / 'mail'}",
        ])
        # Maildirs in home directories: the server does not create those.
        elsewhere = Layout.create(layout.data_dir, maildir_template="/home/{user}/Maildir")
        self.assertEqual(len(AccessCheck(elsewhere).problems()), 1)

    def test_access_check_of_the_receivers_spool(self):
        """With SMTP or LMTP on, a spool directory this user cannot write is named."""
        layout = Layout.create(Path(self.mktemp()))
        layout.data_dir.mkdir(parents=True)
        PasswdFile(layout.passwd_path).add("alice", hash_password("x", "PLAIN"))
        spool = layout.data_dir / ".spool"
        self.assertEqual(AccessCheck(layout, spool).problems(), [])
        self.patch(os, "access", lambda path, mode: path != layout.data_dir)
        self.assertEqual(
            AccessCheck(layout, spool).problems(), [f"Cannot spool incoming mail in {spool}"]
        )
        self.assertEqual(AccessCheck(layout).problems(), [])
        spool.mkdir()  # made earlier, by root say
        self.patch(os, "access", lambda path, mode: path != spool)
        self.assertEqual(
            AccessCheck(layout, spool).problems(), [f"Cannot spool incoming mail in {spool}"]
        )


class TwistdUidTests(TestCase):
    """``twistd --uid nobody`` started as root, on a high port, served as nobody."""

    def setUp(self):
        self.owner = unprivileged()
        self.twistd = twistd_script()
        # trial's own temporary directories are private to root; the
        # unprivileged user must reach the data directory.
        self.workdir = Path(tempfile.mkdtemp(prefix="popserv-uid-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        os.chmod(self.workdir, 0o755)
        for directory in self.workdir.parents:
            if not os.stat(directory).st_mode & 0o001:
                raise SkipTest(f"{UNPRIVILEGED} cannot enter {directory}")

    def start(self, *argv: str) -> _Twistd:
        self.port = free_port()
        process = _Twistd()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        uid, gid = self.owner
        command = [self.twistd, "-n", "--pidfile", "", "--uid", str(uid), "--gid", str(gid),
                   "popserv", "--pop3", f"tcp:{self.port}:interface=127.0.0.1",
                   "--hostname", "pop.test", "--data", str(self.workdir / "data"), *argv]
        transport = reactor.spawnProcess(process, self.twistd, command, env, str(self.workdir))

        stop_at_cleanup(self, process, transport)
        return process

    async def test_first_start_then_login_and_retr(self):
        process = self.start()
        await process.wait_for(b"set uid/gid")
        match = re.search(rb"user:\s+(\S+)\n\s+password:\s+(\S+)\n", process.output)
        self.assertIsNotNone(match, process.output)
        user, password = (g.decode() for g in match.groups())
        self.assertEqual(owners(self.workdir / "data"), {self.owner})

        def fetch():
            c = poplib.POP3("127.0.0.1", self.port, timeout=10)
            c.user(user)
            c.pass_(password)
            lines = c.retr(1)[1]
            c.dele(1)
            c.quit()
            return lines

        lines = await deferToThread(fetch)
        self.assertIn(b"Subject: Welcome to popserv", lines)
        self.assertEqual(list((self.workdir / "data" / "mail" / user / "cur").iterdir()), [])
        self.assertNotIn(b"Traceback", process.output)
        self.assertNotIn(b"Cannot read", process.output)

    async def test_files_it_cannot_read_are_reported(self):
        """A password file root made (and kept) is named at start-up, with the fix."""
        layout = Layout.create(self.workdir / "data")
        PasswdFile(layout.passwd_path).add("alice", hash_password("x", "PLAIN"))
        process = self.start("--passwd", str(layout.passwd_path))
        await process.wait_for(b"Cannot read the password file")
        self.assertIn(b"chown -R", process.output)
