"""`AlertLake`: an alert stream's tables in the lake, appended by atomic micro-batch commits.

One commit (`AlertLake.commit`) turns a decoded, normalised batch (detections, upper limits, alerts: the
pyarrow tables of the packet layer's contract) into new immutable files inside the HEALPix pixel folders of
each table and then publishes them all at once with ONE create-only, sequence-numbered snapshot object
(`dac_lake.alerts.snapshots`). Order of work, chosen so that a crash anywhere loses and duplicates nothing:

1. read the newest snapshot (cached between batches: a concurrent writer is caught by step 5 anyway);
2. drop what is already stored: a detection whose `detection_id`, an alert whose `alert_id`, an upper limit
   whose (object_id, mjd, band) is in the snapshot. Only the pixels near the batch's positions are looked
   at, and their key columns are kept in memory between batches (files are immutable, so a cache entry
   never goes stale). A re-delivered batch, or history detections repeated by later alerts, add nothing;
3. fold the new detections into the objects' rows (`dac_lake.alerts.objects.update_objects`);
4. write new files: one per table per touched pixel for detections, upper limits and alerts; for objects,
   copy-on-write per pixel (see below). Nothing existing is modified;
5. create snapshot N+1 (create-only): the commit point. It carries the source position (Kafka offsets per
   partition, or the position in a replayed file) so the ingest resumes exactly after the last committed
   packet, and the batch id. A second writer racing for N+1 gets `CommitConflict`;
6. refresh the HATS metadata (hats.properties, partition_info.csv) for outside readers.
Files written by a commit that never reached step 5 are orphans: never read, removed by `gc()`.

**Objects are copy-on-write per pixel.** An object's row changes with every detection, but files are
immutable. The alternative - append the new row and keep a "superseded" list in the snapshot - would make
every reader (our engine, TAP, lsdb) apply an anti-join to see one row per object. Rewriting the touched
pixels' objects file instead keeps the snapshot a plain file list: exactly one row per object for any reader
of the snapshot, and one file per pixel, whatever the number of batches (no compaction needed). The cost is
bounded by the objects of the touched pixels: a batch covers a few survey fields (a Rubin visit is ~5
order-5 pixels, a ZTF exposure ~20), and a pixel's objects are kept in memory between batches.

**What an outside HATS reader sees** (hats/lsdb list a pixel directory, `hats_npix_suffix=/`; they do not
read snapshots): every committed row, plus, transiently, (a) the files of a batch being committed - between
step 4 and 5, in pixels already listed in partition_info.csv - or orphans of a crashed commit until gc;
(b) files superseded by compaction or by an objects rewrite, until gc removes them after its grace period
(so lsdb may see an object twice, or a detection twice, for that long). hats.properties' `hats_nrows` and
partition_info.csv are rewritten just after each snapshot. Readers that need exact snapshots use the query
engine (TAP, `dac_lake.connect`), which reads the snapshot's file list only.

Positions and the lookup radius: a detection is partitioned on its own position, an object on its mean
position, an upper limit on its object's mean position when stored. The look-up of stored rows covers the
order-11 HEALPix cells (~1.7') around each position of the batch and their neighbours, so an object's
previous row is found as long as its mean moved less than ~30" (association radii are ~1.5").

**Mixed orders.** Compaction may split a crowded partition into its children at finer orders
(`dac_lake.alerts.compaction`); each table's snapshot state records which partitions were split. Every row
of a batch is routed to the leaf partition of its `_healpix_29` (`TableState.route`), and the look-ups map
the order-11 cells above to the leaves that contain them, so stored rows are found wherever they now live.
A commit whose snapshot predates a split of a partition it writes to is not re-applied on top of it (its
files sit at the old partitioning): it raises `PartitionsChanged` internally and runs again from the new
snapshot, which re-reads, de-duplicates and routes the batch afresh (`commit(retries=...)`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dac_lake import healpix
from dac_lake.alerts import layout as alayout
from dac_lake.alerts.objects import update_objects
from dac_lake.alerts.snapshots import (
    AlertLakeError,
    CommitConflict,
    FileEntry,
    PartitionsChanged,
    Snapshot,
    SnapshotStore,
    StreamConfig,
    TableState,
    read_stream_config,
    recent_batches,
    writer_id,
)
from dac_lake.catalog_def import CatalogDef, catalogs_dir, load_definition
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

HP = healpix.SPATIAL_INDEX_COLUMN
#: HEALPix order of the cells whose neighbours bound the look-up of stored rows (cells ~1.7' wide)
NEIGHBOURHOOD_ORDER = 11
#: zstd level of batch files: fast to write; compaction rewrites with `COMPACT_COMPRESSION_LEVEL`
BATCH_COMPRESSION_LEVEL = 3
COMPACT_COMPRESSION_LEVEL = 9
ROW_GROUP_ROWS = 100_000
DEFAULT_CACHE_BYTES = 1 << 30
#: a commit whose files are older than this when it publishes refuses to (gc may have taken them)
MAX_COMMIT_SECONDS = 600.0
#: a writer re-reads the newest snapshot when its copy is older than this: another process's compaction
#: and gc may have replaced files it would otherwise look up (a conflict is caught anyway at publication)
SNAPSHOT_MAX_AGE = 60.0

#: the packet layer's contract: columns and types of the tables handed to `commit`
CONTRACT: dict[str, dict[str, pa.DataType]] = {
    alayout.DETECTIONS: {
        "detection_id": pa.int64(),
        "object_id": pa.string(),
        "alert_id": pa.int64(),
        "ra": pa.float64(),
        "dec": pa.float64(),
        "mjd": pa.float64(),
        "band": pa.string(),
        "mag": pa.float32(),
        "mag_err": pa.float32(),
        "flux": pa.float32(),
        "flux_err": pa.float32(),
        "is_positive": pa.bool_(),
        "reliability": pa.float32(),
        "is_history": pa.bool_(),
        "survey": pa.string(),
        "schema_version": pa.string(),
    },
    alayout.UPPER_LIMITS: {
        "object_id": pa.string(),
        "mjd": pa.float64(),
        "band": pa.string(),
        "limiting_mag": pa.float32(),
    },
    alayout.ALERTS: {
        "alert_id": pa.int64(),
        "object_id": pa.string(),
        "mjd": pa.float64(),
        "ra": pa.float64(),
        "dec": pa.float64(),
        "band": pa.string(),
        "mag": pa.float32(),
        "survey": pa.string(),
    },
}
#: the unique key of each table (upper limits: a composite key, see `_ul_keys`)
KEYS = {alayout.DETECTIONS: "detection_id", alayout.ALERTS: "alert_id", alayout.OBJECTS: "object_id"}


@dataclass
class CommitResult:
    """What one commit did."""

    stream: str
    batch_id: str
    seq: int
    skipped: bool = False  # the batch id was already committed: nothing written
    rows_in: dict[str, int] = field(default_factory=dict)
    rows_new: dict[str, int] = field(default_factory=dict)
    objects_new: int = 0
    objects_updated: int = 0
    files_written: int = 0
    pixels: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    #: the batch's rows as committed (new detections; objects it created or updated, with their new
    #: aggregates): what the broker matches and filters, without reading the files back. None if skipped.
    detections: pa.Table | None = field(default=None, repr=False)
    objects: pa.Table | None = field(default=None, repr=False)
    #: ids of the objects this batch created (first seen): what context matching runs on
    first_seen: pa.Array | None = field(default=None, repr=False)


def load_table_definitions(directory: str | Path | None = None) -> dict[str, CatalogDef]:
    """The column definitions of the alert tables: `catalogs/alerts_<table>.yaml`."""
    folder = Path(directory) if directory else catalogs_dir()
    return {t: load_definition(folder / f"alerts_{t}.yaml") for t in alayout.TABLES}


def table_schema(definition: CatalogDef | Mapping[str, Any]) -> pa.Schema:
    """Arrow schema of a table's files: `_healpix_29` first, then the definition's columns with their
    metadata (unit, UCD, description) in the field metadata, as release files have them."""
    d = definition if isinstance(definition, CatalogDef) else CatalogDef.from_dict(dict(definition))
    fields = [pa.field(HP, pa.int64(), nullable=False)]
    for col in d.columns:
        fields.append(
            pa.field(col.name, col.arrow_type, nullable=col.nullable, metadata=col.field_metadata())
        )
    return pa.schema(fields, metadata={b"dac_lake.catalog": d.to_json().encode()})


def neighbourhood_cells(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """The `_healpix_29` start of each order-11 cell within reach of any of the positions: each position's
    cell and its 8 neighbours. Cheap (one unique and one vectorised neighbour look-up) and a superset of the
    sky within ~30 arcsec of a position. `TableState.route` maps them to the partitions to look in: an
    order-11 cell lies inside exactly one partition, whatever the partition's order (at most 10)."""
    from cdshealpix.nested import neighbours

    if len(ra) == 0:
        return np.empty(0, dtype=np.int64)
    hp29 = healpix.healpix29(np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64))
    cells = np.unique(hp29 >> (2 * (healpix.SPATIAL_INDEX_ORDER - NEIGHBOURHOOD_ORDER)))
    around = np.asarray(neighbours(cells.astype(np.uint64), NEIGHBOURHOOD_ORDER)).astype(np.int64).ravel()
    around = np.unique(np.concatenate([cells, around[around >= 0]]))
    return around << (2 * (healpix.SPATIAL_INDEX_ORDER - NEIGHBOURHOOD_ORDER))


