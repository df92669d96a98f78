"""HEALPix-neighbour cross-matches: the pure parts (no I/O), shared by the engine and the tests.

A cross-match `DISTANCE(a, b) <= r` becomes an equi-join (see `dac_lake.adql.model.CrossMatch`): at the
order k of `neighbour_order(r)`, a pair within r has b's cell in the neighbourhood of a's cell (the cell and
its 8 neighbours). The engine reads the distinct order-k cells of one side (the anchor: the smaller one),
builds a neighbour table and joins the other side (expanded) through it, so that DuckDB runs two hash joins
instead of a declination-band range join over the whole sky, and reads only the row groups of the expanded
side near an anchor cell.

The neighbour table maps each anchor cell `a` to the *parents*, JOIN_COARSEN orders up, of its 9
neighbourhood cells (`e`, distinct per `a`), and the expanded side is keyed by its cell at that coarser
order: a cell well inside its parent has all 9 neighbours in that parent, so the table holds ~2.25 rows per
anchor cell instead of 9 (at 2 orders up: 4 of 16 sub-cells need 1 parent, 8 need 2, 4 need 4). It stays
exact: q within r of p has its order-k cell in the neighbourhood of p's, hence its coarse cell among the
parents of that neighbourhood; and each (a, e) pair is listed once, so a pair of rows meets once. The
expanded side then brings ~4x more candidate rows per anchor cell to the exact distance test (16 fine
cells per coarse cell over 2.25 against 9): at arcsecond radii still far below one per anchor row. On the
bench (2M x 10M rows at 1"), the table shrank from 18M to ~4.5M rows and DuckDB's peak memory from 2.2 GB
(the instance limit) to well under it.

Why not per partition pair with the margin caches (as lsdb does)? A margin cache exists so that a
partition-local join sees the rows just outside its partition. One join over the catalogs' main files sees
every row exactly once, needs no margin and no de-duplication, and DuckDB parallelises it itself; the
neighbour table bounds the work to cells near the anchor's rows, which is what the pairing bought.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from cdshealpix import nested

from dac_lake.healpix import SPATIAL_INDEX_ORDER


def _distinct(values: np.ndarray, is_sorted: bool = False) -> np.ndarray:
    """Sorted distinct values (numpy 2.4's `unique` takes ~2 s for 2M int64 with its hash-based
    algorithm, a sort and a comparison ~40 ms)."""
    values = np.asarray(values, dtype=np.int64)
    if not is_sorted:
        values = np.sort(values)
    if len(values) == 0:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def key_shift(order: int) -> int:
    """`_healpix_29 >> key_shift(order)` is the cell of order `order`."""
    return 2 * (SPATIAL_INDEX_ORDER - order)


#: the expanded side's cells are this many orders coarser than the anchor's (see the module docstring)
JOIN_COARSEN = 2


def join_order(order: int) -> int:
    """The order of the expanded side's key for an anchor keyed at `order`."""
    return max(order - JOIN_COARSEN, 0)


#: anchor cells per piece of neighbour_table's work: pieces run in threads (numpy and cdshealpix release
#: the GIL), and small temporaries are reused instead of faulting in fresh memory (2M cells: 1.0 s in one
#: piece, 0.3 s in 256k-cell pieces on 2 threads, measured)
_PIECE_CELLS = 262_144


def neighbour_table(cells: np.ndarray, order: int) -> pa.Table:
    """(a, e) for every anchor cell `a` of `cells` (distinct, int64, order `order`) and every distinct
    parent `e` (order `join_order(order)`) of the cells of its neighbourhood; see `_neighbour_piece`."""
    cells = np.asarray(cells, dtype=np.int64)
    if len(cells) <= _PIECE_CELLS:
        return _neighbour_piece(cells, order)
    pieces = [cells[i : i + _PIECE_CELLS] for i in range(0, len(cells), _PIECE_CELLS)]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        tables = list(pool.map(lambda c: _neighbour_piece(c, order), pieces))
    return pa.concat_tables(tables).combine_chunks()


