"""Decoded alerts -> the lake's row shapes (pyarrow tables): the contract with the alert-table writer.

Tables (column names and types are fixed here; see the ``*_SCHEMA`` constants):

- ``detections``: one row per detection — the alert's own (``is_history`` false) and the earlier ones it
  repeats (ZTF ``prv_candidates`` with a candid, Rubin ``prvDiaSources``). Within a batch each
  ``detection_id`` appears once: the alert's own row wins over history copies, then the lowest alert_id.
- ``upper_limits``: history entries without a position (ZTF ``prv_candidates`` with null candid; Rubin 7.x
  ``prvDiaNondetectionLimits``) — not detections, but Lasair draws them in light curves.
- ``forced``: forced photometry at the object position (ZTF 4.x ``fp_hists``, Rubin ``prvDiaForcedSources``).
- ``alerts``: one row per alert with the object's ids and context (ZTF ssdistnr/sgscore1/distpsnr1...,
  Rubin's diaObject summary).

Photometry: magnitudes are AB; fluxes are difference-image fluxes in nJy (zero point 31.4 = AB mag of 1 nJy).
ZTF's ``magpsf`` is the magnitude of |difference flux|, its sign is ``isdiffpos``; Rubin's ``psfFlux`` is
signed, and its magnitude is null where the flux is not positive.

Input is the columnar output of :class:`~ingest.alerts.packets.BatchDecoder` (one table per family for the
alerts, one per history array), so everything here works on whole columns: no per-alert Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.alerts.packets import BatchResult, DecodedTables

JD_TO_MJD = 2400000.5
ZP_NJY = 31.4
POGSON = 2.5 / math.log(10.0)  # 1.0857...: d(mag) = POGSON * d(flux) / flux
ZTF_BANDS = np.array([None, "g", "r", "i"], dtype=object)
ZTF_FP_NULL = -99999.0  # ZTF's sentinel for a missing forced-photometry flux

DETECTIONS_SCHEMA = pa.schema(
    [
        ("detection_id", pa.int64()),
        ("object_id", pa.string()),
        ("alert_id", pa.int64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("mjd", pa.float64()),
        ("band", pa.string()),
        ("mag", pa.float32()),
        ("mag_err", pa.float32()),
        ("flux", pa.float32()),
        ("flux_err", pa.float32()),
        ("is_positive", pa.bool_()),
        ("reliability", pa.float32()),
        ("is_history", pa.bool_()),
        ("survey", pa.string()),
        ("schema_version", pa.string()),
    ]
)
UPPER_LIMITS_SCHEMA = pa.schema(
    [
        ("object_id", pa.string()),
        ("mjd", pa.float64()),
        ("band", pa.string()),
        ("limiting_mag", pa.float32()),
    ]
)
FORCED_SCHEMA = pa.schema(
    [
        ("object_id", pa.string()),
        ("mjd", pa.float64()),
        ("band", pa.string()),
        ("flux", pa.float32()),
        ("flux_err", pa.float32()),
        ("survey", pa.string()),
    ]
)
ALERTS_SCHEMA = pa.schema(
    [
        ("alert_id", pa.int64()),
        ("object_id", pa.string()),
        ("detection_id", pa.int64()),
        ("mjd", pa.float64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("band", pa.string()),
        ("mag", pa.float32()),
        ("mag_err", pa.float32()),
        ("flux", pa.float32()),
        ("is_positive", pa.bool_()),
        ("reliability", pa.float32()),
        ("n_history", pa.int32()),
        ("survey", pa.string()),
        ("schema_version", pa.string()),
        # ZTF context (null for Rubin)
        ("ndethist", pa.int32()),
        ("ncovhist", pa.int32()),
        ("jdstarthist_mjd", pa.float64()),
        ("ssdistnr", pa.float32()),
        ("ssnamenr", pa.string()),
        ("sgscore1", pa.float32()),
        ("distpsnr1", pa.float32()),
        # Rubin context (null for ZTF)
        ("dia_object_id", pa.int64()),
        ("ss_object_id", pa.int64()),
        ("dia_object_ra", pa.float64()),
        ("dia_object_dec", pa.float64()),
        ("n_dia_sources", pa.int32()),
        ("first_dia_source_mjd", pa.float64()),
    ]
)


@dataclass
class AlertTables:
    """The rows of one batch of alerts, as four pyarrow tables."""

    detections: pa.Table
    upper_limits: pa.Table
    forced: pa.Table
    alerts: pa.Table


def _col(t: pa.Table | None, name: str, typ: pa.DataType, n: int | None = None) -> pa.Array:
    """A column by path, or all nulls when no writer schema in the batch had that field."""
    if t is not None and name in t.column_names:
        c = t[name].combine_chunks() if isinstance(t[name], pa.ChunkedArray) else t[name]
        return c.cast(typ) if c.type != typ else c
    return pa.nulls(t.num_rows if t is not None else (n or 0), typ)


def _np(a: pa.Array, fill: float = np.nan) -> np.ndarray:
    return np.array(a.cast(pa.float64()).fill_null(fill), dtype=np.float64)


def _f32(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.float32), pa.float32(), mask=np.isnan(values))


def _f64a(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def _mag_from_flux(flux: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AB mag and error of a flux in nJy; NaN where the flux is not positive (or missing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        good = flux > 0
        safe = np.where(good, flux, 1.0)
        mag = np.where(good, ZP_NJY - 2.5 * np.log10(safe), np.nan)
        mag_err = np.where(good, POGSON * err / safe, np.nan)
    return mag, mag_err


def _flux_from_mag(
    mag: np.ndarray, mag_err: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    amp = 10.0 ** (-0.4 * (mag - ZP_NJY))
    return np.where(positive, amp, -amp), amp * mag_err / POGSON


def _ztf_bands(fid: pa.Array) -> pa.Array:
    f = np.asarray(fid.fill_null(0), dtype=np.int64)
    return pa.array(ZTF_BANDS[np.clip(f, 0, 3)], pa.string())


def _parent_rows(alerts: pa.Table, child: pa.Table) -> np.ndarray:
    """Row of the alert table each child row belongs to (both carry the packet index ``__record``)."""
    rec = np.asarray(alerts["__record"], dtype=np.int64)
    where = np.full(int(rec.max()) + 1 if len(rec) else 1, -1, dtype=np.int64)
    where[rec] = np.arange(len(rec))
    return where[np.asarray(child["__record"], dtype=np.int64)]


def _detections(
    ids,
    objects,
    alert_ids,
    ra,
    dec,
    mjd,
    band,
    mag,
    mag_err,
    flux,
    flux_err,
    positive,
    reliability,
    history: bool,
    survey: str,
    versions,
) -> pa.Table:
    n = len(ids)
    pos = (
        pa.array(positive, pa.bool_(), mask=np.isnan(flux)) if isinstance(positive, np.ndarray) else positive
    )
    return pa.table(
        {
            "detection_id": ids,
            "object_id": objects,
            "alert_id": alert_ids,
            "ra": ra,
            "dec": dec,
            "mjd": _f64a(mjd),
            "band": band,
            "mag": _f32(mag),
            "mag_err": _f32(mag_err),
            "flux": _f32(flux),
            "flux_err": _f32(flux_err),
            "is_positive": pos,
            "reliability": reliability,
            "is_history": pa.array(np.full(n, history), pa.bool_()),
            "survey": pa.array([survey] * n, pa.string()),
            "schema_version": versions,
        },
        schema=DETECTIONS_SCHEMA,
    )


def _ztf(t: DecodedTables) -> tuple[list[pa.Table], list[pa.Table], list[pa.Table], pa.Table]:
    a = t.tables[""]
    n = a.num_rows
    versions = t.versions.cast(pa.string())
    own = _col(a, "candidate.candid", pa.int64())
    oid = _col(a, "objectId", pa.string())
    alert_id = _col(a, "candid", pa.int64())
    mag = _np(_col(a, "candidate.magpsf", pa.float64()))
    mag_err = _np(_col(a, "candidate.sigmapsf", pa.float64()))
    positive = np.asarray(
        pc.fill_null(
            pc.is_in(_col(a, "candidate.isdiffpos", pa.string()), value_set=pa.array(["t", "1"])), False
        )
    )
    flux, flux_err = _flux_from_mag(mag, mag_err, positive)
    rel = pc.coalesce(_col(a, "candidate.drb", pa.float32()), _col(a, "candidate.rb", pa.float32()))
    mjd = _np(_col(a, "candidate.jd", pa.float64())) - JD_TO_MJD
    band = _ztf_bands(_col(a, "candidate.fid", pa.int64()))
    ra, dec = _col(a, "candidate.ra", pa.float64()), _col(a, "candidate.dec", pa.float64())
    dets = [
        _detections(
            own,
            oid,
            alert_id,
            ra,
            dec,
            mjd,
            band,
            mag,
            mag_err,
            flux,
            flux_err,
            positive,
            rel,
            False,
            "ztf",
            versions,
        )
    ]
    uls, forced = [], []
    n_hist = np.zeros(n, dtype=np.int32)
    prv = t.tables.get("prv_candidates")
    if prv is not None and prv.num_rows:
        parent = _parent_rows(a, prv)
        cand = _col(prv, "candid", pa.int64())
        located = pc.and_(
            pc.and_(pc.is_valid(cand), pc.is_valid(_col(prv, "ra", pa.float64()))),
            pc.and_(
                pc.is_valid(_col(prv, "dec", pa.float64())), pc.is_valid(_col(prv, "magpsf", pa.float64()))
            ),
        )
        located = np.asarray(located)
        own_np = np.asarray(own.fill_null(-1))[parent]
        det = located & (np.asarray(cand.fill_null(-2)) != own_np)
        ul = ~located
        idx = np.flatnonzero(det)
        np.add.at(n_hist, parent[idx], 1)
        pm = _np(_col(prv, "magpsf", pa.float64()))[idx]
        pe = _np(_col(prv, "sigmapsf", pa.float64()))[idx]
        ppos = np.asarray(
            pc.fill_null(pc.is_in(_col(prv, "isdiffpos", pa.string()), value_set=pa.array(["t", "1"])), False)
        )[idx]
        pf, pfe = _flux_from_mag(pm, pe, ppos)
        take = pa.array(idx, pa.int64())
        ptake = pa.array(parent[idx], pa.int64())
        dets.append(
            _detections(
                cand.take(take),
                oid.take(ptake),
                alert_id.take(ptake),
                _col(prv, "ra", pa.float64()).take(take),
                _col(prv, "dec", pa.float64()).take(take),
                _np(_col(prv, "jd", pa.float64()))[idx] - JD_TO_MJD,
                _ztf_bands(_col(prv, "fid", pa.int64())).take(take),
                pm,
                pe,
                pf,
                pfe,
                ppos,
                _col(prv, "rb", pa.float32()).take(take),
                True,
                "ztf",
                versions.take(ptake),
            )
        )
        ui = np.flatnonzero(ul)
        utake = pa.array(ui, pa.int64())
        uls.append(
            pa.table(
                {
                    "object_id": oid.take(pa.array(parent[ui], pa.int64())),
                    "mjd": _f64a(_np(_col(prv, "jd", pa.float64()))[ui] - JD_TO_MJD),
                    "band": _ztf_bands(_col(prv, "fid", pa.int64())).take(utake),
                    "limiting_mag": _col(prv, "diffmaglim", pa.float32()).take(utake),
                },
                schema=UPPER_LIMITS_SCHEMA,
            )
        )
    fp = t.tables.get("fp_hists")
    if fp is not None and fp.num_rows:
        parent = pa.array(_parent_rows(a, fp), pa.int64())
        raw = _np(_col(fp, "forcediffimflux", pa.float64()))
        unc = _np(_col(fp, "forcediffimfluxunc", pa.float64()))
        raw[raw <= ZTF_FP_NULL] = np.nan
        unc[unc <= ZTF_FP_NULL] = np.nan
        scale = 10.0 ** (0.4 * (ZP_NJY - _np(_col(fp, "magzpsci", pa.float64()))))
        forced.append(
            pa.table(
                {
                    "object_id": oid.take(parent),
                    "mjd": _f64a(_np(_col(fp, "jd", pa.float64())) - JD_TO_MJD),
                    "band": _ztf_bands(_col(fp, "fid", pa.int64())),
                    "flux": _f32(raw * scale),
                    "flux_err": _f32(unc * scale),
                    "survey": pa.array(["ztf"] * fp.num_rows, pa.string()),
                },
                schema=FORCED_SCHEMA,
            )
        )
    ssd = _np(_col(a, "candidate.ssdistnr", pa.float64()))
    ssd[ssd < 0] = np.nan  # ZTF writes -999 for "no known Solar System object within 30''"
    ssn = _col(a, "candidate.ssnamenr", pa.string())
    ssn = pc.if_else(pc.is_in(ssn, value_set=pa.array(["", "null"])), pa.scalar(None, pa.string()), ssn)
    alerts = _alerts(
        n,
        alert_id,
        oid,
        own,
        mjd,
        ra,
        dec,
        band,
        mag,
        mag_err,
        flux,
        positive,
        rel,
        n_hist,
        "ztf",
        versions,
        {
            "ndethist": _col(a, "candidate.ndethist", pa.int32()),
            "ncovhist": _col(a, "candidate.ncovhist", pa.int32()),
            "jdstarthist_mjd": _f64a(_np(_col(a, "candidate.jdstarthist", pa.float64())) - JD_TO_MJD),
            "ssdistnr": _f32(ssd),
            "ssnamenr": ssn,
            "sgscore1": _col(a, "candidate.sgscore1", pa.float32()),
            "distpsnr1": _col(a, "candidate.distpsnr1", pa.float32()),
        },
    )
    return dets, uls, forced, alerts


def _rubin_object_ids(t: pa.Table, prefix: str) -> pa.Array:
    """``str(diaObjectId)``; Solar System sources (no diaObject) are ``'ss<ssObjectId>'``."""
    dia = _col(t, f"{prefix}diaObjectId", pa.int64()).cast(pa.string())
    ss = pc.binary_join_element_wise(
        pa.scalar("ss"), _col(t, f"{prefix}ssObjectId", pa.int64()).cast(pa.string()), ""
    )
    return pc.coalesce(dia, ss)


def _rubin(t: DecodedTables) -> tuple[list[pa.Table], list[pa.Table], list[pa.Table], pa.Table]:
    a = t.tables[""]
    n = a.num_rows
    versions = t.versions.cast(pa.string())
    own = _col(a, "diaSource.diaSourceId", pa.int64())
    alert_id = pc.coalesce(_col(a, "alertId", pa.int64()), _col(a, "diaSourceId", pa.int64()), own)
    oid = _rubin_object_ids(a, "diaSource.")

    def photometry(tab: pa.Table, prefix: str, rows: np.ndarray | None = None):
        flux = _np(_col(tab, f"{prefix}psfFlux", pa.float64()))
        err = _np(_col(tab, f"{prefix}psfFluxErr", pa.float64()))
        if rows is not None:
            flux, err = flux[rows], err[rows]
        mag, mag_err = _mag_from_flux(flux, err)
        return flux, err, mag, mag_err, flux > 0

    flux, flux_err, mag, mag_err, positive = photometry(a, "diaSource.")
    mjd = _np(_col(a, "diaSource.midpointMjdTai", pa.float64()))
    ra, dec = _col(a, "diaSource.ra", pa.float64()), _col(a, "diaSource.dec", pa.float64())
    band = _col(a, "diaSource.band", pa.string())
    rel = _col(a, "diaSource.reliability", pa.float32())
    dets = [
        _detections(
            own,
            oid,
            alert_id,
            ra,
            dec,
            mjd,
            band,
            mag,
            mag_err,
            flux,
            flux_err,
            positive,
            rel,
            False,
            "rubin",
            versions,
        )
    ]
    uls, forced = [], []
    n_hist = np.zeros(n, dtype=np.int32)
    prv = t.tables.get("prvDiaSources")
    if prv is not None and prv.num_rows:
        parent = _parent_rows(a, prv)
        ids = _col(prv, "diaSourceId", pa.int64())
        idx = np.flatnonzero(np.asarray(ids.fill_null(-2)) != np.asarray(own.fill_null(-1))[parent])
        np.add.at(n_hist, parent[idx], 1)
        take, ptake = pa.array(idx, pa.int64()), pa.array(parent[idx], pa.int64())
        pf, pfe, pm, pme, ppos = photometry(prv, "", idx)
        pobj = pc.coalesce(_rubin_object_ids(prv, "").take(take), oid.take(ptake))
        dets.append(
            _detections(
                ids.take(take),
                pobj,
                alert_id.take(ptake),
                _col(prv, "ra", pa.float64()).take(take),
                _col(prv, "dec", pa.float64()).take(take),
                _np(_col(prv, "midpointMjdTai", pa.float64()))[idx],
                _col(prv, "band", pa.string()).take(take),
                pm,
                pme,
                pf,
                pfe,
                ppos,
                _col(prv, "reliability", pa.float32()).take(take),
                True,
                "rubin",
                versions.take(ptake),
            )
        )
    nd = t.tables.get("prvDiaNondetectionLimits")
    if nd is not None and nd.num_rows:
        parent = pa.array(_parent_rows(a, nd), pa.int64())
        noise = _np(_col(nd, "diaNoise", pa.float64()))
        with np.errstate(divide="ignore", invalid="ignore"):  # 1-sigma noise (nJy) -> 5-sigma limit
            lim = np.where(noise > 0, ZP_NJY - 2.5 * np.log10(5.0 * noise), np.nan)
        uls.append(
            pa.table(
                {
                    "object_id": oid.take(parent),
                    "mjd": _f64a(_np(_col(nd, "midpointMjdTai", pa.float64()))),
                    "band": _col(nd, "band", pa.string()),
                    "limiting_mag": _f32(lim),
                },
                schema=UPPER_LIMITS_SCHEMA,
            )
        )
    fs = t.tables.get("prvDiaForcedSources")
    if fs is not None and fs.num_rows:
        parent = pa.array(_parent_rows(a, fs), pa.int64())
        fobj = pc.coalesce(_col(fs, "diaObjectId", pa.int64()).cast(pa.string()), oid.take(parent))
        forced.append(
            pa.table(
                {
                    "object_id": fobj,
                    "mjd": _f64a(_np(_col(fs, "midpointMjdTai", pa.float64()))),
                    "band": _col(fs, "band", pa.string()),
                    "flux": _f32(_np(_col(fs, "psfFlux", pa.float64()))),
                    "flux_err": _f32(_np(_col(fs, "psfFluxErr", pa.float64()))),
                    "survey": pa.array(["rubin"] * fs.num_rows, pa.string()),
                },
                schema=FORCED_SCHEMA,
            )
        )
    ss_id = pc.coalesce(
        _col(a, "diaSource.ssObjectId", pa.int64()),
        _col(a, "ssObject.ssObjectId", pa.int64()),
        _col(a, "ssSource.ssObjectId", pa.int64()),
    )
    alerts = _alerts(
        n,
        alert_id,
        oid,
        own,
        mjd,
        ra,
        dec,
        band,
        mag,
        mag_err,
        flux,
        positive,
        rel,
        n_hist,
        "rubin",
        versions,
        {
            "dia_object_id": _col(a, "diaSource.diaObjectId", pa.int64()),
            "ss_object_id": ss_id,
            "dia_object_ra": _col(a, "diaObject.ra", pa.float64()),
            "dia_object_dec": _col(a, "diaObject.dec", pa.float64()),
            "n_dia_sources": _col(a, "diaObject.nDiaSources", pa.int32()),
            "first_dia_source_mjd": _col(a, "diaObject.firstDiaSourceMjdTai", pa.float64()),
        },
    )
    return dets, uls, forced, alerts


def _alerts(
    n,
    alert_id,
    oid,
    own,
    mjd,
    ra,
    dec,
    band,
    mag,
    mag_err,
    flux,
    positive,
    rel,
    n_hist,
    survey,
    versions,
    context: dict[str, pa.Array],
) -> pa.Table:
    cols: dict[str, Any] = {
        "alert_id": alert_id,
        "object_id": oid,
        "detection_id": own,
        "mjd": _f64a(mjd),
        "ra": ra,
        "dec": dec,
        "band": band,
        "mag": _f32(mag),
        "mag_err": _f32(mag_err),
        "flux": _f32(flux),
        "is_positive": pa.array(positive, pa.bool_(), mask=np.isnan(flux)),
        "reliability": rel,
        "n_history": pa.array(n_hist, pa.int32()),
        "survey": pa.array([survey] * n, pa.string()),
        "schema_version": versions,
    }
    for f in ALERTS_SCHEMA:
        if f.name not in cols:
            cols[f.name] = context[f.name].cast(f.type) if f.name in context else pa.nulls(n, f.type)
    return pa.table(cols, schema=ALERTS_SCHEMA)


def _dedupe_detections(t: pa.Table) -> pa.Table:
    """One row per detection_id: the alert's own row first, then the lowest alert_id (deterministic)."""
    if t.num_rows < 2:
        return t
    ids = np.asarray(t["detection_id"].fill_null(-1), dtype=np.int64)
    hist = np.asarray(t["is_history"], dtype=np.int8)
    alert = np.asarray(t["alert_id"].fill_null(-1), dtype=np.int64)
    order = np.lexsort((alert, hist, ids))
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    return t.take(pa.array(np.sort(order[first]), pa.int64()))


