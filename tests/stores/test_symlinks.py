"""
Symbolic links a user plants in or as a Maildir: never followed by the
server, the delivery paths, the quota scan or the start-up clean-up.

Each attack is one the hardening review carried out against a real server:
a user who can write inside a Maildir (``/home/{user}/Maildir``) replaces
``cur/``, ``new/``, ``tmp/`` or the Maildir itself with a link.
"""

from __future__ import annotations

import os
import poplib
import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.core.errors import InvalidUsername
from popserv.stores.delivery import StorageFailed, check_room
from popserv.stores.layout import Layout, ensure_maildir
from popserv.stores.maildir import MaildirMailbox, clean_tmp, deliver
from popserv.stores.maildir.directory import MaildirPath, SymlinkRefused
from popserv.stores.quota import Quota, maildir_usage
from tests.support.servers import ServerTestCase

SECRET = b"alice:{ARGON2ID}secret-hash-of-the-server\n"


def plant_directory(parent: Path, name: str) -> Path:
    """A directory the attacker wants the server to read or change, with one file."""
    target = parent / name
    target.mkdir(parents=True)
    (target / "passwd").write_bytes(SECRET)
    return target


def replace_with_link(path: Path, target: Path) -> None:
    """What the attacker does: move the real directory away, link in its place."""
    os.rename(path, path.with_name(path.name + ".real"))
    path.symlink_to(target)


class LayoutTests(SynchronousTestCase):
    def test_user_part_of_the_template(self) -> None:
        """The directories from the one ``{user}`` is in are the user's; the rest the operator's."""
        layout = Layout.create("/srv/data", maildir_template="/home/{user}/Maildir")
        location = layout.maildir_location("alice")
        self.assertEqual(location.root, Path("/home"))
        self.assertEqual(location.parts, ("alice", "Maildir"))
        self.assertEqual(location.path, Path("/home/alice/Maildir"))
        self.assertFalse(location.follow_symlinks)
        default = Layout.create("/srv/data").maildir_location("bob")
        self.assertEqual((default.root, default.parts), (Path("/srv/data/mail"), ("bob",)))
        inside = Layout.create("/d", maildir_template="/var/mail/{user}.d/Maildir")
        self.assertEqual(inside.maildir_location("c").parts, ("c.d", "Maildir"))

    def test_domain_and_local(self) -> None:
        """{domain}/{local}: Postfixadmin's layout; the user's part starts at the first."""
        layout = Layout.create("/d", maildir_template="/var/vmail/{domain}/{local}/")
        location = layout.maildir_location("alice@example.org")
        self.assertEqual(location.root, Path("/var/vmail"))
        self.assertEqual(location.parts, ("example.org", "alice"))
        quoted = layout.maildir_location("a@b@example.org")  # the last @ splits
        self.assertEqual(quoted.parts, ("example.org", "a@b"))
        both = Layout.create("/d", maildir_template="/m/{local}-{domain}")
        self.assertEqual(both.maildir_location("x@y.org").parts, ("x-y.org",))

    def test_names_that_make_no_path(self) -> None:
        """No domain for {domain}, or one that would climb out: refused, never a path."""
        layout = Layout.create("/d", maildir_template="/var/vmail/{domain}/{local}")
        for user in ("alice", "alice@", "alice@..", "alice@.hidden"):
            with self.assertRaises(InvalidUsername, msg=user):
                layout.maildir_location(user)
        self.assertEqual(layout.maildir_location("x@example.org").parts, ("example.org", "x"))
        with self.assertRaises(ValueError):
            Layout.create("/d", maildir_template="/var/vmail/{domain}")
        with self.assertRaises(ValueError):  # alice@a.org and alice@b.org would share one
            Layout.create("/d", maildir_template="/var/vmail/{local}")

    def test_the_accounts_own_maildir(self) -> None:
        """{maildir}: the account's relative path (Postfixadmin's column), or its default."""
        layout = Layout.create("/d", maildir_template="/var/vmail/{maildir}")
        given = layout.maildir_location("alice@example.org", "example.org/alice/")
        self.assertEqual((given.root, given.parts), (Path("/var/vmail"), ("example.org", "alice")))
        other = layout.maildir_location("alice@example.org", "elsewhere/box")
        self.assertEqual(other.parts, ("elsewhere", "box"))
        default = layout.maildir_location("bob@example.org")
        self.assertEqual(default.parts, ("example.org", "bob"))
        for bad in ("../etc", "/etc/x", "a/../../b", ".hidden/a", "a//b", "", "a/./b"):
            with self.assertRaises(InvalidUsername, msg=bad):
                layout.maildir_location("alice@example.org", bad)
        with self.assertRaises(InvalidUsername):
            layout.maildir_location("nodomain")  # no column and no domain to make one
        inside = Layout.create("/d", maildir_template="/var/vmail/{maildir}/Maildir")
        self.assertEqual(inside.maildir_location("a@b.org", "b.org/a/").parts,
                         ("b.org", "a", "Maildir"))
        with self.assertRaises(ValueError):
            Layout.create("/d", maildir_template="/var/vmail/x{maildir}")

    def test_operators_own_hidden_components(self) -> None:
        """A fixed component the operator wrote (.maildir) is kept: only the name's are judged."""
        layout = Layout.create("/d", maildir_template="/home/{user}/.maildir")
        self.assertEqual(layout.maildir_location("alice").parts, ("alice", ".maildir"))
        both = Layout.create("/d", maildir_template="/v/{domain}/{local}/.mail")
        self.assertEqual(both.maildir_location("a@b.org").parts, ("b.org", "a", ".mail"))

    def test_follow_option(self) -> None:
        layout = Layout.create("/srv/data", follow_symlinks=True)
        self.assertTrue(layout.maildir_location("alice").follow_symlinks)


