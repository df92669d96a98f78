"""The service's core, shared by the routers: who may see what, and running a TAP query into a format.

One `DacService` per process. Engines are kept per set of groups (data rights decide which catalogs exist
for a caller, and the engine's translation cache is keyed on them); TAP_SCHEMA is rebuilt from the
registry the engine already caches, so it always matches what the caller can query.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import httpx

from api.config import ServiceSettings
from api.formats import TapError, resolve_format
from api.formats.upload import parse_votable_upload
from api.tap.params import TapQuery, UploadRef
from api.tap_schema import SchemaInfo, lake_schemas, tap_schema_tables
from dac_lake.adql import AdqlError
from dac_lake.adql.model import TableMeta
from dac_lake.distributed.executor import DaskQueries, DistributedStream, QueryUnavailable
from dac_lake.engine import MemoryTable, QueryCancelled, QueryControl, QueryEngine, QueryStream
from dac_lake.lake import Lake
from dac_lake.sandbox import QueryRejected, QueryTimeout, SandboxError, SandboxLimits, first_line
from dac_lake.session import Session

log = logging.getLogger("api.query")
UPLOAD_SCHEMA = "TAP_UPLOAD"


@dataclass
class PreparedQuery:
    """A query that translated and planned: the stream is open, nothing has been sent yet."""

    stream: QueryStream | DistributedStream
    media_type: str
    extension: str
    chunks: Iterator[bytes]
    started: float


class DacService:
    """Everything a request needs: the lake, the limits, an engine per set of groups."""

    def __init__(self, lake: Lake, settings: ServiceSettings):
        self.lake = lake
        self.settings = settings
        self._engines: dict[frozenset[str], QueryEngine] = {}
        self._lock = threading.Lock()
        self.started = time.time()
        self.dask: DaskQueries | None = None
        if settings.dask_scheduler:
            self.dask = DaskQueries(
                settings.dask_scheduler,
                lake.storage.url,
                min_rows=settings.dask_min_rows,
                chunk_rows=settings.dask_chunk_rows,
                limits=SandboxLimits(memory_limit=settings.memory_limit, threads=settings.threads),
            )

    def close(self) -> None:
        """Let go of the Dask client and the engines' databases (service shutdown)."""
        if self.dask is not None:
            self.dask.close()
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()

    # ------------------------------------------------------------------ data rights
    def engine(self, groups: frozenset[str]) -> QueryEngine:
        with self._lock:
            engine = self._engines.get(groups)
            if engine is None:
                limits = SandboxLimits(
                    memory_limit=self.settings.memory_limit,
                    threads=self.settings.threads,
                    timeout_s=self.settings.sync_timeout_s,
                )
                engine = self._engines[groups] = QueryEngine(
                    self.lake, groups, limits, io_log=self.settings.io_log
                )
            return engine

    def session(self, groups: frozenset[str]) -> Session:
        """A Python-API session sharing the service's engine (SCS uses its cone code)."""
        return Session(self.lake, groups, engine=self.engine(groups))

    def schemas(self, groups: frozenset[str]) -> list[SchemaInfo]:
        return lake_schemas(self.engine(groups).registry.lake_tables())

    # ------------------------------------------------------------------ uploads
    def upload_tables(self, refs: tuple[UploadRef, ...], files: Mapping[str, bytes]) -> list[MemoryTable]:
        """TAP_UPLOAD tables from the request's multipart parts (or fetched http URLs), with limits."""
        out = []
        s = self.settings
        for ref in refs:
            if ref.param is not None:
                data = _lookup(files, ref.param)
                if data is None:
                    raise TapError(
                        f"UPLOAD {ref.name} refers to param:{ref.param}, but the request has no part "
                        f"named {ref.param!r} (send the VOTable as a multipart file of that name)",
                        400,
                    )
            else:
                data = _fetch(ref.uri, s.upload_max_bytes)
            upload = parse_votable_upload(
                data, ref.name, max_rows=s.upload_max_rows, max_bytes=s.upload_max_bytes
            )
            meta = TableMeta(
                schema=UPLOAD_SCHEMA,
                name=upload.name,
                columns=tuple(upload.columns),
                ra_column=upload.ra_column,
                dec_column=upload.dec_column,
            )
            out.append(MemoryTable(meta, upload.table))
        return out

    # ------------------------------------------------------------------ queries
    def prepare(
        self,
        groups: frozenset[str],
        request: TapQuery,
        files: Mapping[str, bytes],
        *,
        timeout_s: float,
        control: QueryControl | None = None,
        who: str | None = None,
        distributed: bool = False,
    ) -> PreparedQuery:
        """Translate, plan and start a query; raise TapError (with the HTTP status) for anything a caller
        can fix. The returned chunks stream the result in the requested format.

        `distributed` (async jobs): a query whose lake scans exceed `[service] dask_min_rows` runs as tasks
        on the Dask cluster, if one is configured and the query can be split (dac_lake/distributed)."""
        t0 = time.perf_counter()
        fmt = resolve_format(request.response_format)
        engine = self.engine(groups)
        memory = tap_schema_tables(self.schemas(groups)) + self.upload_tables(request.uploads, files)
        try:
            stream = None
            if distributed and self.dask is not None:
                stream = self._distributed(engine, request, memory, timeout_s, control)
            if stream is None:
                stream = engine.stream(
                    request.query,
                    maxrec=request.maxrec,
                    timeout_s=timeout_s,
                    memory_tables=memory,
                    control=control,
                )
        except Exception as exc:
            raise as_tap_error(exc) from exc
        chunks = fmt.writer(
            stream.columns,
            stream.schema,
            _guarded(stream, who, request.query, t0),
            overflow=lambda: stream.overflow,
            query=request.query,
        )
        return PreparedQuery(stream, fmt.media_type, fmt.extension, chunks, t0)

    def _distributed(
        self,
        engine: QueryEngine,
        request: TapQuery,
        memory: list[MemoryTable],
        timeout_s: float,
        control: QueryControl | None,
    ) -> DistributedStream | None:
        """The query run on the Dask cluster, or None when it stays here (too small, or not splittable:
        the reason is logged)."""
        assert self.dask is not None
        translation = engine.translate(request.query, request.maxrec, memory)
        plan = self.dask.plan(engine, translation, memory)
        if isinstance(plan, str):
            log.info("query runs in the service, not on the Dask cluster: %s", plan)
            return None
        return self.dask.run(
            engine, plan, memory, maxrec=request.maxrec, timeout_s=timeout_s, control=control
        )


