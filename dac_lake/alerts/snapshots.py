"""Snapshots of an alert stream: which files make up each table, committed with one create-only write.

A snapshot (`alerts/<stream>/snapshots/000123.json`) lists, per table, per partition (a HEALPix pixel at the
stream's order, or at a finer one where compaction split a crowded partition: `TableState`), the data files
and their row counts, plus the ingest's source position (Kafka offsets, or the position in a replayed file)
and the batches it added. The newest snapshot *is* the stream's state; nothing else is. Writers add files
first and then create snapshot N+1 with a create-only PUT (S3 `If-None-Match: *`, link(2) locally): a crash
before that write leaves snapshot N current and complete, and of two writers that both read N only one can
create N+1 — the other gets `CommitConflict`, never a silent overwrite. This is the release pointer's scheme
(`dac_lake.lake`) applied to a table that grows by micro-batches.

Readers (the query registry, TAP, `dac_lake.connect`) read the newest snapshot's file list, so they see whole
batches only and never files of a batch being written, nor orphans of a crashed one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from dac_lake.alerts import layout as alayout
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "dac-lake-alert-snapshot"
STREAM_FORMAT = "dac-lake-alert-stream"
FORMAT_VERSION = 1
#: version 2 snapshots key partitions by `order/pixel` and list split partitions (mixed orders); a snapshot
#: whose tables are all at the stream's order is still written as version 1, readable by older releases
SNAPSHOT_VERSION = 2
#: batch ids remembered in each snapshot, so that a replay of a whole committed batch is recognised at once
#: (row-level de-duplication makes any replay harmless; this only makes it cheap)
RECENT_BATCHES = 1000


class AlertLakeError(RuntimeError):
    """An alert-lake operation cannot be done; the message says why and what to do."""


class CommitConflict(AlertLakeError):
    """Another writer created the snapshot this commit wanted to create: nothing of ours was published."""


class PartitionsChanged(CommitConflict):
    """A compaction split partitions this commit wrote to (or rewrote the objects) after the commit read
    its snapshot: the batch's files are at the old partitioning and cannot be re-applied. Nothing was
    published; committing the batch again from the new snapshot is safe (rows are de-duplicated by id), and
    `AlertLake.commit` does so itself."""


@dataclass(frozen=True)
class FileEntry:
    """One immutable data file of a partition and its row count."""

    name: str
    rows: int


@dataclass(frozen=True)
class TableState:
    """The files of one table in one snapshot: partition -> files (a partition with no files is absent).

    Partitions are keyed by NUNIQ (`layout.partition_key(order, pixel)`), so they may be at several orders:
    the stream's order, and finer ones where compaction split a crowded partition. `splits` holds the keys of
    the partitions that were split into their four children: the partitioning of a table is the tree they
    make below the stream's order, and its leaves are where rows live. It is recorded explicitly, not
    inferred from which partitions have files, because a row falling in a split region must go to the child
    at the child's order even when that child has no file yet (`route`): never back to the parent, whose
    files are no longer listed."""

    pixels: Mapping[int, tuple[FileEntry, ...]] = field(default_factory=dict)
    splits: frozenset[int] = frozenset()

    @property
    def rows(self) -> int:
        return sum(f.rows for files in self.pixels.values() for f in files)

    @property
    def n_files(self) -> int:
        return sum(len(files) for files in self.pixels.values())

    def files(self, key: int) -> tuple[FileEntry, ...]:
        return self.pixels.get(key, ())

    def pixel_rows(self, key: int) -> int:
        return sum(f.rows for f in self.pixels.get(key, ()))

    def names(self) -> set[tuple[int, str]]:
        return {(p, f.name) for p, files in self.pixels.items() for f in files}

    def orders(self) -> list[int]:
        """The orders of the partitions that hold files."""
        return sorted({alayout.order_pixel(k)[0] for k in self.pixels})

    def partitions(self) -> list[list[int]]:
        """[order, pixel, rows] per partition, in `_healpix_29` order: the shape of a release manifest's
        partitions (the query engine prunes them by their spans, whatever their orders)."""
        keys = sorted(self.pixels, key=lambda k: alayout.key_range29(k)[0])
        return [[*alayout.order_pixel(k), self.pixel_rows(k)] for k in keys]

    @cached_property
    def _split_array(self) -> np.ndarray:
        return np.array(sorted(self.splits), dtype=np.int64)

    def route(self, hp29: np.ndarray, base_order: int) -> np.ndarray:
        """The key of the leaf partition each `_healpix_29` value belongs to: its order-`base_order` pixel,
        then its child at the next order for as long as that partition is split (one vectorised pass per
        order of depth; sorted input gives sorted, contiguous runs of keys)."""
        hp29 = np.asarray(hp29, dtype=np.int64)
        keys = (4 << (2 * base_order)) + (hp29 >> (2 * (29 - base_order)))
        if not self.splits or len(hp29) == 0:
            return keys
        split = self._split_array
        orders = np.full(len(keys), base_order, dtype=np.int64)
        active = np.isin(keys, split)
        while active.any():
            idx = np.flatnonzero(active)
            o = orders[idx] + 1
            keys[idx] = (np.int64(4) << (2 * o)) + (hp29[idx] >> (2 * (29 - o)))
            orders[idx] = o
            active[idx] = np.isin(keys[idx], split)
        return keys

    def is_leaf(self, key: int, base_order: int) -> bool:
        """True if rows of `key`'s region live in `key` itself (not split, and every ancestor down from the
        stream's order split)."""
        order, pixel = alayout.order_pixel(key)
        if order < base_order or key in self.splits:
            return False
        return all(
            alayout.partition_key(o, pixel >> (2 * (order - o))) in self.splits
            for o in range(base_order, order)
        )

    def check(self, base_order: int, what: str = "table") -> None:
        """Refuse an inconsistent partitioning (files in a partition that is not a leaf, a split below a
        partition that is not split): such a snapshot would hide rows from readers or route rows wrongly."""
        if not self.splits and all(alayout.order_pixel(k)[0] == base_order for k in self.pixels):
            return  # the single-order table every stream starts as
        for key in self.splits:
            order, pixel = alayout.order_pixel(key)
            parent_ok = order == base_order or alayout.partition_key(order - 1, pixel >> 2) in self.splits
            if order < base_order or order >= alayout.MAX_ORDER or not parent_ok:
                raise AlertLakeError(f"{what}: partition {alayout.key_name(key)} cannot be split")
        for key in self.pixels:
            if not self.is_leaf(key, base_order):
                raise AlertLakeError(
                    f"{what}: partition {alayout.key_name(key)} holds files but is not a leaf of the "
                    "partitioning; refusing to write this snapshot"
                )

    def updated(self, changes: Mapping[int, Iterable[FileEntry]], splits: Iterable[int] = ()) -> TableState:
        """A copy with each partition of `changes` set to the given files (no files: the partition is
        removed), and `splits` added to the split partitions."""
        pixels = dict(self.pixels)
        for key, files in changes.items():
            files = tuple(f for f in files if f.rows > 0)
            if files:
                pixels[int(key)] = files
            else:
                pixels.pop(int(key), None)
        return TableState(pixels, self.splits | frozenset(int(k) for k in splits))

    def is_legacy(self, base_order: int) -> bool:
        """True if the table is partitioned at the stream's order only (the snapshot format of version 1
        describes it, and older readers can read it)."""
        return not self.splits and all(alayout.order_pixel(k)[0] == base_order for k in self.pixels)

    def to_json(self, base_order: int) -> dict[str, Any]:
        if self.is_legacy(base_order):
            pixels = {alayout.order_pixel(k)[1]: self.pixels[k] for k in self.pixels}
            return {
                "rows": self.rows,
                "pixels": {str(p): [[f.name, f.rows] for f in pixels[p]] for p in sorted(pixels)},
            }
        return {
            "rows": self.rows,
            "partitions": {
                alayout.key_name(k): [[f.name, f.rows] for f in self.pixels[k]] for k in sorted(self.pixels)
            },
            "splits": [alayout.key_name(k) for k in sorted(self.splits)],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base_order: int) -> TableState:
        """Both forms: `partitions` keyed `order/pixel` with `splits` (version 2), or the single-order
        `pixels` keyed by the pixel at the stream's order (version 1)."""
        if "partitions" in data:
            return cls(
                {
                    alayout.parse_key_name(k): tuple(FileEntry(str(n), int(r)) for n, r in fs)
                    for k, fs in data["partitions"].items()
                },
                frozenset(alayout.parse_key_name(k) for k in data.get("splits", ())),
            )
        return cls(
            {
                alayout.partition_key(base_order, int(p)): tuple(FileEntry(str(n), int(r)) for n, r in fs)
                for p, fs in data["pixels"].items()
            }
        )