def _neighbour_piece(cells: np.ndarray, order: int) -> pa.Table:
    """(a, e) for every anchor cell `a` of `cells` (distinct, int64, order `order`) and every distinct
    parent `e` (order `join_order(order)`) of the cells of its neighbourhood (itself and its 7 or 8
    neighbours). cdshealpix marks the missing 8th neighbour of the base-pixel corner cells with -1, whose
    "parent" stays -1: such rows remain and never join."""
    cells = np.asarray(cells, dtype=np.int64)
    if len(cells) == 0:
        return pa.table({"a": pa.array([], pa.int64()), "e": pa.array([], pa.int64())})
    parents = nested.neighbours(cells.astype(np.uint64), order, num_threads=1).astype(np.int64, copy=False)
    np.right_shift(parents, 2 * (order - join_order(order)), out=parents)  # in place; -1 >> n stays -1
    # every row has its own cell's parent (cdshealpix puts the cell itself in column 4); the other parents
    # of a row are few (none for a cell inside its parent): de-duplicate just those, as one sorted key.
    # Column by column, in place where possible: on this VM, touching fresh memory costs more than the
    # arithmetic (a 2M x 9 temporary took 0.5 s).
    own = parents[:, 4].copy()
    span = int(parents.max()) + 2  # values -1 .. max, stored as 1 .. max + 1
    if len(cells) * span >= 2**62:  # pragma: no cover - beyond ~10^7 anchor cells at order 20
        rows, cols = np.nonzero(parents != own[:, None])
        pairs = _distinct_pairs(rows, parents[rows, cols])
        return pa.table(
            {"a": np.concatenate((cells, cells[pairs[:, 0]])), "e": np.concatenate((own, pairs[:, 1]))}
        )
    keys = []
    for j in range(parents.shape[1]):
        if j == 4:
            continue
        col = parents[:, j]
        idx = np.flatnonzero(col != own)
        keys.append(idx * span + (col[idx] + 1))
    key = np.concatenate(keys)
    key.sort()
    if len(key):
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    rows, others = np.divmod(key, span)
    others -= 1
    return pa.table({"a": np.concatenate((cells, cells[rows])), "e": np.concatenate((own, others))})


def _distinct_pairs(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    pairs = np.stack([rows, values], axis=1)
    order = np.lexsort((values, rows))
    pairs = pairs[order]
    keep = np.concatenate(([True], (pairs[1:] != pairs[:-1]).any(axis=1)))
    return pairs[keep]


def cells_ranges29(cells: np.ndarray, order: int, max_ranges: int) -> np.ndarray:
    """Merged [lo, hi) `_healpix_29` ranges covering `cells` (order `order`), coarsened (to the parent
    cells) until there are at most `max_ranges`: a superset, for row-group pruning."""
    cells = _distinct(cells)
    cells = cells[cells >= 0]
    while True:
        shift = key_shift(order)
        lo, hi = cells << shift, (cells + 1) << shift
        starts = np.concatenate(([True], lo[1:] != hi[:-1])) if len(lo) else np.empty(0, bool)
        ends = np.concatenate((lo[1:] != hi[:-1], [True])) if len(lo) else np.empty(0, bool)
        ranges = np.stack([lo[starts], hi[ends]], axis=1) if len(lo) else np.empty((0, 2), np.int64)
        if len(ranges) <= max_ranges or order == 0:
            return ranges
        cells = _distinct(cells >> 2, is_sorted=True)
        order -= 1


def intersect_ranges(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """The intersection of two sorted lists of disjoint [lo, hi) ranges (None = everything)."""
    if a is None:
        return b
    if b is None:
        return a
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        if lo < hi:
            out.append((lo, hi))
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def choose_anchor(
    left: str, right: str, expandable: tuple[str, ...], rows: dict[str, int]
) -> tuple[str, str]:
    """(anchor, expanded): the expanded side must be one the query allows to repeat (not the preserved
    side of an outer join); between two such, the anchor is the side with fewer rows (fewer cells to read
    and expand, and the larger side is the one whose row groups the neighbour cells prune)."""
    if left not in expandable:
        return left, right
    if right not in expandable:
        return right, left
    return (left, right) if rows.get(left, 0) <= rows.get(right, 0) else (right, left)


#: the neighbourhood of many anchor cells is computed on their parents (a superset) above this many cells
_MAX_NEIGHBOURHOOD_CELLS = 65_536


def neighbourhood_ranges29(cells: np.ndarray, order: int, max_ranges: int) -> np.ndarray:
    """`_healpix_29` ranges covering the neighbourhoods of `cells` (order `order`): where the expanded
    side's rows can match. With many cells, their parents' neighbourhoods are used instead (a superset: a
    cell touching a cell touches that cell's parent or one of the parent's neighbours), which keeps this
    cheap for an all-sky anchor, where it covers the sky anyway."""
    cells = _distinct(cells)
    cells = cells[cells >= 0]
    while len(cells) > _MAX_NEIGHBOURHOOD_CELLS and order > 0:
        cells = _distinct(cells >> 2, is_sorted=True)
        order -= 1
    if len(cells) == 0:
        return np.empty((0, 2), dtype=np.int64)
    around = nested.neighbours(cells.astype(np.uint64), order).astype(np.int64, copy=False).reshape(-1)
    return cells_ranges29(around, order, max_ranges)
