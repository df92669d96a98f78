"""Queries too big for one machine, run as per-partition tasks on a Dask distributed cluster.

An async TAP job whose lake scans exceed a configured number of rows (full-table scans of large tables,
all-sky cross-matches, large upload joins) is planned here instead of being run in the service process:

1. `split.split_query` cuts the generated SQL into a *partial* step, correct over any chunk of one table's
   rows (the split table), and a *final* step over the concatenated partial results (aggregates in two
   phases, ORDER BY / TOP merged, DISTINCT re-applied). The split table is the largest one the SQL allows
   (never the null-supplying side of an outer join, never inside an aggregate subquery).
2. `chunks` groups the split table's partitions (after HEALPix pruning) into compact patches of sky;
   a cross-matched table is limited per chunk to the chunk's margin of the match radius (a lake table by
   `_healpix_29` ranges, an uploaded table by slicing its rows); other tables are read whole by every task,
   so a plan that would read another large table in every task is refused.
3. One Dask task per chunk (`tasks.run_chunk`) runs the partial SQL with DuckDB inside the worker, in the
   same sandbox and engine as a local query, on the release (or alert snapshot) the driver planned.
4. The driver runs the final SQL over the partial results in a sandbox with no files, and casts the
   result to the types the same SQL gives on one machine (found by running it over empty relations), so
   TAP writes the same VOTable either way.

What does not fit (a reason is logged and shown in the job's progress) runs on one machine as before.
The driver holds the partial results in memory (each task returns at most TOP + OFFSET rows when the
query is ordered and limited, at most MAXREC + 1 otherwise).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from dac_lake.adql.model import OutputColumn, Translation
from dac_lake.coverage import partitions_touching
from dac_lake.distributed.chunks import (
    chunk_partitions,
    in_ranges,
    margin_ranges,
    merged_ranges,
    position_index,
)
from dac_lake.distributed.split import PARTIALS, NotDistributable, SplitQuery, split_query
from dac_lake.distributed.tasks import ChunkResult, run_chunk
from dac_lake.engine import MemoryTable, QueryCancelled, QueryControl, QueryEngine, ScanPlan
from dac_lake.registry import LakeTable
from dac_lake.sandbox import QueryTimeout, SandboxDatabase, SandboxLimits, first_line

log = logging.getLogger(__name__)

#: a query goes to the cluster when its lake scans hold at least this many rows
DEFAULT_MIN_ROWS = 50_000_000
#: rows of the split table per task (a partition larger than this is a task of its own)
DEFAULT_CHUNK_ROWS = 5_000_000
#: at least this many tasks per worker, so that a slow worker does not hold up the query
TASKS_PER_WORKER = 3
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass
class ChunkSpec:
    """One task: the split table's partitions, the ranges each lake table is limited to, and the slices of
    the uploaded tables cross-matched with the split one."""

    partitions: list[tuple[int, int, int]]
    restrict: dict[str, np.ndarray]
    memory: list[MemoryTable] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(int(p[2]) for p in self.partitions)


@dataclass
class DistributedPlan:
    translation: Translation  # as the translator gave it (its SQL is the one-machine query)
    split: SplitQuery
    partitioned: str  # relation of the split table
    pinned: dict[str, LakeTable]
    scans: dict[str, ScanPlan]
    chunks: list[ChunkSpec]
    broadcast: list[MemoryTable]  # in-memory tables every task gets whole
    rows: int  # rows the one-machine scans would read
    reference: pa.Schema | None = None  # the one-machine result's schema (DaskQueries.plan probes it)

    @property
    def partial(self) -> Translation:
        return replace(self.translation, sql=self.split.partial_sql)

    def describe(self) -> str:
        lt = self.pinned[self.partitioned]
        return (
            f"{len(self.chunks)} tasks over {sum(len(c.partitions) for c in self.chunks)} partitions of "
            f"{lt.qualified_name} ({self.split.kind} query, {self.rows:,} rows to scan)"
        )


def _partners(translation: Translation, relation: str) -> dict[str, float]:
    """Relations cross-matched with `relation` -> the largest radius (degrees) of their cross-matches."""
    out: dict[str, float] = {}
    for cm in translation.crossmatches:
        if relation in (cm.left, cm.right):
            other = cm.right if cm.left == relation else cm.left
            out[other] = max(out.get(other, 0.0), cm.radius_deg)
    return out


def _split_candidates(translation: Translation, plans: dict) -> list[str]:
    """Lake relations in the order to try splitting them. A table cross-matched with another lake table:
    the smaller first, as the tasks' anchors (each task builds the neighbour cells of its chunk, and
    reads the other, larger side only through the chunk's margin, row groups pruned: the work then
    totals what one machine does; splitting the larger side made the anchors 3x as many, measured on
    bench/scale). Otherwise the largest first (the most rows to spread)."""
    matched = [r for r in plans if any(p in plans for p in _partners(translation, r))]
    rest = [r for r in plans if r not in matched]
    return sorted(matched, key=lambda r: plans[r][1].rows) + sorted(rest, key=lambda r: -plans[r][1].rows)


def plan_distributed(
    engine: QueryEngine,
    translation: Translation,
    memory_tables: Sequence[MemoryTable] = (),
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    min_chunks: int | Callable[[], int] = 1,
) -> DistributedPlan | str:
    """How `translation` would run as tasks, or why it should not (a sentence). `min_chunks` may be a
    function (the cluster's size, asked only of a query big enough to go there)."""
    plans = engine.scan_plans(translation, memory_tables)
    if not plans:
        return "it reads no lake table"
    rows = sum(plan.rows for _, plan in plans.values())
    if rows < min_rows:
        return f"it scans {rows:,} rows, below the {min_rows:,} that go to the cluster"
    memory = {(m.meta.schema.lower(), m.meta.name.lower()): m for m in memory_tables}
    mem_refs: dict[str, MemoryTable] = {}
    uses: dict[tuple[str, str], int] = {}
    for ref in translation.table_refs:
        key = (ref.table.schema.lower(), ref.table.name.lower())
        if ref.relation not in plans and key in memory:
            mem_refs[ref.relation] = memory[key]
            uses[key] = uses.get(key, 0) + 1
    reasons = []
    for relation in _split_candidates(translation, plans):
        lt, scan = plans[relation]
        try:
            split = split_query(translation.sql, relation)
        except NotDistributable as exc:
            reasons.append(f"{lt.qualified_name} cannot be split: {exc}")
            continue
        partners = _partners(translation, relation)
        heavy = [
            plans[r][0].qualified_name
            for r in plans
            if r != relation and r not in partners and plans[r][1].rows > chunk_rows
        ]
        if heavy:
            reasons.append(
                f"splitting {lt.qualified_name} would read all of {', '.join(heavy)} in every task "
                "(only a positional cross-match limits the other side to a task's sky)"
            )
            continue
        partitions = list(lt.manifest["partitions"])
        if scan.ranges is not None:
            partitions = partitions_touching(partitions, scan.ranges)
        if len(partitions) < 2:
            reasons.append(f"{lt.qualified_name}: the query touches {len(partitions)} partition(s)")
            continue
        if callable(min_chunks):
            min_chunks = min_chunks()
        groups = chunk_partitions(partitions, chunk_rows, min_chunks)
        sliced: dict[str, float] = {
            rel: radius
            for rel, radius in partners.items()
            if rel in mem_refs
            and mem_refs[rel].meta.ra_column
            and mem_refs[rel].meta.dec_column
            and uses[(mem_refs[rel].meta.schema.lower(), mem_refs[rel].meta.name.lower())] == 1
        }
        index = {
            rel: position_index(
                mem_refs[rel].table.column(mem_refs[rel].meta.ra_column).to_numpy(zero_copy_only=False),
                mem_refs[rel].table.column(mem_refs[rel].meta.dec_column).to_numpy(zero_copy_only=False),
            )
            for rel in sliced
        }
        chunks = []
        for group in groups:
            restrict = {relation: merged_ranges(group)}
            pieces = []
            for other, radius in partners.items():
                margin = margin_ranges(group, radius)
                if other in plans:
                    if margin is not None:
                        restrict[other] = margin
                elif other in sliced:
                    m = mem_refs[other]
                    keep = in_ranges(index[other], margin)
                    pieces.append(MemoryTable(m.meta, m.table.filter(pa.array(keep))))
            chunks.append(ChunkSpec(group, restrict, pieces))
        sliced_meta = {mem_refs[rel].meta for rel in sliced}
        broadcast = [m for m in {id(m): m for m in mem_refs.values()}.values() if m.meta not in sliced_meta]
        return DistributedPlan(
            translation=translation,
            split=split,
            partitioned=relation,
            pinned={rel: lt for rel, (lt, _) in plans.items()},
            scans={rel: plan for rel, (_, plan) in plans.items()},
            chunks=chunks,
            broadcast=broadcast,
            rows=rows,
        )
    return "; ".join(reasons)


class DaskQueries:
    """The service's link to a Dask cluster for big async queries (one per service process).

    The client connects on first use and reconnects after the scheduler went away; a job that cannot reach
    the cluster fails with a message saying so (it is not silently run on the API node, whose memory and
    cores were not sized for it)."""

    def __init__(
        self,
        address: str,
        lake_url: str,
        *,
        min_rows: int = DEFAULT_MIN_ROWS,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        limits: SandboxLimits | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ):
        self.address = address
        self.connect_timeout = connect_timeout
        self.lake_url = lake_url
        self.min_rows = min_rows
        self.chunk_rows = chunk_rows
        self.limits = limits or SandboxLimits()
        self._client = None
        self._lock = threading.Lock()
        self._final_db: SandboxDatabase | None = None

    def client(self):
        from distributed import Client

        with self._lock:
            client = self._client
            if client is None or client.status not in ("running", "connecting"):
                if client is not None:
                    client.close()
                try:
                    client = Client(self.address, timeout=self.connect_timeout, set_as_default=False)
                except OSError as exc:
                    raise QueryUnavailable(
                        f"the query is too large for the service and the Dask cluster at {self.address} "
                        f"cannot be reached ({exc}); try again later or ask the DAC's operators"
                    ) from exc
                self._client = client
            return client

    def workers(self) -> int:
        return max(1, len(self.client().scheduler_info(n_workers=-1).get("workers", {})))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            db, self._final_db = self._final_db, None
        if client is not None:
            client.close()
        if db is not None:
            db.close()

    # ------------------------------------------------------------------ planning
    def plan(
        self, engine: QueryEngine, translation: Translation, memory_tables: Sequence[MemoryTable] = ()
    ) -> DistributedPlan | str:
        """A plan for the cluster, or the reason the query stays on one machine. The plan is probed on
        empty relations first (the original SQL for its result types, then the partial and the final
        steps): a split that DuckDB cannot bind (e.g. SUM over a type only AVG takes) stays local."""
        plan = plan_distributed(
            engine,
            translation,
            memory_tables,
            min_rows=self.min_rows,
            chunk_rows=self.chunk_rows,
            min_chunks=lambda: TASKS_PER_WORKER * self.workers(),
        )
        if isinstance(plan, str):
            return plan
        plan.reference = _empty_result(engine, translation, memory_tables).schema
        try:
            partial = _empty_result(engine, plan.partial, memory_tables)
            self._final(plan, [partial], plan.reference, self.limits.timeout_s)
        except Exception as exc:  # any failure of the probe means: run it locally
            log.warning("the split of this query does not run (%s); it stays on one machine", exc)
            return f"its split does not run in DuckDB ({first_line(exc)})"
        return plan

    # ------------------------------------------------------------------ running
    def run(
        self,
        engine: QueryEngine,
        plan: DistributedPlan,
        memory_tables: Sequence[MemoryTable] = (),
        *,
        maxrec: int | None,
        timeout_s: float,
        control: QueryControl | None = None,
    ) -> DistributedStream:
        """Run the plan's tasks, combine their results; raises QueryTimeout / QueryCancelled like a
        local query. The returned stream holds the (final, small) result."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        reference = plan.reference
        if reference is None:
            reference = _empty_result(engine, plan.translation, memory_tables).schema
        t_reference = time.perf_counter()
        client = self.client()
        control = control or QueryControl()
        control.tasks_total, control.tasks_done = len(plan.chunks), 0
        shared = client.scatter(
            [plan.partial, plan.pinned, plan.broadcast, engine.registry.groups], broadcast=True, hash=False
        )
        partial, pinned, broadcast, groups = shared
        run_id = uuid.uuid4().hex[:12]
        futures = [
            client.submit(
                _run_chunk,
                self.lake_url,
                groups,
                self.limits,
                partial,
                chunk.restrict,
                pinned,
                broadcast,
                chunk.memory,
                timeout_s,
                key=f"dac-query-{run_id}-{i}",
                pure=False,
                retries=1,
            )
            for i, chunk in enumerate(plan.chunks)
        ]
        control.on_cancel(lambda: client.cancel(futures))
        log.info("distributed query: %s on %s", plan.describe(), self.address)
        results: list[ChunkResult] = []
        try:
            results = self._gather(client, futures, plan, control, deadline, timeout_s)
        finally:
            client.cancel([f for f in futures if not f.done()])
        t_tasks = time.perf_counter()
        table = self._final(plan, [r.table for r in results], reference, timeout_s)
        seconds = time.perf_counter() - t0
        scans = _merged_scans(plan, results)
        profile = {
            "path": f"distributed on the Dask cluster at {self.address}: {plan.describe()}",
            "complete": True,
            "tasks": len(plan.chunks),
            "tasks_run": len(results),
            "workers": sorted({r.worker for r in results}),
            "rows_scanned": sum(r.rows_scanned for r in results),
            "partial_rows": sum(r.table.num_rows for r in results),
            "task_seconds": round(sum(r.seconds for r in results), 3),
            "elapsed_s": round(seconds, 4),
            "steps_s": {
                "reference_schema": round(t_reference - t0, 4),
                "tasks": round(t_tasks - t_reference, 4),
                "final": round(time.perf_counter() - t_tasks, 4),
            },
            "partial_sql": plan.split.partial_sql,
            "final_sql": plan.split.final_sql,
        }
        log.info(
            "distributed query: %d rows from %d tasks (%d partial rows) in %.2f s",
            table.num_rows,
            len(results),
            profile["partial_rows"],
            seconds,
        )
        return DistributedStream(plan, table, maxrec, scans, profile, t0)

    def _gather(
        self, client, futures, plan: DistributedPlan, control: QueryControl, deadline: float, limit: float
    ) -> list[ChunkResult]:
        results: list[ChunkResult] = []
        rows = 0
        stop = plan.split.early_stop_rows
        pending = list(futures)
        while pending:
            if control.cancelled:
                raise QueryCancelled("the query was cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueryTimeout(f"the query ran longer than the {limit:g} s limit and was stopped")
            batch = [f for f in pending if f.done()]
            if not batch:
                time.sleep(min(0.02, remaining))
                continue
            done = {id(f) for f in batch}
            pending = [f for f in pending if id(f) not in done]
            for future in batch:
                if future.status == "cancelled":
                    if control.cancelled:
                        raise QueryCancelled("the query was cancelled")
                    raise QueryUnavailable(
                        "a task of the query was cancelled by the Dask cluster; run it again"
                    )
                try:
                    result = future.result()
                except (QueryTimeout, QueryCancelled):
                    raise  # the query's own limits, as on one machine
                except Exception as exc:
                    # a worker that cannot read the lake, a worker Dask gave up on, ...: the operators'
                    # business (the worker's log has the traceback), not a bug in the caller's query
                    raise QueryUnavailable(
                        f"a task of the query failed on the Dask cluster ({type(exc).__name__}: "
                        f"{first_line(exc)}); try again later or ask the DAC's operators"
                    ) from exc
                results.append(result)
                rows += result.table.num_rows
                control.tasks_done = len(results)
            if stop is not None and rows >= stop:
                break
        return results

    def _final(
        self, plan: DistributedPlan, results: list[pa.Table], reference: pa.Schema, timeout_s: float
    ) -> pa.Table:
        """The final SQL over the concatenated partial results, cast to the one-machine types."""
        names = list(plan.split.partial_columns)
        pieces = []
        for table in results:
            if table.num_columns != len(names):
                raise RuntimeError(
                    f"a task returned {table.num_columns} columns, the split expects {len(names)}"
                )
            pieces.append(table.rename_columns(names))
        partials = pa.concat_tables(pieces, promote_options="permissive")
        with self._lock:
            db = self._final_db
            if db is None or db.closed:
                from dac_lake.storage import LakeStorage

                db = self._final_db = SandboxDatabase(
                    LakeStorage(self.lake_url), (), self.limits, connections=4, io_log=False
                )
        q = db.query(replace(self.limits, timeout_s=timeout_s))
        try:
            q.register_table(PARTIALS, partials)
            table = q.execute(plan.split.final_sql)
        finally:
            q.close()
        return _cast_to(table, reference)


class QueryUnavailable(RuntimeError):
    """The cluster a big query needs cannot be reached."""


def _run_chunk(lake_url, groups, limits, partial, restrict, pinned, broadcast, memory, timeout_s):
    """The task (a module-level function: Dask pickles it by reference)."""
    return run_chunk(lake_url, groups, limits, partial, restrict, pinned, [*broadcast, *memory], timeout_s)


def _empty_result(
    engine: QueryEngine, translation: Translation, memory_tables: Sequence[MemoryTable]
) -> pa.Table:
    """The (empty) result of `translation` over empty relations: the Arrow schema DuckDB gives it, found
    in a few ms without reading any row."""
    empty = {ref.relation: np.empty((0, 2), dtype=np.int64) for ref in translation.table_refs}
    tables = [MemoryTable(m.meta, m.table.slice(0, 0)) for m in memory_tables]
    stream = engine.stream_translation(
        translation, None, None, tables, restrict=empty, log_level=logging.DEBUG
    )
    with stream:
        batches = list(stream)
        return pa.Table.from_batches(batches, schema=stream.schema)


def _cast_to(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.num_columns != len(schema):
        raise RuntimeError(
            f"the final step gave {table.num_columns} columns, the query has {len(schema)}: a bug"
        )
    columns = []
    for col, f in zip(table.columns, schema, strict=True):
        columns.append(col if col.type == f.type else col.cast(f.type, safe=False))
    return pa.Table.from_arrays(columns, schema=schema)


def _merged_scans(plan: DistributedPlan, results: list[ChunkResult]) -> list[ScanPlan]:
    """What the tasks read, per relation (the query log's files and the job's profile)."""
    out = []
    for relation, scan in plan.scans.items():
        files = sorted({f for r in results for f in r.files.get(relation, ())})
        out.append(replace(scan, files=files, read_by="dask"))
    return out


class DistributedStream:
    """A distributed query's result with the interface of `dac_lake.engine.QueryStream` (the TAP writers
    and the query log take either)."""

    def __init__(
        self,
        plan: DistributedPlan,
        table: pa.Table,
        maxrec: int | None,
        scans: list[ScanPlan],
        profile: dict,
        started: float,
    ):
        self.translation = plan.translation
        self.columns: list[OutputColumn] = plan.translation.columns
        self.sql = plan.translation.sql
        self.schema = table.schema
        self.scans = scans
        self.maxrec = maxrec
        self.overflow = False
        self.rows = 0
        self.profile = profile
        self.seconds = 0.0
        self._table = table
        self._started = started

    def __enter__(self) -> DistributedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        table = self._table
        if self.maxrec is not None and table.num_rows > self.maxrec:
            table = table.slice(0, self.maxrec)
            self.overflow = True
        for batch in table.to_batches(max_chunksize=65_536):
            self.rows += batch.num_rows
            yield batch
        self.close()

    def close(self) -> None:
        self.seconds = time.perf_counter() - self._started
        self.profile["rows_returned"] = self.rows

    def explain(self) -> dict:
        return {"sql": self.sql, "seconds": round(self.seconds, 4), "profile": self.profile}
