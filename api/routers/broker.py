"""The alert broker's HTTP API: an owner's filters, watchlists and watchmaps of an alert stream, and what
they matched (Lasair's model; the definitions and their logic live in `dac_lake.alerts_broker`).

Why a thin REST layer over the services: the services already own validation (ADQL translated at save time,
watchlist rows checked, MOCs parsed), ownership (another owner's definition is `NotFound`) and optimistic
versioning (`expected_version`). This module only turns HTTP into service calls and service errors into
status codes, so an API process and the ingest can never disagree about what a definition means.

Routes, all under `/alerts/{stream}` and all for authenticated callers (anonymous: 401):

    GET    /filters                          the caller's filters
    POST   /filters                          create: JSON {name, adql, description?, topic?, active?}
    GET    /filters/{id}                     one filter (ETag: its version)
    PATCH  /filters/{id}                     edit any of name, adql, description, topic, active
    DELETE /filters/{id}                     delete it and its stored results
    POST   /filters/{id}/pause | /resume     stop or restart running it on new batches
    GET    /filters/{id}/results             stored matches (first_batch, last_batch, format)
    GET    /watchlists                       the caller's watchlists
    POST   /watchlists                       create from a CSV or VOTable upload, or JSON sources
    GET    /watchlists/{id}                  one watchlist (its spec: n_sources, radii)
    PATCH  /watchlists/{id}                  rename, pause or resume (name, active)
    PUT    /watchlists/{id}/sources          replace the sources with a new upload
    GET    /watchlists/{id}/sources          the sources (format)
    DELETE /watchlists/{id}
    POST   /watchlists/{id}/pause | /resume
    GET    /watchlists/{id}/hits             stored hits (first_batch, last_batch, format)
    ...and the same for /watchmaps, with MOC uploads (FITS, JSON or ASCII) and GET/PUT /watchmaps/{id}/moc.

Pausing: `POST .../pause` and `.../resume` are the dedicated calls; `PATCH {"active": false}` does the same
as part of an edit.

Versions: every definition has a `version` (sent as the `ETag` header, `"3"`). An edit may name the version
it is based on, as `If-Match: "3"` (a mismatch is `412 Precondition Failed`, RFC 9110 section 13.1.1) or as
`"version": 3` in a JSON body (a mismatch is `409 Conflict`); two editors racing from the same version never
both win (409). For pause, resume and delete, `If-Match` is checked just before the change (the services
take no expected version for them).

Errors are JSON `{"error": "message"}` (with `line` and `column` for an ADQL error): 400 invalid input (the
ADQL translator's or the upload checker's message, naming the line or row), 401 anonymous, 404 no such
stream or definition (someone else's definition is reported exactly like a missing one), 409 conflict,
412 failed If-Match, 413 upload too large.

Tables (results, hits, sources) are JSON by default (`{"metadata": [...], "data": [[...]]}`, as TAP's JSON
output), or any TAP output format by `format=` (`csv`, `votable`, `votable/td`, `fits`, `parquet`, ...)
through the same writers as TAP, with units and UCDs, so TOPCAT loads `.../hits?format=votable` directly.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.formats import TapError, resolve_format
from api.service import DacService
from dac_lake.adql import AdqlError
from dac_lake.adql.model import ColumnMeta, OutputColumn
from dac_lake.alerts.snapshots import read_stream_config
from dac_lake.alerts_broker import AlertBroker, BrokerError, ConflictError, Filter, NotAllowed, NotFound
from dac_lake.alerts_broker.filters import BATCH_COLUMN, EMPTY_BATCH, WATCHLIST_HITS_META, WATCHMAP_HITS_META
from dac_lake.alerts_broker.store import BrokerRecord
from dac_lake.alerts_broker.watchmaps import MAX_UPLOAD_BYTES, moc_to_fits
from dac_lake.registry import readable
from dac_lake.sandbox import first_line
from dac_lake.settings import parse_bool

log = logging.getLogger("api.broker")

#: largest upload (watchlist or MOC) or JSON body accepted; a watchlist of the service's maximum of 1M
#: sources is ~50 MB of CSV
MAX_BODY_BYTES = MAX_UPLOAD_BYTES
FILTER_FIELDS = {"name", "adql", "description", "topic", "kafka_topic", "active", "version"}
EDIT_FIELDS = {"name", "active", "version"}
WATCHLIST_JSON_FIELDS = {
    "name",
    "sources",
    "csv",
    "votable",
    "format",
    "default_radius_arcsec",
    "active",
    "version",
}
WATCHMAP_JSON_FIELDS = {"name", "moc", "format", "active", "version"}
MAX_DESCRIPTION_CHARS = 4000

_BATCH_META = ColumnMeta(BATCH_COLUMN, "int64", "", "meta.id", "micro-batch (snapshot number) of the match")
_SOURCE_COLUMNS = (
    ColumnMeta("name", "string", "", "meta.id;meta.main", "source name"),
    ColumnMeta("ra", "float64", "deg", "pos.eq.ra;meta.main", "right ascension (ICRS)"),
    ColumnMeta("dec", "float64", "deg", "pos.eq.dec;meta.main", "declination (ICRS)"),
    ColumnMeta("radius_arcsec", "float64", "arcsec", "phys.angSize", "match radius"),
)
_MOC_MEDIA = {"fits": "application/fits", "json": "application/json", "ascii": "text/plain"}


# --------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request this module refuses by itself (bad body, bad parameter), with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class PreconditionFailed(ApiError):
    """`If-Match` named another version than the current one."""

    def __init__(self, message: str):
        super().__init__(message, 412)


def error_response(exc: BaseException) -> JSONResponse:
    """A service or request error as `{"error": ...}` with its status (see the module docstring)."""
    headers: dict[str, str] = {}
    body: dict[str, Any]
    if isinstance(exc, ApiError):
        status, body = exc.status, {"error": exc.message}
    elif isinstance(exc, NotAllowed):
        # RFC 9110 section 11.6.1: a 401 carries a challenge; the token is a bearer token (or Basic)
        status, body = 401, {"error": str(exc)}
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, NotFound):
        status, body = 404, {"error": str(exc)}
    elif isinstance(exc, ConflictError):
        status, body = 409, {"error": str(exc)}
    elif isinstance(exc, AdqlError):
        status, body = 400, {"error": str(exc)}
        if exc.line is not None:
            body.update(line=exc.line, column=exc.column)
    elif isinstance(exc, BrokerError):  # FilterError, WatchlistError, WatchmapError, bad names
        status, body = 400, {"error": str(exc)}
    elif isinstance(exc, TapError):  # an unknown output format
        status, body = exc.http_status, {"error": exc.message}
    else:
        log.exception("broker request failed unexpectedly")
        message = f"the service failed ({first_line(exc)}); this is a bug, please report it"
        status, body = 500, {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------- brokers


class Brokers:
    """One `AlertBroker` per stream in this process (its services are stateless over the lake; its
    engines cache translations per set of groups). A stream exists for a caller only if it has been
    created and its groups let the caller read it: otherwise every route answers 404, so the names of
    private streams cannot be probed."""

    def __init__(self, service: DacService):
        self.service = service
        self._brokers: dict[str, tuple[AlertBroker, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def get(self, stream: str, who) -> AlertBroker:
        with self._lock:
            found = self._brokers.get(stream)
        if found is None:
            try:
                config = read_stream_config(self.service.lake.storage, stream)
            except ValueError:  # not a stream name at all
                config = None
            if config is None:
                raise NotFound(f"no alert stream {stream!r}")
            try:
                broker = AlertBroker(self.service.lake, stream)
            except ValueError:
                raise NotFound(f"no alert stream {stream!r}") from None
            # a stream's config is create-only: its groups never change, so both can be kept
            found = (broker, frozenset(config.groups))
            with self._lock:
                found = self._brokers.setdefault(stream, found)
        broker, groups = found
        if not readable({"groups": sorted(groups)}, who.groups):
            raise NotFound(f"no alert stream {stream!r}")
        return broker


def signed_in(who):
    """The caller, if it may own definitions: anonymous callers own none (401 before anything else)."""
    if getattr(who, "name", None) is None:
        raise NotAllowed(
            "sign in to create or see filters, watchlists and watchmaps (send a bearer token); "
            "anonymous callers own none"
        )
    return who


# --------------------------------------------------------------------------------------------- versions


@dataclass(frozen=True)
class Expected:
    """The version an edit is based on, and whether it came from `If-Match` (412) or the body (409)."""

    version: int | None = None
    from_header: bool = False


def expected_version(request: Request, body_version: Any = None) -> Expected:
    header = request.headers.get("if-match")
    from_header = None
    if header is not None and header.strip() != "*":
        tag = header.strip()
        if "," in tag:
            raise ApiError('If-Match: give one version (the ETag of the definition), e.g. If-Match: "3"')
        tag = tag.removeprefix("W/").strip('"')
        if not tag.isdigit():
            raise ApiError(f'If-Match {header!r}: the ETag of a definition is its version number, e.g. "3"')
        from_header = int(tag)
    from_body = None
    if body_version is not None:
        if isinstance(body_version, bool) or not isinstance(body_version, int) or body_version < 1:
            raise ApiError("version: the definition's version number (a positive integer)")
        from_body = body_version
    if from_header is not None and from_body is not None and from_header != from_body:
        raise ApiError(f"If-Match names version {from_header} but the body version {from_body}")
    if from_header is not None:
        return Expected(from_header, True)
    return Expected(from_body, False)


def checked(call: Callable[[], Any], expected: Expected) -> Any:
    """Run an edit; a conflict with an If-Match version is a 412, with a body version a 409."""
    try:
        return call()
    except ConflictError as exc:
        if expected.from_header:
            raise PreconditionFailed(str(exc)) from None
        raise


def precheck(current_version: int, expected: Expected, what: str) -> None:
    """For the calls that take no expected version (pause, resume, delete): check it just before."""
    if expected.version is not None and expected.version != current_version:
        message = (
            f"{what} is at version {current_version}, not {expected.version}: it was changed meanwhile; "
            "reload it"
        )
        raise PreconditionFailed(message) if expected.from_header else ConflictError(message)


def etag(version: int) -> dict[str, str]:
    return {"ETag": f'"{version}"'}


# --------------------------------------------------------------------------------------------- bodies


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refused with 413 beyond `limit` (counted as it arrives, not trusted from headers)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(f"the request body is larger than {limit:,} bytes, the limit", 413)
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > limit:
            raise ApiError(f"the request body is larger than {limit:,} bytes, the limit", 413)
    return bytes(data)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_object(request: Request, allowed: set[str]) -> dict[str, Any]:
    """A JSON object body with only `allowed` keys (a typo such as `adq` is an error, not ignored)."""
    kind = media_type(request)
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(f"send the definition as JSON (Content-Type: application/json), not {kind!r}", 415)
    raw = await read_body(request)
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ApiError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}")
    return body


def as_bool(value: Any, what: str) -> bool | None:
    if value is None:
        return None
    try:
        return parse_bool(value, what)
    except ValueError:
        raise ApiError(f"{what}: true or false, not {value!r}") from None


def as_float(value: Any, what: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(f"{what}: a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ApiError(f"{what}: a number, not {value!r}") from None


def as_version(value: Any) -> Any:
    """A version from a form field or query parameter (text) as the number a JSON body would give."""
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ApiError(f"version: the definition's version number, not {value!r}")
        return int(value)
    return value


def as_text(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ApiError(f"{what}: a string")


@dataclass
class Upload:
    """A watchlist or watchmap upload, whatever the request shape (multipart, JSON, raw body)."""

    data: bytes | None = None
    fmt: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


async def read_upload(
    request: Request, json_fields: set[str], json_content: Callable[[dict], Upload]
) -> Upload:
    """Multipart (one file part plus fields), JSON (`json_content` turns it into data), or a raw body
    (fields from the query string)."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_part_size=1024 * 1024)
        except Exception as exc:  # starlette's MultiPartException: a malformed or oversize part
            raise ApiError(f"could not read the multipart body: {exc}") from None
        upload = Upload()
        files = []
        for name, value in form.multi_items():
            if isinstance(value, str):
                upload.fields[name] = value
            else:
                files.append((name, value))
        if len(files) > 1:
            raise ApiError(f"send one file part, not {len(files)} ({', '.join(n for n, _ in files)})")
        if files:
            part = files[0][1]
            data = await part.read(MAX_BODY_BYTES + 1)
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(f"the upload is larger than {MAX_BODY_BYTES:,} bytes, the limit", 413)
            upload.data = data
        elif "file" in upload.fields:  # a text field named file (curl -F 'file=<list.csv')
            upload.data = upload.fields.pop("file").encode("utf-8")
        upload.fmt = upload.fields.pop("format", None) or None
        return upload
    if kind == "application/json" or kind.endswith("+json"):
        return json_content(await json_object(request, json_fields))
    data = await read_body(request)
    upload = Upload(data=data or None, fields=dict(request.query_params))
    upload.fmt = upload.fields.pop("format", None) or RAW_FORMATS.get(kind)
    return upload


