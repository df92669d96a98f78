"""Watchmaps: sky regions uploaded as MOCs, matched against every alert batch at once.

A MOC is a set of HEALPix cells of mixed orders; a cell of order d is the block of `_healpix_29` values
[c << 2(29-d), (c+1) << 2(29-d)). So a position is inside a MOC exactly when, at one of the orders the MOC
uses, its `_healpix_29 >> 2(29-d)` is one of the MOC's cells. All watchmaps' cells are kept in one sorted
array of NUNIQ keys (4 * 4**d + cell) with the watchmap of each; a batch is matched with one
`np.searchsorted` per order present: no loop over watchmaps, and each watchmap costs only its own cells
(a segment tree of ranges would do the same work; the MOC already *is* one).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.alerts_broker.store import (
    BrokerError,
    BrokerRecord,
    BrokerStore,
    Owner,
    hits_prefix,
    owner_name,
    read_tables,
)
from dac_lake.alerts_broker.watchlists import SPATIAL_INDEX_ORDER, _expand, healpix29, label, uniq_key

log = logging.getLogger(__name__)

#: a MOC this fine is a list of points, not a region; refuse before it costs memory in every ingest
MAX_CELLS = 2_000_000
MAX_UPLOAD_BYTES = 64 * 1024 * 1024

HITS_SCHEMA = pa.schema(
    [
        pa.field("watchmap_id", pa.string()),
        pa.field("owner", pa.string()),
        pa.field("object_id", pa.string()),
        pa.field("alert_id", pa.int64()),
        pa.field("detection_id", pa.int64()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("mjd", pa.float64()),
    ]
)


class WatchmapError(BrokerError):
    """An upload that is not a usable spatial MOC; the message says what is wrong."""


def parse_moc(data: bytes | str, fmt: str | None = None):  # -> mocpy.MOC
    """A FITS MOC (bytes), an ASCII MOC string ("3/1-4 5/100") or a JSON MOC ({"3": [1, 2]}) -> a MOC.

    `fmt` ("fits", "ascii", "json") or sniffed: FITS starts with SIMPLE, JSON with '{'."""
    from mocpy import MOC

    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_UPLOAD_BYTES:
        raise WatchmapError(f"the MOC upload is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    if not data.strip():
        raise WatchmapError("the MOC upload is empty")
    if fmt is None:
        head = data.lstrip()[:16]
        fmt = "fits" if data.startswith(b"SIMPLE") else "json" if head.startswith(b"{") else "ascii"
    fmt = fmt.lower()
    try:
        if fmt == "fits":
            moc = MOC.from_fits(io.BytesIO(data))
        elif fmt == "json":
            text = data.decode("utf-8")
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise WatchmapError('a JSON MOC is an object of order -> cells, e.g. {"3": [1, 2]}')
            moc = MOC.from_string(text, format="json")
        elif fmt == "ascii":
            moc = MOC.from_string(data.decode("utf-8").strip(), format="ascii")
        else:
            raise WatchmapError(f"unknown MOC format {fmt!r}: use fits, ascii or json")
    except WatchmapError:
        raise
    except BaseException as exc:  # mocpy's Rust parser panics (pyo3 PanicException) on some bad input
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise WatchmapError(
            f"cannot read the upload as a MOC ({fmt}): {str(exc).strip() or type(exc).__name__}"
        ) from None
    if not isinstance(moc, MOC):
        raise WatchmapError(f"the upload is a {type(moc).__name__}, not a spatial MOC")
    if moc.empty():
        raise WatchmapError("the MOC is empty: it covers no part of the sky")
    cells = len(moc.uniq_hpx)
    if cells > MAX_CELLS:
        raise WatchmapError(
            f"the MOC has {cells} cells; at most {MAX_CELLS} are allowed (degrade it, e.g. "
            "moc.degrade_to_order(12))"
        )
    return moc


def moc_to_fits(moc) -> bytes:
    sink = io.BytesIO()
    moc.serialize(format="fits").writeto(sink)
    return sink.getvalue()


def moc_from_fits(data: bytes):
    from mocpy import MOC

    return MOC.from_fits(io.BytesIO(data))


def moc_keys(moc) -> np.ndarray:
    """The MOC's cells as sorted NUNIQ keys (int64)."""
    keys = np.asarray(moc.uniq_hpx, dtype=np.uint64).astype(np.int64)
    keys.sort()
    return keys


def key_orders(keys: np.ndarray) -> np.ndarray:
    """Orders of NUNIQ keys (order = floor(log2(key / 4) / 2))."""
    # a key of order d lies in [4**(d+1), 4**(d+2)): count the powers of 4 not above it (integers only;
    # float log2 would round the largest keys of deep orders up to the next power)
    powers = np.int64(1) << (2 * np.arange(32, dtype=np.int64))
    return np.searchsorted(powers, np.asarray(keys, dtype=np.int64), side="right").astype(np.int64) - 2


