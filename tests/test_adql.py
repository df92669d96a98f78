"""ADQL translator: every construct translated and executed on DuckDB, geometry checked against astropy,
cross-matches against search_around_sky, and a hostile corpus that must be rejected."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord, SkyOffsetFrame, search_around_sky
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dac_lake.adql import (
    AdqlError,
    AdqlSyntaxError,
    AdqlTooComplex,
    AdqlUnknownColumn,
    AdqlUnknownTable,
    AdqlUnsupported,
    Circle,
    Polygon,
    translate,
)
from dac_lake.adql.model import neighbour_order
from dac_lake.healpix import healpix29
from tests.adql_support import DemoRegistry, around, catalog, query, run, uniform_sky

REG = DemoRegistry()


@pytest.fixture(scope="module")
def data() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(42)
    ra, dec = uniform_sky(3000, rng)
    ra2, dec2 = around(0.0, 0.0, 3.0, 300, rng)
    ra3, dec3 = around(0.0, 90.0, 3.0, 200, rng)
    survey = catalog(np.concatenate([ra, ra2, ra3]), np.concatenate([dec, dec2, dec3]), seed=1)
    # xmatch: a jittered copy of half of survey (so cross-matches find pairs) plus unrelated sources
    base = SkyCoord(survey["ra"].to_numpy()[:1500] * u.deg, survey["dec"].to_numpy()[:1500] * u.deg)
    moved = base.directional_offset_by(rng.uniform(0, 360, 1500) * u.deg, rng.uniform(0, 3, 1500) * u.arcsec)
    rx, dx = uniform_sky(500, rng)
    xmatch = catalog(np.concatenate([moved.ra.deg, rx]), np.concatenate([moved.dec.deg, dx]), seed=2)
    return {"survey": survey, "xmatch": xmatch}


# ---------------------------------------------------------------------------- basic clauses


def test_top_offset_order(data):
    out = query("SELECT TOP 3 id FROM demo.survey ORDER BY id OFFSET 5", data)
    assert out["id"].tolist() == [5, 6, 7]
    out = query("SELECT TOP 2 id, gmag FROM demo.survey ORDER BY 2 DESC, id", data)
    assert out["gmag"].tolist() == sorted(data["survey"]["gmag"], reverse=True)[:2]
    out = query("SELECT TOP 3 id AS ident FROM demo.survey ORDER BY ident DESC", data)
    assert out["ident"].tolist() == [3499, 3498, 3497]


def test_distinct_and_group_by_having(data):
    out = query("SELECT DISTINCT flags FROM demo.survey", data)
    assert sorted(out["flags"]) == sorted(data["survey"]["flags"].unique())
    out = query(
        "SELECT flags, COUNT(*) AS n, AVG(gmag) AS g, MIN(id), MAX(id), SUM(flags) FROM demo.survey "
        "GROUP BY flags HAVING COUNT(*) > 200 ORDER BY flags",
        data,
    )
    want = data["survey"].groupby("flags").size()
    want = want[want > 200]
    assert out["flags"].tolist() == want.index.tolist()
    assert out["n"].tolist() == want.tolist()
    out = query("SELECT COUNT(DISTINCT flags) AS k FROM demo.survey", data)
    assert out["k"][0] == data["survey"]["flags"].nunique()


def test_quoted_and_case_insensitive_identifiers(data):
    out = query(
        'SELECT TOP 1 "Mixed_Case", mixed_case AS m2, ID FROM "demo"."survey" AS "S" ORDER BY s.id', data
    )
    assert list(out.columns) == ["Mixed_Case", "m2", "id"]
    out = query("SELECT TOP 1 S.Id FROM DEMO.SURVEY s ORDER BY 1", data)
    assert out["id"][0] == 0
    out = query("SELECT TOP 1 demo.survey.id FROM demo.survey ORDER BY demo.survey.id", data)
    assert out["id"][0] == 0
    out = query("SELECT TOP 1 survey.id FROM survey ORDER BY survey.id", data)
    assert out["id"][0] == 0


def test_select_star_is_explicit_and_hides_healpix(data):
    t = translate("SELECT * FROM demo.survey", REG)
    assert "*" not in t.sql and "_healpix_29" not in t.sql
    assert [c.name for c in t.columns] == [c.name for c in REG.tables()[0].columns]
    assert t.columns[1].unit == "deg" and t.columns[1].ucd == "pos.eq.ra;meta.main"
    t = translate("SELECT s.*, x.id FROM demo.survey s JOIN demo.xmatch x ON s.id = x.id", REG)
    assert [c.name for c in t.columns][-2:] == ["Mixed_Case", "id_2"]
    out = run(t, data)
    assert len(out) == len(data["xmatch"])


def test_joins(data):
    s, x = data["survey"], data["xmatch"]
    inner = query("SELECT s.id FROM demo.survey AS s INNER JOIN demo.xmatch AS x ON s.id = x.id", data)
    assert len(inner) == len(s.merge(x, on="id"))
    left = query(
        "SELECT s.id, x.id AS xid FROM demo.survey s LEFT OUTER JOIN demo.xmatch x ON s.id = x.id "
        "AND x.flags = 1",
        data,
    )
    assert len(left) == len(s)
    right = query("SELECT x.id FROM demo.survey s RIGHT JOIN demo.xmatch x ON s.id = x.id + 3000", data)
    assert len(right) == len(x)
    full = query(
        "SELECT s.id, x.id FROM demo.survey s FULL OUTER JOIN demo.xmatch x ON s.id = x.id + 3000", data
    )
    assert len(full) == len(s) + len(x) - 500
    cross = query(
        "SELECT COUNT(*) AS n FROM demo.survey s CROSS JOIN demo.xmatch x WHERE s.id < 3 AND x.id < 4", data
    )
    assert cross["n"][0] == 12
    comma = query("SELECT COUNT(*) AS n FROM demo.survey s, demo.xmatch x WHERE s.id = x.id", data)
    assert comma["n"][0] == len(x)
    using = query("SELECT id, s.gmag, x.gmag AS xg FROM demo.survey s JOIN demo.xmatch x USING (id)", data)
    assert len(using) == len(x) and list(using.columns) == ["id", "gmag", "xg"]
    natural = query("SELECT * FROM demo.survey NATURAL JOIN demo.xmatch", data)
    assert len(natural) == 0  # positions and magnitudes differ, so no row matches on every column
    t = translate("SELECT * FROM demo.survey NATURAL JOIN demo.xmatch", REG)
    assert "_healpix_29" not in t.sql and "USING" in t.sql
    nested = query(
        "SELECT COUNT(*) AS n FROM (demo.survey AS a JOIN demo.xmatch AS b ON a.id = b.id) "
        "JOIN demo.survey AS c ON c.id = b.id",
        data,
    )
    assert nested["n"][0] == len(x)


def test_subqueries_in_exists_scalar(data):
    s = data["survey"]
    out = query("SELECT id FROM demo.survey WHERE id IN (SELECT id FROM demo.xmatch WHERE flags = 3)", data)
    assert set(out["id"]) == set(data["xmatch"].query("flags == 3")["id"])
    out = query(
        "SELECT s.id FROM demo.survey s WHERE EXISTS (SELECT 1 FROM demo.xmatch x WHERE x.id = s.id "
        "AND x.flags = 3)",
        data,
    )
    assert set(out["id"]) == set(data["xmatch"].query("flags == 3")["id"])
    out = query("SELECT id FROM demo.survey WHERE gmag > (SELECT AVG(gmag) FROM demo.survey)", data)
    assert len(out) == (s["gmag"] > s["gmag"].mean()).sum()
    out = query(
        "SELECT sub.f, sub.n FROM (SELECT flags AS f, COUNT(*) AS n FROM demo.survey GROUP BY flags) AS sub "
        "WHERE sub.n > 0 ORDER BY sub.f",
        data,
    )
    assert len(out) == s["flags"].nunique()
    out = query("SELECT * FROM (SELECT id, gmag + 1 FROM demo.survey) AS q WHERE id NOT IN (1, 2, 3)", data)
    assert list(out.columns) == ["id", "col2"] and len(out) == len(s) - 3


def test_set_operations_and_with(data):
    out = query("SELECT id FROM demo.survey WHERE id < 5 UNION SELECT id FROM demo.xmatch WHERE id < 7", data)
    assert sorted(out["id"]) == list(range(7))
    out = query(
        "SELECT id FROM demo.survey WHERE id < 5 UNION ALL SELECT id FROM demo.xmatch WHERE id < 7", data
    )
    assert len(out) == 12
    out = query(
        "SELECT id FROM demo.survey WHERE id < 5 INTERSECT SELECT id FROM demo.xmatch WHERE id > 2", data
    )
    assert sorted(out["id"]) == [3, 4]
    out = query(
        "SELECT id FROM demo.survey WHERE id < 5 EXCEPT SELECT id FROM demo.xmatch WHERE id > 2 ORDER BY 1",
        data,
    )
    assert out["id"].tolist() == [0, 1, 2]
    out = query(
        "(SELECT TOP 2 id FROM demo.survey ORDER BY id) UNION ALL (SELECT TOP 1 id FROM demo.xmatch "
        "ORDER BY id DESC) ORDER BY id",
        data,
    )
    assert out["id"].tolist() == [0, 1, 1999]
    out = query(
        "WITH bright AS (SELECT id, gmag FROM demo.survey WHERE gmag < 15), n(k) AS (SELECT "
        "COUNT(*) FROM bright) "
        "SELECT b.id, n.k FROM bright AS b, n ORDER BY b.id",
        data,
    )
    assert len(out) == (data["survey"]["gmag"] < 15).sum()


def test_case_cast_like_literals(data):
    out = query(
        "SELECT TOP 1 CASE WHEN id = 0 THEN 'zero' ELSE 'other' END AS c1, CASE flags WHEN -1 THEN "
        "1 ELSE 2 END AS c2, "
        "CAST(2.7 AS INTEGER) AS i, CAST(3 AS SMALLINT) AS si, CAST(3 AS BIGINT) AS bi, CAST(1.5 AS "
        "REAL) AS r, "
        "CAST(1 AS DOUBLE PRECISION) AS d, CAST(12 AS CHAR(2)) AS ch, CAST(id AS VARCHAR(10)) AS vc, "
        "CAST('2020-01-02T03:04:05' AS TIMESTAMP) AS ts, 0x1F AS hx, 0XfF AS hx2, TRUE AS t, 1.5E2 "
        "AS e, .5 AS half, "
        "'it''s' AS q FROM demo.survey ORDER BY id",
        data,
    )
    row = out.iloc[0]
    assert row["c1"] == "zero" and row["c2"] == 2 and row["i"] == 3 and row["si"] == 3 and row["bi"] == 3
    assert row["r"] == 1.5 and row["d"] == 1.0 and row["ch"] == "12" and row["vc"] == "0"
    assert row["ts"] == pd.Timestamp("2020-01-02 03:04:05") and row["hx"] == 31 and row["hx2"] == 255
    assert bool(row["t"]) and row["e"] == 150.0 and row["half"] == 0.5 and row["q"] == "it's"
    s = data["survey"]
    assert len(query("SELECT id FROM demo.survey WHERE name LIKE 'OBJ001%'", data)) == 100
    assert len(query("SELECT id FROM demo.survey WHERE name ILIKE 'obj001%'", data)) == 100
    assert len(query("SELECT id FROM demo.survey WHERE name LIKE 'obj001%'", data)) == 0
    assert len(query("SELECT id FROM demo.survey WHERE name NOT LIKE 'OBJ00%'", data)) == len(s) - 1000
    assert (
        len(query("SELECT id FROM demo.survey WHERE id BETWEEN 10 AND 19 AND name IS NOT NULL", data)) == 10
    )
    assert (
        len(query("SELECT id FROM demo.survey WHERE id NOT BETWEEN 10 AND 19 OR id IS NULL", data))
        == len(s) - 10
    )


def test_math_and_string_functions(data):
    out = query(
        "SELECT TOP 1 ABS(-2.5) AS a, CEILING(2.1) AS ce, FLOOR(-2.1) AS fl, ROUND(2.567, 2) AS r2, "
        "ROUND(1234.5, -2) "
        "AS rn, ROUND(2.5) AS r0, TRUNCATE(2.567, 2) AS t2, TRUNCATE(-2.567) AS t0, MOD(-7.5, 2) AS "
        "m1, MOD(7, 3) AS m2, "
        "POWER(2, 10) AS p, SQRT(16) AS sq, EXP(0) AS ex, LOG(EXP(2)) AS ln, LOG10(1000) AS lg, PI() AS pi, "
        "SIN(0) AS s, COS(0) AS c, TAN(0) AS t, ASIN(1) AS asn, ACOS(1) AS acs, ATAN(1) AS at, "
        "ATAN2(1, 1) AS at2, "
        "COT(PI() / 4) AS ct, DEGREES(PI()) AS dg, RADIANS(180) AS rd, LOWER('AbC') AS lo, "
        "UPPER('AbC') AS up, "
        "COALESCE(NULL, 3) AS co, 7 / 2 AS idiv, -7 / 2 AS ndiv, 7.0 / 2 AS fdiv, 5 & 3 AS band, 5 "
        "| 3 AS bor, "
        "5 ^ 3 AS bxor, ~5 AS bnot, 'a' || 'b' AS cat, RAND() AS rnd, RAND(7) AS rnd2 FROM demo.survey",
        data,
    )
    r = out.iloc[0]
    expect = {
        "a": 2.5,
        "ce": 3,
        "fl": -3,
        "r2": 2.57,
        "rn": 1200,
        "r0": 3,
        "t2": 2.56,
        "t0": -2,
        "m1": -1.5,
        "m2": 1,
        "p": 1024,
        "sq": 4,
        "ex": 1,
        "ln": 2,
        "lg": 3,
        "pi": math.pi,
        "s": 0,
        "c": 1,
        "t": 0,
        "asn": math.pi / 2,
        "acs": 0,
        "at": math.pi / 4,
        "at2": math.pi / 4,
        "ct": 1,
        "dg": 180,
        "rd": math.pi,
        "co": 3,
        "idiv": 3,
        "ndiv": -3,
        "fdiv": 3.5,
        "band": 1,
        "bor": 7,
        "bxor": 6,
        "bnot": -6,
    }
    for k, v in expect.items():
        assert r[k] == pytest.approx(v, abs=1e-9), k
    assert (
        r["lo"] == "abc"
        and r["up"] == "ABC"
        and r["cat"] == "ab"
        and 0 <= r["rnd"] < 1
        and 0 <= r["rnd2"] < 1
    )
    # the same functions on columns (so DuckDB evaluates them, not the constant folder)
    out = query(
        "SELECT id, SIN(RADIANS(ra)) AS s, LOG(ABS(pmra) + 1) AS l, TRUNCATE(pmra, 1) AS t, "
        "ROUND(pmra, 1) AS r, "
        "MOD(flags, 3) AS m, flags & 5 AS b, flags ^ 3 AS x, flags / 4 AS q, LOWER(name) AS lo, "
        "COALESCE(name, 'none') AS co, ABS(pmra) AS ab FROM demo.survey ORDER BY id",
        data,
    )
    s = data["survey"]
    np.testing.assert_allclose(out["s"], np.sin(np.radians(s["ra"])), atol=1e-12)
    np.testing.assert_allclose(out["l"], np.log(np.abs(s["pmra"]) + 1), atol=1e-12)
    np.testing.assert_allclose(out["t"], np.trunc(s["pmra"] * 10) / 10, atol=1e-12)
    np.testing.assert_allclose(out["r"], np.round(s["pmra"], 1), atol=1e-12)
    assert (out["m"] == s["flags"] % 3).all() and (out["b"] == (s["flags"] & 5)).all()
    assert (out["x"] == (s["flags"] ^ 3)).all() and (out["q"] == s["flags"] // 4).all()
    assert (out["lo"] == s["name"].str.lower()).all()
    t = translate("SELECT ABS(pmra) AS ab, gmag FROM demo.survey", REG)
    assert t.columns[0].unit == "mas/yr" and t.columns[1].description == "g magnitude"


def test_in_unit(data):
    out = query(
        "SELECT id, IN_UNIT(pmra, 'deg/yr') AS p, IN_UNIT(ra, 'arcsec') AS a FROM demo.survey ORDER BY id",
        data,
    )
    np.testing.assert_allclose(out["p"], data["survey"]["pmra"] / 3.6e6, rtol=1e-12)
    np.testing.assert_allclose(out["a"], data["survey"]["ra"] * 3600, rtol=1e-12)
    t = translate("SELECT IN_UNIT(pmra, 'mas/d') FROM demo.survey", REG)
    assert t.columns[0].unit == "mas/d" and t.columns[0].datatype == "float64"
    for bad in (
        "SELECT IN_UNIT(gmag, 'm') FROM demo.survey",
        "SELECT IN_UNIT(flags, 'deg') FROM demo.survey",
        "SELECT IN_UNIT(ra, 'furlong^^') FROM demo.survey",
        "SELECT IN_UNIT(ra, name) FROM demo.survey",
    ):
        with pytest.raises(AdqlError):
            translate(bad, REG)


def test_maxrec_limit():
    assert translate("SELECT TOP 5 id FROM demo.survey", REG, maxrec=100).sql.endswith("LIMIT 5")
    assert translate("SELECT TOP 500 id FROM demo.survey", REG, maxrec=100).sql.endswith("LIMIT 101")
    t = translate("SELECT id FROM demo.survey", REG, maxrec=10)
    assert t.sql.endswith("LIMIT 11") and t.maxrec == 10
    assert "LIMIT" not in translate("SELECT id FROM demo.survey", REG).sql
    assert translate(
        "SELECT id FROM demo.survey UNION SELECT id FROM demo.xmatch", REG, maxrec=0
    ).sql.endswith("LIMIT 1")


# ---------------------------------------------------------------------------- geometry


def _ids(adql: str, df: pd.DataFrame) -> set[int]:
    out = query(adql, {"survey": df, "xmatch": df})
    return set(out["id"].tolist())


def _cone_data(ra0: float, dec0: float, r: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ra1, dec1 = uniform_sky(1500, rng)
    ra2, dec2 = around(ra0, dec0, min(180.0, 1.6 * r), 2500, rng)
    return catalog(np.concatenate([ra1, ra2]), np.concatenate([dec1, dec2]))


CONES = [
    (0.05, 0.0, 1.0),
    (359.9, 10.0, 2.0),
    (0.0, 90.0, 5.0),
    (123.0, -90.0, 5.0),
    (200.0, 45.0, 1 / 3600),
    (300.0, -30.0, 30.0),
    (45.0, 89.0, 3.0),
    (180.0, -88.5, 2.0),
]


@pytest.mark.parametrize(("ra0", "dec0", "r"), CONES)
def test_cone_matches_astropy(ra0, dec0, r):
    df = _cone_data(ra0, dec0, r, seed=int(ra0 * 10 + dec0 + 1000))
    sep = (
        SkyCoord(df["ra"].to_numpy() * u.deg, df["dec"].to_numpy() * u.deg)
        .separation(SkyCoord(ra0 * u.deg, dec0 * u.deg))
        .deg
    )
    clear = np.abs(sep - r) > 1e-9 * max(r, 1e-3)
    want = set(df["id"][(sep <= r) & clear])
    margin = set(df["id"][~clear])
    forms = [
        f"SELECT id FROM demo.survey WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', "
        f"{ra0}, {dec0}, {r}))",
        f"SELECT id FROM demo.survey AS t WHERE CONTAINS(POINT(t.ra, t.dec), CIRCLE(POINT({ra0}, "
        f"{dec0}), {r})) = 1",
        f"SELECT id FROM demo.survey WHERE DISTANCE(POINT(ra, dec), POINT({ra0}, {dec0})) <= {r}",
        f"SELECT id FROM demo.survey WHERE DISTANCE(ra, dec, {ra0}, {dec0}) <= {r}",
        f"SELECT id FROM demo.survey WHERE INTERSECTS(CIRCLE('', {ra0}, {dec0}, {r}), "
        f"POINT('J2000', ra, dec)) = 1",
    ]
    for adql in forms:
        got = _ids(adql, df) - margin
        assert got == want, adql
        t = translate(adql, REG)
        assert t.table_refs[0].regions == [Circle(ra0, dec0, r)], adql
    not_in = _ids(
        f"SELECT id FROM demo.survey WHERE 0 = CONTAINS(POINT(ra, dec), CIRCLE({ra0}, {dec0}, {r}))", df
    )
    assert not_in - margin == set(df["id"]) - want - margin


def _offset_xyz(df: pd.DataFrame, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cartesian coordinates in astropy's offset frame centred on (ra0, dec0): x towards the centre, y east,
    z north. An independent route to the local frame used by BOX and by the polygon check."""
    c = SkyCoord(df["ra"].to_numpy() * u.deg, df["dec"].to_numpy() * u.deg)
    off = c.transform_to(SkyOffsetFrame(origin=SkyCoord(ra0 * u.deg, dec0 * u.deg)))
    car = off.cartesian
    return car.x.value, car.y.value, car.z.value


