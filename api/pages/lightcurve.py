"""A light curve as an SVG plot (pure: rows in, markup out).

Why server-side SVG and not a JavaScript chart library: the object page must work offline on a DAC's own
network, load instantly, and be testable in a headless browser without a CDN; an SVG of a few hundred points
is small, and the browser draws it natively. Magnitudes grow downwards (astronomers' convention), each band
has its own colour and marker, error bars are drawn, upper limits are open downward triangles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

#: band -> (colour, marker): ZTF g/r/i and the Rubin ugrizy set, colour-blind-safe-ish
BAND_STYLE: dict[str, tuple[str, str]] = {
    "u": ("#6a3d9a", "circle"),
    "g": ("#1b9e77", "circle"),
    "r": ("#d95f02", "square"),
    "i": ("#7570b3", "diamond"),
    "z": ("#e7298a", "circle"),
    "y": ("#66a61e", "square"),
}
DEFAULT_STYLE = ("#444444", "circle")


@dataclass(frozen=True)
class Point:
    mjd: float
    band: str
    mag: float
    err: float | None = None
    upper_limit: bool = False


@dataclass(frozen=True)
class PlotBox:
    width: int = 760
    height: int = 380
    left: int = 64
    right: int = 96
    top: int = 24
    bottom: int = 48


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    return _ticks_and_step(lo, hi, n)[0]


def _ticks_and_step(lo: float, hi: float, n: int = 6) -> tuple[list[float], float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo], 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks, step


def tick_label(value: float, step: float) -> str:
    """A tick's text with as many decimals as the step needs: MJDs are 5-digit numbers, so a general
    format ('{:g}', 6 significant digits) would print 60012.25 as 60012.2."""
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _marker(kind: str, x: float, y: float, colour: str, size: float = 4.5, attrs: str = "") -> str:
    """A filled detection marker (circle, square or diamond) centred on (x, y)."""
    if kind == "square":
        d = 2 * size
        corner = f'x="{x - size:.1f}" y="{y - size:.1f}"'
        return f'<rect {attrs} {corner} width="{d:.1f}" height="{d:.1f}" fill="{colour}"/>'
    if kind == "diamond":
        r = size + 1
        pts = f"{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} {x - r:.1f},{y:.1f}"
        return f'<polygon {attrs} points="{pts}" fill="{colour}"/>'
    return f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="{size:.1f}" fill="{colour}"/>'


def _limit(x: float, y: float, colour: str, attrs: str = "") -> str:
    """An upper limit: an open triangle pointing down (fainter than this), its top edge at the limit."""
    pts = f"{x - 6:.1f},{y:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 10:.1f}"
    return f'<polygon {attrs} points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>'


def lightcurve_svg(points: Sequence[Point], title: str = "", box: PlotBox = PlotBox()) -> str:
    """An SVG document: magnitude (inverted axis) against MJD, per band, with error bars and limits."""
    pts = [p for p in points if math.isfinite(p.mjd) and p.mag is not None and math.isfinite(p.mag)]
    w, h = box.width, box.height
    x0, x1 = box.left, w - box.right
    y0, y1 = box.top, h - box.bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lightcurve" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label={quoteattr(title or "light curve")}>',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>',
        f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#333"/>',
    ]
    if title:
        out.append(
            f'<text x="{x0}" y="{y0 - 8}" font-size="13" font-family="sans-serif">{escape(title)}</text>'
        )
    if not pts:
        out.append(
            f'<text x="{(x0 + x1) / 2}" y="{(y0 + y1) / 2}" text-anchor="middle" font-family="sans-serif">'
            "no detections</text></svg>"
        )
        return "".join(out)
    mjds = [p.mjd for p in pts]
    mags = [p.mag for p in pts] + [p.mag + (p.err or 0) for p in pts] + [p.mag - (p.err or 0) for p in pts]
    t_lo, t_hi = min(mjds), max(mjds)
    if t_hi - t_lo < 1e-6:
        t_lo, t_hi = t_lo - 0.5, t_hi + 0.5
    pad_t = 0.04 * (t_hi - t_lo)
    t_lo, t_hi = t_lo - pad_t, t_hi + pad_t
    m_lo, m_hi = min(mags), max(mags)
    if m_hi - m_lo < 0.1:
        m_lo, m_hi = m_lo - 0.25, m_hi + 0.25
    pad_m = 0.06 * (m_hi - m_lo)
    m_lo, m_hi = m_lo - pad_m, m_hi + pad_m
    faintest_limit = max((p.mag for p in pts if p.upper_limit), default=-math.inf)
    if faintest_limit > -math.inf:  # room below the faintest limit for its triangle (10 px + a margin)
        room = 14 * (m_hi - m_lo) / max(y1 - y0 - 14, 1)
        m_hi = max(m_hi, faintest_limit + room)

    def sx(t: float) -> float:
        return x0 + (t - t_lo) / (t_hi - t_lo) * (x1 - x0)

    def sy(m: float) -> float:  # bright (small mag) at the top
        return y0 + (m - m_lo) / (m_hi - m_lo) * (y1 - y0)

    t_ticks, t_step = _ticks_and_step(t_lo, t_hi)
    for t in t_ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 5}" stroke="#333"/>')
        out.append(
            f'<text class="tick-x" x="{x:.1f}" y="{y1 + 18}" text-anchor="middle" font-size="11" '
            f'font-family="sans-serif">{tick_label(t, t_step)}</text>'
        )
    m_ticks, m_step = _ticks_and_step(m_lo, m_hi)
    for m in m_ticks:
        y = sy(m)
        out.append(f'<line x1="{x0 - 5}" y1="{y:.1f}" x2="{x0}" y2="{y:.1f}" stroke="#333"/>')
        out.append(
            f'<text class="tick-y" x="{x0 - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'font-family="sans-serif">{tick_label(m, m_step)}</text>'
        )
    out.append(
        f'<text x="{(x0 + x1) / 2}" y="{h - 8}" text-anchor="middle" font-size="12" '
        'font-family="sans-serif">MJD</text>'
        f'<text transform="translate(16,{(y0 + y1) / 2}) rotate(-90)" text-anchor="middle" font-size="12" '
        'font-family="sans-serif">magnitude</text>'
    )
    bands = sorted({p.band for p in pts}, key=lambda b: "ugrizy".find(b) if b in "ugrizy" else 99)
    for k, band in enumerate(bands):
        colour, marker = BAND_STYLE.get(band, DEFAULT_STYLE)
        out.append(f'<g class="band band-{escape(band)}" data-band={quoteattr(band)}>')
        for p in (q for q in pts if q.band == band):
            x, y = sx(p.mjd), sy(p.mag)
            data = f'data-mjd="{p.mjd!r}" data-mag="{p.mag!r}"'
            if p.upper_limit:
                out.append(_limit(x, y, colour, f'class="limit" {data}'))
                continue
            if p.err is not None and math.isfinite(p.err) and p.err > 0:
                out.append(
                    f'<line class="err" x1="{x:.1f}" y1="{sy(p.mag - p.err):.1f}" x2="{x:.1f}" '
                    f'y2="{sy(p.mag + p.err):.1f}" stroke="{colour}" stroke-width="1.5"/>'
                )
            out.append(_marker(marker, x, y, colour, attrs=f'class="det" {data}'))
        ly = y0 + 14 + 18 * k
        out.append(_marker(marker, x1 + 18, ly - 4, colour, attrs='class="legend"'))
        out.append(
            f'<text x="{x1 + 30}" y="{ly}" font-size="12" font-family="sans-serif">{escape(band)}</text></g>'
        )
    if any(p.upper_limit for p in pts):
        ly = y0 + 14 + 18 * len(bands) + 6
        out.append(
            '<g class="legend-limit">'
            + _limit(x1 + 18, ly - 8, "#444444", 'class="legend"')
            + f'<text x="{x1 + 30}" y="{ly}" font-size="12" font-family="sans-serif">limit</text></g>'
        )
    out.append("</svg>")
    return "".join(out)