def as_tap_error(exc: BaseException) -> TapError:
    """The engine's exceptions as TAP errors a person can act on, with their HTTP status."""
    if isinstance(exc, TapError):
        return exc
    if isinstance(exc, AdqlError):
        return TapError(str(exc), 400)
    if isinstance(exc, QueryCancelled):
        return TapError(str(exc), 400)
    if isinstance(exc, QueryTimeout):
        return TapError(str(exc), 400)
    if isinstance(exc, QueryRejected | SandboxError):
        return TapError(str(exc), 400)
    if isinstance(exc, QueryUnavailable):
        return TapError(str(exc), 503)
    log.exception("query failed unexpectedly")
    return TapError(
        f"the service failed while running the query ({first_line(exc)}); this is a bug, please report it",
        500,
    )


def _guarded(stream: QueryStream | DistributedStream, who: str | None, query: str, t0: float) -> Iterator:
    """The stream's batches, closing it whatever happens, with the structured query log line."""
    ok = False
    try:
        yield from stream
        ok = True
    finally:
        stream.close()
        log.info(
            "tap query by %s: %s, %d rows%s in %.3f s, %d files: %s",
            who or "anonymous",
            "ok" if ok else "failed",
            stream.rows,
            " (overflow)" if stream.overflow else "",
            time.perf_counter() - t0,
            sum(len(s.files) for s in stream.scans),
            " ".join(query.split())[:300],
        )


def _lookup(files: Mapping[str, bytes], name: str) -> bytes | None:
    if name in files:
        return files[name]
    for key, value in files.items():
        if key.lower() == name.lower():
            return value
    return None


def _fetch(url: str, max_bytes: int) -> bytes:
    """An UPLOAD given by URL, read with a size limit (the service never holds more than max_bytes)."""
    try:
        with httpx.stream("GET", url, timeout=30.0, follow_redirects=True) as response:
            response.raise_for_status()
            data = bytearray()
            for chunk in response.iter_bytes():
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise TapError(f"the upload at {url} is larger than {max_bytes:,} bytes, the limit", 413)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise TapError(f"could not fetch the upload {url}: {exc}", 400) from exc


Writer = Callable[..., Iterator[bytes]]