def _poly_truth(df: pd.DataFrame, verts: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Even-odd ray casting in the gnomonic projection (great circles are straight lines there)."""
    vc = SkyCoord([v[0] for v in verts] * u.deg, [v[1] for v in verts] * u.deg).cartesian
    mean = np.array([vc.x.value.sum(), vc.y.value.sum(), vc.z.value.sum()])
    ra0 = math.degrees(math.atan2(mean[1], mean[0])) % 360
    dec0 = math.degrees(math.atan2(mean[2], math.hypot(mean[0], mean[1])))
    x, y, z = _offset_xyz(df, ra0, dec0)
    vdf = pd.DataFrame({"ra": [v[0] for v in verts], "dec": [v[1] for v in verts]})
    vx, vy, vz = _offset_xyz(vdf, ra0, dec0)
    px, py = y / np.where(x > 0, x, np.nan), z / np.where(x > 0, x, np.nan)
    qx, qy = vy / vx, vz / vx
    inside = np.zeros(len(df), dtype=bool)
    dmin = np.full(len(df), np.inf)
    n = len(verts)
    for i in range(n):
        x1, y1, x2, y2 = qx[i], qy[i], qx[(i + 1) % n], qy[(i + 1) % n]
        cond = (y1 > py) != (y2 > py)
        with np.errstate(invalid="ignore", divide="ignore"):
            xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (px < xint)
        # distance to the edge in the projected plane, to skip points on the boundary
        t = np.clip(((px - x1) * (x2 - x1) + (py - y1) * (y2 - y1)) / ((x2 - x1) ** 2 + (y2 - y1) ** 2), 0, 1)
        dmin = np.minimum(dmin, np.hypot(px - (x1 + t * (x2 - x1)), py - (y1 + t * (y2 - y1))))
    inside &= x > 0
    return inside, np.nan_to_num(dmin, nan=np.inf) > 1e-9


POLYGONS = {
    "convex across ra=0": [(355, -5), (5, -5), (5, 5), (355, 5)],
    "non-convex arrow": [(10, 0), (20, 0), (20, 10), (15, 2), (10, 10)],
    "star": [
        (
            100 + (8 if k % 2 == 0 else 3) * math.cos(math.radians(36 * k)) / math.cos(math.radians(40)),
            -40 + (8 if k % 2 == 0 else 3) * math.sin(math.radians(36 * k)),
        )
        for k in range(10)
    ],
    "north pole cap": [(0, 80), (90, 80), (180, 80), (270, 80)],
    "clockwise L across ra=0": [(358, 0), (358, 10), (0, 10), (0, 2), (6, 2), (6, 0)][::-1],
    "south thin sliver": [(10, -60), (50, -61), (30, -60.5)],
}


@pytest.mark.parametrize("name", list(POLYGONS))
def test_polygon_matches_bruteforce(name):
    verts = POLYGONS[name]
    rng = np.random.default_rng(len(name))
    vc = SkyCoord([v[0] for v in verts] * u.deg, [v[1] for v in verts] * u.deg)
    cen = SkyCoord(vc.cartesian.mean(), representation_type="cartesian").spherical
    ra1, dec1 = around(cen.lon.deg, cen.lat.deg, 25.0, 4000, rng)
    ra2, dec2 = uniform_sky(1000, rng)
    df = catalog(np.concatenate([ra1, ra2]), np.concatenate([dec1, dec2]))
    inside, clear = _poly_truth(df, verts)
    want = set(df["id"][inside & clear])
    flat = ", ".join(f"{a!r}, {b!r}" for a, b in verts)
    pts = ", ".join(f"POINT({a!r}, {b!r})" for a, b in verts)
    for adql in (
        f"SELECT id FROM demo.survey WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), POLYGON('ICRS', {flat}))",
        f"SELECT id FROM demo.survey WHERE CONTAINS(POINT(ra, dec), POLYGON({pts})) = 1",
        f"SELECT id FROM demo.survey WHERE 1 = INTERSECTS(POINT(ra, dec), POLYGON({flat}))",
    ):
        got = _ids(adql, df) - set(df["id"][~clear])
        assert got == want, (name, len(got ^ want))
        assert want, name
        t = translate(adql, REG)
        assert t.table_refs[0].regions == [Polygon(tuple((float(a), float(b)) for a, b in verts))]


BOXES = [
    (0.0, 0.0, 10.0, 5.0),
    (180.0, 60.0, 20.0, 10.0),
    (45.0, 89.0, 10.0, 10.0),
    (300.0, -20.0, 1 / 60, 1 / 60),
    (359.0, -45.0, 40.0, 60.0),
]


@pytest.mark.parametrize(("ra0", "dec0", "w", "h"), BOXES)
def test_box_matches_definition(ra0, dec0, w, h):
    rng = np.random.default_rng(int(w * 100))
    ra1, dec1 = around(ra0, dec0, 1.2 * math.hypot(w, h) / 2 + 1e-3, 4000, rng)
    df = catalog(ra1, dec1)
    x, y, z = _offset_xyz(df, ra0, dec0)
    lon, lat = np.degrees(np.arctan2(y, x)), np.degrees(np.arctan2(z, x))
    inside = (np.abs(lon) <= w / 2) & (np.abs(lat) <= h / 2) & (x > 0)
    clear = (np.abs(np.abs(lon) - w / 2) > 1e-9) & (np.abs(np.abs(lat) - h / 2) > 1e-9)
    want = set(df["id"][inside & clear])
    adql = (
        "SELECT id FROM demo.survey WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), BOX('ICRS', "
        f"{ra0}, {dec0}, {w}, {h}))"
    )
    assert _ids(adql, df) - set(df["id"][~clear]) == want
    assert want
    t = translate(adql, REG)
    (region,) = t.table_refs[0].regions
    assert isinstance(region, Polygon) and len(region.vertices) == 4


def test_geometry_functions_values():
    df = catalog(np.array([10.0, 350.0]), np.array([20.0, -5.0]))
    out = query(
        "SELECT id, COORD1(POINT(ra, dec)) AS c1, COORD2(POINT(ra, dec)) AS c2, COORDSYS(POINT(ra, "
        "dec)) AS cs, "
        "DISTANCE(POINT(ra, dec), POINT(0, 0)) AS d, AREA(CIRCLE(0, 0, 1)) AS a1, AREA(CIRCLE(ra, "
        "dec, 1)) AS a2, "
        "AREA(POLYGON(0, 0, 10, 0, 10, 10, 0, 10)) AS a3, AREA(BOX(0, 0, 2, 2)) AS a4, "
        "AREA(POINT(1, 2)) AS a5, "
        "COORD1(CENTROID(CIRCLE(5, 6, 1))) AS cc1, COORD2(CENTROID(POLYGON(0, 0, 10, 0, 10, 10, 0, "
        "10))) AS pc2, "
        "CONTAINS(POINT(ra, dec), CIRCLE(10, 20, 0.1)) AS inside, INTERSECTS(CIRCLE(ra, dec, 1), "
        "CIRCLE(11, 20, 0.5))"
        " AS ov, CONTAINS(CIRCLE(10, 20, 1), CIRCLE(10, 20, 2)) AS cic, "
        "CONTAINS(POLYGON(9, 19, 11, 19, 10, 21), CIRCLE(10, 20, 3)) AS pic, "
        "INTERSECTS(POLYGON(0, 0, 10, 0, 5, 5), POLYGON(5, 1, 15, 1, 10, 6)) AS pp, "
        "CONTAINS(POLYGON(1, 1, 2, 1, 1.5, 2), BOX(1.5, 1.5, 4, 4)) AS pib, "
        "INTERSECTS(CIRCLE(ra, dec, 2), POLYGON(11, 19, 13, 19, 12, 21)) AS cp, "
        "CONTAINS(CIRCLE(ra, dec, 0.5), POLYGON(9, 19, 11, 19, 10, 21)) AS cinp, "
        "CONTAINS(POLYGON(9.9, 19.9, 10.1, 19.9, 10, 20.1), CIRCLE(ra, dec, 1)) AS pinc "
        "FROM demo.survey ORDER BY id",
        {"survey": df},
    )
    r0, r1 = out.iloc[0], out.iloc[1]
    sep = SkyCoord(10 * u.deg, 20 * u.deg).separation(SkyCoord(0 * u.deg, 0 * u.deg)).deg
    assert (
        r0["c1"] == 10 and r0["c2"] == 20 and r0["cs"] == "ICRS" and r0["d"] == pytest.approx(sep, abs=1e-12)
    )
    cap = 2 * math.pi * (1 - math.cos(math.radians(1))) * (180 / math.pi) ** 2
    assert r0["a1"] == pytest.approx(cap) and r0["a2"] == pytest.approx(cap)
    assert r0["a3"] == pytest.approx(
        99.7387368584, rel=1e-9
    )  # Girard: sum of angles - 2 pi and r0["a4"] == pytest.approx(4.0, rel=1e-3) and r0["a5"] == 0
    assert r0["cc1"] == 5 and 5.0 < r0["pc2"] < 5.1
    assert (r0["inside"], r1["inside"], r0["ov"], r1["ov"]) == (1, 0, 1, 0)
    assert r0["cic"] == 1 and r0["pic"] == 1 and r0["pp"] == 1 and r0["pib"] == 1
    assert (r0["cp"], r1["cp"], r0["cinp"], r0["pinc"], r1["pinc"]) == (1, 0, 0, 1, 0)


def test_healpix_index(data):
    s = data["survey"]
    for order in (0, 7, 18):
        out = query(
            f"SELECT id, ivo_healpix_index({order}, ra, dec) AS h, "
            f"ivo_healpix_index({order}, POINT(ra + 0, dec)) AS h2 FROM demo.survey ORDER BY id",
            data,
        )
        want = healpix29(s["ra"].to_numpy(), s["dec"].to_numpy()) >> (2 * (29 - order))
        assert (out["h"].to_numpy() == want).all()
        assert (out["h2"].to_numpy() == want).all()  # the general SQL formula, not the stored index
    t = translate("SELECT ivo_healpix_index(10, ra, dec) FROM demo.survey", REG)
    assert "_healpix_29" in t.sql and t.columns[0].datatype == "int64"
    with pytest.raises(AdqlError):
        translate("SELECT ivo_healpix_index(30, ra, dec) FROM demo.survey", REG)


def test_coordinate_systems_and_geometry_errors():
    for bad, cls in [
        (
            "SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT('GALACTIC', ra, dec), CIRCLE(0, 0, 1))",
            AdqlUnsupported,
        ),
        ("SELECT POINT(ra, dec) FROM demo.survey", AdqlUnsupported),
        (
            "SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra, dec), POLYGON(ra, dec, 1, 1, 2, 0))",
            AdqlUnsupported,
        ),
        (
            "SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra, dec), POLYGON(0, 0, 10, 10, 10, "
            "0, 0, 10))",
            AdqlError,
        ),
        (
            "SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra, dec), POLYGON(0, 0, 120, 0, 240, 0))",
            AdqlError,
        ),
        ("SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra, dec), BOX(0, 0, 200, 1))", AdqlError),
        ("SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra, dec), CIRCLE(0, 0, 181))", AdqlUnsupported),
        ("SELECT id FROM demo.survey WHERE 1=CONTAINS(ra, CIRCLE(0, 0, 1))", AdqlError),
        ("SELECT REGION('Circle ICRS 1 2 3') FROM demo.survey", AdqlUnsupported),
    ]:
        with pytest.raises(cls):
            translate(bad, REG)
    t = translate(
        "SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT('icrs geocenter', ra, dec), CIRCLE(0, 0, 1))", REG
    )
    assert t.table_refs[0].regions


def test_regions_only_where_they_restrict():
    t = translate(
        "SELECT * FROM demo.survey a LEFT JOIN demo.xmatch b ON a.id = b.id AND "
        "1=CONTAINS(POINT(a.ra, a.dec), "
        "CIRCLE(1, 2, 3)) AND 1=CONTAINS(POINT(b.ra, b.dec), CIRCLE(4, 5, 6))",
        REG,
    )
    assert t.table_refs[0].regions == [] and t.table_refs[1].regions == [Circle(4, 5, 6)]
    t = translate(
        "SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra, dec), CIRCLE(1, 2, 3)) OR id = 1", REG
    )
    assert t.table_refs[0].regions == []
    t = translate("SELECT id FROM demo.survey WHERE 1=CONTAINS(POINT(ra+1, dec), CIRCLE(1, 2, 3))", REG)
    assert t.table_refs[0].regions == []
    t = translate(
        "SELECT id FROM demo.survey WHERE id IN (SELECT id FROM demo.xmatch AS x WHERE "
        "1 = CONTAINS(POINT(x.ra, x.dec), CIRCLE(1, 2, 3)))",
        REG,
    )
    assert t.table_refs[0].regions == [] and t.table_refs[1].regions == [Circle(1, 2, 3)]


# ---------------------------------------------------------------------------- cross-matches

XMATCH_FORMS = [
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a JOIN demo.xmatch AS b "
    "ON DISTANCE(POINT(a.ra, a.dec), POINT(b.ra, b.dec)) <= {r}",
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a, demo.xmatch AS b "
    "WHERE 1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS', b.ra, b.dec, {r}))",
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a INNER JOIN demo.xmatch AS b "
    "ON CONTAINS(POINT(b.ra, b.dec), CIRCLE(POINT(a.ra, a.dec), {r})) = 1",
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a JOIN demo.xmatch AS b "
    "ON DISTANCE(a.ra, a.dec, b.ra, b.dec) <= {r} AND a.id >= 0",
    # outer joins: only the non-preserved side may be expanded through the neighbour table
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a LEFT JOIN demo.xmatch AS b "
    "ON DISTANCE(POINT(a.ra, a.dec), POINT(b.ra, b.dec)) <= {r}",
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a RIGHT OUTER JOIN demo.xmatch AS b "
    "ON DISTANCE(POINT(a.ra, a.dec), POINT(b.ra, b.dec)) <= {r}",
    "SELECT a.id AS ia, b.id AS ib FROM demo.survey AS a FULL OUTER JOIN demo.xmatch AS b "
    "ON DISTANCE(POINT(a.ra, a.dec), POINT(b.ra, b.dec)) <= {r}",
]


def _xmatch_check(out, want: set, edge: set, n_a: int, n_b: int, form: int) -> None:
    """The pairs must be `want` (ties on the circle aside); an outer join must also keep each unmatched
    row of its preserved side(s) exactly once (a neighbour join that expanded a preserved side would
    repeat them)."""
    ia, ib = out["ia"].to_numpy(), out["ib"].to_numpy()
    both = ~(pd.isna(ia) | pd.isna(ib))
    got = {(int(i), int(j)) for i, j in zip(ia[both], ib[both], strict=True)}
    assert len(got) == both.sum(), "a pair came out twice"
    assert got - edge == want - edge
    got_all = got | want
    if "LEFT" in XMATCH_FORMS[form] or "FULL" in XMATCH_FORMS[form]:
        unmatched = set(range(n_a)) - {i for i, _ in got_all}
        lonely = ia[pd.isna(ib)]
        assert sorted(int(i) for i in lonely) == sorted(unmatched - {i for i, _ in edge})
    if "RIGHT" in XMATCH_FORMS[form] or "FULL" in XMATCH_FORMS[form]:
        unmatched = set(range(n_b)) - {j for _, j in got_all}
        lonely = ib[pd.isna(ia)]
        assert sorted(int(j) for j in lonely) == sorted(unmatched - {j for _, j in edge})
    if not any(k in XMATCH_FORMS[form] for k in ("LEFT", "RIGHT", "FULL")):
        assert both.all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    ra0=st.floats(0, 360),
    dec0=st.floats(-90, 90),
    radius=st.one_of(st.floats(1 / 3600, 2.0), st.floats(2.0, 40.0)),
    spread=st.floats(0.001, 20.0),
    form=st.integers(0, len(XMATCH_FORMS) - 1),
)
def test_crossmatch_agrees_with_search_around_sky(seed, ra0, dec0, radius, spread, form):
    """Every join form, planned as a HEALPix-neighbour equi-join (radii up to ~26 deg) and as the
    declination-band join, returns exactly astropy's pairs."""
    rng = np.random.default_rng(seed)
    ra1, dec1 = around(ra0, dec0, spread, 120, rng)
    ra2, dec2 = around(ra0, dec0, spread, 150, rng)
    a, b = catalog(ra1, dec1), catalog(ra2, dec2)
    ca = SkyCoord(a["ra"].to_numpy() * u.deg, a["dec"].to_numpy() * u.deg)
    cb = SkyCoord(b["ra"].to_numpy() * u.deg, b["dec"].to_numpy() * u.deg)
    ia, ib, _, _ = search_around_sky(ca, cb, radius * u.deg)
    want = {(int(i), int(j)) for i, j in zip(ia, ib, strict=True)}
    all_sep = ca[:, None].separation(cb[None, :]).deg
    edge = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.abs(all_sep - radius) <= 1e-9), strict=True)}
    for neighbours in (True, False):
        t = translate(XMATCH_FORMS[form].format(r=repr(radius)), REG, neighbour_joins=neighbours)
        assert len(t.crossmatches) == 1 and t.crossmatches[0].radius_deg == pytest.approx(radius)
        cm = t.crossmatches[0]
        keyed = neighbours and neighbour_order(radius) is not None and "FULL" not in XMATCH_FORMS[form]
        assert (cm.key is not None) == keyed
        if "LEFT" in XMATCH_FORMS[form]:
            assert cm.expandable in ((), ("__dac_t1",))
        if "RIGHT" in XMATCH_FORMS[form]:
            assert cm.expandable in ((), ("__dac_t0",))
        out = run(t, {"survey": a, "xmatch": b})
        _xmatch_check(out, want, edge, len(a), len(b), form)


