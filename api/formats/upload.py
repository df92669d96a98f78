"""TAP uploads (DALI and TAP 1.1, 'UPLOAD'): an inline VOTable -> an Arrow table the engine can query.

Any serialization astropy reads is accepted (TABLEDATA, BINARY, BINARY2, FITS inside VOTable), which covers
what TOPCAT, STILTS and pyvo send. Decisions, and why:

* Column names are kept exactly as the FIELD `name`: TAP 1.1 ('UPLOAD') says the FIELD name *is* the column
  name and that services must support delimited identifiers for names that are not regular ADQL ones
  (the translator does). A name is refused (400) only when it cannot work at all: empty, holding control
  characters, longer than 128 characters, equal to another column's name ignoring case (ADQL resolves
  names case-insensitively, so one of them could never be selected), or `_healpix_29`, the spatial index
  column the engine adds.
* Types map onto `dac_lake.adql.model.DATATYPES`: boolean/bit -> bool, unsignedByte/short -> int16,
  int -> int32, long -> int64, float -> float32, double -> float64, char/unicodeChar -> string, and
  `xtype="timestamp"` strings -> timestamp (TAP 1.1 asks services to store extended types in a proper
  column type). Array-valued columns (other than strings) and complex numbers have no ADQL type here:
  they are dropped and a note says so (`UploadTable.notes`, for an INFO in the result) rather than
  refusing the whole upload, since TOPCAT uploads every column of a table even when the query uses two.
* Masked cells (empty TD, BINARY2 null flags, VALUES null) become Arrow nulls; NaN stays NaN.
* Limits are checked on the bytes before parsing and on the rows after, with messages that say what to do.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from astropy.io.votable import parse as parse_votable

from dac_lake.adql.model import ColumnMeta

from .dali import TapError

#: DALI 'UPLOAD': upload names are letters, digits and '_', starting with a letter
UPLOAD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_NAME_LENGTH = 128
RESERVED_COLUMNS = frozenset({"_healpix_29"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_SCALAR = {
    "boolean": ("bool", pa.bool_()),
    "bit": ("bool", pa.bool_()),
    "unsignedByte": ("int16", pa.int16()),
    "short": ("int16", pa.int16()),
    "int": ("int32", pa.int32()),
    "long": ("int64", pa.int64()),
    "float": ("float32", pa.float32()),
    "double": ("float64", pa.float64()),
}

#: usual (ra, dec) name pairs, most specific first; compared case-insensitively
_POSITION_NAMES = (
    ("ra", "dec"),
    ("raj2000", "dej2000"),
    ("raj2000", "decj2000"),
    ("ra_j2000", "dec_j2000"),
    ("_raj2000", "_dej2000"),
    ("ra_icrs", "de_icrs"),
    ("ra_icrs", "dec_icrs"),
    ("ra2000", "dec2000"),
    ("ra_deg", "dec_deg"),
    ("alpha", "delta"),
    ("alpha_j2000", "delta_j2000"),
    ("ra", "de"),
    ("ra", "decl"),
)
_DEGREES = ("", "deg", "degree", "degrees")
_NUMERIC = ("int16", "int32", "int64", "float32", "float64")


@dataclass
class UploadTable:
    """A parsed upload: the rows, their column metadata, and the position columns (ICRS degrees) when they
    could be recognised, so the engine can HEALPix-index the table. `notes` lists what was dropped."""

    name: str
    table: pa.Table
    columns: list[ColumnMeta]
    ra_column: str | None = None
    dec_column: str | None = None
    notes: list[str] = field(default_factory=list)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"


def check_upload_name(name: str) -> str:
    """The upload's table name, validated (it is used as TAP_UPLOAD.<name> in ADQL)."""
    if not UPLOAD_NAME.fullmatch(name or "") or len(name) > MAX_NAME_LENGTH:
        raise TapError(
            f"upload name {name!r} is not usable: it must start with a letter and contain only letters, "
            f"digits and '_' (at most {MAX_NAME_LENGTH} characters), as in UPLOAD=mytable,param:file",
            400,
        )
    return name


