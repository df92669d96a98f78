"""Pure HEALPix maths: partition planning equals hats-import's rule; ranges and coverage."""

from __future__ import annotations

import numpy as np
import pytest
from hats.pixel_math.partition_stats import generate_alignment

from dac_lake import healpix
from dac_lake.coverage import cone_ranges29, partitions_touching
from tests.conftest import make_catalog


@pytest.mark.parametrize(("order", "threshold"), [(4, 5000), (6, 2000), (6, 30000), (7, 900)])
def test_plan_equals_hats_alignment(order, threshold):
    t = make_catalog(30000, seed=order)
    hp = healpix.healpix29(t["ra"].to_numpy(), t["dec"].to_numpy())
    counts = healpix.histogram(hp, order)
    plan = healpix.plan_partitions(counts, order, threshold)
    alignment = generate_alignment(counts, highest_order=order, threshold=threshold, drop_empty_siblings=True)
    want = {tuple(int(x) for x in alignment[i]) for i in np.flatnonzero(counts)}
    assert set(plan) == want
    assert sum(n for _, _, n in plan) == 30000
    starts = [healpix.pixel_range29(o, p)[0] for o, p, _ in plan]
    assert starts == sorted(starts)


def test_plan_refuses_pixel_over_threshold():
    counts = np.zeros(12 * 4**2, dtype=np.int64)
    counts[5] = 11
    with pytest.raises(ValueError, match="more than the partition threshold"):
        healpix.plan_partitions(counts, 2, 10)


def test_pixel_ranges_nest():
    lo, hi = healpix.pixel_range29(3, 17)
    for child in range(17 * 4, 17 * 4 + 4):
        clo, chi = healpix.pixel_range29(4, child)
        assert lo <= clo < chi <= hi
    assert healpix.pixel_range29(0, 11)[1] == 12 * 4**29


def test_margin_ranges_lie_outside_pixel():
    mo = healpix.margin_order_for(10.0, 5)
    ranges = healpix.margin_ranges29(5, 1234, mo)
    lo, hi = healpix.pixel_range29(5, 1234)
    assert len(ranges) > 0
    assert np.all((ranges[:, 1] <= lo) | (ranges[:, 0] >= hi))
    with pytest.raises(ValueError, match="smaller margin"):
        healpix.margin_order_for(3600.0, 8)


@pytest.mark.parametrize(
    ("ra", "dec", "radius"),
    [(0.0, 0.0, 1.0), (359.99, 10.0, 0.01), (10.0, 89.9, 0.5), (200.0, -90.0, 2.0), (45.0, -30.0, 30.0)],
)
def test_cone_ranges_cover_cone(ra, dec, radius):
    """Every point inside the cone has its _healpix_29 inside the ranges (a superset)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(1)
    center = SkyCoord(ra, dec, unit="deg")
    pts = center.directional_offset_by(
        rng.uniform(0, 360, 3000) * u.deg, rng.uniform(0, radius, 3000) * u.deg
    )
    hp = healpix.healpix29(pts.ra.deg, pts.dec.deg)
    ranges = cone_ranges29(ra, dec, radius)
    idx = np.searchsorted(ranges[:, 1], hp, side="right")
    assert np.all(ranges[idx, 0] <= hp)
    plan = [(3, p, 1) for p in range(12 * 64)]
    touched = {p for _, p, _ in partitions_touching(plan, ranges)}
    assert set((hp >> (2 * 26)).tolist()) <= touched
