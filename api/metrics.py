"""Prometheus metrics of the service, served at `/metrics` (text exposition format; OpenMetrics on request).

Why these: an operator needs to see load (requests and queries per endpoint and outcome), latency
(histograms, so percentiles can be aggregated across API nodes), the work queries do against the lake
(rows returned, files opened, bytes read, rows scanned) and the async backlog (jobs by phase).

| metric | type | labels |
|---|---|---|
| `dac_queries_total` | counter | endpoint (sync, async), status (ok, error, failed, cancelled) |
| `dac_query_duration_seconds` | histogram | endpoint |
| `dac_query_rows_total` | counter | endpoint: rows returned to callers |
| `dac_query_files_read_total` | counter | endpoint: files the queries' scans opened |
| `dac_query_bytes_read_total` | counter | endpoint: bytes measured (see `api.querylog.stream_io`) |
| `dac_query_rows_scanned_total` | counter | endpoint: rows DuckDB scanned |
| `dac_http_requests_total` | counter | method, route (the route template, `unmatched` else), status |
| `dac_http_request_duration_seconds` | histogram | method, route (to the end of a streamed body) |
| `dac_http_requests_in_progress` | gauge | (none) |
| `dac_async_jobs` | gauge | phase: jobs in the host's job store (QUEUED = queue depth, EXECUTING = running) |

Several worker processes (`dac serve --workers N`): each process counts in its own memory unless
`PROMETHEUS_MULTIPROC_DIR` names a directory, set before the processes start and emptied at each start (the
systemd unit in deploy/ does both); then every process writes its values to memory-mapped files there and
whichever process answers a scrape sums them all (prometheus_client's multiprocess mode). The job gauge
is read from the job store (SQLite, shared by the processes of one host) at scrape time, so it is right in
either mode.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from api.uws.store import Phase

#: seconds; sync queries are limited to about a minute, async ones to hours
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

QUERIES = Counter(
    "dac_queries",
    "TAP queries finished, by endpoint and status (ok, error, failed, cancelled)",
    ["endpoint", "status"],
)
QUERY_SECONDS = Histogram(
    "dac_query_duration_seconds",
    "Wall time of TAP queries, from the request to the last byte of the result",
    ["endpoint"],
    buckets=QUERY_BUCKETS,
)
QUERY_ROWS = Counter("dac_query_rows", "Rows returned by TAP queries", ["endpoint"])
QUERY_FILES = Counter("dac_query_files_read", "Lake files opened by the scans of TAP queries", ["endpoint"])
QUERY_BYTES = Counter(
    "dac_query_bytes_read",
    "Bytes of lake data the service measured reading (its own row-group reads; DuckDB's with the I/O log)",
    ["endpoint"],
)
QUERY_ROWS_SCANNED = Counter("dac_query_rows_scanned", "Rows DuckDB scanned for TAP queries", ["endpoint"])
HTTP_REQUESTS = Counter(
    "dac_http_requests",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "dac_http_request_duration_seconds",
    "HTTP request time to the end of the response body",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
)
HTTP_IN_PROGRESS = Gauge(
    "dac_http_requests_in_progress", "HTTP requests being answered", multiprocess_mode="livesum"
)


def multiprocess_mode() -> bool:
    """True when the values live in PROMETHEUS_MULTIPROC_DIR (read by prometheus_client at import)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def observe_query(record) -> None:
    """Count one finished query (an api.querylog.QueryRecord)."""
    endpoint = record.endpoint
    QUERIES.labels(endpoint, record.status).inc()
    QUERY_SECONDS.labels(endpoint).observe(record.seconds)
    if record.rows:
        QUERY_ROWS.labels(endpoint).inc(record.rows)
    if record.files_read:
        QUERY_FILES.labels(endpoint).inc(record.files_read)
    if record.bytes_read:
        QUERY_BYTES.labels(endpoint).inc(record.bytes_read)
    if record.rows_scanned:
        QUERY_ROWS_SCANNED.labels(endpoint).inc(record.rows_scanned)


class JobsCollector:
    """`dac_async_jobs{phase}` from the job store at scrape time (all processes sharing the store)."""

    def __init__(self, store_path: Path):
        self.store_path = Path(store_path)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "dac_async_jobs", "Async (UWS) jobs in this host's job store by phase", labels=["phase"]
        )
        counts: dict[str, int] = {}
        try:
            with sqlite3.connect(self.store_path, timeout=5) as db:
                counts = dict(db.execute("SELECT phase, COUNT(*) FROM jobs GROUP BY phase").fetchall())
        except sqlite3.Error:
            return  # no store yet, or locked for longer than a scrape should wait: leave the gauge out
        for phase in Phase:
            family.add_metric([phase.value], counts.get(phase.value, 0))
        yield family


class _DefaultRegistry:
    """The process's default registry (our metrics and the process/GC collectors) inside a per-scrape one."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def scrape(store_path: Path | None, accept: str = "") -> tuple[bytes, str]:
    """The exposition body and its content type."""
    registry = CollectorRegistry()
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    if store_path is not None:
        registry.register(JobsCollector(store_path))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by its route template (known after routing, so the
    label set stays small whatever paths clients try), to the last byte of a streamed body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        HTTP_IN_PROGRESS.inc()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            HTTP_IN_PROGRESS.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)


def install(app: FastAPI, job_store_path: Path | None) -> None:
    """Add the request metrics middleware and the `/metrics` endpoint to the app."""
    app.add_middleware(MetricsMiddleware)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:  # sync: the multiprocess merge reads files
        body, content_type = scrape(job_store_path, request.headers.get("accept", ""))
        return Response(body, media_type=content_type)


def process_exit() -> None:
    """At a worker's shutdown: drop its live gauge files, so `in_progress` sums only living processes."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid())
