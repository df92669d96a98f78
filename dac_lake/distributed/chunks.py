"""How a distributed query is cut into tasks: chunks of HEALPix partitions and their neighbourhoods (pure).

A task reads the partitions of one chunk of the split table and, for a cross-match, only the rows of the
other table near that chunk: a margin of the match radius around the chunk, which is what HATS margin
caches give lsdb for partition pairs, computed here for any partitioning of the other table (the two
catalogs of a cross-match seldom share one). A pair within the radius has its split-side row in exactly one
chunk and its other row inside that chunk's margin, so the union of the tasks' pairs is every pair, once.
"""

from __future__ import annotations

import numpy as np

from dac_lake.adql.model import neighbour_order
from dac_lake.healpix import healpix29, pixel_range29

#: a margin has at most this many `_healpix_29` ranges (a coarser ring: a superset). DuckDB tests an OR of
#: the ranges on every row it reads: 16-32 ranges cost less than the rows a finer ring saves (a 2M x 667k
#: cross-match's tasks: 512 ranges 3.3 s, 256: 2.6 s, 64: 1.8 s, 16: 1.6 s in all, measured)
MAX_MARGIN_RANGES = 32


def merged_ranges(partitions: list[tuple[int, int, int]]) -> np.ndarray:
    """Sorted, merged [lo, hi) `_healpix_29` ranges of `partitions` ((order, pixel, rows) items)."""
    spans = [np.array([pixel_range29(int(o), int(p))], dtype=np.int64) for o, p, *_ in partitions]
    return union_ranges(spans)


def chunk_partitions(
    partitions: list[tuple[int, int, int]], target_rows: int, min_chunks: int = 1
) -> list[list[tuple[int, int, int]]]:
    """Consecutive partitions (in `_healpix_29` order, so a chunk is a compact patch of sky with a small
    margin) grouped into chunks of about `target_rows` rows, smaller if that gives fewer than `min_chunks`
    chunks (every worker gets work); a partition larger than the target is a chunk of its own."""
    if not partitions:
        return []
    ordered = sorted(partitions, key=lambda p: pixel_range29(int(p[0]), int(p[1]))[0])
    total = sum(int(p[2]) for p in ordered)
    target = max(1, min(int(target_rows), -(-total // max(1, min_chunks))))
    chunks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    rows = 0
    for part in ordered:
        n = int(part[2])
        if current and rows + n > target:
            chunks.append(current)
            current, rows = [], 0
        current.append(part)
        rows += n
    if current:
        chunks.append(current)
    return chunks


def margin_ranges(partitions: list[tuple[int, int, int]], radius_deg: float) -> np.ndarray | None:
    """`_healpix_29` ranges holding every point within `radius_deg` of any point of `partitions`; None
    when the radius is too large for cell neighbourhoods (the whole sky must be read).

    The chunk's coverage (a MOC) grows by one ring of cells of order k (mocpy's `add_neighbours`), k at
    most `neighbour_order` of the radius, where a cell's neighbours hold every point within the radius of
    it; k is lowered (a wider ring, fewer ranges) until the margin has at most MAX_MARGIN_RANGES ranges."""
    from mocpy import MOC

    if not partitions:
        return np.empty((0, 2), dtype=np.int64)
    order = neighbour_order(radius_deg)
    if order is None:
        return None
    ranges = merged_ranges(partitions).astype(np.uint64)
    while True:
        grown = MOC.from_depth29_ranges(order, ranges).add_neighbours()
        out = np.asarray(grown.to_depth29_ranges, dtype=np.int64).reshape(-1, 2)
        if len(out) <= MAX_MARGIN_RANGES or order == 0:
            return out
        order = max(0, order - 2)


def union_ranges(pieces: list[np.ndarray]) -> np.ndarray:
    """The union of lists of [lo, hi) ranges, sorted and merged."""
    spans = np.concatenate([p.reshape(-1, 2) for p in pieces]) if pieces else np.empty((0, 2), np.int64)
    if len(spans) == 0:
        return np.empty((0, 2), dtype=np.int64)
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    out = [list(spans[0])]
    for lo, hi in spans[1:]:
        if lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return np.asarray(out, dtype=np.int64)


def position_index(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """`_healpix_29` of each position (degrees), -1 where it is missing or invalid (an uploaded table is
    indexed once, then sliced per chunk with `in_ranges`)."""
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    index = np.full(len(ra), -1, dtype=np.int64)
    if ok.any():
        index[ok] = healpix29(ra[ok] % 360.0, dec[ok])
    return index


def in_ranges(index: np.ndarray, ranges: np.ndarray | None) -> np.ndarray:
    """Boolean mask of the `index` values (from `position_index`) inside `ranges` (None: the whole sky);
    rows without a valid position are out (they match no position)."""
    valid = index >= 0
    if ranges is None:
        return valid
    if len(ranges) == 0:
        return np.zeros(len(index), dtype=bool)
    i = np.searchsorted(ranges[:, 1], index, side="right")
    inside = (i < len(ranges)) & (ranges[np.minimum(i, len(ranges) - 1), 0] <= index)
    return valid & inside
