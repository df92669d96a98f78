"""`/scs/<catalog>`: Simple Cone Search 1.1 (RA, DEC, SR in degrees; VERB 1-3), through the engine's cone.

Every cone runs as `Session.cone` does (ADQL CONTAINS + DISTANCE, HEALPix pruning, nearest first), so
SCS, TAP and the Python API give the same rows. Errors are VOTables carrying both the SCS 1.03 `Error`
INFO and the DALI `QUERY_STATUS=ERROR` INFO, with HTTP 400 for bad parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from xml.sax.saxutils import quoteattr

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api.formats import TapError, resolve_format
from api.service import DacService, as_tap_error
from api.tap.params import fold, single


def make_scs_router(service: DacService, identity: Callable) -> APIRouter:
    router = APIRouter()

    @router.get("/scs/{catalog}", summary="Simple Cone Search 1.1")
    async def scs(catalog: str, request: Request, who=Depends(identity)) -> Response:
        params = fold(request.query_params.multi_items())
        try:
            ra = _number(params, "RA", -360, 360)
            dec = _number(params, "DEC", -90, 90)
            sr = _number(params, "SR", 0, 180)
            verb = int(single(params, "VERB") or 2)
            if verb not in (1, 2, 3):
                raise TapError(f"VERB={verb}: use 1 (id and position), 2 (principal columns) or 3 (all)", 400)
            raw_maxrec = single(params, "MAXREC")
            maxrec = service.settings.maxrec_default if raw_maxrec in (None, "") else int(raw_maxrec)
            maxrec = max(0, min(maxrec, service.settings.maxrec_max))
            fmt = resolve_format(single(params, "RESPONSEFORMAT") or single(params, "FORMAT"))
            result = await run_in_threadpool(_cone, service, who.groups, catalog, ra, dec, sr, verb, maxrec)
        except ValueError as exc:
            return _scs_error(TapError(f"bad parameter: {exc}", 400))
        except TapError as err:
            return _scs_error(err)
        except Exception as exc:
            return _scs_error(as_tap_error(exc))
        table, columns, overflow = result
        chunks = fmt.writer(columns, table.schema, table.to_batches(), overflow=lambda: overflow, infos={})
        return StreamingResponse(chunks, media_type=fmt.media_type)

    return router


def _number(params: dict[str, list[str]], name: str, lo: float, hi: float) -> float:
    raw = single(params, name)
    if raw is None or raw == "":
        raise TapError(f"missing parameter {name} (degrees)", 400)
    try:
        value = float(raw)
    except ValueError:
        raise TapError(f"{name}={raw!r} is not a number (degrees)", 400) from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise TapError(f"{name}={raw} is out of range: give a value between {lo} and {hi} degrees", 400)
    return value


def _cone(
    service: DacService, groups, catalog: str, ra: float, dec: float, sr: float, verb: int, maxrec: int
):
    session = service.session(groups)
    lt = next(
        (t for t in session.engine.registry.lake_tables() if t.meta.schema.lower() == catalog.lower()), None
    )
    if lt is None or not (lt.meta.ra_column and lt.meta.dec_column):
        known = sorted(
            {
                t.catalog
                for t in session.engine.registry.lake_tables()
                if t.meta.ra_column and t.meta.dec_column
            }
        )
        raise TapError(f"no catalog {catalog!r} to cone-search; catalogs: {', '.join(known) or 'none'}", 404)
    d = lt.definition
    if verb == 1:
        columns = [c for c in (d.get("id_column"), lt.meta.ra_column, lt.meta.dec_column) if c]
    elif verb == 2:
        columns = [c["name"] for c in d["columns"] if c.get("principal")] or None
    else:
        columns = None
    if sr == 0:  # SCS: SR=0 asks for the metadata (the columns) only
        maxrec = 0
    table = session.cone(lt.meta.schema, ra, dec, max(sr, 1e-9), columns=columns, maxrec=maxrec)
    result = session.last_result
    return table, result.columns, result.overflow


def _scs_error(err: TapError) -> Response:
    msg = quoteattr(err.message)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">'
        f'<RESOURCE type="results"><INFO name="QUERY_STATUS" value="ERROR">{_text(err.message)}</INFO>'
        f'<INFO ID="Error" name="Error" value={msg}/></RESOURCE></VOTABLE>'
    )
    return Response(body, status_code=err.http_status, media_type="application/x-votable+xml")


def _text(s: str) -> str:
    from xml.sax.saxutils import escape

    return escape(s)
