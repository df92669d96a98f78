"""Request helpers shared by the routers: TAP parameters from GET/POST/multipart, DALI error responses."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from api.formats import TapError
from api.formats.dali import dali_error_votable
from api.tap.params import fold

VOTABLE_MEDIA = "application/x-votable+xml"


async def read_params(request: Request, max_bytes: int) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """TAP parameters (upper-case names) from the query string and a urlencoded or multipart body, and
    the multipart file parts (uploads) by name. A part larger than `max_bytes` is refused with 413."""
    items: list[tuple[str, str]] = list(request.query_params.multi_items())
    files: dict[str, bytes] = {}
    if request.method == "POST":
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                form = await request.form(max_part_size=max_bytes + 1)
            except Exception as exc:  # starlette raises its own MultiPartException for oversize parts
                raise TapError(
                    f"could not read the request body: {exc}", 413 if "size" in str(exc) else 400
                ) from exc
            for name, value in form.multi_items():
                if isinstance(value, str):
                    items.append((name, value))
                else:
                    data = await value.read()
                    if len(data) > max_bytes:
                        raise TapError(
                            f"upload part {name!r} is {len(data):,} bytes; this service accepts at most "
                            f"{max_bytes:,} bytes per upload",
                            413,
                        )
                    files[name] = data
        elif ctype and await request.body():
            raise TapError(
                f"unsupported request body type {ctype!r}: send application/x-www-form-urlencoded or "
                "multipart/form-data",
                415,
            )
    return fold(items), files


def error_response(err: TapError) -> Response:
    return Response(dali_error_votable(err.message), status_code=err.http_status, media_type=VOTABLE_MEDIA)
