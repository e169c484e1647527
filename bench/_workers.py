"""
Client worker processes: each runs an asyncio loop of sessions and sends its
records back through a queue.  Several workers get the client past one core.

Workers are forked; they agree on when to start and stop by wall-clock time
(``time.time()``), which all processes share.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import random
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from attrs import asdict, define, field

from bench._client import MailSender, big_login, login, mail_session, pick
from bench._servers import HOST, raise_nofile
from bench._wire import DesyncError

#: Errors kept verbatim per worker, to print.
KEPT_ERRORS = 5
#: Seconds a single session may take before it counts as failed.
SESSION_TIMEOUT = 120.0

_CONTEXT = multiprocessing.get_context("fork")


@define
class Records:
    """What one worker saw: completed operations as (end time, seconds), and errors."""

    done: list[tuple[float, float]] = field(factory=list)
    errors: int = 0
    desyncs: int = 0
    messages: list[str] = field(factory=list)
    octets: int = 0
    extra: dict[str, Any] = field(factory=dict)

    def error(self, e: BaseException) -> None:
        self.errors += 1
        if isinstance(e, DesyncError):
            self.desyncs += 1
        if len(self.messages) < KEPT_ERRORS:
            self.messages.append(f"{type(e).__name__}: {e}")

    def merge(self, other: Records) -> None:
        self.done += other.done
        self.errors += other.errors
        self.desyncs += other.desyncs
        self.messages += other.messages[: max(0, KEPT_ERRORS - len(self.messages))]
        self.octets += other.octets
        for k, v in other.extra.items():
            if isinstance(v, list):
                self.extra.setdefault(k, []).extend(v)
            else:
                self.extra[k] = self.extra.get(k, 0) + v


@define
class LoadSpec:
    """A timed load: sessions back to back on each user, from ``start`` to ``end``."""

    port: int
    users: list[tuple[str, str]]
    start: float
    end: float
    kind: str = "mail"  # "mail" (B1/B5) or "big" (B3 logins)
    retrieve: int = 10
    delete_fraction: float = 0.0
    seed: int = 0


async def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _timed(spec: LoadSpec) -> Records:
    records = Records()
    rng = random.Random(spec.seed)
    await _sleep_until(spec.start)

    async def slot(user: str, password: str) -> None:
        loop = asyncio.get_running_loop()
        while time.time() < spec.end:
            begun = loop.time()
            try:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    if spec.kind == "big":
                        await big_login(HOST, spec.port, user, password)
                    else:
                        delete = rng.random() < spec.delete_fraction
                        records.octets += await mail_session(
                            HOST, spec.port, user, password, spec.retrieve, delete
                        )
            except Exception as e:
                records.error(e)
                await asyncio.sleep(0.05)  # no hot loop against a failing server
                continue
            records.done.append((time.time(), loop.time() - begun))

    await asyncio.gather(*(slot(u, p) for u, p in spec.users))
    return records


@define
class DeliverySpec:
    """Deliveries at ``rate`` messages/s over ``connections`` SMTP/LMTP connections."""

    port: int
    lmtp: bool
    recipients: list[str]
    message: bytes
    rate: float
    connections: int
    start: float
    end: float
    seed: int = 1


async def _deliver(spec: DeliverySpec) -> Records:
    records = Records()
    rng = random.Random(spec.seed)
    await _sleep_until(spec.start)
    interval = spec.connections / spec.rate

    async def connection(offset: float) -> None:
        loop = asyncio.get_running_loop()
        sender: MailSender | None = None
        due = time.time() + offset
        while time.time() < spec.end:
            await _sleep_until(due)
            due += interval
            begun = loop.time()
            try:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    if sender is None:
                        sender = await MailSender.open(HOST, spec.port, spec.lmtp)
                    await sender.deliver(pick(rng, spec.recipients), spec.message)
            except Exception as e:
                records.error(e)
                if sender is not None:
                    sender.connection.abort()
                sender = None
                continue
            records.done.append((time.time(), loop.time() - begun))
        if sender is not None:
            await sender.close()

    await asyncio.gather(
        *(connection(i * interval / spec.connections) for i in range(spec.connections))
    )
    return records


@define
class HoldSpec:
    """B4: log in every user and hold the sessions until told to let go."""

    port: int
    users: list[tuple[str, str]]
    #: Logins in flight at once, so the listen queues do not overflow.
    concurrency: int = 64


async def _hold(
    spec: HoldSpec,
    ready: multiprocessing.Queue[Any],
    release: multiprocessing.synchronize.Event,
) -> Records:
    records = Records()
    gate = asyncio.Semaphore(spec.concurrency)
    held = []

    async def one(user: str, password: str) -> None:
        async with gate:
            try:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    held.append(await login(HOST, spec.port, user, password))
            except Exception as e:
                records.error(e)

    begun = time.monotonic()
    await asyncio.gather(*(one(u, p) for u, p in spec.users))
    records.extra["held"] = len(held)
    records.extra["login_seconds"] = [time.monotonic() - begun]
    ready.put(("ready", len(held), records.errors))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, release.wait)
    # Closed by an abort: a QUIT per session would only measure the teardown.
    lost = sum(1 for c in held if c.transport is None or c.transport.is_closing())
    records.extra["dropped_while_held"] = lost
    for c in held:
        c.abort()
    await asyncio.sleep(0.1)
    return records


def _entry(queue: multiprocessing.Queue[Any], run: Callable[[], Any]) -> None:
    raise_nofile()
    try:
        result = run()
        queue.put(("result", asdict(result)))
    except BaseException:
        queue.put(("crash", traceback.format_exc()))


def _load_entry(queue: multiprocessing.Queue[Any], spec: LoadSpec) -> None:
    _entry(queue, lambda: asyncio.run(_timed(spec)))


def _delivery_entry(queue: multiprocessing.Queue[Any], spec: DeliverySpec) -> None:
    _entry(queue, lambda: asyncio.run(_deliver(spec)))


def _hold_entry(
    queue: multiprocessing.Queue[Any],
    spec: HoldSpec,
    release: multiprocessing.synchronize.Event,
) -> None:
    _entry(queue, lambda: asyncio.run(_hold(spec, queue, release)))


class Workers:
    """A group of worker processes sharing one result queue."""

    def __init__(self) -> None:
        self.queue: multiprocessing.Queue[Any] = _CONTEXT.Queue()
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.release = _CONTEXT.Event()

    def load(self, spec: LoadSpec) -> None:
        self._start(_load_entry, spec)

    def delivery(self, spec: DeliverySpec) -> None:
        self._start(_delivery_entry, spec)

    def hold(self, spec: HoldSpec) -> None:
        self._start(_hold_entry, spec, self.release)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        p = _CONTEXT.Process(target=target, args=(self.queue, *args), daemon=True)
        p.start()
        self.processes.append(p)

    def wait_ready(self, timeout: float) -> list[tuple[int, int]]:
        """B4: wait for each hold worker's ("ready", held, errors)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < len(self.processes):
            kind, *rest = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "crash":
                raise RuntimeError(f"client worker crashed:\n{rest[0]}")
            if kind == "ready":
                out.append((rest[0], rest[1]))
        return out

    def results(self, timeout: float) -> list[Records]:
        """Every worker's records (after they finish); raises if one crashed."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < len(self.processes):
            kind, payload = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "crash":
                self.kill()
                raise RuntimeError(f"client worker crashed:\n{payload}")
            if kind == "result":
                done = [tuple(d) for d in payload.pop("done")]
                out.append(Records(done=done, **payload))  # type: ignore[arg-type]
        for p in self.processes:
            p.join(timeout=10)
        return out

    def kill(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


def split(users: Sequence[tuple[str, str]], parts: int) -> list[list[tuple[str, str]]]:
    """Deal ``users`` round-robin into ``parts`` non-empty lists."""
    parts = max(1, min(parts, len(users)))
    return [list(users[i::parts]) for i in range(parts)]


def merged(records: Sequence[Records]) -> Records:
    total = Records()
    for r in records:
        total.merge(r)
    return total
