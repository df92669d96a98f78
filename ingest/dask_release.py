"""`dac ingest release --dask tcp://HOST:PORT`: the heavy steps of a release ingest on Dask distributed.

Why a separate module: `ingest.release` keeps the order of work that makes an ingest safe (check, claim,
write, validate, publish) and `ingest.hats_writer` the pure per-file steps; this module only decides
*where* those steps run (lsdb's split of core / dask / io). Nothing here re-implements a partitioning,
sorting or encoding rule, so a release written by the cluster has the same pixels, rows, row order and
files as one written locally.

The task graph, a map / shuffle / reduce in the manner of hats-import:
1. `read_part` (one task per input file): read, conform, compute `_healpix_29`, sort the file by it;
   `part_summary` sends the driver only a sparse histogram, counts and a sample of ids.
2. The driver sums the histograms and plans the partitions with `healpix.plan_partitions` (as locally).
   Ids are checked for uniqueness in id ranges (`split_ids` -> `check_id_bucket`), never gathered in one
   place; the ranges are sorted, so they also give the id index in its global order.
3. After the release prefix is claimed, partitions are taken in runs of consecutive pixels (`plan_groups`:
   a few per worker, at most GROUP_MAX_ROWS rows, so the shuffle is files x groups pieces, not files x
   partitions); `split_part` cuts each sorted file into one slice per group (plus each partition's margin
   rows); `write_group` (one task per group) merges its pieces in input-file order, sorts stably by
   `_healpix_29` (= the local global stable sort) and writes each partition file and its margin file;
   `write_index_file` writes the id index files. Workers write straight to the lake.
4. The driver writes the small metadata (`_metadata`, partition_info, properties) from the files' footers
   with the same `HatsCollectionWriter.finish_*` code as the local path, then validates and publishes.

Workers reach the lake with their own settings (environment or config file): the graph carries the lake
URL, never credentials. Input and lake paths must be visible to every worker (one machine, a shared
filesystem, or s3://). Intermediate data lives in the workers' memory (Dask spills it to disk); a worker
that dies is replaced by Dask recomputing its tasks, a task that fails fails the ingest, which first
cancels and waits out every running task of its own so the cleanup of the prefix is not raced by a
late write.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dac_lake import healpix, layout
from dac_lake.catalog_def import CatalogDef
from dac_lake.lake import Lake, LakeError
from dac_lake.layout import pixel_file
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage
from ingest import hats_writer as hw
from ingest.conform import conform_table, duplicate_id_message, find_duplicate_ids
from ingest.readers import InputError, InputFile, expand_inputs, read_input
from ingest.release import _pause_point, _with_spatial_index

log = logging.getLogger(__name__)

#: rows per id range for the uniqueness check and the index (at least one range per worker)
ID_BUCKET_ROWS = 2_000_000
#: ids each file contributes to choosing the id ranges
ID_SAMPLE = 256
#: how long a failed ingest waits for its tasks still running on workers before removing the prefix
ABORT_WAIT_SECONDS = 120.0
#: rows per write task at most (several small partitions share one task; a big one has its own), and
#: at least this many write tasks per worker
GROUP_MAX_ROWS = 5_000_000
GROUPS_PER_WORKER = 4
CONNECT_TIMEOUT_SECONDS = 30.0


# ====================================================================== tasks (run on the workers)
@functools.lru_cache(maxsize=8)
def _worker_storage(lake_url: str) -> LakeStorage:
    """The lake as this worker's own settings reach it (credentials never travel in the task graph)."""
    return LakeStorage(lake_url, load_settings())


@dataclass
class FilePart:
    """One input file, read and conformed, kept in a worker's memory between tasks."""

    table: pa.Table  # `_healpix_29` first, the definition's columns, sorted (stably) by `_healpix_29`
    ids: pa.Table  # (id, _healpix_29) in the file's own row order: for the id check and the index
    row_numbers: np.ndarray  # 0-based input row of each `ids` row (error messages name it)
    skipped: int
    reasons: dict[str, int]


