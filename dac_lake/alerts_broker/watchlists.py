"""Watchlists: users' lists of sources (name, RA, Dec, radius), matched against every alert batch at once.

Matching is a HEALPix join, never a loop over watchlist entries. Every source of every active watchlist
sits in one sorted array of HEALPix keys; a batch computes, for each object, its cell and the 8 neighbours,
looks them all up with `np.searchsorted`, and runs the exact angular distance test (astropy's Vincenty
formula, the one `SkyCoord.separation` uses) on the few candidate pairs, each against its source's own
radius.

Why cell + neighbours is complete: a point within r of a source lies in the source's cell or one of its
neighbours as long as every cell is at least r wide. HEALPix cells are not squares; measured over the
whole sphere (poles, the polar-cap boundary, the 8 corners where a cell has only 7 neighbours, orders
2-12), a circle around any point stays inside the point's cell and its neighbours up to a radius of 0.68
times the mean cell size sqrt(pi/3)/2**k. A source is indexed at the finest order whose mean size is at
least `1 / CELL_WIDTH_FACTOR` = 2 times its radius (a 35% margin over the measurement), rounded down to
an even order, so sources are grouped into a few tiers by radius: one 1-degree source does not force a
coarse grid on a million 2-arcsec ones. Each source is keyed by its cell's NUNIQ number (4 * 4**k + cell),
so all tiers share one sorted array; a batch looks each distinct cell up once.

Changes (a new, edited, paused or deleted watchlist) do not rebuild the whole index: new content goes into
a small extra segment, removed content is masked out, and segments are merged when they pile up. This is
what keeps thousands of watchlists of 100k sources from stalling the ingest each time one user edits one.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy import units as u
from astropy.coordinates import Angle, angular_separation

from dac_lake.alerts_broker.store import (
    BrokerError,
    BrokerRecord,
    BrokerStore,
    Owner,
    hits_prefix,
    owner_name,
    read_tables,
)

log = logging.getLogger(__name__)

SPATIAL_INDEX_ORDER = 29
#: radius <= CELL_WIDTH_FACTOR * mean cell size (measured minimum: 0.68; see the module docstring)
CELL_WIDTH_FACTOR = 0.5
#: finer cells only add keys; 2**-20 of the mean size is ~0.2 arcsec
MAX_INDEX_ORDER = 20
#: sources are indexed at even orders only: cells at most 4x wider than needed, half as many passes
ORDER_STEP = 2
MAX_RADIUS_ARCSEC = 3600.0
DEFAULT_RADIUS_ARCSEC = 2.0
MAX_SOURCES = 1_000_000
MAX_NAME_CHARS = 200
MAX_ERRORS_SHOWN = 10
#: merge the small segments once there are more than this many
MAX_SEGMENTS = 6
#: rebuild a segment once this fraction of its rows belongs to removed watchlists
MAX_DEAD_FRACTION = 0.25

SOURCES_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("ra", pa.float64(), nullable=False),
        pa.field("dec", pa.float64(), nullable=False),
        pa.field("radius_arcsec", pa.float64(), nullable=False),
    ]
)

HITS_SCHEMA = pa.schema(
    [
        pa.field("watchlist_id", pa.string()),
        pa.field("owner", pa.string()),
        pa.field("source_name", pa.string()),
        pa.field("source_ra", pa.float64()),
        pa.field("source_dec", pa.float64()),
        pa.field("radius_arcsec", pa.float64()),
        pa.field("object_id", pa.string()),
        pa.field("alert_id", pa.int64()),
        pa.field("detection_id", pa.int64()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("mjd", pa.float64()),
        pa.field("separation_arcsec", pa.float64()),
    ]
)

_ALIASES = {
    "name": ("name", "source_name", "id", "source", "objname", "object", "object_name", "designation"),
    "ra": ("ra", "ra_deg", "raj2000", "ra_icrs", "radeg"),
    "dec": ("dec", "decl", "dec_deg", "dej2000", "decj2000", "de_icrs", "dedeg"),
    "radius_arcsec": ("radius_arcsec", "radius", "rad", "r_arcsec", "radius_as"),
}


class WatchlistError(BrokerError):
    """An upload that cannot be a watchlist; the message names the bad rows."""


# --------------------------------------------------------------------------- parsing and validation


def parse_sources(
    data: bytes | str,
    fmt: str | None = None,
    default_radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    max_sources: int = MAX_SOURCES,
) -> pa.Table:
    """An uploaded CSV or VOTable -> the validated sources table (`SOURCES_SCHEMA`).

    Columns are found by name, case-insensitively, with the usual aliases (RAJ2000, DEJ2000, id, ...); RA
    and Dec are ICRS degrees; a missing radius column or empty radius cell takes `default_radius_arcsec`.
    Other columns are ignored. Errors name the data row (1-based, header not counted) and the source.
    """
    from astropy.table import Table

    if isinstance(data, str):
        data = data.encode("utf-8")
    if not data.strip():
        raise WatchlistError("the upload is empty: send a CSV (name,ra,dec[,radius]) or a VOTable")
    fmt = (fmt or _sniff(data)).lower()
    if fmt not in ("csv", "votable"):
        raise WatchlistError(f"unknown watchlist format {fmt!r}: use csv or votable")
    try:
        if fmt == "csv":
            table = Table.read(io.BytesIO(data), format="ascii.csv", guess=False)
        else:
            table = Table.read(io.BytesIO(data), format="votable")
    except Exception as exc:  # astropy raises many kinds; the user needs the message, not the type
        raise WatchlistError(f"cannot read the upload as {fmt}: {exc}") from None
    if len(table) == 0:
        raise WatchlistError("the watchlist has no rows")
    if len(table) > max_sources:
        raise WatchlistError(f"the watchlist has {len(table)} rows; at most {max_sources} are allowed")
    cols = _find_columns(table.colnames)
    n = len(table)
    names = _names(table[cols["name"]]) if "name" in cols else None
    errors: list[tuple[int, str]] = []
    if names is None:
        raise WatchlistError(f"no name column (one of {', '.join(_ALIASES['name'])}); found {table.colnames}")
    ra = _floats(table[cols["ra"]], "ra", names, errors)
    dec = _floats(table[cols["dec"]], "dec", names, errors)
    if "radius_arcsec" in cols:
        radius = _floats(table[cols["radius_arcsec"]], "radius", names, errors, default=default_radius_arcsec)
    else:
        radius = np.full(n, float(default_radius_arcsec))
    bad = ~np.isnan(ra) & ((ra < -360) | (ra > 360))
    errors += [(i, f"ra {ra[i]:g} is outside [-360, 360] degrees") for i in np.flatnonzero(bad)]
    bad = ~np.isnan(dec) & ((dec < -90) | (dec > 90))
    errors += [(i, f"dec {dec[i]:g} is outside [-90, 90] degrees") for i in np.flatnonzero(bad)]
    bad = ~np.isnan(radius) & ((radius <= 0) | (radius > MAX_RADIUS_ARCSEC))
    errors += [
        (i, f"radius {radius[i]:g} arcsec is outside (0, {MAX_RADIUS_ARCSEC:g}]") for i in np.flatnonzero(bad)
    ]
    for i, name in enumerate(names):
        if not name.strip():
            errors.append((i, "the name is empty"))
        elif len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
            errors.append((i, f"the name must be at most {MAX_NAME_CHARS} printable characters"))
    if errors:
        errors.sort()
        shown = "; ".join(
            f"row {i + 1}" + (f" ({names[i]!r})" if names[i].strip() else "") + f": {msg}"
            for i, msg in errors[:MAX_ERRORS_SHOWN]
        )
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise WatchlistError(f"the watchlist has {len(errors)} bad rows: {shown}{more}")
    return pa.table(
        {"name": [s.strip() for s in names], "ra": wrap_ra(ra), "dec": dec, "radius_arcsec": radius},
        schema=SOURCES_SCHEMA,
    )


def _sniff(data: bytes) -> str:
    head = data.lstrip()[:200].lower()
    return "votable" if head.startswith((b"<?xml", b"<votable")) else "csv"


def _find_columns(colnames: Sequence[str]) -> dict[str, str]:
    lower = {c.lower().strip(): c for c in colnames}
    out = {}
    for key, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in lower:
                out[key] = lower[alias]
                break
    missing = [k for k in ("ra", "dec") if k not in out]
    if missing:
        raise WatchlistError(
            f"no {' or '.join(missing)} column: the watchlist needs name, ra, dec (degrees) and optionally "
            f"radius (arcsec); found columns {list(colnames)}"
        )
    return out


def _names(column) -> list[str]:
    values = column.tolist() if not hasattr(column, "mask") else np.ma.filled(column, "").tolist()
    return ["" if v is None else (v.decode() if isinstance(v, bytes) else str(v)) for v in values]


def _floats(column, what: str, names: list[str], errors: list, default: float | None = None) -> np.ndarray:
    """The column as float64; empty cells and non-numbers are errors (or `default`), NaN marks them."""
    mask = np.asarray(np.ma.getmaskarray(column)) if hasattr(column, "mask") else np.zeros(len(column), bool)
    out = np.full(len(column), np.nan)
    raw = np.ma.getdata(column) if hasattr(column, "mask") else np.asarray(column)
    if np.issubdtype(np.asarray(raw).dtype, np.number):
        out[~mask] = np.asarray(raw, dtype=np.float64)[~mask]
        bad_value = np.zeros(len(column), bool)
    else:
        bad_value = np.zeros(len(column), bool)
        for i, v in enumerate(np.asarray(raw).tolist()):
            if mask[i]:
                continue
            text = v.decode() if isinstance(v, bytes) else str(v)
            if not text.strip():
                mask[i] = True
                continue
            try:
                out[i] = float(text)
            except ValueError:
                bad_value[i] = True
                errors.append((i, f"{what} {text!r} is not a number (degrees or arcsec expected)"))
    nonfinite = ~mask & ~bad_value & ~np.isfinite(out)
    errors += [(i, f"{what} is not a finite number") for i in np.flatnonzero(nonfinite)]
    if default is not None:
        out[mask] = default
    else:
        errors += [(i, f"{what} is empty") for i in np.flatnonzero(mask)]
    out[nonfinite] = np.nan
    return out


def sources_to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def sources_from_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data)).cast(SOURCES_SCHEMA)


# --------------------------------------------------------------------------- HEALPix helpers


def order_for_radius(radius_arcsec: np.ndarray | float) -> np.ndarray:
    """Index order of sources of these radii: the finest order of the `ORDER_STEP` grid whose cells are
    safely wider than the radius. (Any coarser order would be correct too; the grid keeps the number of
    distinct orders, i.e. of look-up passes per batch, small when radii vary.)"""
    radius_rad = np.radians(np.asarray(radius_arcsec, dtype=np.float64) / 3600.0)
    mean_size = math.sqrt(math.pi / 3.0)
    with np.errstate(divide="ignore"):
        order = np.floor(np.log2(CELL_WIDTH_FACTOR * mean_size / radius_rad))
    order = np.clip(order, 0, MAX_INDEX_ORDER).astype(np.int64)
    return order - order % ORDER_STEP


def healpix29(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Nested order-29 index (the HATS `_healpix_29`) of valid positions, -1 for NaN/out-of-range ones."""
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix

    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    out = np.full(len(ra), -1, dtype=np.int64)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    if ok.any():
        out[ok] = lonlat_to_healpix(
            Longitude(ra[ok], u.deg), Latitude(dec[ok], u.deg), SPATIAL_INDEX_ORDER
        ).astype(np.int64)
    return out


