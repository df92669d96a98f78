"""`dac ingest release`: input files -> a validated HATS collection in its own release prefix -> published.

Order of work, chosen so that a failure at any point loses nothing:
1. read and check every input against the catalog definition (nothing written yet: bad input publishes
   nothing and leaves no trace);
2. claim the release prefix with a create-only incomplete marker (two ingests of one release name cannot
   both run);
3. write catalog, margin cache and index catalog straight into the prefix (S3 has no rename: no copy);
4. validate what was written with the hats library itself, write the release manifest;
5. publish with one create-only pointer write; only then drop the incomplete marker.
A crash before step 5 leaves the previous release current; `dac lake gc` removes the orphan prefix.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from dac_lake import healpix, layout
from dac_lake.catalog_def import CatalogDef
from dac_lake.lake import Lake, LakeError, utcnow
from ingest.conform import check_unique_ids, conform_table
from ingest.hats_writer import DEFAULT_COMPRESSION_LEVEL, HatsCollectionWriter
from ingest.readers import InputError, expand_inputs, read_input

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0


@dataclass
class IngestOptions:
    """Knobs of one ingest; defaults follow hats-import's."""

    ra_column: str | None = None
    dec_column: str | None = None
    id_column: str | None = None
    max_rows_per_partition: int = 1_000_000
    highest_order: int = 10
    lowest_order: int = 0
    margin_arcsec: float = 10.0
    skip_bad_rows: bool = False
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    publish: bool = True
    validate_with_lsdb: bool = True
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    #: `tcp://host:port` of a Dask distributed scheduler: read, partition and write on its workers
    #: (see `ingest.dask_release`); None: this process, `threads` threads
    dask_address: str | None = None


@dataclass
class IngestSummary:
    catalog: str
    release: str
    rows: int
    input_files: int
    skipped_rows: int
    skipped_reasons: dict[str, int]
    partitions: int
    orders: dict[int, int]
    margin_rows: int
    index_rows: int
    bytes: int
    seconds: float
    published: bool
    pointer_seq: int | None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        orders = ", ".join(f"order {o}: {n}" for o, n in sorted(self.orders.items()))
        out = [
            f"catalog {self.catalog} release {self.release}"
            + (f" published (pointer #{self.pointer_seq})" if self.published else " written, not published"),
            f"  rows        {self.rows:,} from {self.input_files} file(s)",
            f"  partitions  {self.partitions} ({orders})",
            f"  margin rows {self.margin_rows:,}   index rows {self.index_rows:,}",
            f"  bytes       {self.bytes / 1e6:,.1f} MB (uncompressed column data)",
            f"  time        {self.seconds:,.1f} s   {self.rows_per_second:,.0f} rows/s",
        ]
        if self.skipped_rows:
            reasons = "; ".join(f"{r}: {n}" for r, n in self.skipped_reasons.items())
            out.append(f"  skipped     {self.skipped_rows:,} bad row(s) ({reasons})")
        return out


ProgressFn = Callable[[str, int, int], None]


