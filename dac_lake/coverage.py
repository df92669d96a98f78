"""Which partitions and `_healpix_29` ranges a sky region touches (pure functions, no I/O).

The query path turns a cone into (a) the partition files to read and (b) `_healpix_29` ranges that let
DuckDB skip row groups inside those files. Both are supersets: the exact distance test runs on the rows.
"""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy.coordinates import Latitude, Longitude
from cdshealpix.nested import cone_search

from dac_lake.healpix import SPATIAL_INDEX_ORDER, pixel_range29

try:  # the compiled function behind cdshealpix.nested.cone_search (same arguments, in radians)
    from cdshealpix.cdshealpix import cone_search as _rust_cone_search
except ImportError:  # pragma: no cover - another cdshealpix build: the public wrapper still works
    _rust_cone_search = None

#: order of the `_healpix_29` ranges used for row-group pruning: fine enough to hug a small cone,
#: coarse enough that a 30-degree cone stays a few thousand ranges
MAX_RANGE_ORDER = 14


def _cone_cells(ra: float, dec: float, radius_deg: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """cdshealpix's cone coverage (cells and their depths, a superset of the cone). Its Rust binding is
    called directly when present: the astropy Longitude/Latitude/Quantity checks of the public wrapper cost
    ~0.4 ms, a tenth of a small cone search."""
    if _rust_cone_search is not None and -90 <= dec <= 90:
        cells, depths, _ = _rust_cone_search(
            np.uint8(order),
            np.uint8(2),
            np.float64(np.radians(ra % 360)),
            np.float64(np.radians(dec)),
            np.float64(np.radians(radius_deg)),
            False,
        )
        return cells, depths
    cells, depths, _ = cone_search(
        Longitude(ra % 360, u.deg), Latitude(dec, u.deg), radius_deg * u.deg, depth=order, flat=False
    )
    return cells, depths


def cone_ranges29(ra: float, dec: float, radius_deg: float, max_ranges: int = 2000) -> np.ndarray:
    """Merged [lo, hi) `_healpix_29` ranges covering a cone (a superset of it)."""
    if not (0 < radius_deg <= 180):
        raise ValueError(f"cone radius must be in (0, 180] degrees, got {radius_deg}")
    order = _range_order(radius_deg)
    while True:
        cells, depths = _cone_cells(ra, dec, radius_deg, order)
        shift = 2 * (SPATIAL_INDEX_ORDER - depths.astype(np.int64))
        lo = cells.astype(np.int64) << shift
        hi = (cells.astype(np.int64) + 1) << shift
        idx = np.argsort(lo)
        lo, hi = lo[idx], hi[idx]
        ranges = _merge(lo, hi)
        if len(ranges) <= max_ranges or order <= 2:
            return ranges
        order -= 1


def _range_order(radius_deg: float) -> int:
    # pixel size at order k is about 58.6 / 2**k degrees; aim for ~8 pixels across the radius
    size = max(radius_deg / 8.0, 1e-9)
    order = int(np.floor(np.log2(58.6 / size)))
    return int(np.clip(order, 0, MAX_RANGE_ORDER))


def _merge(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    if len(lo) == 0:
        return np.empty((0, 2), dtype=np.int64)
    out_lo, out_hi = [int(lo[0])], [int(hi[0])]
    for a, b in zip(lo[1:].tolist(), hi[1:].tolist(), strict=True):
        if a <= out_hi[-1]:
            out_hi[-1] = max(out_hi[-1], b)
        else:
            out_lo.append(a)
            out_hi.append(b)
    return np.stack([np.array(out_lo, dtype=np.int64), np.array(out_hi, dtype=np.int64)], axis=1)


def partitions_touching(
    partitions: list[tuple[int, int, int]], ranges: np.ndarray
) -> list[tuple[int, int, int]]:
    """The partitions (order, pixel, rows) whose `_healpix_29` span overlaps any of `ranges`."""
    if len(ranges) == 0:
        return []
    out = []
    for order, pixel, rows in partitions:
        lo, hi = pixel_range29(order, pixel)
        i = np.searchsorted(ranges[:, 1], lo, side="right")
        if i < len(ranges) and ranges[i, 0] < hi:
            out.append((order, pixel, rows))
    return out


def points_ranges29(ra: np.ndarray, dec: np.ndarray, radius_deg: float) -> np.ndarray:
    """`_healpix_29` ranges covering every position's cone of `radius_deg` (the on-the-fly HEALPix index
    of an uploaded table: a cross-match with it reads only the lake partitions near its rows)."""
    from mocpy import MOC

    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    if not ok.any():
        return np.empty((0, 2), dtype=np.int64)
    radius = float(min(max(radius_deg, 1e-9), 180.0))
    # coarse enough that a large upload stays a modest MOC; fine enough to hug small cones
    depth = min(_range_order(radius), 12)
    moc = MOC.from_cones(
        lon=Longitude(ra[ok] % 360, u.deg),
        lat=Latitude(dec[ok], u.deg),
        radius=radius * u.deg,
        max_depth=depth,
        union_strategy="small_cones",
        n_threads=1,
    )
    return np.asarray(moc.to_depth29_ranges, dtype=np.int64).reshape(-1, 2)


def region_moc(region, extra_deg: float = 0.0, max_depth: int | None = None):
    """A MOC (mocpy) covering an ADQL region grown by `extra_deg`, or None if it cannot be grown
    (a polygon with a cross-match radius: the caller then reads the whole table)."""
    from mocpy import MOC

    from dac_lake.adql import Circle, Polygon

    if isinstance(region, Circle):
        radius = min(180.0, region.radius + extra_deg)
        depth = max_depth if max_depth is not None else _range_order(radius)
        return MOC.from_cone(
            lon=Longitude(region.ra % 360, u.deg),
            lat=Latitude(region.dec, u.deg),
            radius=radius * u.deg,
            max_depth=depth,
        )
    if isinstance(region, Polygon) and extra_deg == 0:
        from astropy.coordinates import SkyCoord

        lons = [v[0] for v in region.vertices]
        lats = [v[1] for v in region.vertices]
        size = max(max(lats) - min(lats), 1e-6)
        depth = max_depth if max_depth is not None else _range_order(size / 2)
        return MOC.from_polygon_skycoord(SkyCoord(lons, lats, unit="deg"), max_depth=depth)
    return None


def regions_ranges29(regions: list, extra_deg: float = 0.0) -> np.ndarray | None:
    """`_healpix_29` [lo, hi) ranges covering the intersection of `regions` (each grown by `extra_deg`);
    None means no spatial constraint: read the whole table."""
    mocs = [m for m in (region_moc(r, extra_deg) for r in regions) if m is not None]
    if not mocs:
        return None
    moc = mocs[0]
    for other in mocs[1:]:
        moc = moc.intersection(other)
    ranges = np.asarray(moc.to_depth29_ranges, dtype=np.int64).reshape(-1, 2)
    return ranges
