"""ADQL over the lake: translate, prune HEALPix partitions, run in a locked sandbox, report what was read.

One implementation serves `Session.adql`, `Session.cone`, the TAP service and SCS: the translator finds the
constant regions each table reference must lie in; this module turns them into the partition files to read
and `_healpix_29` ranges (so DuckDB skips row groups inside those files), defines one view per table
reference on a fresh sandbox, locks it and runs the generated SQL.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from dac_lake.adql import CrossMatch, OutputColumn, TableRef, Translation, translate
from dac_lake.adql.model import TableMeta
from dac_lake.coverage import partitions_touching, points_ranges29, regions_ranges29
from dac_lake.lake import Lake
from dac_lake.registry import LakeRegistry, LakeTable
from dac_lake.sandbox import Sandbox, SandboxError, SandboxLimits

log = logging.getLogger(__name__)

#: above this many ranges, row-group pruning predicates cost more than they save
MAX_RANGE_PREDICATES = 512
TRANSLATION_CACHE_SIZE = 256


@dataclass(frozen=True)
class MemoryTable:
    """A table that lives in memory for one query: a TAP upload (`TAP_UPLOAD.x`) or TAP_SCHEMA.

    `table` holds the columns named in `meta.columns`. If `meta` names RA/Dec columns, a cross-match of a
    lake catalog with it reads only the lake partitions near its positions (the upload is HEALPix-indexed
    on the fly).
    """

    meta: TableMeta
    table: pa.Table = field(hash=False, compare=False)


class QueryCancelled(RuntimeError):
    """The query was cancelled through its `QueryControl` (an aborted async job)."""


class QueryControl:
    """A handle on a running query from another thread: cancel it, read its progress.

    The TAP async runner creates one per job; the engine binds it to the sandbox while the query runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._sandbox: Sandbox | None = None
        self.files_total = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._sandbox is not None:
                self._sandbox.interrupt()

    def progress(self) -> float | None:
        """Fraction done (DuckDB's estimate) of the running query, None before it starts or when unknown."""
        with self._lock:
            return None if self._sandbox is None else self._sandbox.progress()

    def describe(self) -> str:
        """Progress for people: 'partitions ~3/17 (18%)'."""
        frac = self.progress()
        if frac is None:
            return "waiting" if not self._cancelled else "cancelled"
        done = round(frac * self.files_total)
        return f"partitions ~{done}/{self.files_total} ({frac:.0%})"

    def _bind(self, sandbox: Sandbox | None) -> None:
        with self._lock:
            self._sandbox = sandbox
            if sandbox is not None and self._cancelled:
                sandbox.interrupt()


class _QueryRegistry:
    """The translator's view: the caller's lake tables plus this query's memory tables."""

    def __init__(self, registry: LakeRegistry, memory_tables: Sequence[MemoryTable]):
        self._registry = registry
        self._memory = list(memory_tables)

    def tables(self) -> list[TableMeta]:
        return self._registry.tables() + [m.meta for m in self._memory]


@dataclass
class ScanPlan:
    """What one table reference will read."""

    relation: str
    table: str
    files: list[str]
    total_files: int
    ranges: np.ndarray | None  # None: no spatial constraint


@dataclass
class QueryResult:
    table: pa.Table
    columns: list[OutputColumn]
    overflow: bool
    sql: str
    scans: list[ScanPlan] = field(default_factory=list)
    profile: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def files_read(self) -> int:
        return sum(len(s.files) for s in self.scans)

    def explain(self) -> dict:
        """The introspection the issue asks for: files and row groups each query read."""
        return {
            "sql": self.sql,
            "seconds": round(self.seconds, 4),
            "scans": [
                {
                    "relation": s.relation,
                    "table": s.table,
                    "files": len(s.files),
                    "of_files": s.total_files,
                    "healpix_ranges": None if s.ranges is None else len(s.ranges),
                }
                for s in self.scans
            ],
            "profile": self.profile,
        }


def effective_regions(
    ref: TableRef, refs: list[TableRef], crossmatches: list[CrossMatch]
) -> tuple[list, float]:
    """The regions bounding `ref` and how much to grow them: its own, or, for the unconstrained side of a
    cross-match, the other side's regions grown by the match radius (a pair is never farther apart)."""
    if ref.regions:
        return ref.regions, 0.0
    by_relation = {r.relation: r for r in refs}
    for cm in crossmatches:
        if ref.relation in (cm.left, cm.right):
            other = by_relation.get(cm.right if ref.relation == cm.left else cm.left)
            if other is not None and other.regions:
                return other.regions, cm.radius_deg
    return [], 0.0


