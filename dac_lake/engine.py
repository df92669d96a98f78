"""ADQL over the lake: translate, prune HEALPix partitions, run in a locked sandbox, report what was read.

One implementation serves `Session.adql`, `Session.cone`, the TAP service and SCS: the translator finds the
constant regions each table reference must lie in; this module turns them into the partition files to read
and `_healpix_29` ranges (so DuckDB skips row groups inside those files), defines one relation per table
reference and runs the generated SQL.

Where the time goes, and what keeps it short (bench/query, README "figures"):

* One locked DuckDB instance per engine (`SandboxDatabase`), made once per set of visible releases, with a
  connection per query: no instance start (~20 ms) per query, and DuckDB's Parquet footer and object
  caches stay warm. Relations are TEMP views and Arrow tables of the query's own connection, so queries in
  other threads never see them. The engine is thread-safe.
* Translations are remembered (keyed on the text, MAXREC and the tables visible now).
* A cone (`cone()`, used by `Session.cone` and SCS) without an extra condition skips SQL altogether: the
  row groups its HEALPix coverage touches are read with pyarrow and filtered with the same distance
  formula (`dac_lake.cone`), the only way found to answer a few-arcsecond cone in a few ms.
* A cross-match of two catalogs is an equi-join on HEALPix cells through a neighbour table
  (`dac_lake.xmatch`), not a declination-band range join over the whole sky.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from dac_lake import xmatch
from dac_lake.adql import CrossMatch, OutputColumn, TableRef, Translation, translate
from dac_lake.adql.errors import AdqlUnknownTable
from dac_lake.adql.model import TableMeta
from dac_lake.cone import ConeReader, TooLarge, row_groups_meeting
from dac_lake.coverage import partitions_touching, points_ranges29, regions_ranges29
from dac_lake.healpix import healpix29
from dac_lake.lake import Lake
from dac_lake.registry import LakeRegistry, LakeTable
from dac_lake.sandbox import (
    CellKey,
    QueryTimeout,
    SandboxDatabase,
    SandboxError,
    SandboxLimits,
    SandboxQuery,
)

log = logging.getLogger(__name__)

#: above this many ranges, row-group pruning predicates cost more than they save
MAX_RANGE_PREDICATES = 512
TRANSLATION_CACHE_SIZE = 256
#: Arrow types of the Parquet files that DuckDB returns as another type (the cone fast path matches it)
_DUCKDB_ARROW_TYPES = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
#: a spatially constrained relation is read with pyarrow when its ranges select at most this many rows in
#: at most this many files (QueryEngine._define)
SMALL_SCAN_ROWS = 100_000
SMALL_SCAN_FILES = 16
#: a cross-match's expanded side is filtered to the anchor's neighbourhood only when that leaves at most
#: this fraction of the rows of its files' row groups
PRUNE_WORTHWHILE = 0.5
#: the HEALPix index computed for an in-memory table in a neighbour cross-match (a name no upload can use:
#: the translator reserves `__dac_` prefixes)
MEMORY_INDEX_COLUMN = "__dac_healpix_29"
#: connections of an engine's database: queries running at once (more wait for a free one)
DEFAULT_CONNECTIONS = 8


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

    The TAP async runner creates one per job; the engine binds it to the query's sandbox connection while
    the query runs (cancel interrupts that connection only).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._sandbox: SandboxQuery | None = None
        self._callbacks: list = []
        self.files_total = 0
        #: a query run as tasks on a Dask cluster (dac_lake.distributed) counts them here
        self.tasks_total = 0
        self.tasks_done = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._sandbox is not None:
                self._sandbox.interrupt()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback()

    def on_cancel(self, callback) -> None:
        """Call `callback` once when the query is cancelled (at once if it already is): how a query
        running elsewhere (tasks on a Dask cluster) is stopped."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def progress(self) -> float | None:
        """Fraction done (DuckDB's estimate) of the running query, None before it starts or when unknown."""
        with self._lock:
            return None if self._sandbox is None else self._sandbox.progress()

    def describe(self) -> str:
        """Progress for people: 'partitions ~3/17 (18%)', or the Dask tasks done of a distributed query."""
        if self.tasks_total:
            return f"partitions: {self.tasks_done}/{self.tasks_total} tasks done on the Dask cluster"
        frac = self.progress()
        if frac is None:
            return "waiting" if not self._cancelled else "cancelled"
        done = round(frac * self.files_total)
        return f"partitions ~{done}/{self.files_total} ({frac:.0%})"

    def _bind(self, sandbox: SandboxQuery | None) -> None:
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
    rows: int = 0  # rows in `files` (from the manifest)
    read_by: str = "duckdb"  # or "pyarrow": a small selection read before the query (QueryEngine._define)
    pyarrow_read: dict | None = None  # then: files, row groups, rows and bytes read


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
                    "read_by": s.read_by,
                    **({"pyarrow_read": s.pyarrow_read} if s.pyarrow_read else {}),
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
        # the preserved side of an outer join keeps its unmatched rows: it cannot borrow a region
        if ref.relation in (cm.left, cm.right) and ref.relation in cm.expandable:
            other = by_relation.get(cm.right if ref.relation == cm.left else cm.left)
            if other is not None and other.regions:
                return other.regions, cm.radius_deg
    return [], 0.0


