"""The structured query log: one JSON object per line for every TAP query, on the logger `dac_lake.querylog`.

Why a line per query, as JSON, on its own logger: it is the service's audit trail (who read what) and the
raw material for usage figures and for finding slow or failing queries. A log shipper (journald, Loki,
Elasticsearch) reads JSON without regexes, and a dedicated logger lets an operator send these lines to a
file of their own (`[service] query_log`, `DAC_SERVICE_QUERY_LOG`) apart from the process log.

Fields of a line: `ts` (UTC, ISO 8601), `endpoint` (`sync`/`async`), `who` (user name, null when
anonymous), `job_id` (async), `query` (the ADQL, whitespace folded, cut at `query_log_max_chars` with
`query_truncated`), `format`, `maxrec`, `status` (see below), `http_status`, `duration_ms`, `rows`,
`overflow`, `files_read` (files the query's scans opened), `bytes_read` (bytes the service measured
reading, see `api.metrics`), `rows_scanned` (DuckDB's count, when it has one), `error` (the message a
caller was given), `pid`.

Statuses: `ok`; `error`, the query was refused or failed for a reason the caller can fix (a 4xx: bad ADQL,
a time or memory limit); `failed`, the service failed (a 5xx: a bug); `cancelled`, an async job aborted or
out of time, or a sync client that went away before the end of its result.

`finished(record)` is the one hook the routers call: it writes the line and updates the Prometheus metrics.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

LOGGER_NAME = "dac_lake.querylog"
log = logging.getLogger(LOGGER_NAME)

OK, ERROR, FAILED, CANCELLED = "ok", "error", "failed", "cancelled"

_config_lock = threading.Lock()
_max_chars = 2000
_handler: logging.Handler | None = None
_handler_path: str | None = None


@dataclass
class QueryRecord:
    """What the log line and the metrics say about one finished query."""

    endpoint: str
    who: str | None
    query: str | None
    status: str
    http_status: int
    seconds: float
    rows: int = 0
    overflow: bool = False
    files_read: int = 0
    bytes_read: int = 0
    rows_scanned: int | None = None
    error: str | None = None
    job_id: str | None = None
    response_format: str | None = None
    maxrec: int | None = None
    #: "dask" with the number of tasks for a query run on the Dask cluster (dac_lake/distributed)
    dask_tasks: int | None = None

    def to_json(self, max_chars: int | None = None) -> str:
        limit = _max_chars if max_chars is None else max_chars
        text = " ".join(self.query.split()) if self.query else self.query
        truncated = text is not None and len(text) > limit
        line = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "endpoint": self.endpoint,
            "who": self.who,
            "job_id": self.job_id,
            "query": text[:limit] if truncated else text,
            "query_truncated": truncated,
            "format": self.response_format,
            "maxrec": self.maxrec,
            "status": self.status,
            "http_status": self.http_status,
            "duration_ms": round(self.seconds * 1000.0, 3),
            "rows": self.rows,
            "overflow": self.overflow,
            "files_read": self.files_read,
            "bytes_read": self.bytes_read,
            "rows_scanned": self.rows_scanned,
            "error": self.error,
            **({"executor": "dask", "dask_tasks": self.dask_tasks} if self.dask_tasks is not None else {}),
            "pid": os.getpid(),
        }
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def configure(path: str | None, max_chars: int = 2000) -> None:
    """Send the query lines to `path` (appended; reopened when logrotate moves it) instead of the process
    log, and cut queries at `max_chars`. Idempotent: called by every app a process creates.

    Several worker processes may append to one file: each line is one write of the O_APPEND file, so lines
    do not interleave (a query is cut well below the 8 KiB buffer of a line)."""
    global _max_chars, _handler, _handler_path
    with _config_lock:
        _max_chars = max_chars
        log.setLevel(logging.INFO)
        if path == _handler_path:
            return
        if _handler is not None:
            log.removeHandler(_handler)
            _handler.close()
            _handler, _handler_path = None, None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            _handler, _handler_path = handler, path
        # with a file of its own the line is not repeated in the process log
        log.propagate = _handler is None


def finished(record: QueryRecord) -> None:
    """The hook the routers call once per query: the log line, then the metrics."""
    from api import metrics

    try:
        log.info(record.to_json())
    finally:
        metrics.observe_query(record)


# --------------------------------------------------------------------------- building records
def query_param(params: dict[str, list[str]] | None) -> str | None:
    """The QUERY parameter of a request, for the log of a request refused before it was parsed."""
    values = [v for v in (params or {}).get("QUERY", []) if v]
    return values[0] if values else None


def stream_status(stream) -> str:
    """Whether a query stream (dac_lake.engine.QueryStream) that a writer consumed ended well.

    Why inferred: the VOTable and JSON writers report a failure after the first bytes in-band (the HTTP
    status has been sent) and end normally, so the stream itself must tell. The sandbox marks its profile
    `complete` when DuckDB's result was read to its end and `truncated` when it stopped at MAXREC; an
    overflow ends the read early on purpose. Anything else is a query that broke off (an error)."""
    profile = getattr(stream, "profile", None) or {}
    if getattr(stream, "overflow", False) or profile.get("complete") or profile.get("truncated"):
        return OK
    return ERROR


def stream_io(stream) -> tuple[int, int, int | None]:
    """(files read, bytes read, rows scanned) of a finished query stream.

    Files: those the scans opened (the planner's choice after HEALPix pruning). Bytes: what the service
    measured: the row groups it read itself for small spatial selections, plus DuckDB's reads when the
    engine's I/O log is on (`profile["io"]`); a DuckDB scan without the I/O log adds its files, not bytes.
    """
    scans = getattr(stream, "scans", None) or []
    files = sum(len(s.files) for s in scans)
    measured = sum(int((s.pyarrow_read or {}).get("bytes", 0)) for s in scans)
    profile = getattr(stream, "profile", None) or {}
    io = profile.get("io") or {}
    measured += int(io.get("bytes_read") or 0)
    scanned = profile.get("rows_scanned")
    return files, measured, int(scanned) if isinstance(scanned, int | float) else None


def from_stream(
    endpoint: str,
    who: str | None,
    request,
    stream,
    started: float,
    *,
    job_id: str | None = None,
    status: str | None = None,
    error: str | None = None,
) -> QueryRecord:
    """The record of a query whose result stream was opened (`request`: the api.tap.params.TapQuery)."""
    files, measured, scanned = stream_io(stream)
    status = status or stream_status(stream)
    if status == ERROR and error is None:
        error = "the query failed while its result was being sent (reported in the result document)"
    return QueryRecord(
        endpoint=endpoint,
        who=who,
        query=request.query,
        status=status,
        http_status=200,  # sent before the first byte of the result, whatever happened after
        seconds=time.perf_counter() - started,
        rows=int(getattr(stream, "rows", 0)),
        overflow=bool(getattr(stream, "overflow", False)),
        files_read=files,
        bytes_read=measured,
        rows_scanned=scanned,
        error=error,
        job_id=job_id,
        response_format=request.response_format,
        maxrec=request.maxrec,
        dask_tasks=(getattr(stream, "profile", None) or {}).get("tasks_run"),
    )


def from_error(
    endpoint: str,
    who: str | None,
    query: str | None,
    http_status: int,
    message: str,
    started: float,
    *,
    job_id: str | None = None,
    cancelled: bool = False,
    request=None,
) -> QueryRecord:
    """The record of a query that was refused or failed before (or without) a result."""
    status = CANCELLED if cancelled else FAILED if http_status >= 500 else ERROR
    return QueryRecord(
        endpoint=endpoint,
        who=who,
        query=query,
        status=status,
        http_status=http_status,
        seconds=time.perf_counter() - started,
        error=message,
        job_id=job_id,
        response_format=getattr(request, "response_format", None),
        maxrec=getattr(request, "maxrec", None),
    )
