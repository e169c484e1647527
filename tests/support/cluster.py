"""
A popserv cluster for the tests, blocking (for ``SynchronousTestCase``s
whose clients run in threads): ``twistd popserv`` nodes on the PostgreSQL
store (:class:`Node`), a real HAProxy run with
``contrib/haproxy/cluster.cfg`` in front of them (:class:`HAProxy`), and a
TCP forwarder between a node and PostgreSQL that can be cut
(:class:`Forwarder`).
"""

from __future__ import annotations

import contextlib
import poplib
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.peers import missing
from tests.support.processes import REPO, LoggedProcess, free_port, twistd_script, wait_for_port

CLUSTER_CONFIG = REPO / "contrib" / "haproxy" / "cluster.cfg"

#: The services a node serves, by the port contrib's config gives each.
NODE_PORTS = {"pop3": "1110", "pop3s": "1995", "smtp": "1025", "lmtp": "1024", "metrics": "9110"}
#: HAProxy's front ports in contrib's config.
FRONT_PORTS = {"pop3": "110", "pop3s": "995", "smtp": "25", "lmtp": "24"}


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (free_port() may hand out one it just gave)."""
    chosen: set[int] = set()
    while len(chosen) < count:
        chosen.add(free_port())
    return sorted(chosen)


class Node(LoggedProcess):
    """
    ``twistd popserv --store postgresql`` behind HAProxy (``haproxy:``
    listeners), on ports chosen once and kept across restarts, so that
    HAProxy finds it again.  ``name`` is its ``server`` in contrib's config.
    """

    def __init__(
        self, name: str, url: str, base: Path, *, options: Sequence[str] = (), tls: Any = None
    ) -> None:
        super().__init__(base / name)
        self.name, self.url = name, url
        self.base.mkdir(parents=True)
        self.ports = dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS)), strict=True))
        self.options = list(options)
        #: (certificate, key) paths for POP3S, STLS and STARTTLS.
        self.tls = tls
        #: Every pid this node had, for ``popserv who``'s NODE column (host:pid).
        self.pids: list[int] = []

    def argv(self) -> list[str]:
        listen = {k: f"haproxy:tcp:{port}:interface=127.0.0.1" for k, port in self.ports.items()}
        tls: list[str] = []
        if self.tls is not None:
            tls = ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1]),
                   "--pop3s", listen["pop3s"]]  # fmt: skip
        return [
            twistd_script(), "-n", "--pidfile", "", "popserv",
            "--data", str(self.base / "data"),
            "--database", self.url, "--store", "postgresql",
            "--pop3", listen["pop3"], "--smtp", listen["smtp"], "--lmtp", listen["lmtp"],
            "--metrics", f"tcp:{self.ports['metrics']}:interface=127.0.0.1",
            "--domain", "example.org", "--hostname", f"{self.name}.test",
            *tls, *self.options,
        ]  # fmt: skip

    def launch(self) -> None:
        """Start the process (:meth:`wait_started` waits for it to listen)."""
        self.pids.append(self.spawn(self.argv()).pid)

    def wait_started(self) -> None:
        ports = (self.ports["pop3"], self.ports["smtp"], self.ports["metrics"])
        self.wait_for_ports(*ports, what=f"node {self.name}")

    def start(self) -> None:
        self.launch()
        self.wait_started()

    def logins(self, user: str | None = None) -> int:
        """Logins this node has logged (all its lives), of ``user`` or anyone's."""
        who = re.escape(user) if user else r"\S+"
        return len(re.findall(rf"{who} logged in from ", self.output()))


def configured(text: str, fronts: dict[str, int], nodes: Sequence[Node], stats: Path) -> str:
    """
    contrib's cluster config with its front ports, its nodes' addresses and
    ports and its stats socket replaced (everything on loopback); nothing
    else changed.
    """
    by_name = {node.name: node for node in nodes}
    front_of = {port: fronts[key] for key, port in FRONT_PORTS.items()}
    service_of = {port: key for key, port in NODE_PORTS.items()}

    def bind(m: re.Match[str]) -> str:
        return f"{m.group(1)}127.0.0.1:{front_of[m.group(2)]}"

    def server(m: re.Match[str]) -> str:
        node = by_name[m.group(2)]
        line = f"{m.group(1)}127.0.0.1:{node.ports[service_of[m.group(3)]]}{m.group(4)}"
        return re.sub(r"\bport (\d+)", lambda p: f"port {node.ports[service_of[p.group(1)]]}", line)

    text = re.sub(r"(?m)^(\s*bind\s+)(?:127\.0\.0\.1)?:(\d+)", bind, text)
    text = re.sub(r"(?m)^(\s*server (node\d+) )10\.0\.0\.\d+:(\d+)(.*)$", server, text)
    return re.sub(r"(?m)^(\s*stats socket )\S+", lambda m: f"{m.group(1)}{stats}", text)


