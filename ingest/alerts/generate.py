"""Synthetic but realistic ZTF and Rubin alert packets, written with the real schemas, deterministic from a
seed.

Real packets are not always at hand (CI machines have none), so the tests, the benchmark and demos make
their own. What is simulated:

- N objects at random sky positions (uniform on the sphere): transients that rise over days and fade
  (~70 %), variable stars around a reference flux — whose difference flux goes negative, as real ZTF
  ``isdiffpos='f'`` detections do (~25 %) — and a few moving objects seen once (~5 %).
- Nightly visits in two or three bands (ZTF g/r and sometimes i; Rubin two or three of ugrizy) with a
  varying 5-sigma limit; a visit is a detection when the difference flux beats the limit, else a
  non-detection.
- Every detection is an alert carrying up to ``history_days`` of history: ZTF ``prv_candidates`` (earlier
  detections, and upper limits with null candid/ra/magpsf), ZTF 4.x ``fp_hists``; Rubin ``prvDiaSources``,
  ``prvDiaForcedSources`` and (7.x) ``prvDiaNondetectionLimits``. History entries reuse the ids of the
  detections they repeat, as the surveys' do, so de-duplication can be tested.
- Cutouts are small gzipped FITS stamps (noise), so packets have a realistic shape at a modest size.

Layouts: ZTF's archive (a folder per night, one ``<candid>.avro`` container file per alert), many alerts per
container file (``--layout night``), and Rubin's Kafka form (one Confluent-framed payload per ``.bin`` file).

    python -m ingest.alerts.generate --family ztf|rubin --objects N --nights K --out DIR
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

from ingest.alerts.packets import SchemaInfo, confluent_frame, registry

MJD_START = 60400.0  # 2024-03-31
JD_OFFSET = 2400000.5
ZP_NJY = 31.4  # AB magnitude of 1 nJy
ZTF_FID = {"g": 1, "r": 2, "i": 3}
RUBIN_BANDS = "ugrizy"
LIMITS = {"ztf": 20.4, "rubin": 24.2}  # typical 5-sigma difference-image limits


@dataclass
class SimObject:
    index: int
    kind: str  # transient | variable | moving
    ra: float
    dec: float
    peak_mag: float = 0.0
    t0: float = 0.0  # transient: explosion time; variable: phase reference
    rise: float = 0.0
    decline: float = 0.0  # mag / day
    period: float = 0.0
    amplitude: float = 0.0
    colour: float = 0.0

    def diff_flux(self, mjd: float, band: str) -> float:
        """Difference-image flux in nJy (science minus reference)."""
        shift = {"u": 0.6, "g": 0.2, "r": 0.0, "i": -0.1, "z": -0.15, "y": -0.2}[band] * self.colour
        if self.kind == "variable":
            mean = 10 ** (-0.4 * (self.peak_mag + shift - ZP_NJY))
            mag = (
                self.peak_mag + shift + self.amplitude * math.sin(2 * math.pi * (mjd - self.t0) / self.period)
            )
            return 10 ** (-0.4 * (mag - ZP_NJY)) - mean
        dt = mjd - self.t0
        if self.kind == "moving":
            return 10 ** (-0.4 * (self.peak_mag + shift - ZP_NJY))
        if dt <= 0:
            return 0.0
        if dt < self.rise:
            mag = self.peak_mag + shift + 2.5 * (1 - dt / self.rise) ** 2 * 1.5
        else:
            mag = self.peak_mag + shift + self.decline * (dt - self.rise)
        return 10 ** (-0.4 * (mag - ZP_NJY))


@dataclass
class Visit:
    obj: int
    mjd: float
    band: str
    limit: float  # 5-sigma limiting magnitude
    flux: float  # measured difference flux, nJy
    flux_err: float
    ra: float
    dec: float
    detected: bool
    det_id: int = 0  # candid / diaSourceId of a detection
    forced_id: int = 0  # Rubin diaForcedSourceId
    visit_id: int = 0

    @property
    def mag(self) -> float:
        return ZP_NJY - 2.5 * math.log10(abs(self.flux))

    @property
    def mag_err(self) -> float:
        return 2.5 / math.log(10) * self.flux_err / abs(self.flux)


def simulate(
    family: str, objects: int, nights: int, seed: int = 0, fields: int = 0, field_radius_deg: float = 1.75
) -> tuple[list[SimObject], list[Visit]]:
    """Objects and their visits (time ordered); every detection gets a unique id.

    `fields` = 0: objects anywhere on the sky and observed at scattered times, so any run of alerts is
    all-sky (the hardest case for a HEALPix-partitioned writer). `fields` = N: objects lie in N telescope
    fields (caps of `field_radius_deg`; 1.75 deg is Rubin's 9.6 deg2) and each night every field is visited
    once per band, one field after another, so the alert stream arrives visit by visit as a survey's does."""
    rng = np.random.default_rng(seed)
    objs: list[SimObject] = []
    span = max(nights, 1)
    centres = [(float(rng.uniform(0.0, 360.0)), float(np.degrees(np.arcsin(rng.uniform(-0.9, 0.9)))))
               for _ in range(fields)]  # fmt: skip
    field_of: list[int] = []
    for i in range(objects):
        u = rng.random()
        kind = "moving" if i % 20 == 7 else "variable" if u < 0.26 else "transient"
        if fields:
            f = int(rng.integers(0, fields))
            field_of.append(f)
            ra, dec = _in_cap(rng, *centres[f], field_radius_deg)
        else:
            ra = float(rng.uniform(0.0, 360.0))
            dec = float(np.degrees(np.arcsin(rng.uniform(-1.0, 1.0))))
        deep = LIMITS[family] - 20.4
        o = SimObject(i, kind, ra, dec, colour=float(rng.normal(0.3, 0.3)))
        if kind == "transient":
            o.peak_mag = float(rng.uniform(16.5, 19.5) + deep)
            o.t0 = MJD_START + float(rng.uniform(-10.0, span - 2.0))
            o.rise = float(rng.uniform(5.0, 15.0))
            o.decline = float(rng.uniform(0.02, 0.08))
        elif kind == "variable":
            o.peak_mag = float(rng.uniform(15.5, 18.0) + deep)
            o.period = float(rng.uniform(0.3, 30.0))
            o.amplitude = float(rng.uniform(0.4, 1.2))
            o.t0 = MJD_START + float(rng.uniform(0.0, o.period))
        else:
            o.peak_mag = float(rng.uniform(17.0, 19.5) + deep)
            o.t0 = MJD_START + float(rng.integers(0, span))
        objs.append(o)

    visits: list[Visit] = []
    bands_all = ["g", "r", "i"] if family == "ztf" else list(RUBIN_BANDS)
    for o in objs:
        nights_seen = [int(o.t0 - MJD_START)] if o.kind == "moving" else range(span)
        for n in nights_seen:
            if o.kind != "moving" and rng.random() < 0.15:  # weather, scheduling
                continue
            k = 1 if o.kind == "moving" else (3 if rng.random() < 0.3 else 2)
            if family == "ztf":
                bands = ["g", "r", "i"][:k]
            else:
                bands = list(rng.choice(bands_all, size=k, replace=False))
            if fields:  # a visit per (field, band) slot of the night
                slot = 0.3 / (fields * 3)
                base = MJD_START + n + 0.15 + field_of[o.index] * 3 * slot
                step = slot
            else:
                base = MJD_START + n + 0.15 + float(rng.uniform(0.0, 0.2))
                step = 0.02
            for j, band in enumerate(bands):
                mjd = round(base + step * j + (float(rng.uniform(0.0, 1e-5)) if fields else 0.0), 7)
                limit = float(LIMITS[family] + rng.normal(0.0, 0.3))
                err = 10 ** (-0.4 * (limit - ZP_NJY)) / 5.0
                true = o.diff_flux(mjd, band)
                flux = float(true + rng.normal(0.0, err))
                det = abs(flux) > 5.0 * err
                jitter = 0.1 / 3600.0
                visits.append(
                    Visit(
                        o.index,
                        mjd,
                        str(band),
                        limit,
                        flux,
                        err,
                        (o.ra + float(rng.normal(0.0, jitter)) / max(math.cos(math.radians(o.dec)), 1e-3))
                        % 360.0,
                        max(-90.0, min(90.0, o.dec + float(rng.normal(0.0, jitter)))),
                        det,
                    )
                )
    visits.sort(key=lambda v: (v.mjd, v.obj))
    base_id = 2_600_000_000_000_000_000 if family == "ztf" else 170_000_000_000_000_000
    for k, v in enumerate(visits):
        v.visit_id = 1000 + k
        v.forced_id = base_id + 500_000_000 + k
        if v.detected:
            v.det_id = base_id + k * 1000 + v.obj % 1000
    return objs, visits


def _in_cap(rng: np.random.Generator, ra0: float, dec0: float, radius_deg: float) -> tuple[float, float]:
    """A point uniform in the spherical cap of `radius_deg` around (ra0, dec0)."""
    cos_r = math.cos(math.radians(radius_deg))
    z = float(rng.uniform(cos_r, 1.0))  # cos of the distance from the centre
    phi = float(rng.uniform(0.0, 2 * math.pi))
    r = math.sqrt(max(0.0, 1 - z * z))
    x, y = r * math.cos(phi), r * math.sin(phi)  # around the pole, then rotate to (ra0, dec0)
    d0, a0 = math.radians(90.0 - dec0), math.radians(ra0)
    x1, z1 = x * math.cos(d0) + z * math.sin(d0), -x * math.sin(d0) + z * math.cos(d0)
    x2, y2 = x1 * math.cos(a0) - y * math.sin(a0), x1 * math.sin(a0) + y * math.cos(a0)
    return math.degrees(math.atan2(y2, x2)) % 360.0, math.degrees(math.asin(max(-1.0, min(1.0, z1))))


# --------------------------------------------------------------------------------- records from schemas


class Templates:
    """Default-valued dicts for every record type of a schema: nullable fields None, others 0/''/False.

    Building records from templates keeps the generator working across schema versions: only the fields
    that matter are set, and every other field is present with a legal value."""

    def __init__(self, info: SchemaInfo):
        self.info = info
        self.named = info.schema["__named_schemas"]
        self._cache: dict[str, dict[str, Any]] = {}

    def new(self, record_name: str) -> dict[str, Any]:
        full = next(n for n in self.named if n == record_name or n.endswith("." + record_name))
        if full not in self._cache:
            self._cache[full] = {f["name"]: self._default(f["type"]) for f in self.named[full]["fields"]}
        return dict(self._cache[full])

    def _default(self, t: Any) -> Any:
        if isinstance(t, list):
            return None if "null" in t else self._default(t[0])
        if isinstance(t, dict):
            kind = t["type"]
            if kind == "record":
                return {f["name"]: self._default(f["type"]) for f in t["fields"]}
            if kind == "array":
                return []
            if kind == "map":
                return {}
            if kind == "enum":
                return t["symbols"][0]
            if kind == "fixed":
                return b"\x00" * t["size"]
            return self._default(kind)
        if t in self.named:
            return self._default(self.named[t])
        return {
            "int": 0,
            "long": 0,
            "float": 0.0,
            "double": 0.0,
            "string": "",
            "boolean": False,
            "bytes": b"",
            "null": None,
        }[t]


def _fits_stamp(rng: np.random.Generator, size: int) -> bytes:
    cards = [
        f"{'SIMPLE':8}= {'T':>20}",
        f"{'BITPIX':8}= {-32:>20}",
        f"{'NAXIS':8}= {2:>20}",
        f"{'NAXIS1':8}= {size:>20}",
        f"{'NAXIS2':8}= {size:>20}",
        "END",
    ]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode("ascii")
    data = rng.normal(100.0, 10.0, (size, size)).astype(">f4").tobytes()
    data += b"\x00" * (-len(data) % 2880)
    return gzip.compress(header + data, compresslevel=6, mtime=0)


def ztf_object_id(index: int, year: int = 24) -> str:
    letters, n = [], index
    for _ in range(7):
        letters.append(chr(ord("a") + n % 26))
        n //= 26
    return f"ZTF{year}{''.join(reversed(letters))}"


def rubin_object_id(index: int) -> int:
    return 3_000_000_000_000_000 + index * 7919


def _window(visits: list[Visit], start: int, mjd: float, days: float) -> list[Visit]:
    return [v for v in visits[start:] if mjd - days <= v.mjd < mjd]


def build_alerts(
    family: str,
    objects: int,
    nights: int,
    *,
    seed: int = 0,
    version: str | None = None,
    history_days: float = 30.0,
    cutout_pixels: int = 16,
    fields: int = 0,
) -> tuple[SchemaInfo, list[dict[str, Any]]]:
    """Alert records (dicts in the schema's own shape), in time order, and the schema they follow
    (`fields`: see `simulate`)."""
    info = registry().get(family, version) if version else registry().latest(family)
    objs, visits = simulate(family, objects, nights, seed, fields=fields)
    rng = np.random.default_rng(seed + 1)
    stamps = [_fits_stamp(rng, cutout_pixels) for _ in range(16)]
    tpl = Templates(info)
    per_obj: dict[int, list[Visit]] = {}
    for v in visits:
        per_obj.setdefault(v.obj, []).append(v)
    first = {o: vs[0].mjd for o, vs in per_obj.items()}
    if family == "ztf":
        return info, _ztf_alerts(info, tpl, objs, visits, per_obj, first, history_days, stamps, rng)
    return info, _rubin_alerts(info, tpl, objs, visits, per_obj, history_days, stamps, rng)


def _ztf_alerts(info, tpl, objs, visits, per_obj, first, history_days, stamps, rng) -> list[dict[str, Any]]:
    has_fp = any(f["name"] == "fp_hists" for f in info.schema["fields"])
    prv_cache: dict[int, dict[str, Any]] = {}
    fp_cache: dict[int, dict[str, Any]] = {}
    alerts = []
    pos_in_obj: dict[int, int] = {}

    def pid_of(v: Visit) -> int:
        return int((v.mjd + JD_OFFSET - 2458000.0) * 1e6) * 100 + 15

    def prv(v: Visit) -> dict[str, Any]:
        p = prv_cache.get(id(v))
        if p is None:
            p = tpl.new("prv_candidate")
            p.update(
                jd=v.mjd + JD_OFFSET,
                fid=ZTF_FID[v.band],
                pid=pid_of(v),
                diffmaglim=v.limit,
                programid=1,
                rbversion="t17_f5_c3",
                nid=int(v.mjd - 58000),
                field=600 + objs[v.obj].index % 300,
                rcid=objs[v.obj].index % 64,
                magzpsci=26.3,
            )
            if v.detected:
                p.update(
                    candid=v.det_id,
                    isdiffpos="t" if v.flux > 0 else "f",
                    ra=v.ra,
                    dec=v.dec,
                    magpsf=v.mag,
                    sigmapsf=v.mag_err,
                    rb=0.65 + 0.35 * ((v.det_id // 7) % 100) / 100.0,
                    ranr=objs[v.obj].ra,
                    decnr=objs[v.obj].dec,
                    ssdistnr=-999.0,
                )
            prv_cache[id(v)] = p
        return p

    def fp(v: Visit) -> dict[str, Any]:
        f = fp_cache.get(id(v))
        if f is None:
            f = tpl.new("fp_hist")
            scale = 10 ** (0.4 * (ZP_NJY - 26.3))  # nJy per DN at magzpsci = 26.3
            f.update(
                fid=ZTF_FID[v.band],
                pid=pid_of(v),
                rfid=700_000_000 + v.obj,
                programid=1,
                jd=v.mjd + JD_OFFSET,
                forcediffimflux=v.flux / scale,
                forcediffimfluxunc=v.flux_err / scale,
                magzpsci=26.3,
                diffmaglim=v.limit,
                procstatus="0",
                ranr=objs[v.obj].ra,
                decnr=objs[v.obj].dec,
                exptime=30.0,
            )
            fp_cache[id(v)] = f
        return f

    for v in visits:
        k = pos_in_obj.get(v.obj, 0)
        pos_in_obj[v.obj] = k + 1
        if not v.detected:
            continue
        o = objs[v.obj]
        mine = per_obj[v.obj]
        history = _window(mine, 0, v.mjd, history_days)[:k] if k else []
        history = [h for h in history if h.mjd < v.mjd]
        ndet = sum(1 for h in mine[:k] if h.detected) + 1
        c = tpl.new("candidate")
        moving = o.kind == "moving"
        c.update(
            jd=v.mjd + JD_OFFSET,
            fid=ZTF_FID[v.band],
            pid=pid_of(v),
            diffmaglim=v.limit,
            programid=1,
            candid=v.det_id,
            isdiffpos="t" if v.flux > 0 else "f",
            nid=int(v.mjd - 58000),
            field=600 + o.index % 300,
            rcid=o.index % 64,
            ra=v.ra,
            dec=v.dec,
            magpsf=v.mag,
            sigmapsf=v.mag_err,
            rb=0.65 + 0.35 * ((v.det_id // 7) % 100) / 100.0,
            drb=0.7 + 0.3 * ((v.det_id // 11) % 100) / 100.0,
            ranr=o.ra,
            decnr=o.dec,
            ssdistnr=1.2 if moving else -999.0,
            ssmagnr=19.0 if moving else -999.0,
            ssnamenr=f"{100000 + o.index}" if moving else "null",
            sgscore1=0.98 if o.kind == "variable" else 0.05,
            distpsnr1=0.3 if o.kind == "variable" else 2.1,
            ndethist=ndet,
            ncovhist=k + 1,
            jdstarthist=first[v.obj] + JD_OFFSET,
            jdendhist=v.mjd + JD_OFFSET,
            nmtchps=5,
            rfid=700_000_000 + o.index,
            jdstartref=2458200.5,
            jdendref=2458300.5,
            nframesref=20,
            rbversion="t17_f5_c3",
            magzpsci=26.3,
            nmatches=900,
            drbversion="d6_m7",
            exptime=30.0,
            fwhm=2.1,
        )
        rec = tpl.new("alert")
        stamp = stamps[int(rng.integers(0, len(stamps)))]
        rec.update(
            schemavsn=info.version,
            publisher="ZTF (www.ztf.caltech.edu)",
            objectId=ztf_object_id(o.index),
            candid=v.det_id,
            candidate=c,
            prv_candidates=[prv(h) for h in history] or None,
            cutoutScience={
                "fileName": f"candid{v.det_id}_pid{c['pid']}_targ_sci.fits.gz",
                "stampData": stamp,
            },
            cutoutTemplate={"fileName": f"candid{v.det_id}_ref.fits.gz", "stampData": stamp},
            cutoutDifference={
                "fileName": f"candid{v.det_id}_pid{c['pid']}_targ_scimref.fits.gz",
                "stampData": stamp,
            },
        )
        if has_fp:
            rec["fp_hists"] = [fp(h) for h in history] or None
        alerts.append(rec)
    return alerts


def _rubin_alerts(info, tpl, objs, visits, per_obj, history_days, stamps, rng) -> list[dict[str, Any]]:
    names = {f["name"] for f in info.schema["fields"]}
    src_cache: dict[int, dict[str, Any]] = {}
    alerts = []
    pos_in_obj: dict[int, int] = {}
    alert_serial = 0

    def source(v: Visit) -> dict[str, Any]:
        s = src_cache.get(id(v))
        if s is None:
            o = objs[v.obj]
            s = tpl.new("diaSource")
            s.update(
                diaSourceId=v.det_id,
                visit=v.visit_id,
                detector=o.index % 189,
                diaObjectId=None if o.kind == "moving" else rubin_object_id(o.index),
                ssObjectId=20_000_000 + o.index if o.kind == "moving" else None,
                midpointMjdTai=v.mjd,
                ra=v.ra,
                dec=v.dec,
                raErr=2e-5,
                decErr=2e-5,
                x=float(o.index % 4000),
                y=float((o.index * 7) % 4000),
                psfFlux=v.flux,
                psfFluxErr=v.flux_err,
                snr=abs(v.flux) / v.flux_err,
                band=v.band,
                reliability=0.5 + 0.5 * ((v.det_id // 13) % 100) / 100.0,
            )
            for flag in ("is_negative", "isNegative"):
                if flag in s:
                    s[flag] = v.flux < 0
            src_cache[id(v)] = s
        return s

    for v in visits:
        k = pos_in_obj.get(v.obj, 0)
        pos_in_obj[v.obj] = k + 1
        if not v.detected:
            continue
        o = objs[v.obj]
        mine = per_obj[v.obj]
        history = [h for h in _window(mine, 0, v.mjd, history_days)[:k] if h.mjd < v.mjd]
        alert_serial += 1
        rec = tpl.new("alert")
        stamp = stamps[int(rng.integers(0, len(stamps)))]
        own = source(v)
        rec.update(
            diaSource=own,
            prvDiaSources=[source(h) for h in history if h.detected] or None,
            cutoutDifference=stamp,
            cutoutScience=stamp,
            cutoutTemplate=stamp,
        )
        if "alertId" in names:
            rec["alertId"] = 900_000_000_000 + alert_serial
        if "diaSourceId" in names:
            rec["diaSourceId"] = v.det_id
        if o.kind == "moving":
            rec["prvDiaForcedSources"] = None
            if "ssObject" in names:
                ss = tpl.new("ssObject")
                ss["ssObjectId"] = own["ssObjectId"]
                rec["ssObject"] = ss
            if "ssSource" in names:
                ss = tpl.new("ssSource")
                ss.update(ssObjectId=own["ssObjectId"], diaSourceId=v.det_id)
                rec["ssSource"] = ss
        else:
            forced = []
            for h in history:
                f = tpl.new("diaForcedSource")
                f.update(
                    diaForcedSourceId=h.forced_id,
                    diaObjectId=rubin_object_id(o.index),
                    ra=o.ra,
                    dec=o.dec,
                    visit=h.visit_id,
                    detector=o.index % 189,
                    psfFlux=h.flux,
                    psfFluxErr=h.flux_err,
                    midpointMjdTai=h.mjd,
                    band=h.band,
                )
                if "timeProcessedMjdTai" in f:
                    f["timeProcessedMjdTai"] = h.mjd + 0.01
                forced.append(f)
            rec["prvDiaForcedSources"] = forced or None
            if "prvDiaNondetectionLimits" in names:
                nd = []
                for h in history:
                    if not h.detected:
                        lim = tpl.new("diaNondetectionLimit")
                        lim.update(
                            ccdVisitId=h.visit_id, midpointMjdTai=h.mjd, band=h.band, diaNoise=h.flux_err
                        )
                        nd.append(lim)
                rec["prvDiaNondetectionLimits"] = nd or None
            obj = tpl.new("diaObject")
            dets = [h for h in mine[: k + 1] if h.detected]
            obj.update(diaObjectId=rubin_object_id(o.index), ra=o.ra, dec=o.dec)
            if "nDiaSources" in obj:
                obj.update(nDiaSources=len(dets), firstDiaSourceMjdTai=dets[0].mjd, lastDiaSourceMjdTai=v.mjd)
            if "validityStartMjdTai" in obj:
                obj["validityStartMjdTai"] = v.mjd
            if "radecMjdTai" in obj:
                obj["radecMjdTai"] = v.mjd
            rec["diaObject"] = obj
        alerts.append(rec)
    return alerts


# ------------------------------------------------------------------------------------------ encodings


def record_bytes(record: dict[str, Any], info: SchemaInfo) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, info.schema, record)
    return out.getvalue()


def confluent_payload(record: dict[str, Any], info: SchemaInfo, schema_id: int | None = None) -> bytes:
    """Rubin's Kafka form of an alert (schema id defaults to the registry's id for the version)."""
    sid = info.schema_id if schema_id is None else schema_id
    if sid is None:
        raise ValueError(f"{info.label} has no Confluent schema id")
    return confluent_frame(sid, record_bytes(record, info))


def container_payload(records: Iterable[dict[str, Any]], info: SchemaInfo, codec: str = "null") -> bytes:
    """An Avro container file (ZTF's form, for one alert or many) as bytes."""
    out = io.BytesIO()
    fastavro.writer(out, info.schema, records, codec=codec, sync_interval=1 << 20)
    return out.getvalue()


def _night_label(mjd: float) -> str:
    from datetime import datetime, timedelta

    return (datetime(1858, 11, 17) + timedelta(days=math.floor(mjd))).strftime("%Y%m%d")


def _alert_mjd(rec: dict[str, Any]) -> float:
    if "candidate" in rec:
        return rec["candidate"]["jd"] - JD_OFFSET
    return rec["diaSource"]["midpointMjdTai"]


def _alert_name(rec: dict[str, Any]) -> str:
    if "candidate" in rec:
        return str(rec["candid"])
    return str(rec.get("alertId") or rec.get("diaSourceId"))


def write_alerts(
    records: list[dict[str, Any]],
    info: SchemaInfo,
    out: str | Path,
    layout: str = "alert",
    fmt: str | None = None,
) -> list[Path]:
    """Write records under ``out``.

    layout 'alert': a folder per night with one file per alert; 'night': one file per night holding all its
    alerts. fmt 'container' (Avro container files, ZTF's form, the default for ZTF) or 'confluent'
    (Confluent-framed single records in ``.bin`` files, Rubin's Kafka form, the default for Rubin)."""
    out = Path(out)
    fmt = fmt or ("container" if info.family == "ztf" else "confluent")
    prefix = "ztf_public" if info.family == "ztf" else "rubin"
    nights: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        nights.setdefault(_night_label(_alert_mjd(r)), []).append(r)
    written = []
    for night, recs in nights.items():
        if layout == "night":
            if fmt == "confluent":
                raise ValueError("a Confluent payload holds one alert: use layout 'alert'")
            path = out / f"{prefix}_{night}.avro"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(container_payload(recs, info))
            written.append(path)
            continue
        folder = out / f"{prefix}_{night}"
        folder.mkdir(parents=True, exist_ok=True)
        for r in recs:
            if fmt == "confluent":
                path = folder / f"{_alert_name(r)}.bin"
                path.write_bytes(confluent_payload(r, info))
            else:
                path = folder / f"{_alert_name(r)}.avro"
                path.write_bytes(container_payload([r], info))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ingest.alerts.generate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--family", choices=["ztf", "rubin"], required=True)
    ap.add_argument("--objects", type=int, default=100)
    ap.add_argument("--nights", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schema-version", default=None, help="default: the newest registered version")
    ap.add_argument("--layout", choices=["alert", "night"], default="alert")
    ap.add_argument("--format", choices=["container", "confluent"], default=None)
    ap.add_argument("--history-days", type=float, default=30.0)
    ap.add_argument("--fields", type=int, default=0, help="objects in N telescope fields visited in turn "
                    "(0: all-sky, scattered times)")  # fmt: skip
    args = ap.parse_args(argv)
    info, records = build_alerts(
        args.family,
        args.objects,
        args.nights,
        seed=args.seed,
        version=args.schema_version,
        history_days=args.history_days,
        fields=args.fields,
    )
    files = write_alerts(records, info, args.out, args.layout, args.format)
    json.dump(
        {
            "family": info.family,
            "schema_version": info.version,
            "alerts": len(records),
            "files": len(files),
            "out": str(Path(args.out).resolve()),
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
