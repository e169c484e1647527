"""
A server variant behind HAProxy run with ``contrib/haproxy/cluster.cfg``:
``popserv-pg-haproxy`` (one popserv-pg node), ``popserv-pg-2n`` (two nodes
on the same PostgreSQL) and ``dovecot-haproxy`` (Dovecot as the one node,
taking the same PROXY v2 headers).  The clients connect to HAProxy's
fronts; the nodes listen with ``haproxy:`` endpoints (Dovecot with
``haproxy = yes``) on their own ports.

contrib's config is rewritten as tests/support/cluster.py does for the
tests (the bench does not import tests/): fronts and nodes on loopback
ports, nothing else changed but for what the bench has no use for (see
:func:`configured`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from bench._dataset import Dataset
from bench._servers import HOST, Server, free_port, process_tree

CLUSTER_CONFIG = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "cluster.cfg"

#: Each node service's port in contrib's config.
NODE_PORTS = {"1110": "pop3", "1995": "pop3s", "1025": "smtp", "1024": "lmtp", "9110": "metrics"}
#: HAProxy's front ports in contrib's config.
FRONT_PORTS = {"110": "pop3", "995": "pop3s", "25": "smtp", "24": "lmtp"}


def unavailable() -> str | None:
    """None when HAProxy is installed, else why not."""
    return None if shutil.which("haproxy") else "haproxy not installed (apt-get install haproxy)"


def configured(
    text: str, fronts: dict[str, int], nodes: Sequence[dict[str, int]], *, checks: bool = True
) -> str:
    """
    contrib's cluster config for ``nodes`` (each a node's ports by service,
    ``node1`` first) on loopback, HAProxy's fronts on ``fronts``.  Server
    lines of nodes beyond ``nodes`` are left out, and so is a service a
    node does not serve (Dovecot has no SMTP here); the stats socket too
    (the bench does not use it).  Without ``checks`` (Dovecot has no
    ``GET /health``) the nodes are not checked: the ``httpchk`` lines go,
    and so do ``check ...`` and ``track ...`` on the server lines.
    """

    def bind(m: re.Match[str]) -> str:
        return f"{m.group(1)}{HOST}:{fronts[FRONT_PORTS[m.group(2)]]}"

    def server(m: re.Match[str]) -> str:
        index = int(m.group(2)) - 1
        ports = nodes[index] if index < len(nodes) else {}
        service = NODE_PORTS[m.group(3)]
        if service not in ports:
            return ""
        rest = m.group(4) if checks else re.sub(r" (check|track) .*$", "", m.group(4))
        rest = re.sub(r"\bport (\d+)", lambda p: f"port {ports[NODE_PORTS[p.group(1)]]}", rest)
        return f"{m.group(1)}{HOST}:{ports[service]}{rest}\n"

    text = re.sub(r"(?m)^(\s*bind\s+)(?:127\.0\.0\.1)?:(\d+)", bind, text)
    text = re.sub(r"(?m)^(\s*server node(\d+) )10\.0\.0\.\d+:(\d+)(.*)\n", server, text)
    text = re.sub(r"(?m)^\s*stats socket .*\n", "", text)
    if not checks:
        text = re.sub(r"(?m)^\s*(option httpchk|http-check) .*\n", "", text)
    return text


class Behind(Server):
    """
    ``nodes`` behind HAProxy: the bench's sessions and deliveries go to
    HAProxy's fronts.  Its own process is HAProxy (Debian's, foreground);
    the nodes are started before it and stopped after it.
    """

    def __init__(self, dataset: Dataset, name: str, nodes: Sequence[Server]) -> None:
        self.name = name
        super().__init__(dataset)
        self.nodes = list(nodes)
        self.checks = all("metrics" in node.backends() for node in self.nodes)
        self.fronts = {"pop3": self.port, **{s: free_port() for s in ("pop3s", "smtp", "lmtp")}}
        first = self.nodes[0]
        self.delivery = first.delivery
        if first.delivery is not None:
            self.delivery_port = self.fronts[first.delivery]
        self.config = self.workdir / "haproxy.cfg"

    @property
    def mail_root(self) -> Path:
        return self.nodes[0].mail_root

    def command(self) -> list[str]:
        executable = shutil.which("haproxy")
        assert executable is not None
        self.config.write_text(
            configured(
                CLUSTER_CONFIG.read_text(),
                self.fronts,
                [node.backends() for node in self.nodes],
                checks=self.checks,
            )
        )
        return [executable, "-db", "-f", str(self.config)]

    def start(self) -> None:
        # The bench stops only the servers that started: on a failure here,
        # what did start (nodes, HAProxy) is stopped before the error goes on.
        try:
            for node in self.nodes:
                node.start()
            super().start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        super().stop()
        for node in self.nodes:
            node.stop()

    def pids(self) -> list[int]:
        return [pid for part in self.parts().values() for pid in part()]

    def parts(self) -> dict[str, Callable[[], list[int]]]:
        def haproxy() -> list[int]:
            return process_tree(self.process.pid) if self.process else []

        found = {"haproxy": haproxy}
        for i, node in enumerate(self.nodes, 1):
            found[f"node{i}"] = node.pids
        return found

    def database_pids(self) -> list[int]:
        return self.nodes[0].database_pids()

    def reset_caches(self, user: str) -> None:
        raise NotImplementedError("B3 is not adapted to nodes behind HAProxy")

    def version(self) -> str:
        return f"{self.nodes[0].version()}; {len(self.nodes)} behind HAProxy"
