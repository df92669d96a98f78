"""Alert object pages (HTML with the light curve), recent objects, JSON, and annotations (Lasair's pages).

Everything is read through the query engine with the caller's data rights, from the alert tables the
alert ingest commits (`<stream>.objects`, `<stream>.detections`, `<stream>.upper_limits`), so a page shows
exactly what ADQL would. The context (nearest sources of the context catalogs and a Sherlock-style
classification, `dac_lake.alerts.context`) is the one the ingest stored when the object was first seen,
less the rows of catalogs the caller may not read (the classification is then recomputed from what the
caller sees); for an object never matched, it is computed at page time with cone searches.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api.formats import TapError
from api.pages.annotations import Annotation, AnnotationError, annotations_of, post_annotation
from api.pages.lightcurve import Point, lightcurve_svg
from api.service import DacService, as_tap_error
from dac_lake.alerts.context import classify, context_of, live_context

log = logging.getLogger(__name__)
_ID = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")
#: what a context match shows (the object's own columns are on the page already)
_MATCH_KEYS = ("catalog", "source_id", "ra", "dec", "separation_arcsec", "rank", "source_type", "fields")


def _lit(value: str) -> str:
    """An ADQL string literal of a validated id."""
    return "'" + value.replace("'", "''") + "'"


def _check_ids(stream: str, object_id: str | None = None) -> None:
    if not _ID.match(stream) or (object_id is not None and not _ID.match(object_id)):
        raise TapError("stream and object ids are letters, digits and _ . : + - (at most 128)", 400)


def _rows(table) -> list[dict[str, Any]]:
    out = []
    for row in table.to_pylist():
        out.append(
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        )
    return out


def object_data(service: DacService, groups: frozenset[str], stream: str, object_id: str) -> dict[str, Any]:
    """The object, its detections and upper limits, context matches and annotations (one dict)."""
    engine = service.engine(groups)
    tables = {t.meta.name for t in engine.registry.lake_tables() if t.meta.schema.lower() == stream.lower()}
    if "objects" not in tables:
        raise TapError(f"no alert stream {stream!r}", 404)
    oid = _lit(object_id)
    obj = engine.adql(f'SELECT * FROM "{stream}".objects WHERE object_id = {oid}', maxrec=1).table
    if obj.num_rows == 0:
        raise TapError(f"no object {object_id!r} in stream {stream!r}", 404)
    det = engine.adql(
        "SELECT detection_id, alert_id, mjd, band, mag, mag_err, flux, flux_err, is_positive, reliability, "
        "ra, dec "
        f'FROM "{stream}".detections WHERE object_id = {oid} ORDER BY mjd',
        maxrec=100_000,
    ).table
    limits = None
    if "upper_limits" in tables:
        limits = engine.adql(
            f'SELECT mjd, band, limiting_mag FROM "{stream}".upper_limits '
            f"WHERE object_id = {oid} ORDER BY mjd",
            maxrec=100_000,
        ).table
    info = _rows(obj)[0]
    return {
        "stream": stream,
        "object": info,
        "detections": _rows(det),
        "upper_limits": _rows(limits) if limits is not None else [],
        "context": _context_or_note(service, groups, stream, object_id, info["ra"], info["dec"]),
        "annotations": [a.__dict__ for a in annotations_of(service.lake.storage, stream, object_id)],
    }


def _context_or_note(
    service: DacService, groups: frozenset[str], stream: str, object_id: str, ra: float, dec: float
) -> dict[str, Any]:
    """The context, or a note that it is unavailable: the light curve must not be lost to a context
    catalog that cannot be read right now (a cone search timing out, a damaged context file)."""
    try:
        return object_context(service, groups, stream, object_id, ra, dec)
    except Exception as exc:
        log.warning("%s/%s: context unavailable: %s", stream, object_id, exc, exc_info=True)
        return {
            "source": "unavailable",
            "seq": None,
            "classification": None,
            "matches": [],
            "error": str(exc),
        }


def object_context(
    service: DacService, groups: frozenset[str], stream: str, object_id: str, ra: float, dec: float
) -> dict[str, Any]:
    """{"source": "stored" | "live", "seq", "classification", "matches": [...]}: the stored context of the
    object (rows of catalogs the caller cannot read removed, the classification recomputed if any were),
    else one computed now with cone searches (`live_context`) with the caller's rights."""
    engine = service.engine(groups)
    rows = context_of(service.lake.storage, stream, object_id, ra, dec)
    source, seq = "stored", None
    if rows:
        seq = rows[0]["seq"]
        visible = {t.meta.schema for t in engine.registry.lake_tables()}
        shown = [r for r in rows if r["catalog"] is None or r["catalog"] in visible]
        classification = rows[0]["classification"] if len(shown) == len(rows) else classify(shown)
        rows = shown
    else:
        source = "live"
        rows = live_context(engine, object_id, ra, dec)
        classification = rows[0]["classification"] if rows else "orphan"
    matches = [
        {k: r.get(k) for k in _MATCH_KEYS}
        for r in sorted(
            (r for r in rows if r["catalog"] is not None),
            key=lambda r: (r["separation_arcsec"], r["catalog"]),
        )
    ]
    return {"source": source, "seq": seq, "classification": classification, "matches": matches}