def read_part(lake_url: str, inp: InputFile, definition: CatalogDef, skip_bad_rows: bool) -> FilePart:
    storage = _worker_storage(lake_url)
    col_types = {c.name: c.arrow_type for c in definition.columns}
    raw = read_input(inp, storage, column_types=col_types)
    if raw.num_rows == 0:
        raise InputError(f"{inp.location}: the file holds no rows")
    res = conform_table(raw, definition, inp.location, skip_bad_rows)
    table = res.table.combine_chunks()
    ra = table.column(definition.ra_column).to_numpy().astype(np.float64, copy=False)
    dec = table.column(definition.dec_column).to_numpy().astype(np.float64, copy=False)
    hp29 = healpix.healpix29(ra, dec)
    order = np.argsort(hp29, kind="stable")
    ids = pa.table({"id": table.column(definition.id_column), "hp29": pa.array(hp29, type=pa.int64())})
    return FilePart(
        table=_with_spatial_index(table.take(order), hp29[order], definition),
        ids=ids,
        row_numbers=np.asarray(res.row_numbers),
        skipped=res.skipped_rows,
        reasons=dict(res.skipped_reasons),
    )


def part_summary(part: FilePart, highest_order: int) -> dict[str, Any]:
    """What the driver needs of a file to plan: its order-`highest_order` histogram (sparse) and counts."""
    hp29 = part.table.column(healpix.SPATIAL_INDEX_COLUMN).to_numpy()
    pixels, counts = np.unique(
        hp29 >> (2 * (healpix.SPATIAL_INDEX_ORDER - highest_order)), return_counts=True
    )
    ids = np.sort(part.ids.column("id").to_numpy(zero_copy_only=False))
    sample = ids[np.linspace(0, len(ids) - 1, min(len(ids), ID_SAMPLE)).astype(np.int64)] if len(ids) else ids
    return {
        "rows": part.table.num_rows,
        "skipped": part.skipped,
        "reasons": part.reasons,
        "pixels": pixels,
        "counts": counts,
        "id_sample": sample,
    }


def split_ids(part: FilePart, splits: np.ndarray) -> list[tuple[pa.Table, np.ndarray]]:
    """The file's (id, _healpix_29) rows cut into the id ranges bounded by `splits`, in file row order."""
    ids = part.ids.column("id").to_numpy(zero_copy_only=False)
    bucket = np.searchsorted(splits, ids, side="right") if len(splits) else np.zeros(len(ids), np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(len(splits) + 2))
    return [(part.ids.take(order[a:b]), part.row_numbers[order[a:b]]) for a, b in itertools.pairwise(bounds)]


@dataclass
class IdBucket:
    """One id range over all files, sorted by id; `duplicate` names the first repeated id, if any."""

    table: pa.Table  # (id, hp29) sorted by id
    duplicates: int
    duplicate: tuple[Any, tuple[int, int], tuple[int, int]] | None  # (id, (file, row), (file, row))


def check_id_bucket(pieces: list[tuple[pa.Table, np.ndarray]]) -> IdBucket:
    """Concatenate one id range's pieces in input-file order and apply the local uniqueness rule."""
    table = pa.concat_tables([t for t, _ in pieces]).combine_chunks()
    sources = np.repeat(np.arange(len(pieces)), [t.num_rows for t, _ in pieces])
    rows = np.concatenate([r for _, r in pieces]) if pieces else np.empty(0, np.int64)
    ids = table.column("id").to_numpy(zero_copy_only=False)
    count, first = find_duplicate_ids(ids)
    duplicate = None
    if first is not None:
        a, b = first
        value = ids[a].item() if hasattr(ids[a], "item") else ids[a]
        duplicate = (value, (int(sources[a]), int(rows[a])), (int(sources[b]), int(rows[b])))
    order = np.argsort(ids, kind="stable")
    return IdBucket(table.take(order), count, duplicate)


def bucket_info(bucket: IdBucket) -> tuple[int, int, Any]:
    return bucket.table.num_rows, bucket.duplicates, bucket.duplicate


def split_spec(plan: list, margin_order: int | None, groups: list) -> tuple[list, list | None, list]:
    """What `split_part` needs: the plan, each partition's margin `_healpix_29` ranges (None: no margin)
    and the write groups."""
    ranges = None
    if margin_order is not None:
        ranges = [healpix.margin_ranges29(o, p, margin_order) for o, p, _ in plan]
    return plan, ranges, groups


