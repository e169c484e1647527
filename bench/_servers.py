"""
Starting and stopping the servers under test, and measuring their memory.

Each server runs as a child process of the benchmark, on 127.0.0.1 and a
free port, with a raised open-files limit, over its own copy of the data
(see :mod:`bench._dataset`).  Only processes started here are ever stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench._dataset import MAIL_GID, MAIL_UID, Dataset

if TYPE_CHECKING:
    from bench._postgres import Cluster

HOST = "127.0.0.1"
#: Open files for servers and clients: 10,000 sessions plus files and pipes.
NOFILE = 65536
#: Seconds a server may take to answer its first greeting.
START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's open-files limit as far as allowed; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_for_greeting(
    port: int, process: subprocess.Popen[bytes], log: Path, *, proxied: bool = False
) -> None:
    """
    Wait until a POP3 greeting comes from ``port``; fail if the process
    died.  ``proxied``: a listener behind HAProxy, which greets only after
    a PROXY header (v1 here, as HAProxy would send it).
    """
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}; log:\n{tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if proxied:
                    here, there = s.getsockname(), s.getpeername()
                    s.sendall(f"PROXY TCP4 {here[0]} {there[0]} {here[1]} {there[1]}\r\n".encode())
                if s.recv(100).startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no greeting on port {port} after {START_TIMEOUT} s; log:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Server:
    """A server under test: a name, a POP3 port, and the process running it."""

    name = "server"
    #: "smtp" or "lmtp" when the server can take deliveries for B5.
    delivery: str | None = None
    #: Its listeners expect a PROXY header first: it runs behind HAProxy.
    proxied = False

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.port = free_port()
        self.delivery_port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = dataset.root / "run" / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.log = self.workdir / "server.log"
        self.note = ""

    @property
    def mail_root(self) -> Path:
        """The directory holding ``USER/Maildir`` for this server."""
        return self.dataset.server_root(self.name)

    def maildir(self, user: str) -> Path:
        return self.mail_root / user / "Maildir"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        """Start the server and wait for its greeting."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so stopping it reaches its children only.
                # The open-files limit is inherited: main() raised it.
                start_new_session=True,
            )
        wait_for_greeting(self.port, self.process, self.log, proxied=self.proxied)

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL if it lingers)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Children that outlived their parent (Dovecot's) are still in the group.
        deadline = time.monotonic() + 10
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def pids(self) -> list[int]:
        """The server's process and all its descendants."""
        if self.process is None:
            return []
        return process_tree(self.process.pid)

    def reset_caches(self, user: str) -> None:
        """
        Forget what any server keeps on disk about ``user``'s maildrop (for
        B3 'first'): B3's maildrops are shared, and one server's files
        (Dovecot's ``dovecot-uidlist``, which popserv reads for its UIDLs)
        must not change another's first login.  popserv's ``popserv.index``
        and ``popserv.listing``; Dovecot's ``dovecot.index*``,
        ``dovecot-uidlist`` and the like; twisted.mail keeps none.
        """
        for entry in self.maildir(user).iterdir():
            if entry.name.startswith(_CACHE_PREFIXES) and entry.is_file():
                entry.unlink()

    def database_pids(self) -> list[int]:
        """The processes of the database the server keeps its mail in (none: files)."""
        return []

    def parts(self) -> dict[str, Callable[[], list[int]]]:
        """Its processes by part, when its CPU is worth telling apart (HAProxy, nodes)."""
        return {}

    def backends(self) -> dict[str, int]:
        """Its ports by service (``pop3``, ``lmtp``, ``metrics``...) for HAProxy's config."""
        return {"pop3": self.port}

    def version(self) -> str:
        return ""


#: The cache files servers leave in a Maildir's root.
_CACHE_PREFIXES = ("popserv.index", "popserv.listing", "dovecot")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Popserv(Server):
    """``twistd -n popserv`` from the source tree the benchmark runs in (or ``--popserv-tree``)."""

    name = "popserv"

    def __init__(
        self,
        dataset: Dataset,
        tree: Path,
        twistd: str,
        workers: int | None = None,
        name: str = "popserv",
        proxied: bool = False,
    ) -> None:
        #: ``popserv``, or ``popserv-wN`` beside it (its own data and mail).
        self.name = name
        self.proxied = proxied
        super().__init__(dataset)
        self.tree = tree
        self.twistd = twistd
        options = popserv_options(tree, twistd)
        #: ``--workers N`` when given and the tree's popserv has it.
        self.workers = ["--workers", str(workers)] if workers and "--workers" in options else []
        self.receiver = "--smtp" in options
        # Every client of the bench is on 127.0.0.1, and B4 holds 10,000
        # sessions: the limits are raised as Dovecot's are (see its config).
        self.limits = (
            ["--max-connections", "30000", "--max-connections-per-ip", "30000"]
            if "--max-connections-per-ip" in options
            else []
        )
        # B3's and B4's maildrops are shared with the other servers through
        # symbolic links (see Dataset), which popserv refuses by default.
        if "--follow-maildir-symlinks" in options:
            self.limits.append("--follow-maildir-symlinks")
        self.smtp_port = free_port() if self.receiver else None
        self.lmtp_port = free_port() if self.receiver and "--lmtp" in options else None
        # B5 delivers by LMTP when it can, as to Dovecot; by SMTP otherwise.
        if self.lmtp_port is not None:
            self.delivery, self.delivery_port = "lmtp", self.lmtp_port
        elif self.smtp_port is not None:
            self.delivery, self.delivery_port = "smtp", self.smtp_port
        # Behind HAProxy: the /health its checks ask for (contrib's cluster.cfg).
        self.metrics_port = free_port() if proxied else None

    def backends(self) -> dict[str, int]:
        found = {"pop3": self.port, "smtp": self.smtp_port, "lmtp": self.lmtp_port}
        found["metrics"] = self.metrics_port
        return {service: port for service, port in found.items() if port is not None}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.tree)
        return env

    def command(self) -> list[str]:
        data = self.dataset.root / f"{self.name}-data"
        data.mkdir(exist_ok=True)
        # HAProxy's PROXY header is believed from loopback without --trusted-network.
        proxy = "haproxy:" if self.proxied else ""
        cmd = [
            self.twistd,
            "-n",
            "--pidfile=",
            "--logfile",
            str(self.log),
            "popserv",
            "--data",
            str(data),
            *self.store_options(),
            "--hostname",
            "bench.example.org",
            "--pop3",
            f"{proxy}tcp:{self.port}:interface={HOST}:backlog=4096",
            *self.limits,
            *self.workers,
        ]
        if self.smtp_port is not None:
            cmd += ["--smtp", f"{proxy}tcp:{self.smtp_port}:interface={HOST}"]
            cmd += ["--domain", "example.org"]
        if self.lmtp_port is not None:
            cmd += ["--lmtp", f"{proxy}tcp:{self.lmtp_port}:interface={HOST}"]
        if self.metrics_port is not None:
            cmd += ["--metrics", f"tcp:{self.metrics_port}:interface={HOST}"]
        return cmd

    def store_options(self) -> list[str]:
        """Where the accounts and the mail are: the password file and the Maildirs."""
        return [
            "--passwd",
            str(self.dataset.passwd),
            "--maildir",
            str(self.mail_root / "{user}" / "Maildir"),
        ]

    def version(self) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(self.tree), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                check=False,
            )
            return f"git {out.stdout.strip()}"
        except OSError:
            return ""


