"""`/tap/tables`, `/tap/capabilities`, `/tap/availability`, `/tap/examples` (VOSI 1.1, DALI examples)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.formats import TapError, capability_formats
from api.routers.common import error_response
from api.service import DacService
from api.vosi import availability_xml, capabilities_xml, examples_xhtml, table_xml, tableset_xml

XML = "text/xml"

#: a small VOTable served by the service itself, so the upload example runs anywhere (UPLOAD by URL)
SAMPLE_UPLOAD_PATH = "/tap/examples/sample-upload.xml"


def base_url(service: DacService, request: Request) -> str:
    return (service.settings.public_url or str(request.base_url)).rstrip("/")


def make_vosi_router(service: DacService, identity: Callable) -> APIRouter:
    router = APIRouter()

    @router.get("/tap/tables", summary="VOSI tables (VODataService 1.1)")
    async def tables(request: Request, detail: str | None = None, who=Depends(identity)) -> Response:
        schemas = await run_in_threadpool(service.schemas, who.groups)
        full = (detail or request.query_params.get("DETAIL") or "max").lower() != "min"
        return Response(tableset_xml(schemas, detail=full), media_type=XML)

    @router.get("/tap/tables/{name}", summary="VOSI table detail")
    async def table(name: str, who=Depends(identity)) -> Response:
        schemas = await run_in_threadpool(service.schemas, who.groups)
        for schema in schemas:
            for t in schema.tables:
                if t.qualified_name.lower() == name.lower():
                    return Response(table_xml(t), media_type=XML)
        return error_response(TapError(f"no table {name!r}; GET /tap/tables lists the tables", 404))

    @router.get("/tap/capabilities", summary="VOSI capabilities (TAPRegExt)")
    async def capabilities(request: Request) -> Response:
        scs = [s.name for s in service.schemas(frozenset({"public"})) if s.name != "TAP_SCHEMA"]
        text = capabilities_xml(base_url(service, request), service.settings, capability_formats(), scs)
        return Response(text, media_type=XML)

    @router.get("/tap/availability", summary="VOSI availability")
    async def availability() -> Response:
        try:
            await run_in_threadpool(service.lake.check)
            available, note = True, "the service is accepting queries"
        except Exception as exc:  # the lake (Ceph RGW) unreachable: say so, do not fail
            available, note = False, f"the lake is not reachable: {str(exc).splitlines()[0][:200]}"
        return Response(availability_xml(available, service.started, note), media_type=XML)

    @router.get("/tap/examples", summary="DALI examples")
    async def examples(request: Request, who=Depends(identity)) -> Response:
        items = await run_in_threadpool(example_queries, service, who.groups, base_url(service, request))
        return Response(examples_xhtml(service.settings.title, items), media_type="application/xhtml+xml")

    @router.get(SAMPLE_UPLOAD_PATH, summary="a small table to upload in the examples")
    async def sample_upload() -> Response:
        return Response(SAMPLE_VOTABLE, media_type="application/x-votable+xml")

    return router


def example_queries(
    service: DacService, groups: frozenset[str], base: str
) -> list[tuple[str, str, str, list[str]]]:
    """Real queries over the catalogs this caller can read: they run as written (tests run them)."""
    out: list[tuple[str, str, str, list[str]]] = []
    tables = [t for t in service.engine(groups).registry.lake_tables() if t.meta.schema == t.catalog]
    spatial = [t for t in tables if t.meta.ra_column and t.meta.dec_column]
    for t in spatial[:2]:
        ra, dec = t.meta.ra_column, t.meta.dec_column
        centre = _centre(service.lake.storage, t)
        name = f"{t.meta.schema}.{t.meta.name}"
        out.append(
            (
                f"cone-{t.catalog}",
                f"Cone search of 6 arcmin in {name}, nearest first",
                f"SELECT TOP 100 *, DISTANCE(POINT('ICRS', {ra}, {dec}), "
                f"POINT('ICRS', {centre[0]}, {centre[1]})) AS dist\nFROM {name}\n"
                f"WHERE 1 = CONTAINS(POINT('ICRS', {ra}, {dec}), "
                f"CIRCLE('ICRS', {centre[0]}, {centre[1]}, 0.1))\nORDER BY dist",
                [name],
            )
        )
        out.append(
            (
                f"count-{t.catalog}",
                f"Sources per HEALPix order-3 cell in {name}",
                f"SELECT ivo_healpix_index(3, {ra}, {dec}) AS hpx3, COUNT(*) AS n\nFROM {name}\n"
                "GROUP BY hpx3\nORDER BY n DESC",
                [name],
            )
        )
    if len(spatial) >= 2:
        a, b = spatial[0], spatial[1]
        an, bn = f"{a.meta.schema}.{a.meta.name}", f"{b.meta.schema}.{b.meta.name}"
        ca = _centre(service.lake.storage, a)
        out.append(
            (
                "crossmatch",
                f"Cross-match {an} with {bn} within 1 arcsec, in a 1 degree field",
                f"SELECT a.{a.definition.get('id_column') or a.meta.ra_column}, "
                f"b.{b.definition.get('id_column') or b.meta.ra_column},\n"
                f"  DISTANCE(POINT('ICRS', a.{a.meta.ra_column}, a.{a.meta.dec_column}), "
                f"POINT('ICRS', b.{b.meta.ra_column}, b.{b.meta.dec_column})) * 3600 AS sep_arcsec\n"
                f"FROM {an} AS a JOIN {bn} AS b\n"
                f"  ON 1 = CONTAINS(POINT('ICRS', a.{a.meta.ra_column}, a.{a.meta.dec_column}), "
                f"CIRCLE('ICRS', b.{b.meta.ra_column}, b.{b.meta.dec_column}, 1.0/3600))\n"
                f"WHERE 1 = CONTAINS(POINT('ICRS', a.{a.meta.ra_column}, a.{a.meta.dec_column}), "
                f"CIRCLE('ICRS', {ca[0]}, {ca[1]}, 1.0))",
                [an, bn],
            )
        )
    if spatial:
        t = spatial[0]
        name = f"{t.meta.schema}.{t.meta.name}"
        out.append(
            (
                "upload",
                f"Your own positions (an uploaded table) matched against {name} within 5 arcsec "
                f"(run with UPLOAD=mine,{base}{SAMPLE_UPLOAD_PATH} or from TOPCAT)",
                f"SELECT u.name, t.*\nFROM TAP_UPLOAD.mine AS u JOIN {name} AS t\n"
                f"  ON DISTANCE(POINT('ICRS', u.ra, u.dec), POINT('ICRS', t.{t.meta.ra_column}, "
                f"t.{t.meta.dec_column})) < 5.0/3600",
                [name],
            )
        )
    out.append(
        (
            "tap-schema",
            "The columns of every table, with units and UCDs",
            "SELECT table_name, column_name, datatype, unit, ucd, description\nFROM TAP_SCHEMA.columns\n"
            "ORDER BY table_name, column_index",
            ["TAP_SCHEMA.columns"],
        )
    )
    return out


@functools.lru_cache(maxsize=64)
def _median_position(storage, path: str, ra: str, dec: str) -> tuple[float, float]:
    import numpy as np
    import pyarrow.parquet as pq

    with pq.ParquetFile(storage.path(path), filesystem=storage.pa_fs) as f:
        first = f.read_row_group(0, columns=[ra, dec])
    return (
        round(float(np.nanmedian(first[ra].to_numpy())), 4),
        round(float(np.nanmedian(first[dec].to_numpy())), 4),
    )


def _centre(storage, t) -> tuple[float, float]:
    """A position in the catalog's densest partition (the median of its first row group), so that the
    example cone there returns rows. The file comes from `LakeTable.files`, which knows both a release's
    one file per partition and an alert table's snapshot-listed batch files."""
    parts = t.manifest.get("partitions") or []
    if not parts:
        return (0.0, 0.0)
    order, pixel, rows = max(parts, key=lambda p: p[2] * 4 ** p[0])[:3]
    files = t.files([(order, pixel, rows)])
    if not files:
        return (0.0, 0.0)
    return _median_position(storage, files[0], t.meta.ra_column, t.meta.dec_column)


SAMPLE_VOTABLE = """<?xml version="1.0" encoding="UTF-8"?>
<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">
<RESOURCE type="results"><TABLE name="mine">
<FIELD name="name" datatype="char" arraysize="*" ucd="meta.id;meta.main"/>
<FIELD name="ra" datatype="double" unit="deg" ucd="pos.eq.ra;meta.main"/>
<FIELD name="dec" datatype="double" unit="deg" ucd="pos.eq.dec;meta.main"/>
<DATA><TABLEDATA>
<TR><TD>galactic-centre</TD><TD>266.4168</TD><TD>-29.0078</TD></TR>
<TR><TD>lmc</TD><TD>80.8942</TD><TD>-69.7561</TD></TR>
<TR><TD>47-tuc</TD><TD>6.0236</TD><TD>-72.0813</TD></TR>
<TR><TD>omega-cen</TD><TD>201.6970</TD><TD>-47.4795</TD></TR>
</TABLEDATA></DATA></TABLE></RESOURCE></VOTABLE>
"""
