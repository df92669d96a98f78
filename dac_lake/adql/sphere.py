"""Exact spherical geometry on constants (pure Python, no numpy): polygons, boxes, areas, predicates.

Why a module of its own: constant shapes (the usual CIRCLE/POLYGON/BOX literals of a query) are analysed
once at translation time, so the generated SQL only contains cheap dot products against precomputed
normals, and shape-vs-shape predicates between constants become literals.

Conventions: angles in degrees at the interface, unit vectors inside. A polygon's edges are minor
great-circle arcs; its interior is the region that lies within the open hemisphere around the vertices'
mean direction (the smaller of the two regions the boundary delimits). Polygons are decomposed into
convex pieces (ear clipping in the gnomonic projection, which maps great circles to straight lines, so
the decomposition is exact); a point is inside a convex piece iff it is on the inner side of every edge's
great circle, i.e. `p . n >= -EPS` for each inward edge normal `n`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AdqlError, AdqlTooComplex

Vec = tuple[float, float, float]

EPS = 1e-12  # tolerance (radians, ~2e-7 arcsec) for "on the boundary" tests
MAX_POLYGON_VERTICES = 200


def vec(ra: float, dec: float) -> Vec:
    """Unit vector of (ra, dec) in degrees."""
    a, d = math.radians(ra), math.radians(dec)
    return (math.cos(d) * math.cos(a), math.cos(d) * math.sin(a), math.sin(d))


def radec(v: Vec) -> tuple[float, float]:
    """(ra in [0, 360), dec) in degrees of a (not necessarily unit) vector."""
    x, y, z = v
    ra = math.degrees(math.atan2(y, x)) % 360.0
    dec = math.degrees(math.atan2(z, math.hypot(x, y)))
    return ra, dec


def dot(a: Vec, b: Vec) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def cross(a: Vec, b: Vec) -> Vec:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def norm(a: Vec) -> float:
    return math.sqrt(dot(a, a))


def unit(a: Vec) -> Vec:
    n = norm(a)
    if n == 0.0:
        raise AdqlError("degenerate geometry (zero vector)")
    return (a[0] / n, a[1] / n, a[2] / n)


def scale(a: Vec, k: float) -> Vec:
    return (a[0] * k, a[1] * k, a[2] * k)


def add(a: Vec, b: Vec) -> Vec:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def angle(a: Vec, b: Vec) -> float:
    """Angle between unit vectors in radians (atan2 form: accurate at all separations)."""
    return math.atan2(norm(cross(a, b)), dot(a, b))


def distance_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance in degrees (haversine, like the generated SQL)."""
    d1, d2 = math.radians(dec1), math.radians(dec2)
    h = (
        math.sin((d2 - d1) / 2) ** 2
        + math.cos(d1) * math.cos(d2) * math.sin(math.radians(ra2 - ra1) / 2) ** 2
    )
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


def arc_distance(p: Vec, a: Vec, b: Vec) -> float:
    """Distance in radians from p to the minor great-circle arc a-b."""
    c = cross(a, b)
    if norm(c) < EPS:
        return min(angle(p, a), angle(p, b))
    n = unit(c)
    if dot(p, cross(n, a)) >= 0 and dot(p, cross(b, n)) >= 0:
        return math.asin(min(1.0, abs(dot(p, n))))
    return min(angle(p, a), angle(p, b))


def arc_frame(a: Vec, b: Vec) -> tuple[Vec, Vec, Vec] | None:
    """(n, u, w) for the SQL arc-distance test: the foot of p lies on the arc iff p.u >= 0 and p.w >= 0."""
    c = cross(a, b)
    if norm(c) < EPS:
        return None
    n = unit(c)
    return n, cross(n, a), cross(b, n)