def make_alerts_router(service: DacService, identity: Callable) -> APIRouter:
    router = APIRouter()

    @router.get("/alerts/{stream}/objects/{object_id}.json", summary="an alert object as JSON")
    async def object_json(stream: str, object_id: str, who=Depends(identity)) -> Response:
        try:
            _check_ids(stream, object_id)
            data = await run_in_threadpool(object_data, service, who.groups, stream, object_id)
        except Exception as exc:
            err = as_tap_error(exc)
            return JSONResponse({"error": err.message}, status_code=err.http_status)
        return JSONResponse(data)

    @router.get("/alerts/{stream}/objects/{object_id}", response_class=HTMLResponse, summary="object page")
    async def object_page(stream: str, object_id: str, request: Request, who=Depends(identity)) -> Response:
        try:
            _check_ids(stream, object_id)
            data = await run_in_threadpool(object_data, service, who.groups, stream, object_id)
        except Exception as exc:
            err = as_tap_error(exc)
            return HTMLResponse(
                _page("error", f"<p class='error'>{html.escape(err.message)}</p>"), err.http_status
            )
        return HTMLResponse(render_object_page(data))

    @router.get("/alerts/{stream}/objects", response_class=HTMLResponse, summary="recent objects")
    async def recent(
        stream: str,
        request: Request,
        min_detections: int = 1,
        band: str | None = None,
        max_mag: float | None = None,
        limit: int = 100,
        format: str = "html",
        who=Depends(identity),
    ) -> Response:
        try:
            _check_ids(stream)
            rows = await run_in_threadpool(
                recent_objects,
                service,
                who.groups,
                stream,
                min_detections,
                band,
                max_mag,
                min(max(limit, 1), 1000),
            )
        except Exception as exc:
            err = as_tap_error(exc)
            return HTMLResponse(
                _page("error", f"<p class='error'>{html.escape(err.message)}</p>"), err.http_status
            )
        if format == "json":
            return JSONResponse(rows)
        return HTMLResponse(render_recent_page(stream, rows, min_detections, band, max_mag))

    @router.post("/alerts/{stream}/objects/{object_id}/annotations", summary="annotate an object")
    async def annotate(stream: str, object_id: str, request: Request, who=Depends(identity)) -> Response:
        if who.name is None:
            return JSONResponse(
                {"error": "annotations need an authenticated classifier (a bearer token)"}, 401
            )
        try:
            _check_ids(stream, object_id)
            body = await request.json()
            annotation = Annotation.from_request(object_id, body, who.name)
            await run_in_threadpool(object_data_exists, service, who.groups, stream, object_id)
            path = await run_in_threadpool(post_annotation, service.lake.storage, stream, annotation)
        except AnnotationError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        except Exception as exc:
            err = as_tap_error(exc)
            return JSONResponse({"error": err.message}, status_code=err.http_status)
        return JSONResponse({"id": annotation.id, "path": path, "time": annotation.time}, status_code=201)

    return router


def object_data_exists(service: DacService, groups: frozenset[str], stream: str, object_id: str) -> None:
    engine = service.engine(groups)
    if not any(
        t.meta.schema.lower() == stream.lower() and t.meta.name == "objects"
        for t in engine.registry.lake_tables()
    ):
        raise TapError(f"no alert stream {stream!r}", 404)
    found = engine.adql(
        f'SELECT object_id FROM "{stream}".objects WHERE object_id = {_lit(object_id)}', maxrec=1
    )
    if found.table.num_rows == 0:
        raise TapError(f"no object {object_id!r} in stream {stream!r}", 404)


def recent_objects(
    service: DacService,
    groups: frozenset[str],
    stream: str,
    min_detections: int,
    band: str | None,
    max_mag: float | None,
    limit: int,
) -> list[dict[str, Any]]:
    where = [f"n_detections >= {int(min_detections)}"]
    if band is not None:
        if band not in "ugrizy" or len(band) != 1:
            raise TapError("band: one of u g r i z y", 400)
        where.append(f"mag_{band}_latest IS NOT NULL")
        if max_mag is not None:
            where.append(f"mag_{band}_latest <= {float(max_mag)!r}")
    q = (
        f"SELECT TOP {int(limit)} object_id, ra, dec, first_mjd, last_mjd, n_detections, n_bands "
        f'FROM "{stream}".objects WHERE {" AND ".join(where)} ORDER BY last_mjd DESC'
    )
    return _rows(service.engine(groups).adql(q, maxrec=limit).table)