def _pause_point(stage: str) -> None:
    """Test hook: with DAC_INGEST_PAUSE_AT=<stage>, announce the stage in DAC_INGEST_PAUSE_FILE and wait,
    so a test can SIGKILL the process at exactly this point. Does nothing otherwise, nor when the file
    already exists: of several processes (Dask workers) only the first to get there pauses."""
    if os.environ.get("DAC_INGEST_PAUSE_AT") != stage:
        return
    try:
        fd = os.open(os.environ["DAC_INGEST_PAUSE_FILE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()} {stage}\n")
    while True:  # pragma: no cover - the test kills us here
        signal.pause()


class _Heartbeat:
    """Refreshes the release's incomplete marker so `dac lake gc` on another host knows we are alive."""

    def __init__(self, lake: Lake, key: str, doc: dict):
        self.lake, self.key, self.doc = lake, key, doc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ingest-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.doc["heartbeat_unix"] = time.time()
            try:
                self.lake.storage.write_bytes(self.key, json.dumps(self.doc).encode())
            except Exception as exc:
                log.warning("heartbeat write failed: %s", exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def read_and_conform(
    patterns: list[str], definition: CatalogDef, lake: Lake, options: IngestOptions, progress: ProgressFn
) -> tuple[pa.Table, list[str], np.ndarray, np.ndarray, int, Counter]:
    """Read every input and check it. Returns the concatenated table and, per row, its file and row."""
    files = expand_inputs(patterns, lake.storage)
    col_types = {c.name: c.arrow_type for c in definition.columns}
    progress("read", 0, len(files))

    def one(inp):
        table = read_input(inp, lake.storage, column_types=col_types)
        if table.num_rows == 0:
            raise InputError(f"{inp.location}: the file holds no rows")
        return conform_table(table, definition, inp.location, options.skip_bad_rows)

    results = []
    with ThreadPoolExecutor(max(1, min(options.threads, len(files)))) as pool:
        for i, res in enumerate(pool.map(one, files)):
            results.append(res)
            progress("read", i + 1, len(files))
    tables = [r.table for r in results]
    skipped = sum(r.skipped_rows for r in results)
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r.skipped_reasons)
    table = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0].combine_chunks()
    if table.num_rows == 0:
        raise InputError(f"no rows left to ingest from {', '.join(f.location for f in files)}")
    sources = np.repeat(np.arange(len(results), dtype=np.int32), [r.table.num_rows for r in results])
    rows = np.concatenate([r.row_numbers for r in results])
    return table, [f.location for f in files], sources, rows, skipped, reasons


def ingest_release(
    lake: Lake,
    catalog: str,
    release: str,
    inputs: list[str],
    definition: CatalogDef,
    options: IngestOptions | None = None,
    progress: ProgressFn | None = None,
) -> IngestSummary:
    """Ingest `inputs` as release `release` of `catalog` and (by default) publish it."""
    options = options or IngestOptions()
    progress = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    layout.check_catalog_name(catalog)
    layout.check_release_name(release)
    lake.check()
    if options.ra_column or options.dec_column or options.id_column:
        from dataclasses import replace

        definition = replace(
            definition,
            ra_column=options.ra_column or definition.ra_column,
            dec_column=options.dec_column or definition.dec_column,
            id_column=options.id_column or definition.id_column,
        )
        for role in ("ra_column", "dec_column", "id_column"):
            if definition.column(getattr(definition, role)) is None:
                raise InputError(
                    f"--{role.replace('_', '-')} {getattr(definition, role)!r} is not a defined column"
                )
    prefix = layout.release_prefix(catalog, release)
    if lake.storage.list_dir(prefix):
        raise LakeError(
            f"release {catalog}/{release} already exists (releases are immutable): choose another release "
            f"name, or `dac release drop {catalog} {release}` first "
            "(or `dac lake gc`, if a crashed ingest left it)"
        )
    history = lake.pointer_history(catalog)
    expected_seq = history[-1] if history else 0

    if options.dask_address:
        from ingest.dask_release import DaskIngest

        with DaskIngest(lake, options, progress) as dask_ingest:
            prepared = dask_ingest.prepare(inputs, definition)
            _pause_point("read")
            return _claim_write_publish(
                lake, catalog, release, prefix, expected_seq, prepared, definition, options, progress, t0
            )

    # 1. read and check (nothing written yet)
    table, file_names, sources, rows, skipped, reasons = read_and_conform(
        inputs, definition, lake, options, progress
    )
    _pause_point("read")
    ra = table.column(definition.ra_column).to_numpy().astype(np.float64, copy=False)
    dec = table.column(definition.dec_column).to_numpy().astype(np.float64, copy=False)
    hp29 = healpix.healpix29(ra, dec)
    ids = table.column(definition.id_column)
    check_unique_ids(ids.to_numpy(zero_copy_only=False), sources, rows, file_names, definition.id_column)

    counts = healpix.histogram(hp29, options.highest_order)
    plan = healpix.plan_partitions(
        counts, options.highest_order, options.max_rows_per_partition, options.lowest_order
    )
    progress("sort", 0, 1)
    order = np.argsort(hp29, kind="stable")
    table = _with_spatial_index(table.take(order), hp29[order], definition)
    progress("sort", 1, 1)
    prepared = _Prepared(table, plan, counts, file_names, skipped, reasons)
    return _claim_write_publish(
        lake, catalog, release, prefix, expected_seq, prepared, definition, options, progress, t0
    )


