"""Maintenance of an alert stream: compaction (merge each pixel's small batch files) and gc.

Every commit adds one file per touched pixel to detections, upper limits and alerts, so after a night a pixel
may hold hundreds of small files: each costs a request and a footer read per query. `compact` merges the
files of each pixel into one (rows sorted by `_healpix_29`, larger row groups, stronger compression) and
commits a snapshot that lists the merged file instead. It never changes a row: the merged file holds exactly
the rows of its inputs. Readers are never blocked: the old files stay until `gc` removes them after a grace
period, so a query that started on the previous snapshot completes; the writer is never blocked either: a
commit that raced a compaction re-applies itself on top of it (`AlertLake._publish`), and a compaction that
raced a commit re-applies its merges to the pixels whose inputs are all still listed.

Crowded pixels. The stream's HEALPix order is fixed (lookups, neighbourhoods and file names depend on it),
so a pixel is not re-split here; compaction *reports* pixels above `crowded_rows` (a dense field, the
Galactic plane), so an operator can create the stream again at a finer order. A merged file keeps row groups
of 100k rows sorted by `_healpix_29`, so even a crowded pixel's cone searches read only the row groups the
cone touches.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs

from dac_lake.alerts import layout as alayout
from dac_lake.alerts.snapshots import CommitConflict, FileEntry, Snapshot, TableState, writer_id

if TYPE_CHECKING:
    from dac_lake.alerts.writer import AlertLake

log = logging.getLogger(__name__)

#: tables that grow by one file per batch and pixel (objects are rewritten per pixel: always one file)
APPEND_TABLES = (alayout.DETECTIONS, alayout.UPPER_LIMITS, alayout.ALERTS)
#: a pixel above this many rows is reported as crowded (hats-import's default partition threshold)
CROWDED_ROWS = 1_000_000


@dataclass
class CompactionReport:
    stream: str
    seq: int | None = None  # the compaction's snapshot; None: nothing to do, or nothing could be applied
    pixels: dict[str, int] = field(default_factory=dict)  # table -> pixels merged
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    crowded: list[tuple[str, int, int]] = field(default_factory=list)  # (table, pixel, rows)
    rebased: int = 0
    seconds: float = 0.0


@dataclass
class GcReport:
    removed_files: list[str] = field(default_factory=list)
    removed_snapshots: list[int] = field(default_factory=list)
    kept_snapshots: list[int] = field(default_factory=list)


@dataclass
class _Merge:
    table: str
    pixel: int
    inputs: tuple[str, ...]
    output: FileEntry
    data: pa.Table


def compact(
    alert_lake: AlertLake,
    tables: Iterable[str] = APPEND_TABLES,
    min_files: int = 2,
    crowded_rows: int = CROWDED_ROWS,
    max_pixels: int | None = None,
    retries: int = 10,
) -> CompactionReport:
    """Merge the files of every pixel that has at least `min_files` of them; one snapshot for all.

    `max_pixels` bounds the work of one call (the most fragmented pixels first), for a cron job that must
    finish quickly; call again for the rest."""
    from dac_lake.alerts.writer import COMPACT_COMPRESSION_LEVEL, HP, KEYS, _ul_keys

    t0 = time.perf_counter()
    report = CompactionReport(alert_lake.stream)
    base = alert_lake.snapshot()
    tables = [alayout.check_table_name(t) for t in tables]
    for table in alayout.TABLES:
        state = base.table(table)
        for pixel in sorted(state.pixels):
            rows = state.pixel_rows(pixel)
            if rows > crowded_rows:
                report.crowded.append((table, pixel, rows))
    todo = [
        (table, pixel, base.table(table).files(pixel))
        for table in tables
        for pixel in base.table(table).pixels
        if len(base.table(table).files(pixel)) >= max(2, min_files)
    ]
    todo.sort(key=lambda item: -len(item[2]))
    if max_pixels is not None:
        todo = todo[:max_pixels]
    if not todo:
        report.seconds = round(time.perf_counter() - t0, 3)
        return report
    seq = base.seq + 1
    token = uuid.uuid4().hex[:10]
    name = alayout.compacted_file_name(seq, token)

    def merge(item: tuple[str, int, tuple[FileEntry, ...]]) -> _Merge:
        table, pixel, files = item
        parts = [alert_lake.read_file(table, pixel, f.name) for f in files]
        data = pa.concat_tables(parts).combine_chunks()
        expected = sum(f.rows for f in files)
        if data.num_rows != expected:
            raise RuntimeError(
                f"{table} pixel {pixel}: read {data.num_rows} rows, the snapshot lists {expected}"
            )
        data = data.sort_by(HP)
        entry = alert_lake.write_file(table, pixel, name, data, compression_level=COMPACT_COMPRESSION_LEVEL)
        return _Merge(table, pixel, tuple(f.name for f in files), entry, data)

    merges = alert_lake._map(merge, todo)
    snapshot, applied = _commit_merges(alert_lake, base, merges, retries, report)
    if snapshot is None:
        report.seconds = round(time.perf_counter() - t0, 3)
        return report
    report.seq = snapshot.seq
    for m in applied:
        report.pixels[m.table] = report.pixels.get(m.table, 0) + 1
        report.files_before += len(m.inputs)
        report.files_after += 1
        report.rows += m.output.rows
        if m.table in (alayout.DETECTIONS, alayout.ALERTS):
            alert_lake.cache.put(
                ("ids", m.table, m.pixel, m.output.name), m.data.column(KEYS[m.table]).to_numpy()
            )
        elif m.table == alayout.UPPER_LIMITS:
            alert_lake.cache.put(("keys", m.table, m.pixel, m.output.name), _ul_keys(m.data))
    alert_lake.publish_hats_metadata(snapshot, None, sorted({m.table for m in applied}))
    report.seconds = round(time.perf_counter() - t0, 3)
    log.info(
        "%s: compacted %s pixels (%d files -> %d, %d rows) as snapshot #%s in %.1f s; crowded pixels: %d",
        alert_lake.stream, report.pixels, report.files_before, report.files_after, report.rows, report.seq,
        report.seconds, len(report.crowded),
    )  # fmt: skip
    return report


def _commit_merges(
    alert_lake: AlertLake, base: Snapshot, merges: list[_Merge], retries: int, report: CompactionReport
) -> tuple[Snapshot | None, list[_Merge]]:
    """Publish the merges as one snapshot, re-applying them on top of commits that raced us: a merge
    applies to a pixel only while every one of its inputs is still listed there (commits only add files)."""
    on = base
    for _ in range(max(1, retries)):
        tables = dict(on.tables)
        applied = []
        for m in merges:
            state = tables.get(m.table) or TableState()
            current = state.files(m.pixel)
            names = {f.name for f in current}
            if not set(m.inputs) <= names:
                continue  # another compaction got there first: our merged file is an orphan for gc
            rest = [f for f in current if f.name not in set(m.inputs)]
            tables[m.table] = state.updated({m.pixel: [m.output, *rest]})
            applied.append(m)
        if not applied:
            return None, []
        snapshot = on.successor(
            tables=tables,
            operation="compact",
            batches=(),
            by=writer_id(),
            stats={"merged_pixels": len(applied), "files_before": sum(len(m.inputs) for m in applied)},
        )
        try:
            return alert_lake.snapshots.create(snapshot), applied
        except CommitConflict:
            alert_lake._snapshot = None
            latest = alert_lake.snapshots.latest()
            if latest is None:
                raise
            report.rebased += 1
            on = latest
    raise CommitConflict(f"{alert_lake.stream}: compaction kept losing the race against commits; retry later")


def compact_stream(lake_url: str | None, stream: str, **options) -> CompactionReport:
    """What `dac alerts compact STREAM` runs: compaction of one stream of the lake at `lake_url`."""
    from dac_lake.alerts.writer import AlertLake
    from dac_lake.storage import LakeStorage

    return AlertLake(LakeStorage(lake_url), stream).compact(**options)


def gc(
    alert_lake: AlertLake, grace_seconds: float = 3600.0, keep_snapshots: int = 10, dry_run: bool = False
) -> GcReport:
    """Remove data files no retained snapshot references, and old snapshot objects.

    Retained: the newest `keep_snapshots` snapshots and every snapshot younger than `grace_seconds` (a
    query that started on an older snapshot may still read its files; the query engine re-reads the newest
    snapshot every few seconds). A file is removed only if no retained snapshot lists it AND it is older
    than `grace_seconds` (a commit in progress has written it but not yet published it; a commit refuses
    to publish files older than `writer.MAX_COMMIT_SECONDS`). With the default grace, gc is safe to run at
    any time next to a running ingest and live readers."""
    storage = alert_lake.storage
    report = GcReport()
    history = alert_lake.snapshots.history()
    now = time.time()
    retained: list[Snapshot] = []
    for seq in reversed(history):
        snap = alert_lake.snapshots.read(seq)
        if len(retained) < max(1, keep_snapshots) or now - snap.created_unix < grace_seconds:
            retained.append(snap)
        else:
            break
    report.kept_snapshots = sorted(s.seq for s in retained)
    referenced: set[str] = set()
    for snap in retained:
        referenced |= snap.referenced()
    for table in alayout.TABLES:
        prefix = alayout.dataset_prefix(alert_lake.stream, table)
        selector = pafs.FileSelector(storage.path(prefix), recursive=True, allow_not_found=True)
        for info in storage.pa_fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            rel = storage.rel_of(info.path)
            if alayout.pixel_of_path(rel) is None or rel in referenced:
                continue  # _common_metadata and the like, or live data
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            if now - mtime < grace_seconds:
                continue
            report.removed_files.append(rel)
            if not dry_run:
                storage.delete_file(rel)
        if not dry_run and not storage.is_s3:
            _remove_empty_dirs(Path(storage.path(prefix)))
    if retained:
        oldest_kept = report.kept_snapshots[0]
        for seq in history:
            if seq >= oldest_kept:
                break
            report.removed_snapshots.append(seq)
            if not dry_run:
                alert_lake.snapshots.delete(seq)
    if report.removed_files or report.removed_snapshots:
        log.info(
            "%s gc: removed %d files and %d snapshots (kept %s)",
            alert_lake.stream, len(report.removed_files), len(report.removed_snapshots),
            report.kept_snapshots,
        )  # fmt: skip
    return report


def _remove_empty_dirs(root: Path) -> None:
    """Local lakes: drop pixel folders gc emptied (hats' strict validation counts folders as partitions)."""
    if not root.is_dir():
        return
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