def test_neighbour_order_bounds_the_neighbourhood():
    """Points within the radius of a point lie in its cell's neighbourhood at neighbour_order(radius),
    including around the base-pixel corners (7 neighbours) and the poles."""
    from cdshealpix import nested

    rng = np.random.default_rng(5)
    corners = [(45.0, 41.81), (0.0, 0.0), (90.0, -41.81), (135.0, 0.0), (10.0, 89.99), (200.0, -89.99)]
    for radius in (1 / 3600, 30 / 3600, 0.3, 4.0, 20.0):
        order = neighbour_order(radius)
        assert order is not None
        shift = 2 * (29 - order)
        for ra0, dec0 in [*corners, (float(rng.uniform(0, 360)), float(rng.uniform(-90, 90)))]:
            ra1, dec1 = around(ra0, dec0, 3 * radius, 3000, rng)
            p = SkyCoord(ra1 * u.deg, dec1 * u.deg)
            q = p.directional_offset_by(
                rng.uniform(0, 360, len(ra1)) * u.deg, rng.uniform(0, radius, len(ra1)) * u.deg
            )
            cp = healpix29(p.ra.deg, p.dec.deg) >> shift
            cq = healpix29(q.ra.deg, q.dec.deg) >> shift
            around_p = nested.neighbours(cp.astype(np.uint64), order).astype(np.int64)
            assert (around_p == cq[:, None]).any(axis=1).all(), (radius, ra0, dec0)
    assert neighbour_order(30.0) is None and neighbour_order(1e-9) == 20


