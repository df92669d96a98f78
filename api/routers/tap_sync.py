"""`/tap/sync`: TAP 1.1 synchronous queries (GET and POST), streamed in the requested format."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api.formats import TapError
from api.routers.common import error_response, read_params
from api.service import DacService
from api.tap.params import parse_query


def make_sync_router(service: DacService, identity: Callable) -> APIRouter:
    router = APIRouter()
    s = service.settings

    @router.api_route("/tap/sync", methods=["GET", "POST"], summary="TAP synchronous query")
    async def tap_sync(request: Request, who=Depends(identity)) -> Response:
        try:
            params, files = await read_params(request, s.upload_max_bytes)
            query = parse_query(params, maxrec_default=s.maxrec_default, maxrec_max=s.maxrec_max)
            prepared = await run_in_threadpool(
                service.prepare, who.groups, query, files, timeout_s=s.sync_timeout_s, who=who.name
            )
        except TapError as err:
            return error_response(err)
        return StreamingResponse(prepared.chunks, media_type=prepared.media_type)

    return router
