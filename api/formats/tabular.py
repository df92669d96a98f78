"""The other TAP output formats (CSV, TSV, JSON, FITS, Parquet) and the RESPONSEFORMAT registry.

Every writer has the signature of `votable_chunks`: `(columns, schema, batches, *, overflow=None, infos=None,
query=None) -> Iterator[bytes]`, reads the batches one at a time and yields bytes as it goes (FITS is the
exception that cannot: see `fits_chunks`). Cell text comes from the VOTable writer's `text_cells`, so every
format spells a value the same way (shortest round-trip numbers, DALI timestamps).

Overflow (DALI 'Overflow': "there is no defined mechanism to indicate overflow for formats other than
VOTable"): JSON carries `"overflow": true` after the data, Parquet a `QUERY_STATUS=OVERFLOW` key in the file
metadata, FITS an `OVERFLOW = T` header card; CSV and TSV cannot say it.

Failures after the first bytes: JSON reports them in-band (`"query_status": "ERROR"`, `"error"`); the
others cannot, so the exception propagates and the HTTP response is cut short, which a client at least
sees as a broken transfer rather than as a complete, silently truncated table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy.io import fits

from dac_lake.adql.model import OutputColumn

from .dali import TapError
from .votable import (
    TextStyle,
    VoType,
    column_types,
    conform_batch,
    failure_message,
    iter_batches,
    joined_bytes,
    list_children,
    text_cells,
    var_buffers,
    votable_chunks,
)

log = logging.getLogger(__name__)


class Writer(Protocol):
    def __call__(
        self,
        columns: list[OutputColumn],
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        overflow: Callable[[], bool] | None = None,
        infos: Mapping[str, str] | None = None,
        query: str | None = None,
    ) -> Iterator[bytes]: ...


def _large(value: str) -> pa.Scalar:
    return pa.scalar(value, pa.large_string())


def _join_rows(cells: Sequence[pa.Array], sep: str, end: str) -> bytes:
    """Rows `c0 sep c1 sep ... end`, concatenated (Arrow kernels, no per-cell Python)."""
    cells = [c.cast(pa.large_string()) for c in cells]
    rows = cells[0] if len(cells) == 1 else pc.binary_join_element_wise(*cells, _large(sep))
    rows = pc.binary_join_element_wise(rows, _large(end), _large(""))
    return joined_bytes(rows)


# ------------------------------------------------------------------------------------------------ CSV, TSV

#: special values as Python, pandas, Java and TOPCAT read them back
CSV_TEXT = TextStyle("NaN", "Infinity", "-Infinity", "true", "false")
_CSV_QUOTE = r'[",\r\n]'


def _csv_strings(text: pa.Array) -> pa.Array:
    """RFC 4180 quoting: a field with a comma, quote or line break is quoted, quotes doubled. An empty
    string is written `""` so that it stays distinct from a null (an empty field)."""
    need = pc.or_(pc.match_substring_regex(text, _CSV_QUOTE), pc.equal(pc.utf8_length(text), 0))
    if not pc.any(need).as_py():
        return text
    quoted = pc.binary_join_element_wise(
        _large('"'), pc.replace_substring(text, '"', '""').cast(pa.large_string()), _large('"'), _large("")
    )
    return pc.if_else(need, quoted, text.cast(pa.large_string()))


def _csv_header(columns: Sequence[OutputColumn]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([c.name for c in columns])
    return out.getvalue().encode("utf-8")


def csv_chunks(
    columns: list[OutputColumn],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    overflow: Callable[[], bool] | None = None,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
    header: bool = True,
) -> Iterator[bytes]:
    """RFC 4180 CSV (`text/csv;header=present`): CRLF line ends, a header line of column names, null = empty
    field, arrays as space-separated values in one field."""
    types = column_types(columns, schema)
    if header:
        yield _csv_header(columns)
    for batch in iter_batches(batches):
        if not batch.num_rows:
            continue
        cells = []
        for arr, vt in zip(conform_batch(batch, types), types, strict=True):
            text = text_cells(arr, vt, CSV_TEXT)
            if vt.kind == "utf16":
                text = _csv_strings(text)
            cells.append(text.fill_null("") if text.null_count else text)
        yield _join_rows(cells, ",", "\r\n")


def _tsv_clean(text: pa.Array) -> pa.Array:
    """TAP 1.1 'Successful Queries': TSV values may not contain TAB; nor can they hold a line break.
    Both become a space."""
    if not pc.any(pc.match_substring_regex(text, r"[\t\r\n]")).as_py():
        return text
    return pc.replace_substring_regex(text, r"[\t\r\n]", " ")


def tsv_chunks(
    columns: list[OutputColumn],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    overflow: Callable[[], bool] | None = None,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
) -> Iterator[bytes]:
    """IANA text/tab-separated-values with a header line. TAB/CR/LF inside strings become spaces; a null
    and an empty string are both an empty field."""
    types = column_types(columns, schema)
    names = pa.array([c.name for c in columns], pa.large_string())
    yield ("\t".join(_tsv_clean(names).to_pylist()) + "\n").encode("utf-8")
    for batch in iter_batches(batches):
        if not batch.num_rows:
            continue
        cells = []
        for arr, vt in zip(conform_batch(batch, types), types, strict=True):
            text = text_cells(arr, vt, CSV_TEXT)
            if vt.kind == "utf16":
                text = _tsv_clean(text)
            cells.append(text.fill_null("") if text.null_count else text)
        yield _join_rows(cells, "\t", "\n")


# ------------------------------------------------------------------------------------------------- JSON

JSON_TEXT = TextStyle("null", "null", "null", "true", "false")
_JSON_CONTROL = r"[\x00-\x1f]"


def _json_strings(text: pa.Array) -> pa.Array:
    """JSON string literals. Backslash and quote are escaped with Arrow kernels; a column holding control
    characters (rare) is escaped by the json module instead."""
    if len(text) and pc.any(pc.match_substring_regex(text, _JSON_CONTROL)).as_py():
        return pa.array(
            [None if v is None else json.dumps(v, ensure_ascii=False) for v in text.to_pylist()],
            pa.large_string(),
        )
    text = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
    return pc.binary_join_element_wise(_large('"'), text.cast(pa.large_string()), _large('"'), _large(""))


def _json_cells(arr: pa.Array, vt: VoType) -> pa.Array:
    if vt.kind in ("utf16", "ascii", "bytes"):
        return _json_strings(text_cells(arr, vt, JSON_TEXT))
    if vt.kind in ("list", "fixedlist") and not pa.types.is_fixed_size_binary(arr.type):
        rel, values = list_children(arr)
        element = VoType(vt.datatype, "fixed", element=vt.element)
        items = text_cells(values, element, JSON_TEXT)
        items = items.fill_null("null") if items.null_count else items
        lists = pa.LargeListArray.from_arrays(
            pa.array(rel), items.cast(pa.large_string()), mask=arr.is_null()
        )
        inner = pc.binary_join(lists, _large(","))
        return pc.binary_join_element_wise(_large("["), inner, _large("]"), _large(""))
    if vt.kind == "fixedlist":
        return _json_strings(text_cells(arr, vt, JSON_TEXT))
    return text_cells(arr, vt, JSON_TEXT)


def json_metadata(columns: Sequence[OutputColumn], types: Sequence[VoType]) -> list[dict[str, Any]]:
    """One entry per column: name, VOTable datatype (with arraysize/xtype if set), unit, ucd, description."""
    meta = []
    for col, vt in zip(columns, types, strict=True):
        entry: dict[str, Any] = {"name": col.name, "datatype": vt.datatype}
        if vt.arraysize:
            entry["arraysize"] = vt.arraysize
        if vt.xtype:
            entry["xtype"] = vt.xtype
        entry.update(unit=col.unit or "", ucd=col.ucd or "", description=col.description or "")
        meta.append(entry)
    return meta


def json_chunks(
    columns: list[OutputColumn],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    overflow: Callable[[], bool] | None = None,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
) -> Iterator[bytes]:
    """`{"metadata": [...], "data": [[...], ...], "overflow": bool, "query_status": "OK"|"OVERFLOW"|"ERROR"}`,
    streamed row by row. NaN and infinities are null (JSON has neither); timestamps are DALI strings.
    A failure after the first bytes ends the data array and sets `query_status` "ERROR" and `error`."""
    types = column_types(columns, schema)
    head: dict[str, Any] = {"metadata": json_metadata(columns, types)}
    if query is not None:
        head["query"] = query
    if infos:
        head["infos"] = dict(infos)
    yield (json.dumps(head, ensure_ascii=False)[:-1] + ', "data": [').encode("utf-8")
    first = True
    error: str | None = None
    try:
        for batch in iter_batches(batches):
            if not batch.num_rows:
                continue
            cells = []
            for arr, vt in zip(conform_batch(batch, types), types, strict=True):
                text = _json_cells(arr, vt).cast(pa.large_string())
                cells.append(text.fill_null("null") if text.null_count else text)
            inner = cells[0] if len(cells) == 1 else pc.binary_join_element_wise(*cells, _large(","))
            rows = pc.binary_join_element_wise(_large(",\n["), inner, _large("]"), _large(""))
            body = joined_bytes(rows)
            yield body[1:] if first else body  # the first row of the document has no comma before it
            first = False
    except Exception as exc:
        log.exception("JSON result stream failed after its header was sent")
        error = failure_message(exc)
    over = error is None and overflow is not None and bool(overflow())
    tail: dict[str, Any] = {
        "overflow": over,
        "query_status": "ERROR" if error else "OVERFLOW" if over else "OK",
    }
    if error:
        tail["error"] = error
    yield ("\n], " + json.dumps(tail, ensure_ascii=False)[1:] + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------ Parquet

PARQUET_ROW_GROUP = 131072


class _Drain:
    """A write-only file object whose bytes are taken out after each row group (ParquetWriter only writes)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False
        self.pos = 0

    def write(self, data: Any) -> int:
        b = bytes(data)
        self.parts.append(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def parquet_schema(columns: Sequence[OutputColumn], schema: pa.Schema) -> pa.Schema:
    """`schema` with each field's unit/ucd/description (and utype) as Arrow field metadata, which Parquet
    keeps, so pandas/pyarrow users still see what the columns mean."""
    fields = []
    for col, f in zip(columns, schema, strict=True):
        meta = dict(f.metadata or {})
        for key in ("unit", "ucd", "description", "utype"):
            value = getattr(col, key, "") or ""
            if value:
                meta[key.encode()] = value.encode("utf-8")
        fields.append(pa.field(col.name, f.type, f.nullable, meta or None))
    return pa.schema(fields, metadata=schema.metadata)


def parquet_chunks(
    columns: list[OutputColumn],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    overflow: Callable[[], bool] | None = None,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
) -> Iterator[bytes]:
    """Apache Parquet, one row group per ~128k rows, yielded as each is written; the footer (with
    `QUERY_STATUS` and the query in the key-value metadata) comes last, as the format requires."""
    target = parquet_schema(columns, schema)
    sink = _Drain()
    writer = pq.ParquetWriter(sink, target, compression="zstd")
    pending: list[pa.RecordBatch] = []
    rows = 0
    try:
        for batch in iter_batches(batches):
            if not batch.schema.equals(target, check_metadata=False):
                batch = pa.RecordBatch.from_arrays(
                    [batch.column(i).cast(f.type) for i, f in enumerate(target)], schema=target
                )
            pending.append(batch)
            rows += batch.num_rows
            if rows >= PARQUET_ROW_GROUP:
                writer.write_table(pa.Table.from_batches(pending, target))
                pending, rows = [], 0
                chunk = sink.take()
                if chunk:
                    yield chunk
        if pending:
            writer.write_table(pa.Table.from_batches(pending, target))
        meta = {"QUERY_STATUS": "OVERFLOW" if overflow is not None and overflow() else "OK"}
        if query is not None:
            meta["QUERY"] = query
        meta.update({k: str(v) for k, v in (infos or {}).items()})
        writer.add_key_value_metadata(meta)
    finally:
        writer.close()
    yield sink.take()


# --------------------------------------------------------------------------------------------------- FITS

_FITS_CODE = {
    "boolean": "L",
    "unsignedByte": "B",
    "short": "I",
    "int": "J",
    "long": "K",
    "float": "E",
    "double": "D",
}
_FITS_NULL = {"I": -(2**15), "J": -(2**31), "K": -(2**63)}
_FITS_DTYPE = {"L": "u1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def _ascii(text: str) -> str:
    """FITS headers are ASCII: other characters become '?'."""
    return text.encode("ascii", "replace").decode("ascii")


@dataclass
class _FitsColumn:
    """Per-column facts gathered while spooling, which the header needs before the first row."""

    vt: VoType
    text: bool  # written as a fixed-width 'A' string (text, timestamps, variable arrays)
    nulls: int = 0
    width: int = 1
    code: str = field(default="")
    repeat: int = 1
    low: int | None = None  # smallest and largest integer seen, to pick a TNULL outside the data
    high: int | None = None

    def tnull(self) -> int | None:
        """TNULLn for an integer column with nulls: the type's minimum, else its maximum when the minimum
        occurs in the data (only a column holding both extremes and nulls is ambiguous)."""
        code = "I" if self.code == "B" and self.nulls else self.code
        if not self.nulls or code not in _FITS_NULL:
            return None
        lowest = _FITS_NULL[code]
        if self.low is None or self.low > lowest:
            return lowest
        highest = -lowest - 1
        return highest if self.high is None or self.high < highest else lowest


def _fits_plan(vt: VoType) -> _FitsColumn:
    if vt.kind in ("fixed", "bool"):
        return _FitsColumn(vt, False, code=_FITS_CODE[vt.datatype])
    if vt.kind == "fixedlist" and not pa.types.is_fixed_size_binary(vt.arrow):
        return _FitsColumn(vt, False, code=_FITS_CODE[vt.datatype], repeat=int(vt.arraysize or 1))
    return _FitsColumn(vt, True, code="A")


def _fits_text(arr: pa.Array, plan: _FitsColumn) -> pa.Array:
    text = text_cells(arr, plan.vt)
    return text.fill_null("") if text.null_count else text


def _fits_record(arrays: list[pa.Array], plans: list[_FitsColumn]) -> bytes:
    """The big-endian FITS rows of one batch (numpy record array; strings scattered as UTF-8 bytes)."""
    n = len(arrays[0])
    specs = []
    for i, p in enumerate(plans):
        if p.text:
            specs.append((f"c{i}", "u1", (p.width,)))
        else:
            code = "I" if p.code == "B" and p.nulls else p.code
            specs.append(
                (f"c{i}", _FITS_DTYPE[code], (p.repeat,)) if p.repeat > 1 else (f"c{i}", _FITS_DTYPE[code])
            )
    rec = np.zeros(n, dtype=np.dtype(specs))
    for i, (arr, p) in enumerate(zip(arrays, plans, strict=True)):
        name = f"c{i}"
        if p.text:  # scatter each row's UTF-8 bytes to the start of its zero-padded slot
            rel, raw = var_buffers(_fits_text(arr, p).cast(pa.large_string()))
            dest = np.repeat(np.arange(n, dtype=np.int64) * p.width - rel[:-1], np.diff(rel)) + np.arange(
                raw.size
            )
            slots = np.zeros(n * p.width, np.uint8)
            slots[dest] = raw
            rec[name] = slots.reshape(n, p.width)
        elif p.code == "L":
            values = (arr.fill_null(False) if arr.null_count else arr).to_numpy(zero_copy_only=False)
            codes = np.where(values, np.uint8(ord("T")), np.uint8(ord("F")))
            if arr.null_count:
                codes[arr.is_null().to_numpy(zero_copy_only=False)] = 0  # FITS: a zero byte is a null logical
            rec[name] = codes
        else:
            code = "I" if p.code == "B" and p.nulls else p.code
            tnull = p.tnull()
            fill: float = float("nan") if code in "ED" else (tnull if tnull is not None else 0)
            if p.repeat > 1:
                _, child = list_children(arr)
                values = child.fill_null(fill).to_numpy(zero_copy_only=False).reshape(n, p.repeat).copy()
                if arr.null_count:
                    values[arr.is_null().to_numpy(zero_copy_only=False)] = fill
                rec[name] = values
            else:
                rec[name] = (arr.fill_null(fill) if arr.null_count else arr).to_numpy(zero_copy_only=False)
    return rec.tobytes()


def fits_header(
    columns: Sequence[OutputColumn], plans: Sequence[_FitsColumn], nrows: int, over: bool
) -> bytes:
    """Primary HDU plus the BINTABLE header, built by astropy (so card syntax, CONTINUE for long values and
    padding are right). Units go to TUNITn; UCDs and descriptions to TUCDn/TCOMMn, the convention STIL and
    TOPCAT read (FITS has no standard keyword for them)."""
    fcols = []
    for col, p in zip(columns, plans, strict=True):
        if p.text:
            fmt, null = f"{p.width}A", None
        else:
            code = "I" if p.code == "B" and p.nulls else p.code
            fmt = f"{p.repeat}{code}" if p.repeat > 1 else code
            null = p.tnull()
        fcols.append(fits.Column(name=_ascii(col.name), format=fmt, null=null, unit=_ascii(col.unit) or None))
    hdu = fits.BinTableHDU.from_columns(fits.ColDefs(fcols), nrows=0)
    hdr = hdu.header
    hdr["NAXIS2"] = nrows
    for i, (col, p) in enumerate(zip(columns, plans, strict=True), start=1):
        if col.ucd:
            hdr[f"TUCD{i}"] = _ascii(col.ucd)
        if col.description:
            hdr[f"TCOMM{i}"] = _ascii(col.description)
        if p.vt.xtype:
            hdr[f"TXTYP{i}"] = p.vt.xtype  # not standard FITS: says the string is a DALI timestamp
    hdr["EXTNAME"] = "RESULT"
    if over:
        hdr["OVERFLOW"] = (True, "result truncated (DALI QUERY_STATUS=OVERFLOW)")
    primary = fits.PrimaryHDU().header
    primary["EXTEND"] = True
    return primary.tostring().encode("ascii") + hdr.tostring().encode("ascii")


def fits_chunks(
    columns: list[OutputColumn],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    overflow: Callable[[], bool] | None = None,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
    spool_dir: str | None = None,
) -> Iterator[bytes]:
    """A FITS file: empty primary HDU plus one binary table.

    FITS cannot be streamed as it is computed: the header needs the row count (NAXIS2) and the width of
    every string column (TFORMn = 'wA') before the first row. So the batches are first spooled to a
    temporary Arrow IPC file (in `spool_dir`, the system temp dir by default) while counting rows, nulls and
    string widths; then the header is written and the spool is read back and encoded batch by batch. The
    cost: the whole result once on local disk, and no byte is sent before the last row was computed (time
    to first byte = query time). Memory stays at one batch.

    Mapping: numbers and booleans to L/B/I/J/K/E/D (int8 as I; unsignedByte as I when it has nulls), integer
    nulls via TNULLn (the type's minimum), float nulls NaN, boolean nulls a zero byte; strings, timestamps
    and variable-length arrays as fixed-width 'A' text (non-ASCII as UTF-8 bytes, beyond the FITS standard;
    null and empty strings are both blank); fixed-size numeric arrays as repeated columns.
    """
    types = column_types(columns, schema)
    plans = [_fits_plan(vt) for vt in types]
    nrows = 0
    spool_schema = None
    with tempfile.TemporaryFile(dir=spool_dir, prefix="dac-fits-") as spool:
        sink = pa.PythonFile(spool, mode="w")
        writer = None
        for batch in iter_batches(batches):
            if not batch.num_rows:
                continue
            arrays = conform_batch(batch, types)
            for arr, p in zip(arrays, plans, strict=True):
                p.nulls += arr.null_count
                if p.text:
                    lengths = pc.binary_length(_fits_text(arr, p))
                    p.width = max(p.width, pc.max(lengths).as_py() or 0)
                elif p.code in "BIJK" and len(arr):
                    values = list_children(arr)[1] if p.repeat > 1 else arr
                    bounds = pc.min_max(values).as_py()
                    if bounds["min"] is not None:
                        p.low = bounds["min"] if p.low is None else min(p.low, bounds["min"])
                        p.high = bounds["max"] if p.high is None else max(p.high, bounds["max"])
            rb = pa.RecordBatch.from_arrays(arrays, names=[f"c{i}" for i in range(len(arrays))])
            if writer is None:
                spool_schema = rb.schema
                writer = pa.ipc.new_stream(sink, spool_schema)
            writer.write_batch(rb)
            nrows += rb.num_rows
        if writer is not None:
            writer.close()
        over = overflow is not None and bool(overflow())
        header = fits_header(columns, plans, nrows, over)
        yield header
        size = 0
        if writer is not None:
            spool.seek(0)
            reader = pa.ipc.open_stream(pa.PythonFile(spool, mode="r"))
            for rb in reader:
                chunk = _fits_record(list(rb.columns), plans)
                size += len(chunk)
                yield chunk
        if size % 2880:
            yield b"\0" * (2880 - size % 2880)


# -------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class OutputFormat:
    """A resolved RESPONSEFORMAT: `media_type` is the Content-Type to answer with (DALI 'RESPONSEFORMAT':
    the one the client asked for when it asked with a media type), `writer` streams the document,
    `extension` names an async result file."""

    name: str
    media_type: str
    writer: Writer
    extension: str
    ivo_id: str | None = None


@dataclass(frozen=True)
class CapabilityFormat:
    """One TAPRegExt `outputFormat`: `<outputFormat ivo-id=..><mime>..</mime><alias>..</alias>..`."""

    mime: str
    aliases: tuple[str, ...]
    ivo_id: str | None = None


_VOTABLE = "application/x-votable+xml"
_B2 = "ivo://ivoa.net/std/TAPRegExt#output-votable-binary2"
_TD = "ivo://ivoa.net/std/TAPRegExt#output-votable-td"
_WRITE_B2 = partial(votable_chunks, serialization="binary2")
_WRITE_TD = partial(votable_chunks, serialization="tabledata")


def _fmt(name: str, media: str, writer: Writer, ext: str, ivo_id: str | None = None) -> OutputFormat:
    return OutputFormat(name, media, writer, ext, ivo_id)


#: RESPONSEFORMAT / FORMAT value (short name or media type, as written in the capabilities) -> format.
#: A media type answers with itself as Content-Type (DALI 'RESPONSEFORMAT'); a short name with the default.
FORMATS: dict[str, OutputFormat] = {
    "votable": _fmt("votable", _VOTABLE, _WRITE_B2, "xml", _B2),
    "votable/b2": _fmt("votable", f"{_VOTABLE};serialization=BINARY2", _WRITE_B2, "xml", _B2),
    "votable/td": _fmt("votable/td", f"{_VOTABLE};serialization=TABLEDATA", _WRITE_TD, "xml", _TD),
    _VOTABLE: _fmt("votable", _VOTABLE, _WRITE_B2, "xml", _B2),
    f"{_VOTABLE};serialization=BINARY2": _fmt(
        "votable", f"{_VOTABLE};serialization=BINARY2", _WRITE_B2, "xml", _B2
    ),
    f"{_VOTABLE};serialization=TABLEDATA": _fmt(
        "votable/td", f"{_VOTABLE};serialization=TABLEDATA", _WRITE_TD, "xml", _TD
    ),
    "text/xml": _fmt("votable", "text/xml", _WRITE_B2, "xml", _B2),
    "csv": _fmt("csv", "text/csv;header=present", csv_chunks, "csv"),
    "text/csv": _fmt("csv", "text/csv;header=present", csv_chunks, "csv"),
    "text/csv;header=present": _fmt("csv", "text/csv;header=present", csv_chunks, "csv"),
    "text/csv;header=absent": _fmt("csv", "text/csv;header=absent", partial(csv_chunks, header=False), "csv"),
    "tsv": _fmt("tsv", "text/tab-separated-values", tsv_chunks, "tsv"),
    "text/tab-separated-values": _fmt("tsv", "text/tab-separated-values", tsv_chunks, "tsv"),
    "json": _fmt("json", "application/json", json_chunks, "json"),
    "application/json": _fmt("json", "application/json", json_chunks, "json"),
    "fits": _fmt("fits", "application/fits", fits_chunks, "fits"),
    "application/fits": _fmt("fits", "application/fits", fits_chunks, "fits"),
    "parquet": _fmt("parquet", "application/vnd.apache.parquet", parquet_chunks, "parquet"),
    "application/vnd.apache.parquet": _fmt(
        "parquet", "application/vnd.apache.parquet", parquet_chunks, "parquet"
    ),
}
#: other spellings clients use, resolved like the FORMATS key they point to
ALIASES = {
    "votable/binary2": "votable/b2",
    "votableb2": "votable/b2",
    "votable/tabledata": "votable/td",
    "votabletd": "votable/td",
    "text/tsv": "tsv",
    "image/fits": "fits",
    "application/x-parquet": "parquet",
}


def _normalise(value: str) -> str:
    """A RESPONSEFORMAT value in canonical form: lower case, no spaces, media-type parameters sorted,
    `charset=utf-8` dropped (every format here is UTF-8)."""
    base, *params = value.split(";")
    pairs = []
    for p in params:
        if not p.strip():
            continue
        key, eq, val = p.partition("=")
        key, val = key.strip().lower(), val.strip().strip('"').lower()
        if key == "charset" and val in ("utf-8", "utf8"):
            continue
        pairs.append(f"{key}{eq}{val}")
    return ";".join(["".join(base.split()).lower(), *sorted(pairs)])


_INDEX = {_normalise(k): v for k, v in FORMATS.items()} | {
    _normalise(alias): FORMATS[target] for alias, target in ALIASES.items()
}


def accepted_values() -> list[str]:
    """Every RESPONSEFORMAT value this service accepts (for error messages and documentation)."""
    return [*FORMATS, *ALIASES]


def resolve_format(value: str | None) -> OutputFormat:
    """The format for a RESPONSEFORMAT (or TAP 1.0 FORMAT) value; None or blank means VOTable (TAP 1.1
    'FORMAT and RESPONSEFORMAT'). Matching ignores case, spaces and the order of media-type parameters.
    Unknown values raise TapError(400) listing what is accepted."""
    if value is None or not value.strip():
        return FORMATS["votable"]
    fmt = _INDEX.get(_normalise(value))
    if fmt is None:
        raise TapError(
            f"unsupported RESPONSEFORMAT {value.strip()!r}; this service accepts: "
            + ", ".join(accepted_values()),
            400,
        )
    return fmt


def capability_formats() -> list[CapabilityFormat]:
    """What the TAPRegExt capability declares: one `outputFormat` per format, its media type and the other
    values (short names included) that select it."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key, fmt in FORMATS.items():
        groups.setdefault((fmt.name, fmt.ivo_id or ""), []).append(key)
    for alias, target in ALIASES.items():
        fmt = FORMATS[target]
        groups[(fmt.name, fmt.ivo_id or "")].append(alias)
    preferred = {
        "votable": f"{_VOTABLE};serialization=BINARY2",
        "votable/td": f"{_VOTABLE};serialization=TABLEDATA",
    }
    out = []
    for (name, ivo_id), keys in groups.items():
        mime = preferred.get(name, FORMATS[name].media_type)
        aliases = tuple(k for k in keys if k != mime and "absent" not in k)
        out.append(CapabilityFormat(mime, aliases, ivo_id or None))
        if name == "csv":
            out.append(CapabilityFormat("text/csv;header=absent", (), None))
    return out