@dataclass(frozen=True)
class Snapshot:
    """The content of `snapshots/NNNNNN.json`."""

    stream: str
    seq: int
    order: int
    tables: Mapping[str, TableState]
    created_at: str = ""
    created_unix: float = 0.0
    operation: str = "commit"  # commit | compact
    previous: int | None = None
    batches: tuple[str, ...] = ()
    recent_batches: tuple[str, ...] = ()
    source_position: Any = None
    stats: Mapping[str, Any] = field(default_factory=dict)
    by: str = ""

    @classmethod
    def empty(cls, stream: str, order: int) -> Snapshot:
        """The state before the first commit (never stored: seq 0)."""
        return cls(stream, 0, order, {t: TableState() for t in alayout.TABLES})

    def table(self, name: str) -> TableState:
        return self.tables.get(name) or TableState()

    def rows(self, name: str) -> int:
        return self.table(name).rows

    def referenced(self) -> set[str]:
        """Lake paths of every data file this snapshot references."""
        out = set()
        for table, state in self.tables.items():
            for key, files in state.pixels.items():
                for f in files:
                    out.add(alayout.key_file(self.stream, table, key, f.name))
        return out

    def route(self, table: str, hp29: np.ndarray) -> np.ndarray:
        """The partition key of each `_healpix_29` value in `table` (`TableState.route`)."""
        return self.table(table).route(hp29, self.order)

    def check(self) -> None:
        for table, state in self.tables.items():
            state.check(self.order, f"{self.stream}.{table}")

    def successor(self, **changes: Any) -> Snapshot:
        """The next snapshot (seq + 1) with `changes`; timestamps are set when it is written."""
        return replace(self, seq=self.seq + 1, previous=self.seq if self.seq else None, **changes)

    def to_json(self) -> bytes:
        legacy = all(s.is_legacy(self.order) for s in self.tables.values())
        doc = {
            "format": SNAPSHOT_FORMAT,
            "version": FORMAT_VERSION if legacy else SNAPSHOT_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "previous": self.previous,
            "operation": self.operation,
            "created_at": self.created_at,
            "created_unix": self.created_unix,
            "by": self.by,
            "order": self.order,
            "batches": list(self.batches),
            "recent_batches": list(self.recent_batches),
            "source_position": self.source_position,
            "stats": dict(self.stats),
            "tables": {t: s.to_json(self.order) for t, s in self.tables.items()},
        }
        # compact: a stream's snapshot lists every file, and is re-read by every reader after each commit
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Snapshot:
        doc = json.loads(data)
        if doc.get("format") != SNAPSHOT_FORMAT:
            raise AlertLakeError("not an alert-stream snapshot")
        if int(doc.get("version", 0)) > SNAPSHOT_VERSION:
            raise AlertLakeError(
                f"alert snapshot format {doc['version']} is newer than this dac-lake supports: upgrade"
            )
        order = int(doc["order"])
        return cls(
            stream=doc["stream"],
            seq=int(doc["seq"]),
            order=order,
            tables={t: TableState.from_json(s, order) for t, s in doc["tables"].items()},
            created_at=doc.get("created_at", ""),
            created_unix=float(doc.get("created_unix", 0.0)),
            operation=doc.get("operation", "commit"),
            previous=doc.get("previous"),
            batches=tuple(doc.get("batches", ())),
            recent_batches=tuple(doc.get("recent_batches", ())),
            source_position=doc.get("source_position"),
            stats=doc.get("stats", {}),
            by=doc.get("by", ""),
        )


