"""Synthetic sample survey for the dac-lake demo and tests.

The lake has to be demonstrated and tested without shipping or downloading a real survey, yet uniform
random points would hide exactly the problems a Data Access Centre meets in production: HEALPix partitions
that are wildly uneven (the Galactic plane and bulge, dense clusters, the Magellanic Clouds), an incomplete
footprint with holes, NaN photometry, sources at the poles and on both sides of RA=0, and a second catalog
whose cross-match is only partly successful.  This module makes two such catalogs, deterministically for a
seed and fast enough (pure vectorised numpy) to build a million rows in a few seconds inside CI.

``demo_survey`` is an optical (g, r, i) survey with astrometry.  Its footprint is dec < ~+30 deg (a ragged
edge) plus a northern deep field around (185, +47), minus bright-star masks and two failed stripes, one of
which crosses RA=0.  Its ``source_id`` follows the Gaia convention: the HEALPix order-12 nested index of
the source times 2**35 plus a random 35-bit number, so ids are unique, positive and spatially meaningful
but not sequential.

``demo_xmatch`` is a near-infrared (J, H, K, Vega) survey covering dec < +40 deg without holes: about 70%
of its rows are counterparts of ``demo_survey`` sources, displaced by a 0.1-0.5 arcsec Gaussian error,
and the rest have no optical counterpart (red, dusty or outside the optical footprint).  Positions are not
propagated for proper motion between the two epochs, so a plain 1-2 arcsec match radius recovers the
counterparts.

Bits of the ``demo_survey.flags`` column (see the ``FLAG_*`` constants): 1 saturated, 2 blended,
4 near a footprint or mask edge, 8 inside a bright-star halo, 16 bad pixel, 32 missing band, 64 low S/N,
128 cosmic ray.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.coordinates import Latitude, Longitude, SkyCoord
from cdshealpix import nested

__all__ = [
    "FLAG_BAD_PIXEL",
    "FLAG_BLENDED",
    "FLAG_BRIGHT_STAR",
    "FLAG_COSMIC_RAY",
    "FLAG_EDGE",
    "FLAG_LOW_SNR",
    "FLAG_MISSING_BAND",
    "FLAG_SATURATED",
    "SURVEY_SCHEMA",
    "XMATCH_SCHEMA",
    "generate_demo_catalogs",
    "offset_by",
]

FLAG_SATURATED = 1
FLAG_BLENDED = 2
FLAG_EDGE = 4
FLAG_BRIGHT_STAR = 8
FLAG_BAD_PIXEL = 16
FLAG_MISSING_BAND = 32
FLAG_LOW_SNR = 64
FLAG_COSMIC_RAY = 128

SURVEY_SCHEMA = pa.schema(
    [
        ("source_id", pa.int64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("ra_error", pa.float32()),
        ("dec_error", pa.float32()),
        ("g_mag", pa.float32()),
        ("r_mag", pa.float32()),
        ("i_mag", pa.float32()),
        ("g_mag_err", pa.float32()),
        ("r_mag_err", pa.float32()),
        ("i_mag_err", pa.float32()),
        ("pm_ra", pa.float32()),
        ("pm_dec", pa.float32()),
        ("parallax", pa.float32()),
        ("flags", pa.int32()),
        ("extended", pa.bool_()),
        ("epoch", pa.float64()),
    ]
)

XMATCH_SCHEMA = pa.schema(
    [
        ("obj_id", pa.int64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("j_mag", pa.float32()),
        ("h_mag", pa.float32()),
        ("k_mag", pa.float32()),
        ("j_mag_err", pa.float32()),
        ("h_mag_err", pa.float32()),
        ("k_mag_err", pa.float32()),
        ("class_star", pa.float32()),
        ("mjd", pa.float64()),
    ]
)

# ---------------------------------------------------------------------------------------------------------
# Populations.  Galactic populations are sampled in (l, b) and converted to ICRS in one astropy call;
# compact systems (clusters, Magellanic Clouds) are defined directly in ICRS around a centre.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Population:
    """One stellar or galaxy population: where it lies, how bright it is and how it moves.

    The g-r colour is a two-component Gaussian mixture: component "a" is the main sequence (or blue
    galaxies), component "b" (fraction ``frac_b``) the evolved giants (or red galaxies).
    """

    name: str
    weight: float
    alpha: float  # number-count slope: dN/dm ∝ 10**(alpha * m) for the r band
    r_min: float
    r_max: float
    frac_b: float
    gr_a: tuple[float, float]
    gr_b: tuple[float, float]
    sigma_vt: float = 0.0  # km/s, transverse velocity dispersion per axis
    blended: float = 0.01  # probability of the BLENDED flag (crowding)
    centre: tuple[float, float] | None = None  # ICRS (ra, dec) for compact systems
    profile: str = ""  # "plummer" or "gauss" for compact systems
    scale_deg: float = 0.0  # Plummer radius or Gaussian sigma along the major axis
    axis_ratio: float = 1.0
    pa_deg: float = 0.0
    distance_pc: float = 0.0  # 0: photometric distance; inf: extragalactic
    depth: float = 0.0  # fractional line-of-sight spread of distance_pc
    pm: tuple[float, float] = (0.0, 0.0)  # systemic proper motion, mas/yr
    internal_ebv: float = 0.0


# fmt: off
_POPULATIONS: tuple[_Population, ...] = (
    _Population("disk", 0.455, 0.30, 12.0, 24.0, 0.12, (0.85, 0.40), (0.95, 0.12), sigma_vt=30.0,
                blended=0.02),
    _Population("bulge", 0.13, 0.34, 13.0, 24.0, 0.45, (0.75, 0.20), (1.05, 0.15), sigma_vt=110.0,
                blended=0.15, distance_pc=8200.0, depth=0.11),
    _Population("halo", 0.17, 0.22, 15.0, 24.0, 0.15, (0.38, 0.10), (0.75, 0.12), sigma_vt=130.0),
    _Population("galaxy", 0.12, 0.45, 16.0, 24.0, 0.55, (0.45, 0.15), (0.95, 0.12),
                distance_pc=np.inf),
    _Population("lmc", 0.07, 0.50, 13.0, 24.0, 0.60, (-0.05, 0.15), (0.90, 0.12), sigma_vt=20.0,
                blended=0.10, centre=(80.894, -69.756), profile="gauss", scale_deg=3.0, axis_ratio=0.6,
                pa_deg=150.0, distance_pc=50_000.0, depth=0.05, pm=(1.91, 0.23), internal_ebv=0.08),
    _Population("smc", 0.025, 0.50, 14.0, 24.0, 0.55, (-0.10, 0.15), (0.85, 0.12), sigma_vt=20.0,
                blended=0.08, centre=(13.187, -72.829), profile="gauss", scale_deg=1.4, axis_ratio=0.5,
                pa_deg=45.0, distance_pc=62_000.0, depth=0.06, pm=(0.77, -1.12), internal_ebv=0.05),
    _Population("47tuc", 0.007, 0.35, 12.0, 23.5, 0.25, (0.55, 0.08), (0.90, 0.10), sigma_vt=10.0,
                blended=0.30, centre=(6.024, -72.081), profile="plummer", scale_deg=0.05,
                distance_pc=4500.0, depth=0.01, pm=(5.25, -2.53)),
    _Population("omegacen", 0.007, 0.35, 12.0, 23.5, 0.25, (0.60, 0.08), (0.95, 0.10), sigma_vt=15.0,
                blended=0.30, centre=(201.697, -47.480), profile="plummer", scale_deg=0.08,
                distance_pc=5200.0, depth=0.01, pm=(-3.25, -6.75)),
    _Population("m4", 0.005, 0.35, 12.0, 23.5, 0.25, (0.75, 0.08), (1.15, 0.10), sigma_vt=5.0,
                blended=0.20, centre=(245.897, -26.526), profile="plummer", scale_deg=0.06,
                distance_pc=2200.0, depth=0.01, pm=(-12.5, -19.0)),
    _Population("ngc6397", 0.005, 0.35, 12.0, 23.5, 0.25, (0.55, 0.08), (0.90, 0.10), sigma_vt=5.0,
                blended=0.20, centre=(265.175, -53.674), profile="plummer", scale_deg=0.04,
                distance_pc=2400.0, depth=0.01, pm=(3.30, -17.6)),
    _Population("pleiades", 0.003, 0.30, 9.0, 22.0, 0.02, (0.70, 0.45), (1.00, 0.10), sigma_vt=0.5,
                centre=(56.750, 24.117), profile="plummer", scale_deg=0.6, distance_pc=136.0, depth=0.02,
                pm=(19.99, -45.55)),
)
# fmt: on

_POP_INDEX = {p.name: i for i, p in enumerate(_POPULATIONS)}


def _pop_table(attr: str) -> np.ndarray:
    """Per-population parameter as an array, so that ``table[codes]`` vectorises lookups per row."""
    return np.array([getattr(p, attr) for p in _POPULATIONS], dtype=float)


# Footprint of demo_survey.  Masks are (ra, dec, radius_deg) of bright stars whose halos ruin the images.
_DEC_LIMIT = 30.0
_NORTH_FIELD = (185.0, 47.0, 4.0)
_BRIGHT_STARS = (
    (101.287, -16.716, 1.0),  # Sirius
    (95.988, -52.696, 0.8),  # Canopus
    (219.902, -60.834, 0.8),  # alpha Centauri
    (24.429, -57.237, 0.5),  # Achernar
    (247.352, -26.432, 0.5),  # Antares
)
_RA_STRIPE = (150.0, 151.5, -60.0, 10.0)  # ra_lo, ra_hi, dec_lo, dec_hi: a night lost to weather
_DEC_STRIPE = (-12.6, -11.8, 330.0, 25.0)  # dec_lo, dec_hi, ra_from, ra_to (wraps through RA=0)
_EDGE_DEG = 0.1
_XMATCH_DEC_LIMIT = 40.0

# Survey epochs: demo_survey observed 2015-2022, demo_xmatch 2010-2013 (MJD).
_SURVEY_MJD = (57023.0, 59945.0)
_XMATCH_MJD = (55197.0, 56658.0)

# Extinction coefficients A_band / E(B-V) (SDSS-like optical, 2MASS-like NIR).
_A_G, _A_R, _A_I = 3.303, 2.285, 1.698
_A_J, _A_H, _A_K = 0.723, 0.460, 0.310
_AB_TO_VEGA = {"j": 0.91, "h": 1.39, "k": 1.85}

# 5-sigma depths (the magnitude at which S/N = 5).
_M5_OPT = {"g": 25.4, "r": 24.6, "i": 24.1}
_M5_NIR = {"j": 21.3, "h": 20.7, "k": 20.2}


# ---------------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------------


def _unit_vectors(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """(3, n) Cartesian unit vectors of longitudes and latitudes in degrees."""
    lo, la = np.radians(lon), np.radians(lat)
    cos_la = np.cos(la)
    return np.stack([cos_la * np.cos(lo), cos_la * np.sin(lo), np.sin(la)])


def _galactic_to_icrs_matrix() -> np.ndarray:
    """Rotation taking Galactic unit vectors to ICRS ones, as astropy defines the two frames.

    Galactic <-> ICRS is a fixed rotation, so astropy is asked once for the images of the three
    Galactic axes and the million-row transforms become one 3x3 matrix product: ``SkyCoord`` on every
    row spends most of its time in Quantity bookkeeping.
    """
    axes = SkyCoord(l=[0.0, 90.0, 0.0] * u.deg, b=[0.0, 0.0, 90.0] * u.deg, frame="galactic").icrs
    return _unit_vectors(axes.ra.deg, axes.dec.deg)


_GAL_TO_ICRS = _galactic_to_icrs_matrix()


def _wrap_ra(ra: np.ndarray) -> np.ndarray:
    """RA in [0, 360): ``np.mod`` of a tiny negative number returns exactly 360.0, which must become 0."""
    ra = np.mod(ra, 360.0)
    return np.where(ra >= 360.0, 0.0, ra)


def offset_by(
    ra: np.ndarray, dec: np.ndarray, east_deg: np.ndarray, north_deg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move points along great circles by the tangent-plane offset (east, north), in degrees.

    Done with unit vectors rather than spherical trigonometry so that it stays exact at the poles (where
    the local east/north basis is still defined by the RA of the point) and across RA=0; it is the same
    map as ``SkyCoord.directional_offset_by`` with separation hypot(east, north).
    """
    a, d = np.radians(ra), np.radians(dec)
    rho = np.radians(np.hypot(east_deg, north_deg))
    theta = np.arctan2(east_deg, north_deg)  # position angle, east of north
    sa, ca, sd, cd = np.sin(a), np.cos(a), np.sin(d), np.cos(d)
    p = np.stack([cd * ca, cd * sa, sd])
    east = np.stack([-sa, ca, np.zeros_like(a)])
    north = np.stack([-sd * ca, -sd * sa, cd])
    q = p * np.cos(rho) + (east * np.sin(theta) + north * np.cos(theta)) * np.sin(rho)
    new_ra = _wrap_ra(np.degrees(np.arctan2(q[1], q[0])))
    new_dec = np.degrees(np.arcsin(np.clip(q[2], -1.0, 1.0)))
    return new_ra, new_dec