_NROWS = re.compile(rb"<(?:[\w.-]+:)?TABLE\b[^>]*?\bnrows\s*=\s*[\"'](\d+)[\"']")
_TR = re.compile(rb"<(?:[\w.-]+:)?TR[\s>/]")


def quick_row_count(data: bytes) -> int | None:
    """The row count of the first table when it is cheap to know before parsing (a TABLE `nrows`
    attribute, or counting TR elements of TABLEDATA), so an oversized upload is refused without spending
    seconds in the parser; None when only parsing can tell (BINARY, BINARY2, FITS)."""
    head = _NROWS.search(data, 0, 1 << 20)
    if head:
        return int(head.group(1))
    start = data.find(b"TABLEDATA")
    if start >= 0:
        return len(_TR.findall(data, start))
    return None


def _too_many_rows(name: str, nrows: int, max_rows: int) -> TapError:
    return TapError(
        f"upload '{name}' has {nrows:,} rows; this service accepts at most {max_rows:,}: split it into "
        "several queries or select fewer rows before uploading",
        413,
    )


def _check_column_names(upload: str, names: list[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        if not name.strip():
            raise TapError(f"upload '{upload}' has a column without a name; give every FIELD a name", 400)
        if _CONTROL.search(name):
            raise TapError(f"upload '{upload}': column name {name!r} contains control characters", 400)
        if len(name) > MAX_NAME_LENGTH:
            raise TapError(
                f"upload '{upload}': column name {name[:40]!r}... is longer than {MAX_NAME_LENGTH} "
                "characters",
                400,
            )
        folded = name.casefold()
        if folded in RESERVED_COLUMNS:
            raise TapError(
                f"upload '{upload}': column name '{name}' is reserved by this service (it holds the spatial "
                "index); rename that column",
                400,
            )
        if folded in seen:
            raise TapError(
                f"upload '{upload}' has two columns named '{seen[folded]}' and '{name}'; ADQL compares "
                "column names case-insensitively, so rename one of them",
                400,
            )
        seen[folded] = name


def _timestamps(upload: str, name: str, values: np.ndarray, mask: np.ndarray) -> pa.Array:
    """DALI timestamps (YYYY-MM-DD['T'hh:mm:ss[.SSS]['Z']]) -> timestamp[us] (UTC, no zone)."""
    texts = [None if m else str(v).strip().removesuffix("Z") for v, m in zip(values, mask, strict=True)]
    texts = [None if t == "" else t for t in texts]
    try:
        parsed = np.array(["NaT" if t is None else t for t in texts], dtype="datetime64[us]")
    except ValueError as exc:
        raise TapError(
            f"upload '{upload}': column '{name}' is declared xtype=\"timestamp\" but holds a value that is "
            f"not a DALI timestamp (YYYY-MM-DDThh:mm:ss): {exc}",
            400,
        ) from None
    return pa.array(parsed, pa.timestamp("us"), mask=np.isnat(parsed))


def _strings(values: np.ndarray, mask: np.ndarray) -> pa.Array:
    try:  # str or unicode numpy arrays convert in C
        return pa.array(values, pa.string(), mask=mask if mask.any() else None)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    out = []
    for v, m in zip(values, mask, strict=True):
        if m or v is None:
            out.append(None)
        elif isinstance(v, bytes):
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append(str(v))
    return pa.array(out, pa.string())


def _convert(upload: str, fld, column) -> tuple[str, pa.Array] | str:
    """(datatype, Arrow array) of one VOTable column, or the reason it is dropped."""
    data = np.ma.getdata(column)
    mask = np.ma.getmaskarray(column)
    datatype = fld.datatype
    arraysize = fld.arraysize
    if datatype in ("char", "unicodeChar"):
        if data.ndim > 1:
            return f"it is a {data.ndim - 1}-dimensional array of strings"
        if mask.ndim > 1:
            mask = mask.any(axis=tuple(range(1, mask.ndim)))
        if (fld.xtype or "").lower() == "timestamp":
            return "timestamp", _timestamps(upload, fld.name, data, mask)
        return "string", _strings(data, mask)
    if datatype not in _SCALAR:
        return f"its datatype {datatype} has no ADQL equivalent here"
    if arraysize is not None or data.ndim > 1 or data.dtype == object:
        return f"it is an array ({datatype}, arraysize={arraysize})"
    kind, arrow = _SCALAR[datatype]
    values = data.astype(arrow.to_pandas_dtype(), copy=False)
    return kind, pa.array(values, arrow, mask=mask if mask.any() else None)


def _unit(unit) -> str:
    """astropy parses FIELD units; give back the VOUnit string (or the raw text it could not parse)."""
    if unit is None:
        return ""
    try:
        return unit.to_string("vounit")
    except Exception:
        return str(unit)


def _ucd_words(ucd: str) -> list[str]:
    return [w.strip().lower() for w in (ucd or "").split(";") if w.strip()]


def guess_position(columns: list[ColumnMeta]) -> tuple[str | None, str | None]:
    """(ra, dec) column names: by UCD (pos.eq.ra;meta.main first, then pos.eq.ra), else by usual names.
    Only numeric columns in degrees (or without unit) qualify; both or neither are returned."""
    usable = [c for c in columns if c.datatype in _NUMERIC and c.unit.strip().lower() in _DEGREES]

    def by_ucd(word: str, main: bool) -> str | None:
        for c in usable:
            words = _ucd_words(c.ucd)
            if words and words[0] == word and (not main or "meta.main" in words):
                return c.name
        return None

    for main in (True, False):
        ra, dec = by_ucd("pos.eq.ra", main), by_ucd("pos.eq.dec", main)
        if ra and dec:
            return ra, dec
    folded = {c.name.casefold(): c.name for c in usable}
    for ra_name, dec_name in _POSITION_NAMES:
        if ra_name in folded and dec_name in folded:
            return folded[ra_name], folded[dec_name]
    ra = next((folded[r] for r, _ in _POSITION_NAMES if r in folded), None)
    dec = next((folded[d] for _, d in _POSITION_NAMES if d in folded), None)
    return (ra, dec) if ra and dec else (None, None)


def parse_votable_upload(data: bytes, name: str, *, max_rows: int, max_bytes: int) -> UploadTable:
    """Parse the first table of an uploaded VOTable. Raises TapError 413 over the limits, 400 when the
    document or a column cannot be used."""
    check_upload_name(name)
    if len(data) > max_bytes:
        raise TapError(
            f"upload '{name}' is {_size(len(data))}; this service accepts at most {_size(max_bytes)} per "
            "upload: upload fewer rows or only the columns the query needs",
            413,
        )
    early = quick_row_count(data)
    if early is not None and early > max_rows:
        raise _too_many_rows(name, early, max_rows)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            votable = parse_votable(io.BytesIO(data), verify="ignore")
            tables = list(votable.iter_tables())
    except Exception as exc:
        raise TapError(f"upload '{name}' is not a VOTable this service can read: {exc}", 400) from None
    if not tables:
        raise TapError(f"upload '{name}' is a VOTable without a TABLE", 400)
    vtable = tables[0]
    array = vtable.array
    nrows = len(array)
    if nrows > max_rows:
        raise _too_many_rows(name, nrows, max_rows)
    fields = list(vtable.fields)
    names = [(f.name or "").strip() for f in fields]
    _check_column_names(name, names)
    arrays: list[pa.Array] = []
    columns: list[ColumnMeta] = []
    notes: list[str] = []
    for i, fld in enumerate(fields):
        converted = _convert(name, fld, array[array.dtype.names[i]])
        if isinstance(converted, str):
            notes.append(f"upload '{name}': column '{names[i]}' was not loaded because {converted}")
            continue
        kind, arr = converted
        arrays.append(arr)
        columns.append(
            ColumnMeta(
                names[i],
                kind,
                unit=_unit(fld.unit),
                ucd=fld.ucd or "",
                description=(fld.description or "").strip(),
            )
        )
    if not columns:
        raise TapError(f"upload '{name}' has no column this service can load: " + "; ".join(notes), 400)
    table = pa.Table.from_arrays(arrays, names=[c.name for c in columns])
    ra, dec = guess_position(columns)
    return UploadTable(name, table, columns, ra, dec, notes)