def plan_scan(lt: LakeTable, ref: TableRef, regions: list, extra_deg: float = 0.0) -> ScanPlan:
    partitions = lt.manifest["partitions"]
    ranges = regions_ranges29(regions, extra_deg) if regions else None
    touched = partitions if ranges is None else partitions_touching(partitions, ranges)
    files = lt.files(touched)
    return ScanPlan(ref.relation, lt.qualified_name, files, len(partitions), ranges)


class QueryEngine:
    """Runs ADQL for one caller (its groups decide which catalogs exist).

    Safe to share between threads: each query gets its own sandbox (DuckDB connection).
    """

    def __init__(self, lake: Lake, groups: frozenset[str] = frozenset(), limits: SandboxLimits | None = None):
        self.lake = lake
        self.registry = LakeRegistry(lake, groups)
        self.limits = limits or SandboxLimits()
        self._translations: OrderedDict[tuple, Translation] = OrderedDict()
        self._translations_lock = threading.Lock()

    def _translate(
        self, text: str, maxrec: int | None, memory_tables: Sequence[MemoryTable] = ()
    ) -> Translation:
        """Translate, remembering recent translations: TAP clients and SCS repeat the same queries, and
        translation (sqlglot, with a re-parse of the output as a safety check) is ~15 ms. The key includes
        the tables visible now, so a new release or changed data rights never reuse a stale plan."""
        visible = tuple((t.meta.schema, t.meta.name, t.release) for t in self.registry.lake_tables())
        memory = tuple(m.meta for m in memory_tables)
        key = (text, maxrec, visible, memory)
        with self._translations_lock:
            cached = self._translations.get(key)
            if cached is not None:
                self._translations.move_to_end(key)
                return cached
        translation = translate(text, _QueryRegistry(self.registry, memory_tables), maxrec=maxrec)
        with self._translations_lock:
            self._translations[key] = translation
            if len(self._translations) > TRANSLATION_CACHE_SIZE:
                self._translations.popitem(last=False)
        return translation

    def translate(self, text: str, maxrec: int | None = None, memory_tables: Sequence[MemoryTable] = ()):
        """The translation alone (validation of a query before an async job runs it)."""
        return self._translate(text, maxrec, memory_tables)

    def _open(
        self,
        translation: Translation,
        maxrec: int | None,
        timeout_s: float | None,
        memory_tables: Sequence[MemoryTable],
    ) -> tuple[Sandbox, list[ScanPlan]]:
        """A locked sandbox with one relation per table reference of `translation`."""
        limits = self.limits
        if timeout_s is not None or maxrec is not None:
            limits = replace(
                limits,
                timeout_s=timeout_s or limits.timeout_s,
                max_rows=None if maxrec is None else maxrec + 1,
            )
        memory = {(m.meta.schema.lower(), m.meta.name.lower()): m for m in memory_tables}
        by_relation = {r.relation: r for r in translation.table_refs}
        scans: list[ScanPlan] = []
        sandbox = Sandbox(self.lake.storage, limits)
        try:
            for ref in translation.table_refs:
                mem = memory.get((ref.table.schema.lower(), ref.table.name.lower()))
                if mem is not None:
                    sandbox.define_arrow_relation(ref.relation, mem.table)
                    continue
                lt = self.registry.find(ref.table.schema, ref.table.name)
                if lt is None:
                    raise RuntimeError(f"translator returned unknown table {ref.table.name!r}")
                plan = self._plan(lt, ref, translation, by_relation, memory)
                scans.append(plan)
                ranges = plan.ranges
                if ranges is not None and len(ranges) > MAX_RANGE_PREDICATES:
                    ranges = None
                files = plan.files
                if not files:  # empty coverage: a view with the right columns and no rows
                    files = [lt.schema_file]
                    ranges = np.empty((0, 2), dtype=np.int64)
                sandbox.define_relation(ref.relation, files, healpix_ranges=ranges)
            sandbox.lock()
        except BaseException:
            sandbox.close()
            raise
        return sandbox, scans

    def _plan(
        self,
        lt: LakeTable,
        ref: TableRef,
        translation: Translation,
        by_relation: dict[str, TableRef],
        memory: dict[tuple[str, str], MemoryTable],
    ) -> ScanPlan:
        """Which files of `lt` to read: its own regions, the other side's regions grown by a cross-match
        radius, or, matched against an in-memory table with positions (an upload), the HEALPix cells
        around those positions."""
        if not ref.regions:
            for cm in translation.crossmatches:
                if ref.relation not in (cm.left, cm.right):
                    continue
                other = by_relation.get(cm.right if ref.relation == cm.left else cm.left)
                if other is None:
                    continue
                mem = memory.get((other.table.schema.lower(), other.table.name.lower()))
                if mem is not None and mem.meta.ra_column and mem.meta.dec_column:
                    ranges = points_ranges29(
                        mem.table.column(mem.meta.ra_column).to_numpy(zero_copy_only=False),
                        mem.table.column(mem.meta.dec_column).to_numpy(zero_copy_only=False),
                        cm.radius_deg,
                    )
                    partitions = lt.manifest["partitions"]
                    touched = partitions_touching(partitions, ranges)
                    files = lt.files(touched)
                    return ScanPlan(ref.relation, lt.qualified_name, files, len(partitions), ranges)
        regions, grow = effective_regions(ref, translation.table_refs, translation.crossmatches)
        return plan_scan(lt, ref, regions, grow)

    def adql(
        self,
        text: str,
        maxrec: int | None = None,
        timeout_s: float | None = None,
        memory_tables: Sequence[MemoryTable] = (),
        control: QueryControl | None = None,
    ) -> QueryResult:
        """Run ADQL, return the whole result (at most `maxrec` rows; `overflow`: there were more)."""
        stream = self.stream(text, maxrec, timeout_s, memory_tables, control)
        with stream:
            batches = list(stream)
            table = pa.Table.from_batches(batches, schema=stream.schema)
        return QueryResult(
            table=table,
            columns=stream.columns,
            overflow=stream.overflow,
            sql=stream.sql,
            scans=stream.scans,
            profile=stream.profile,
            seconds=stream.seconds,
        )

    def stream(
        self,
        text: str,
        maxrec: int | None = None,
        timeout_s: float | None = None,
        memory_tables: Sequence[MemoryTable] = (),
        control: QueryControl | None = None,
    ) -> QueryStream:
        """Run ADQL and hand back the result as Arrow batches, never holding it whole (TAP streams it out).

        Translation errors, refusals and planning happen here, before any byte is sent; the time limit runs
        until the stream is drained or closed.
        """
        t0 = time.perf_counter()
        translation = self._translate(text, maxrec, memory_tables)
        if control is not None and control.cancelled:
            raise QueryCancelled("the query was cancelled before it started")
        sandbox, scans = self._open(translation, maxrec, timeout_s, memory_tables)
        try:
            if control is not None:
                control.files_total = sum(len(s.files) for s in scans)
                control._bind(sandbox)
            reader = sandbox.stream(translation.sql)
        except BaseException as exc:
            if control is not None:
                control._bind(None)
            sandbox.close()
            if control is not None and control.cancelled and isinstance(exc, SandboxError):
                raise QueryCancelled("the query was cancelled") from exc
            raise
        return QueryStream(translation, sandbox, reader, scans, maxrec, control, t0)


