"""
The mail every server is fed: users, a password file, and Maildirs.

One master copy is written under ``ROOT/master/USER/Maildir``.  Each server
gets ``ROOT/servers/NAME/USER``: a symbolic link to the master for maildrops
no benchmark changes (B3's big ones, B4's), and a copy made of hard links
for those a benchmark changes (RETR marks messages seen, B5 deletes), so
each server starts from the same files without the disk holding them twice.
Everything belongs to uid 65534, the uid Dovecot's mail processes run as.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from attrs import define, field

from bench._messages import make_large_message, make_message, name_for

MAIL_UID = MAIL_GID = 65534
#: Every user's password is this prefix and the user name (PLAIN).
PASSWORD_PREFIX = "pw-"

KIB = 1024
MIB = 1024 * 1024


def password(user: str) -> str:
    return PASSWORD_PREFIX + user


def b1_user(i: int) -> str:
    return f"b1u{i:02d}"


def b4_user(i: int) -> str:
    return f"b4u{i:05d}"


def b5_user(i: int) -> str:
    return f"b5u{i:02d}"


B2_USER = "b2"
B3_SIZED = "b3w"
B3_UNSIZED = "b3n"


@define
class Sizes:
    """How much data to generate; ``--quick`` shrinks it."""

    b1_users: int = 20
    b1_messages: int = 10
    b1_size: int = 4 * KIB
    b2_messages: int = 10
    b2_size: int = 10 * MIB
    b3_messages: int = 100_000
    b3_size: int = 2 * KIB
    b4_users: int = 10_000
    b5_users: int = 20
    b5_messages: int = 10


@define
class Dataset:
    """The generated mail under ``root``."""

    root: Path
    sizes: Sizes
    passwd: Path = field(init=False)
    #: Users whose maildrops the benchmarks change (copied per server).
    mutable: list[str] = field(factory=list)
    #: Users whose maildrops are shared by all servers (linked).
    shared: list[str] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.passwd = self.root / "passwd"

    def master_maildir(self, user: str) -> Path:
        return self.root / "master" / user / "Maildir"

    def server_root(self, server: str) -> Path:
        return self.root / "servers" / server

    def build(self, say: Callable[[str], None] = print) -> None:
        """Write every user's mail and the password file."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        s = self.sizes
        say(f"  writing B1/B5 maildrops ({s.b1_users}+{s.b5_users} users)")
        for i in range(s.b1_users):
            self._fill(b1_user(i), s.b1_messages, lambda n: make_message(s.b1_size, seed=n))
            self.mutable.append(b1_user(i))
        for i in range(s.b5_users):
            self._fill(b5_user(i), s.b5_messages, lambda n: make_message(s.b1_size, seed=n))
            self.mutable.append(b5_user(i))
        say(f"  writing B2 maildrop ({s.b2_messages} x {s.b2_size // MIB} MiB)")
        self._fill(B2_USER, s.b2_messages, lambda n: make_large_message(s.b2_size, seed=n))
        self.mutable.append(B2_USER)
        say(f"  writing B3 maildrops (2 x {s.b3_messages:,} messages)")
        self._big_maildrops()
        say(f"  writing B4 maildrops ({s.b4_users:,} users)")
        one = make_message(s.b1_size, seed=1)
        for i in range(s.b4_users):
            self._fill(b4_user(i), 1, lambda _: one)
            self.shared.append(b4_user(i))
        users = self.mutable + self.shared
        self.passwd.write_text("".join(f"{u}:{{PLAIN}}{password(u)}\n" for u in users))
        os.chmod(self.passwd, 0o644)
        _chown_tree(self.root / "master")

    def _fill(self, user: str, count: int, message: Callable[[int], bytes]) -> None:
        """``count`` new messages in ``new/``, as a fresh delivery leaves them."""
        maildir = _make_maildir(self.master_maildir(user))
        for n in range(count):
            data = message(n)
            name = name_for(data, n).in_new()
            _write(maildir / "new" / name, data)

    def _big_maildrops(self) -> None:
        """
        B3: the same messages twice, in ``cur/`` as a maildrop left on the
        server (seen, ``:2,S``): once named with ``,S=`` and ``,W=``, once
        without, so a server must read every file to learn its size.
        """
        sized = _make_maildir(self.master_maildir(B3_SIZED))
        unsized = _make_maildir(self.master_maildir(B3_UNSIZED))
        # 1,000 distinct bodies are plenty: only names and sizes matter to B3.
        bodies = [make_message(self.sizes.b3_size, seed=n) for n in range(1000)]
        for n in range(self.sizes.b3_messages):
            data = bodies[n % len(bodies)]
            name = name_for(data, n)
            path = sized / "cur" / name.in_cur("S")
            _write(path, data)
            bare = name_for(data, n, sizes=False)
            os.link(path, unsized / "cur" / bare.in_cur("S"))
        self.shared += [B3_SIZED, B3_UNSIZED]

    def prepare_server(self, server: str) -> None:
        """Give ``server`` its view of the mail (links, or copies made of hard links)."""
        top = self.server_root(server)
        top.mkdir(parents=True, exist_ok=True)
        os.chmod(top.parent, 0o755)
        os.chmod(top, 0o755)
        for user in self.shared:
            link = top / user
            if not link.exists():
                link.symlink_to(self.master_maildir(user).parent)
        for user in self.mutable:
            source = self.master_maildir(user)
            target = _make_maildir(top / user / "Maildir")
            for sub in ("new", "cur"):
                for entry in os.scandir(source / sub):
                    os.link(entry.path, target / sub / entry.name)
        _chown_tree(top)


def _chown_tree(path: Path) -> None:
    """Give ``path`` and everything below it to the mail uid (symbolic links not followed)."""
    subprocess.run(["chown", "-R", "-h", f"{MAIL_UID}:{MAIL_GID}", str(path)], check=True)


def _make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for d in (path.parent, path, path / "cur", path / "new", path / "tmp"):
        os.chmod(d, 0o700 if d != path.parent else 0o755)
    return path


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