def _seg_intersect_2d(p1, p2, p3, p4) -> bool:
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    d1, d2 = orient(p3, p4, p1), orient(p3, p4, p2)
    d3, d4 = orient(p1, p2, p3), orient(p1, p2, p4)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True

    def on_seg(a, b, c, d):
        return (
            abs(d) <= 1e-15
            and min(a[0], b[0]) <= c[0] <= max(a[0], b[0])
            and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])
        )

    return (
        on_seg(p3, p4, p1, d1) or on_seg(p3, p4, p2, d2) or on_seg(p1, p2, p3, d3) or on_seg(p1, p2, p4, d4)
    )


def _cross2(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _ear_clip(pts: list[tuple[float, float]]) -> list[tuple[int, int, int]]:
    """Triangulate a simple counter-clockwise planar polygon; returns index triples."""
    idx = list(range(len(pts)))
    tris: list[tuple[int, int, int]] = []
    guard = 0
    while len(idx) > 3:
        guard += 1
        if guard > 10 * len(pts) ** 2:
            raise AdqlError("could not decompose the polygon (is it self-intersecting?)")
        n = len(idx)
        for k in range(n):
            i0, i1, i2 = idx[k - 1], idx[k], idx[(k + 1) % n]
            a, b, c = pts[i0], pts[i1], pts[i2]
            turn = _cross2(a, b, c)
            if abs(turn) <= 1e-15 * max(1.0, abs(a[0]) + abs(a[1]) + abs(c[0]) + abs(c[1])):
                idx.pop(k)  # collinear vertex: dropping it does not change the region
                break
            if turn < 0:
                continue
            if any(
                j not in (i0, i1, i2)
                and _cross2(a, b, pts[j]) >= 0
                and _cross2(b, c, pts[j]) >= 0
                and _cross2(c, a, pts[j]) >= 0
                for j in idx
            ):
                continue
            tris.append((i0, i1, i2))
            idx.pop(k)
            break
        else:
            raise AdqlError("could not decompose the polygon (is it self-intersecting?)")
    if len(idx) == 3 and _cross2(pts[idx[0]], pts[idx[1]], pts[idx[2]]) > 0:
        tris.append((idx[0], idx[1], idx[2]))
    return tris


@dataclass(frozen=True)
class SphPolygon:
    """An analysed spherical polygon: original vertices plus convex pieces as inward edge normals."""

    vertices: tuple[tuple[float, float], ...]
    vecs: tuple[Vec, ...]
    pieces: tuple[tuple[Vec, ...], ...]  # per convex piece: its inward edge normals
    piece_vertices: tuple[tuple[Vec, ...], ...]

    @staticmethod
    def build(vertices: list[tuple[float, float]] | tuple[tuple[float, float], ...]) -> SphPolygon:
        """Validate and decompose; raises `AdqlError` for degenerate, self-intersecting or huge polygons."""
        if len(vertices) > MAX_POLYGON_VERTICES:
            raise AdqlTooComplex(f"polygon with {len(vertices)} vertices (limit {MAX_POLYGON_VERTICES})")
        for ra, dec in vertices:
            if not (math.isfinite(ra) and math.isfinite(dec)) or abs(dec) > 90:
                raise AdqlError(f"invalid polygon vertex ({ra}, {dec}): dec must be within [-90, 90]")
        vs: list[Vec] = []
        kept: list[tuple[float, float]] = []
        for ra, dec in vertices:
            v = vec(ra, dec)
            if vs and angle(v, vs[-1]) < EPS:
                continue
            vs.append(v)
            kept.append((ra, dec))
        while len(vs) > 1 and angle(vs[0], vs[-1]) < EPS:
            vs.pop()
            kept.pop()
        if len(vs) < 3:
            raise AdqlError("a polygon needs at least 3 distinct vertices")
        total = (0.0, 0.0, 0.0)
        for v in vs:
            total = add(total, v)
        if norm(total) < 1e-9:
            raise AdqlError("polygon too large: its vertices must lie within one hemisphere")
        c = unit(total)
        if min(dot(v, c) for v in vs) <= 1e-9:
            raise AdqlError("polygon too large: its vertices must lie within one hemisphere")
        e = cross((0.0, 0.0, 1.0), c)
        e = unit(e) if norm(e) > 1e-6 else unit(cross((1.0, 0.0, 0.0), c))
        nn = cross(c, e)
        pts = [(dot(v, e) / dot(v, c), dot(v, nn) / dot(v, c)) for v in vs]
        n = len(pts)
        for i in range(n):
            for j in range(i + 1, n):
                if j == i + 1 or (i == 0 and j == n - 1):
                    continue
                if _seg_intersect_2d(pts[i], pts[(i + 1) % n], pts[j], pts[(j + 1) % n]):
                    raise AdqlError("the polygon's edges intersect each other (it must be a simple polygon)")
        area2 = sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n))
        if abs(area2) < 1e-18:
            raise AdqlError("degenerate polygon (zero area)")
        if area2 < 0:
            pts.reverse()
            vs.reverse()
        convex = all(_cross2(pts[i - 1], pts[i], pts[(i + 1) % n]) >= -1e-15 for i in range(n))
        groups = [list(range(n))] if convex else [list(t) for t in _ear_clip(pts)]
        pieces, pverts = [], []
        for g in groups:
            gv = [vs[i] for i in g]
            normals = []
            for k in range(len(gv)):
                cv = cross(gv[k], gv[(k + 1) % len(gv)])
                if norm(cv) < 1e-15:
                    continue
                normals.append(unit(cv))
            mid = unit(gv[0] if len(gv) == 0 else _sum(gv))
            if normals and sum(dot(mid, m) for m in normals) < 0:
                normals = [scale(m, -1.0) for m in normals]
            pieces.append(tuple(normals))
            pverts.append(tuple(gv))
        return SphPolygon(tuple(kept), tuple(vs), tuple(pieces), tuple(pverts))

    def contains_vec(self, p: Vec) -> bool:
        return any(all(dot(p, m) >= -EPS for m in piece) for piece in self.pieces)

    def contains(self, ra: float, dec: float) -> bool:
        return self.contains_vec(vec(ra, dec))

    def edges(self) -> list[tuple[Vec, Vec]]:
        n = len(self.vecs)
        return [(self.vecs[i], self.vecs[(i + 1) % n]) for i in range(n)]

    def area_sr(self) -> float:
        total = 0.0
        for gv in self.piece_vertices:
            for k in range(1, len(gv) - 1):
                a, b, c = gv[0], gv[k], gv[k + 1]
                total += 2 * math.atan2(abs(dot(a, cross(b, c))), 1 + dot(a, b) + dot(b, c) + dot(c, a))
        return total

    def area_deg2(self) -> float:
        return self.area_sr() * (180.0 / math.pi) ** 2

    def centroid(self) -> tuple[float, float]:
        """Direction of the area-weighted mean position: sum over piece edges of arc length x inward
        normal / 2 (internal edges cancel)."""
        acc = (0.0, 0.0, 0.0)
        for gv in self.piece_vertices:
            mid = _sum(gv)
            for k in range(len(gv)):
                a, b = gv[k], gv[(k + 1) % len(gv)]
                cv = cross(a, b)
                if norm(cv) < 1e-15:
                    continue
                m = unit(cv)
                if dot(m, mid) < 0:
                    m = scale(m, -1.0)
                acc = add(acc, scale(m, angle(a, b) / 2))
        return radec(acc)

    def min_edge_distance(self, p: Vec) -> float:
        return min(arc_distance(p, a, b) for a, b in self.edges())