def near_partitions(snap: Snapshot, table: str, cells: np.ndarray) -> list[int]:
    """The partition keys of `table` in `snap` that contain any of `cells` (from `neighbourhood_cells`)."""
    return [int(k) for k in np.unique(snap.route(table, cells))]


def conform_input(
    table: pa.Table | None, name: str, optional: Mapping[str, pa.DataType] | None = None
) -> pa.Table:
    """Check a table of the packet layer against the contract and cast it to the contract's types. Columns
    in `optional` (an alert's context columns the table definition has) are kept when present and null
    otherwise; any other column is dropped; a missing contract column is an error."""
    contract = CONTRACT[name]
    optional = {k: v for k, v in (optional or {}).items() if k not in contract}
    if table is None:
        return pa.schema(list(contract.items()) + list(optional.items())).empty_table()
    missing = [c for c in contract if c not in table.column_names]
    if missing:
        raise AlertLakeError(f"{name}: the batch lacks the column(s) {', '.join(missing)} of the contract")
    try:
        columns = [table.column(c).cast(t) for c, t in contract.items()]
        for c, t in optional.items():
            columns.append(table.column(c).cast(t) if c in table.column_names else pa.nulls(len(table), t))
        return pa.Table.from_arrays(columns, names=list(contract) + list(optional)).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise AlertLakeError(f"{name}: a column does not have the contract's type: {exc}") from None