@pytest.mark.parametrize("neighbours", [True, False])
@pytest.mark.parametrize("form", range(4))
def test_crossmatch_plan_is_not_cartesian(data, form, neighbours):
    t = translate(XMATCH_FORMS[form].format(r="1.0/3600"), REG, neighbour_joins=neighbours)
    assert {(c.left, c.right) for c in t.crossmatches} <= {("__dac_t0", "__dac_t1"), ("__dac_t1", "__dac_t0")}
    plan = run(t, data, explain=True)
    assert isinstance(plan, str)
    for bad in ("CROSS_PRODUCT", "NESTED_LOOP_JOIN", "BLOCKWISE_NL_JOIN"):
        assert bad not in plan, plan
    if neighbours:  # two hash joins: the expanded side with the neighbour table, then with the anchor
        assert plan.count("HASH_JOIN") >= 2 and "__dac_x0" in plan, plan
    else:
        assert "IE_JOIN" in plan or "PIECEWISE_MERGE_JOIN" in plan or "RANGE_JOIN" in plan, plan
    out = run(t, data)
    s, x = data["survey"], data["xmatch"]
    ia, _, _, _ = search_around_sky(
        SkyCoord(s["ra"].to_numpy() * u.deg, s["dec"].to_numpy() * u.deg),
        SkyCoord(x["ra"].to_numpy() * u.deg, x["dec"].to_numpy() * u.deg),
        1 * u.arcsec,
    )
    assert len(out) == len(ia) > 300