def _claim_write_publish(
    lake: Lake,
    catalog: str,
    release: str,
    prefix: str,
    expected_seq: int,
    prepared,
    definition: CatalogDef,
    options: IngestOptions,
    progress: ProgressFn,
    t0: float,
) -> IngestSummary:
    """Steps 2-5, whichever way the input was prepared (`_Prepared` here, `DaskPrepared` on a cluster)."""
    # 2. claim the prefix
    marker_key = f"{prefix}/{layout.INCOMPLETE_MARKER}"
    marker = {
        "catalog": catalog,
        "release": release,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": utcnow(),
        "heartbeat_unix": time.time(),
    }
    if not lake.storage.put_if_absent(marker_key, json.dumps(marker).encode()):
        raise LakeError(f"release {catalog}/{release} is being written by another ingest")
    _pause_point("claimed")

    try:
        with _Heartbeat(lake, marker_key, marker):
            summary = _write_and_validate(
                lake, catalog, release, prefix, prepared, definition, options, progress
            )
    except BaseException:
        # an orderly failure cleans up after itself; a SIGKILL leaves the prefix to `dac lake gc`
        log.error("ingest of %s/%s failed; removing its incomplete release prefix", catalog, release)
        lake.storage.delete_tree(prefix)
        raise

    # 5. publish
    if options.publish:
        _pause_point("publish")
        pointer = lake.publish(catalog, release, expected_seq=expected_seq)
        summary.published, summary.pointer_seq = True, pointer.seq
    else:
        lake.storage.delete_file(marker_key)
    summary.seconds = time.perf_counter() - t0
    return summary


def _with_spatial_index(table: pa.Table, hp29: np.ndarray, definition: CatalogDef) -> pa.Table:
    """`_healpix_29` first (as hats-import writes it), the definition's columns after it, with the
    definition's column metadata and the whole definition in the schema metadata."""
    fields = [
        pa.field(
            healpix.SPATIAL_INDEX_COLUMN,
            pa.int64(),
            nullable=False,
            metadata={
                b"description": b"HEALPix index at order 29 (nested) of the position: the HATS spatial index",
                b"ucd": b"pos.healpix",
            },
        )
    ]
    for col in definition.columns:
        fields.append(
            pa.field(col.name, col.arrow_type, nullable=col.nullable, metadata=col.field_metadata())
        )
    schema = pa.schema(fields, metadata={b"dac_lake.catalog": definition.to_json().encode()})
    arrays = [pa.array(hp29, type=pa.int64())] + [table.column(c.name) for c in definition.columns]
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class _Prepared:
    """The checked, sorted input of one ingest and what was learnt reading it."""

    table: pa.Table
    plan: list[tuple[int, int, int]]
    counts: np.ndarray
    file_names: list[str]
    skipped: int
    reasons: Counter