def wrap_ra(ra: np.ndarray) -> np.ndarray:
    """RA in [0, 360) exactly as astropy's `Longitude` (and so `SkyCoord`) wraps it: `x % 360` would turn
    -1e-20 into 360.0, a different point for the separation formula."""
    from astropy.coordinates import Longitude

    return np.asarray(Longitude(np.asarray(ra, dtype=np.float64), u.deg).deg, dtype=np.float64)


def uniq_key(order: np.ndarray | int, cell: np.ndarray) -> np.ndarray:
    """NUNIQ numbering (4 * 4**order + cell): cells of all orders in one sortable int64 key space."""
    return (np.int64(1) << (2 * np.asarray(order, dtype=np.int64) + 2)) + cell


def separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular distance in arcsec with exactly the arithmetic of `SkyCoord.separation(...).arcsec`."""
    sep = angular_separation(
        u.Quantity(ra1, u.deg, copy=False),
        u.Quantity(dec1, u.deg, copy=False),
        u.Quantity(ra2, u.deg, copy=False),
        u.Quantity(dec2, u.deg, copy=False),
    )
    return np.asarray(Angle(sep, unit=u.degree).arcsec, dtype=np.float64)


def neighbour_keys(hp29: np.ndarray, orders: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, key) pairs: each valid position's cell and its neighbours at each order, as NUNIQ keys,
    without duplicates (at low orders a cell can be its own neighbour's neighbour)."""
    from cdshealpix.nested import neighbours

    valid = np.flatnonzero(hp29 >= 0)
    rows_out, keys_out = [], []
    for order in sorted(set(int(o) for o in orders)):
        if len(valid) == 0:
            break
        cells = hp29[valid] >> (2 * (SPATIAL_INDEX_ORDER - order))
        nb = np.asarray(neighbours(cells, order), dtype=np.int64)  # (n, 9), -1 where a corner has none
        nb.sort(axis=1)
        keep = nb >= 0
        keep[:, 1:] &= nb[:, 1:] != nb[:, :-1]
        rows_out.append(np.broadcast_to(valid[:, None], nb.shape)[keep])
        keys_out.append(uniq_key(order, nb[keep]))
    if not keys_out:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(rows_out), np.concatenate(keys_out)