def _ul_keys(table: pa.Table) -> pa.Array:
    """The composite key of upper limits, (object_id, mjd, band), as one string per row. Arrow's
    float-to-string cast is the shortest round-trip form, so equal keys give equal strings."""
    if table.num_rows == 0:
        return pa.array([], type=pa.large_string())
    keys = pc.binary_join_element_wise(
        table.column("object_id").cast(pa.large_string()),
        pc.cast(table.column("mjd"), pa.large_string()),
        table.column("band").cast(pa.large_string()),
        pa.scalar("|", pa.large_string()),
    )
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def _first_occurrence(values: np.ndarray | pa.Array) -> np.ndarray:
    """Indices of the first occurrence of each value, in input order (strings via Arrow's dictionary
    encoding, never as Python objects)."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = pc.dictionary_encode(values).indices.to_numpy()
    return np.flatnonzero(~pd.Series(values).duplicated(keep="first").to_numpy())


def key_slices(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """(key, start, stop) of each run of equal partition keys (routed from sorted `_healpix_29`)."""
    if len(keys) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    stops = np.r_[starts[1:], len(keys)]
    return [(int(keys[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


class _Cache:
    """LRU of decoded file contents by (table, partition key, file name). Files never change, so entries
    never go stale; the size bound only limits memory."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: tuple, value: Any) -> None:
        size = value.nbytes if hasattr(value, "nbytes") else 64
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped


class AlertLake:
    """One alert stream of a lake: commits, snapshots, gc (compaction: `dac_lake.alerts.compaction`).

    `order`, `groups`, `title` and `description` are used when the stream is created (by the first commit or
    by `create()`); later they must match or be None. A writer object is meant to be long-lived (the ingest
    keeps one): its caches make the de-duplication of a batch cost a few reads, not a scan.
    """

    def __init__(
        self,
        storage: LakeStorage,
        stream: str,
        *,
        order: int | None = None,
        groups: Iterable[str] | None = None,
        title: str | None = None,
        description: str | None = None,
        threads: int = 4,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        definitions_dir: str | Path | None = None,
    ):
        self.storage = storage
        self.stream = alayout.check_stream_name(stream)
        self._want_order = None if order is None else alayout.check_order(order)
        self._want_groups = tuple(groups) if groups is not None else None
        self._want_title = title
        self._want_description = description
        self._definitions_dir = definitions_dir
        self.threads = max(1, threads)
        self.snapshots = SnapshotStore(storage, self.stream)
        self.cache = _Cache(cache_bytes)
        self._config: StreamConfig | None = None
        self._schemas: dict[str, pa.Schema] = {}
        self._formats: dict[tuple[str, int], tuple[pa.Schema, dict]] = {}
        self._snapshot: Snapshot | None = None
        self._snapshot_read = 0.0
        self._partition_info_written: set[str] = set()

    def __repr__(self) -> str:
        return f"AlertLake({self.storage.url!r}, {self.stream!r})"

    # ------------------------------------------------------------------ stream config
    @property
    def config(self) -> StreamConfig:
        """The stream's config, created on first use."""
        if self._config is None:
            config = read_stream_config(self.storage, self.stream)
            self._config = config if config is not None else self.create()
            self._check_config(self._config)
        return self._config

    @property
    def order(self) -> int:
        return self.config.order

    def create(self) -> StreamConfig:
        """Create the stream (stream.json, create-only, and each table's `_common_metadata`). Idempotent:
        if another process created it first, its config is returned."""
        from dac_lake.lake import Lake, utcnow

        Lake(self.storage).check()  # an initialised lake, not a typo'd path
        definitions = load_table_definitions(self._definitions_dir)
        config = StreamConfig(
            stream=self.stream,
            order=self._want_order if self._want_order is not None else alayout.DEFAULT_ORDER,
            groups=self._want_groups or ("public",),
            title=self._want_title or f"{self.stream} alert stream",
            description=self._want_description or "",
            definitions={t: d.to_dict() for t, d in definitions.items()},
            created_at=utcnow(),
        )
        for table in alayout.TABLES:
            schema = table_schema(config.definitions[table])
            rel = f"{alayout.dataset_prefix(self.stream, table)}/_common_metadata"
            self.storage.make_dirs(rel.rsplit("/", 1)[0])
            pq.write_metadata(schema, self.storage.path(rel), filesystem=self.storage.pa_fs)
        if not self.storage.put_if_absent(alayout.stream_file(self.stream), config.to_json()):
            existing = read_stream_config(self.storage, self.stream)
            assert existing is not None
            return existing
        log.info("created alert stream %s (order %d, groups %s)", self.stream, config.order, config.groups)
        return config

    def _check_config(self, config: StreamConfig) -> None:
        if self._want_order is not None and config.order != self._want_order:
            raise AlertLakeError(
                f"alert stream {self.stream!r} exists with HEALPix order {config.order}, not "
                f"{self._want_order}: its order is fixed when it is created"
            )

    def schema(self, table: str) -> pa.Schema:
        if table not in self._schemas:
            self._schemas[table] = table_schema(self.config.definitions[table])
        return self._schemas[table]

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, refresh: bool = True) -> Snapshot:
        """The newest snapshot (an empty one, seq 0, before the first commit)."""
        if refresh or self._snapshot is None or time.monotonic() - self._snapshot_read > SNAPSHOT_MAX_AGE:
            latest = self.snapshots.latest()
            self._snapshot = latest if latest is not None else Snapshot.empty(self.stream, self.order)
            self._snapshot_read = time.monotonic()
        return self._snapshot

    def source_position(self) -> Any:
        """Where the ingest must resume: the source position of the newest snapshot (None: from the start)."""
        return self.snapshot().source_position

    # ------------------------------------------------------------------ file I/O
    def file_path(self, table: str, key: int, name: str) -> str:
        """The lake path of file `name` of partition `key` (NUNIQ, `layout.partition_key`)."""
        return alayout.key_file(self.stream, table, key, name)

    def read_file(self, table: str, key: int, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(
            self.storage.path(self.file_path(table, key, name)),
            filesystem=self.storage.pa_fs,
            columns=columns,
            partitioning=None,
        )

    def write_file(
        self,
        table: str,
        key: int,
        name: str,
        data: pa.Table,
        compression_level: int = BATCH_COMPRESSION_LEVEL,
    ) -> FileEntry:
        """Write one immutable data file (sorted by `_healpix_29`, as HATS wants). Locally via a hidden
        temporary name and a rename, so that an outside reader listing the folder never sees half a file;
        an S3 PUT is atomic anyway."""
        schema, kwargs = self._file_format(table, compression_level)
        columns = []
        for f in schema:
            col = data.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        data = pa.Table.from_arrays(columns, schema=schema)
        rel = self.file_path(table, key, name)
        if self.storage.is_s3:
            pq.write_table(data, self.storage.path(rel), filesystem=self.storage.pa_fs, **kwargs)
        else:
            target = Path(self.storage.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{uuid.uuid4().hex}.parquet"
            try:
                pq.write_table(data, str(tmp), **kwargs)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        return FileEntry(name, data.num_rows)

    def _file_format(self, table: str, compression_level: int) -> tuple[pa.Schema, dict]:
        """The schema of a data file (the table's schema without the definition JSON, which
        `_common_metadata` and stream.json carry: per-file it would outweigh a small batch's rows) and the
        Parquet options hats uses (byte-stream-split floats, delta-coded `_healpix_29`, zstd)."""
        key = (table, compression_level)
        if key not in self._formats:
            from hats.io.file_io import get_parquet_write_table_kwargs

            schema = self.schema(table).remove_metadata()
            sorting = pq.SortingColumn.from_ordering(schema, [(HP, "ascending")])
            kwargs = get_parquet_write_table_kwargs(
                schema,
                write_table_kwargs={
                    "sorting_columns": sorting,
                    "row_group_size": ROW_GROUP_ROWS,
                    "compression_level": compression_level,
                },
            )
            self._formats[key] = (schema, kwargs)
        return self._formats[key]

    def _map(self, fn: Callable, items: list) -> list:
        if len(items) <= 1 or self.threads == 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(self.threads, len(items))) as pool:
            return list(pool.map(fn, items))

    def _cached(self, kind: str, table: str, pixels: Iterable[int], snap: Snapshot, load: Callable) -> dict:
        """{(key, name): value} for every file of partitions `pixels` (keys) in `snap`, from the cache or
        `load(table, key, name)` (files missing from the cache are read in parallel)."""
        state = snap.table(table)
        out, todo = {}, []
        for pixel in pixels:
            for f in state.files(int(pixel)):
                value = self.cache.get((kind, table, int(pixel), f.name))
                if value is None:
                    todo.append((int(pixel), f.name))
                else:
                    out[(int(pixel), f.name)] = value
        for (pixel, name), value in zip(todo, self._map(lambda k: load(table, *k), todo), strict=True):
            self.cache.put((kind, table, pixel, name), value)
            out[(pixel, name)] = value
        return out

    def _load_ids(self, table: str, pixel: int, name: str) -> np.ndarray:
        ids = self.read_file(table, pixel, name, columns=[KEYS[table]]).column(0).to_numpy()
        return np.sort(ids)

    def _load_ul_keys(self, table: str, pixel: int, name: str) -> pa.Array:
        return _ul_keys(self.read_file(table, pixel, name, columns=["object_id", "mjd", "band"]))

    def _load_full(self, table: str, pixel: int, name: str) -> pa.Table:
        return self.read_file(table, pixel, name).combine_chunks()

    def stored_ids(self, table: str, pixels: Iterable[int], snap: Snapshot) -> np.ndarray:
        """The unique keys (detection_id / alert_id) stored in partitions `pixels` (keys)."""
        parts = list(self._cached("ids", table, pixels, snap, self._load_ids).values())
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def pixel_objects(self, pixels: Iterable[int], snap: Snapshot) -> dict[int, pa.Table]:
        """The objects rows stored in each of partitions `pixels` (keys; partitions without objects are
        absent)."""
        files = self._cached("full", alayout.OBJECTS, pixels, snap, self._load_full)
        by_pixel: dict[int, list[pa.Table]] = {}
        for (pixel, _), tbl in sorted(files.items()):
            by_pixel.setdefault(pixel, []).append(tbl)
        return {p: pa.concat_tables(t) if len(t) > 1 else t[0] for p, t in by_pixel.items()}

    def objects_near(self, ra: np.ndarray, dec: np.ndarray, snap: Snapshot) -> dict[int, pa.Table]:
        """The objects rows stored in the partitions within reach of the positions, by partition key."""
        keys = near_partitions(snap, alayout.OBJECTS, neighbourhood_cells(ra, dec))
        return self.pixel_objects(keys, snap)

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        batch_id: str,
        detections: pa.Table,
        upper_limits: pa.Table | None = None,
        alerts: pa.Table | None = None,
        source_position: Any = None,
        before_snapshot: Callable[[], None] | None = None,
        retries: int = 5,
    ) -> CommitResult:
        """Commit one batch: new files, then one create-only snapshot (see the module docstring).

        `source_position` (JSON-serialisable: Kafka offsets per topic partition, or a file and packet index)
        is stored in the snapshot; `source_position()` returns it for resuming. `before_snapshot` is called
        after every data file is written and before the snapshot is created (instrumentation, and the
        tests' crash point). Raises `CommitConflict` if another writer committed since our snapshot.

        If a compaction re-partitioned what the batch writes to meanwhile (`PartitionsChanged`), the whole
        commit runs again on the newest snapshot, up to `retries` times: the first attempt's files are
        orphans for gc, and the de-duplication by ids makes the second attempt add each row once."""
        for attempt in range(max(0, retries) + 1):
            try:
                return self._commit(batch_id, detections, upper_limits, alerts, source_position,
                                    before_snapshot)  # fmt: skip
            except PartitionsChanged as exc:
                if attempt >= retries:
                    raise
                log.info("%s: batch %s again on the new partitioning: %s", self.stream, batch_id, exc)
        raise AssertionError("unreachable")

    def _commit(
        self,
        batch_id: str,
        detections: pa.Table,
        upper_limits: pa.Table | None,
        alerts: pa.Table | None,
        source_position: Any,
        before_snapshot: Callable[[], None] | None,
    ) -> CommitResult:
        t0 = time.perf_counter()
        started = time.time()
        timings: dict[str, float] = {}
        mark = [t0]

        def lap(name: str) -> None:
            now = time.perf_counter()
            timings[name] = round(now - mark[0], 4)
            mark[0] = now

        alayout.check_batch_id(batch_id)
        base = self.snapshot(refresh=False)
        if batch_id in base.recent_batches:
            log.info(
                "%s: batch %s is already committed (snapshot #%d): skipped", self.stream, batch_id, base.seq
            )
            return CommitResult(self.stream, batch_id, base.seq, skipped=True)
        det = conform_input(detections, alayout.DETECTIONS)
        uls = conform_input(upper_limits, alayout.UPPER_LIMITS)
        context = {f.name: f.type for f in self.schema(alayout.ALERTS) if f.name != HP}
        alr = conform_input(alerts, alayout.ALERTS, context) if alerts is not None else None
        result = CommitResult(self.stream, batch_id, base.seq + 1)
        result.rows_in = {
            alayout.DETECTIONS: det.num_rows,
            alayout.UPPER_LIMITS: uls.num_rows,
            alayout.ALERTS: alr.num_rows if alr is not None else 0,
        }
        lap("conform")

        # ---- 1. de-duplicate within the batch (an alert's own detection wins over a history copy)
        det_ids = det.column("detection_id").to_numpy()
        if det.num_rows:
            hist = det.column("is_history").to_numpy(zero_copy_only=False).astype(bool)
            first_live = np.argsort(hist, kind="stable")
            keep = np.sort(first_live[_first_occurrence(det_ids[first_live])])
            if len(keep) < det.num_rows:
                det = det.take(keep)
                det_ids = det_ids[keep]
        if alr is not None and alr.num_rows:
            alr = alr.take(_first_occurrence(alr.column("alert_id").to_numpy()))
        ra = det.column("ra").to_numpy()
        dec = det.column("dec").to_numpy()
        if alr is not None and alr.num_rows:
            ra = np.concatenate([ra, alr.column("ra").to_numpy()])
            dec = np.concatenate([dec, alr.column("dec").to_numpy()])
        self._check_positions(ra, dec)
        cells = neighbourhood_cells(ra, dec)
        lap("dedup_batch")

        # ---- 2. drop detections (and alerts) already stored
        stored = self.stored_ids(alayout.DETECTIONS, near_partitions(base, alayout.DETECTIONS, cells), base)
        if len(stored) and det.num_rows:
            fresh = ~np.isin(det_ids, stored)
            det = det.filter(pa.array(fresh))
        if alr is not None and alr.num_rows:
            stored_alerts = self.stored_ids(
                alayout.ALERTS, near_partitions(base, alayout.ALERTS, cells), base
            )
            if len(stored_alerts):
                alr = alr.filter(pa.array(~np.isin(alr.column("alert_id").to_numpy(), stored_alerts)))
        lap("dedup_stored")

        # ---- 3. objects: previous rows near the batch, updated with the new detections
        objects_by_pixel = self.pixel_objects(near_partitions(base, alayout.OBJECTS, cells), base)
        batch_objects = pa.concat_arrays(
            [det.column("object_id").combine_chunks(), uls.column("object_id").combine_chunks()]
            + ([alr.column("object_id").combine_chunks()] if alr is not None else [])
        ).cast(pa.large_string())
        previous, previous_pixel = self._previous_objects(objects_by_pixel, pc.unique(batch_objects))
        new_objects = _with_hp29(update_objects(previous, det, batch_id))
        touched = self._objects_touched(new_objects, previous_pixel, base)
        stored_pixels = base.table(alayout.OBJECTS).pixels
        missing = [p for p in touched if p not in objects_by_pixel and p in stored_pixels]
        if missing:  # a mean position moved beyond the neighbourhood: its pixel must be rewritten whole
            objects_by_pixel.update(self.pixel_objects(missing, base))
        result.first_seen = new_objects.column("object_id").combine_chunks()
        if previous.num_rows and new_objects.num_rows:
            known = pc.is_in(new_objects.column("object_id"), value_set=previous.column("object_id"))
            result.objects_updated = int(pc.sum(known).as_py() or 0)
            result.first_seen = result.first_seen.filter(pc.invert(known.combine_chunks()))
        result.objects_new = new_objects.num_rows - result.objects_updated
        lap("objects")

        # ---- 4. upper limits: positioned at their object, de-duplicated on (object_id, mjd, band)
        uls = self._position_upper_limits(uls, new_objects, previous, alr)
        if uls.num_rows:
            keys = _ul_keys(uls)
            first = _first_occurrence(keys)
            uls, keys = uls.take(first), keys.take(first)
            ul_cells = neighbourhood_cells(uls.column("ra").to_numpy(), uls.column("dec").to_numpy())
            ul_near = near_partitions(base, alayout.UPPER_LIMITS, ul_cells)
            stored_keys = list(
                self._cached("keys", alayout.UPPER_LIMITS, ul_near, base, self._load_ul_keys).values()
            )
            if stored_keys:
                value_set = pa.concat_arrays(stored_keys)
                uls = uls.filter(pc.invert(pc.is_in(keys, value_set=value_set)))
        lap("upper_limits")

        # ---- 5. plan and write the files
        seq = base.seq + 1
        token = uuid.uuid4().hex[:10]
        name = alayout.batch_file_name(seq, batch_id, token)
        writes: list[tuple[str, int, pa.Table]] = []
        for table, data in (
            (alayout.DETECTIONS, _with_hp29(det)),
            (alayout.UPPER_LIMITS, _with_hp29(uls)),
            (alayout.ALERTS, _with_hp29(alr) if alr is not None else None),
        ):
            if data is None or data.num_rows == 0:
                continue
            data = data.sort_by(HP)
            for key, a, b in key_slices(base.route(table, data.column(HP).to_numpy())):
                writes.append((table, key, data.slice(a, b - a)))
        object_writes, emptied = self._objects_rewrites(new_objects, touched, objects_by_pixel, base)
        writes += object_writes
        result.rows_new = {
            alayout.DETECTIONS: det.num_rows,
            alayout.UPPER_LIMITS: uls.num_rows,
            alayout.ALERTS: alr.num_rows if alr is not None else 0,
            alayout.OBJECTS: new_objects.num_rows,
        }
        lap("plan")
        entries = self._map(lambda w: (w[0], w[1], self.write_file(w[0], w[1], name, w[2]), w[2]), writes)
        result.files_written = len(entries)
        result.pixels = len({p for _, p, _, _ in entries})
        lap("write")

        # ---- 6. the commit point: one create-only snapshot
        if before_snapshot is not None:
            before_snapshot()
        if time.time() - started > MAX_COMMIT_SECONDS:
            raise AlertLakeError(
                f"{self.stream}: batch {batch_id} took over {MAX_COMMIT_SECONDS:.0f} s to write; not "
                "committing files that a concurrent gc may have removed. Retry the batch."
            )
        added: dict[str, dict[int, list[FileEntry]]] = {}
        replaced: dict[int, list[FileEntry]] = {pixel: [] for pixel in emptied}
        for table, pixel, entry, _ in entries:
            if table == alayout.OBJECTS:  # copy-on-write: the new file replaces the pixel's files
                replaced[pixel] = [entry]
            else:
                added.setdefault(table, {}).setdefault(pixel, []).append(entry)
        stats = {"rows_in": result.rows_in, "rows_new": result.rows_new, "files": len(entries)}
        snapshot = self._publish(base, batch_id, added, replaced, source_position, stats)
        self._snapshot, self._snapshot_read = snapshot, time.monotonic()
        lap("snapshot")

        # ---- 7. what we just wrote is what the next batch will look up: cache it without re-reading
        for table, pixel, entry, data in entries:
            if table in (alayout.DETECTIONS, alayout.ALERTS):
                self.cache.put(
                    ("ids", table, pixel, entry.name), np.sort(data.column(KEYS[table]).to_numpy())
                )
            elif table == alayout.UPPER_LIMITS:
                self.cache.put(("keys", table, pixel, entry.name), _ul_keys(data))
            else:
                self.cache.put(("full", table, pixel, entry.name), data.select(self.schema(table).names))
        changed = [t for t in alayout.TABLES if t in added or (t == alayout.OBJECTS and replaced)]
        self.publish_hats_metadata(snapshot, base, changed)
        lap("hats_metadata")
        result.seq = snapshot.seq
        result.detections, result.objects = det, new_objects
        result.seconds = round(time.perf_counter() - t0, 4)
        result.timings = timings
        log.info(
            "%s: committed batch %s as snapshot #%d: %s new rows of %s, %d files, %.2f s",
            self.stream, batch_id, snapshot.seq, result.rows_new, result.rows_in, result.files_written,
            result.seconds,
        )  # fmt: skip
        return result

    def _publish(
        self,
        base: Snapshot,
        batch_id: str,
        added: dict[str, dict[int, list[FileEntry]]],
        replaced: dict[int, list[FileEntry]],
        source_position: Any,
        stats: dict[str, Any],
    ) -> Snapshot:
        """Create the snapshot after `base` with the batch's files. If a compaction committed in between,
        the batch is re-applied on top of it (a compaction changes neither the rows nor the objects table, so
        the de-duplication done against `base` still holds) as long as every partition the batch writes to
        is still a leaf (not split meanwhile) and the objects table is unchanged: otherwise
        `PartitionsChanged`. Any other writer's snapshot is a `CommitConflict`."""
        by = writer_id()
        on = base
        for _ in range(20):
            tables = dict(on.tables)
            for table, pixels in added.items():
                state = on.table(table)
                tables[table] = state.updated({p: [*state.files(p), *files] for p, files in pixels.items()})
            tables[alayout.OBJECTS] = on.table(alayout.OBJECTS).updated(replaced)
            snapshot = on.successor(
                tables={t: tables.get(t) or TableState() for t in alayout.TABLES},
                operation="commit",
                batches=(batch_id,),
                recent_batches=recent_batches(on.recent_batches, [batch_id]),
                source_position=source_position,
                stats=stats,
                by=by,
            )
            try:
                return self.snapshots.create(snapshot)
            except CommitConflict:
                self._snapshot = None  # whatever happens next, re-read before the next batch
                latest = self.snapshots.latest()
                if latest is None or not self._only_compactions(base, latest):
                    raise
                if not self._still_applies(base, latest, added):
                    raise PartitionsChanged(
                        f"{self.stream}: compaction #{latest.seq} re-partitioned what batch {batch_id} "
                        "writes to; it must be committed again from the new snapshot"
                    ) from None
                log.info("%s: a compaction committed #%d meanwhile; rebasing batch %s", self.stream,
                         latest.seq, batch_id)  # fmt: skip
                on = latest
        raise CommitConflict(f"{self.stream}: could not commit batch {batch_id}: the stream keeps changing")

    def _only_compactions(self, base: Snapshot, latest: Snapshot) -> bool:
        """True if every snapshot after `base` up to `latest` is a compaction."""
        for seq in range(base.seq + 1, latest.seq + 1):
            try:
                snap = latest if seq == latest.seq else self.snapshots.read(seq)
            except FileNotFoundError:
                return False
            if snap.operation != "compact":
                return False
        return True

    @staticmethod
    def _still_applies(
        base: Snapshot, latest: Snapshot, added: dict[str, dict[int, list[FileEntry]]]
    ) -> bool:
        """True if a batch planned on `base` can be re-applied on `latest` (compactions only in between):
        the objects table is as it was, and every partition the batch adds files to is still a leaf."""
        if latest.table(alayout.OBJECTS) != base.table(alayout.OBJECTS):
            return False
        for table, keys in added.items():
            state = latest.table(table)
            if state.splits != base.table(table).splits and not all(
                state.is_leaf(k, latest.order) for k in keys
            ):
                return False
        return True

    @staticmethod
    def _check_positions(ra: np.ndarray, dec: np.ndarray) -> None:
        bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90))
        if bad.any():
            raise AlertLakeError(
                f"{int(bad.sum())} detection(s)/alert(s) of the batch have no valid position (ra, dec), "
                f"e.g. ra={ra[bad][0]}, dec={dec[bad][0]}: the packet layer must not pass them on"
            )

    def _previous_objects(self, objects_by_pixel: dict[int, pa.Table], ids: pa.Array):
        """The stored rows of objects `ids` (from the pixels near the batch) and the pixel of each."""
        found, pixels = [], []
        for pixel, tbl in objects_by_pixel.items():
            mask = pc.is_in(tbl.column("object_id"), value_set=ids)
            if pc.any(mask).as_py():
                rows = tbl.filter(mask)
                found.append(rows)
                pixels.append(np.full(rows.num_rows, pixel, dtype=np.int64))
        if not found:
            return self.schema(alayout.OBJECTS).empty_table(), np.empty(0, dtype=np.int64)
        previous = pa.concat_tables(found).combine_chunks()
        where = np.concatenate(pixels)
        oid = previous.column("object_id")
        if pc.count_distinct(oid).as_py() != len(oid):
            first = _first_occurrence(oid)
            dupes = oid.take(np.setdiff1d(np.arange(len(oid)), first)).to_pylist()[:5]
            raise AlertLakeError(
                f"{self.stream}: objects stored twice in the snapshot: {dupes}; the lake is corrupt"
            )
        return previous, where

    def _objects_touched(
        self, new_objects: pa.Table, previous_pixel: np.ndarray, base: Snapshot
    ) -> list[int]:
        """Partitions of the objects table a batch changes: where updated objects are now, and where their
        previous rows were (a mean position may cross into a neighbouring partition)."""
        touched = set(base.route(alayout.OBJECTS, new_objects.column(HP).to_numpy()).tolist())
        touched |= set(np.unique(previous_pixel).tolist())
        return sorted(int(p) for p in touched)

    def _objects_rewrites(
        self,
        new_objects: pa.Table,
        touched: list[int],
        objects_by_pixel: dict[int, pa.Table],
        base: Snapshot,
    ) -> tuple[list[tuple[str, int, pa.Table]], list[int]]:
        """Copy-on-write of the objects table: each touched partition's stored rows minus the updated
        objects plus their new rows, as one new file; and the partitions left with no rows (they leave the
        table)."""
        if new_objects.num_rows == 0:
            return [], []
        new_pix = base.route(alayout.OBJECTS, new_objects.column(HP).to_numpy())
        updated = new_objects.column("object_id")
        schema = self.schema(alayout.OBJECTS)
        writes, emptied = [], []
        for pixel in touched:
            parts = []
            stored = objects_by_pixel.get(pixel)
            if stored is not None and stored.num_rows:
                keep = pc.invert(pc.is_in(stored.column("object_id"), value_set=updated))
                parts.append(stored.filter(keep).select(schema.names).cast(schema))
            mine = np.flatnonzero(new_pix == pixel)
            if len(mine):
                parts.append(new_objects.take(mine).select(schema.names).cast(schema))
            merged = pa.concat_tables(parts) if parts else schema.empty_table()
            if merged.num_rows:
                writes.append((alayout.OBJECTS, pixel, merged.sort_by(HP)))
            elif stored is not None:
                emptied.append(pixel)
        return writes, emptied

    def _position_upper_limits(
        self, uls: pa.Table, new_objects: pa.Table, previous: pa.Table, alr: pa.Table | None
    ) -> pa.Table:
        """Upper limits take their object's position: its new mean, else its stored row, else the alert."""
        if uls.num_rows == 0:
            return uls.append_column("ra", pa.array([], pa.float64())).append_column(
                "dec", pa.array([], pa.float64())
            )
        oid = uls.column("object_id").combine_chunks().cast(pa.large_string())
        ra = np.full(len(oid), np.nan)
        dec = np.full(len(oid), np.nan)
        sources = [new_objects, previous]
        if alr is not None and alr.num_rows:
            sources.append(alr)
        for src in sources:
            todo = np.isnan(ra)
            if not todo.any() or src.num_rows == 0:
                continue
            keys = src.column("object_id").combine_chunks().cast(pa.large_string())
            pos = pc.fill_null(pc.index_in(oid, value_set=keys), -1).to_numpy().astype(np.int64)
            ok = todo & (pos >= 0)
            ra[ok] = src.column("ra").to_numpy()[pos[ok]]
            dec[ok] = src.column("dec").to_numpy()[pos[ok]]
        missing = np.isnan(ra)
        if missing.any():
            raise AlertLakeError(
                f"{int(missing.sum())} upper limit(s) belong to objects with no detection or alert in this "
                f"batch and no stored row nearby (e.g. {oid[int(np.argmax(missing))]}): cannot position them"
            )
        return uls.append_column("ra", pa.array(ra)).append_column("dec", pa.array(dec))

    # ------------------------------------------------------------------ HATS metadata
    def publish_hats_metadata(
        self, snapshot: Snapshot, previous: Snapshot | None, tables: Iterable[str]
    ) -> None:
        """Rewrite hats.properties (row count) and, when the pixel set changed, partition_info.csv of
        `tables` from `snapshot`, for readers that open the tables as plain HATS catalogs. Best effort
        after the commit: a failure here is logged, the next commit rewrites them."""

        def refresh(table: str) -> None:
            state = snapshot.table(table)
            if state.rows == 0:
                return
            try:
                self._write_hats_metadata(table, state, snapshot, previous)
            except Exception as exc:  # the snapshot is committed; outside readers lag until the next one
                log.warning("%s/%s: could not refresh the HATS metadata: %s", self.stream, table, exc)

        self._map(refresh, list(tables))

    def _write_hats_metadata(
        self, table: str, state: TableState, snapshot: Snapshot, previous: Snapshot | None
    ):
        import datetime as dt

        from hats.catalog import PartitionInfo, TableProperties
        from hats.pixel_math import HealpixPixel

        root = self.storage.upath(alayout.table_prefix(self.stream, table))
        prev_pixels = set(previous.table(table).pixels) if previous is not None else set()
        if set(state.pixels) != prev_pixels or table not in self._partition_info_written:
            pixels = [HealpixPixel(o, p) for o, p, _ in state.partitions()]
            PartitionInfo.from_healpix(pixels).write_to_file(catalog_path=root)
            self._partition_info_written.add(table)
        definition = self.config.definitions[table]
        props = TableProperties(
            catalog_name=f"{self.stream}_{table}",
            catalog_type="object" if table == alayout.OBJECTS else "source",
            total_rows=state.rows,
            ra_column=definition["ra_column"],
            dec_column=definition["dec_column"],
            healpix_column=HP,
            healpix_order=healpix.SPATIAL_INDEX_ORDER,
            npix_suffix="/",
            hats_max_rows=max(state.pixel_rows(p) for p in state.pixels),
            moc_sky_fraction=round(sum(4.0 ** -alayout.order_pixel(k)[0] for k in state.pixels) / 12, 6),
            hats_builder="dac-lake",
            hats_creation_date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M%Z"),
            hats_version="v1.0",
            obs_title=definition.get("title", table),
            dac_alerts_snapshot=snapshot.seq,
        )
        props.to_properties_file(root)

    # ------------------------------------------------------------------ maintenance
    def gc(self, grace_seconds: float = 3600.0, keep_snapshots: int = 10, dry_run: bool = False):
        """Remove unreferenced data files and old snapshots (`dac_lake.alerts.compaction.gc`)."""
        from dac_lake.alerts.compaction import gc

        return gc(self, grace_seconds=grace_seconds, keep_snapshots=keep_snapshots, dry_run=dry_run)

    def compact(self, **options: Any):
        """Merge the small files of each partition and split crowded ones
        (`dac_lake.alerts.compaction.compact`)."""
        from dac_lake.alerts.compaction import compact

        return compact(self, **options)


def _with_hp29(table: pa.Table | None) -> pa.Table | None:
    if table is None:
        return None
    if HP in table.column_names:
        return table
    hp29 = healpix.healpix29(table.column("ra").to_numpy(), table.column("dec").to_numpy())
    return table.add_column(0, HP, pa.array(hp29, type=pa.int64()))