class HAProxy:
    """Debian's haproxy, run in the foreground with contrib's cluster config."""

    def __init__(self, base: Path, nodes: Sequence[Node]) -> None:
        executable = shutil.which("haproxy")
        if executable is None:
            raise missing("haproxy is not installed (Debian: apt-get install haproxy)")
        self.executable = executable
        self.base = base
        self.nodes = list(nodes)
        self.fronts = dict(zip(FRONT_PORTS, free_ports(len(FRONT_PORTS)), strict=True))
        # The runtime API's socket: a short path (a UNIX socket's is at most 107 octets).
        self._sockets = Path(tempfile.mkdtemp(prefix="popserv-haproxy-"))
        self.stats = self._sockets / "admin.sock"
        self.config = base / "haproxy.cfg"
        self.config.write_text(
            configured(CLUSTER_CONFIG.read_text(), self.fronts, self.nodes, self.stats)
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.base / "haproxy.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.executable, "-db", "-f", str(self.config)], stdout=log,
                stderr=subprocess.STDOUT, env={}, cwd=self.base,
            )  # fmt: skip
        process = self.process
        for port in self.fronts.values():
            try:
                wait_for_port(port, lambda: process.poll() is None, "haproxy")
            except AssertionError as e:
                raise AssertionError(f"{e}: {self.output()}") from None
        # The runtime API's socket may come a moment after the listeners.
        deadline = time.monotonic() + 30
        while not self.stats.exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError(f"haproxy made no stats socket: {self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return (self.base / "haproxy.log").read_text(errors="replace")

    def command(self, line: str) -> str:
        """One command on the stats socket (the runtime API); its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.stats))
            s.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer.decode(errors="replace")

    def status(self, backend: str = "popserv_pop3") -> dict[str, str]:
        """Each server of ``backend``, by name, to its status (UP, DOWN, ``UP 1/2`` ...)."""
        header, *rows = self.command("show stat").splitlines()
        columns = header.lstrip("# ").split(",")
        found = {}
        for row in rows:
            fields = dict(zip(columns, row.split(","), strict=False))
            if fields.get("pxname") == backend and fields.get("svname", "").startswith("node"):
                found[fields["svname"]] = fields["status"]
        return found

    def wait_status(self, server: str, status: str, patience: float = 30.0) -> None:
        """Until HAProxy holds ``server`` (of the POP3 backend) at ``status``."""
        deadline = time.monotonic() + patience
        while (found := self.status().get(server)) != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy holds {server} {found}, not {status}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self._sockets, ignore_errors=True)


class Forwarder:
    """
    A TCP forwarder on a loopback port to ``target``, in threads of this
    process; :meth:`cut` makes it a network that no longer carries
    anything: the connections stay open but whatever is sent is dropped,
    and new connections are accepted and never answered (no RST, no FIN:
    the peer learns of it only from its own timeouts).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._keep(client)
            if self.cut_off.is_set():
                continue  # held, never answered
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._keep(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.cut_off.is_set():
                    sink.sendall(data)
            if not self.cut_off.is_set():
                sink.shutdown(socket.SHUT_WR)

    def url(self, url: str) -> str:
        """``url`` (a PostgreSQL URL on the target's port) through this forwarder."""
        return url.replace(f":{self.target[1]}/", f":{self.port}/")

    def cut(self) -> None:
        self.cut_off.set()

    def close(self) -> None:
        """Close everything (the peers see their connections end)."""
        self._closed = True
        self.listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class NodePOP3(poplib.POP3):
    """
    poplib straight to one node's ``haproxy:`` listener: it sends the PROXY
    v1 header HAProxy would (a test that must pick the node).
    """

    def _create_socket(self, timeout: float) -> socket.socket:
        s = super()._create_socket(timeout)
        here, there = s.getsockname(), s.getpeername()
        s.sendall(f"PROXY TCP4 {here[0]} {there[0]} {here[1]} {there[1]}\r\n".encode())
        return s
