"""TAP request parameters: case-insensitive names, validated values, the UPLOAD list (pure functions).

TAP 1.1 / DALI: parameter names are case-insensitive, values are not; a parameter given twice with
different values is an error for the single-valued ones. REQUEST=doQuery is optional in TAP 1.1 (TAP 1.0
clients still send it). LANG accepts ADQL and its versioned names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from api.formats import TapError

LANGS = {"adql", "adql-2.0", "adql-2.1"}
_UPLOAD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class UploadRef:
    """One entry of UPLOAD=name,uri: `param:x` names a multipart part; http(s) URIs are fetched."""

    name: str
    uri: str

    @property
    def param(self) -> str | None:
        return self.uri[len("param:") :] if self.uri.startswith("param:") else None


@dataclass(frozen=True)
class TapQuery:
    """A validated TAP query request."""

    query: str
    maxrec: int
    response_format: str | None
    uploads: tuple[UploadRef, ...] = ()
    run_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def fold(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Parameters by upper-case name, values in order."""
    out: dict[str, list[str]] = {}
    for name, value in items:
        out.setdefault(name.upper(), []).append(value)
    return out


def single(params: dict[str, list[str]], name: str) -> str | None:
    values = [v for v in params.get(name, []) if v != ""] or params.get(name, [])
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1:
        raise TapError(f"parameter {name} was given {len(distinct)} different values; give it once", 400)
    return distinct[0] if distinct else None


def parse_uploads(values: list[str]) -> tuple[UploadRef, ...]:
    """UPLOAD=name,uri[;name2,uri2] (possibly repeated): TAP 1.1 section 3.5."""
    refs: list[UploadRef] = []
    for value in values:
        for item in filter(None, (p.strip() for p in value.split(";"))):
            name, sep, uri = item.partition(",")
            name, uri = name.strip(), uri.strip()
            if not sep or not uri:
                raise TapError(f"UPLOAD entry {item!r} must be 'name,param:part' or 'name,http://...'", 400)
            if not _UPLOAD_NAME.match(name):
                raise TapError(
                    f"upload name {name!r}: use a letter then letters, digits or '_' "
                    f"(it becomes TAP_UPLOAD.{name})",
                    400,
                )
            if not (uri.startswith("param:") or uri.startswith(("http://", "https://"))):
                raise TapError(
                    f"UPLOAD {name}: unsupported URI {uri!r}; use param:NAME or an http(s) URL", 400
                )
            if any(r.name.lower() == name.lower() for r in refs):
                raise TapError(f"UPLOAD names table {name!r} twice", 400)
            refs.append(UploadRef(name, uri))
    return tuple(refs)


def parse_query(params: dict[str, list[str]], *, maxrec_default: int, maxrec_max: int) -> TapQuery:
    """Validate a doQuery request (sync, or an async job's parameters when it runs)."""
    request = single(params, "REQUEST")
    if request is not None and request.lower() != "doquery":
        raise TapError(f"REQUEST={request} is not supported; this service answers REQUEST=doQuery", 400)
    lang = single(params, "LANG")
    if lang is None:
        raise TapError("missing parameter LANG: send LANG=ADQL", 400)
    if lang.lower() not in LANGS:
        raise TapError(f"LANG={lang} is not supported; this service speaks ADQL (2.0 and 2.1)", 400)
    query = single(params, "QUERY")
    if query is None or not query.strip():
        raise TapError("missing parameter QUERY: send the ADQL query text", 400)
    raw_maxrec = single(params, "MAXREC")
    if raw_maxrec is None or raw_maxrec == "":
        maxrec = maxrec_default
    else:
        try:
            maxrec = int(raw_maxrec)
        except ValueError:
            raise TapError(f"MAXREC={raw_maxrec!r} is not a whole number", 400) from None
        if maxrec < 0:
            raise TapError(f"MAXREC={maxrec}: give 0 (metadata only) or a positive number of rows", 400)
        maxrec = min(maxrec, maxrec_max)
    fmt = single(params, "RESPONSEFORMAT") or single(params, "FORMAT")
    return TapQuery(
        query=query,
        maxrec=maxrec,
        response_format=fmt,
        uploads=parse_uploads(params.get("UPLOAD", [])),
        run_id=single(params, "RUNID"),
    )