class PopservPG(Popserv):
    """
    popserv with ``--store postgresql``: accounts in Postfixadmin's
    ``mailbox`` table and the mail in the database ``database`` of the
    bench's own PostgreSQL (:mod:`bench._postgres`), loaded with the same
    messages as the others' Maildirs.
    """

    def __init__(
        self,
        dataset: Dataset,
        tree: Path,
        twistd: str,
        cluster: Cluster,
        database: str,
        workers: int | None = None,
        name: str = "popserv-pg",
        proxied: bool = False,
    ) -> None:
        super().__init__(dataset, tree, twistd, workers, name=name, proxied=proxied)
        self.cluster = cluster
        self.database = database
        self.limits = [o for o in self.limits if o != "--follow-maildir-symlinks"]

    def store_options(self) -> list[str]:
        return ["--database", self.cluster.url(self.database), "--store", "postgresql"]

    def reset_caches(self, user: str) -> None:
        """
        B3 'first': PostgreSQL restarted, so nothing of the maildrop is in
        its buffers (the page cache is dropped after this), and popserv
        with it.  Restarting PostgreSQL under a running popserv leaves its
        pool full of cut connections, which psycopg_pool checks one at a
        time with a back-off of 1, 2, 4 s between them: the next logins
        time out after 5 s (see bench/README.rst).  So popserv starts
        anew, and its first login opens a connection.
        """
        self.stop()
        self.cluster.restart()
        self.start()

    def database_pids(self) -> list[int]:
        pid = self.cluster.postmaster()
        return process_tree(pid) if pid else []

    def version(self) -> str:
        return f"{super().version()}, PostgreSQL {self.cluster.version()}"