def _angular_distance(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Haversine distance in degrees, accurate at small separations where the mask edges live."""
    a, d, a0, d0 = np.radians(ra), np.radians(dec), np.radians(ra0), np.radians(dec0)
    h = np.sin((d - d0) / 2) ** 2 + np.cos(d) * np.cos(d0) * np.sin((a - a0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _near(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float, reach: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rows within ``reach`` degrees of (ra0, dec0) and their distances.

    A declination band cuts the candidates first, so that masks a degree wide cost almost nothing on
    a million rows; the exact distance is computed only inside the band.
    """
    rows = np.flatnonzero(np.abs(dec - dec0) <= reach)
    dist = _angular_distance(ra[rows], dec[rows], ra0, dec0)
    close = dist <= reach
    return rows[close], dist[close]


def _dec_limit(ra: np.ndarray) -> np.ndarray:
    """Ragged northern edge of the main footprint, as a survey tiled by pointings would have."""
    return _DEC_LIMIT + 1.5 * np.sin(np.radians(3.0 * ra))


def _in_ra_range(ra: np.ndarray, ra_from: float, ra_to: float) -> np.ndarray:
    """RA in [ra_from, ra_to), going east and wrapping through 0 when ra_to < ra_from."""
    if ra_from <= ra_to:
        return (ra >= ra_from) & (ra < ra_to)
    return (ra >= ra_from) | (ra < ra_to)


def _survey_footprint(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Footprint of demo_survey: returns (inside, near_edge, in_bright_star_halo) boolean arrays."""
    dec_max = _dec_limit(ra)
    inside = dec < dec_max
    edge = np.abs(dec - dec_max) < _EDGE_DEG
    fra, fdec, frad = _NORTH_FIELD
    rows, dist = _near(ra, dec, fra, fdec, frad + _EDGE_DEG)
    inside[rows[dist < frad]] = True
    edge[rows[np.abs(dist - frad) < _EDGE_DEG]] = True
    halo = np.zeros(ra.shape, dtype=bool)
    for sra, sdec, rad in _BRIGHT_STARS:
        rows, dist = _near(ra, dec, sra, sdec, 2.0 * rad)
        inside[rows[dist < rad]] = False
        edge[rows[np.abs(dist - rad) < _EDGE_DEG]] = True
        halo[rows] = True
    ra_lo, ra_hi, dlo, dhi = _RA_STRIPE
    in_band = (dec >= dlo) & (dec < dhi)
    inside &= ~(in_band & (ra >= ra_lo) & (ra < ra_hi))
    edge |= in_band & ((np.abs(ra - ra_lo) < _EDGE_DEG) | (np.abs(ra - ra_hi) < _EDGE_DEG))
    dlo, dhi, ra_from, ra_to = _DEC_STRIPE
    in_ra = _in_ra_range(ra, ra_from, ra_to)
    inside &= ~(in_ra & (dec >= dlo) & (dec < dhi))
    edge |= in_ra & ((np.abs(dec - dlo) < _EDGE_DEG) | (np.abs(dec - dhi) < _EDGE_DEG))
    return inside, edge & inside, halo & inside


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


def _reflect_latitude(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold latitudes beyond the poles back onto the sphere (Laplace tails can step past +-90)."""
    over = np.abs(lat) > 90.0
    lat = np.where(over, np.sign(lat) * 180.0 - lat, lat)
    lon = np.where(over, lon + 180.0, lon)
    return _wrap_ra(lon), lat


def _isotropic_lat(rng: np.random.Generator, n: int) -> np.ndarray:
    """Latitude for points uniform on the sphere (uniform in sin(lat))."""
    return np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))


