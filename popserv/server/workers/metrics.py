"""
``--metrics`` with ``--workers N``: each worker counts its own sessions,
the parent serves one page with the sum.

A scrape of the parent asks every running worker for its samples (over
its channel, :meth:`~popserv.server.workers.admission.AdmissionServer.ask`)
and adds them up, so Prometheus sees one server, as with one process.
What only the parent knows is added by it: the failed-login penalties (its
admission holds them) and the workers themselves.

Counters must never go down, but a worker that dies takes its counts with
it, and its replacement starts from zero.  So the parent keeps, per
worker, the samples of the last scrape, and when a worker is no longer
there folds its counters into a sum of the departed; only what a worker
counted between the last scrape and its death is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, DeferredList, DeferredLock
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from popserv.server.admission import LocalAdmission
from popserv.server.health import Health, MetricsRoot
from popserv.server.metrics import Metrics, QuietSite

log = Logger()

#: What a worker answers ``metrics`` with: per family, its name, type,
#: help and unit, and its samples as (name, labels, value).
Families = list[tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]]
_Key = tuple[str, tuple[tuple[str, str], ...]]

#: Families whose samples are the least across workers, not the sum: the
#: same certificate files, read by each.
_LEAST = frozenset({"popserv_tls_certificate_expiry_timestamp_seconds"})
#: Families whose counts a departed worker leaves behind.
_MONOTONIC = frozenset({"counter", "histogram"})


def families(metrics: Metrics) -> Families:
    """A worker's samples, as it sends them to the parent."""
    return [
        (
            family.name,
            family.type,
            family.documentation,
            family.unit,
            [(s.name, dict(s.labels), s.value) for s in family.samples],
        )
        for family in metrics.registry.collect()
    ]


def _key(name: str, labels: dict[str, str]) -> _Key:
    return name, tuple(sorted(labels.items()))