@dataclass
class _Map:
    number: int
    id: str
    owner: str
    content: str
    keys: np.ndarray
    active: bool = True


@dataclass
class WatchmapIndex:
    """Every watchmap's cells in one sorted array. Rebuilt (a sort of all cells) when watchmaps change:
    MOCs are small next to watchlists, and a rebuild of a million cells takes well under a second."""

    maps: dict[str, _Map] = field(default_factory=dict)
    seconds_last_match: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._keys = np.empty(0, np.int64)
        self._map_of = np.empty(0, np.int32)
        self._orders = np.empty(0, np.int64)
        self._numbers: dict[int, _Map] = {}
        self._next = 0

    @property
    def cells(self) -> int:
        return len(self._keys)

    def watchmaps(self) -> list[str]:
        return sorted(m.id for m in self.maps.values() if m.active)

    def _rebuild(self) -> None:
        live = [m for m in self.maps.values() if m.active]
        if live:
            keys = np.concatenate([m.keys for m in live])
            owner = np.concatenate([np.full(len(m.keys), m.number, np.int32) for m in live])
            idx = np.argsort(keys, kind="stable")
            keys, owner = keys[idx], owner[idx]
        else:
            keys, owner = np.empty(0, np.int64), np.empty(0, np.int32)
        self._keys, self._map_of = keys, owner
        self._orders = np.unique(key_orders(keys))
        self._numbers = {m.number: m for m in self.maps.values()}

    def add(self, maps: Sequence[tuple[str, str, str, object]]) -> None:
        """Add (id, owner, content key, MOC) watchmaps, replacing those of the same ids."""
        with self._lock:
            for wm_id, owner, content, moc in maps:
                self.maps[wm_id] = _Map(self._next, wm_id, owner, content, moc_keys(moc))
                self._next += 1
            self._rebuild()

    def sync(self, records: Sequence[BrokerRecord], load: Callable[[BrokerRecord], object]) -> bool:
        """Hold exactly the watchmaps of `records` (inactive ones paused); loads only changed MOCs."""
        wanted = {r.id: r for r in records}
        loaded = {}
        for r in records:
            current = self.maps.get(r.id)
            if current is None or current.content != r.blobs.get("moc", ""):
                loaded[r.id] = load(r)
        with self._lock:
            changed = False
            for wm_id in [i for i in self.maps if i not in wanted]:
                del self.maps[wm_id]
                changed = True
            for r in records:
                if r.id in loaded:
                    self.maps[r.id] = _Map(
                        self._next, r.id, r.owner, r.blobs.get("moc", ""), moc_keys(loaded[r.id])
                    )
                    self._next += 1
                    changed = True
                m = self.maps[r.id]
                m.owner = r.owner
                if m.active != r.active:
                    m.active = r.active
                    changed = True
            if changed:
                self._rebuild()
        return changed

    def match(self, hp29: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, _Map]]:
        """(batch row, watchmap number) of every position inside a watchmap (rows with hp29 < 0 skipped),
        and the watchmaps by number as they were when the match started."""
        with self._lock:
            keys, map_of, orders = self._keys, self._map_of, self._orders
            by_number = {n: replace(m) for n, m in self._numbers.items()}
        hp29 = np.asarray(hp29, dtype=np.int64)
        valid = np.flatnonzero(hp29 >= 0)
        # sorted needles make numpy's binary searches walk forward through the keys (several times faster)
        valid = valid[np.argsort(hp29[valid], kind="stable")]
        rows_out, maps_out = [], []
        for order in orders.tolist():
            # keys of one order are one contiguous run: [4**(order+1), 4**(order+2))
            start, stop = np.searchsorted(keys, [1 << (2 * order + 2), 1 << (2 * order + 4)])
            run = keys[start:stop]
            q = uniq_key(order, hp29[valid] >> (2 * (SPATIAL_INDEX_ORDER - order)))
            lo = np.searchsorted(run, q, side="left")
            hi = np.searchsorted(run, q, side="right")
            qi, pos = _expand(lo, hi)
            pos += start
            rows_out.append(valid[qi])
            maps_out.append(map_of[pos])
        if not rows_out:
            return np.empty(0, np.int64), np.empty(0, np.int32), by_number
        return np.concatenate(rows_out), np.concatenate(maps_out), by_number

    def match_table(
        self, batch: pa.Table, on: str = "objects", owners: Iterable[str] | None = None
    ) -> pa.Table:
        """Hits (`HITS_SCHEMA`) of a batch's objects or detections, sorted by watchmap and object."""
        if on not in ("objects", "detections"):
            raise ValueError("on must be 'objects' or 'detections'")
        if batch.num_rows == 0:
            return HITS_SCHEMA.empty_table()
        t0 = time.perf_counter()
        ra = batch.column("ra").to_numpy(zero_copy_only=False).astype(np.float64)
        dec = batch.column("dec").to_numpy(zero_copy_only=False).astype(np.float64)
        if "_healpix_29" in batch.column_names:
            hp29 = batch.column("_healpix_29").to_numpy()
        else:
            hp29 = healpix29(ra, dec)
        rows, numbers, by_number = self.match(hp29)
        if owners is not None:
            allowed = set(owners)
            ok = np.zeros(max(by_number, default=0) + 1, dtype=bool)
            ok[[n for n, m in by_number.items() if m.owner in allowed]] = True
            keep = ok[numbers]
            rows, numbers = rows[keep], numbers[keep]
        self.seconds_last_match = time.perf_counter() - t0
        if len(rows) == 0:
            return HITS_SCHEMA.empty_table()
        take = pa.array(rows)
        if on == "objects":
            alert, det = batch.column("last_alert_id").take(take), pa.nulls(len(rows), pa.int64())
            mjd = batch.column("last_mjd").take(take)
        else:
            alert, det = batch.column("alert_id").take(take), batch.column("detection_id").take(take)
            mjd = batch.column("mjd").take(take)
        table = pa.table(
            {
                "watchmap_id": label(numbers, {n: m.id for n, m in by_number.items()}),
                "owner": label(numbers, {n: m.owner for n, m in by_number.items()}),
                "object_id": batch.column("object_id").take(take).cast(pa.string()),
                "alert_id": alert.cast(pa.int64()),
                "detection_id": det.cast(pa.int64()),
                "ra": ra[rows],
                "dec": dec[rows],
                "mjd": mjd.cast(pa.float64()),
            },
            schema=HITS_SCHEMA,
        )
        return table.sort_by([("watchmap_id", "ascending"), ("object_id", "ascending")])