def _sum(vs) -> Vec:
    t = (0.0, 0.0, 0.0)
    for v in vs:
        t = add(t, v)
    return t


def box_vertices(ra: float, dec: float, width: float, height: float) -> tuple[tuple[float, float], ...]:
    """Corners of an ADQL/STC BOX.

    The box has a cross centred on (ra, dec) whose arms run along the great circles through the centre
    in the east and north directions, with half-lengths width/2 and height/2; each side is the great
    circle through an arm's end point perpendicular to that arm. A side's plane therefore has normal
    -sin(w/2) c + cos(w/2) e (c centre, e east), and a corner is the intersection of two adjacent sides.
    """
    for name, val in (("width", width), ("height", height)):
        if not math.isfinite(val) or val <= 0 or val >= 180:
            raise AdqlError(f"BOX {name} must be > 0 and < 180 degrees (got {val})")
    if abs(dec) > 90:
        raise AdqlError(f"BOX centre declination {dec} outside [-90, 90]")
    c = vec(ra, dec)
    a = math.radians(ra)
    e = (-math.sin(a), math.cos(a), 0.0)
    n = cross(c, e)
    hw, hh = math.radians(width) / 2, math.radians(height) / 2
    east = add(scale(c, -math.sin(hw)), scale(e, math.cos(hw)))
    west = add(scale(c, -math.sin(hw)), scale(e, -math.cos(hw)))
    north = add(scale(c, -math.sin(hh)), scale(n, math.cos(hh)))
    south = add(scale(c, -math.sin(hh)), scale(n, -math.cos(hh)))

    def corner(s1: Vec, s2: Vec) -> tuple[float, float]:
        v = cross(s1, s2)
        if dot(v, c) < 0:
            v = scale(v, -1.0)
        return radec(v)

    return (corner(east, north), corner(north, west), corner(west, south), corner(south, east))