def _sample_galactic(rng: np.random.Generator, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(l, b) in degrees for the Galactic populations.

    The disk is a thin + thick exponential (Laplace in b) with longitudes concentrated towards the
    centre; the bulge a Gaussian around (0, 0); halo stars and galaxies are isotropic, the galaxies
    thinned at low |b| (zone of avoidance) by rejecting most of them there.
    """
    if name == "disk":
        toward_centre = rng.random(n) < 0.55
        lon = np.where(toward_centre, rng.normal(0.0, 55.0, n), rng.uniform(0.0, 360.0, n))
        thin = rng.random(n) < 0.8
        lat = rng.laplace(0.0, np.where(thin, 3.5, 12.0), n)
        return _reflect_latitude(lon, lat)
    if name == "bulge":
        return _reflect_latitude(rng.normal(0.0, 7.0, n), rng.normal(0.0, 4.5, n))
    lon = rng.uniform(0.0, 360.0, n)
    lat = _isotropic_lat(rng, n)
    if name == "galaxy":
        # Redraw the latitude of most sources that land in the plane; a few remain, heavily reddened.
        redraw = rng.random(n) < 0.9 * np.exp(-((lat / 12.0) ** 2))
        lat[redraw] = np.sign(lat[redraw]) * np.degrees(
            np.arcsin(rng.uniform(np.sin(np.radians(20.0)), 1.0, int(redraw.sum())))
        )
    return _wrap_ra(lon), lat


def _sample_compact(rng: np.random.Generator, pop: _Population, n: int) -> tuple[np.ndarray, np.ndarray]:
    """ICRS positions for a cluster (projected Plummer profile) or a Magellanic cloud (elliptical Gauss)."""
    assert pop.centre is not None
    if pop.profile == "plummer":
        # Projected Plummer: M(<R) = R^2 / (R^2 + a^2), truncated at 15 a.
        u_max = 225.0 / 226.0
        uu = rng.uniform(0.0, u_max, n)
        radius = pop.scale_deg * np.sqrt(uu / (1.0 - uu))
        theta = rng.uniform(0.0, 2 * np.pi, n)
        major, minor = radius * np.cos(theta), radius * np.sin(theta)
    else:
        major = rng.normal(0.0, pop.scale_deg, n)
        minor = rng.normal(0.0, pop.scale_deg * pop.axis_ratio, n)
    pa = np.radians(pop.pa_deg)
    north = major * np.cos(pa) - minor * np.sin(pa)
    east = major * np.sin(pa) + minor * np.cos(pa)
    ra0 = np.full(n, pop.centre[0])
    dec0 = np.full(n, pop.centre[1])
    return offset_by(ra0, dec0, east, north)


def _sample_positions(rng: np.random.Generator, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) for rows of the given population codes, with a single Galactic->ICRS transform."""
    n = codes.size
    ra = np.empty(n)
    dec = np.empty(n)
    gal_rows: list[np.ndarray] = []
    gal_l: list[np.ndarray] = []
    gal_b: list[np.ndarray] = []
    for code, pop in enumerate(_POPULATIONS):
        rows = np.flatnonzero(codes == code)
        if rows.size == 0:
            continue
        if pop.centre is None:
            lon, lat = _sample_galactic(rng, pop.name, rows.size)
            gal_rows.append(rows)
            gal_l.append(lon)
            gal_b.append(lat)
        else:
            ra[rows], dec[rows] = _sample_compact(rng, pop, rows.size)
    if gal_rows:
        rows = np.concatenate(gal_rows)
        x, y, z = _GAL_TO_ICRS @ _unit_vectors(np.concatenate(gal_l), np.concatenate(gal_b))
        ra[rows] = _wrap_ra(np.degrees(np.arctan2(y, x)))
        dec[rows] = np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))
    return ra, dec