def test_left_crossmatch_keeps_unmatched(data):
    t = translate(
        "SELECT a.id, b.id AS bid FROM demo.survey AS a LEFT OUTER JOIN demo.xmatch AS b "
        "ON DISTANCE(POINT(a.ra, a.dec), POINT(b.ra, b.dec)) < 5.0/3600",
        REG,
    )
    assert len(t.crossmatches) == 1 and t.crossmatches[0].expandable == ("__dac_t1",)
    out = run(t, data)
    assert out["id"].nunique() == len(data["survey"])
    s, x = data["survey"], data["xmatch"]
    ia, _, _, _ = search_around_sky(
        SkyCoord(s["ra"].to_numpy() * u.deg, s["dec"].to_numpy() * u.deg),
        SkyCoord(x["ra"].to_numpy() * u.deg, x["dec"].to_numpy() * u.deg),
        5 * u.arcsec,
    )
    assert len(out) == len(ia) + len(s) - len(set(ia.tolist()))


def test_a_relation_takes_one_neighbour_join():
    """Two cross-matches through the same relation: the first is keyed, the second keeps the band; a
    correlated cross-match (outer table in the parent query) is not a join of this scope at all."""
    t = translate(
        "SELECT a.id FROM demo.survey AS a JOIN demo.xmatch AS b "
        "ON DISTANCE(a.ra, a.dec, b.ra, b.dec) < 0.001 "
        "JOIN demo.survey AS c ON DISTANCE(b.ra, b.dec, c.ra, c.dec) < 0.001",
        REG,
    )
    assert [cm.key for cm in t.crossmatches] == ["__dac_x0", None]
    assert "BETWEEN" in t.sql
    t = translate(
        "SELECT a.id FROM demo.survey AS a WHERE EXISTS (SELECT 1 FROM demo.xmatch AS b WHERE "
        "DISTANCE(a.ra, a.dec, b.ra, b.dec) < 0.001)",
        REG,
    )
    assert all(cm.key is None for cm in t.crossmatches) and "__dac_x" not in t.sql