class WorkerMetrics:
    """The parent's page: the workers' samples (``links()``: whom to ask), merged."""

    def __init__(
        self,
        links: Callable[[], Iterable[Any]],
        admission: LocalAdmission | None,
        workers: Callable[[], int],
        exits: Callable[[], int],
    ) -> None:
        self.links = links
        self.admission = admission
        self.workers = workers
        self.exits = exits
        #: Each worker's samples at the last scrape, by its link.
        self._last: dict[Any, Families] = {}
        #: The counters of workers gone since, summed, by family (with its type,
        #: help and unit, to show them when no running worker has that family).
        self._departed: dict[str, tuple[str, str, str, dict[_Key, float]]] = {}
        self._one_at_a_time = DeferredLock()

    async def collect(self) -> list[Metric]:
        """Ask every worker, and merge their answers with what left and what the parent knows."""
        # One scrape at a time: two at once could both fold a departed
        # worker's counts in, or put back one the other had folded.
        await self._one_at_a_time.acquire()
        try:
            return await self._collect()
        finally:
            self._one_at_a_time.release()

    async def _collect(self) -> list[Metric]:
        links = list(self.links())
        results = await DeferredList([link.ask("metrics") for link in links], consumeErrors=True)
        answers: dict[Any, Families] = {}
        running = set(self.links())  # after the wait: a worker may have died meanwhile
        for link, (ok, value) in zip(links, results, strict=True):
            if ok and link in running:
                answers[link] = [(n, t, d, u, [tuple(s) for s in ss]) for n, t, d, u, ss in value]
            elif not ok:
                log.warn("A worker did not answer the metrics scrape: {why}",
                         why=value.getErrorMessage())
        for link in [link for link in self._last if link not in running]:
            self._depart(self._last.pop(link))
        # A worker that did not answer now keeps its last samples.
        self._last.update(answers)
        return [*self._merged(self._last.values()), *self._own()]

    def _depart(self, families: Families) -> None:
        for name, kind, documentation, unit, samples in families:
            if kind not in _MONOTONIC:
                continue
            _, _, _, sums = self._departed.setdefault(name, (kind, documentation, unit, {}))
            for sample, labels, value in samples:
                if not sample.endswith("_created"):
                    key = _key(sample, labels)
                    sums[key] = sums.get(key, 0.0) + value

    def _merged(self, answers: Iterable[Families]) -> list[Metric]:
        merged: dict[str, Metric] = {}
        values: dict[str, dict[_Key, float]] = {}

        def family(name: str, kind: str, documentation: str, unit: str) -> dict[_Key, float]:
            if name not in merged:
                merged[name] = Metric(name, documentation, kind, unit)
                values[name] = {}
            return values[name]

        # What departed workers counted, shown even where no worker running counts it yet.
        for name, (kind, documentation, unit, sums) in self._departed.items():
            family(name, kind, documentation, unit).update(sums)
        for answer in answers:
            for name, kind, documentation, unit, samples in answer:
                sums = family(name, kind, documentation, unit)
                least = name in _LEAST
                for sample, labels, value in samples:
                    key = _key(sample, labels)
                    if key not in sums:
                        sums[key] = value
                    elif least or sample.endswith("_created"):
                        sums[key] = min(sums[key], value)
                    else:
                        sums[key] += value
        for name, metric in merged.items():
            for (sample, pairs), value in values[name].items():
                metric.add_sample(sample, dict(pairs), value)
        return list(merged.values())

    def _own(self) -> list[Metric]:
        own: list[Metric] = [
            GaugeMetricFamily("popserv_workers", "Worker processes running now.",
                              value=self.workers()),
        ]
        exits = Metric("popserv_worker_exits", "Workers that ended without being asked to"
                       " (a crash, a kill); each is restarted.", "counter")
        exits.add_sample("popserv_worker_exits_total", {}, self.exits())
        own.append(exits)
        if self.admission is not None:
            own.append(GaugeMetricFamily(
                "popserv_login_penalties",
                "Clients under a failed-login penalty now (their next attempt waits).",
                value=self.admission.penalties.in_force(),
            ))
        return own

    async def render(self, accept: str = "", names: Sequence[str] = ()) -> tuple[bytes, str]:
        """The exposition of one scrape (as :meth:`Metrics.render`)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(await self.collect()))
        encoder, content_type = choose_encoder(accept)
        chosen: Any = registry.restricted_registry(names) if names else registry
        return encoder(chosen), content_type

    def site(self, health: Health | None = None) -> Site:
        """The parent's page; with ``health``, ``GET /health`` with it."""
        page = _Page(self)
        return QuietSite(page if health is None else MetricsRoot(page, health))  # type: ignore[no-untyped-call]  # twisted.web


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


class _Page(Resource):
    """Every GET: the merged metrics, once every worker has answered."""

    isLeaf = True

    def __init__(self, metrics: WorkerMetrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web
        self._metrics = metrics

    def render_GET(self, request: Request) -> Any:
        accept = request.getHeader("accept") or ""
        names = [n.decode("utf-8", "replace") for n in (request.args or {}).get(b"name[]", [])]

        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(rendered: tuple[bytes, str]) -> None:
            if gone:  # The scraper gave up waiting.
                return
            body, content_type = rendered
            request.setHeader("Content-Type", content_type)  # type: ignore[no-untyped-call]
            request.write(body)  # type: ignore[no-untyped-call]  # twisted.web
            request.finish()  # type: ignore[no-untyped-call]  # twisted.web

        def failed(failure: Any) -> None:
            log.failure("Rendering the workers' metrics failed", failure)
            if gone:
                return
            request.setResponseCode(500)
            request.finish()  # type: ignore[no-untyped-call]  # twisted.web

        Deferred.fromCoroutine(self._metrics.render(accept, names)).addCallbacks(answer, failed)
        return NOT_DONE_YET


__all__ = ["WorkerMetrics", "families"]
