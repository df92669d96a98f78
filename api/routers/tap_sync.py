"""`/tap/sync`: TAP 1.1 synchronous queries (GET and POST), streamed in the requested format."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from api import querylog
from api.formats import TapError
from api.routers.common import error_response, read_params
from api.service import DacService, PreparedQuery, as_tap_error
from api.tap.params import TapQuery, parse_query


def make_sync_router(service: DacService, identity: Callable) -> APIRouter:
    router = APIRouter()
    s = service.settings

    @router.api_route("/tap/sync", methods=["GET", "POST"], summary="TAP synchronous query")
    async def tap_sync(request: Request, who=Depends(identity)) -> Response:
        started = time.perf_counter()
        params = query = None
        try:
            params, files = await read_params(request, s.upload_max_bytes)
            query = parse_query(params, maxrec_default=s.maxrec_default, maxrec_max=s.maxrec_max)
            prepared = await run_in_threadpool(
                service.prepare, who.groups, query, files, timeout_s=s.sync_timeout_s, who=who.name
            )
        except TapError as err:
            text = query.query if query else querylog.query_param(params)
            record = querylog.from_error(
                "sync", who.name, text, err.http_status, err.message, started, request=query
            )
            querylog.finished(record)
            return error_response(err)
        return StreamingResponse(
            _closing(_logged(prepared, query, who.name, started)), media_type=prepared.media_type
        )

    return router


def _logged(prepared: PreparedQuery, query: TapQuery, who: str | None, started: float) -> Iterator[bytes]:
    """The result's chunks; when they end (or the client leaves, or a writer raises), the query log line
    and metrics, with the rows and files the finished stream counted."""
    status = error = None
    try:
        yield from prepared.chunks
    except GeneratorExit:
        status = querylog.CANCELLED
        error = "the client closed the connection before the end of the result"
        raise
    except Exception as exc:  # formats that cannot report in-band (CSV, FITS, ...) cut the response
        err = as_tap_error(exc)
        status = querylog.FAILED if err.http_status >= 500 else querylog.ERROR
        error = err.message
        raise
    finally:
        close = getattr(prepared.chunks, "close", None)
        if close is not None:
            close()  # a writer left early still closes the stream, so its counts are final
        querylog.finished(
            querylog.from_stream("sync", who, query, prepared.stream, started, status=status, error=error)
        )


async def _closing(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, produced in a worker thread. A client that leaves cancels the response: the result is
    closed then, in a thread shielded from that cancellation, rather than whenever the garbage collector
    finds it, so DuckDB's connection is given back and the query is logged as cancelled at once."""
    try:
        async for chunk in iterate_in_threadpool(chunks):
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)