def _galactic_latitude(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Galactic latitude in degrees, for the reddening model."""
    z = (_GAL_TO_ICRS.T @ _unit_vectors(ra, dec))[2]
    return np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))


def _number_counts(
    rng: np.random.Generator, alpha: np.ndarray, m_min: np.ndarray, m_max: np.ndarray
) -> np.ndarray:
    """Magnitudes with dN/dm ∝ 10**(alpha m) on [m_min, m_max] by inverting the cumulative counts."""
    uu = rng.random(alpha.size)
    span = np.power(10.0, alpha * (m_max - m_min)) - 1.0
    return m_min + np.log10(1.0 + uu * span) / alpha


def _mag_error(m: np.ndarray, m5: float, floor: float = 0.005) -> np.ndarray:
    """1-sigma magnitude error from the S/N implied by a 5-sigma depth, plus a calibration floor."""
    snr = 5.0 * np.power(10.0, -0.4 * (m - m5))
    return np.sqrt(floor**2 + (1.0857 / snr) ** 2)


def _observe(
    rng: np.random.Generator, m_true: np.ndarray, m5: float, dropout: float, inflate: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy magnitude and error, NaN where the source is not detected in this band.

    Detection falls off smoothly around the 5-sigma depth, and a small random ``dropout`` stands for
    bad columns, satellite trails and the like that lose a band for bright sources too.
    """
    err = _mag_error(m_true, m5)
    if inflate is not None:
        err = err * inflate
    err = err * rng.lognormal(0.0, 0.08, m_true.size)
    obs = m_true + rng.normal(0.0, 1.0, m_true.size) * err
    p_det = 1.0 / (1.0 + np.exp((m_true - m5 - 0.1) / 0.15))
    detected = (rng.random(m_true.size) < p_det) & (rng.random(m_true.size) >= dropout)
    return np.where(detected, obs, np.nan), np.where(detected, err, np.nan)


def _tile_epochs(
    rng: np.random.Generator,
    ra: np.ndarray,
    dec: np.ndarray,
    mjd_range: tuple[float, float],
    tile_deg: float,
    spread_days: float,
) -> np.ndarray:
    """Mean epoch per source: each sky tile got its own observing date, as in a real survey schedule."""
    n_ra = round(360.0 / tile_deg)
    n_dec = round(180.0 / tile_deg)
    tile_mjd = rng.uniform(mjd_range[0], mjd_range[1] - 4.0 * spread_days, n_ra * n_dec)
    i_ra = np.minimum((ra / tile_deg).astype(np.int64), n_ra - 1)
    i_dec = np.clip(((dec + 90.0) / tile_deg).astype(np.int64), 0, n_dec - 1)
    mjd = tile_mjd[i_dec * n_ra + i_ra] + np.abs(rng.normal(0.0, spread_days, ra.size))
    # Observations happen at night: keep the fractional day between roughly 0.0 and 0.4 (UT at Chile).
    return np.floor(mjd) + rng.uniform(0.0, 0.4, ra.size)


def _unique_random_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """n distinct random int64 in [low, high); redraws the (astronomically rare) collisions."""
    ids = rng.integers(low, high, n, dtype=np.int64)
    while True:
        order = np.argsort(ids, kind="stable")
        dup = np.zeros(n, dtype=bool)
        dup[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        if not dup.any():
            return ids
        ids[dup] = rng.integers(low, high, int(dup.sum()), dtype=np.int64)


def _gaia_style_ids(rng: np.random.Generator, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """HEALPix order-12 nested index * 2**35 + a random 35-bit number, unique per source.

    This is the Gaia source_id convention: ids stay positive int64, look random, and still let a reader
    find the sky cell of a source from its id alone.
    """
    n = ra.size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    ipix = nested.lonlat_to_healpix(Longitude(ra * u.deg), Latitude(dec * u.deg), 12).astype(np.int64)
    low = rng.integers(0, 2**35, n, dtype=np.int64)
    ids = ipix * 2**35 + low
    while True:
        order = np.argsort(ids, kind="stable")
        dup = np.zeros(n, dtype=bool)
        dup[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        if not dup.any():
            return ids
        ids[dup] = ipix[dup] * 2**35 + rng.integers(0, 2**35, int(dup.sum()), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# demo_survey
# ---------------------------------------------------------------------------------------------------------


def _draw_in_footprint(
    rng: np.random.Generator,
    n: int,
    weights: np.ndarray,
    footprint: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Population codes and positions for exactly n sources inside ``footprint(ra, dec) -> bool``.

    Oversampled batches are drawn and cut until enough sources survive, so the population mix inside
    the footprint is what the weights and the geometry imply, not what was asked for before the cut.
    """
    codes_parts: list[np.ndarray] = [np.empty(0, dtype=np.int8)]
    ra_parts: list[np.ndarray] = [np.empty(0)]
    dec_parts: list[np.ndarray] = [np.empty(0)]
    have = 0
    p = weights / weights.sum()
    while have < n:
        m = int((n - have) * 1.45) + 64
        codes = rng.choice(p.size, size=m, p=p).astype(np.int8)
        ra, dec = _sample_positions(rng, codes)
        keep = footprint(ra, dec)
        codes_parts.append(codes[keep])
        ra_parts.append(ra[keep])
        dec_parts.append(dec[keep])
        have += int(keep.sum())
    return (np.concatenate(codes_parts)[:n], np.concatenate(ra_parts)[:n], np.concatenate(dec_parts)[:n])


def _make_survey(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """All demo_survey columns as numpy arrays, in a shuffled row order."""
    weights = _pop_table("weight")
    codes, ra, dec = _draw_in_footprint(rng, n, weights, lambda a, d: _survey_footprint(a, d)[0])
    _, near_edge, bright_halo = _survey_footprint(ra, dec)
    is_galaxy = codes == _POP_INDEX["galaxy"]

    # Photometry: r from the number counts, colours from the population mixture plus reddening.
    r_true = _number_counts(
        rng, _pop_table("alpha")[codes], _pop_table("r_min")[codes], _pop_table("r_max")[codes]
    )
    comp_b = rng.random(n) < _pop_table("frac_b")[codes]
    gr_a = np.array([p.gr_a for p in _POPULATIONS])
    gr_b = np.array([p.gr_b for p in _POPULATIONS])
    mu = np.where(comp_b, gr_b[codes, 0], gr_a[codes, 0])
    sd = np.where(comp_b, gr_b[codes, 1], gr_a[codes, 1])
    gr0 = np.clip(rng.normal(mu, sd), -0.4, 1.9)
    # Stellar locus: r-i rises slowly with g-r, then steeply for M dwarfs; galaxies follow a flatter one.
    ri0 = np.where(is_galaxy, 0.12 + 0.35 * gr0, 0.02 + 0.33 * gr0 + 0.9 * np.clip(gr0 - 1.25, 0.0, None))
    ri0 = ri0 + rng.normal(0.0, 0.05, n)

    glat = _galactic_latitude(ra, dec)
    ebv_column = 0.02 / np.maximum(np.abs(np.sin(np.radians(glat))), 0.04) * rng.lognormal(0.0, 0.3, n)
    # Galactic stars sit in front of part of the dust column; everything else sees all of it.
    in_galaxy = (codes == _POP_INDEX["disk"]) | (codes == _POP_INDEX["bulge"])
    ebv = np.minimum(np.where(in_galaxy, rng.uniform(0.2, 1.0, n), 1.0) * ebv_column, 1.5)
    ebv = ebv + _pop_table("internal_ebv")[codes]
    g_true = r_true + gr0 + (_A_G - _A_R) * ebv
    i_true = r_true - ri0 - (_A_R - _A_I) * ebv

    blended = rng.random(n) < _pop_table("blended")[codes]
    inflate = np.where(blended, 1.4, 1.0)
    g_mag, g_err = _observe(rng, g_true, _M5_OPT["g"], 0.004, inflate)
    r_mag, r_err = _observe(rng, r_true, _M5_OPT["r"], 0.004, inflate)
    i_mag, i_err = _observe(rng, i_true, _M5_OPT["i"], 0.004, inflate)
    # A catalog row needs a detection somewhere: restore r when every band dropped out.
    none = np.isnan(g_mag) & np.isnan(r_mag) & np.isnan(i_mag)
    r_err = np.where(none, _mag_error(r_true, _M5_OPT["r"]) * inflate, r_err)
    r_mag = np.where(none, r_true + rng.normal(0.0, 1.0, n) * r_err, r_mag)

    # Astrometry: errors scale as seeing / S/N with a floor, worse for saturated and blended sources.
    snr_r = 5.0 * np.power(10.0, -0.4 * (r_true - _M5_OPT["r"]))
    saturated = np.minimum(np.minimum(g_true, r_true), i_true) < 14.0
    pos_err = np.sqrt(4.0**2 + (350.0 / snr_r) ** 2) * np.where(saturated, 3.0, 1.0) * inflate
    ra_error = pos_err * rng.lognormal(0.0, 0.15, n)
    dec_error = pos_err * 1.05 * rng.lognormal(0.0, 0.15, n)

    # Distances: fixed for compact systems and the bulge, photometric (dwarf/giant) for disk and halo.
    m_abs = np.where(comp_b, rng.normal(0.6, 0.7, n), np.clip(2.6 + 4.5 * gr0, 0.5, 13.0))
    phot_dist = np.clip(np.power(10.0, (r_true - _A_R * ebv - m_abs + 5.0) / 5.0), 5.0, 80_000.0)
    fixed = _pop_table("distance_pc")[codes]
    depth = _pop_table("depth")[codes]
    dist_pc = np.where(fixed > 0, fixed * (1.0 + depth * rng.normal(0.0, 1.0, n)), phot_dist)
    dist_kpc = np.where(is_galaxy, np.inf, np.maximum(dist_pc, 5.0) / 1000.0)
    plx_true = 1.0 / dist_kpc  # mas; 0 for galaxies
    # Proper motion = systemic + transverse velocity dispersion / distance (4.74 km/s = 1 au/yr).
    pm_sys = np.array([p.pm for p in _POPULATIONS])
    vt_sigma = _pop_table("sigma_vt")[codes]
    pm_ra_true = pm_sys[codes, 0] + rng.normal(0.0, 1.0, n) * vt_sigma / (4.74 * dist_kpc)
    pm_dec_true = pm_sys[codes, 1] + rng.normal(0.0, 1.0, n) * vt_sigma / (4.74 * dist_kpc)
    parallax = plx_true + rng.normal(0.0, 0.6, n) * pos_err
    pm_ra = pm_ra_true + rng.normal(0.0, 0.4, n) * pos_err
    pm_dec = pm_dec_true + rng.normal(0.0, 0.4, n) * pos_err

    # Star/galaxy separation degrades towards the faint end.
    faint = np.clip((r_true - 21.0) / 3.2, 0.0, 1.0)
    p_ext = np.where(is_galaxy, 0.98 - 0.38 * faint, 0.01 + 0.10 * faint + 0.05 * blended)
    extended = rng.random(n) < p_ext

    missing = np.isnan(g_mag) | np.isnan(r_mag) | np.isnan(i_mag)
    low_snr = np.isnan(r_mag) | (r_err > 0.1)
    flags = (
        FLAG_SATURATED * saturated
        + FLAG_BLENDED * blended
        + FLAG_EDGE * near_edge
        + FLAG_BRIGHT_STAR * bright_halo
        + FLAG_BAD_PIXEL * (rng.random(n) < 0.007)
        + FLAG_MISSING_BAND * missing
        + FLAG_LOW_SNR * low_snr
        + FLAG_COSMIC_RAY * (rng.random(n) < 0.003)
    ).astype(np.int32)

    epoch = _tile_epochs(rng, ra, dec, _SURVEY_MJD, tile_deg=3.0, spread_days=25.0)
    source_id = _gaia_style_ids(rng, ra, dec)

    # Real survey exports are not ordered by population: shuffle once so every file holds a sky mix.
    order = rng.permutation(n)
    f32 = np.float32
    cols: dict[str, np.ndarray] = {
        "source_id": source_id,
        "ra": ra,
        "dec": dec,
        "ra_error": ra_error.astype(f32),
        "dec_error": dec_error.astype(f32),
        "g_mag": g_mag.astype(f32),
        "r_mag": r_mag.astype(f32),
        "i_mag": i_mag.astype(f32),
        "g_mag_err": g_err.astype(f32),
        "r_mag_err": r_err.astype(f32),
        "i_mag_err": i_err.astype(f32),
        "pm_ra": pm_ra.astype(f32),
        "pm_dec": pm_dec.astype(f32),
        "parallax": parallax.astype(f32),
        "flags": flags,
        "extended": extended,
        "epoch": epoch,
    }
    return {k: v[order] for k, v in cols.items()}


# ---------------------------------------------------------------------------------------------------------
# demo_xmatch
# ---------------------------------------------------------------------------------------------------------


def _observe_nir(
    rng: np.random.Generator, j_ab: np.ndarray, h_ab: np.ndarray, k_ab: np.ndarray
) -> dict[str, np.ndarray]:
    """Vega J, H, K magnitudes and errors from AB ones, NaN below each band's detection limit."""
    out: dict[str, np.ndarray] = {}
    for band, m_ab in (("j", j_ab), ("h", h_ab), ("k", k_ab)):
        mag, err = _observe(rng, m_ab - _AB_TO_VEGA[band], _M5_NIR[band], 0.004)
        out[f"{band}_mag"], out[f"{band}_mag_err"] = mag, err
    none = np.isnan(out["j_mag"]) & np.isnan(out["h_mag"]) & np.isnan(out["k_mag"])
    k_true = k_ab - _AB_TO_VEGA["k"]
    k_err = _mag_error(k_true, _M5_NIR["k"])
    out["k_mag_err"] = np.where(none, k_err, out["k_mag_err"])
    out["k_mag"] = np.where(none, k_true + rng.normal(0.0, 1.0, k_true.size) * k_err, out["k_mag"])
    return out


def _class_star(rng: np.random.Generator, galaxy: np.ndarray, k_vega: np.ndarray) -> np.ndarray:
    """SExtractor-like stellarity: near 1 for stars, 0 for galaxies, drifting to ~0.5 when faint."""
    sharp = np.where(galaxy, rng.beta(1.5, 9.0, galaxy.size), rng.beta(9.0, 1.3, galaxy.size))
    weight = np.clip((_M5_NIR["k"] + 0.5 - np.nan_to_num(k_vega, nan=_M5_NIR["k"])) / 3.0, 0.0, 1.0)
    return np.clip(weight * sharp + (1.0 - weight) * rng.uniform(0.25, 0.75, galaxy.size), 0.0, 1.0)


def _make_xmatch(rng: np.random.Generator, survey: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Near-infrared catalog: ~70% counterparts of survey sources, ~30% sources without one."""
    n_cp = round(0.7 * n)

    # Counterparts: a random subset of the optical sources inside the NIR footprint that are bright enough
    # in i to be seen in J/H/K (the brightest 1.4 n_cp of them, so the depth adapts to n_rows).
    s_dec = survey["dec"]
    i_mag, r_mag = survey["i_mag"].astype(float), survey["r_mag"].astype(float)
    usable = np.flatnonzero((s_dec < _XMATCH_DEC_LIMIT) & np.isfinite(i_mag) & np.isfinite(r_mag))
    pool = usable[np.argsort(i_mag[usable], kind="stable")[: int(1.4 * n_cp) + 1]]
    n_cp = min(n_cp, pool.size)
    n_new = n - n_cp
    pick = rng.choice(pool, size=n_cp, replace=False)
    galaxy_cp = survey["extended"][pick]
    ri = r_mag[pick] - i_mag[pick]
    # Optical-NIR colours follow r-i (which already carries the reddening) for stars; galaxies are redder.
    j_ab = i_mag[pick] - np.where(galaxy_cp, 0.55, 0.15 + 0.85 * ri) + rng.normal(0.0, 0.05, n_cp)
    h_ab = j_ab - np.where(galaxy_cp, 0.25, 0.05 + 0.35 * ri) + rng.normal(0.0, 0.04, n_cp)
    k_ab = h_ab - np.where(galaxy_cp, 0.20, 0.00 + 0.10 * ri) + rng.normal(0.0, 0.04, n_cp)
    # Positional error of the NIR survey: 0.1" for bright sources growing to 0.5" at the faint end.
    sigma_arcsec = 0.1 + 0.4 * np.clip((i_mag[pick] - 15.0) / 7.0, 0.0, 1.0)
    sigma_deg = sigma_arcsec / 3600.0
    ra_cp, dec_cp = offset_by(
        survey["ra"][pick],
        s_dec[pick],
        rng.normal(0.0, 1.0, n_cp) * sigma_deg,
        rng.normal(0.0, 1.0, n_cp) * sigma_deg,
    )

    # Sources without an optical counterpart: reddened disk stars, red galaxies, a few halo stars,
    # spread over the whole NIR footprint (including the optical holes and dec 30..40).
    new_weights = np.zeros(len(_POPULATIONS))
    new_weights[[_POP_INDEX["disk"], _POP_INDEX["galaxy"], _POP_INDEX["halo"], _POP_INDEX["bulge"]]] = (
        0.5,
        0.3,
        0.1,
        0.1,
    )
    codes, ra_new, dec_new = _draw_in_footprint(rng, n_new, new_weights, lambda a, d: d < _XMATCH_DEC_LIMIT)
    galaxy_new = codes == _POP_INDEX["galaxy"]
    k_vega = _number_counts(rng, np.full(n_new, 0.35), np.full(n_new, 11.0), np.full(n_new, 20.0))
    j_k = np.where(galaxy_new, rng.normal(1.65, 0.25, n_new), np.abs(rng.normal(1.4, 0.7, n_new)) + 0.3)
    k_ab_new = k_vega + _AB_TO_VEGA["k"]
    h_ab_new = k_ab_new + 0.35 * j_k + (_AB_TO_VEGA["h"] - _AB_TO_VEGA["k"]) + rng.normal(0.0, 0.05, n_new)
    j_ab_new = k_ab_new + j_k + (_AB_TO_VEGA["j"] - _AB_TO_VEGA["k"])

    galaxy = np.concatenate([galaxy_cp, galaxy_new])
    phot = _observe_nir(
        rng,
        np.concatenate([j_ab, j_ab_new]),
        np.concatenate([h_ab, h_ab_new]),
        np.concatenate([k_ab, k_ab_new]),
    )
    ra = np.concatenate([ra_cp, ra_new])
    dec = np.concatenate([dec_cp, dec_new])
    class_star = _class_star(rng, galaxy, phot["k_mag"])
    mjd = _tile_epochs(rng, ra, dec, _XMATCH_MJD, tile_deg=6.0, spread_days=3.0)
    obj_id = _unique_random_ids(rng, n_cp + n_new, 10**15, 2**62)

    order = rng.permutation(n_cp + n_new)
    f32 = np.float32
    cols: dict[str, np.ndarray] = {
        "obj_id": obj_id,
        "ra": ra,
        "dec": dec,
        **{
            k: phot[k].astype(f32) for k in ("j_mag", "h_mag", "k_mag", "j_mag_err", "h_mag_err", "k_mag_err")
        },
        "class_star": class_star.astype(f32),
        "mjd": mjd,
    }
    return {k: cols[k][order] for k in XMATCH_SCHEMA.names}


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _write_parts(
    cols: dict[str, np.ndarray], schema: pa.Schema, out: Path, n_files: int, seed: int
) -> list[Path]:
    """Split the rows into n_files near-equal zstd Parquet files, replacing an earlier run's parts.

    Old ``part-*.parquet`` files are removed first: a previous run with more files would otherwise leave
    stale parts that a directory-wide reader would silently add to the catalog.
    """
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    n = len(cols[schema.names[0]])
    n_files = max(1, min(n_files, n))
    meta = {b"generator": b"ingest.demo", b"seed": str(seed).encode()}
    arrays = [pa.array(cols[name], type=schema.field(name).type) for name in schema.names]
    table = pa.Table.from_arrays(arrays, schema=schema.with_metadata(meta))
    bounds = np.linspace(0, n, n_files + 1).astype(int)
    # Dictionary encoding only pays for low-cardinality columns; on random floats it costs 7x the time.
    dictionary = [
        name
        for name in schema.names
        if pa.types.is_integer(schema.field(name).type) and schema.field(name).type.bit_width <= 32
    ]
    paths: list[Path] = []
    for k in range(n_files):
        path = out / f"part-{k:03d}.parquet"
        pq.write_table(
            table.slice(bounds[k], bounds[k + 1] - bounds[k]),
            path,
            compression="zstd",
            use_dictionary=dictionary,
        )
        paths.append(path)
    return paths


def generate_demo_catalogs(
    out_dir: str | Path, n_rows: int = 1_000_000, seed: int = 42, n_files: int = 4
) -> dict[str, list[Path]]:
    """Write the synthetic ``demo_survey`` (n_rows rows) and ``demo_xmatch`` (n_rows // 3 rows) catalogs.

    Files go to ``out_dir/demo_survey/part-XXX.parquet`` and ``out_dir/demo_xmatch/part-XXX.parquet``
    (n_files each, fewer if there are fewer rows than files).  The output depends only on
    (n_rows, seed), not on n_files, so tests can rely on exact values.  Returns the written paths per
    catalog name.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    if n_files < 1:
        raise ValueError(f"n_files must be >= 1, got {n_files}")
    out = Path(out_dir)
    survey_seed, xmatch_seed = np.random.SeedSequence(seed).spawn(2)
    survey = _make_survey(np.random.default_rng(survey_seed), n_rows)
    xmatch = _make_xmatch(np.random.default_rng(xmatch_seed), survey, max(1, n_rows // 3))
    return {
        "demo_survey": _write_parts(survey, SURVEY_SCHEMA, out / "demo_survey", n_files, seed),
        "demo_xmatch": _write_parts(xmatch, XMATCH_SCHEMA, out / "demo_xmatch", n_files, seed),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m ingest.demo OUT_DIR [--rows N] [--seed S] [--files F]``."""
    parser = argparse.ArgumentParser(description="Write the synthetic demo_survey and demo_xmatch catalogs")
    parser.add_argument("out_dir", type=Path, help="directory that receives demo_survey/ and demo_xmatch/")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of demo_survey (default 1e6)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--files", type=int, default=4, help="Parquet files per catalog (default 4)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    written = generate_demo_catalogs(args.out_dir, n_rows=args.rows, seed=args.seed, n_files=args.files)
    for name, paths in written.items():
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        print(f"{name}: {rows} rows in {len(paths)} files under {paths[0].parent}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