class QueryStream:
    """A running query's result as Arrow record batches (iterate it, or use it as a context manager).

    At most `maxrec` rows are yielded; `overflow` becomes true once the row beyond `maxrec` was seen, i.e.
    it is final when the iteration has ended (TAP writes its OVERFLOW marker after the table).
    """

    def __init__(
        self,
        translation: Translation,
        sandbox: Sandbox,
        reader: pa.RecordBatchReader,
        scans: list[ScanPlan],
        maxrec: int | None,
        control: QueryControl | None,
        started: float,
    ):
        self.translation = translation
        self.columns: list[OutputColumn] = translation.columns
        self.sql = translation.sql
        self.schema: pa.Schema = reader.schema
        self.scans = scans
        self.maxrec = maxrec
        self.overflow = False
        self.rows = 0
        self.profile: dict = {}
        self.seconds = 0.0
        self._sandbox = sandbox
        self._reader = reader
        self._control = control
        self._started = started
        self._closed = False

    def __enter__(self) -> QueryStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            for batch in self._reader:
                if self.maxrec is not None and self.rows + batch.num_rows > self.maxrec:
                    batch = batch.slice(0, self.maxrec - self.rows)
                    self.overflow = True
                if batch.num_rows:
                    self.rows += batch.num_rows
                    yield batch
                if self.overflow:
                    break
        except SandboxError as exc:
            if self._control is not None and self._control.cancelled:
                raise QueryCancelled("the query was cancelled") from exc
            raise
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._reader.close()
        self.profile = self._sandbox.last_profile
        if self._control is not None:
            self._control._bind(None)
        self._sandbox.close()
        self.seconds = time.perf_counter() - self._started
        io = self.profile.get("io", {})
        log.info(
            "query: %d rows in %.3f s; files %s; read %s files, %s bytes in %s requests",
            self.rows,
            self.seconds,
            ", ".join(f"{s.table} {len(s.files)}/{s.total_files}" for s in self.scans) or "none",
            io.get("files_read"),
            io.get("bytes_read"),
            io.get("read_requests"),
        )

    def explain(self) -> dict:
        return QueryResult(
            pa.table({}), self.columns, self.overflow, self.sql, self.scans, self.profile, self.seconds
        ).explain()
