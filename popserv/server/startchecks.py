"""
What popserv checks and tidies as it starts, beside listening: deliveries
a crash left half-written, files the user it runs as cannot reach, the
open-file limit, and listeners where remote clients could never log in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from popserv.core.errors import InvalidUsername
from popserv.logins.passwords import PasswdFile
from popserv.server.factory import POP3Factory
from popserv.stores.layout import Layout
from popserv.stores.maildir import clean_tmp

log = Logger()


class TmpCleaner(Service):
    """
    At start, removes from every user's ``tmp/`` the deliveries a crash or
    kill left half-written (they were never visible, and never will be).
    """

    def __init__(self, layout: Layout, passwd: PasswdFile, reactor: Any) -> None:
        self.layout = layout
        self.passwd = passwd
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service
        pool = self._reactor.getThreadPool()
        deferToThreadPool(self._reactor, pool, self._clean).addCallbacks(
            self._cleaned, lambda f: log.failure("Cleaning tmp/ failed", f)
        )

    def _clean(self) -> int:
        removed = 0
        try:
            users = self.passwd.users()
        except OSError:
            return 0
        for entry in users:
            try:
                removed += clean_tmp(self.layout.maildir_location(entry.name))
            except (OSError, InvalidUsername):
                continue
        return removed

    def _cleaned(self, removed: int) -> None:
        if removed:
            log.info("Removed {count} unfinished deliveries from tmp/", count=removed)


class AccessCheck(Service):
    """
    At start-up, after twistd dropped privileges: says so, loudly, when this
    user cannot read the password file or create Maildirs under the data
    directory, instead of failing every login with a puzzling [SYS/PERM].
    """

    def __init__(
        self, layout: Layout, spool_dir: Path | None = None, *, passwd: bool = True
    ) -> None:
        self.layout = layout
        #: The receiver's spool directory, when SMTP or LMTP is on.
        self.spool_dir = spool_dir
        #: Whether accounts are in the password file (not in a database).
        self.passwd = passwd

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service
        for problem, owner in self._problems():
            if owner:
                log.error(
                    "{problem}: give the files to the user popserv runs as (uid {uid}), for"
                    " example chown -R that user {data}",
                    problem=problem,
                    uid=os.getuid(),
                    data=str(self.layout.data_dir),
                )
            else:
                log.error("{problem}", problem=problem)

    def problems(self) -> list[str]:
        """What this process cannot do that serving mail needs."""
        return [problem for problem, _ in self._problems()]

    def _problems(self) -> list[tuple[str, bool]]:
        """Each problem, and whether giving the files to this user would solve it."""
        # os.access and os.path answer False where pathlib would raise EACCES.
        found = []
        passwd = self.layout.passwd_path
        if not self.passwd:
            pass
        elif not os.path.lexists(passwd) and os.access(passwd.parent, os.X_OK):
            # Not a permission problem: chown would not help.
            found.append(
                (
                    f"There is no password file {passwd}: every login fails until one"
                    " is made (popserv user add NAME)",
                    False,
                )
            )
        elif not os.access(passwd, os.R_OK):
            found.append((f"Cannot read the password file {passwd}", True))
        # The server creates a new user's Maildir in the data directory (not
        # in, say, /home for a /home/{user}/Maildir template).
        head = self.layout.maildir_template.split("{user}", 1)[0]
        parent = Path(head) if head.endswith(os.sep) else Path(head).parent
        inside = parent == self.layout.data_dir or self.layout.data_dir in parent.parents
        if inside and os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
            found.append((f"Cannot create Maildirs in {parent}", True))
        # The receiver makes its spool directory at the first DATA, and
        # answers every DATA with a 451 if it cannot.
        if self.spool_dir is not None:
            spool = self.spool_dir
            where = spool if os.path.isdir(spool) else spool.parent
            if os.path.isdir(where) and not os.access(where, os.W_OK | os.X_OK):
                found.append((f"Cannot spool incoming mail in {spool}", True))
        return found


#: File descriptors a session may hold: its socket, the Maildir lock, a message.
FDS_PER_CONNECTION = 3
#: Descriptors beside the sessions': listeners, the password file, the log, threads.
FDS_SPARE = 64


def ensure_fd_limit(max_connections: int, resource_module: Any = None) -> int:
    """
    Raise the soft limit on open files (``ulimit -n``, often 1024) to what
    ``max_connections`` sessions need, as far as the hard limit allows; warn
    when that is not enough.  Return the soft limit in force.
    """
    if resource_module is None:
        try:
            import resource as resource_module
        except ImportError:  # not on POSIX
            return -1
    needed = max_connections * FDS_PER_CONNECTION + FDS_SPARE
    limits: tuple[int, int] = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    soft, hard = limits
    if soft == resource_module.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource_module.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warn(
            "Open-file limit {soft} is too low for --max-connections {connections} (needs about"
            " {needed}): raise it (LimitNOFILE= in systemd, ulimit -n) or lower --max-connections",
            soft=soft,
            connections=max_connections,
            needed=needed,
        )
    return soft


def warn_about_cleartext(endpoints: Sequence[str], factory: POP3Factory) -> None:
    """Say so when remote clients could connect but never log in."""
    policy = factory.policy
    if factory.tls is not None or policy.allow_cleartext_auth:
        return
    remote = [e for e in endpoints if not _loopback_only(e)]
    if remote:
        log.warn(
            "Clients connecting to {endpoints} from other hosts cannot log in: there is no"
            " TLS certificate (--tls-cert) and cleartext logins are off"
            " (--allow-cleartext-auth)",
            endpoints=", ".join(remote),
        )


def _loopback_only(endpoint: str) -> bool:
    """Only local clients reach ``endpoint`` (behind a proxy, anyone may)."""
    if endpoint.startswith("haproxy:"):
        return False
    return any(
        f"interface={host}" in endpoint.replace("\\", "")
        for host in ("127.0.0.1", "::1", "localhost")
    ) or endpoint.startswith("unix:")