# ---------------------------------------------------------------------------------------------- HTML
_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1100px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}.error{color:#b00}
h1{font-size:1.4em}.meta td:first-child{text-align:left;font-weight:bold}"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[str], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table class='{css}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_object_page(data: dict[str, Any]) -> str:
    obj = data["object"]
    oid = str(obj["object_id"])
    points = [
        Point(d["mjd"], d["band"], d["mag"], d["mag_err"])
        for d in data["detections"]
        if d.get("mag") is not None
    ] + [Point(u["mjd"], u["band"], u["limiting_mag"], upper_limit=True) for u in data["upper_limits"]]
    svg = lightcurve_svg(points, title=f"{oid}: {len(data['detections'])} detections")
    meta = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in obj.items() if v is not None
    )
    context = render_context(data["context"])
    annotations = (
        _table(data["annotations"], ["time", "classifier", "classification", "probability", "url", "author"])
        if data["annotations"]
        else "<p>No annotations yet.</p>"
    )
    body = (
        f"<h1>{html.escape(oid)}</h1>"
        f"<p>Stream <b>{html.escape(data['stream'])}</b> · "
        f"RA {obj['ra']:.6f}, Dec {obj['dec']:+.6f} (ICRS, deg) · "
        f"<a href='{html.escape(oid)}.json'>JSON</a></p>"
        f"<div id='lightcurve'>{svg}</div>"
        f"<h2>Object</h2><table class='meta'>{meta}</table>"
        f"<h2>Context</h2>{context}"
        f"<h2>Annotations</h2>{annotations}"
        f"<h2>Detections</h2>"
        + _table(data["detections"], ["mjd", "band", "mag", "mag_err", "flux", "reliability", "detection_id"])
    )
    return _page(f"{oid} - {data['stream']}", body)


def render_context(ctx: dict[str, Any]) -> str:
    """The classification, where it comes from, and the matches nearest first."""
    if ctx["source"] == "unavailable":
        return f"<p class='error'>Context unavailable: {html.escape(ctx.get('error') or '')}</p>"
    origin = f"matched when first seen (batch #{ctx['seq']})" if ctx["source"] == "stored" else "computed now"
    head = (
        f"<p class='context'>Classification: <b class='classification'>{html.escape(ctx['classification'])}"
        f"</b> <small>({html.escape(origin)})</small></p>"
    )
    if not ctx["matches"]:
        return head + "<p>No source of the context catalogs within their match radii.</p>"
    rows = [
        {
            "catalog": m["catalog"],
            "source_id": m["source_id"],
            "type": m["source_type"],
            "separation (arcsec)": f"{m['separation_arcsec']:.2f}",
            "ra": m["ra"],
            "dec": m["dec"],
            "recorded": ", ".join(f"{k}={_fmt(v)}" for k, v in (m.get("fields") or {}).items()),
        }
        for m in ctx["matches"]
    ]
    columns = ["catalog", "source_id", "type", "separation (arcsec)", "ra", "dec", "recorded"]
    return head + _table(rows, columns, css="context-matches")


def render_recent_page(
    stream: str, rows: list[dict[str, Any]], min_detections: int, band: str | None, max_mag: float | None
) -> str:
    for r in rows:
        r["object_id"] = str(r["object_id"])
    links = "".join(
        f"<tr><td><a href='objects/{html.escape(r['object_id'])}'>{html.escape(r['object_id'])}</a></td>"
        + "".join(
            f"<td>{_fmt(r.get(c))}</td>"
            for c in ("ra", "dec", "first_mjd", "last_mjd", "n_detections", "n_bands")
        )
        + "</tr>"
        for r in rows
    )
    form = (
        "<form method='get'>min detections <input name='min_detections' size='3' "
        f"value='{min_detections}'> band <input name='band' size='2' value='{html.escape(band or '')}'> "
        f"max mag <input name='max_mag' size='5' value='{'' if max_mag is None else max_mag}'> "
        "<button>filter</button></form>"
    )
    head = "".join(
        f"<th>{c}</th>" for c in ("object", "ra", "dec", "first_mjd", "last_mjd", "n_det", "n_bands")
    )
    return _page(
        f"recent objects - {stream}",
        f"<h1>Recent objects in {html.escape(stream)}</h1>{form}<p>{len(rows)} objects</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{links}</tbody></table>",
    )