class StoreTests(TestCase):
    """The store and the delivery paths, on real directories and links."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.maildir = ensure_maildir(self.base / "alice")
        self.victim = plant_directory(self.base, "victim")
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def refusals(self) -> list[str]:
        return [
            event["path"]
            for event in self.logged
            if "Refused a symbolic link" in event.get("log_format", "")
        ]

    async def assert_login_refused(self, location: MaildirPath | Path) -> None:
        with self.assertRaises(Exception) as caught:
            await MaildirMailbox.open(location)
        self.assertEqual(getattr(caught.exception, "code", None), "SYS/PERM")

    async def test_cur_linked_to_another_directory(self) -> None:
        """Not listed, not read, not renamed: the login fails [SYS/PERM] and is logged."""
        replace_with_link(self.maildir / "cur", self.victim)
        await self.assert_login_refused(self.maildir)
        self.assertEqual(os.listdir(self.victim), ["passwd"])
        self.assertEqual(self.refusals(), [str(self.maildir / "cur")])

    async def test_new_linked(self) -> None:
        replace_with_link(self.maildir / "new", self.victim)
        await self.assert_login_refused(self.maildir)
        self.assertEqual(os.listdir(self.victim), ["passwd"])

    async def test_maildir_itself_linked_to_another_users(self) -> None:
        """A Maildir that is a link to bob's is not bob's mail for alice."""
        bob = ensure_maildir(self.base / "bob")
        deliver(bob, b"Subject: for bob only\n\nsecret\n")
        link = self.base / "mallory"
        link.symlink_to(bob)
        await self.assert_login_refused(link)
        self.assertEqual(self.refusals(), [str(link)])

    async def test_linked_maildir_followed_when_allowed(self) -> None:
        """With the operator's option the Maildir's path is followed, never what is inside."""
        real = ensure_maildir(self.base / "elsewhere")
        deliver(real, b"Subject: hi\n\nhello\n")
        link = self.base / "carol"
        link.symlink_to(real)
        allowed = MaildirPath(self.base, ("carol",), follow_symlinks=True)
        mailbox = await MaildirMailbox.open(allowed)
        self.assertEqual(len(mailbox.listing()), 1)
        mailbox.close()
        replace_with_link(real / "cur", self.victim)
        await self.assert_login_refused(allowed)

    async def test_cur_swapped_during_a_session(self) -> None:
        """A link swapped in after the login: RETR and the commit refuse, nothing is unlinked."""
        deliver(self.maildir, b"Subject: one\n\nbody\n")
        mailbox = await MaildirMailbox.open(self.maildir)
        self.addCleanup(mailbox.close)
        name = os.listdir(self.maildir / "new")[0]
        # The victim directory holds a file of the same name as the message.
        (self.victim / name).write_bytes(b"not yours\n")
        replace_with_link(self.maildir / "new", self.victim)
        with self.assertRaises(Exception) as caught:
            mailbox.open_message(0)
        self.assertEqual(caught.exception.code, "SYS/PERM")
        with self.assertRaises(Exception) as failed:
            await mailbox.commit([0], [])
        self.assertEqual(failed.exception.code, "SYS/TEMP")
        self.assertEqual(sorted(os.listdir(self.victim)), sorted(["passwd", name]))

    def test_delivery_refuses_linked_tmp_and_new(self) -> None:
        """Nothing is written through a linked tmp/ or linked into a linked new/."""
        for sub in ("tmp", "new"):
            maildir = ensure_maildir(self.base / f"to-{sub}")
            target = plant_directory(self.base, f"target-{sub}")
            replace_with_link(maildir / sub, target)
            with self.assertRaises(SymlinkRefused):
                deliver(maildir, b"Subject: x\n\ny\n")
            self.assertEqual(os.listdir(target), ["passwd"])
            if sub == "new":
                # The message written under tmp/ is taken back.
                self.assertEqual(os.listdir(maildir / "tmp"), [])

    def test_delivery_through_a_linked_maildir(self) -> None:
        target = ensure_maildir(self.base / "target")
        link = self.base / "linked"
        link.symlink_to(target)
        with self.assertRaises(SymlinkRefused):
            deliver(link, b"Subject: x\n\ny\n")
        self.assertEqual(os.listdir(target / "tmp") + os.listdir(target / "new"), [])

    def test_clean_tmp_does_not_follow(self) -> None:
        """The start-up clean-up removes no file of a directory linked as tmp/."""
        old = time.time() - 10 * 86400
        os.utime(self.victim / "passwd", (old, old))
        replace_with_link(self.maildir / "tmp", self.victim)
        with self.assertRaises(SymlinkRefused):
            clean_tmp(self.maildir)
        self.assertEqual(os.listdir(self.victim), ["passwd"])

    def test_quota_scan_does_not_follow(self) -> None:
        """The quota scan neither counts nor stats the files of a linked new/."""
        replace_with_link(self.maildir / "new", self.victim)
        self.assertRaises(SymlinkRefused, maildir_usage, self.maildir)
        layout = Layout.create(self.base, maildir_template=str(self.base / "{user}"))
        from popserv.stores.delivery import Recipient

        recipient = Recipient("a@x", "alice", layout.maildir_location("alice"), Quota(10**6))
        self.assertRaises(StorageFailed, check_room, recipient, 10)

    async def test_cache_files_inside_are_not_followed(self) -> None:
        """Index, listing and lock files that are links are never written through."""
        from popserv.stores.maildir.index import INDEX_FILE
        from popserv.stores.maildir.listcache import LISTING_FILE

        target = self.victim / "passwd"
        for name in (INDEX_FILE, LISTING_FILE):
            (self.maildir / name).symlink_to(target)
        # A name without ,W= makes the scan keep an index.
        (self.maildir / "new" / "1.plain.host").write_bytes(b"Subject: x\n\ny\n")
        mailbox = await MaildirMailbox.open(self.maildir)
        await mailbox.index_saved()
        mailbox.close()
        self.assertEqual(target.read_bytes(), SECRET)


class ServerTests(ServerTestCase):
    """The attacks of the review, over POP3 with poplib against the real server."""

    apop_user = False

    def session(self) -> poplib.POP3:
        client = self.pop()
        client.user("alice")
        client.pass_("secret")
        return client

    async def test_cur_linked_to_the_data_directory(self) -> None:
        """The review's attack: UIDL listed passwd, RETR served it, QUIT renamed it."""
        passwd = self.layout.passwd_path
        before = passwd.read_bytes()
        replace_with_link(self.maildir / "cur", self.layout.data_dir)

        def attack() -> str:
            client = self.pop()
            client.user("alice")
            try:
                client.pass_("secret")
            except poplib.error_proto as e:
                return e.args[0].decode()
            finally:
                client.close()
            return "+OK"

        answer = await deferToThread(attack)
        self.assertTrue(answer.startswith("-ERR [SYS/PERM]"), answer)
        self.assertEqual(passwd.read_bytes(), before)
        self.assertTrue(passwd.exists())

    async def test_maildir_link_to_another_user(self) -> None:
        """Alice's Maildir replaced by a link to bob's does not serve bob's mail."""
        bob = ensure_maildir(self.layout.maildir_for("bob"))
        deliver(bob, b"Subject: bob's\n\nprivate\n")
        os.rename(self.maildir, self.maildir.with_name("alice.real"))
        self.maildir.symlink_to(bob)

        def attack() -> str:
            client = self.pop()
            client.user("alice")
            try:
                client.pass_("secret")
                return "+OK " + repr(client.uidl())
            except poplib.error_proto as e:
                return e.args[0].decode()
            finally:
                client.close()

        answer = await deferToThread(attack)
        self.assertTrue(answer.startswith("-ERR [SYS/PERM]"), answer)

    async def test_dele_after_swap_unlinks_nothing_elsewhere(self) -> None:
        """cur/ swapped for a link mid-session: DELE + QUIT fails, the other files stay."""
        elsewhere = plant_directory(Path(self.mktemp()).absolute(), "elsewhere")

        def attack() -> tuple[str, list[str]]:
            client = self.session()
            names = sorted(os.listdir(self.maildir / "new"))
            # Same names in the other directory: what an unlink would hit.
            for name in names:
                (elsewhere / name).write_bytes(b"x\n")
            replace_with_link(self.maildir / "new", elsewhere)
            client.dele(1)
            try:
                answer = client.quit().decode()
            except poplib.error_proto as e:
                answer = e.args[0].decode()
            client.close()
            return answer, names

        answer, names = await deferToThread(attack)
        self.assertTrue(answer.startswith("-ERR [SYS/TEMP]"), answer)
        self.assertEqual(sorted(os.listdir(elsewhere)), sorted(["passwd", *names]))


