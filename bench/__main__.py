"""``python -m bench``: see bench/README.rst."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from attrs import asdict

from bench._dataset import Dataset, Sizes
from bench._haproxy import Behind
from bench._haproxy import unavailable as haproxy_unavailable
from bench._postgres import Cluster, create_store, database_name
from bench._postgres import unavailable as postgres_unavailable
from bench._profile import RATE, Profiler, find_py_spy
from bench._report import details, table
from bench._runner import Config, Runner, run_all
from bench._servers import Dovecot, Popserv, PopservPG, Server, TwistedMail, raise_nofile

ALL_SERVERS = ("popserv", "dovecot", "twisted")
ALL_BENCHES = ("B1", "B2", "B3", "B4", "B5", "B6")
TREE = Path(__file__).resolve().parent.parent


_POPSERV = re.compile(r"popserv(?P<pg>-pg)?(?:-w(?P<workers>[1-9][0-9]*))?")
#: Behind HAProxy (bench._haproxy): one popserv-pg node, N of them, or Dovecot.
_BEHIND = re.compile(r"popserv-pg-(?:haproxy|(?P<nodes>[2-9])n)|dovecot-haproxy")


def _workers_of(name: str) -> int | None:
    """N for ``popserv-wN`` or ``popserv-pg-wN`` (with ``--workers N``), else None."""
    match = _POPSERV.fullmatch(name)
    return int(match.group("workers")) if match and match.group("workers") else None


def _is_popserv(name: str) -> bool:
    return _POPSERV.fullmatch(name) is not None


def _in_postgresql(name: str) -> bool:
    """``popserv-pg``, ``popserv-pg-wN`` and behind HAProxy: popserv with ``--store postgresql``."""
    match = _POPSERV.fullmatch(name)
    return bool(match and match.group("pg")) or (name.startswith("popserv-pg-") and _behind(name))


def _behind(name: str) -> bool:
    return _BEHIND.fullmatch(name) is not None


def _nodes_of(name: str) -> int:
    """N for ``popserv-pg-Nn``, 1 for the other variants behind HAProxy."""
    match = _BEHIND.fullmatch(name)
    return int(match.group("nodes")) if match and match.group("nodes") else 1


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark popserv against Dovecot and twisted.mail (see bench/README.rst).",
    )
    p.add_argument(
        "--servers",
        type=_csv,
        default=list(ALL_SERVERS),
        help="comma-separated, from popserv,dovecot,twisted (default: all); popserv-wN"
        " is popserv with --workers N, to run beside the others; popserv-pg (and"
        " popserv-pg-wN) keeps accounts and mail in a PostgreSQL the bench starts;"
        " popserv-pg-haproxy, popserv-pg-2n and dovecot-haproxy run behind HAProxy"
        " with contrib/haproxy/cluster.cfg (1, 2 and 1 nodes)",
    )
    p.add_argument(
        "--only",
        type=lambda v: [b.upper() for b in _csv(v)],
        default=list(ALL_BENCHES),
        help="comma-separated, from B1..B6 (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small data, short runs, one repetition: under a minute",
    )
    p.add_argument("--repeat", type=int, help="repetitions of each measurement (default 3)")
    p.add_argument("--duration", type=float, help="measured seconds of B1/B5/B6 (default 10)")
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--b3-messages", type=int, help="messages in B3's maildrops (default 100000)")
    p.add_argument(
        "--b4-sessions",
        type=lambda v: [int(x) for x in _csv(v)],
        help="B4 levels, comma-separated (default 1000,10000)",
    )
    p.add_argument(
        "--tmpdir", default=None, help="where the generated data goes (default: $TMPDIR or /tmp)"
    )
    p.add_argument("--keep-data", action="store_true", help="do not delete the generated data")
    p.add_argument(
        "--popserv-tree",
        type=Path,
        default=TREE,
        help="source tree whose popserv runs (default: the one holding bench/)",
    )
    p.add_argument(
        "--popserv-workers",
        type=int,
        default=None,
        metavar="N",
        help="run popserv with --workers N (default: one process)",
    )
    p.add_argument("--twistd", default=None, help="twistd to run (default: next to this python)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample popserv with py-spy during each benchmark's first run;"
        " stacks go to DIR, a summary after the table",
    )
    p.add_argument("--py-spy", default=None, help="the py-spy to use (default: on PATH)")
    args = p.parse_args(argv)
    unknown = {
        s for s in args.servers if s not in ALL_SERVERS and not _is_popserv(s) and not _behind(s)
    }
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    bad = set(args.only) - set(ALL_BENCHES)
    if bad:
        p.error(f"unknown benchmarks: {', '.join(sorted(bad))}")
    return args


def configure(args: argparse.Namespace) -> tuple[Config, Sizes]:
    config, sizes = Config(), Sizes()
    if args.quick:
        config = Config(repeat=1, duration=1.5, warmup=0.5, b3_warm_runs=1, b4_levels=[300])
        sizes = Sizes(b3_messages=5_000, b4_users=300, b2_size=5 * 1024 * 1024)
    if args.repeat:
        config.repeat = args.repeat
    if args.duration:
        config.duration = args.duration
    config.clients = args.clients
    if args.b3_messages:
        sizes.b3_messages = args.b3_messages
    if args.b4_sessions:
        config.b4_levels = args.b4_sessions
        sizes.b4_users = max(args.b4_sessions)
    if "B4" not in args.only:
        sizes.b4_users = 1
    if "B3" not in args.only and "B6" not in args.only:
        sizes.b3_messages = 1000
    return config, sizes


def _twistd(args: argparse.Namespace) -> str:
    if args.twistd:
        return str(args.twistd)
    beside = Path(sys.executable).parent / "twistd"
    return str(beside) if beside.exists() else (shutil.which("twistd") or "twistd")


def machine() -> list[str]:
    """A description of this machine for the report."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"CPU: {model}, {os.cpu_count()} cores; RAM {mem:.0f} GiB",
        f"kernel: {platform.system()} {platform.release()}",
        f"Python: {platform.python_version()}",
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, sizes = configure(args)
    raise_nofile()
    # SIGTERM stops the servers like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    root = Path(tempfile.mkdtemp(prefix="popbench-", dir=args.tmpdir))
    servers: dict[str, Server] = {}
    skipped: list[str] = []
    cluster: Cluster | None = None
    began = time.monotonic()
    try:
        print(f"data in {root}", flush=True)
        dataset = Dataset(root, sizes)
        dataset.build(lambda s: print(s, flush=True))
        if any(_in_postgresql(name) for name in args.servers):
            why = postgres_unavailable()
            if why:
                skipped.append(f"popserv-pg skipped: {why}")
                print(skipped[-1], flush=True)
                args.servers = [n for n in args.servers if not _in_postgresql(n)]
            else:
                cluster = Cluster(root / "postgresql")
                print(f"starting PostgreSQL on port {cluster.port}", flush=True)
                cluster.start()
        if any(_behind(name) for name in args.servers) and haproxy_unavailable():
            skipped.append(f"variants behind HAProxy skipped: {haproxy_unavailable()}")
            print(skipped[-1], flush=True)
            args.servers = [n for n in args.servers if not _behind(n)]
        # Every database before any server: a copy (CREATE DATABASE ...
        # TEMPLATE) needs its source without connections, and nodes behind
        # HAProxy keep one open for its health checks.
        for name in filter(_in_postgresql, args.servers):
            assert cluster is not None
            create_store(
                cluster,
                database_name(name),
                args.popserv_tree.resolve(),
                dataset,
                lambda s: print(s, flush=True),
            )
        for name in args.servers:
            server: Server
            if name == "dovecot-haproxy" and Dovecot.available():
                skipped.append(f"{name} skipped: dovecot {Dovecot.available()}")
                print(skipped[-1], flush=True)
                continue
            if _behind(name):
                nodes: list[Server] = []
                for i in range(1, _nodes_of(name) + 1):
                    node_name = f"{name}-node{i}"
                    if name == "dovecot-haproxy":
                        nodes.append(Dovecot(dataset, node_name, proxied=True))
                    else:
                        assert cluster is not None
                        nodes.append(
                            PopservPG(
                                dataset,
                                args.popserv_tree.resolve(),
                                _twistd(args),
                                cluster,
                                database_name(name),
                                name=node_name,
                                proxied=True,
                            )
                        )
                    dataset.prepare_server(node_name)
                server = Behind(dataset, name, nodes)
            elif _in_postgresql(name):
                assert cluster is not None
                server = PopservPG(
                    dataset,
                    args.popserv_tree.resolve(),
                    _twistd(args),
                    cluster,
                    database_name(name),
                    _workers_of(name),
                    name=name,
                )
            elif _is_popserv(name):
                server = Popserv(
                    dataset,
                    args.popserv_tree.resolve(),
                    _twistd(args),
                    _workers_of(name) or args.popserv_workers,
                    name=name,
                )
            elif name == "dovecot":
                why = Dovecot.available()
                if why:
                    skipped.append(f"dovecot skipped: {why}")
                    print(skipped[-1], flush=True)
                    continue
                server = Dovecot(dataset)
            else:
                server = TwistedMail(dataset, TREE)
            dataset.prepare_server(name)
            print(f"starting {name} on port {server.port}", flush=True)
            server.start()
            servers[name] = server

        def restart(server: Server) -> None:
            server.stop()
            server.start()

        profiler = None
        if args.profile:
            py_spy = find_py_spy(args.py_spy)
            if py_spy is None:
                skipped.append("no profile: py-spy not found (pip install py-spy, or --py-spy)")
            else:
                profiler = Profiler(py_spy, args.profile)
        runner = Runner(config, dataset, servers, lambda s: print(s, flush=True), profiler)
        run_all(runner, args.only, restart)
        names = list(servers)
        print()
        print("\n".join(machine()))
        for server in servers.values():
            version = server.version()
            if version:
                print(f"{server.name}: {version}")
        if "popserv" in servers and not servers["popserv"].delivery:
            print("popserv: no SMTP/LMTP receiver here (no --smtp in twistd popserv --help)")
        print(
            f"medians of {config.repeat} run(s); B1/B5/B6: {config.concurrency} clients in"
            f" {config.clients} processes, {config.duration:g} s measured after"
            f" {config.warmup:g} s warm-up"
        )
        print()
        print(table(runner.measurements, names))
        for note in skipped + runner.notes:
            print(f"note: {note}")
        print()
        print(details(runner.measurements))
        if profiler is not None:
            print(f"\npopserv profiles (py-spy, {RATE} Hz; stacks in {args.profile}):")
            for label, summary in profiler.summaries:
                print(f"{label}:\n{summary}")
        print(f"\ntotal {time.monotonic() - began:.0f} s")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": machine(),
                        "versions": {s.name: s.version() for s in servers.values()},
                        "config": asdict(config),
                        "sizes": asdict(sizes),
                        "measurements": [asdict(m) for m in runner.measurements],
                        "notes": skipped + runner.notes,
                    },
                    indent=1,
                )
            )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in servers.values():
            server.stop()
        if cluster is not None:
            cluster.stop()
        if args.keep_data:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