def label(numbers: np.ndarray, names: dict[int, str]) -> pa.Array:
    """Strings for small integer codes (watchlist numbers -> ids) without a Python loop over rows."""
    codes = sorted(names)
    lut = np.full(max(codes, default=0) + 1, -1, dtype=np.int32)
    lut[codes] = np.arange(len(codes), dtype=np.int32)
    indices = pa.array(lut[np.asarray(numbers, dtype=np.int64)])
    dictionary = pa.array([names[c] for c in codes], pa.string())
    return pa.DictionaryArray.from_arrays(indices, dictionary).cast(pa.string())


def _expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For query i with matches lo[i]:hi[i] in a sorted array: (query index, array index) of each match."""
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    query = np.repeat(np.arange(len(lo), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, counts) + np.repeat(lo, counts)
    return query, pos


# --------------------------------------------------------------------------- the index


@dataclass
class _Segment:
    """Sources of some watchlists, sorted by NUNIQ key (one key space for every radius tier).

    Names are not copied: each watchlist's name column is kept as it was handed in (`names[wl]`), and a
    source points at its name by (`wl`, `row`). That saves the biggest copy of a build and lets a merge
    keep the names of the watchlists that survive as they are.
    """

    keys: np.ndarray  # int64, sorted
    ra: np.ndarray  # float64 degrees, in [0, 360)
    dec: np.ndarray
    radius: np.ndarray  # float64 arcsec
    wl: np.ndarray  # int32: number of the watchlist entry in the index
    row: np.ndarray  # int32: row of the source in its watchlist's table
    names: dict[int, pa.ChunkedArray]
    orders: np.ndarray  # orders present in `keys`
    sizes: dict[int, int] = field(default_factory=dict)  # rows per watchlist number

    def live_fraction(self, present: np.ndarray) -> float:
        """Share of rows whose watchlist is still present (O(watchlists), not O(rows))."""
        live = sum(rows for n, rows in self.sizes.items() if present[n])
        return live / max(1, self.rows)

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        arrays = (self.keys, self.ra, self.dec, self.radius, self.wl, self.row)
        return sum(a.nbytes for a in arrays) + sum(n.nbytes for n in self.names.values())

    @classmethod
    def build(cls, parts: Sequence[tuple[int, pa.Table]]) -> _Segment:
        """Sort the sources of `parts` ((entry number, sources table) pairs) by key. Peak memory is kept
        near the inputs plus the result (each unsorted array is dropped as soon as its sorted copy exists):
        the index of 100M sources must be built next to a running ingest."""
        if not parts:
            return cls.empty()

        def column(name: str) -> np.ndarray:
            return np.concatenate([t.column(name).to_numpy() for _, t in parts]).astype(
                np.float64, copy=False
            )

        ra = column("ra")
        out_of_range = np.flatnonzero((ra < 0) | (ra >= 360))
        if len(out_of_range):
            ra[out_of_range] = wrap_ra(ra[out_of_range])
        dec = column("dec")
        radius = column("radius_arcsec")
        order = order_for_radius(radius)
        orders = np.unique(order)
        keys = healpix29(ra, dec)
        np.right_shift(keys, 2 * (SPATIAL_INDEX_ORDER - order), out=keys)
        np.add(keys, np.left_shift(np.int64(1), 2 * order + 2), out=keys)
        del order
        idx = np.argsort(keys, kind="stable")

        def sort(a: np.ndarray) -> np.ndarray:
            return a[idx]

        keys = sort(keys)
        ra = sort(ra)
        dec = sort(dec)
        radius = sort(radius)
        wl = sort(np.concatenate([np.full(t.num_rows, n, dtype=np.int32) for n, t in parts]))
        row = sort(np.concatenate([np.arange(t.num_rows, dtype=np.int32) for _, t in parts]))
        names = {n: t.column("name") for n, t in parts}
        return cls(keys, ra, dec, radius, wl, row, names, orders, {n: t.num_rows for n, t in parts})

    @classmethod
    def empty(cls) -> _Segment:
        f = np.empty(0, np.float64)
        i = np.empty(0, np.int32)
        return cls(np.empty(0, np.int64), f, f, f, i, i, {}, np.empty(0, np.int64))

    @classmethod
    def merge(cls, segments: Sequence[_Segment], present: np.ndarray) -> _Segment:
        """One segment with the rows of `segments` whose watchlist is still present (a stable sort of
        the concatenation: numpy's timsort merges the already sorted runs in linear time)."""
        keeps = [present[s.wl] for s in segments]
        keys = np.concatenate([s.keys[k] for s, k in zip(segments, keeps, strict=True)])
        idx = np.argsort(keys, kind="stable")
        keys = keys[idx]

        def cat(attr: str) -> np.ndarray:
            return np.concatenate([getattr(s, attr)[k] for s, k in zip(segments, keeps, strict=True)])[idx]

        names = {n: a for s in segments for n, a in s.names.items() if present[n]}
        sizes = {n: rows for s in segments for n, rows in s.sizes.items() if present[n]}
        orders = np.unique(np.concatenate([s.orders for s in segments]))
        return cls(keys, cat("ra"), cat("dec"), cat("radius"), cat("wl"), cat("row"), names, orders, sizes)

    def source_names(self, pos: np.ndarray) -> pa.Array:
        """Names of the sources at `pos` (few: the hits), one take per watchlist among them."""
        wl, row = self.wl[pos], self.row[pos]
        out = np.empty(len(pos), dtype=object)
        for n in np.unique(wl).tolist():
            sel = np.flatnonzero(wl == n)
            out[sel] = self.names[n].take(pa.array(row[sel])).to_numpy(zero_copy_only=False)
        return pa.array(out, pa.string())


@dataclass
class _Entry:
    """One watchlist in the index: its number, identity and the content it was built from."""

    number: int
    id: str
    owner: str
    content: str  # what identifies its sources (the Parquet blob path): unchanged => no rebuild
    rows: int
    alive: bool = True


@dataclass
class MatchStats:
    """What the last match cost (the benchmark prints these)."""

    objects: int = 0
    queries: int = 0  # distinct HEALPix cells looked up
    candidates: int = 0
    hits: int = 0
    seconds: float = 0.0


@dataclass
class WatchlistIndex:
    """All watchlists' sources, for matching batches. Thread-safe: `sync` and `match` may run in
    different threads (a match sees the index before or after a change, never half of one)."""

    segments: list[_Segment] = field(default_factory=list)
    entries: dict[str, _Entry] = field(default_factory=dict)
    last: MatchStats = field(default_factory=MatchStats)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._present = np.zeros(0, dtype=bool)  # by entry number: its rows belong in the index
        self._alive = np.zeros(0, dtype=bool)  # present and active (not paused)
        self._next = 0

    # ---------------------------------------------------------------- contents
    @property
    def sources(self) -> int:
        with self._lock:
            return sum(e.rows for e in self.entries.values() if e.alive)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self.segments)

    def watchlists(self) -> list[str]:
        """Ids of the watchlists being matched (present and not paused)."""
        with self._lock:
            return sorted(e.id for e in self.entries.values() if e.alive)

    def add(self, lists: Sequence[tuple[str, str, str, pa.Table]]) -> None:
        """Add (id, owner, content key, sources) watchlists as one new segment, replacing what the index
        held for the same ids. The sort runs outside the lock: matching goes on meanwhile."""
        if not lists:
            return
        with self._lock:
            first = self._next
            self._next += len(lists)
            if len(self._alive) < self._next:
                size = max(self._next, 2 * len(self._alive), 64)
                self._present = np.concatenate([self._present, np.zeros(size - len(self._present), bool)])
                self._alive = np.concatenate([self._alive, np.zeros(size - len(self._alive), bool)])
        parts = [(first + i, table) for i, (_, _, _, table) in enumerate(lists)]
        segment = _Segment.build(parts)
        with self._lock:
            for (wl_id, owner, content, table), (number, _) in zip(lists, parts, strict=True):
                self._remove(wl_id)
                self.entries[wl_id] = _Entry(number, wl_id, owner, content, table.num_rows)
                self._present[number] = self._alive[number] = True
            self.segments.append(segment)
        self._compact()

    def _remove(self, wl_id: str) -> None:
        entry = self.entries.pop(wl_id, None)
        if entry is not None:
            self._present[entry.number] = self._alive[entry.number] = False

    def remove(self, wl_ids: Iterable[str]) -> None:
        with self._lock:
            for wl_id in wl_ids:
                self._remove(wl_id)
        self._compact()

    def set_active(self, wl_id: str, active: bool) -> None:
        """Pause/resume: a mask flip, the rows stay (a resume is then free)."""
        with self._lock:
            entry = self.entries[wl_id]
            entry.alive = bool(active)
            self._alive[entry.number] = bool(active)

    def _compact(self) -> None:
        """Merge small segments when there are many; rebuild a segment that is mostly removed rows.

        Called without the lock: the merge (seconds for 100M sources) runs while batches are matched
        against the old segments, which are swapped for the merged one only if nobody changed them
        meanwhile. Rows of watchlists removed during the merge stay masked until the next compaction."""
        with self._lock:
            segments = [s for s in self.segments if s.rows]
            present = self._present.copy()
        groups = [[s for s in segments if 1 - s.live_fraction(present) > MAX_DEAD_FRACTION]]
        rest = [s for s in segments if not any(s is g for g in groups[0])]
        if len(rest) + (1 if groups[0] else 0) > MAX_SEGMENTS:
            rest.sort(key=lambda s: s.rows, reverse=True)
            groups.append(rest[1:])
        for group in groups:
            if not group:
                continue
            merged = _Segment.merge(group, present)
            with self._lock:
                current = self.segments
                if not all(any(g is c for c in current) for g in group):
                    continue  # another compaction got there first
                self.segments = [c for c in current if not any(c is g for g in group)]
                if merged.rows:
                    self.segments.append(merged)

    def sync(self, records: Sequence[BrokerRecord], load: Callable[[BrokerRecord], pa.Table]) -> bool:
        """Make the index hold exactly the watchlists of `records` (the store's current ones; inactive
        ones are paused). Only watchlists whose sources changed are loaded; True if anything changed."""
        changed = False
        wanted = {r.id: r for r in records}
        to_load = []
        with self._lock:
            gone = [wl_id for wl_id in self.entries if wl_id not in wanted]
            for wl_id in gone:
                self._remove(wl_id)
            changed = bool(gone)
            for r in records:
                entry = self.entries.get(r.id)
                content = r.blobs.get("sources", "")
                if entry is not None and entry.content == content:
                    entry.owner = r.owner
                    if entry.alive != r.active:
                        self.set_active(r.id, r.active)
                        changed = True
                elif r.active:
                    to_load.append(r)
                elif entry is not None:  # paused and its sources changed: load them when resumed
                    self._remove(r.id)
                    changed = True
        if changed:
            self._compact()
        if to_load:
            self.add([(r.id, r.owner, r.blobs.get("sources", ""), load(r)) for r in to_load])
            changed = True
        return changed

    # ---------------------------------------------------------------- matching
    def match(
        self,
        ra: np.ndarray,
        dec: np.ndarray,
        hp29: np.ndarray | None = None,
        owners: Iterable[str] | None = None,
    ) -> tuple[np.ndarray, list[tuple[_Segment, np.ndarray]], np.ndarray, dict[int, _Entry]]:
        """The raw join: (batch row, (segment, source positions), separation) of every pair within the
        source's radius, and the entries by number as they were when the match started. `owners`: only
        watchlists of these owners (None: all)."""
        t0 = time.perf_counter()
        ra = wrap_ra(ra)
        dec = np.asarray(dec, dtype=np.float64)
        hp29 = healpix29(ra, dec) if hp29 is None else np.asarray(hp29, dtype=np.int64)
        with self._lock:
            segments = list(self.segments)
            alive = self._alive.copy()
            by_number = {e.number: replace(e) for e in self.entries.values()}
            if owners is not None:
                allowed = set(owners)
                for e in self.entries.values():
                    if e.owner not in allowed:
                        alive[e.number] = False
        orders = np.unique(np.concatenate([s.orders for s in segments])) if segments else []
        q_row, q_key = neighbour_keys(hp29, orders)
        # objects of one field share cells (at coarse orders, most of them): look each cell up once, in
        # sorted order (numpy's binary search then walks forward through the keys: far fewer cache misses)
        cells, cell_of = np.unique(q_key, return_inverse=True)
        rows_out: list[np.ndarray] = []
        found: list[tuple[_Segment, np.ndarray]] = []
        seps: list[np.ndarray] = []
        candidates = 0
        for seg in segments:
            lo = np.searchsorted(seg.keys, cells, side="left")
            hi = np.searchsorted(seg.keys, cells, side="right")
            pairs = np.flatnonzero(hi[cell_of] > lo[cell_of])  # (object, cell) pairs with candidates
            qi, pos = _expand(lo[cell_of[pairs]], hi[cell_of[pairs]])
            live = alive[seg.wl[pos]]
            qi, pos = qi[live], pos[live]
            candidates += len(pos)
            if not len(pos):
                continue
            rows = q_row[pairs[qi]]
            sep = separation_arcsec(ra[rows], dec[rows], seg.ra[pos], seg.dec[pos])
            ok = sep <= seg.radius[pos]
            rows_out.append(rows[ok])
            found.append((seg, pos[ok]))
            seps.append(sep[ok])
        rows_all = np.concatenate(rows_out) if rows_out else np.empty(0, np.int64)
        sep_all = np.concatenate(seps) if seps else np.empty(0, np.float64)
        self.last = MatchStats(len(ra), len(cells), candidates, len(rows_all), time.perf_counter() - t0)
        return rows_all, found, sep_all, by_number

    def match_table(
        self, batch: pa.Table, on: str = "objects", owners: Iterable[str] | None = None
    ) -> pa.Table:
        """Hits (`HITS_SCHEMA`) of a batch's objects (`on="objects"`: alert_id = last_alert_id, mjd =
        last_mjd) or detections (`on="detections"`), sorted by watchlist, object and source."""
        if on not in ("objects", "detections"):
            raise ValueError("on must be 'objects' or 'detections'")
        if batch.num_rows == 0:
            return HITS_SCHEMA.empty_table()
        ra = batch.column("ra").to_numpy(zero_copy_only=False).astype(np.float64)
        dec = batch.column("dec").to_numpy(zero_copy_only=False).astype(np.float64)
        hp29 = batch.column("_healpix_29").to_numpy() if "_healpix_29" in batch.column_names else None
        rows, found, sep, by_number = self.match(ra, dec, hp29, owners)
        if len(rows) == 0:
            return HITS_SCHEMA.empty_table()
        wl = np.concatenate([seg.wl[pos] for seg, pos in found])
        names = pa.concat_arrays([seg.source_names(pos) for seg, pos in found])
        take = pa.array(rows)
        if on == "objects":
            alert = batch.column("last_alert_id").take(take)
            det = pa.nulls(len(rows), pa.int64())
            mjd = batch.column("last_mjd").take(take)
        else:
            alert = batch.column("alert_id").take(take)
            det = batch.column("detection_id").take(take)
            mjd = batch.column("mjd").take(take)
        table = pa.table(
            {
                "watchlist_id": label(wl, {n: e.id for n, e in by_number.items()}),
                "owner": label(wl, {n: e.owner for n, e in by_number.items()}),
                "source_name": names,
                "source_ra": np.concatenate([seg.ra[pos] for seg, pos in found]),
                "source_dec": np.concatenate([seg.dec[pos] for seg, pos in found]),
                "radius_arcsec": np.concatenate([seg.radius[pos] for seg, pos in found]),
                "object_id": batch.column("object_id").take(take).cast(pa.string()),
                "alert_id": alert.cast(pa.int64()),
                "detection_id": det.cast(pa.int64()),
                "ra": ra[rows],
                "dec": dec[rows],
                "mjd": mjd.cast(pa.float64()),
                "separation_arcsec": sep,
            },
            schema=HITS_SCHEMA,
        )
        return table.sort_by(
            [("watchlist_id", "ascending"), ("object_id", "ascending"), ("source_name", "ascending")]
        )