# ---------------------------------------------------------------------------- errors


def test_syntax_errors_have_positions():
    with pytest.raises(AdqlSyntaxError) as err:
        translate("SELECT id\nFROM demo.survey\nWHERE id = = 3", REG)
    assert err.value.line == 3 and err.value.column is not None
    with pytest.raises(AdqlSyntaxError) as err:
        translate("SELECT id FROM demo.survey WHERE id::int > 1", REG)
    assert (err.value.line, err.value.column) == (1, 36)
    with pytest.raises(AdqlUnknownColumn) as err:
        translate("SELECT id,\n  gmagg FROM demo.survey", REG)
    assert (err.value.line, err.value.column) == (2, 3) and "gmag" in str(err.value)
    with pytest.raises(AdqlUnknownTable) as err:
        translate("SELECT id FROM demo.survy", REG)
    assert "demo.survey" in str(err.value)
    with pytest.raises(AdqlUnknownColumn, match="ambiguous"):
        translate("SELECT id FROM demo.survey, demo.xmatch", REG)
    with pytest.raises(AdqlUnknownTable):
        translate("SELECT id FROM demo.xmatch", DemoRegistry([REG.tables()[0]]))  # invisible table
    with pytest.raises(AdqlUnsupported, match="not an ADQL function"):
        translate("SELECT sinh(ra) FROM demo.survey", REG)
    with pytest.raises(AdqlError, match="aggregate"):
        translate("SELECT id FROM demo.survey WHERE COUNT(*) > 1", REG)