def _dedupe_on(t: pa.Table, keys: list[str]) -> pa.Table:
    if t.num_rows < 2:
        return t
    t = t.append_column("__i", pa.array(np.arange(t.num_rows), pa.int64()))
    first = t.group_by(keys, use_threads=False).aggregate([("__i", "min")])["__i_min"]
    return t.take(pa.array(np.sort(np.asarray(first)), pa.int64())).drop_columns(["__i"])


def normalise(
    decoded: BatchResult | dict[str, DecodedTables] | DecodedTables, *, dedupe: bool = True
) -> AlertTables:
    """Rows of the four tables for a decoded batch (ZTF and Rubin may be mixed).

    With ``dedupe`` (the default) each detection, upper limit and forced point appears once per batch even
    when several alerts of the batch repeat it in their histories."""
    if isinstance(decoded, BatchResult):
        parts = list(decoded.decoded.values())
    elif isinstance(decoded, DecodedTables):
        parts = [decoded]
    else:
        parts = list(decoded.values())
    dets, uls, forced, alerts = [], [], [], []
    for t in parts:
        d, u, f, a = (_ztf if t.family == "ztf" else _rubin)(t)
        dets += d
        uls += u
        forced += f
        alerts.append(a)
    detections = pa.concat_tables(dets) if dets else DETECTIONS_SCHEMA.empty_table()
    upper = pa.concat_tables(uls) if uls else UPPER_LIMITS_SCHEMA.empty_table()
    fp = pa.concat_tables(forced) if forced else FORCED_SCHEMA.empty_table()
    al = pa.concat_tables(alerts) if alerts else ALERTS_SCHEMA.empty_table()
    if dedupe:
        detections = _dedupe_detections(detections)
        upper = _dedupe_on(upper, ["object_id", "mjd", "band"])
        fp = _dedupe_on(fp, ["object_id", "mjd", "band"])
    return AlertTables(
        detections.combine_chunks(), upper.combine_chunks(), fp.combine_chunks(), al.combine_chunks()
    )
