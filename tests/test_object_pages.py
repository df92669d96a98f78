"""Alert object pages end to end: a lake with two context catalogs (one private) and an alert stream, the
context matched and stored as the ingest does, `dac serve` in a subprocess, and Debian's chromium (headless)
rendering the pages. The screenshot is checked pixel by pixel: each band's points are drawn in its colour
inside the plot frame, brighter epochs higher, at evenly spaced positions where the data are evenly spaced,
error bars as tall as the errors, upper limits as open triangles below the faintest point, a legend entry
per band. The recent-objects page's filters are checked against the synthetic data (JSON, HTML, and the
DOM chromium renders).

Needs /usr/bin/chromium (Debian package `chromium`); without it the browser tests skip and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from api.auth import hash_token
from api.pages.lightcurve import BAND_STYLE, Point, lightcurve_svg, tick_label
from dac_lake.alerts import AlertLake
from dac_lake.alerts.context import ContextMatcher, context_file, pixels_of
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage
from tests.service_fixtures import ServiceLake, start_service, stop_service
from tests.test_alert_context import (
    GALAXY_DEFINITION,
    STAR_DEFINITION,
    brute_force,
    ingest_definition,
    make_galaxies,
    make_stars,
    new_lake,
    offset,
)

STREAM = "ztf"
TEAM_TOKEN = "team-token-object-pages-0123456789abcdef"
FIELD = (150.0, 2.0)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_MISSING = "chromium is not installed (CI: `apt-get install -y chromium`, the Debian package)"

#: the object whose light curve is drawn: g brightens, r is flat, i fades; two g upper limits before
HOST = "ZTF24host001"
LIVE = "ZTF24live001"
G_EPOCHS = [(60010.0, 20.0), (60014.0, 19.2), (60018.0, 18.4), (60022.0, 17.6), (60026.0, 16.8)]
R_EPOCHS = [(60011.0, 18.5), (60015.0, 18.5), (60019.0, 18.5), (60023.0, 18.5), (60027.0, 18.5)]
I_EPOCHS = [(60012.0, 18.0), (60016.0, 18.6), (60020.0, 19.2), (60024.0, 19.8)]
ERR = {"g": 0.1, "r": 0.03, "i": 0.12}
G_LIMITS = [(60002.0, 20.8), (60006.0, 20.8)]
SPLIT_MJD = 60017.0  # batch 1 holds everything before, batch 2 the rest

#: objects for the recent-objects filters: (id, [(mjd, band, mag)])
RECENT = {
    # earlier g magnitudes below 18 but the latest above: max_mag filters on the latest
    "ZTF24rec0001": [(60030.0 + k, "g", 17.6 + 0.1 * k) for k in range(6)],
    "ZTF24rec0002": [(60031.0, "g", 19.4), (60032.0, "g", 18.0)],  # exactly at the limit: listed
    "ZTF24rec0003": [(60030.5, "r", 17.2), (60031.5, "r", 17.1), (60033.5, "r", 17.0)],
    "ZTF24rec0004": [(60034.0, "g", 17.2)],
    "ZTF24rec0005": [
        (60030.0, "g", 16.9),
        (60031.0, "r", 17.3),
        (60032.0, "g", 17.9),
        (60033.0, "i", 18.0),
        (60034.0, "r", 17.4),
    ],
    "ZTF24rec0006": [(60035.0, "i", 20.1), (60036.0, "i", 20.3)],
}


@dataclass
class PagesLake:
    served: object
    seq1: int
    expected_public: dict
    expected_team: dict
    positions: dict


# ---------------------------------------------------------------------------------------------- building
def _tables(objects: dict[str, tuple[float, float, list]], limits: list, first_id: int):
    """Detections, upper limits and alerts (the packet layer's contract) of `objects`:
    {id: (ra, dec, [(mjd, band, mag, err)])}; each detection is its own alert."""
    det: dict[str, list] = {k: [] for k in ("detection_id", "object_id", "ra", "dec", "mjd", "band", "mag",
                                            "mag_err")}  # fmt: skip
    next_id = first_id
    for oid, (ra, dec, points) in objects.items():
        for mjd, band, mag, err in points:
            for key, value in zip(det, (next_id, oid, ra, dec, mjd, band, mag, err), strict=True):
                det[key].append(value)
            next_id += 1
    n = len(det["mjd"])
    mag = np.array(det["mag"], np.float32)
    flux = (10 ** (-0.4 * (mag.astype(np.float64) - 31.4))).astype(np.float32)
    ids = pa.array(det["detection_id"], pa.int64())
    detections = pa.table(
        {
            "detection_id": ids,
            "object_id": pa.array(det["object_id"], pa.string()),
            "alert_id": ids,
            "ra": pa.array(det["ra"], pa.float64()),
            "dec": pa.array(det["dec"], pa.float64()),
            "mjd": pa.array(det["mjd"], pa.float64()),
            "band": pa.array(det["band"], pa.string()),
            "mag": mag,
            "mag_err": np.array(det["mag_err"], np.float32),
            "flux": flux,
            "flux_err": flux * np.float32(0.05),
            "is_positive": np.ones(n, bool),
            "reliability": np.full(n, 0.9, np.float32),
            "is_history": np.zeros(n, bool),
            "survey": pa.array(["ZTF"] * n, pa.string()),
            "schema_version": pa.array(["4.02"] * n, pa.string()),
        }
    )
    alerts = detections.select(["alert_id", "object_id", "mjd", "ra", "dec", "band", "mag", "survey"])
    upper_limits = pa.table(
        {
            "object_id": pa.array([o for o, _, _, _ in limits], pa.string()),
            "mjd": pa.array([m for _, m, _, _ in limits], pa.float64()),
            "band": pa.array([b for _, _, b, _ in limits], pa.string()),
            "limiting_mag": pa.array([v for _, _, _, v in limits], pa.float32()),
        }
    )
    return detections, upper_limits, alerts, next_id


def build_pages_lake(root: Path) -> tuple[ServiceLake, dict]:
    lake = new_lake(str(root / "lake"))
    galaxies = make_galaxies(6_000, seed=21, fields=(FIELD,), radius=0.5)
    stars = make_stars(1_500, seed=22, fields=(FIELD,), radius=0.5)
    ingest_definition(lake, GALAXY_DEFINITION, galaxies, root / "input", max_rows=4_000)
    private_stars = {**STAR_DEFINITION, "groups": ["team"]}

    rng = np.random.default_rng(23)
    kind = np.array(galaxies.column("kind").to_pylist())
    gal = rng.choice(np.flatnonzero(kind == "galaxy"), 2, replace=False)
    gra, gdec = galaxies.column("ra").to_numpy()[gal], galaxies.column("dec").to_numpy()[gal]
    # HOST: 4" from a galaxy (public) and 0.3" from a star of the private catalog (moved next to it)
    host_ra, host_dec = offset(gra[:1], gdec[:1], np.array([4.0]), rng)
    star_ra, star_dec = offset(host_ra, host_dec, np.array([0.3]), rng)
    stars = stars.set_column(1, "ra", pa.array(np.r_[star_ra, stars.column("ra").to_numpy()[1:]]))
    stars = stars.set_column(2, "dec", pa.array(np.r_[star_dec, stars.column("dec").to_numpy()[1:]]))
    ingest_definition(lake, private_stars, stars, root / "input", max_rows=4_000)
    # LIVE: 0.5" from the second galaxy; its context is never stored (the page computes it)
    live_ra, live_dec = offset(gra[1:], gdec[1:], np.array([0.5]), rng)
    positions = {HOST: (float(host_ra[0]), float(host_dec[0])), LIVE: (float(live_ra[0]), float(live_dec[0]))}
    for oid in RECENT:
        positions[oid] = (float(rng.uniform(149.6, 150.4)), float(rng.uniform(1.6, 2.4)))

    points = {
        HOST: [(m, "g", v, ERR["g"]) for m, v in G_EPOCHS]
        + [(m, "r", v, ERR["r"]) for m, v in R_EPOCHS]
        + [(m, "i", v, ERR["i"]) for m, v in I_EPOCHS],
        LIVE: [(60020.0, "g", 19.0, 0.05), (60021.0, "r", 19.1, 0.05)],
    }
    points.update({oid: [(m, b, v, 0.05) for m, b, v in pts] for oid, pts in RECENT.items()})
    early = {o: (*positions[o], [p for p in pts if p[0] < SPLIT_MJD]) for o, pts in points.items()}
    late = {o: (*positions[o], [p for p in pts if p[0] >= SPLIT_MJD]) for o, pts in points.items()}
    early = {o: v for o, v in early.items() if v[2]}
    late = {o: v for o, v in late.items() if v[2]}
    limits = [(HOST, m, "g", v) for m, v in G_LIMITS]

    alert_lake = AlertLake(lake.storage, STREAM)
    det, ul, alr, next_id = _tables(early, limits, 2_000_000_000_000_000_000)
    first = alert_lake.commit("batch-1", det, ul, alr)
    # the ingest's context step: the objects first seen in the batch (here: all), at their committed
    # positions (read back through the query engine)
    matcher = ContextMatcher(lake, STREAM)
    new_objects = matcher.engine.adql(f"SELECT object_id, ra, dec FROM {STREAM}.objects").table
    assert new_objects.num_rows == len(early)
    matcher.store(first.seq, matcher.match(new_objects))
    det, ul, alr, _ = _tables(late, [], next_id)
    alert_lake.commit("batch-2", det, ul, alr)

    objects = pa.table(
        {
            "object_id": list(positions),
            "ra": [p[0] for p in positions.values()],
            "dec": [p[1] for p in positions.values()],
        }
    )
    expected_public = brute_force(objects, [(GALAXY_DEFINITION, galaxies)])
    expected_team = brute_force(objects, [(GALAXY_DEFINITION, galaxies), (private_stars, stars)])
    config = root / "dac.toml"
    config.write_text(
        "[auth]\nallow_anonymous = true\n"
        f'[[auth.tokens]]\nuser = "alice"\ngroups = ["team"]\ntoken_sha256 = "{hash_token(TEAM_TOKEN)}"\n'
        "[service]\nmaxrec_default = 20000\nsync_timeout_s = 20\n"
    )
    info = {"seq1": first.seq, "public": expected_public, "team": expected_team, "positions": positions}
    return ServiceLake(lake.storage.url, root, config, {}), info


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    service_lake, info = build_pages_lake(root)
    served = start_service(service_lake, root / "jobs", root / "service.log")
    try:
        yield PagesLake(served, info["seq1"], info["public"], info["team"], info["positions"])
    finally:
        stop_service(served)


# ---------------------------------------------------------------------------------------------- browser
def chromium(url: str, tmp: Path, screenshot: Path | None = None, dump_dom: bool = False) -> str:
    """Run Debian's chromium headless on `url`: a screenshot (PNG) or the rendered DOM (returned)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(CHROMIUM_MISSING)
    profile = tmp / f"chromium-profile-{abs(hash(url)) % 10**8}"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1200,1600", "--force-color-profile=srgb",
        "--hide-scrollbars",
    ]  # fmt: skip
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    if dump_dom:
        cmd.append("--dump-dom")
    done = subprocess.run([*cmd, url], capture_output=True, timeout=60, text=True)
    if screenshot is not None:
        assert screenshot.is_file(), f"no screenshot ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def read_png(path: Path) -> np.ndarray:
    """An RGB array of a PNG: Pillow if installed, else a small decoder (8-bit RGB/RGBA, not interlaced:
    what chromium writes)."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except ImportError:
        return _decode_png(path.read_bytes())


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    assert depth == 8 and colour in (2, 6) and interlace == 0, "only 8-bit RGB(A), non-interlaced PNG"
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    prior = np.zeros(width * bpp, np.int32)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            row = line
        elif f == 1:
            row = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            row = (line + prior) % 256
        else:
            row = np.zeros_like(line)
            for i in range(len(line)):
                a = row[i - bpp] if i >= bpp else 0
                b, c = prior[i], (prior[i - bpp] if i >= bpp else 0)
                if f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa_, pb, pc_ = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa_ <= pb and pa_ <= pc_ else (b if pb <= pc_ else c)
                row[i] = (line[i] + pred) % 256
        out[y], prior = row, row
    return out.reshape(height, width, bpp)[:, :, :3].astype(np.uint8)


def _hex(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.int32)


def colour_mask(img: np.ndarray, colour: str, min_weight: float = 0.35) -> np.ndarray:
    """Pixels of `colour` or of its blend with the white background (anti-aliased edges): every channel
    says the same weight w (pixel = w * colour + (1 - w) * white), and w >= `min_weight`."""
    c = _hex(colour).astype(np.float64)
    p = img.astype(np.float64)
    w = (255.0 - p) / np.maximum(255.0 - c, 1.0)
    strong = 255.0 - c > 40  # channels far from white carry the weight; the others must agree loosely
    ws = w[:, :, strong]
    mean = ws.mean(axis=2)
    agree = (ws.max(axis=2) - ws.min(axis=2) < 0.15) & np.all(np.abs(w - mean[:, :, None]) < 0.3, axis=2)
    return agree & (mean >= min_weight) & (mean <= 1.08)


@dataclass
class Blob:
    """A connected set of pixels; (x, y) is the centre of its bounding box (a marker with its symmetric
    error bar is centred on the point; an upper limit's centre is inside its triangle)."""

    x: float
    y: float
    x0: int
    x1: int
    y0: int
    y1: int
    pixels: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0 + 1


def blobs(mask: np.ndarray, min_pixels: int = 6) -> list[Blob]:
    """Connected components (8-neighbours) of a boolean mask: a few hundred pixels, plain BFS."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        queue, pts = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pts.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if not (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]):
                        continue
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(pts) >= min_pixels:
            ys, xs = np.array(pts).T
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
            out.append(Blob((x0 + x1) / 2, (y0 + y1) / 2, x0, x1, y0, y1, len(pts)))
    return sorted(out, key=lambda b: b.x)


def plot_frame(img: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the light curve's frame: the only long dark-grey lines on the page."""
    grey = img.astype(np.int32)
    dark = (grey.max(axis=2) < 170) & (grey.max(axis=2) - grey.min(axis=2) < 8)
    rows = np.flatnonzero(dark.sum(axis=1) > 400)
    assert len(rows) >= 2, "no plot frame in the screenshot"
    top, bottom = int(rows.min()), int(rows.max())
    cols = np.flatnonzero(dark[top : bottom + 1].sum(axis=0) > 0.8 * (bottom - top))
    assert len(cols) >= 2, "no vertical frame edges"
    return int(cols.min()), top, int(cols.max()), bottom


# ---------------------------------------------------------------------------------------------- tests
def _match_keys(matches):
    return sorted((m["catalog"], m["source_id"], m["rank"]) for m in matches)


def _expected_keys(expected):
    return sorted((c, s, r) for c, s, r, *_ in expected[1])


def test_object_json_has_stored_context_filtered_by_rights(pages):
    base = pages.served.base
    public = httpx.get(f"{base}/alerts/{STREAM}/objects/{HOST}.json", timeout=30).json()
    ctx = public["context"]
    assert ctx["source"] == "stored" and ctx["seq"] == pages.seq1
    assert ctx["classification"] == pages.expected_public[HOST][0] == "host-associated"
    assert _match_keys(ctx["matches"]) == _expected_keys(pages.expected_public[HOST])
    assert all(m["catalog"] == "ctx_galaxies" for m in ctx["matches"])  # the private stars stay hidden
    want = {(c, s): sep for c, s, _, sep, *_ in pages.expected_public[HOST][1]}
    for m in ctx["matches"]:
        assert abs(m["separation_arcsec"] - want[(m["catalog"], m["source_id"])]) < 1e-3
        assert set(m["fields"]) == {"z_phot", "r_mag", "morphology"}
    seps = [m["separation_arcsec"] for m in ctx["matches"]]
    assert seps == sorted(seps) and 3.9 < seps[0] < 4.1
    assert len(public["detections"]) == len(G_EPOCHS) + len(R_EPOCHS) + len(I_EPOCHS)
    assert len(public["upper_limits"]) == len(G_LIMITS)

    headers = {"Authorization": f"Bearer {TEAM_TOKEN}"}
    team = httpx.get(f"{base}/alerts/{STREAM}/objects/{HOST}.json", headers=headers, timeout=30).json()
    assert team["context"]["classification"] == pages.expected_team[HOST][0] == "variable star"
    assert _match_keys(team["context"]["matches"]) == _expected_keys(pages.expected_team[HOST])
    assert team["context"]["matches"][0]["catalog"] == "ctx_stars"
    assert team["context"]["matches"][0]["separation_arcsec"] == pytest.approx(0.3, abs=0.01)

    live = httpx.get(f"{base}/alerts/{STREAM}/objects/{LIVE}.json", timeout=30).json()["context"]
    assert live["source"] == "live" and live["seq"] is None
    assert live["classification"] == pages.expected_public[LIVE][0] == "nuclear"
    assert _match_keys(live["matches"]) == _expected_keys(pages.expected_public[LIVE])

    page = httpx.get(f"{base}/alerts/{STREAM}/objects/{HOST}", timeout=30).text
    assert "host-associated" in page and f"batch #{pages.seq1}" in page and "ctx_stars" not in page
    assert httpx.get(f"{base}/alerts/{STREAM}/objects/NOPE.json", timeout=30).status_code == 404


def test_object_page_light_curve_in_chromium(pages, tmp_path):
    png = tmp_path / "object.png"
    chromium(f"{pages.served.base}/alerts/{STREAM}/objects/{HOST}", tmp_path, screenshot=png)
    img = read_png(png)
    left, top, right, bottom = plot_frame(img)
    assert 600 < right - left < 760 and 250 < bottom - top < 380
    inside = np.zeros(img.shape[:2], bool)
    inside[top + 2 : bottom - 1, left + 2 : right - 1] = True
    legend = np.zeros(img.shape[:2], bool)
    legend[top : bottom + 1, right + 3 : right + 40] = True
    found = {}
    for band in "gri":
        colour = BAND_STYLE[band][0]
        mask = colour_mask(img, colour)
        found[band] = blobs(mask & inside)
        assert blobs(mask & legend), f"no legend marker for {band}"
    # g: 5 filled points (centre pixel in colour) and 2 open triangles (background inside)
    g_colour = colour_mask(img, BAND_STYLE["g"][0])
    filled = [b for b in found["g"] if g_colour[round(b.y), round(b.x)]]
    hollow = [b for b in found["g"] if not g_colour[round(b.y), round(b.x)]]
    assert len(filled) == len(G_EPOCHS) and len(hollow) == len(G_LIMITS)
    xs, ys = np.array([b.x for b in filled]), np.array([b.y for b in filled])
    assert np.all(np.diff(ys) < -10), "g brightens: each later point must be higher"
    assert np.ptp(np.diff(xs)) < 2.5 and np.ptp(np.diff(ys)) < 2.5, "evenly spaced data, evenly spaced points"
    px_per_mag = (ys[-1] - ys[0]) / (G_EPOCHS[-1][1] - G_EPOCHS[0][1])  # > 0: larger magnitude lower
    px_per_day = (xs[-1] - xs[0]) / (G_EPOCHS[-1][0] - G_EPOCHS[0][0])
    assert px_per_mag > 40 and px_per_day > 10
    # error bars: a g point with its bar spans 2 x 0.1 mag
    assert all(b.height >= 2 * ERR["g"] * px_per_mag - 2 for b in filled)
    # r is flat, i fades; all on the same scales
    r = [b for b in found["r"]]
    i = [b for b in found["i"]]
    assert len(r) == len(R_EPOCHS) and len(i) == len(I_EPOCHS)
    assert np.ptp([b.y for b in r]) <= 2
    i_ys = np.array([b.y for b in i])
    assert np.all(np.diff(i_ys) > 10), "i fades: each later point must be lower"

    def y_of(mag: float) -> float:
        return ys[0] + (mag - G_EPOCHS[0][1]) * px_per_mag

    def x_of(mjd: float) -> float:
        return xs[0] + (mjd - G_EPOCHS[0][0]) * px_per_day

    for blob, (mjd, mag) in zip(r + i, R_EPOCHS + I_EPOCHS, strict=True):
        assert abs(blob.y - y_of(mag)) < 3 and abs(blob.x - x_of(mjd)) < 3, (blob, mjd, mag)
    # upper limits: left of the first detection, their top edge at the limiting magnitude
    for blob, (mjd, mag) in zip(hollow, G_LIMITS, strict=True):
        assert abs(blob.y0 - y_of(mag)) < 3 and abs(blob.x - x_of(mjd)) < 3, (blob, mjd, mag)
        assert blob.y1 - blob.y0 >= 8  # a triangle below the limit: fainter than this


def test_recent_objects_filters(pages, tmp_path):
    base = f"{pages.served.base}/alerts/{STREAM}/objects"
    points = {oid: [(m, b, v) for m, b, v in pts] for oid, pts in RECENT.items()}
    points[HOST] = (
        [(m, "g", v) for m, v in G_EPOCHS]
        + [(m, "r", v) for m, v in R_EPOCHS]
        + [(m, "i", v) for m, v in I_EPOCHS]
    )
    points[LIVE] = [(60020.0, "g", 19.0), (60021.0, "r", 19.1)]

    def latest(oid: str, band: str) -> float | None:
        found = [(m, v) for m, b, v in points[oid] if b == band]
        return max(found)[1] if found else None

    def expect(min_detections=1, band=None, max_mag=None) -> set[str]:
        out = set()
        for oid, pts in points.items():
            if len(pts) < min_detections:
                continue
            if band is not None:
                mag = latest(oid, band)
                if mag is None or (max_mag is not None and mag > max_mag + 1e-6):
                    continue
            out.add(oid)
        return out

    filters = [
        {},
        {"band": "g", "max_mag": 18.0},
        {"min_detections": 5},
        {"band": "r"},
        {"band": "g", "max_mag": 18.0, "min_detections": 5},
        {"band": "i", "max_mag": 20.5},
    ]
    seen = []
    for params in filters:
        got = httpx.get(base, params={**params, "format": "json"}, timeout=30).json()
        ids = {r["object_id"] for r in got}
        assert ids == expect(**params), params
        html = httpx.get(base, params=params, timeout=30).text
        assert {oid for oid in points if f"objects/{oid}'" in html} == ids
        seen.append(frozenset(ids))
    assert len(set(seen)) == len(filters), "each filter lists a different set of objects"
    # the browser: the rendered page lists the filtered objects (and a screenshot shows the table)
    url = f"{base}?band=g&max_mag=18&min_detections=1"
    dom = chromium(url, tmp_path, dump_dom=True)
    listed = {oid for oid in points if f">{oid}</a>" in dom}
    assert listed == expect(band="g", max_mag=18.0) and f"{len(listed)} objects" in dom
    png = tmp_path / "recent.png"
    chromium(url, tmp_path, screenshot=png)
    img = read_png(png)
    text = img.astype(np.int32).max(axis=2) < 100
    assert text[:400].sum() > 500  # headings, the form and the table rows are drawn
    assert httpx.get(base, params={"band": "q"}, timeout=30).status_code == 400


def test_annotation_appears_on_the_page(pages):
    base = pages.served.base
    url = f"{base}/alerts/{STREAM}/objects/{HOST}/annotations"
    body = {"classifier": "fastfinder", "classification": "SN Ia", "probability": 0.82}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {TEAM_TOKEN}"}
    assert httpx.post(url, json=body, headers=headers, timeout=30).status_code == 201
    data = httpx.get(f"{base}/alerts/{STREAM}/objects/{HOST}.json", timeout=30).json()
    assert [(a["classifier"], a["classification"]) for a in data["annotations"]] == [("fastfinder", "SN Ia")]
    assert "SN Ia" in httpx.get(f"{base}/alerts/{STREAM}/objects/{HOST}", timeout=30).text


def test_lightcurve_svg_markup():
    points = [Point(m, "g", v, ERR["g"]) for m, v in G_EPOCHS]
    points += [Point(m, "r", v, ERR["r"]) for m, v in R_EPOCHS]
    points += [Point(m, "g", v, upper_limit=True) for m, v in G_LIMITS]
    svg = lightcurve_svg(points, title="t")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    dets = {(e.get("data-mjd"), e.get("data-mag")): e for e in root.iter() if e.get("class") == "det"}
    assert len(dets) == len(G_EPOCHS) + len(R_EPOCHS)
    g_y = [float(dets[(repr(m), repr(v))].get("cy")) for m, v in G_EPOCHS]
    assert g_y == sorted(g_y, reverse=True)  # brighter (smaller magnitude) higher (smaller y)
    limits = [e for e in root.iter() if e.get("class") == "limit"]
    assert len(limits) == 2 and all(e.get("fill") == "none" for e in limits)
    for e in limits:  # a downward triangle: two corners at the top, the apex below
        ys = sorted(float(p.split(",")[1]) for p in e.get("points").split())
        assert ys[0] == ys[1] < ys[2]
    errs = [e for e in root.iter() if e.get("class") == "err"]
    assert len(errs) == len(points) - 2
    texts = [e.text for e in root.iter(f"{ns}text")]
    assert "MJD" in texts and "magnitude" in texts and {"g", "r", "limit"} <= set(texts)
    x_ticks = [e.text for e in root.iter() if e.get("class") == "tick-x"]
    assert x_ticks and all(t.isdigit() and len(t) == 5 for t in x_ticks), x_ticks
    assert tick_label(60012.25, 0.25) == "60012.25" and tick_label(18.5, 0.5) == "18.5"
    assert tick_label(60010.0, 5.0) == "60010"
    assert "no detections" in lightcurve_svg([])


def test_a_damaged_context_file_leaves_the_page_usable(pages):
    storage = LakeStorage(pages.served.lake.url, load_settings())
    ra, dec = pages.positions[HOST]
    bad = context_file(STREAM, int(pixels_of(np.array([ra]), np.array([dec]))[0]), 999_999)
    storage.write_bytes(bad, b"not parquet")
    try:
        url = f"{pages.served.base}/alerts/{STREAM}/objects/{HOST}"
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "Context unavailable" in page.text and "<svg" in page.text
        data = httpx.get(f"{url}.json", timeout=30).json()
        assert data["context"]["source"] == "unavailable" and len(data["detections"]) == 14
    finally:
        storage.delete_file(bad)
    assert httpx.get(f"{url}.json", timeout=30).json()["context"]["source"] == "stored"
