"""SQL (DuckDB) expressions for spherical geometry and HEALPix, built as sqlglot trees.

Templates below are this module's own constant text, parsed once; user expressions are substituted as
subtrees (never as text), each wrapped in parentheses so operator precedence cannot change.
"""

from __future__ import annotations

import functools
import math

import sqlglot
from sqlglot import exp

from . import sphere


@functools.cache
def _parsed(template: str) -> exp.Expr:
    return sqlglot.parse_one(template, read="duckdb")


def tpl(template: str, **subs: exp.Expr) -> exp.Expr:
    """Instantiate a template: upper-case placeholder columns are replaced by the given subtrees."""
    tree = _parsed(template).copy()
    for col in list(tree.find_all(exp.Column)):
        name = col.name
        if name in subs and not col.table:
            col.replace(exp.Paren(this=subs[name].copy()))
    return tree


def num(value: float | int) -> exp.Expr:
    """A numeric literal; negative values become a parenthesised negation."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        lit = exp.Literal.number(str(abs(value)))
    else:
        if not math.isfinite(value):
            raise ValueError("non-finite constant")
        text = repr(abs(float(value)))
        if "e" not in text and "E" not in text:
            text += "e0"
        lit = exp.Literal.number(text)
    return exp.Paren(this=exp.Neg(this=lit)) if value < 0 else lit


DISTANCE = (
    "DEGREES(2 * ASIN(LEAST(1e0, SQRT(POWER(SIN(RADIANS(D2 - D1) / 2), 2)"
    " + COS(RADIANS(D1)) * COS(RADIANS(D2)) * POWER(SIN(RADIANS(R2 - R1) / 2), 2)))))"
)


def distance(ra1: exp.Expr, dec1: exp.Expr, ra2: exp.Expr, dec2: exp.Expr) -> exp.Expr:
    """Great-circle distance in degrees (haversine: accurate for the small separations that matter)."""
    return tpl(DISTANCE, R1=ra1, D1=dec1, R2=ra2, D2=dec2)


def dot_const(ra: exp.Expr, dec: exp.Expr, n: sphere.Vec) -> exp.Expr:
    """p . n for the unit vector p of (ra, dec) and a constant vector n."""
    return tpl(
        "NX * (COS(RADIANS(D)) * COS(RADIANS(R))) + NY * (COS(RADIANS(D)) * SIN(RADIANS(R)))"
        " + NZ * SIN(RADIANS(D))",
        R=ra,
        D=dec,
        NX=num(n[0]),
        NY=num(n[1]),
        NZ=num(n[2]),
    )


def in_polygon(ra: exp.Expr, dec: exp.Expr, poly: sphere.SphPolygon) -> exp.Expr:
    """Point-in-polygon: OR over convex pieces of AND over inward edge normals of p . n >= -EPS."""
    ors: list[exp.Expr] = []
    for piece in poly.pieces:
        ands = [
            exp.GTE(this=exp.Paren(this=dot_const(ra, dec, m)), expression=num(-sphere.EPS)) for m in piece
        ]
        ors.append(exp.Paren(this=exp.and_(*ands, copy=False)))
    return exp.Paren(this=exp.or_(*ors, copy=False))


def arc_distance(ra: exp.Expr, dec: exp.Expr, a: sphere.Vec, b: sphere.Vec) -> exp.Expr:
    """Distance in degrees from (ra, dec) to the minor arc a-b (constant end points)."""
    ra_a, dec_a = sphere.radec(a)
    ra_b, dec_b = sphere.radec(b)
    ends = exp.Least(
        this=distance(ra, dec, num(ra_a), num(dec_a)), expressions=[distance(ra, dec, num(ra_b), num(dec_b))]
    )
    frame = sphere.arc_frame(a, b)
    if frame is None:
        return ends
    n, u, w = frame
    return tpl(
        "CASE WHEN PU >= 0 AND PW >= 0 THEN DEGREES(ASIN(LEAST(1e0, ABS(PN)))) ELSE ENDS END",
        PU=dot_const(ra, dec, u),
        PW=dot_const(ra, dec, w),
        PN=dot_const(ra, dec, n),
        ENDS=ends,
    )


def circle_area(radius: exp.Expr) -> exp.Expr:
    return tpl("2 * PI() * (1 - COS(RADIANS(R))) * POWER(180 / PI(), 2)", R=radius)


def healpix_nested(order: int, ra: exp.Expr, dec: exp.Expr) -> exp.Expr:
    """Nested HEALPix index of (ra, dec) at `order`, with the standard ang2pix_nest algorithm.

    The polar branch uses sqrt(3 (1 - |z|)) = sqrt(6) sin(colatitude / 2), which stays accurate next to
    the poles where 1 - |z| cancels.
    """
    nside = 1 << order
    tt = tpl("(((R % 360) + 360) % 360) / 90e0", R=ra)
    z = tpl("SIN(RADIANS(D))", D=dec)
    # equatorial belt
    t1 = tpl("NS * (0.5e0 + TT)", NS=num(nside), TT=tt)
    t2 = tpl("NS * Z * 0.75e0", NS=num(nside), Z=z)
    jp_e = tpl("CAST(FLOOR(T1 - T2) AS BIGINT)", T1=t1, T2=t2)
    jm_e = tpl("CAST(FLOOR(T1 + T2) AS BIGINT)", T1=t1, T2=t2)
    face_e = tpl(
        "CASE WHEN (JP >> K) = (JM >> K) THEN (JP >> K) | 4 WHEN (JP >> K) < (JM >> K) THEN (JP >> K)"
        " ELSE (JM >> K) + 8 END",
        JP=jp_e,
        JM=jm_e,
        K=num(order),
    )
    ix_e = tpl("JM & (NS - 1)", JM=jm_e, NS=num(nside))
    iy_e = tpl("NS - (JP & (NS - 1)) - 1", JP=jp_e, NS=num(nside))
    # polar caps
    ntt = tpl("LEAST(3, CAST(FLOOR(TT) AS BIGINT))", TT=tt)
    tp = tpl("TT - NTT", TT=tt, NTT=ntt)
    tmp = tpl("NS * SQRT(6e0) * SIN(RADIANS(90 - ABS(D)) / 2)", NS=num(nside), D=dec)
    jp_p = tpl("LEAST(NS - 1, CAST(FLOOR(TP * TMP) AS BIGINT))", NS=num(nside), TP=tp, TMP=tmp)
    jm_p = tpl("LEAST(NS - 1, CAST(FLOOR((1 - TP) * TMP) AS BIGINT))", NS=num(nside), TP=tp, TMP=tmp)
    polar = tpl("ABS(Z) > 2e0 / 3", Z=z)
    north = tpl("Z >= 0", Z=z)
    face = tpl(
        "CASE WHEN POLAR THEN (CASE WHEN NORTH THEN NTT ELSE NTT + 8 END) ELSE FE END",
        POLAR=polar,
        NORTH=north,
        NTT=ntt,
        FE=face_e,
    )
    ix = tpl(
        "CASE WHEN POLAR THEN (CASE WHEN NORTH THEN NS - JM - 1 ELSE JP END) ELSE IXE END",
        POLAR=polar,
        NORTH=north,
        NS=num(nside),
        JM=jm_p,
        JP=jp_p,
        IXE=ix_e,
    )
    iy = tpl(
        "CASE WHEN POLAR THEN (CASE WHEN NORTH THEN NS - JP - 1 ELSE JM END) ELSE IYE END",
        POLAR=polar,
        NORTH=north,
        NS=num(nside),
        JM=jm_p,
        JP=jp_p,
        IYE=iy_e,
    )
    terms: list[exp.Expr] = [tpl("CAST(F AS BIGINT) * NS2", F=face, NS2=num(nside * nside))]
    for b in range(order):
        terms.append(tpl("((IX >> B) & 1) << B2", IX=ix, B=num(b), B2=num(2 * b)))
        terms.append(tpl("((IY >> B) & 1) << B2", IY=iy, B=num(b), B2=num(2 * b + 1)))
    total: exp.Expr = terms[0]
    for t in terms[1:]:
        total = exp.Add(this=total, expression=exp.Paren(this=t))
    return exp.Paren(this=total)
