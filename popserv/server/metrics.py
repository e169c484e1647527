"""
Prometheus metrics: what ``twistd popserv --metrics ENDPOINT`` serves.

One :class:`Metrics` holds a server's metrics in a registry of its own (never
prometheus_client's global one: an application or a test may run many
servers in one process).  The factories hold it as ``factory.metrics``, None
when metrics are off, so the code that counts is ``metrics = factory.metrics;
if metrics is not None: ...``: one attribute read on the hot path when off.

Counting happens where things happen (a command line received, a login's
verdict, a delivery's results); what is a state rather than an event (the
sessions open and their states, penalties in force, the thread pool's queue,
certificate expiry) is read when scraped, by :class:`_Snapshot`, so it costs
nothing between scrapes.

Label values are bounded: verbs, mechanisms, reasons and outcomes come from
fixed tables (anything else is ``other``), never from a user name or an
address.  docs/production.rst lists every metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.python.usage import UsageError
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from popserv.core.state import State
from popserv.core.wire import ARGUMENTS
from popserv.server.admission import LocalAdmission, refusal_reason
from popserv.server.configure import endpoint
from popserv.server.health import Health, MetricsRoot
from popserv.server.startup import StartupError

if TYPE_CHECKING:
    from popserv.server.factory import POP3Factory
    from popserv.server.protocol import POP3Protocol
    from popserv.server.receiving import ReceiverFactory
    from popserv.stores.delivery import DeliveryError

#: The label value for anything outside a label's table.
OTHER = "other"

#: Listeners, by the option that makes them (``pop3s``: TLS from the first byte).
LISTENERS = ("pop3", "pop3s", "smtp", "lmtp")
#: The services admission refuses connections for (pop3 and pop3s share one factory).
SERVICES = ("pop3", "smtp", "lmtp")
#: Why admission refused a connection (see :func:`popserv.server.admission.refusal_reason`).
REFUSAL_REASONS = ("max_connections", "max_connections_per_ip", "admission_failed", OTHER)
#: A login's verdict: passed and the maildrop opened; wrong credentials (a
#: penalty follows); refused although the credentials may be right (too many
#: sessions, maildrop in use); the maildrop could not be opened.
LOGIN_OUTCOMES = ("success", "failure", "refused", "error")
#: Mechanisms other than SASL's.
PLAIN_MECHANISMS = ("USER", "APOP")
#: Where mail comes in.  ``popserv deliver`` runs as a process of its own per
#: message, with nothing to scrape, so it is not counted here.
PATHS = ("smtp", "lmtp")
#: A recipient's delivery: stored, or the DeliveryError's kind.
DELIVERY_OUTCOMES: dict[str, str] = {
    "MailboxFull": "mailbox_full",
    "MessageTooBig": "too_big",
    "StorageFailed": "storage_failed",
    "LookupFailed": "lookup_failed",
    "UnknownUser": "unknown_user",
    "DeliveryError": "failed",
}
#: Where a quota refused mail: at RCPT (already full, or the SIZE declared
#: would not fit) or after DATA (the message itself did not fit).
QUOTA_STAGES = ("rcpt", "data")

#: Seconds.  A Maildir opened from its listing cache takes about a
#: millisecond, a scan of 10,000 files about 0.1 s on a local disk and
#: seconds on NFS; argon2id's default cost is about 50 ms a check.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: The clock latencies are measured with (not the reactor's, which tests
#: fake): the callers use it as ``time.perf_counter`` too.
now: Callable[[], float] = time.perf_counter


class _Counts:
    """
    A counter family's values by label values, as plain ints: counting is
    a dict update on the reactor thread (prometheus_client's own counters
    take a lock each time, which cost 10 % of an in-memory POP3 session).
    """

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], keys: Iterable[tuple[str, ...]]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = dict.fromkeys(keys, 0)

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, count in self.values.items():
            family.add_metric(list(key), count)
        return family


class _Timings:
    """A histogram family's buckets by label values, as plain numbers (see :class:`_Counts`)."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], keys: Iterable[tuple[str, ...]]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        #: Per key: the count in each bucket (not cumulative; the last is +Inf), and the sum.
        self.counts = {key: [0] * (len(LATENCY_BUCKETS) + 1) for key in keys}
        self.sums = dict.fromkeys(self.counts, 0.0)

    def observe(self, key: tuple[str, ...], seconds: float) -> None:
        counts = self.counts.get(key)
        if counts is not None:
            # Prometheus buckets count values <= their bound.
            counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.sums[key] += seconds

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        bounds = [*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
        for key, counts in self.counts.items():
            cumulative = list(accumulate(counts))
            family.add_metric(list(key), list(zip(bounds, cumulative, strict=True)), self.sums[key])
        return family


_NO_LABELS: tuple[str, ...] = ()


class Metrics:
    """
    A server's metrics: its registry, the counts its code makes, and the
    factories whose state a scrape reads.  ``reactor`` gives the thread pool.

    Counted and read on the reactor thread: :class:`MetricsPage` renders
    there.  An application that renders the registry from another thread
    may read a count one event old, nothing worse (every key exists from
    the start, so no dict changes size).
    """

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.registry = CollectorRegistry(auto_describe=True)
        self.pop3: list[POP3Factory] = []
        self.receivers: list[ReceiverFactory] = []
        self.opened = _Counts(
            "popserv_connections",
            "Connections accepted (and admitted), by listener.",
            ["listener"],
            ((name,) for name in LISTENERS),
        )
        self.refusals = _Counts(
            "popserv_connections_refused",
            "Connections refused over the connection limits, by service and reason.",
            ["service", "reason"],
            ((service, reason) for service in SERVICES for reason in REFUSAL_REASONS),
        )
        # Keyed by the verb's bytes as the client may send them, upper-cased:
        # one dict look-up per line, no decoding; None is "other".
        self._commands: dict[bytes | None, int] = dict.fromkeys(
            [*(verb.encode("ascii") for verb in ARGUMENTS), None], 0
        )
        self.logins = _Counts(
            "popserv_logins",
            "POP3 login attempts that reached a verdict, by mechanism and outcome.",
            ["mechanism", "outcome"],
            (),
        )
        self._mechanisms: set[str] = set()
        self._add_mechanisms([*PLAIN_MECHANISMS, OTHER])
        self.login_seconds = _Timings(
            "popserv_login_seconds",
            "Time to check a login's credentials and open its session through the"
            " portal (the penalty wait not included).",
            [],
            [_NO_LABELS],
        )
        self.maildrop_seconds = _Timings(
            "popserv_maildrop_open_seconds",
            "Time to open a maildrop after login (its listing: the cache, or a scan).",
            [],
            [_NO_LABELS],
        )
        self.sessions_ended = _Counts(
            "popserv_pop3_sessions_ended",
            "POP3 sessions that ended, logged in or not.",
            [],
            [_NO_LABELS],
        )
        self.sent = _Counts(
            "popserv_pop3_sent_octets",
            "Octets sent to POP3 clients (answers and messages), counted when a session ends.",
            [],
            [_NO_LABELS],
        )
        self.messages = _Counts(
            "popserv_pop3_messages",
            "Messages sent by RETR and TOP, and deleted at QUIT, counted when a session ends.",
            ["command"],
            [("RETR",), ("TOP",), ("DELE",)],
        )
        self.message_octets = _Counts(
            "popserv_pop3_message_octets",
            "Octets of the messages sent by RETR and TOP, and deleted at QUIT.",
            ["command"],
            [("RETR",), ("TOP",), ("DELE",)],
        )
        self.handshakes = _Counts(
            "popserv_tls_handshakes",
            "TLS handshakes, by listener (STLS and STARTTLS count under pop3, smtp"
            " and lmtp) and outcome.",
            ["listener", "outcome"],
            ((name, outcome) for name in LISTENERS for outcome in ("success", "failure")),
        )
        self.deliveries = _Counts(
            "popserv_deliveries",
            "Recipients of messages received, by path and outcome.",
            ["path", "outcome"],
            (
                (path, outcome)
                for path in PATHS
                for outcome in ("stored", *DELIVERY_OUTCOMES.values())
            ),
        )
        self.delivery_seconds = _Timings(
            "popserv_delivery_seconds",
            "Time to store a received message for all its recipients, by path.",
            ["path"],
            [(path,) for path in PATHS],
        )
        self.quota = _Counts(
            "popserv_quota_refusals",
            "Recipients refused because their mailbox quota was reached, by path and stage.",
            ["path", "stage"],
            ((path, stage) for path in PATHS for stage in QUOTA_STAGES),
        )
        self.registry.register(_Events(self))
        self.registry.register(_Snapshot(self))

    def _add_mechanisms(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._mechanisms:
                self._mechanisms.add(name)
                for outcome in LOGIN_OUTCOMES:
                    self.logins.values[name, outcome] = 0

    def families(self) -> list[Metric]:
        """The counted events' families, as a scrape shows them."""
        commands = CounterMetricFamily(
            "popserv_pop3_commands",
            "POP3 command lines received, by verb (anything unknown or malformed: other).",
            labels=["verb"],
        )
        for verb, count in self._commands.items():
            commands.add_metric([OTHER if verb is None else verb.decode("ascii")], count)
        return [
            self.opened.family(),
            self.refusals.family(),
            commands,
            self.logins.family(),
            self.login_seconds.family(),
            self.maildrop_seconds.family(),
            self.sessions_ended.family(),
            self.sent.family(),
            self.messages.family(),
            self.message_octets.family(),
            self.handshakes.family(),
            self.deliveries.family(),
            self.delivery_seconds.family(),
            self.quota.family(),
        ]

    # What is watched

    def watch_pop3(self, factory: POP3Factory) -> None:
        """Count ``factory``'s sessions, and read its state when scraped."""
        self.pop3.append(factory)
        self._add_mechanisms(m.name for m in factory.sasl)
        factory.attach_metrics(self)

    def watch_receiver(self, factory: ReceiverFactory) -> None:
        """Count ``factory``'s connections and deliveries."""
        self.receivers.append(factory)
        factory.attach_metrics(self)

    # Events (each called only when metrics are on)

    def connection_opened(self, listener: str) -> None:
        self.opened.values[(listener,)] += 1

    def refused(self, service: str, why: str) -> None:
        """A connection refused by admission; ``why`` is its log text."""
        key = (service, refusal_reason(why))
        if key in self.refusals.values:
            self.refusals.values[key] += 1

    def command(self, line: object) -> None:
        """A POP3 command line handed to the session (a SASL answer is not one)."""
        commands = self._commands
        verb = line.partition(b" ")[0].upper() if isinstance(line, bytes) else None
        if verb in commands:
            commands[verb] += 1
        else:
            commands[None] += 1

    def login(self, mechanism: str | None, outcome: str) -> None:
        """A POP3 login's verdict (one of :data:`LOGIN_OUTCOMES`)."""
        name = mechanism if mechanism in self._mechanisms else OTHER
        self.logins.values[name, outcome] += 1

    def login_checked(self, seconds: float) -> None:
        self.login_seconds.observe(_NO_LABELS, seconds)

    def maildrop_opened(self, seconds: float) -> None:
        self.maildrop_seconds.observe(_NO_LABELS, seconds)

    def session_ended(self, protocol: POP3Protocol) -> None:
        """A POP3 session ended: what it sent, retrieved and deleted."""
        self.sessions_ended.values[_NO_LABELS] += 1
        self.sent.values[_NO_LABELS] += protocol.octets_sent
        session = getattr(protocol, "session", None)
        if session is None:
            return
        tally = session.tally
        if tally.retr or tally.top or tally.deleted:
            messages, octets = self.messages.values, self.message_octets.values
            messages["RETR",] += tally.retr
            octets["RETR",] += tally.retr_octets
            messages["TOP",] += tally.top
            octets["TOP",] += tally.top_octets
            messages["DELE",] += tally.deleted
            octets["DELE",] += tally.deleted_octets

    def handshake(self, listener: str, ok: bool) -> None:
        key = (listener, "success" if ok else "failure")
        if key in self.handshakes.values:
            self.handshakes.values[key] += 1

    def delivered(self, path: str, results: Iterable[DeliveryError | None]) -> None:
        """A message's results, one per recipient (None: stored)."""
        for result in results:
            if result is None:
                outcome = "stored"
            else:
                outcome = DELIVERY_OUTCOMES.get(type(result).__name__, "failed")
                if outcome == "mailbox_full":
                    self.quota_refused(path, "data")
            key = (path, outcome)
            if key in self.deliveries.values:
                self.deliveries.values[key] += 1

    def delivery_took(self, path: str, seconds: float) -> None:
        self.delivery_seconds.observe((path,), seconds)

    def quota_refused(self, path: str, stage: str) -> None:
        key = (path, stage)
        if key in self.quota.values:
            self.quota.values[key] += 1

    # Serving

    def render(self, accept: str = "", names: Sequence[str] = ()) -> tuple[bytes, str]:
        """The exposition for a scrape: Prometheus text, or OpenMetrics if accepted."""
        encoder, content_type = choose_encoder(accept)
        registry: Any = self.registry.restricted_registry(names) if names else self.registry
        return encoder(registry), content_type

    def site(self, health: Health | None = None) -> Site:
        """
        A twisted.web site that answers every GET with the metrics; with
        ``health``, ``GET /health`` with it (:mod:`popserv.server.health`).
        """
        page = MetricsPage(self)
        return QuietSite(page if health is None else MetricsRoot(page, health))  # type: ignore[no-untyped-call]  # twisted.web


class _Events(Collector):
    """The counted events."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.families()


class _Snapshot(Collector):
    """What a scrape reads from the server's state as it is now."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        """The names, for the registry's duplicate check: nothing is read."""
        return [
            GaugeMetricFamily(name, "")
            for name in (
                "popserv_connections_open",
                "popserv_pop3_sessions",
                "popserv_login_penalties",
                "popserv_tls_certificate_expiry_timestamp_seconds",
                "popserv_threadpool_queued_tasks",
                "popserv_threadpool_busy_threads",
                "popserv_threadpool_max_threads",
            )
        ]

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        open_ = GaugeMetricFamily(
            "popserv_connections_open",
            "Connections open now (admitted or waiting for admission), by listener.",
            labels=["listener"],
        )
        by_listener = dict.fromkeys(LISTENERS, 0)
        states = dict.fromkeys(State, 0)
        for factory in metrics.pop3:
            # list(): a consistent copy, whoever reads.
            for protocol in list(factory.sessions):
                by_listener[protocol.listener] += 1
                session = getattr(protocol, "session", None)
                if session is not None:
                    states[session.state] += 1
        for receiver in metrics.receivers:
            by_listener[receiver.service] += receiver.sessions
        for listener, count in by_listener.items():
            open_.add_metric([listener], count)
        yield open_

        sessions = GaugeMetricFamily(
            "popserv_pop3_sessions", "POP3 sessions open now, by state.", labels=["state"]
        )
        for state, count in states.items():
            sessions.add_metric([state.name.lower()], count)
        yield sessions

        penalised = {
            id(f.admission): f.admission.penalties
            for f in metrics.pop3
            if isinstance(f.admission, LocalAdmission)
        }
        if penalised:
            yield GaugeMetricFamily(
                "popserv_login_penalties",
                "Clients under a failed-login penalty now (their next attempt waits).",
                value=sum(table.in_force() for table in penalised.values()),
            )

        expiry = GaugeMetricFamily(
            "popserv_tls_certificate_expiry_timestamp_seconds",
            "When each TLS certificate (by file) stops being valid, in Unix time.",
            labels=["certificate"],
        )
        seen: dict[str, float] = {}
        for tls in [f.tls for f in metrics.pop3] + [r.tls for r in metrics.receivers]:
            if tls is not None:
                seen.update(tls.expiries)
        for path, when in sorted(seen.items()):
            expiry.add_metric([path], when)
        yield expiry

        get_pool = getattr(metrics.reactor, "getThreadPool", None)
        if get_pool is None:  # a reactor without threads (a test's Clock)
            return
        pool = get_pool()
        yield GaugeMetricFamily(
            "popserv_threadpool_queued_tasks",
            "Tasks waiting for a thread of the reactor's pool (Maildir scans,"
            " password checks, deliveries).",
            value=pool._queue.qsize(),
        )
        yield GaugeMetricFamily(
            "popserv_threadpool_busy_threads",
            "Threads of the reactor's pool running a task now.",
            value=len(pool.working),
        )
        yield GaugeMetricFamily(
            "popserv_threadpool_max_threads",
            "The most threads the reactor's pool may run.",
            value=pool.max,
        )


class MetricsPage(Resource):
    """
    The metrics, on the reactor thread.

    Not ``prometheus_client.twisted.MetricsResource``: that renders in the
    reactor's thread pool, which is the pool popserv's Maildir scans,
    password checks and deliveries run in.  When that pool is saturated, the
    very time its queue metric matters, a scrape would wait behind the
    backlog, time out, and show the server as down; and each scrape would
    itself count as a busy thread.  Rendering here takes about a millisecond
    (about 150 series), and the collectors then read the server's state
    from the thread that owns it.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        args = request.args or {}
        names = [n.decode("utf-8", "replace") for n in args.get(b"name[]", [])]
        body, content_type = self._metrics.render(accept, names)
        request.setHeader("Content-Type", content_type)  # type: ignore[no-untyped-call]
        return body


class QuietSite(Site):
    """No access log line per scrape (one every 15 s, for ever)."""

    def log(self, request: http.Request) -> None:
        pass


def serve_metrics(
    description: str | None,
    parent: Any,
    *,
    pop3: POP3Factory,
    receivers: Sequence[ReceiverFactory],
    reactor: Any,
    listener: Callable[[Any, Any, str], Any],
    health: Health | None = None,
) -> Metrics | None:
    """
    With ``--metrics ENDPOINT``: count what ``pop3`` and ``receivers`` do,
    and serve it on the endpoint, as a ``listener(endpoint, site,
    description)`` service under ``parent``.  Without: nothing (None), and
    the factories' ``metrics`` stay None.  ``health`` answers ``GET /health``
    on the same endpoint.
    """
    if not description:
        return None
    try:
        where = endpoint("metrics", description, reactor)
    except UsageError as e:
        raise StartupError(str(e)) from None
    metrics = Metrics(reactor)
    metrics.watch_pop3(pop3)
    for receiver in receivers:
        metrics.watch_receiver(receiver)
    listener(where, metrics.site(health), description).setServiceParent(parent)
    return metrics


__all__ = ["Metrics", "MetricsPage", "QuietSite", "serve_metrics"]