def arcs_cross(a: Vec, b: Vec, c: Vec, d: Vec) -> bool:
    """Whether minor arcs a-b and c-d share a point."""
    n1, n2 = cross(a, b), cross(c, d)
    x = cross(n1, n2)
    if norm(x) < 1e-15:
        return False
    x = unit(x)
    for cand in (x, scale(x, -1.0)):
        if (
            abs(angle(a, cand) + angle(cand, b) - angle(a, b)) < 1e-10
            and abs(angle(c, cand) + angle(cand, d) - angle(c, d)) < 1e-10
        ):
            return True
    return False


def polygon_in_polygon(inner: SphPolygon, outer: SphPolygon) -> bool:
    if not all(outer.contains_vec(v) for v in inner.vecs):
        return False
    return not any(
        arcs_cross(a, b, c, d)
        and not (outer.contains_vec(a) and outer.contains_vec(b) and _arc_inside(a, b, outer))
        for a, b in inner.edges()
        for c, d in outer.edges()
    )


def _arc_inside(a: Vec, b: Vec, poly: SphPolygon, steps: int = 32) -> bool:
    """Sampled check used only to tell touching from crossing when an arc meets a boundary."""
    for k in range(1, steps):
        t = k / steps
        p = unit(add(scale(a, 1 - t), scale(b, t)))
        if not poly.contains_vec(p):
            return False
    return True


def polygons_intersect(p: SphPolygon, q: SphPolygon) -> bool:
    if any(q.contains_vec(v) for v in p.vecs) or any(p.contains_vec(v) for v in q.vecs):
        return True
    return any(arcs_cross(a, b, c, d) for a, b in p.edges() for c, d in q.edges())


def circle_polygon_intersect(ra: float, dec: float, r: float, poly: SphPolygon) -> bool:
    p = vec(ra, dec)
    return poly.contains_vec(p) or poly.min_edge_distance(p) <= math.radians(r) + EPS


def circle_in_polygon(ra: float, dec: float, r: float, poly: SphPolygon) -> bool:
    p = vec(ra, dec)
    return poly.contains_vec(p) and poly.min_edge_distance(p) >= math.radians(r) - EPS


def polygon_in_circle(poly: SphPolygon, ra: float, dec: float, r: float) -> bool:
    anti = vec(ra + 180.0, -dec)
    if poly.contains_vec(anti) and r < 180:
        return False
    return poly.min_edge_distance(anti) >= math.pi - math.radians(r) - EPS


def circle_area_deg2(r: float) -> float:
    return 2 * math.pi * (1 - math.cos(math.radians(r))) * (180.0 / math.pi) ** 2
