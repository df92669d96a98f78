"""Maintenance of an alert stream: compaction (merge each partition's small batch files, split crowded
partitions) and gc.

Every commit adds one file per touched partition to detections, upper limits and alerts, so after a night a
partition may hold hundreds of small files: each costs a request and a footer read per query. `compact`
merges the files of each partition into one (rows sorted by `_healpix_29`, larger row groups, stronger
compression) and commits a snapshot that lists the merged file instead. It never changes a row: the merged
file holds exactly the rows of its inputs. Readers are never blocked: the old files stay until `gc` removes
them after a grace period, so a query that started on the previous snapshot completes.

**Crowded partitions are split** (HATS-style mixed orders). A partition holding more than `crowded_rows`
rows (a dense field, the Galactic plane) is replaced by its four children at order+1, recursively while a
child is still crowded, down to `max_order` (`layout.MAX_ORDER`): its rows are read, sorted and written as
one file per non-empty child, and the snapshot records the partition as split (`TableState.splits`), per
table. From then on the writer routes rows of that region to the children (empty ones included) and its
look-ups read the children; a cone search reads only the children it touches. Splitting never changes a
row either, and the parent's files stay until gc, like merged files.

**Concurrent commits.** A compaction that raced a commit re-applies itself on the newest snapshot: a merge
applies to a partition only while every one of its inputs is still listed there (commits only add files);
a split re-routes into the children the files commits added to the partition meanwhile (small batch files:
read, routed, written next to the children's), or splits the partition again from what is listed now if its
files were replaced (the objects table is copy-on-write). The other way round, a commit planned on a
snapshot older than a split of a partition it writes to is not re-applied (its files are at the old
partitioning): `AlertLake.commit` runs the batch again on the new snapshot (`PartitionsChanged`), which the
de-duplication by ids makes safe.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from dac_lake.alerts import layout as alayout
from dac_lake.alerts.snapshots import CommitConflict, FileEntry, Snapshot, TableState, writer_id

if TYPE_CHECKING:
    from dac_lake.alerts.writer import AlertLake

log = logging.getLogger(__name__)

#: tables that grow by one file per batch and partition (objects are rewritten per partition: one file)
APPEND_TABLES = (alayout.DETECTIONS, alayout.UPPER_LIMITS, alayout.ALERTS)
#: a partition above this many rows is split (hats-import's default partition threshold)
CROWDED_ROWS = 1_000_000


@dataclass
class SplitReport:
    """One crowded partition replaced by finer ones."""

    table: str
    order: int
    pixel: int
    rows: int
    children: list[tuple[int, int, int]] = field(default_factory=list)  # (order, pixel, rows), non-empty

    def line(self) -> str:
        orders = sorted({o for o, _, _ in self.children})
        return (
            f"{self.table} {self.order}/{self.pixel} ({self.rows:,} rows) -> {len(self.children)} partitions "
            f"at order{'s' if len(orders) > 1 else ''} {', '.join(map(str, orders))}"
        )


@dataclass
class CompactionReport:
    stream: str
    seq: int | None = None  # the compaction's snapshot; None: nothing to do, or nothing could be applied
    pixels: dict[str, int] = field(default_factory=dict)  # table -> partitions merged
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    #: partitions above `crowded_rows` left as they are (splitting off, at the finest order, or beyond
    #: `max_pixels`): (table, (order, pixel), rows)
    crowded: list[tuple[str, tuple[int, int], int]] = field(default_factory=list)
    splits: list[SplitReport] = field(default_factory=list)
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
    pixel: int  # partition key
    inputs: tuple[str, ...]
    output: FileEntry
    data: pa.Table


@dataclass
class _Split:
    """A split being committed: which files of `key` it covers, the partitions it splits, and the files of
    each new leaf (more than one when commits added files to `key` after the split read it)."""

    table: str
    key: int
    covered: set[str]
    splits: set[int]
    leaves: dict[int, list[FileEntry]]
    rows: int
    #: (key, file name) -> what the writer's look-up cache keeps of the file (not the rows themselves)
    cached: dict[tuple[int, str], tuple[str, object]] = field(default_factory=dict, repr=False)


def plan_split(
    hp29: np.ndarray, key: int, crowded_rows: int, max_order: int = alayout.MAX_ORDER
) -> tuple[set[int], list[tuple[int, int, int]]]:
    """How to split partition `key` holding rows with sorted `hp29`: the partitions to mark as split
    (`key` and every descendant still crowded above `crowded_rows`, down to `max_order`) and the leaves with
    rows as (key, start, stop) slices of `hp29`. Pure."""
    splits: set[int] = set()
    leaves: list[tuple[int, int, int]] = []

    def visit(k: int, a: int, b: int) -> None:
        order, _ = alayout.order_pixel(k)
        if b - a > crowded_rows and order < max_order:
            splits.add(k)
            for child in alayout.children_keys(k):
                lo, hi = alayout.key_range29(child)
                ca = a + int(np.searchsorted(hp29[a:b], lo, side="left"))
                cb = a + int(np.searchsorted(hp29[a:b], hi, side="left"))
                visit(child, ca, cb)
        elif b > a:
            leaves.append((k, a, b))

    visit(int(key), 0, len(hp29))
    return splits, leaves


def compact(
    alert_lake: AlertLake,
    tables: Iterable[str] = alayout.TABLES,
    min_files: int = 2,
    crowded_rows: int = CROWDED_ROWS,
    max_pixels: int | None = None,
    retries: int = 10,
    split: bool = True,
    max_order: int = alayout.MAX_ORDER,
    before_commit: Callable[[], None] | None = None,
) -> CompactionReport:
    """Split every partition above `crowded_rows` rows (if `split`, down to `max_order`) and merge the
    files of every other partition that has at least `min_files` of them; one snapshot for all.

    `max_pixels` bounds the work of one call (crowded partitions first, then the most fragmented ones), for
    a cron job that must finish quickly; call again for the rest. `before_commit` is called before each
    attempt to create the snapshot (instrumentation, and the tests' race point)."""
    from dac_lake.alerts.writer import COMPACT_COMPRESSION_LEVEL

    t0 = time.perf_counter()
    report = CompactionReport(alert_lake.stream)
    base = alert_lake.snapshot()
    tables = [alayout.check_table_name(t) for t in tables]
    max_order = alayout.check_order(max_order)
    to_split: list[tuple[str, int, tuple[FileEntry, ...]]] = []
    crowded: list[tuple[str, int, int]] = []
    for table in tables:
        state = base.table(table)
        for key in sorted(state.pixels):
            rows = state.pixel_rows(key)
            if rows > crowded_rows:
                if split and alayout.order_pixel(key)[0] < max_order:
                    to_split.append((table, key, state.files(key)))
                else:
                    crowded.append((table, key, rows))
    splitting = {(t, k) for t, k, _ in to_split}
    todo = [
        (table, key, base.table(table).files(key))
        for table in tables
        for key in base.table(table).pixels
        if len(base.table(table).files(key)) >= max(2, min_files) and (table, key) not in splitting
    ]
    todo.sort(key=lambda item: -len(item[2]))
    to_split.sort(key=lambda item: -sum(f.rows for f in item[2]))
    if max_pixels is not None:
        for table, key, files in to_split[max_pixels:]:
            crowded.append((table, key, sum(f.rows for f in files)))
        to_split = to_split[:max_pixels]
        todo = todo[: max(0, max_pixels - len(to_split))]
    report.crowded = [(t, alayout.order_pixel(k), rows) for t, k, rows in sorted(crowded)]
    if not todo and not to_split:
        report.seconds = round(time.perf_counter() - t0, 3)
        return report
    seq = base.seq + 1
    token = uuid.uuid4().hex[:10]
    name = alayout.compacted_file_name(seq, token)

    def merge(item: tuple[str, int, tuple[FileEntry, ...]]) -> _Merge:
        table, key, files = item
        data = _read_all(alert_lake, table, key, files)
        entry = alert_lake.write_file(table, key, name, data, compression_level=COMPACT_COMPRESSION_LEVEL)
        return _Merge(table, key, tuple(f.name for f in files), entry, data)

    def split_one(item: tuple[str, int, tuple[FileEntry, ...]]) -> _Split:
        table, key, files = item
        return _split(alert_lake, table, key, files, name, crowded_rows, max_order)

    merges = alert_lake._map(merge, todo)
    splits = alert_lake._map(split_one, to_split)
    snapshot, applied, applied_splits = _commit_changes(
        alert_lake, base, merges, splits, retries, report, before_commit, crowded_rows, max_order
    )
    if snapshot is None:
        report.seconds = round(time.perf_counter() - t0, 3)
        return report
    report.seq = snapshot.seq
    for m in applied:
        report.pixels[m.table] = report.pixels.get(m.table, 0) + 1
        report.files_before += len(m.inputs)
        report.files_after += 1
        report.rows += m.output.rows
        cached = _cache_value(m.table, m.data)
        if cached is not None:
            alert_lake.cache.put((cached[0], m.table, m.pixel, m.output.name), cached[1])
    for sp in applied_splits:
        report.files_before += len(sp.covered)
        if not sp.splits:  # redone on files that are no longer crowded: merged, not split
            report.pixels[sp.table] = report.pixels.get(sp.table, 0) + 1
        report.files_after += sum(len(files) for files in sp.leaves.values())
        report.rows += sp.rows
        order, pixel = alayout.order_pixel(sp.key)
        children = [(*alayout.order_pixel(k), sum(f.rows for f in fs)) for k, fs in sorted(sp.leaves.items())]
        if sp.splits:
            report.splits.append(SplitReport(sp.table, order, pixel, sp.rows, children))
        # at `max_order`, a leaf may still be crowded: report it like a partition that was not split
        report.crowded += [(sp.table, (o, p), rows) for o, p, rows in children if rows > crowded_rows]
        for (key, fname), (kind, value) in sp.cached.items():
            alert_lake.cache.put((kind, sp.table, key, fname), value)
    report.crowded.sort()
    changed = sorted({m.table for m in applied} | {sp.table for sp in applied_splits})
    alert_lake.publish_hats_metadata(snapshot, None, changed)
    latest = alert_lake.snapshots.latest()
    if latest is not None and latest.seq > snapshot.seq:
        # a commit published after us and may have written its metadata before ours: the partition list
        # on disk must be the newest snapshot's (a commit adding a partition, e.g. an empty child's first
        # file, would otherwise be missing from partition_info.csv until the partition set changes again)
        alert_lake.publish_hats_metadata(latest, None, changed)
    report.seconds = round(time.perf_counter() - t0, 3)
    log.info(
        "%s: compacted %s partitions (%d files -> %d, %d rows), split %d, as snapshot #%s in %.1f s; "
        "crowded left: %d",
        alert_lake.stream, report.pixels, report.files_before, report.files_after, report.rows,
        len(report.splits), report.seq, report.seconds, len(report.crowded),
    )  # fmt: skip
    return report


def _read_all(alert_lake: AlertLake, table: str, key: int, files: Iterable[FileEntry]) -> pa.Table:
    """The rows of `files` of partition `key`, sorted by `_healpix_29`, checked against the snapshot."""
    from dac_lake.alerts.writer import HP

    files = list(files)
    parts = [alert_lake.read_file(table, key, f.name) for f in files]
    data = pa.concat_tables(parts).combine_chunks() if parts else alert_lake.schema(table).empty_table()
    expected = sum(f.rows for f in files)
    if data.num_rows != expected:
        raise RuntimeError(
            f"{table} partition {alayout.key_name(key)}: read {data.num_rows} rows, "
            f"the snapshot lists {expected}"
        )
    return data.sort_by(HP)


def _split(
    alert_lake: AlertLake,
    table: str,
    key: int,
    files: Iterable[FileEntry],
    name: str,
    crowded_rows: int,
    max_order: int,
) -> _Split:
    """Read partition `key` and write its rows as one file per leaf of its split (`plan_split`)."""
    from dac_lake.alerts.writer import COMPACT_COMPRESSION_LEVEL, HP

    files = list(files)
    data = _read_all(alert_lake, table, key, files)
    splits, leaves = plan_split(data.column(HP).to_numpy(), key, crowded_rows, max_order)
    out = _Split(table, key, {f.name for f in files}, splits, {}, data.num_rows)

    def write(leaf: tuple[int, int, int]) -> tuple[int, FileEntry, pa.Table]:
        k, a, b = leaf
        part = data.slice(a, b - a)
        return (
            k,
            alert_lake.write_file(table, k, name, part, compression_level=COMPACT_COMPRESSION_LEVEL),
            part,
        )

    for k, entry, part in alert_lake._map(write, leaves):
        out.leaves[k] = [entry]
        _keep(out, k, entry.name, part)
    return out


def _add_to_split(alert_lake: AlertLake, sp: _Split, extra: list[FileEntry], seq: int) -> None:
    """Route the rows of files a commit added to a partition after `sp` read it into `sp`'s leaves (new
    small files next to the leaves' merged ones; a later compaction merges them)."""
    from dac_lake.alerts.writer import HP, key_slices

    data = _read_all(alert_lake, sp.table, sp.key, extra)
    # the leaves below `sp.key` (itself split): route from its order through the splits `sp` makes
    keys = TableState({}, frozenset(sp.splits)).route(
        data.column(HP).to_numpy(), alayout.order_pixel(sp.key)[0]
    )
    name = alayout.compacted_file_name(seq, uuid.uuid4().hex[:10])
    for k, a, b in key_slices(keys):
        part = data.slice(a, b - a)
        entry = alert_lake.write_file(sp.table, k, name, part)
        sp.leaves.setdefault(k, []).append(entry)
        _keep(sp, k, name, part)
    sp.covered |= {f.name for f in extra}
    sp.rows += data.num_rows


def _cache_value(table: str, data: pa.Table) -> tuple[str, object] | None:
    """What the writer's look-up cache keeps of a file with rows `data` (its ids, or its upper-limit keys)."""
    from dac_lake.alerts.writer import KEYS, _ul_keys

    if table in (alayout.DETECTIONS, alayout.ALERTS):
        return "ids", data.column(KEYS[table]).to_numpy()
    if table == alayout.UPPER_LIMITS:
        return "keys", _ul_keys(data)
    return None


def _keep(sp: _Split, key: int, name: str, data: pa.Table) -> None:
    cached = _cache_value(sp.table, data)
    if cached is not None:
        sp.cached[(key, name)] = cached


def _commit_changes(
    alert_lake: AlertLake,
    base: Snapshot,
    merges: list[_Merge],
    splits: list[_Split],
    retries: int,
    report: CompactionReport,
    before_commit: Callable[[], None] | None,
    crowded_rows: int,
    max_order: int,
) -> tuple[Snapshot | None, list[_Merge], list[_Split]]:
    """Publish the merges and splits as one snapshot, re-applying them on top of commits that raced us
    (module docstring)."""
    on = base
    for _ in range(max(1, retries)):
        tables = dict(on.tables)
        applied: list[_Merge] = []
        applied_splits: list[_Split] = []
        for i, sp in enumerate(splits):
            state = tables.get(sp.table) or TableState()
            if not state.is_leaf(sp.key, on.order):
                continue  # another compaction split it first: our files are orphans for gc
            current = state.files(sp.key)
            names = {f.name for f in current}
            if not names:
                continue  # emptied meanwhile (objects moved away): nothing to split
            if not sp.covered <= names:  # replaced meanwhile (objects copy-on-write): split what is there
                sp = splits[i] = _split(
                    alert_lake, sp.table, sp.key, current,
                    alayout.compacted_file_name(on.seq + 1, uuid.uuid4().hex[:10]), crowded_rows, max_order,
                )  # fmt: skip
            elif names - sp.covered:  # commits added files since we read it: route them to the children
                _add_to_split(alert_lake, sp, [f for f in current if f.name not in sp.covered], on.seq + 1)
            changes: dict[int, list[FileEntry]] = {sp.key: []}
            changes.update(sp.leaves)
            tables[sp.table] = state.updated(changes, sp.splits)
            applied_splits.append(sp)
        for m in merges:
            state = tables.get(m.table) or TableState()
            current = state.files(m.pixel)
            names = {f.name for f in current}
            if not set(m.inputs) <= names:
                continue  # another compaction got there first: our merged file is an orphan for gc
            rest = [f for f in current if f.name not in set(m.inputs)]
            tables[m.table] = state.updated({m.pixel: [m.output, *rest]})
            applied.append(m)
        if not applied and not applied_splits:
            return None, [], []
        snapshot = on.successor(
            tables=tables,
            operation="compact",
            batches=(),
            by=writer_id(),
            stats={
                "merged_pixels": len(applied),
                "files_before": sum(len(m.inputs) for m in applied)
                + sum(len(s.covered) for s in applied_splits),
                "split_partitions": [f"{s.table}:{alayout.key_name(s.key)}" for s in applied_splits],
            },
        )
        if before_commit is not None:
            before_commit()
        try:
            return alert_lake.snapshots.create(snapshot), applied, applied_splits
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