def popserv_options(tree: Path, twistd: str) -> set[str]:
    """The long options ``twistd popserv --help`` lists (run from ``tree``)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    try:
        out = subprocess.run(
            [twistd, "popserv", "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
            cwd=tree,
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


def _dovecot_binary() -> str | None:
    found = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
    )
    if found is None or not os.path.exists("/usr/lib/dovecot/pop3"):
        return None
    return found


class Dovecot(Server):
    """A private Dovecot instance, tuned for speed as Dovecot's docs suggest."""

    name = "dovecot"

    def __init__(self, dataset: Dataset, name: str = "dovecot", proxied: bool = False) -> None:
        self.name = name
        self.proxied = proxied
        super().__init__(dataset)
        self.binary = _dovecot_binary()
        if os.path.exists("/usr/lib/dovecot/lmtp"):
            self.delivery = "lmtp"
            self.delivery_port = free_port()
        self.config = self.workdir / "dovecot.conf"

    @staticmethod
    def available() -> str | None:
        """None when Dovecot with its POP3 server is installed, else why not."""
        if _dovecot_binary() is None:
            return "not installed (apt-get install dovecot-pop3d)"
        if os.geteuid() != 0:
            return "needs root here (mail uid 65534)"
        return None

    def backends(self) -> dict[str, int]:
        found = {"pop3": self.port}
        if self.delivery_port is not None:
            found["lmtp"] = self.delivery_port
        return found

    def write_config(self) -> None:
        # Behind HAProxy: Dovecot takes its PROXY headers (v1 and v2) on
        # listeners marked so, from the networks it is told to trust.
        proxy = "\n    haproxy = yes" if self.proxied else ""
        trusted = f"haproxy_trusted_networks = {HOST}\n" if self.proxied else ""
        base = self.workdir / "base"
        state = self.workdir / "state"
        for d in (base, state):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        protocols = "pop3 lmtp" if self.delivery else "pop3"
        lmtp = ""
        if self.delivery:
            lmtp = f"""
service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {self.delivery_port}{proxy}
  }}
  process_min_avail = 1
}}
protocol lmtp {{
  auth_username_format = %Ln
}}
"""
        self.config.write_text(
            f"""# Written by the popserv benchmark; a private instance on loopback.
protocols = {protocols}
listen = {HOST}
base_dir = {base}
state_dir = {state}
log_path = {self.log}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{self.mail_root}/%n/Maildir
mail_uid = {MAIL_UID}
mail_gid = {MAIL_GID}
first_valid_uid = 1
first_valid_gid = 1
# Enough for 10,000 held sessions (B4): one pop3 process per session.
default_process_limit = 12000
default_client_limit = 30000
default_vsz_limit = 512M
mail_max_userip_connections = 100
{trusted}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.dataset.passwd}
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={self.mail_root}/%n
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {self.port}{proxy}
  }}
  # High-performance mode: long-lived login processes, each serving many.
  service_count = 0
  process_min_avail = 2
  client_limit = 12000
}}
service pop3 {{
  service_count = 1000
  process_limit = 12000
}}
service anvil {{
  client_limit = 30000
}}
service auth {{
  client_limit = 30000
}}
{lmtp}"""
        )

    def command(self) -> list[str]:
        self.write_config()
        assert self.binary is not None
        return [self.binary, "-F", "-c", str(self.config)]

    def version(self) -> str:
        assert self.binary is not None
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        )
        return "Dovecot " + out.stdout.strip()


class TwistedMail(Server):
    """``twisted.mail.pop3`` serving the same Maildirs (see :mod:`bench._twisted_server`)."""

    name = "twisted"

    def __init__(self, dataset: Dataset, tree: Path) -> None:
        super().__init__(dataset)
        self.tree = tree

    def environment(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.tree))

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench._twisted_server",
            "--port",
            str(self.port),
            "--passwd",
            str(self.dataset.passwd),
            "--root",
            str(self.mail_root),
            "--log",
            str(self.log),
        ]

    def version(self) -> str:
        import twisted

        return f"Twisted {twisted.__version__}"


class RawSender(Server):
    """
    Not a POP3 server: a trivial asyncio sender of the same RETR responses,
    held in memory, for the loopback limit beside B2.
    """

    name = "raw"

    def __init__(self, dataset: Dataset, tree: Path, user: str) -> None:
        super().__init__(dataset)
        self.tree = tree
        self.user = user

    def environment(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.tree))

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench._raw_server",
            "--port",
            str(self.port),
            "--maildir",
            str(self.dataset.master_maildir(self.user)),
        ]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def open_files_limit(pid: int) -> int | None:
    """The soft open-files limit of process ``pid`` (from /proc/PID/limits)."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def pss_kib(pids: list[int]) -> int:
    """The summed proportional set size of ``pids`` in KiB (smaps_rollup)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue  # exited meanwhile
    return total