def split_part(part: FilePart, spec: tuple[list, list | None, list]) -> list[tuple]:
    """Per group of partitions: this file's rows in the group (one slice: a group is a run of partitions
    in nested order, hence one `_healpix_29` range) and, per partition, its margin rows (None if none)."""
    plan, margin_ranges, groups = spec
    hp29 = part.table.column(healpix.SPATIAL_INDEX_COLUMN).to_numpy()
    out = []
    for members in groups:
        lo = healpix.pixel_range29(*plan[members[0]][:2])[0]
        hi = healpix.pixel_range29(*plan[members[-1]][:2])[1]
        start, stop = np.searchsorted(hp29, [lo, hi])
        main = part.table.slice(start, stop - start) if stop > start else None
        margins = [
            hw.margin_slice(part.table, hp29, margin_ranges[j]) if margin_ranges is not None else None
            for j in members
        ]
        out.append((main, margins))
    return out


def _merge_sorted(pieces: list[pa.Table]) -> pa.Table:
    """Pieces (each sorted by `_healpix_29`, in input-file order) -> one table in the local run's order:
    a stable sort keeps ties in file order, then in each file's own order, as the local global sort does."""
    table = pa.concat_tables(pieces)
    if len(pieces) > 1:
        order = np.argsort(table.column(healpix.SPATIAL_INDEX_COLUMN).to_numpy(), kind="stable")
        table = table.take(order)
    return table.combine_chunks()


@dataclass
class PartitionWritten:
    main: tuple[pq.FileMetaData, int]
    margin: tuple[pq.FileMetaData, int] | None
    worker: str


def _check_claim(storage: LakeStorage, marker_key: str) -> None:
    """A task of an abandoned ingest (prefix already removed) must not write into the lake again."""
    if not storage.exists(marker_key):
        raise LakeError(f"{marker_key} is gone: the ingest this task belongs to was abandoned")


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def write_group(
    lake_url: str,
    cat_dir: str,
    margin_dir: str | None,
    partitions: list[tuple[int, int]],
    pieces: list[tuple],
    compression_level: int,
    marker_key: str,
) -> list[PartitionWritten]:
    """Write a group's partition files (and margin files) from its pieces of every input file."""
    _pause_point("dask-partition")
    storage = _worker_storage(lake_url)
    _check_claim(storage, marker_key)
    rows = _merge_sorted([m for m, _ in pieces if m is not None])
    hp29 = rows.column(healpix.SPATIAL_INDEX_COLUMN).to_numpy()
    kwargs = hw.partition_write_kwargs(rows.schema, compression_level)
    worker = _worker_name()
    out = []
    for j, (order, pixel) in enumerate(partitions):
        rel = pixel_file(order, pixel)
        main = hw.partition_slice(rows, hp29, order, pixel)
        md = hw.write_parquet(storage, f"{cat_dir}/dataset/{rel}", main, kwargs)
        margin = None
        margin_pieces = [margins[j] for _, margins in pieces if margins[j] is not None]
        if margin_dir is not None and margin_pieces:
            part = _merge_sorted(margin_pieces)
            margin = (hw.write_parquet(storage, f"{margin_dir}/dataset/{rel}", part, kwargs), part.num_rows)
        out.append(PartitionWritten((md, main.num_rows), margin, worker))
    return out


def plan_groups(plan: list[tuple[int, int, int]], max_rows: int) -> list[list[int]]:
    """Runs of consecutive partitions (nested order) of at most `max_rows` rows (a partition larger than
    that is a group of its own). One write task per group keeps the shuffle at files x groups pieces."""
    groups: list[list[int]] = []
    rows = 0
    for j, (_, _, n) in enumerate(plan):
        if groups and rows + n <= max_rows:
            groups[-1].append(j)
            rows += n
        else:
            groups.append([j])
            rows = n
    return groups