@dataclass(frozen=True)
class StreamConfig:
    """`alerts/<stream>/stream.json`: fixed when the stream is created (create-only)."""

    stream: str
    order: int
    groups: tuple[str, ...]
    title: str
    description: str
    #: table -> catalog definition (as `CatalogDef.to_dict()`), copied from catalogs/alerts_<table>.yaml
    #: at creation, so the service publishes the metadata with no access to the repository
    definitions: Mapping[str, dict[str, Any]]
    created_at: str = ""

    def to_json(self) -> bytes:
        doc = {
            "format": STREAM_FORMAT,
            "version": FORMAT_VERSION,
            "stream": self.stream,
            "order": self.order,
            "groups": list(self.groups),
            "title": self.title,
            "description": self.description,
            "created_at": self.created_at,
            "definitions": dict(self.definitions),
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> StreamConfig:
        doc = json.loads(data)
        if doc.get("format") != STREAM_FORMAT:
            raise AlertLakeError("not an alert-stream config")
        if int(doc.get("version", 0)) > FORMAT_VERSION:
            raise AlertLakeError(f"alert stream format {doc['version']} is newer than this dac-lake supports")
        return cls(
            stream=doc["stream"],
            order=int(doc["order"]),
            groups=tuple(doc.get("groups") or ("public",)),
            title=doc.get("title", ""),
            description=doc.get("description", ""),
            definitions=doc["definitions"],
            created_at=doc.get("created_at", ""),
        )


def list_streams(storage: LakeStorage) -> list[str]:
    """Streams of the lake (folders under `alerts/` that hold a stream.json)."""
    out = []
    for name in storage.list_dir(alayout.ALERTS_PREFIX):
        try:
            alayout.check_stream_name(name)
        except ValueError:
            continue
        out.append(name)
    return out


def read_stream_config(storage: LakeStorage, stream: str) -> StreamConfig | None:
    try:
        return StreamConfig.from_json(storage.read_bytes(alayout.stream_file(stream)))
    except FileNotFoundError:
        return None


class SnapshotStore:
    """The snapshot objects of one stream."""

    def __init__(self, storage: LakeStorage, stream: str):
        self.storage = storage
        self.stream = alayout.check_stream_name(stream)

    def history(self) -> list[int]:
        names = self.storage.list_dir(alayout.snapshots_prefix(self.stream))
        return sorted(s for s in (alayout.snapshot_seq(n) for n in names) if s is not None)

    def read(self, seq: int) -> Snapshot:
        return Snapshot.from_json(self.storage.read_bytes(alayout.snapshot_key(self.stream, seq)))

    def latest(self) -> Snapshot | None:
        """The newest snapshot; None before the first commit. If gc removes the newest-but-one while we
        list, the newest is still there (gc never removes it), so the listing's maximum is always readable."""
        history = self.history()
        return self.read(history[-1]) if history else None

    def create(self, snapshot: Snapshot) -> Snapshot:
        """Write `snapshot` create-only; `CommitConflict` if its number is taken. Returns it as written."""
        from dac_lake.lake import utcnow

        snapshot.check()
        now = time.time()
        snapshot = replace(snapshot, created_at=utcnow(), created_unix=now)
        key = alayout.snapshot_key(self.stream, snapshot.seq)
        if not self.storage.put_if_absent(key, snapshot.to_json()):
            raise CommitConflict(
                f"alert stream {self.stream!r}: another writer created snapshot #{snapshot.seq} first; "
                "this batch was not committed (its files are orphans for gc). Reload and retry."
            )
        return snapshot

    def delete(self, seq: int) -> None:
        self.storage.delete_file(alayout.snapshot_key(self.stream, seq))


def writer_id() -> str:
    """Who writes a snapshot: user@host:pid (for the audit trail the snapshot history is)."""
    return f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}:{os.getpid()}"


def recent_batches(previous: tuple[str, ...], added: Iterable[str]) -> tuple[str, ...]:
    out = list(previous) + [b for b in added if b not in previous]
    return tuple(out[-RECENT_BATCHES:])


def registry_manifest(config: StreamConfig, snapshot: Snapshot, table: str) -> dict[str, Any]:
    """What the query registry needs of one alert table: partitions with row counts (as a release
    manifest has them) and the files of each partition (`pixel_files`), read by `LakeTable.files`."""
    state = snapshot.table(table)
    definition = config.definitions[table]
    return {
        "kind": "alerts",
        "stream": config.stream,
        "table": table,
        "snapshot": snapshot.seq,
        "created_at": snapshot.created_at,
        "rows": state.rows,
        "order": snapshot.order,
        "dataset_prefix": alayout.dataset_prefix(config.stream, table),
        "catalog_path": table,
        "id_column": definition.get("id_column"),
        "ra_column": definition.get("ra_column"),
        "dec_column": definition.get("dec_column"),
        "partitions": state.partitions(),
        "pixel_files": {
            alayout.key_name(k): [f.name for f in files] for k, files in sorted(state.pixels.items())
        },
    }