class FollowOptionServerTests(ServerTestCase):
    """``--follow-maildir-symlinks``: linked Maildirs are served, links inside still refused."""

    apop_user = False
    options = {"follow-maildir-symlinks": True}

    async def test_linked_maildir_served(self) -> None:
        real = self.maildir.with_name("alice.real")
        os.rename(self.maildir, real)
        self.maildir.symlink_to(real)

        def fetch() -> int:
            client = self.pop()
            client.user("alice")
            client.pass_("secret")
            count = client.stat()[0]
            client.quit()
            return count

        self.assertEqual(await deferToThread(fetch), len(self.messages))


class HardLinkTests(TestCase):
    """
    Files popserv writes inside a Maildir must be its own: a hard link the
    user made to a file elsewhere (where fs.protected_hardlinks is 0) is refused.
    """

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.maildir = ensure_maildir(self.base / "alice")
        self.victim = self.base / "victim"
        self.victim.write_bytes(SECRET)

    async def test_lock_file_hard_link(self) -> None:
        from popserv.stores.maildir import LOCK_FILE

        os.link(self.victim, self.maildir / LOCK_FILE)
        with self.assertRaises(Exception) as caught:
            await MaildirMailbox.open(self.maildir)
        self.assertEqual(getattr(caught.exception, "code", None), "SYS/PERM")
        self.assertEqual(self.victim.read_bytes(), SECRET)

    def test_maildirsize_hard_link(self) -> None:
        from popserv.stores.maildir import maildirsize

        os.link(self.victim, self.maildir / maildirsize.MAILDIRSIZE_FILE)
        with MaildirPath.of(self.maildir).opened() as (top,):
            maildirsize.append(top, 100, 1)
        self.assertEqual(self.victim.read_bytes(), SECRET)

    def test_refusal_names_the_link(self) -> None:
        """A linked Maildir below a linked parent is logged with its own path."""
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        home = self.base / "home"
        (home / "bob").mkdir(parents=True)
        (home / "bob" / "Maildir").symlink_to(self.maildir)
        location = MaildirPath(home, ("bob", "Maildir"))
        self.assertRaises(SymlinkRefused, location.open)
        paths = [e["path"] for e in logged if "Refused a symbolic link" in e.get("log_format", "")]
        self.assertEqual(paths, [str(home / "bob" / "Maildir")])


class PendingDeliveryTests(SynchronousTestCase):
    def test_swapped_before_publish_leaves_no_orphan(self) -> None:
        """The Maildir swapped for a link between write and publish: the tmp/ file goes."""
        from popserv.stores.maildir.deliver import prepare

        base = Path(self.mktemp()).absolute()
        maildir = ensure_maildir(base / "alice")
        pending = prepare(maildir, b"Subject: x\n\ny\n")
        moved = base / "alice.real"
        os.rename(maildir, moved)
        maildir.symlink_to(ensure_maildir(base / "elsewhere"))
        # publish() never follows the link: it uses the Maildir it wrote into.
        name = pending.publish()
        self.assertEqual(os.listdir(moved / "new"), [name])
        self.assertEqual(os.listdir(moved / "tmp"), [])
        self.assertEqual(os.listdir(base / "elsewhere" / "new"), [])
