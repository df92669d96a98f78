"""The pure parts of a distributed query's plan: chunks of partitions and their cross-match margins."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from hypothesis import given, settings
from hypothesis import strategies as st

from dac_lake.distributed.chunks import (
    MAX_MARGIN_RANGES,
    chunk_partitions,
    in_ranges,
    margin_ranges,
    merged_ranges,
    position_index,
)
from dac_lake.healpix import healpix29, pixel_range29


def _partitions(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """A HATS-like partitioning of the whole sky: some order-1 pixels split down to order 2-5."""
    out = []
    for pixel in range(48):
        order, pix = 1, pixel
        stack = [(order, pix)]
        while stack:
            o, p = stack.pop()
            if o < 5 and rng.random() < 0.3:
                stack.extend((o + 1, 4 * p + k) for k in range(4))
            else:
                out.append((o, p, int(rng.integers(0, 5000))))
    return out


def test_chunks_cover_every_partition_once_in_sky_order():
    rng = np.random.default_rng(1)
    parts = _partitions(rng)
    for target, min_chunks in [(10_000, 1), (1, 1), (10**9, 7), (25_000, 40)]:
        chunks = chunk_partitions(parts, target, min_chunks)
        flat = [p for c in chunks for p in c]
        assert sorted(flat) == sorted(parts)
        starts = [pixel_range29(o, p)[0] for o, p, _ in flat]
        assert starts == sorted(starts)  # consecutive pixels: compact patches of sky
        total = sum(p[2] for p in parts)
        limit = min(target, -(-total // min_chunks))
        for c in chunks:
            assert len(c) == 1 or sum(p[2] for p in c) <= limit
        if target == 10**9:
            assert len(chunks) >= 7


def test_merged_ranges_equal_the_union_of_pixels():
    parts = [(2, 5, 1), (2, 4, 1), (3, 24, 1), (1, 30, 1)]  # (3, 24) is the first child of (2, 6)
    ranges = merged_ranges(parts)
    assert ranges.tolist() == [
        [pixel_range29(2, 4)[0], pixel_range29(3, 24)[1]],
        list(pixel_range29(1, 30)),
    ]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    radius_arcsec=st.sampled_from([0.5, 1.0, 5.0, 60.0, 600.0, 3600.0]),
)
def test_margin_holds_every_point_within_the_radius(seed, radius_arcsec):
    """Points near the edge of a chunk (drawn inside it) and points within the radius of them: the latter
    always index into the margin; points far away mostly do not (it is a margin, not the sky)."""
    rng = np.random.default_rng(seed)
    parts = _partitions(rng)
    chunks = chunk_partitions(parts, 20_000)
    chunk = chunks[int(rng.integers(0, len(chunks)))]
    radius = radius_arcsec / 3600
    margin = margin_ranges(chunk, radius)
    inside = merged_ranges(chunk)
    # points inside the chunk: sample the sky, keep those whose index lies in the chunk
    ra = rng.uniform(0, 360, 200_000)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 200_000)))
    keep = in_ranges(healpix29(ra, dec), inside)
    ra, dec = ra[keep][:3000], dec[keep][:3000]
    assert len(ra) > 0
    here = SkyCoord(ra, dec, unit="deg")
    there = here.directional_offset_by(
        rng.uniform(0, 360, len(ra)) * u.deg, rng.uniform(0, 1, len(ra)) * radius * u.deg
    )
    index = healpix29(there.ra.deg, there.dec.deg)
    assert in_ranges(index, margin).all()
    assert in_ranges(healpix29(ra, dec), margin).all()  # the chunk itself is in its margin


def test_margin_of_a_small_chunk_is_small_and_a_huge_radius_is_the_sky():
    chunk = [(7, 1000, 10)]
    margin = margin_ranges(chunk, 1 / 3600)
    area = int((margin[:, 1] - margin[:, 0]).sum())
    lo, hi = pixel_range29(7, 1000)
    assert hi - lo < area < 2 * (hi - lo)  # the pixel plus a thin ring
    assert margin_ranges(chunk, 40.0) is None
    assert len(margin_ranges([(0, 3, 1)], 1 / 3600)) <= MAX_MARGIN_RANGES


def test_position_index_marks_bad_positions_and_in_ranges_matches_brute_force():
    rng = np.random.default_rng(3)
    ra = rng.uniform(0, 360, 5000)
    dec = rng.uniform(-90, 90, 5000)
    ra[:5] = [np.nan, 10, 400, -30, 5]
    dec[:5] = [0, np.nan, 10, 10, 95]
    index = position_index(ra, dec)
    assert (index[[0, 1, 4]] == -1).all() and (index[[2, 3]] >= 0).all()  # RA wraps, Dec does not
    ranges = merged_ranges([(2, 7, 1), (3, 100, 1), (1, 40, 1)])
    mask = in_ranges(index, ranges)
    brute = np.array([any(lo <= i < hi for lo, hi in ranges) and i >= 0 for i in index])
    assert (mask == brute).all()
    assert in_ranges(index, None).tolist() == (index >= 0).tolist()
    assert not in_ranges(index, np.empty((0, 2), np.int64)).any()


@pytest.mark.parametrize("target", [1, 3000, 10**9])
def test_empty_partitioning_has_no_chunks(target):
    assert chunk_partitions([], target) == []
    assert merged_ranges([]).shape == (0, 2)