# --------------------------------------------------------------------------- the owner-facing service


class WatchlistService:
    """Upload, list, edit, pause and delete watchlists, and read their hits, for their owners."""

    def __init__(self, store: BrokerStore, max_sources: int = MAX_SOURCES):
        self.store = store
        self.max_sources = max_sources

    def _spec(self, sources: pa.Table, default_radius_arcsec: float) -> dict:
        radius = sources.column("radius_arcsec").to_numpy()
        return {
            "n_sources": sources.num_rows,
            "min_radius_arcsec": float(radius.min()),
            "max_radius_arcsec": float(radius.max()),
            "default_radius_arcsec": float(default_radius_arcsec),
        }

    def create(
        self,
        owner: Owner,
        name: str,
        data: bytes | str,
        fmt: str | None = None,
        default_radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
        active: bool = True,
    ) -> BrokerRecord:
        """A new watchlist from an uploaded CSV or VOTable (validated: `WatchlistError` names bad rows)."""
        owner_name(owner)
        _check_default_radius(default_radius_arcsec)
        sources = parse_sources(data, fmt, default_radius_arcsec, self.max_sources)
        return self.store.create(
            "watchlists",
            owner,
            name,
            self._spec(sources, default_radius_arcsec),
            blobs={"sources": sources_to_parquet(sources)},
            active=active,
        )

    def list(self, owner: Owner) -> list[BrokerRecord]:
        return self.store.records("watchlists", owner_name(owner))

    def get(self, owner: Owner, watchlist_id: str) -> BrokerRecord:
        return self.store.get("watchlists", watchlist_id, owner)

    def sources(self, owner: Owner, watchlist_id: str) -> pa.Table:
        return self.load(self.get(owner, watchlist_id))

    def load(self, record: BrokerRecord) -> pa.Table:
        """The sources of a record (no ownership check: for the matcher)."""
        return sources_from_parquet(self.store.read_blob(record, "sources"))

    def update(
        self,
        owner: Owner,
        watchlist_id: str,
        *,
        name: str | None = None,
        data: bytes | str | None = None,
        fmt: str | None = None,
        default_radius_arcsec: float | None = None,
        active: bool | None = None,
        expected_version: int | None = None,
    ) -> BrokerRecord:
        """Rename, pause/resume, or replace the sources with a new upload."""
        current = self.get(owner, watchlist_id)
        spec, blobs = None, None
        if data is not None:
            radius = default_radius_arcsec or current.spec.get("default_radius_arcsec", DEFAULT_RADIUS_ARCSEC)
            _check_default_radius(radius)
            sources = parse_sources(data, fmt, radius, self.max_sources)
            spec, blobs = self._spec(sources, radius), {"sources": sources_to_parquet(sources)}
        return self.store.update(
            "watchlists",
            watchlist_id,
            owner,
            name=name,
            spec=spec,
            blobs=blobs,
            active=active,
            expected_version=expected_version,
        )

    def pause(self, owner: Owner, watchlist_id: str) -> BrokerRecord:
        return self.store.update("watchlists", watchlist_id, owner, active=False)

    def resume(self, owner: Owner, watchlist_id: str) -> BrokerRecord:
        return self.store.update("watchlists", watchlist_id, owner, active=True)

    def delete(self, owner: Owner, watchlist_id: str) -> None:
        self.store.delete("watchlists", watchlist_id, owner)

    def hits(
        self,
        owner: Owner,
        watchlist_id: str | None = None,
        first_batch: int | None = None,
        last_batch: int | None = None,
    ) -> pa.Table:
        """The owner's stored hits (of one watchlist if given), with the batch they came from."""
        name = owner_name(owner)
        if watchlist_id is not None:
            self.get(owner, watchlist_id)
        table = read_tables(
            self.store.storage, hits_prefix(self.store.stream, "watchlists"), first_batch, last_batch
        )
        if table is None:
            return HITS_SCHEMA.append(pa.field("_batch", pa.int64())).empty_table()
        mask = pc.equal(table.column("owner"), name)
        if watchlist_id is not None:
            mask = pc.and_(mask, pc.equal(table.column("watchlist_id"), watchlist_id))
        return table.filter(mask)


def _check_default_radius(radius: float) -> None:
    if not (isinstance(radius, int | float) and 0 < radius <= MAX_RADIUS_ARCSEC):
        raise WatchlistError(f"the default radius must be in (0, {MAX_RADIUS_ARCSEC:g}] arcsec")