def write_index_file(
    lake_url: str,
    index_dir: str,
    number: int,
    buckets: list[IdBucket],
    ranges: list[tuple[int, int]],
    partition_starts: np.ndarray,
    plan_orders: np.ndarray,
    plan_pixels: np.ndarray,
    id_column: str,
    compression_level: int,
    marker_key: str,
) -> tuple[str, pq.FileMetaData, pa.Schema]:
    """Index file `number`: rows [lo, hi) of each id range given, with each row's partition."""
    storage = _worker_storage(lake_url)
    _check_claim(storage, marker_key)
    table = pa.concat_tables(
        [b.table.slice(lo, hi - lo) for b, (lo, hi) in zip(buckets, ranges, strict=True)]
    )
    hp29 = table.column("hp29").to_numpy()
    which = np.searchsorted(partition_starts, hp29, side="right") - 1
    index = hw.index_table(table.column("id"), plan_orders[which], plan_pixels[which], id_column)
    rel = hw.index_file_rel(number)
    md = hw.write_parquet(
        storage,
        f"{index_dir}/dataset/{rel}",
        index,
        hw.index_write_kwargs(index.schema, id_column, compression_level),
    )
    return rel, md, index.schema


def _busy_keys(prefix: str, dask_worker=None) -> list[str]:
    """Keys of ours a worker is still executing (cancelled ones included: their thread runs on)."""
    busy = {"executing", "long-running", "cancelled", "resumed"}
    return [
        str(k) for k, ts in dask_worker.state.tasks.items() if str(k).startswith(prefix) and ts.state in busy
    ]


