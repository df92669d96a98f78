"""HEALPix maths for partitioning (pure functions, no I/O).

Everything leans on one property of the nested scheme: a pixel of order k is exactly the contiguous range
of order-29 indices [p << 2(29-k), (p+1) << 2(29-k)). So once rows are sorted by `_healpix_29`, every
partition, every margin pixel and every cone coverage is a slice found by binary search, not a scan.
"""

from __future__ import annotations

import numpy as np
from hats.pixel_math import healpix_shim
from hats.pixel_math.pixel_margins import get_margin
from hats.pixel_math.spatial_index import SPATIAL_INDEX_COLUMN, SPATIAL_INDEX_ORDER, compute_spatial_index

__all__ = [
    "SPATIAL_INDEX_COLUMN",
    "SPATIAL_INDEX_ORDER",
    "healpix29",
    "margin_order_for",
    "margin_ranges29",
    "pixel_range29",
    "plan_partitions",
]


def healpix29(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """The HATS spatial index (nested, order 29) of each position, in degrees."""
    if len(ra) == 0:
        return np.empty(0, dtype=np.int64)
    return np.asarray(compute_spatial_index(ra, dec), dtype=np.int64)


def pixel_range29(order: int, pixel: int) -> tuple[int, int]:
    """[lo, hi) of `_healpix_29` values inside pixel `pixel` of order `order`."""
    shift = 2 * (SPATIAL_INDEX_ORDER - order)
    return pixel << shift, (pixel + 1) << shift


def histogram(hp29_values: np.ndarray, order: int) -> np.ndarray:
    """Row counts per pixel of `order` (the input of the partitioning)."""
    shift = 2 * (SPATIAL_INDEX_ORDER - order)
    return np.bincount(hp29_values >> shift, minlength=12 * 4**order).astype(np.int64)


def plan_partitions(
    counts: np.ndarray, highest_order: int, threshold: int, lowest_order: int = 0
) -> list[tuple[int, int, int]]:
    """Choose the partition pixels: (order, pixel, rows), sorted in nested order.

    Follows hats-import's rule exactly (see `alignment_orders`), so a catalog partitioned here has the
    same pixels as one partitioned by hats-import.
    """
    if counts.max(initial=0) > threshold:
        worst = int(np.argmax(counts))
        raise ValueError(
            f"order-{highest_order} pixel {worst} holds {int(counts[worst])} rows, more than the partition "
            f"threshold {threshold}: raise --max-rows-per-partition or --highest-order"
        )
    order_map = alignment_orders(counts, highest_order, lowest_order, threshold)
    nonempty = np.flatnonzero(counts)
    orders = order_map[nonempty].astype(np.int64)
    pixels = nonempty >> (2 * (highest_order - orders))
    starts = pixels << (2 * (SPATIAL_INDEX_ORDER - orders))
    keys, first = np.unique(starts, return_index=True)  # one entry per partition, in nested order
    sums = _nested_sums(counts, highest_order, lowest_order)
    return [
        (int(orders[i]), int(pixels[i]), int(sums[int(orders[i])][int(pixels[i])]))
        for i in first[np.argsort(keys)]
    ]


def _nested_sums(counts: np.ndarray, highest_order: int, lowest_order: int) -> dict[int, np.ndarray]:
    sums = {highest_order: np.asarray(counts, dtype=np.int64)}
    for order in range(highest_order - 1, lowest_order - 1, -1):
        sums[order] = sums[order + 1].reshape(-1, 4).sum(axis=1)
    return sums


def alignment_orders(counts: np.ndarray, highest_order: int, lowest_order: int, threshold: int) -> np.ndarray:
    """For each pixel of `highest_order`, the order of the partition it lands in (-1: empty).

    A vectorised copy of hats' `_get_alignment_dropping_siblings` (hats-import's default rule), which is
    a Python loop over every pixel and takes tens of seconds at order 10: four sibling pixels merge into
    their parent when the parent holds at most `threshold` rows and more than one sibling is non-empty;
    decisions at lower orders override those at higher ones. Tested to give hats' answer exactly.
    """
    sums = _nested_sums(counts, highest_order, lowest_order)
    order_map = np.where(sums[highest_order] > 0, highest_order, -1).astype(np.int32)
    for order in range(highest_order - 1, lowest_order - 1, -1):
        quad_sum = sums[order]
        quad_max = sums[order + 1].reshape(-1, 4).max(axis=1)
        collapse = (quad_sum != quad_max) & (quad_sum <= threshold)
        if collapse.any():
            order_map[np.repeat(collapse, 4 ** (highest_order - order))] = order
    return order_map


def margin_order_for(threshold_arcsec: float, highest_partition_order: int) -> int:
    """The order whose pixels are at least `threshold_arcsec` wide (hats' own rule), checked against the
    partitions: margin pixels must be finer than every partition."""
    order = int(healpix_shim.margin2order(np.array([threshold_arcsec / 60.0]))[0])
    if order <= highest_partition_order:
        raise ValueError(
            f"a margin of {threshold_arcsec} arcsec needs pixels of order {order}, but partitions go down to "
            f"order {highest_partition_order}: use a smaller margin or a larger --max-rows-per-partition"
        )
    return order


def margin_ranges29(order: int, pixel: int, margin_order: int) -> np.ndarray:
    """Sorted, merged [lo, hi) ranges of `_healpix_29` covering the margin of a partition pixel: the
    pixels of `margin_order` just outside it (edges and corners), as hats-import defines the margin."""
    neighbours = np.asarray(get_margin(order, pixel, margin_order - order), dtype=np.int64)
    if len(neighbours) == 0:
        return np.empty((0, 2), dtype=np.int64)
    neighbours.sort()
    shift = 2 * (SPATIAL_INDEX_ORDER - margin_order)
    lo = neighbours << shift
    hi = (neighbours + 1) << shift
    # merge touching ranges
    starts = np.concatenate(([True], lo[1:] != hi[:-1]))
    ends = np.concatenate((lo[1:] != hi[:-1], [True]))
    return np.stack([lo[starts], hi[ends]], axis=1)