# --------------------------------------------------------------------------- the owner-facing service


class WatchmapService:
    """Upload, list, edit, pause and delete watchmaps, and read their hits, for their owners."""

    def __init__(self, store: BrokerStore):
        self.store = store

    @staticmethod
    def _parts(moc) -> tuple[dict, dict]:
        spec = {
            "sky_fraction": float(moc.sky_fraction),
            "cells": len(moc.uniq_hpx),
            "max_order": int(moc.max_order),
        }
        return spec, {"moc": moc_to_fits(moc)}

    def create(
        self, owner: Owner, name: str, data: bytes | str, fmt: str | None = None, active: bool = True
    ) -> BrokerRecord:
        owner_name(owner)
        spec, blobs = self._parts(parse_moc(data, fmt))
        return self.store.create("watchmaps", owner, name, spec, blobs=blobs, active=active)

    def list(self, owner: Owner) -> list[BrokerRecord]:
        return self.store.records("watchmaps", owner_name(owner))

    def get(self, owner: Owner, watchmap_id: str) -> BrokerRecord:
        return self.store.get("watchmaps", watchmap_id, owner)

    def moc(self, owner: Owner, watchmap_id: str):
        return self.load(self.get(owner, watchmap_id))

    def load(self, record: BrokerRecord):
        """The MOC of a record (no ownership check: for the matcher)."""
        return moc_from_fits(self.store.read_blob(record, "moc"))

    def update(
        self,
        owner: Owner,
        watchmap_id: str,
        *,
        name: str | None = None,
        data: bytes | str | None = None,
        fmt: str | None = None,
        active: bool | None = None,
        expected_version: int | None = None,
    ) -> BrokerRecord:
        spec, blobs = self._parts(parse_moc(data, fmt)) if data is not None else (None, None)
        return self.store.update(
            "watchmaps",
            watchmap_id,
            owner,
            name=name,
            spec=spec,
            blobs=blobs,
            active=active,
            expected_version=expected_version,
        )

    def pause(self, owner: Owner, watchmap_id: str) -> BrokerRecord:
        return self.store.update("watchmaps", watchmap_id, owner, active=False)

    def resume(self, owner: Owner, watchmap_id: str) -> BrokerRecord:
        return self.store.update("watchmaps", watchmap_id, owner, active=True)

    def delete(self, owner: Owner, watchmap_id: str) -> None:
        self.store.delete("watchmaps", watchmap_id, owner)

    def hits(
        self,
        owner: Owner,
        watchmap_id: str | None = None,
        first_batch: int | None = None,
        last_batch: int | None = None,
    ) -> pa.Table:
        name = owner_name(owner)
        if watchmap_id is not None:
            self.get(owner, watchmap_id)
        table = read_tables(
            self.store.storage, hits_prefix(self.store.stream, "watchmaps"), first_batch, last_batch
        )
        if table is None:
            return HITS_SCHEMA.append(pa.field("_batch", pa.int64())).empty_table()
        mask = pc.equal(table.column("owner"), name)
        if watchmap_id is not None:
            mask = pc.and_(mask, pc.equal(table.column("watchmap_id"), watchmap_id))
        return table.filter(mask)