# ====================================================================== the driver
class DaskIngest:
    """A connection to the scheduler for one ingest, and every future it submitted (to cancel on failure)."""

    def __init__(self, lake: Lake, options, progress):
        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover - distributed is a dependency
            raise LakeError("--dask needs the `distributed` package: pip install distributed") from exc
        self.lake = lake
        self.options = options
        self.progress = progress
        self.address = options.dask_address
        try:
            self.client = Client(self.address, timeout=CONNECT_TIMEOUT_SECONDS, set_as_default=False)
        except OSError as exc:
            raise LakeError(f"cannot reach the Dask scheduler at {self.address}: {exc}") from None
        try:
            self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_SECONDS)
        except TimeoutError:
            self.client.close()
            raise LakeError(f"the Dask scheduler at {self.address} has no workers") from None
        self.workers = sorted(self.client.nthreads())
        self.n_workers = len(self.workers)
        self.tag = f"dac-ingest-{uuid.uuid4().hex[:12]}"
        self.futures: list = []
        log.info("ingest on Dask %s: %d worker(s)", self.address, self.n_workers)

    def __enter__(self) -> DaskIngest:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.abort()
        self.client.close()

    def submit(self, name: str, fn, *args):
        """Submit a task of this ingest; Dask deals the reads and writes out to idle workers as they come.

        Why no worker restrictions, not even loose ones: when every worker of the cluster dies (the only
        worker, killed by its nanny for memory), Dask parks restricted tasks as `no-worker` and, when the
        restarted worker joins under a new address, schedules only tasks whose restrictions it meets,
        ignoring `allow_other_workers` (distributed 2026.8, Scheduler.
        bulk_schedule_unrunnable_after_adding_worker): the ingest then waits forever (seen in bench/scale).
        """
        fut = self.client.submit(fn, *args, key=f"{self.tag}-{name}", pure=False)
        self.futures.append(fut)
        return fut

    def abort(self) -> None:
        """Cancel every task of this ingest and wait until no worker still runs one, so that removing
        the release prefix afterwards is final."""
        if not self.futures:
            return
        self.client.cancel(self.futures, force=True)
        self.futures = []
        deadline = time.monotonic() + ABORT_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                busy = self.client.run(_busy_keys, self.tag, on_error="ignore")
            except Exception as exc:  # the cluster itself is gone: nothing of ours can run any more
                log.warning("cannot ask the Dask workers what they run: %s", exc)
                return
            if not any(isinstance(v, list) and v for v in busy.values()):
                return
            time.sleep(0.2)
        log.warning("tasks of the failed ingest still run after %.0f s", ABORT_WAIT_SECONDS)

    def gather_in_order(
        self, futures: list, stage: str | None = None, weights: list[int] | None = None
    ) -> list:
        """Results in submission order (so the first failing input is reported, as locally), reporting
        progress as tasks complete (a task counts `weights[i]` items: the partitions of a group)."""
        from distributed import as_completed

        weight = dict(zip(futures, weights or [1] * len(futures), strict=True))
        total, done = sum(weight.values()), 0
        if stage:
            self.progress(stage, 0, total)
        for fut in as_completed(futures, loop=self.client.loop):
            if fut.status == "error":
                break
            done += weight[fut]
            if stage:
                self.progress(stage, done, total)
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ step 1: read, check, plan
    def prepare(self, inputs: list[str], definition: CatalogDef) -> DaskPrepared:
        opts = self.options
        url = self.lake.storage.url
        files = expand_inputs(inputs, self.lake.storage)
        file_names = [f.location for f in files]
        parts = [
            self.submit(f"read-{i}", read_part, url, f, definition, opts.skip_bad_rows)
            for i, f in enumerate(files)
        ]
        summaries = self.gather_in_order(
            [self.submit(f"summary-{i}", part_summary, p, opts.highest_order) for i, p in enumerate(parts)],
            "read",
        )
        total = sum(s["rows"] for s in summaries)
        if total == 0:
            raise InputError(f"no rows left to ingest from {', '.join(file_names)}")
        skipped = sum(s["skipped"] for s in summaries)
        reasons: Counter = Counter()
        for s in summaries:
            reasons.update(s["reasons"])

        # ids unique? checked per id range on the workers
        samples = [s["id_sample"] for s in summaries if len(s["id_sample"])]
        sample = np.sort(np.concatenate(samples))
        n_buckets = max(self.n_workers, -(-total // ID_BUCKET_ROWS))
        cut = np.linspace(0, len(sample) - 1, n_buckets + 1)[1:-1].astype(np.int64)
        splits = np.unique(sample[cut]) if len(cut) else sample[:0]
        id_splits = [self.submit(f"idsplit-{i}", split_ids, p, splits) for i, p in enumerate(parts)]
        buckets = []
        for k in range(len(splits) + 1):
            pieces = [self.submit(f"idpick-{k}-{i}", operator.getitem, s, k) for i, s in enumerate(id_splits)]
            buckets.append(self.submit(f"idcheck-{k}", check_id_bucket, pieces))
        infos = self.gather_in_order(
            [self.submit(f"idinfo-{k}", bucket_info, b) for k, b in enumerate(buckets)]
        )
        dups = sum(n for _, n, _ in infos)
        if dups:
            value, (fa, ra), (fb, rb) = next(d for _, n, d in infos if n)
            raise InputError(
                duplicate_id_message(
                    definition.id_column, value, (file_names[fa], ra), (file_names[fb], rb), dups
                )
            )

        counts = np.zeros(12 * 4**opts.highest_order, dtype=np.int64)
        for s in summaries:
            counts[s["pixels"]] += s["counts"]
        plan = healpix.plan_partitions(
            counts, opts.highest_order, opts.max_rows_per_partition, opts.lowest_order
        )
        self.progress("sort", 1, 1)
        empty = pa.schema([pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in definition.columns])
        schema = _with_spatial_index(empty.empty_table(), np.empty(0, np.int64), definition).schema
        return DaskPrepared(
            ingest=self,
            parts=parts,
            buckets=buckets,
            bucket_rows=[n for n, _, _ in infos],
            plan=plan,
            counts=counts,
            file_names=file_names,
            skipped=skipped,
            reasons=reasons,
            rows=total,
            schema=schema,
        )


@dataclass
class DaskPrepared:
    """The checked input of one ingest, held by the workers, and its partition plan."""

    ingest: DaskIngest
    parts: list
    buckets: list
    bucket_rows: list[int]
    plan: list[tuple[int, int, int]]
    counts: np.ndarray
    file_names: list[str]
    skipped: int
    reasons: Counter
    rows: int
    schema: pa.Schema
    written_by: Counter = field(default_factory=Counter)

    # ------------------------------------------------------------------ step 3: write on the workers
    def write(self, writer: hw.HatsCollectionWriter, prefix: str, definition: CatalogDef, options):
        try:
            return self._write(writer, prefix, definition, options)
        except BaseException:
            self.ingest.abort()
            raise

    def _write(self, writer: hw.HatsCollectionWriter, prefix: str, definition: CatalogDef, options):
        dk, plan = self.ingest, self.plan
        url = dk.lake.storage.url
        marker_key = f"{prefix}/{layout.INCOMPLETE_MARKER}"
        margin_dir = None
        margin_order = None
        if options.margin_arcsec > 0:
            margin_order = healpix.margin_order_for(options.margin_arcsec, max(o for o, _, _ in plan))
            margin_dir = writer.margin_dir(options.margin_arcsec)
        group_rows = min(GROUP_MAX_ROWS, -(-self.rows // (GROUPS_PER_WORKER * dk.n_workers)))
        groups = plan_groups(plan, max(group_rows, 1))
        # the margin ranges (megabytes for a large plan) are computed by a task, not shipped in the graph
        spec = dk.submit("plan", split_spec, plan, margin_order, groups)
        splits = [dk.submit(f"split-{i}", split_part, part, spec) for i, part in enumerate(self.parts)]
        writes = []
        for g, members in enumerate(groups):
            pieces = [dk.submit(f"pick-{g}-{i}", operator.getitem, s, g) for i, s in enumerate(splits)]
            writes.append(
                dk.submit(
                    f"write-{g}",
                    write_group,
                    url,
                    writer.catalog_dir(),
                    margin_dir,
                    [plan[j][:2] for j in members],
                    pieces,
                    options.compression_level,
                    marker_key,
                )
            )
        index_jobs = self._submit_index(writer, url, definition, options, marker_key)
        weights = [len(m) for m in groups]
        results = [r for rs in dk.gather_in_order(writes, "partitions", weights) for r in rs]
        self.written_by = Counter(r.worker for r in results)
        main = writer.finish_catalog(
            self.schema,
            plan,
            [r.main for r in results],
            self.rows,
            self.counts,
            options.highest_order,
            options.max_rows_per_partition,
            extra_properties={"obs_title": definition.title},
        )
        margin = None
        if margin_dir is not None:
            dk.progress("margin", 0, 1)
            margin = writer.finish_margin(
                self.schema, plan, [r.margin for r in results], options.margin_arcsec
            )
            dk.progress("margin", 1, 1)
        index_results = dk.gather_in_order(index_jobs, "index")
        index = writer.finish_index(
            index_results[0][2], [(rel, md) for rel, md, _ in index_results], self.rows
        )
        return main, margin, index

    def _submit_index(self, writer, url: str, definition: CatalogDef, options, marker_key: str) -> list:
        """One task per index file; file n holds the sorted ids [n*INDEX_FILE_ROWS, (n+1)*INDEX_FILE_ROWS),
        taken from the id ranges it overlaps."""
        plan = self.plan
        starts = np.array([healpix.pixel_range29(o, p)[0] for o, p, _ in plan], dtype=np.int64)
        orders = np.array([o for o, _, _ in plan], dtype=np.int64)
        pixels = np.array([p for _, p, _ in plan], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(self.bucket_rows)))
        jobs = []
        for lo in range(0, max(self.rows, 1), hw.INDEX_FILE_ROWS):
            hi = min(lo + hw.INDEX_FILE_ROWS, self.rows)
            chosen, ranges = [], []
            for k, bucket in enumerate(self.buckets):
                a, b = max(lo, offsets[k]), min(hi, offsets[k + 1])
                if a < b:
                    chosen.append(bucket)
                    ranges.append((int(a - offsets[k]), int(b - offsets[k])))
            number = lo // hw.INDEX_FILE_ROWS
            jobs.append(
                self.ingest.submit(
                    f"index-{number}",
                    write_index_file,
                    url,
                    writer.index_dir(),
                    number,
                    chosen,
                    ranges,
                    starts,
                    orders,
                    pixels,
                    definition.id_column,
                    options.compression_level,
                    marker_key,
                )
            )
        return jobs

    def executor_record(self) -> dict[str, Any]:
        """For the manifest: how the release was computed (not part of its data)."""
        return {
            "kind": "dask",
            "scheduler": self.ingest.address,
            "workers": self.ingest.n_workers,
            "partition_files_by_worker": dict(sorted(self.written_by.items())),
        }