def _write_and_validate(
    lake: Lake,
    catalog: str,
    release: str,
    prefix: str,
    prepared: _Prepared,
    definition: CatalogDef,
    options: IngestOptions,
    progress: ProgressFn,
) -> IngestSummary:
    file_names, skipped, reasons = prepared.file_names, prepared.skipped, prepared.reasons
    writer = HatsCollectionWriter(
        lake.storage,
        prefix,
        catalog,
        definition.ra_column,
        definition.dec_column,
        definition.id_column,
        threads=options.threads,
        progress=progress,
        compression_level=options.compression_level,
    )

    def stage_progress(stage, done, total):
        progress(stage, done, total)
        if stage == "partitions" and done == max(1, total // 2):
            _pause_point("partitions")

    writer.progress = stage_progress
    if isinstance(prepared, _Prepared):
        main, margin, index = _write_local(writer, prepared, definition, options)
        executor = None
    else:  # prepared on a Dask cluster: its workers write the files, this process the metadata
        main, margin, index = prepared.write(writer, prefix, definition, options)
        executor = prepared.executor_record()
    writer.write_collection_properties(margin.name if margin else None, index.name)
    lake.storage.write_text(f"{prefix}/{layout.DEFINITION_FILE}", definition.to_json())
    _pause_point("written")

    progress("validate", 0, 1)
    validate_release(lake, catalog, release, main.rows, options.validate_with_lsdb)
    progress("validate", 1, 1)

    order_counts = Counter(o for o, _, _ in main.partitions)
    summary = IngestSummary(
        catalog=catalog,
        release=release,
        rows=main.rows,
        input_files=len(file_names),
        skipped_rows=skipped,
        skipped_reasons=dict(reasons),
        partitions=len(main.partitions),
        orders=dict(order_counts),
        margin_rows=margin.rows if margin else 0,
        index_rows=index.rows,
        bytes=main.bytes,
        seconds=0.0,  # set by the caller, which knows when the ingest began
        published=False,
        pointer_seq=None,
    )
    manifest = {
        "catalog": catalog,
        "release": release,
        "created_at": utcnow(),
        "rows": main.rows,
        "catalog_path": catalog,
        "margin_path": margin.name if margin else None,
        "margin_arcsec": options.margin_arcsec if margin else None,
        "index_path": index.name,
        "id_column": definition.id_column,
        "ra_column": definition.ra_column,
        "dec_column": definition.dec_column,
        "inputs": file_names,
        # how the work was run is not part of the data: `threads` and `dask_address` stay out of it
        "options": {k: v for k, v in asdict(options).items() if k not in {"threads", "dask_address"}},
        "skipped_rows": skipped,
        "skipped_reasons": dict(reasons),
        # per-partition row counts: an unfiltered COUNT(*) answers from here, never from a scan
        "partitions": [[o, p, n] for o, p, n in main.partitions],
        "margin_partitions": [[o, p, n] for o, p, n in margin.partitions] if margin else [],
        "bytes": main.bytes,
    }
    if executor:
        manifest["executor"] = executor
    lake.storage.write_text(f"{prefix}/{layout.RELEASE_MANIFEST}", json.dumps(manifest, indent=1))
    return summary


def _write_local(writer: HatsCollectionWriter, prepared: _Prepared, definition: CatalogDef, options):
    """Catalog, margin and index from the sorted table in this process (the writer's thread pool)."""
    table, plan = prepared.table, prepared.plan
    main = writer.write_catalog(
        table,
        plan,
        prepared.counts,
        options.highest_order,
        options.max_rows_per_partition,
        extra_properties={"obs_title": definition.title},
    )
    _pause_point("catalog")
    margin = writer.write_margin(table, plan, options.margin_arcsec) if options.margin_arcsec > 0 else None
    # per-row partition of the primary catalog, for the index
    orders = np.repeat([o for o, _, _ in main.partitions], [n for _, _, n in main.partitions])
    pixels = np.repeat([p for _, p, _ in main.partitions], [n for _, _, n in main.partitions])
    index = writer.write_index(table.column(definition.id_column), orders, pixels)
    return main, margin, index


def validate_release(
    lake: Lake, catalog: str, release: str, expected_rows: int, with_lsdb: bool = True
) -> None:
    """Open what was written with the hats library (strict validation) and lsdb; check the row count."""
    import hats
    from hats.io.validation import is_valid_catalog

    root = lake.storage.upath(layout.release_prefix(catalog, release))
    collection = hats.read_hats(root)
    main = collection.main_catalog if hasattr(collection, "main_catalog") else collection
    if main.catalog_info.total_rows != expected_rows:
        raise LakeError(
            f"validation: hats reads {main.catalog_info.total_rows} rows, expected {expected_rows}"
        )
    if not is_valid_catalog(root / catalog, strict=True, verbose=False, fail_fast=True):
        raise LakeError(f"validation: hats' strict validation rejects {root / catalog}")
    if with_lsdb:
        import lsdb

        cat = lsdb.open_catalog(root)
        if len(cat.get_healpix_pixels()) != len(main.get_healpix_pixels()):
            raise LakeError("validation: lsdb sees another partition count than hats")
