"""
The benchmarks B1 to B6, run against every server in one go.

Repetitions are interleaved (B1 on each server, then B1 again on each...) so
that a burst of load from something else on the machine hits all servers
alike rather than one.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from attrs import define, field

from bench._client import big_login, login, quit_, retrieve_all
from bench._cpu import Meter, Spent
from bench._creader import ReaderError, build
from bench._creader import retrieve_all as c_retrieve_all
from bench._dataset import (
    B2_USER,
    B3_SIZED,
    B3_UNSIZED,
    Dataset,
    b1_user,
    b4_user,
    b5_user,
    password,
)
from bench._messages import make_message
from bench._profile import Profiler
from bench._report import Measurement, Target, percentile
from bench._servers import HOST, RawSender, Server, open_files_limit, pss_kib
from bench._workers import DeliverySpec, HoldSpec, LoadSpec, Records, Workers, merged, split

#: Seconds given to forked workers to be ready before a timed load starts.
FORK_SLACK = 1.0

MB = 1_000_000
#: B2's C reader retrieves the 10 messages this many times over in its
#: session: one pass takes 30-50 ms at the ceiling, too short to outlast a
#: burst of load from other work on this shared machine.
B2_ROUNDS = 5


@define
class Config:
    """How long and how hard to run; ``--quick`` shortens everything."""

    repeat: int = 3
    duration: float = 10.0
    warmup: float = 2.0
    concurrency: int = 20
    clients: int = 2
    b3_warm_runs: int = 3
    b4_levels: list[int] = field(factory=lambda: [1000, 10000])
    #: Memory varies little between runs, and 10,000 Dovecot processes take a while.
    b4_repeat: int = 1
    b5_rate: float = 50.0
    b5_delete_fraction: float = 0.1


def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False if not allowed."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


class Runner:
    """Runs the selected benchmarks on the started servers and collects measurements."""

    def __init__(
        self,
        config: Config,
        dataset: Dataset,
        servers: dict[str, Server],
        say: Callable[[str], None] = print,
        profiler: Profiler | None = None,
    ) -> None:
        self.profiler = profiler
        self.config = config
        self.dataset = dataset
        self.servers = servers
        self.say = say
        self.measurements: list[Measurement] = []
        self.notes: list[str] = []
        self._by_key: dict[tuple[str, str], Measurement] = {}

    def measurement(
        self,
        bench: str,
        metric: str,
        unit: str,
        higher_is_better: bool,
        target: Target | None = None,
    ) -> Measurement:
        key = (bench, metric)
        if key not in self._by_key:
            m = Measurement(bench, metric, unit, higher_is_better, target)
            self._by_key[key] = m
            self.measurements.append(m)
        return self._by_key[key]

    def _each(self, bench: str, run: Callable[[Server], None], repeat: int | None = None) -> None:
        repeat = self.config.repeat if repeat is None else repeat
        for rep in range(repeat):
            for server in self.servers.values():
                self.say(f"{bench} on {server.name} (run {rep + 1}/{repeat})")
                profiling = (
                    self.profiler is not None
                    and rep == 0
                    and server.name.startswith("popserv")
                    and not server.parts()
                    and server.process is not None
                    and not bench.startswith("B4")
                )
                try:
                    if profiling:
                        assert self.profiler is not None and server.process is not None
                        label = bench if server.name == "popserv" else f"{bench} {server.name}"
                        self.profiler.start(server.process.pid, label)
                    try:
                        run(server)
                    finally:
                        if profiling:
                            assert self.profiler is not None
                            self.profiler.stop()
                except Exception as e:
                    self.say(f"  FAILED: {type(e).__name__}: {e}")
                    self.notes.append(f"{bench} on {server.name}: {type(e).__name__}: {e}")

    def _report_errors(self, bench: str, server: Server, records: Records) -> None:
        if not records.errors:
            return
        loud = " INCLUDING DESYNCS" if records.desyncs else ""
        line = f"{bench} on {server.name}: {records.errors} failed sessions{loud}"
        self.say("  " + line)
        for message in records.messages:
            self.say(f"    {message}")
        self.notes.append(line + ": " + "; ".join(records.messages[:3]))

    # Timed loads (B1, B5, B6)

    def _users(self, make: Callable[[int], str], count: int) -> list[tuple[str, str]]:
        return [(make(i), password(make(i))) for i in range(count)]

    def _timed_load(
        self,
        server: Server,
        users: list[tuple[str, str]],
        *,
        delete_fraction: float = 0.0,
        big_user: str | None = None,
        delivery: DeliverySpec | None = None,
    ) -> tuple[list[float], Records, Records | None, Records | None, Spent | None]:
        """
        Run sessions on ``users`` for warmup + duration; the measured
        window's latencies, and the CPU spent in it.
        """
        c = self.config
        start = time.time() + FORK_SLACK
        measured_from = start + c.warmup
        end = measured_from + c.duration
        workers = Workers()
        for i, part in enumerate(split(users, c.clients)):
            workers.load(LoadSpec(server.port, part, start, end, "mail", 10, delete_fraction, i))
        side = Workers()
        if big_user is not None:
            side.load(LoadSpec(server.port, [(big_user, password(big_user))], start, end, "big"))
        if delivery is not None:
            delivery.start, delivery.end = start, end
            side.delivery(delivery)
        spent = _meter(server).between(measured_from, end)
        try:
            records = merged(workers.results(timeout=end - time.time() + 300))
            side_records = side.results(timeout=300) if side.processes else []
        finally:
            workers.kill()
            side.kill()
        window = [lat for t, lat in records.done if measured_from <= t <= end]
        big = side_records[0] if big_user is not None else None
        deliveries = side_records[-1] if delivery is not None else None
        for r in (big, deliveries):
            if r is not None:
                r.done = [(t, lat) for t, lat in r.done if measured_from <= t <= end]
        return window, records, big, deliveries, spent()

    def _per_session(self, bench: str, server: Server, spent: Spent | None, sessions: int) -> None:
        """CPU a session in the measured window: the server's, its database's, the rest's."""
        if spent is None or not sessions:
            return
        parts = [("server", spent.server), ("rest", spent.rest)]
        if server.database_pids():
            parts.insert(1, ("database", spent.database))
        # Behind HAProxy: the server's share by part (HAProxy, each node).
        parts[1:1] = [(f"server: {who}", seconds) for who, seconds in spent.parts.items()]
        for who, seconds in parts:
            self.measurement(bench, f"CPU a session: {who}", "ms", False).add(
                server.name, seconds / sessions * 1000
            )
        self.say(
            "  CPU a session: "
            + ", ".join(f"{who} {seconds / sessions * 1000:.2f} ms" for who, seconds in parts)
            + f" (machine busy {spent.machine / spent.seconds:.2f} cores)"
        )

    def b1(self) -> None:
        c = self.config
        rate = self.measurement("B1", "sessions/s", "1/s", True, Target("ratio", 1.0, ">="))
        p50 = self.measurement("B1", "p50 session", "ms", False)
        p99 = self.measurement("B1", "p99 session", "ms", False, Target("ratio", 1.0, "<="))

        def run(server: Server) -> None:
            users = self._users(b1_user, c.concurrency)
            window, records, _, _, spent = self._timed_load(server, users)
            self._report_errors("B1", server, records)
            self._per_session("B1", server, spent, len(window))
            rate.add(server.name, len(window) / c.duration)
            p50.add(server.name, percentile(window, 50) * 1000)
            p99.add(server.name, percentile(window, 99) * 1000)
            self.say(
                f"  {len(window) / c.duration:.0f} sessions/s,"
                f" p50 {percentile(window, 50) * 1000:.1f} ms,"
                f" p99 {percentile(window, 99) * 1000:.1f} ms"
            )

        self._each("B1", run)

    def b6(self) -> None:
        """B1's load while 100k-message logins run back to back on the same server."""
        c = self.config
        n = self.dataset.sizes.b3_messages
        for label, user in ((",W=", B3_SIZED), ("no ,W=", B3_UNSIZED)):
            what = f"with {n // 1000}k logins ({label})"
            rate = self.measurement("B6", f"B1 sessions/s {what}", "1/s", True)
            p99 = self.measurement("B6", f"B1 p99 {what}", "ms", False)
            grow = self.measurement("B6", f"B1 p99 {what} / own B1 p99", "x", False)
            big = self.measurement("B6", f"{n // 1000}k login time meanwhile ({label})", "s", False)

            def run(
                server: Server,
                user: str = user,
                rate: Measurement = rate,
                p99: Measurement = p99,
                grow: Measurement = grow,
                big: Measurement = big,
            ) -> None:
                users = self._users(b1_user, c.concurrency)
                window, records, big_records, _, _ = self._timed_load(
                    server, users, big_user=user
                )
                self._report_errors("B6", server, records)
                assert big_records is not None
                self._report_errors("B6 (big logins)", server, big_records)
                tail = percentile(window, 99) * 1000
                rate.add(server.name, len(window) / c.duration)
                p99.add(server.name, tail)
                base = self._by_key.get(("B1", "p99 session"))
                own = base.median(server.name) if base else None
                if own:
                    grow.add(server.name, tail / own)
                times = [lat for _, lat in big_records.done]
                if times:
                    big.add(server.name, percentile(times, 50))
                self.say(
                    f"  {len(window) / c.duration:.0f} sessions/s, p99 {tail:.1f} ms,"
                    f" {len(times)} big logins, median {percentile(times, 50):.2f} s"
                )

            self._each(f"B6 ({label})", run)

    def b5(self) -> None:
        c = self.config
        rate = self.measurement("B5", "sessions/s (10% DELE)", "1/s", True)
        p99 = self.measurement("B5", "p99 session", "ms", False)
        dps = self.measurement("B5", f"deliveries/s (offered {c.b5_rate:g})", "1/s", True)
        dp99 = self.measurement("B5", "p99 delivery", "ms", False)
        message = make_message(self.dataset.sizes.b1_size, seed=777)
        recipients = [f"{b5_user(i)}@example.org" for i in range(self.dataset.sizes.b5_users)]

        def run(server: Server) -> None:
            if server.delivery is None or server.delivery_port is None:
                for m in (rate, p99, dps, dp99):
                    m.notes[server.name] = "skipped: no receiver"
                self.say("  skipped: no receiver")
                return
            delivery = DeliverySpec(
                server.delivery_port,
                server.delivery == "lmtp",
                recipients,
                message,
                c.b5_rate,
                2,
                0.0,
                0.0,
            )
            users = self._users(b5_user, self.dataset.sizes.b5_users)
            window, records, _, delivered, spent = self._timed_load(
                server, users, delete_fraction=c.b5_delete_fraction, delivery=delivery
            )
            assert delivered is not None
            self._report_errors("B5", server, records)
            self._per_session("B5", server, spent, len(window))
            self._report_errors("B5 (delivery)", server, delivered)
            d_times = [lat for _, lat in delivered.done]
            rate.add(server.name, len(window) / c.duration)
            p99.add(server.name, percentile(window, 99) * 1000)
            dps.add(server.name, len(d_times) / c.duration)
            dp99.add(server.name, percentile(d_times, 99) * 1000)
            self.say(
                f"  {len(window) / c.duration:.0f} sessions/s, p99"
                f" {percentile(window, 99) * 1000:.1f} ms, {len(d_times) / c.duration:.0f}"
                f" deliveries/s via {server.delivery.upper()}"
            )

        self._each("B5", run)

    # B2

    def b2(self) -> None:
        """
        RETR throughput, read by the C reader (``bench/_creader.py``) and, as
        before issue 20, by the asyncio client; each against the in-memory
        sender right before, for the ceiling the server's share is of.
        """
        rate = self.measurement("B2", "RETR throughput", "MB/s", True)
        share = self.measurement(
            "B2", "share of the ceiling", "%", True, Target("absolute", 90, ">=")
        )
        ceiling = self.measurement("B2", "ceiling: in-memory sender", "MB/s", True)
        # CPU a MB holds still where MB/s does not: on this shared 2-core
        # machine a burst of other work halves a run's MB/s, not its CPU a MB.
        per_mb = {
            who: self.measurement("B2", f"CPU a MB: {who}", "ms", False)
            for who in ("server", "reader", "in-memory sender")
        }
        slow = self.measurement("B2", "RETR throughput, asyncio client", "MB/s", True)
        slow_share = self.measurement("B2", "asyncio client: share of its limit", "%", True)
        slow_per_mb = self.measurement("B2", "asyncio client: CPU a MB: server", "ms", False)
        binary: Path | None = None
        try:
            binary = build(self.dataset.root / "reader")
        except ReaderError as e:
            self.notes.append(f"B2: the C reader is skipped ({e}): asyncio client rows only")
            for server in self.servers.values():
                for m in (rate, share, ceiling, *per_mb.values()):
                    m.notes[server.name] = "skipped: no cc"
        raw = RawSender(self.dataset, Path(__file__).resolve().parent.parent, B2_USER)
        raw.start()
        user = (B2_USER, password(B2_USER))

        def measure_c(server: Server) -> tuple[float, dict[str, float]]:
            """MB/s, and the CPU a MB (ms) of the server, its database and the reader."""
            assert binary is not None
            meter = _meter(server)
            meter.open()
            octets, seconds, cpu = c_retrieve_all(
                binary, HOST, server.port, *user, rounds=B2_ROUNDS
            )
            spent = meter.close()
            ms_a_mb = 1000 / (sum(octets) / MB)
            cpu_a_mb = {"server": spent.server * ms_a_mb, "reader": cpu * ms_a_mb}
            if server.database_pids():
                cpu_a_mb["database"] = spent.database * ms_a_mb
            return sum(octets) / sum(seconds) / MB, cpu_a_mb

        def measure_asyncio(server: Server) -> tuple[float, float]:
            """MB/s, and the server's CPU a MB (ms)."""
            meter = _meter(server)
            meter.open()
            octets, seconds = asyncio.run(retrieve_all(HOST, server.port, *user))
            spent = meter.close()
            return sum(octets) / sum(seconds) / MB, spent.server * 1000 / (sum(octets) / MB)

        try:

            def run(server: Server) -> None:
                said = []
                if binary is not None:
                    limit, raw_cpu = measure_c(raw)
                    value, cpu_a_mb = measure_c(server)
                    rate.add(server.name, value)
                    ceiling.add(server.name, limit)
                    share.add(server.name, 100 * value / limit)
                    cpu_a_mb["in-memory sender"] = raw_cpu["server"]
                    for who, ms in cpu_a_mb.items():
                        if who not in per_mb:
                            per_mb[who] = self.measurement("B2", f"CPU a MB: {who}", "ms", False)
                        per_mb[who].add(server.name, ms)
                    said.append(
                        f"{value:.0f} MB/s, {value / limit:.0%} of the ceiling {limit:.0f} MB/s;"
                        " CPU a MB "
                        + ", ".join(f"{who} {ms:.2f} ms" for who, ms in cpu_a_mb.items())
                    )
                slow_limit, _ = measure_asyncio(raw)
                slow_value, slow_cpu = measure_asyncio(server)
                slow.add(server.name, slow_value)
                slow_per_mb.add(server.name, slow_cpu)
                slow_share.add(server.name, 100 * slow_value / slow_limit)
                said.append(f"asyncio client {slow_value:.0f} MB/s of its {slow_limit:.0f}")
                self.say("  " + "; ".join(said))

            self._each("B2", run)
        finally:
            raw.stop()
        every = sorted(v for values in ceiling.values.values() for v in values)
        if every:
            self.notes.append(
                "B2 ceiling (the C reader against the in-memory sender): median"
                f" {every[len(every) // 2]:.0f} MB/s, best {every[-1]:.0f} MB/s"
            )

    # B3

    def b3(self) -> None:
        n = self.dataset.sizes.b3_messages
        dropped = []
        for label, user in ((",W= in names", B3_SIZED), ("no ,W=", B3_UNSIZED)):
            first = self.measurement(
                "B3", f"{n // 1000}k first ({label})", "s", False, Target("ratio", 0.5, "<=")
            )
            warm = self.measurement(
                "B3", f"{n // 1000}k warm ({label})", "s", False, Target("ratio", 0.5, "<=")
            )

            def run(
                server: Server,
                user: str = user,
                label: str = label,
                first: Measurement = first,
                warm: Measurement = warm,
            ) -> None:
                server.reset_caches(user)
                dropped.append(drop_page_cache())
                t = self._big_login(server, user)
                first.add(server.name, t)
                meter = _meter(server)
                meter.open()
                client = time.process_time()
                warms = [self._big_login(server, user) for _ in range(self.config.b3_warm_runs)]
                client = (time.process_time() - client) / len(warms)
                spent = meter.close()
                warm.add(server.name, percentile(warms, 50))
                parts = [("client", client), ("server", spent.server / len(warms))]
                if server.database_pids():
                    parts.append(("database", spent.database / len(warms)))
                for who, seconds in parts:
                    self.measurement(
                        "B3", f"{n // 1000}k warm ({label}): CPU {who}", "s", False
                    ).add(server.name, seconds)
                self.say(
                    f"  first {t:.2f} s, warm {', '.join(f'{w:.2f}' for w in warms)} s;"
                    " CPU a warm login: "
                    + ", ".join(f"{who} {seconds:.3f} s" for who, seconds in parts)
                )

            self._each(f"B3 ({label})", run)
        if dropped and not all(dropped):
            self.notes.append("B3: the page cache could not be dropped; 'first' is not cold")

    def _big_login(self, server: Server, user: str) -> float:
        async def once() -> float:
            loop = asyncio.get_running_loop()
            begun = loop.time()
            count = await big_login(HOST, server.port, user, password(user))
            expected = self.dataset.sizes.b3_messages
            if count != expected:
                raise RuntimeError(f"{count} messages listed, {expected} expected")
            return loop.time() - begun

        return asyncio.run(once())

    # B4

    def b4(self, restart: Callable[[Server], None]) -> None:
        for level in self.config.b4_levels:
            per = self.measurement(
                "B4",
                f"PSS per idle session @{level:,}",
                "KiB",
                False,
                Target("absolute", 50, "<="),
            )
            held = self.measurement(
                "B4",
                f"sessions held @{level:,}",
                "n",
                True,
                Target("absolute", level, ">=") if level >= 10_000 else None,
            )
            procs = self.measurement("B4", f"server processes @{level:,}", "n", False)

            def run(
                server: Server,
                level: int = level,
                per: Measurement = per,
                held: Measurement = held,
                procs: Measurement = procs,
            ) -> None:
                self._hold(server, level, per, held, procs, restart)

            self._each(f"B4 @{level}", run, self.config.b4_repeat)

    def _hold(
        self,
        server: Server,
        level: int,
        per: Measurement,
        held_m: Measurement,
        procs: Measurement,
        restart: Callable[[Server], None],
    ) -> None:
        restart(server)  # a fresh server: no idle processes or caches from earlier runs

        async def warm_up() -> None:
            user = b4_user(0)
            await quit_(await login(HOST, server.port, user, password(user)))

        asyncio.run(warm_up())
        time.sleep(1.0)
        baseline = pss_kib(server.pids())
        users = self._users(b4_user, level)
        workers = Workers()
        for part in split(users, self.config.clients):
            workers.hold(HoldSpec(server.port, part))
        try:
            ready = workers.wait_ready(timeout=900)
            time.sleep(2.0)
            pids = server.pids()
            after = pss_kib(pids)
            held = sum(n for n, _ in ready)
            failed = sum(e for _, e in ready)
            workers.release.set()
            records = merged(workers.results(timeout=300))
        finally:
            workers.release.set()
            workers.kill()
        self._report_errors(f"B4 @{level}", server, records)
        held_m.add(server.name, held)
        procs.add(server.name, len(pids))
        if held:
            per.add(server.name, (after - baseline) / held)
        dropped = records.extra.get("dropped_while_held", 0)
        logins = records.extra.get("login_seconds", [0.0])
        self.say(
            f"  {held:,} held ({failed} failed, {dropped} dropped while held) by"
            f" {len(pids)} processes; PSS {baseline / 1024:.1f} -> {after / 1024:.1f} MiB,"
            f" {(after - baseline) / max(held, 1):.1f} KiB/session;"
            f" logins took {max(logins):.1f} s"
        )
        if failed or dropped:
            limit = open_files_limit(pids[0]) if pids else None
            self.notes.append(
                f"B4 @{level} on {server.name}: {failed} logins failed, {dropped} dropped"
                f" (its open-files limit: {limit}, {len(pids)} processes)"
            )


def run_all(runner: Runner, only: Sequence[str], restart: Callable[[Server], None]) -> None:
    """The selected benchmarks, in an order where the heavy ones come last."""
    order: list[tuple[str, Callable[[], None]]] = [
        ("B1", runner.b1),
        ("B2", runner.b2),
        ("B3", runner.b3),
        ("B6", runner.b6),
        ("B5", runner.b5),
        ("B4", lambda: runner.b4(restart)),
    ]
    for name, run in order:
        if name in only:
            run()


def _meter(server: Server) -> Meter:
    return Meter(server.pids, server.database_pids, server.parts())