#: Content-Type of a raw upload body -> its format
RAW_FORMATS = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-votable+xml": "votable",
    "text/xml": "votable",
    "application/xml": "votable",
    "application/fits": "fits",
    "image/fits": "fits",
    "text/plain": None,  # a MOC in ASCII, or CSV: sniffed by the service
}


def sources_csv(sources: Any) -> bytes:
    """JSON sources (a list of objects: name, ra, dec, radius_arcsec or any alias the CSV accepts) as the
    CSV the watchlist parser validates, so errors name the same rows (row 1 = the first source)."""
    if not isinstance(sources, list):
        raise ApiError("sources: a list of objects with name, ra, dec and optionally radius_arcsec")
    columns: list[str] = []
    for i, item in enumerate(sources):
        if not isinstance(item, dict):
            raise ApiError(f"sources: row {i + 1} is not an object")
        columns += [k for k in item if k not in columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for item in sources:
        writer.writerow(["" if item.get(c) is None else _cell(item.get(c)) for c in columns])
    return out.getvalue().encode("utf-8")


def _cell(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def watchlist_json(body: dict) -> Upload:
    given = [k for k in ("sources", "csv", "votable") if body.get(k) is not None]
    upload = Upload(fields={k: body.get(k) for k in ("name", "default_radius_arcsec", "active", "version")})
    if len(given) > 1:
        raise ApiError(f"give the sources once: {' or '.join(given)}")
    if given == ["sources"]:
        upload.data, upload.fmt = sources_csv(body["sources"]), "csv"
    elif given:
        text = as_text(body[given[0]], given[0])
        upload.data, upload.fmt = (text or "").encode("utf-8"), given[0]
    return upload


def watchmap_json(body: dict) -> Upload:
    moc = body.get("moc")
    upload = Upload(
        fields={k: body.get(k) for k in ("name", "active", "version")},
        fmt=as_text(body.get("format"), "format"),
    )
    if isinstance(moc, dict):  # the JSON MOC itself: {"order": [cells]}
        upload.data, upload.fmt = json.dumps(moc).encode("utf-8"), "json"
    elif isinstance(moc, str):  # ASCII ("3/1-4 5/100") or JSON text
        upload.data = moc.encode("utf-8")
    elif moc is not None:
        raise ApiError('moc: a JSON MOC object ({"5": [1, 2]}) or an ASCII MOC string ("5/1-2")')
    return upload


# --------------------------------------------------------------------------------------------- tables


_DECLARED = {
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def output_columns(schema: pa.Schema, known: Mapping[str, ColumnMeta]) -> list[OutputColumn]:
    """VOTable FIELD metadata for each column: from `known` (units, UCDs of the batch tables or of the
    filter's ADQL) when the name is known, else just the name and type."""
    out = []
    for f in schema:
        meta = known.get(f.name)
        if meta is not None:
            out.append(OutputColumn(f.name, meta.datatype, meta.unit, meta.ucd, meta.description))
        else:
            declared = "timestamp" if pa.types.is_timestamp(f.type) else _DECLARED.get(f.type, "string")
            out.append(OutputColumn(f.name, declared))
    return out


def table_response(
    table: pa.Table, known: Mapping[str, ColumnMeta], fmt: str | None, filename: str, infos: dict[str, str]
) -> Response:
    """A table in the requested format (JSON by default), written by the TAP output writers."""
    out = resolve_format(fmt or "json")
    columns = output_columns(table.schema, known)
    chunks = out.writer(columns, table.schema, table.to_batches(), infos=infos)
    headers = {}
    if out.name != "json":
        headers["Content-Disposition"] = f'inline; filename="{filename}.{out.extension}"'
    return StreamingResponse(chunks, media_type=out.media_type, headers=headers)


def batch_range(first_batch: str | None, last_batch: str | None) -> tuple[int | None, int | None]:
    def one(value: str | None, what: str) -> int | None:
        if value is None or value == "":
            return None
        if not value.strip().isdigit():
            raise ApiError(f"{what}: a batch number (>= 0), not {value!r}")
        return int(value)

    first, last = one(first_batch, "first_batch"), one(last_batch, "last_batch")
    if first is not None and last is not None and first > last:
        raise ApiError(f"first_batch {first} is after last_batch {last}")
    return first, last


def without_owner(table: pa.Table) -> pa.Table:
    """Stored hits carry their owner: always the caller here, so not shown."""
    return table.drop_columns(["owner"]) if "owner" in table.column_names else table


# --------------------------------------------------------------------------------------------- documents


def filter_doc(f: Filter, description: str | None, stream: str) -> dict[str, Any]:
    doc = f.to_dict()
    doc.update(description=description, stream=stream)
    return doc


def record_doc(record: BrokerRecord, stream: str) -> dict[str, Any]:
    doc = record.public_dict()
    doc["stream"] = stream
    return doc


def filter_results_meta(broker: AlertBroker, f: Filter) -> dict[str, ColumnMeta]:
    """Units and UCDs of a filter's result columns, from its current ADQL (translated with the groups it
    runs with). Results of older versions may have other columns: those get names and types only."""
    known = {BATCH_COLUMN: _BATCH_META}
    try:
        translation = broker.filters.engine(f.groups).translate(f.adql, memory_tables=EMPTY_BATCH)
    except Exception:  # the owner lost rights to a joined catalog since: metadata is a nicety
        return known
    for c in translation.columns:
        known.setdefault(c.name, ColumnMeta(c.name, c.datatype, c.unit, c.ucd, c.description))
    return known


# --------------------------------------------------------------------------------------------- the router


def make_broker_router(service: DacService, identity: Callable) -> APIRouter:
    """The broker routes (see the module docstring), for `app.include_router`."""
    router = APIRouter(tags=["alert broker"])
    brokers = Brokers(service)

    def base_url(request: Request) -> str:
        return (service.settings.public_url or str(request.base_url)).rstrip("/")

    async def respond(work: Callable[[], Response | dict], status: int = 200) -> Response:
        try:
            out = await run_in_threadpool(work)
        except Exception as exc:
            return error_response(exc)
        return out if isinstance(out, Response) else JSONResponse(out, status_code=status)

    def doc_response(doc: dict, status: int = 200, location: str | None = None) -> JSONResponse:
        headers = etag(doc["version"])
        if location:
            headers["Location"] = location
        return JSONResponse(doc, status_code=status, headers=headers)

    # ------------------------------------------------------------------ filters
    def description_of(record: BrokerRecord) -> str | None:
        return record.spec.get("description")

    def check_description(value: Any) -> str | None:
        text = as_text(value, "description")
        if text is not None and len(text) > MAX_DESCRIPTION_CHARS:
            raise ApiError(f"description: at most {MAX_DESCRIPTION_CHARS} characters")
        return text

    def set_description(broker: AlertBroker, who, f: Filter, description: str | None) -> BrokerRecord:
        """The description is kept in the definition's spec (FilterService keeps spec keys it does not
        know across edits): one more version, based on the one just written."""
        record = broker.store.get("filters", f.id, who)
        spec = dict(record.spec, description=description)
        return broker.store.update("filters", f.id, who, spec=spec, expected_version=f.version)

    def topic_of(body: dict) -> tuple[bool, str | None]:
        given = [k for k in ("topic", "kafka_topic") if k in body]
        if len(given) == 2 and body["topic"] != body["kafka_topic"]:
            raise ApiError("topic and kafka_topic are the same field: give one")
        if not given:
            return False, None
        return True, as_text(body[given[0]], given[0])

    @router.get("/alerts/{stream}/filters", summary="the caller's filters")
    async def list_filters(stream: str, who=Depends(identity)) -> Response:
        def work():
            broker = brokers.get(stream, signed_in(who))
            records = broker.store.records("filters", who.name)
            docs = [filter_doc(Filter.from_record(r), description_of(r), stream) for r in records]
            return {"stream": stream, "filters": docs}

        return await respond(work)

    @router.post("/alerts/{stream}/filters", status_code=201, summary="create a filter (ADQL on each batch)")
    async def create_filter(stream: str, request: Request, who=Depends(identity)) -> Response:
        try:
            signed_in(who)
            body = await json_object(request, FILTER_FIELDS - {"version"})
        except Exception as exc:
            return error_response(exc)

        def work():
            broker = brokers.get(stream, who)
            name, adql = as_text(body.get("name"), "name"), as_text(body.get("adql"), "adql")
            if name is None:
                raise ApiError("name: a filter needs a name")
            description = check_description(body.get("description"))
            _, topic = topic_of(body)
            active = as_bool(body.get("active"), "active")
            f = broker.filters.create(
                who, name, adql or "", kafka_topic=topic, active=active is not False, description=description
            )
            doc = filter_doc(f, description, stream)
            return doc_response(doc, 201, f"{base_url(request)}/alerts/{stream}/filters/{f.id}")

        return await respond(work)

    @router.get("/alerts/{stream}/filters/{filter_id}", summary="one filter")
    async def get_filter(stream: str, filter_id: str, who=Depends(identity)) -> Response:
        def work():
            broker = brokers.get(stream, signed_in(who))
            record = broker.store.get("filters", filter_id, who)
            return doc_response(filter_doc(Filter.from_record(record), description_of(record), stream))

        return await respond(work)

    @router.patch("/alerts/{stream}/filters/{filter_id}", summary="edit a filter")
    async def edit_filter(stream: str, filter_id: str, request: Request, who=Depends(identity)) -> Response:
        try:
            signed_in(who)
            body = await json_object(request, FILTER_FIELDS)
            expected = expected_version(request, body.get("version"))
        except Exception as exc:
            return error_response(exc)

        def work():
            broker = brokers.get(stream, who)
            current = broker.store.get("filters", filter_id, who)
            has_description = "description" in body
            description = check_description(body.get("description")) if has_description else None
            has_topic, topic = topic_of(body)
            kwargs: dict[str, Any] = {
                "name": as_text(body.get("name"), "name"),
                "adql": as_text(body.get("adql"), "adql"),
                "active": as_bool(body.get("active"), "active"),
            }
            if has_topic:
                kwargs["kafka_topic"] = topic
            changes_filter = has_topic or any(v is not None for v in kwargs.values()) or not has_description
            kept = description_of(current)
            if changes_filter:  # one new version, the description with it
                if has_description:
                    kwargs["description"] = description
                f = checked(
                    lambda: broker.filters.update(
                        who, filter_id, expected_version=expected.version, **kwargs
                    ),
                    expected,
                )
                return doc_response(filter_doc(f, description if has_description else kept, stream))
            # only the description: no need to re-validate the query
            precheck(current.version, expected, f"filter {filter_id}")
            f = Filter.from_record(current)
            if description != kept:
                record = checked(lambda: set_description(broker, who, f, description), expected)
                return doc_response(filter_doc(Filter.from_record(record), description, stream))
            return doc_response(filter_doc(f, kept, stream))

        return await respond(work)

    @router.delete("/alerts/{stream}/filters/{filter_id}", status_code=204, summary="delete a filter")
    async def delete_filter(stream: str, filter_id: str, request: Request, who=Depends(identity)) -> Response:
        def work():
            signed_in(who)
            expected = expected_version(request)
            broker = brokers.get(stream, who)
            if expected.version is not None:
                precheck(broker.filters.get(who, filter_id).version, expected, f"filter {filter_id}")
            broker.filters.delete(who, filter_id)
            return Response(status_code=204)

        return await respond(work)

    def pause_route(kind: str, action: str):
        async def handler(stream: str, def_id: str, request: Request, who=Depends(identity)) -> Response:
            def work():
                signed_in(who)
                expected = expected_version(request)
                broker = brokers.get(stream, who)
                svc = getattr(broker, kind)
                if expected.version is not None:
                    current = broker.store.get(kind, def_id, who)
                    precheck(current.version, expected, f"{kind[:-1]} {def_id}")
                changed = getattr(svc, action)(who, def_id)
                if kind == "filters":
                    record = broker.store.get("filters", def_id, who)
                    return doc_response(filter_doc(changed, description_of(record), stream))
                return doc_response(record_doc(changed, stream))

            return await respond(work)

        handler.__name__ = f"{action}_{kind[:-1]}"
        return handler

    for kind in ("filters", "watchlists", "watchmaps"):
        for action, verb in (("pause", "stop"), ("resume", "restart")):
            router.add_api_route(
                f"/alerts/{{stream}}/{kind}/{{def_id}}/{action}",
                pause_route(kind, action),
                methods=["POST"],
                summary=f"{verb} matching this {kind[:-1]} on new batches",
            )

    @router.get("/alerts/{stream}/filters/{filter_id}/results", summary="a filter's stored matches")
    async def filter_results(
        stream: str,
        filter_id: str,
        first_batch: str | None = None,
        last_batch: str | None = None,
        format: str | None = None,
        who=Depends(identity),
    ) -> Response:
        def work():
            first, last = batch_range(first_batch, last_batch)
            broker = brokers.get(stream, signed_in(who))
            f = broker.filters.get(who, filter_id)
            table = broker.filters.results(who, filter_id, first, last)
            infos = {"stream": stream, "filter_id": f.id, "filter_version": str(f.version)}
            return table_response(table, filter_results_meta(broker, f), format, f"{f.id}-results", infos)

        return await respond(work)

    # ------------------------------------------------------------------ watchlists and watchmaps
    def kind_routes(kind: str) -> None:
        one = kind[:-1]
        json_fields = WATCHLIST_JSON_FIELDS if kind == "watchlists" else WATCHMAP_JSON_FIELDS
        json_content = watchlist_json if kind == "watchlists" else watchmap_json

        def upload_kwargs(upload: Upload) -> dict[str, Any]:
            out: dict[str, Any] = {"data": upload.data, "fmt": upload.fmt}
            if kind == "watchlists":
                radius = as_float(upload.fields.get("default_radius_arcsec"), "default_radius_arcsec")
                if radius is not None:
                    out["default_radius_arcsec"] = radius
            return out

        async def list_defs(stream: str, who=Depends(identity)) -> Response:
            def work():
                broker = brokers.get(stream, signed_in(who))
                records = getattr(broker, kind).list(who)
                return {"stream": stream, kind: [record_doc(r, stream) for r in records]}

            return await respond(work)

        async def create_def(stream: str, request: Request, who=Depends(identity)) -> Response:
            try:
                signed_in(who)
                upload = await read_upload(request, json_fields, json_content)
            except Exception as exc:
                return error_response(exc)

            def work():
                broker = brokers.get(stream, who)
                name = as_text(upload.fields.get("name"), "name")
                if not name:
                    raise ApiError(f"name: a {one} needs a name")
                if upload.data is None:
                    raise ApiError(f"no {one} content: {CONTENT_HELP[kind]}")
                active = as_bool(upload.fields.get("active"), "active")
                kwargs = upload_kwargs(upload)
                record = getattr(broker, kind).create(who, name, active=active is not False, **kwargs)
                location = f"{base_url(request)}/alerts/{stream}/{kind}/{record.id}"
                return doc_response(record_doc(record, stream), 201, location)

            return await respond(work)

        async def get_def(stream: str, def_id: str, who=Depends(identity)) -> Response:
            def work():
                broker = brokers.get(stream, signed_in(who))
                return doc_response(record_doc(getattr(broker, kind).get(who, def_id), stream))

            return await respond(work)

        async def edit_def(stream: str, def_id: str, request: Request, who=Depends(identity)) -> Response:
            try:
                signed_in(who)
                body = await json_object(request, EDIT_FIELDS)
                expected = expected_version(request, body.get("version"))
            except Exception as exc:
                return error_response(exc)

            def work():
                broker = brokers.get(stream, who)
                name = as_text(body.get("name"), "name")
                active = as_bool(body.get("active"), "active")
                record = checked(
                    lambda: getattr(broker, kind).update(
                        who, def_id, name=name, active=active, expected_version=expected.version
                    ),
                    expected,
                )
                return doc_response(record_doc(record, stream))

            return await respond(work)

        async def replace_content(
            stream: str, def_id: str, request: Request, who=Depends(identity)
        ) -> Response:
            try:
                signed_in(who)
                upload = await read_upload(request, json_fields, json_content)
                expected = expected_version(request, as_version(upload.fields.pop("version", None)))
            except Exception as exc:
                return error_response(exc)

            def work():
                broker = brokers.get(stream, who)
                if upload.data is None:
                    raise ApiError(f"no {one} content: {CONTENT_HELP[kind]}")
                name = as_text(upload.fields.get("name"), "name") or None
                kwargs = upload_kwargs(upload)
                record = checked(
                    lambda: getattr(broker, kind).update(
                        who, def_id, name=name, expected_version=expected.version, **kwargs
                    ),
                    expected,
                )
                return doc_response(record_doc(record, stream))

            return await respond(work)

        async def delete_def(stream: str, def_id: str, request: Request, who=Depends(identity)) -> Response:
            def work():
                signed_in(who)
                expected = expected_version(request)
                broker = brokers.get(stream, who)
                svc = getattr(broker, kind)
                if expected.version is not None:
                    precheck(svc.get(who, def_id).version, expected, f"{one} {def_id}")
                svc.delete(who, def_id)
                return Response(status_code=204)

            return await respond(work)

        async def hits(
            stream: str,
            def_id: str,
            first_batch: str | None = None,
            last_batch: str | None = None,
            format: str | None = None,
            who=Depends(identity),
        ) -> Response:
            def work():
                first, last = batch_range(first_batch, last_batch)
                broker = brokers.get(stream, signed_in(who))
                table = without_owner(getattr(broker, kind).hits(who, def_id, first, last))
                meta = WATCHLIST_HITS_META if kind == "watchlists" else WATCHMAP_HITS_META
                known = {c.name: c for c in meta.columns} | {BATCH_COLUMN: _BATCH_META}
                infos = {"stream": stream, f"{one}_id": def_id}
                return table_response(table, known, format, f"{def_id}-hits", infos)

            return await respond(work)

        prefix = f"/alerts/{{stream}}/{kind}"
        router.add_api_route(prefix, list_defs, methods=["GET"], summary=f"the caller's {kind}")
        router.add_api_route(
            prefix, create_def, methods=["POST"], status_code=201, summary=f"create a {one} from an upload"
        )
        router.add_api_route(f"{prefix}/{{def_id}}", get_def, methods=["GET"], summary=f"one {one}")
        router.add_api_route(
            f"{prefix}/{{def_id}}", edit_def, methods=["PATCH"], summary=f"rename, pause or resume a {one}"
        )
        router.add_api_route(
            f"{prefix}/{{def_id}}", delete_def, methods=["DELETE"], status_code=204, summary=f"delete a {one}"
        )
        router.add_api_route(
            f"{prefix}/{{def_id}}/{CONTENT_PART[kind]}",
            replace_content,
            methods=["PUT"],
            summary=f"replace the {one}'s {CONTENT_PART[kind]} with a new upload",
        )
        router.add_api_route(f"{prefix}/{{def_id}}/hits", hits, methods=["GET"], summary=f"the {one}'s hits")

    kind_routes("watchlists")
    kind_routes("watchmaps")

    @router.get("/alerts/{stream}/watchlists/{def_id}/sources", summary="a watchlist's sources")
    async def watchlist_sources(
        stream: str, def_id: str, format: str | None = None, who=Depends(identity)
    ) -> Response:
        def work():
            broker = brokers.get(stream, signed_in(who))
            table = broker.watchlists.sources(who, def_id)
            known = {c.name: c for c in _SOURCE_COLUMNS}
            return table_response(table, known, format, f"{def_id}-sources", {"stream": stream})

        return await respond(work)

    @router.get("/alerts/{stream}/watchmaps/{def_id}/moc", summary="a watchmap's MOC")
    async def watchmap_moc(
        stream: str, def_id: str, format: str | None = None, who=Depends(identity)
    ) -> Response:
        def work():
            fmt = (format or "fits").lower()
            if fmt not in _MOC_MEDIA:
                raise ApiError(f"format {format!r}: one of {', '.join(_MOC_MEDIA)}")
            broker = brokers.get(stream, signed_in(who))
            moc = broker.watchmaps.moc(who, def_id)
            data = moc_to_fits(moc) if fmt == "fits" else moc.to_string(format=fmt).encode("utf-8")
            headers = {
                "Content-Disposition": f'inline; filename="{def_id}.{fmt if fmt != "ascii" else "txt"}"'
            }
            return Response(data, media_type=_MOC_MEDIA[fmt], headers=headers)

        return await respond(work)

    return router


CONTENT_PART = {"watchlists": "sources", "watchmaps": "moc"}
CONTENT_HELP = {
    "watchlists": "upload a CSV or VOTable (columns name, ra, dec and optionally radius_arcsec) as a "
    'multipart file, or send JSON {"name": ..., "sources": [{"name": ..., "ra": ..., "dec": ...}]}',
    "watchmaps": "upload a MOC (FITS, JSON or ASCII) as a multipart file, or send JSON "
    '{"name": ..., "moc": {"5": [1, 2]}} or {"name": ..., "moc": "5/1-2"}',
}