def plan_scan(lt: LakeTable, ref: TableRef, regions: list, extra_deg: float = 0.0) -> ScanPlan:
    partitions = lt.manifest["partitions"]
    ranges = regions_ranges29(regions, extra_deg) if regions else None
    touched = partitions if ranges is None else partitions_touching(partitions, ranges)
    rows = sum(int(p[2]) for p in touched)
    return ScanPlan(ref.relation, lt.qualified_name, lt.files(touched), len(partitions), ranges, rows)


def _restrict(lt: LakeTable, plan: ScanPlan, ranges: np.ndarray) -> ScanPlan:
    """`plan` further limited to `ranges` (the neighbourhood of a cross-match's anchor side)."""
    both = xmatch.intersect_ranges(plan.ranges, ranges)
    touched = partitions_touching(lt.manifest["partitions"], both)
    return replace(plan, files=lt.files(touched), ranges=both, rows=sum(int(p[2]) for p in touched))


class QueryEngine:
    """Runs ADQL for one caller (its groups decide which catalogs exist). Thread-safe: the TAP service
    runs queries from several threads on one engine."""

    def __init__(
        self,
        lake: Lake,
        groups: frozenset[str] = frozenset(),
        limits: SandboxLimits | None = None,
        connections: int = DEFAULT_CONNECTIONS,
        io_log: bool = False,
    ):
        """`io_log`: record every read DuckDB makes (QueryResult.profile["io"]: files, requests, bytes per
        file); off by default, as it costs 10-20% on full scans (see SandboxDatabase). Without it, the
        profile still says which files each scan opened and which row groups its `_healpix_29` ranges
        select (`row_groups`), from the footers."""
        self.lake = lake
        self.io_log = io_log
        self.registry = LakeRegistry(lake, groups)
        self.limits = limits or SandboxLimits()
        self.connections = connections
        self._translations: OrderedDict[tuple, Translation] = OrderedDict()
        self._translations_lock = threading.Lock()
        self._db: SandboxDatabase | None = None
        self._db_key: tuple | None = None
        self._db_lock = threading.Lock()
        self.cones = ConeReader(lake.storage)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Close the engine's database (running queries are interrupted)."""
        with self._db_lock:
            db, self._db, self._db_key = self._db, None, None
        if db is not None:
            db.close()

    def _visible(self) -> tuple:
        return tuple((t.meta.schema, t.meta.name, t.release) for t in self.registry.lake_tables())

    def _database(self) -> SandboxDatabase:
        """The engine's locked database, (re)opened when the readable releases or the instance limits
        change: its allow-list is exactly the files of the releases this caller may read."""
        tables = self.registry.lake_tables()
        lim = self.limits
        key = (
            tuple(sorted({(t.catalog, t.release, t.dataset_prefix) for t in tables})),
            (lim.memory_limit, int(lim.threads), lim.max_temp_size, lim.spill, lim.max_sql_chars),
            self.connections,
        )
        with self._db_lock:
            db = self._db
            if db is not None and not db.closed and self._db_key == key:
                return db
            files, seen = [], set()
            for t in tables:
                # a release is listed twice (catalog and "catalog@release"); an alert stream has several
                # tables per snapshot: one entry per dataset
                if t.dataset_prefix in seen:
                    continue
                seen.add(t.dataset_prefix)
                files.extend(t.files(t.manifest["partitions"]))
                files.append(t.schema_file)
            new = SandboxDatabase(
                self.lake.storage, files, lim, connections=self.connections, io_log=self.io_log
            )
            old, self._db, self._db_key = self._db, new, key
        if old is not None:
            old.retire()
        return new

    def _open_query(self, limits: SandboxLimits) -> SandboxQuery:
        for attempt in range(3):
            db = self._database()
            try:
                return db.query(limits)
            except SandboxError:  # retired by another thread between the two calls: take the new one
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _query_limits(self, maxrec: int | None, timeout_s: float | None) -> SandboxLimits:
        limits = self.limits
        if timeout_s is not None or maxrec is not None:
            limits = replace(
                limits,
                timeout_s=timeout_s or limits.timeout_s,
                max_rows=None if maxrec is None else maxrec + 1,
            )
        return limits

    def _translate(
        self, text: str, maxrec: int | None, memory_tables: Sequence[MemoryTable] = ()
    ) -> Translation:
        """Translate, remembering recent translations: TAP clients and SCS repeat the same queries. The
        key includes the tables visible now (and the query's in-memory tables), so a new release or
        changed data rights never reuse a stale plan."""
        key = (text, maxrec, self._visible(), tuple(m.meta for m in memory_tables))
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

    def find_table(self, name: str) -> LakeTable:
        """A visible table from 'catalog', 'catalog.table', 'schema.table' or '"catalog@release".table'."""
        schema, _, table = name.partition(".")
        schema = schema.strip('"')
        tables = self.registry.lake_tables()
        for lt in tables:
            if lt.meta.schema.lower() == schema.lower() and (
                not table or lt.meta.name.lower() == table.lower()
            ):
                return lt
        known = ", ".join(t.qualified_name for t in tables)
        raise AdqlUnknownTable(f"no table {name!r}; tables: {known}")

    # ------------------------------------------------------------------ ADQL
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
        until the stream is drained or closed, and the query holds one of the engine database's
        connections until then.
        """
        t0 = time.perf_counter()
        translation = self._translate(text, maxrec, memory_tables)
        return self.stream_translation(translation, maxrec, timeout_s, memory_tables, control, started=t0)

    def stream_translation(
        self,
        translation: Translation,
        maxrec: int | None = None,
        timeout_s: float | None = None,
        memory_tables: Sequence[MemoryTable] = (),
        control: QueryControl | None = None,
        restrict: Mapping[str, np.ndarray] | None = None,
        started: float | None = None,
        pinned: Mapping[str, LakeTable] | None = None,
        log_level: int = logging.INFO,
    ) -> QueryStream:
        """Run a translation (`stream` after translating; a Dask task of a distributed query with the SQL
        of its partial step). `restrict`: relation -> `_healpix_29` ranges its rows must lie in (a task's
        chunk of partitions, or their neighbourhood for the other side of a cross-match): only the files
        and row groups meeting them are read. `pinned`: relation -> the lake table (release, alert snapshot)
        to read, instead of the one the registry resolves now (every task of a distributed query reads what
        its driver planned, even if a release is published or an alert batch lands meanwhile)."""
        t0 = time.perf_counter() if started is None else started
        if control is not None and control.cancelled:
            raise QueryCancelled("the query was cancelled before it started")
        q = self._open_query(self._query_limits(maxrec, timeout_s))
        try:
            if control is not None:
                control._bind(q)  # a cancel during planning (a cross-match's anchor cells) stops it too
            scans, notes = self._define_relations(q, translation, memory_tables, restrict, pinned)
            if control is not None:
                control.files_total = sum(len(s.files) for s in scans)
            reader = q.stream(translation.sql)
        except BaseException as exc:
            if control is not None:
                control._bind(None)
            q.close()
            if control is not None and control.cancelled and isinstance(exc, SandboxError | QueryTimeout):
                raise QueryCancelled("the query was cancelled") from exc
            raise
        stream = QueryStream(self, translation, q, reader, scans, notes, maxrec, control, t0)
        stream.log_level = log_level
        return stream

    def _plan(
        self,
        lt: LakeTable,
        ref: TableRef,
        translation: Translation,
        by_relation: dict[str, TableRef],
        memory: dict[tuple[str, str], MemoryTable],
    ) -> ScanPlan:
        """Which files of `lt` to read: its own regions, the other side's regions grown by a cross-match
        radius, or, band-matched against an in-memory table with positions (an upload), the HEALPix cells
        around those positions (a neighbour cross-match restricts itself later, from the anchor's cells)."""
        if not ref.regions:
            for cm in translation.crossmatches:
                if ref.relation not in (cm.left, cm.right) or ref.relation not in cm.expandable:
                    continue
                other = by_relation.get(cm.right if ref.relation == cm.left else cm.left)
                if other is None or cm.key is not None:
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
                    rows = sum(int(p[2]) for p in touched)
                    return ScanPlan(
                        ref.relation, lt.qualified_name, lt.files(touched), len(partitions), ranges, rows
                    )
        regions, grow = effective_regions(ref, translation.table_refs, translation.crossmatches)
        return plan_scan(lt, ref, regions, grow)

    def scan_plans(
        self,
        translation: Translation,
        memory_tables: Sequence[MemoryTable] = (),
        pinned: Mapping[str, LakeTable] | None = None,
    ) -> dict[str, tuple[LakeTable, ScanPlan]]:
        """relation -> (its lake table, what a run on one machine would read), for every lake table
        reference: what `_define_relations` starts from, and what a distributed query chooses its split
        from. `pinned` tables are taken as given, the others resolved by the registry now."""
        refs = translation.table_refs
        by_relation = {r.relation: r for r in refs}
        memory = {(m.meta.schema.lower(), m.meta.name.lower()): m for m in memory_tables}
        out = {}
        for ref in refs:
            if (ref.table.schema.lower(), ref.table.name.lower()) in memory:
                continue
            lt = (pinned or {}).get(ref.relation) or self.registry.find(ref.table.schema, ref.table.name)
            if lt is None:
                raise RuntimeError(f"translator returned unknown table {ref.table.schema}.{ref.table.name}")
            out[ref.relation] = (lt, self._plan(lt, ref, translation, by_relation, memory))
        return out

    def _define_relations(
        self,
        q: SandboxQuery,
        translation: Translation,
        memory_tables: Sequence[MemoryTable] = (),
        restrict: Mapping[str, np.ndarray] | None = None,
        pinned: Mapping[str, LakeTable] | None = None,
    ) -> tuple[list[ScanPlan], list[dict]]:
        """One relation per table reference (lake tables: files or a pyarrow read; in-memory tables: Arrow
        relations of this query's connection). For a neighbour cross-match, the anchor side first (with
        its cell key), then its distinct cells, the neighbour table and the expanded side restricted to the
        anchor's neighbourhood (files and row groups near no anchor row are not read)."""
        refs = translation.table_refs
        memory = {(m.meta.schema.lower(), m.meta.name.lower()): m for m in memory_tables}
        mems = {
            ref.relation: memory[key]
            for ref in refs
            if (key := (ref.table.schema.lower(), ref.table.name.lower())) in memory
        }
        resolved = self.scan_plans(translation, memory_tables, pinned)
        tables = {relation: lt for relation, (lt, _) in resolved.items()}
        plans = {relation: plan for relation, (_, plan) in resolved.items()}
        for relation, ranges in (restrict or {}).items():
            if relation in plans:
                plans[relation] = _restrict(tables[relation], plans[relation], ranges)
        defined: set[str] = set()
        notes: list[dict] = []
        for i, cm in enumerate(translation.crossmatches):
            if cm.key is None or cm.order is None:
                continue
            t_start = time.perf_counter()
            rows = {rel: plan.rows for rel, plan in plans.items()}
            rows.update({rel: m.table.num_rows for rel, m in mems.items()})
            anchor, expanded = xmatch.choose_anchor(cm.left, cm.right, cm.expandable, rows)
            shift = xmatch.key_shift(cm.order)
            join_shift = xmatch.key_shift(xmatch.join_order(cm.order))
            if anchor in mems:
                self._define_memory(q, anchor, mems[anchor], [CellKey(cm.key, shift)])
            else:
                self._define(q, tables[anchor], plans[anchor], [CellKey(cm.key, shift)])
            cells = np.asarray(
                q.distinct_cells(anchor, cm.key).to_numpy(zero_copy_only=False), dtype=np.int64
            )
            cells = cells[cells >= 0]  # -1: an in-memory row without a valid position
            neighbours = f"__dac_nb{i}"
            table = xmatch.neighbour_table(cells, cm.order)
            q.register_table(neighbours, table, hidden=True)
            key = CellKey(cm.key, join_shift, neighbours)
            if expanded in mems:
                self._define_memory(q, expanded, mems[expanded], [key])
            else:
                near = xmatch.neighbourhood_ranges29(cells, cm.order, MAX_RANGE_PREDICATES)
                restricted = _restrict(tables[expanded], plans[expanded], near)
                kept, total = self._rows_in_ranges(restricted.files, restricted.ranges)
                if kept > PRUNE_WORTHWHILE * total:
                    # DuckDB tests an OR of ranges on every row it reads: an all-sky anchor's neighbourhood
                    # (~150 ranges around 10M rows: 2x the join's CPU, measured) costs more than it prunes
                    restricted = replace(restricted, ranges=plans[expanded].ranges)
                plans[expanded] = restricted
                self._define(q, tables[expanded], plans[expanded], [key])
            defined |= {anchor, expanded}
            notes.append(
                {
                    "anchor": anchor,
                    "expanded": expanded,
                    "order": cm.order,
                    "anchor_cells": len(cells),
                    "neighbour_rows": table.num_rows,
                    "expanded_files": len(plans[expanded].files) if expanded in plans else 0,
                    "plan_s": round(time.perf_counter() - t_start, 4),
                }
            )
        for ref in refs:
            if ref.relation in defined:
                continue
            if ref.relation in mems:
                q.register_table(ref.relation, mems[ref.relation].table)
            else:
                self._define(q, tables[ref.relation], plans[ref.relation])
        return [plans[ref.relation] for ref in refs if ref.relation in plans], notes

    @staticmethod
    def _define_memory(q: SandboxQuery, relation: str, mem: MemoryTable, keys: list[CellKey]) -> None:
        """An in-memory table in a neighbour cross-match: registered hidden with its HEALPix index computed
        on the fly (-1 where the position is missing or invalid), and a view with the key over it."""
        ra = np.asarray(mem.table.column(mem.meta.ra_column).to_numpy(zero_copy_only=False), dtype=np.float64)
        dec = np.asarray(
            mem.table.column(mem.meta.dec_column).to_numpy(zero_copy_only=False), dtype=np.float64
        )
        ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
        index = np.full(len(ra), -1, dtype=np.int64)
        if ok.any():
            index[ok] = healpix29(ra[ok] % 360.0, dec[ok])
        table = mem.table.append_column(MEMORY_INDEX_COLUMN, pa.array(index))
        hidden = f"__dac_m{relation}"
        q.register_table(hidden, table, hidden=True)
        q.define_view(relation, hidden, keys, index_column=MEMORY_INDEX_COLUMN)

    def _finish(
        self,
        q: SandboxQuery,
        scans: list[ScanPlan],
        notes: list[dict],
        rows: int,
        t0: float,
        log_level: int = logging.INFO,
    ) -> dict:
        """The profile of a finished SQL query, and its log line."""
        profile = q.last_profile
        if notes:
            profile["crossmatches"] = notes
        profile["row_groups"] = {s.relation: self._row_groups_selected(s) for s in scans}
        io = profile.get("io")
        log.log(
            log_level,
            "query: %d rows in %.3f s; files %s; row groups %s%s",
            rows,
            time.perf_counter() - t0,
            ", ".join(f"{s.table} {len(s.files)}/{s.total_files}" for s in scans) or "none",
            ", ".join(
                f"{rel} {v['selected']}/{v['in_files']}" if v else f"{rel} all"
                for rel, v in profile["row_groups"].items()
            ),
            f"; read {io['files_read']} files, {io['bytes_read']} bytes in {io['read_requests']} requests"
            if io
            else "",
        )
        return profile

    def _row_groups_selected(self, scan: ScanPlan) -> dict | None:
        """{selected, in_files, rows_selected} for a scan with `_healpix_29` ranges: the row groups whose
        statistics meet them, which is what DuckDB reads (other filters may skip more); None for a scan of
        whole files (a count would need every footer)."""
        if scan.ranges is None or len(scan.files) > 256:
            return None
        selected = total = rows = 0
        for rel in scan.files:
            fi = self.cones.file_index(rel)
            hit = row_groups_meeting(fi, scan.ranges)
            selected += int(hit.sum())
            total += len(hit)
            rows += int(fi.rows[hit].sum())
        return {"selected": selected, "in_files": total, "rows_selected": rows}

    def _rows_in_ranges(self, files: list[str], ranges: np.ndarray | None) -> tuple[int, int]:
        """(rows in the row groups of `files` that meet `ranges`, rows in `files`), from the footers'
        `_healpix_29` statistics (cached per engine)."""
        kept = total = 0
        for rel in files:
            fi = self.cones.file_index(rel)
            total += int(fi.rows.sum())
            kept += int(fi.rows[row_groups_meeting(fi, ranges)].sum()) if ranges is not None else total
        return kept, total

    def _define(
        self, q: SandboxQuery, lt: LakeTable, plan: ScanPlan, keys: list[CellKey] | None = None
    ) -> None:
        """The relation of one table reference: a view over its files (DuckDB reads them), or, for a small
        spatial selection, the row groups it selects read here and handed to DuckDB as an Arrow table.

        Why the second form: DuckDB pays per query a cost proportional to the row groups of every file it
        scans (~50-90 us each: 5-9 ms for a 1M-row partition in 10,000-row groups) before it decodes the few
        it keeps; pyarrow reads just those, and DuckDB's scan of an Arrow table costs ~1 ms. The SQL
        re-checks the exact condition either way (the ranges are a superset of the regions)."""
        if not keys and plan.ranges is not None and plan.files and len(plan.files) <= SMALL_SCAN_FILES:
            selection, rows = self.cones.select(plan.files, plan.ranges)
            if rows <= SMALL_SCAN_ROWS:
                read = [self.cones.read_row_groups(rel, fi, rgs, None) for rel, fi, rgs in selection]
                pieces = [t for t, _ in read]
                plan.pyarrow_read = {
                    "files": len(selection),
                    "row_groups": sum(len(rgs) for _, _, rgs in selection),
                    "rows": sum(t.num_rows for t in pieces),
                    "bytes": sum(n for _, n in read),
                }
                if pieces:
                    table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
                else:
                    table = (
                        self.cones.file_index(plan.files[0]).metadata.schema.to_arrow_schema().empty_table()
                    )
                q.register_table(plan.relation, table.replace_schema_metadata(None))
                plan.read_by = "pyarrow"
                return
        ranges = plan.ranges
        if ranges is not None and len(ranges) > MAX_RANGE_PREDICATES:
            ranges = None
        files = plan.files
        if not files:  # empty coverage: a view with the right columns and no rows
            files = [lt.schema_file]
            ranges = np.empty((0, 2), dtype=np.int64)
        q.define_relation(plan.relation, files, healpix_ranges=ranges, keys=keys or ())

    # ------------------------------------------------------------------ cones
    def cone(
        self,
        table: str,
        ra: float,
        dec: float,
        radius_deg: float,
        columns: list[str] | None = None,
        where: str | None = None,
        maxrec: int | None = None,
        timeout_s: float | None = None,
    ) -> QueryResult:
        """Rows of `table` within `radius_deg` of (ra, dec), exactly, nearest first, with `dist_deg`
        (degrees); `columns` (default: all) and an optional ADQL condition `where` on the table's
        columns. Without `where` the row groups are read directly (`dac_lake.cone`); with it, or for a
        cone too large for that, the ADQL path runs the same search in SQL."""
        t0 = time.perf_counter()
        lt = self.find_table(table)
        names = [c.name for c in lt.meta.columns]
        cols = list(columns) if columns else names
        fast = (
            where is None
            and lt.meta.ra_column is not None
            and lt.meta.dec_column is not None
            and 0 < float(radius_deg) <= 180
            and len(set(cols)) == len(cols)
            and set(cols) <= set(names)
            and "dist_deg" not in cols
        )
        if fast:
            limit = timeout_s or self.limits.timeout_s
            try:
                found = self.cones.read(lt, float(ra), float(dec), float(radius_deg), cols, t0 + limit)
            except TooLarge:
                found = None
            except TimeoutError:
                raise QueryTimeout(
                    f"the query ran longer than the {limit:g} s limit and was stopped; narrow it"
                ) from None
            if found is not None:
                return self._cone_result(lt, found, cols, maxrec, t0)
        return self.adql(
            cone_adql(lt, ra, dec, radius_deg, columns, where), maxrec=maxrec, timeout_s=timeout_s
        )

    def _cone_result(
        self, lt: LakeTable, found, cols: list[str], maxrec: int | None, t0: float
    ) -> QueryResult:
        order = np.argsort(found.dist, kind="stable")
        overflow = maxrec is not None and len(order) > maxrec
        if overflow:
            order = order[:maxrec]
        picked = found.table.take(pa.array(order, type=pa.int64()))
        # as DuckDB returns them: no Parquet field metadata, every column nullable, 32-bit string offsets
        arrays, fields = [], []
        for f, col in zip(picked.schema, picked.columns, strict=True):
            kind = _DUCKDB_ARROW_TYPES.get(f.type, f.type)
            arrays.append(col if kind == f.type else col.cast(kind))
            fields.append(pa.field(f.name, kind))
        arrays.append(pa.array(found.dist[order]))
        fields.append(pa.field("dist_deg", pa.float64()))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        meta = {c.name: c for c in lt.meta.columns}
        columns = [
            OutputColumn(c, meta[c].datatype, meta[c].unit, meta[c].ucd, meta[c].description) for c in cols
        ]
        columns.append(OutputColumn("dist_deg", "float64", "deg"))
        scan = ScanPlan("cone", lt.qualified_name, found.files, found.total_files, found.ranges)
        seconds = time.perf_counter() - t0
        profile = {
            "path": "cone: row groups read with pyarrow, no SQL",
            "rows_returned": table.num_rows,
            "truncated": overflow,
            "complete": True,
            "elapsed_s": round(seconds, 6),
            "row_groups_read": sum(len(v) for v in found.row_groups.values()),
            "rows_in_row_groups_read": found.rows_read,
            "io": {
                "files_read": len(found.row_groups),
                "bytes_read": found.bytes_read,
                "files": {p: {"row_groups": rgs} for p, rgs in found.row_groups.items()},
            },
        }
        log.info(
            "cone: %d rows in %.4f s; %s files %d/%d, %d row groups (%d rows) read",
            table.num_rows,
            seconds,
            lt.qualified_name,
            len(found.files),
            found.total_files,
            profile["row_groups_read"],
            found.rows_read,
        )
        return QueryResult(table, columns, overflow, "", [scan], profile, seconds)


class QueryStream:
    """A running query's result as Arrow record batches (iterate it, or use it as a context manager).

    At most `maxrec` rows are yielded; `overflow` becomes true once the row beyond `maxrec` was seen, i.e.
    it is final when the iteration has ended (TAP writes its OVERFLOW marker after the table). Closing it
    (or reaching its end) gives the query's connection back to the engine's database.
    """

    def __init__(
        self,
        engine: QueryEngine,
        translation: Translation,
        query: SandboxQuery,
        reader: pa.RecordBatchReader,
        scans: list[ScanPlan],
        notes: list[dict],
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
        self._engine = engine
        self._query = query
        self._reader = reader
        self._notes = notes
        self._control = control
        self._started = started
        self._closed = False
        self.log_level = logging.INFO  # the one-machine type probe of a distributed query logs at DEBUG

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
        except (SandboxError, QueryTimeout) as exc:
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
        if self._control is not None:
            self._control._bind(None)
        try:
            self.profile = self._engine._finish(
                self._query, self.scans, self._notes, self.rows, self._started, self.log_level
            )
        finally:
            self._query.close()
        self.seconds = time.perf_counter() - self._started

    def explain(self) -> dict:
        return QueryResult(
            pa.table({}), self.columns, self.overflow, self.sql, self.scans, self.profile, self.seconds
        ).explain()


def cone_adql(
    lt: LakeTable, ra: float, dec: float, radius_deg: float, columns: list[str] | None, where: str | None
) -> str:
    """The cone as ADQL (the SQL path of `QueryEngine.cone`): identifiers quoted, numbers as Python float
    literals, the optional condition parenthesised."""
    ra_c, dec_c = _adql_ident(lt.meta.ra_column), _adql_ident(lt.meta.dec_column)
    cols = ", ".join(_adql_ident(c) for c in columns) if columns else "*"
    centre = f"POINT('ICRS', {float(ra)!r}, {float(dec)!r})"
    return (
        f"SELECT {cols}, DISTANCE(POINT('ICRS', {ra_c}, {dec_c}), {centre}) AS dist_deg "
        f"FROM {_adql_ident(lt.meta.schema)}.{_adql_ident(lt.meta.name)} "
        f"WHERE 1 = CONTAINS(POINT('ICRS', {ra_c}, {dec_c}), "
        f"CIRCLE('ICRS', {float(ra)!r}, {float(dec)!r}, {float(radius_deg)!r}))"
        + (f" AND ({where})" if where else "")
        + " ORDER BY dist_deg"
    )


def _adql_ident(name: str | None) -> str:
    if not name:
        raise AdqlUnknownTable("this table has no RA/Dec columns")
    return '"' + name.replace('"', '""') + '"'