def test_non_ascii_strings_are_fine(data):
    out = query("SELECT TOP 1 'ñ€😀' AS s, name FROM demo.survey WHERE name <> 'Ωmega' ORDER BY id", data)
    assert out["s"][0] == "ñ€😀"


HOSTILE = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
    "SELECT * FROM 'file.parquet'",
    'SELECT * FROM "file.parquet"',
    "SELECT * FROM glob('/etc/*')",
    "SELECT glob('/etc/*') FROM demo.survey",
    "SELECT * FROM range(10)",
    "SELECT * FROM generate_series(1, 10)",
    "SELECT * FROM duckdb_settings()",
    "SELECT getenv('HOME')",
    "SELECT current_setting('threads')",
    "COPY demo.survey TO '/tmp/x.csv'",
    "COPY (SELECT 1) TO '/tmp/x.csv'",
    "ATTACH 'x.db' AS x",
    "DETACH x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA version",
    "SET memory_limit = '100GB'",
    "RESET threads",
    "SELECT 1; SELECT 2",
    "SELECT id FROM demo.survey; DROP TABLE demo.survey",
    "SELECT id FROM demo.survey -- hidden\n; COPY demo.survey TO 'x'",
    "SELECT id /* ; */ FROM demo.survey; ATTACH 'x'",
    "SELECT id FROM demo.survey /* never closed",
    "SELECT id FROM demo.survey */ ; LOAD x /*",
    "SELECT \"read_csv\"('x')",
    "SELECT * FROM \"read_csv\"('x')",
    'SELECT "x""; DROP TABLE demo.survey; --" FROM demo.survey',
    "SELECT id::varchar FROM demo.survey",
    "SELECT CAST(id AS BLOB) FROM demo.survey",
    "SELECT [1, 2, 3]",
    "SELECT {'a': 1}",
    "SELECT $1",
    "SELECT ? FROM demo.survey",
    "SELECT 2 ** 3",
    "SELECT 'a' -> 'b'",
    "SELECT E'\\x41'",
    "SELECT x'41'",
    "SELECT id FROM demo.survey LIMIT 5",
    "SELECT id FROM demo.survey QUALIFY id > 1",
    "SELECT row_number() OVER () FROM demo.survey",
    "SELECT * EXCLUDE (id) FROM demo.survey",
    "SELECT COLUMNS('.*') FROM demo.survey",
    "SELECT * FROM demo.survey USING SAMPLE 10",
    "SELECT * FROM demo.survey TABLESAMPLE (10)",
    "SELECT * FROM demo.survey a ASOF JOIN demo.xmatch b ON a.id >= b.id",
    "SELECT * FROM demo.survey a POSITIONAL JOIN demo.xmatch b",
    "SELECT * FROM demo.survey, LATERAL (SELECT 1)",
    "FROM demo.survey",
    "SELECT * FROM secret.table",
    "SELECT * FROM __dac_t0",
    'SELECT * FROM "__dac_t0"',
    "SELECT _healpix_29 FROM demo.survey",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM duckdb_tables()",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
    "CREATE TABLE x AS SELECT 1",
    "CREATE MACRO m(a) AS a",
    "INSERT INTO demo.survey VALUES (1)",
    "DELETE FROM demo.survey",
    "UPDATE demo.survey SET id = 1",
    "DROP TABLE demo.survey",
    "DESCRIBE demo.survey",
    "SHOW TABLES",
    "EXPLAIN SELECT 1",
    "CALL pragma_version()",
    "VACUUM",
    "CHECKPOINT",
    "EXPORT DATABASE 'x'",
    "SELECT struct_pack(a := 1)",
    "SELECT id FROM demo.survey WHERE name SIMILAR TO 'x'",
    "SELECT id FROM demo.survey WHERE name GLOB 'x'",
    "SELECT id FROM demo.survey WHERE name ~ 'x'",
    "SELECT id FROM demo.survey WHERE name LIKE 'x' ESCAPE '!'",
    "SELECT id FROM demo.survey a JOIN demo.xmatch b ON a.id = b.id JOIN demo.survey a ON 1 = 1",
    "SELECT ñame FROM demo.survey",
    "SELECT id FROM démo.survey",
    "SELECT DISTINCT ON (id) id FROM demo.survey",
    "SELECT id FROM demo.survey ORDER BY id LIMIT 1 OFFSET 1",
    "SELECT TOP -1 id FROM demo.survey",
    "SELECT TOP 1.5 id FROM demo.survey",
    "SELECT list_value(1, 2)",
    "SELECT id FROM demo.survey WHERE id IN (SELECT * FROM read_csv('x'))",
    "SELECT (SELECT getenv('x'))",
    "SELECT id FROM demo.survey UNION SELECT * FROM read_csv('x')",
    "SELECT id FROM demo.survey WHERE EXISTS (SELECT 1 FROM read_json('x'))",
    "WITH a AS (SELECT * FROM read_csv('x')) SELECT * FROM a",
    "SELECT MAP {'a': 1}",
    "SELECT id FROM demo.survey AS __dac_x",
    "",
    "   ;  ",
    "\x00",
]


