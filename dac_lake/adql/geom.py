"""Geometry values during translation, and the SQL for ADQL's geometric predicates.

ADQL geometries (POINT, CIRCLE, POLYGON, BOX) are not SQL values here: the tables store positions as
ra/dec columns, so a geometry exists only while translating and is consumed by CONTAINS, INTERSECTS,
DISTANCE, AREA, COORD1/2 or CENTROID. Polygons and boxes must be constant (they are analysed once, see
sphere.py); points and circles may be built from any numeric expressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlglot import exp

from . import sphere, sqlgeo
from .errors import AdqlUnsupported
from .model import Circle, Polygon, Region
from .scope import Meta, Source

BAND_EPS = 1e-9  # degrees added to declination bands so rounding never drops a boundary row


@dataclass
class TE:
    """A translated (typed) SQL expression; `const` when it is a numeric constant; `origin` when it is a
    plain column of a registry table reference."""

    sql: exp.Expr
    meta: Meta
    const: float | None = None
    origin: tuple[Source, str] | None = None


@dataclass
class GPoint:
    ra: TE
    dec: TE

    @property
    def const(self) -> tuple[float, float] | None:
        if self.ra.const is not None and self.dec.const is not None:
            return self.ra.const, self.dec.const
        return None

    @property
    def source(self) -> Source | None:
        """The table reference whose own (ra_column, dec_column) this point is, if any."""
        if self.ra.origin is None or self.dec.origin is None:
            return None
        src_a, col_a = self.ra.origin
        src_d, col_d = self.dec.origin
        table = src_a.table
        if src_a is not src_d or table is None or src_a.ref is None:
            return None
        if table.ra_column == col_a and table.dec_column == col_d:
            return src_a
        return None


@dataclass
class GCircle:
    center: GPoint
    radius: TE

    @property
    def const(self) -> tuple[float, float, float] | None:
        c = self.center.const
        if c is None or self.radius.const is None:
            return None
        return c[0], c[1], self.radius.const


@dataclass
class GPolygon:
    poly: sphere.SphPolygon


Geom = GPoint | GCircle | GPolygon


@dataclass
class Hint:
    """What a predicate tells the planner: a region for one table ref, or a cross-match of two."""

    source: Source | None = None
    region: Region | None = None
    other: Source | None = None
    radius: float | None = None


def _lit(value: bool) -> exp.Expr:
    return exp.Boolean(this=value)


def _band(dec: exp.Expr, center_dec: exp.Expr, radius: float) -> exp.Expr:
    r = sqlgeo.num(radius + BAND_EPS)
    return exp.Between(
        this=exp.Paren(this=dec.copy()),
        low=exp.Sub(this=exp.Paren(this=center_dec.copy()), expression=r),
        high=exp.Add(this=exp.Paren(this=center_dec.copy()), expression=r.copy()),
    )


def circle_parts(p: GPoint, c: GCircle) -> tuple[exp.Expr, exp.Expr | None, Hint | None]:
    """(exact test `distance <= r`, declination band implied by it or None, planner hint or None).

    The band lets DuckDB prune row groups for cones and turn cross-matches into range joins.
    """
    pc, cc = p.const, c.const
    if pc is not None and cc is not None:
        return _lit(sphere.distance_deg(pc[0], pc[1], cc[0], cc[1]) <= cc[2] + sphere.EPS), None, None
    dist = sqlgeo.distance(p.ra.sql, p.dec.sql, c.center.ra.sql, c.center.dec.sql)
    test = exp.LTE(this=exp.Paren(this=dist), expression=exp.Paren(this=c.radius.sql.copy()))
    r = c.radius.const
    if r is None:
        return test, None, None
    src, other = p.source, c.center.source
    if cc is not None:
        hint = Hint(source=src, region=Circle(cc[0], cc[1], r)) if src is not None else None
        return test, _band(p.dec.sql, c.center.dec.sql, r), hint
    if pc is not None:
        hint = Hint(source=other, region=Circle(pc[0], pc[1], r)) if other is not None else None
        return test, _band(c.center.dec.sql, p.dec.sql, r), hint
    if src is not None and other is not None and src is not other:
        return test, _band(p.dec.sql, c.center.dec.sql, r), Hint(source=src, other=other, radius=r)
    return test, None, None


def point_in_circle(p: GPoint, c: GCircle) -> tuple[exp.Expr, Hint | None]:
    test, band, hint = circle_parts(p, c)
    return (exp.and_(band, test, copy=False) if band is not None else test), hint


def point_in_polygon(p: GPoint, g: GPolygon) -> tuple[exp.Expr, Hint | None]:
    pc = p.const
    if pc is not None:
        return _lit(g.poly.contains(*pc)), None
    test = sqlgeo.in_polygon(p.ra.sql, p.dec.sql, g.poly)
    src = p.source
    return test, (Hint(source=src, region=Polygon(g.poly.vertices)) if src is not None else None)


def _min_edge_cmp(center: GPoint, g: GPolygon, radius: exp.Expr, ge: bool) -> exp.Expr:
    parts = []
    for a, b in g.poly.edges():
        d = exp.Paren(this=sqlgeo.arc_distance(center.ra.sql, center.dec.sql, a, b))
        r = exp.Paren(this=radius.copy())
        parts.append(exp.GTE(this=d, expression=r) if ge else exp.LTE(this=d, expression=r))
    return exp.Paren(this=exp.and_(*parts, copy=False) if ge else exp.or_(*parts, copy=False))


def contains(a: Geom, b: Geom) -> tuple[exp.Expr, Hint | None]:
    """SQL for 'a is inside b (or on its boundary)'."""
    if isinstance(a, GPoint) and isinstance(b, GCircle):
        return point_in_circle(a, b)
    if isinstance(a, GPoint) and isinstance(b, GPolygon):
        return point_in_polygon(a, b)
    if isinstance(a, GPoint) and isinstance(b, GPoint):
        return point_in_circle(a, GCircle(b, TE(sqlgeo.num(0.0), Meta("float64"), 0.0)))
    if isinstance(a, GCircle) and isinstance(b, GCircle):
        ac, bc = a.const, b.const
        if ac is not None and bc is not None:
            return _lit(sphere.distance_deg(ac[0], ac[1], bc[0], bc[1]) + ac[2] <= bc[2] + sphere.EPS), None
        dist = sqlgeo.distance(a.center.ra.sql, a.center.dec.sql, b.center.ra.sql, b.center.dec.sql)
        lhs = exp.Add(this=exp.Paren(this=dist), expression=exp.Paren(this=a.radius.sql.copy()))
        return exp.LTE(this=lhs, expression=exp.Paren(this=b.radius.sql.copy())), None
    if isinstance(a, GCircle) and isinstance(b, GPolygon):
        ac = a.const
        if ac is not None:
            return _lit(sphere.circle_in_polygon(ac[0], ac[1], ac[2], b.poly)), None
        inside, _ = point_in_polygon(a.center, b)
        return exp.and_(inside, _min_edge_cmp(a.center, b, a.radius.sql, ge=True), copy=False), None
    if isinstance(a, GPolygon) and isinstance(b, GCircle):
        bc = b.const
        if bc is not None:
            return _lit(sphere.polygon_in_circle(a.poly, bc[0], bc[1], bc[2])), None
        anti = GPoint(
            TE(
                exp.Add(this=exp.Paren(this=b.center.ra.sql.copy()), expression=sqlgeo.num(180)),
                Meta("float64"),
            ),
            TE(exp.Neg(this=exp.Paren(this=b.center.dec.sql.copy())), Meta("float64")),
        )
        far = tpl_sub(180, b.radius.sql)
        outside, _ = point_in_polygon(anti, a)
        return exp.and_(exp.Not(this=exp.Paren(this=outside)), _min_edge_cmp(anti, a, far, ge=True)), None
    if isinstance(a, GPolygon) and isinstance(b, GPolygon):
        return _lit(sphere.polygon_in_polygon(a.poly, b.poly)), None
    raise AdqlUnsupported(f"CONTAINS({_kind(a)}, {_kind(b)}) is not supported")


def tpl_sub(value: float, expr: exp.Expr) -> exp.Expr:
    return exp.Sub(this=sqlgeo.num(value), expression=exp.Paren(this=expr.copy()))


def intersects(a: Geom, b: Geom) -> tuple[exp.Expr, Hint | None]:
    """SQL for 'a and b share at least one point'. A POINT argument means CONTAINS (ADQL 2.1 4.2.9)."""
    if isinstance(a, GPoint):
        return contains(a, b)
    if isinstance(b, GPoint):
        return contains(b, a)
    if isinstance(a, GCircle) and isinstance(b, GCircle):
        ac, bc = a.const, b.const
        if ac is not None and bc is not None:
            return _lit(sphere.distance_deg(ac[0], ac[1], bc[0], bc[1]) <= ac[2] + bc[2] + sphere.EPS), None
        dist = sqlgeo.distance(a.center.ra.sql, a.center.dec.sql, b.center.ra.sql, b.center.dec.sql)
        rsum = exp.Add(
            this=exp.Paren(this=a.radius.sql.copy()), expression=exp.Paren(this=b.radius.sql.copy())
        )
        return exp.LTE(this=exp.Paren(this=dist), expression=exp.Paren(this=rsum)), None
    if isinstance(a, GPolygon) and isinstance(b, GCircle):
        a, b = b, a
    if isinstance(a, GCircle) and isinstance(b, GPolygon):
        ac = a.const
        if ac is not None:
            return _lit(sphere.circle_polygon_intersect(ac[0], ac[1], ac[2], b.poly)), None
        inside, _ = point_in_polygon(a.center, b)
        return exp.or_(inside, _min_edge_cmp(a.center, b, a.radius.sql, ge=False), copy=False), None
    if isinstance(a, GPolygon) and isinstance(b, GPolygon):
        return _lit(sphere.polygons_intersect(a.poly, b.poly)), None
    raise AdqlUnsupported(f"INTERSECTS({_kind(a)}, {_kind(b)}) is not supported")  # pragma: no cover


def distance(p: GPoint, q: GPoint) -> TE:
    pc, qc = p.const, q.const
    if pc is not None and qc is not None:
        d = sphere.distance_deg(pc[0], pc[1], qc[0], qc[1])
        return TE(sqlgeo.num(d), Meta("float64", "deg"), d)
    return TE(sqlgeo.distance(p.ra.sql, p.dec.sql, q.ra.sql, q.dec.sql), Meta("float64", "deg"))


def distance_parts(p: GPoint, q: GPoint, radius: float) -> tuple[exp.Expr | None, Hint | None]:
    """For a top-level `DISTANCE(p, q) < radius`: the implied declination band and the planner hint."""
    _, band, hint = circle_parts(p, GCircle(q, TE(sqlgeo.num(radius), Meta("float64"), radius)))
    return band, hint


def area(g: Geom) -> TE:
    if isinstance(g, GPoint):
        return TE(sqlgeo.num(0.0), Meta("float64", "deg**2"), 0.0)
    if isinstance(g, GPolygon):
        v = g.poly.area_deg2()
        return TE(sqlgeo.num(v), Meta("float64", "deg**2"), v)
    if g.radius.const is not None:
        v = sphere.circle_area_deg2(g.radius.const)
        return TE(sqlgeo.num(v), Meta("float64", "deg**2"), v)
    return TE(sqlgeo.circle_area(g.radius.sql), Meta("float64", "deg**2"))


def centroid(g: Geom) -> GPoint:
    if isinstance(g, GPoint):
        return g
    if isinstance(g, GCircle):
        return g.center
    ra, dec = g.poly.centroid()
    return GPoint(
        TE(sqlgeo.num(ra), Meta("float64", "deg"), ra), TE(sqlgeo.num(dec), Meta("float64", "deg"), dec)
    )


def _kind(g: Geom) -> str:
    return {GPoint: "POINT", GCircle: "CIRCLE", GPolygon: "POLYGON"}[type(g)]


def check_radius(value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0 or value > 180):
        raise AdqlUnsupported(f"circle radius must be within [0, 180] degrees (got {value})")