@pytest.mark.parametrize("adql", HOSTILE)
def test_hostile_corpus_is_rejected(adql):
    with pytest.raises(AdqlError) as err:
        translate(adql, REG)
    assert str(err.value)


def test_size_limits_are_fast_and_clear():
    cases = [
        "SELECT id FROM demo.survey WHERE " + " OR ".join(["id = 1"] * 200_000),  # ~1.4 MB
        "SELECT " + "(" * 10_000 + "1" + ")" * 10_000 + " FROM demo.survey",
        "SELECT id FROM demo.survey WHERE id IN (" + ", ".join(str(i) for i in range(100_000)) + ")",
        "SELECT id FROM demo.survey WHERE " + "NOT " * 5000 + "id = 1",
        "SELECT " + " - " * 5000 + "1",
    ]
    for adql in cases:
        t0 = time.perf_counter()
        with pytest.raises(AdqlError) as err:
            translate(adql, REG)
        assert time.perf_counter() - t0 < 5
        assert isinstance(err.value, (AdqlTooComplex, AdqlSyntaxError)), err.value
    # big but reasonable queries still work
    t = translate(
        "SELECT id FROM demo.survey WHERE id IN (" + ", ".join(str(i) for i in range(2000)) + ")", REG
    )
    assert "1999" in t.sql
    t = translate("SELECT id FROM demo.survey WHERE " + " OR ".join(f"id = {i}" for i in range(1000)), REG)
    assert 'id" = 999' in t.sql


def test_generated_sql_never_contains_user_text_outside_literals():
    t = translate(
        "SELECT id AS \"a\"\"; DROP TABLE x; --\" FROM demo.survey WHERE name = 'x''); DROP TABLE y; --'", REG
    )
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE \"__dac_t0\" AS SELECT 1::BIGINT AS id, 'x' AS name")
    assert con.execute(t.sql).fetchall() == []
    assert t.columns[0].name == 'a"; DROP TABLE x; --'


def test_neighbour_table_lists_each_parent_of_each_neighbourhood_once(monkeypatch):
    """xmatch.neighbour_table against a per-cell set computation, including base-pixel corner cells
    (7 neighbours, cdshealpix's -1) and the poles, in pieces on threads as for a large anchor."""
    from cdshealpix import nested

    from dac_lake import xmatch

    monkeypatch.setattr(xmatch, "_PIECE_CELLS", 700)

    rng = np.random.default_rng(4)
    for order in (3, 9, 16):
        n = 12 * 4**order
        cells = np.unique(np.concatenate([rng.integers(0, n, 3000), [0, 4**order - 1, 5 * 4**order, n - 1]]))
        table = xmatch.neighbour_table(cells, order).to_pydict()
        got = list(zip(table["a"], table["e"], strict=True))
        around = nested.neighbours(cells.astype(np.uint64), order).astype(np.int64)
        shift = 2 * (order - xmatch.join_order(order))
        want = {
            (int(c), int(p) >> shift if p >= 0 else -1)
            for c, row in zip(cells, around, strict=True)
            for p in row
        }
        assert len(got) == len(set(got)) and set(got) == want
