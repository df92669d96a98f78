"""Streaming VOTable 1.4 writer (BINARY2 and TABLEDATA) for TAP results.

Why streaming: a TAP result can be far larger than the service's memory, and TAP 1.1 ('Overflows') and
DALI ('Overflow', 'Errors') are designed for it: the status INFO before the TABLE says OK, and an overflow
(or a failure while writing) is reported by a second `QUERY_STATUS` INFO *after* the TABLE. So the header
is yielded before the first batch is read, each Arrow batch is encoded and yielded on its own, and only
then is `overflow()` asked.

Type mapping (Arrow -> VOTable FIELD), decided from the Arrow schema because that is what is encoded:

    bool -> boolean            int8, int16 -> short (VOTable has no signed byte)   uint8 -> unsignedByte
    int32, uint16 -> int       int64, uint32, uint64 -> long                      float16, float32 -> float
    float64, decimal -> double
    timestamp, date -> char arraysize="*" xtype="timestamp" (DALI 'Timestamp': ISO 8601, UTC, no zone)
    string -> unicodeChar arraysize="*"      binary -> unsignedByte arraysize="*"
    list<number> -> <number> arraysize="*"   fixed_size_list<number>[n] -> <number> arraysize="n"
    anything else -> unicodeChar arraysize="*" holding the value's text

Strings are declared `unicodeChar`, not `char`. VOTable 1.4 ('Primitives') defines `char` as 7-bit ASCII
and astropy (hence pyvo) decodes BINARY/BINARY2 `char` data strictly as ASCII, so the common practice of
writing UTF-8 bytes into `char` makes pyvo fail on the first non-ASCII value. A streaming writer cannot
look at the data before writing the FIELD, so every string column is `unicodeChar` (UTF-16BE in BINARY2:
2 bytes per character, characters beyond U+FFFF as surrogate pairs, which is what astropy and STIL read).
Timestamps are ASCII by construction and stay `char`, as DALI requires.

Nulls: BINARY2 sets the per-cell null flag (VOTable 1.4 'BINARY2 Serialization') and writes NaN (floats),
0 (integers), '?' (booleans) or a zero-length array in the cell; TABLEDATA writes an empty TD. NaN stays
NaN (distinct from null in BINARY2). Null *elements* inside numeric arrays have no representation: NaN for
floats, 0 for integers. No VALUES null="..." magic values are written (deprecated since VOTable 1.3).

Speed: each batch is encoded with numpy/Arrow kernels, never a Python loop over cells: fixed-width cells
(and the null-flag bytes) go into a packed big-endian numpy record array, variable-length cells become
Arrow binary arrays (length prefix in the record, payload built from the Arrow buffers), and
`binary_join_element_wise` concatenates the pieces of every row in C++. Base64 is applied per batch with
the 0-2 leftover bytes carried to the next one.
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.adql.model import OutputColumn

from .dali import VOTABLE_OPEN, XML_DECL, TapError, xml_attr, xml_text

log = logging.getLogger(__name__)

#: rows encoded at once: bounds the temporary arrays of one encoding step whatever the batch size
CHUNK_ROWS = 65536
SERIALIZATIONS = ("binary2", "tabledata")


# --------------------------------------------------------------------------------------------- type mapping


@dataclass(frozen=True)
class VoType:
    """How one result column is declared and encoded.

    `kind` selects the encoder: "bool", "fixed" (numbers), "utf16" (unicodeChar text), "ascii" (char text:
    timestamps), "bytes" (unsignedByte arrays), "list"/"fixedlist" (numeric arrays).
    `arrow` is the type every batch's column is cast to before encoding (None: the encoder handles it).
    `element` is the big-endian numpy dtype of one number (fixed, list, fixedlist kinds).
    """

    datatype: str
    kind: str
    arraysize: str | None = None
    xtype: str | None = None
    arrow: pa.DataType | None = None
    element: str | None = None

    @property
    def is_float(self) -> bool:
        return self.datatype in ("float", "double")


_NUMERIC: dict[Any, tuple[str, pa.DataType, str]] = {
    pa.int8(): ("short", pa.int16(), ">i2"),
    pa.int16(): ("short", pa.int16(), ">i2"),
    pa.uint8(): ("unsignedByte", pa.uint8(), "u1"),
    pa.uint16(): ("int", pa.int32(), ">i4"),
    pa.int32(): ("int", pa.int32(), ">i4"),
    pa.uint32(): ("long", pa.int64(), ">i8"),
    pa.int64(): ("long", pa.int64(), ">i8"),
    pa.uint64(): ("long", pa.int64(), ">i8"),
    pa.float16(): ("float", pa.float32(), ">f4"),
    pa.float32(): ("float", pa.float32(), ">f4"),
    pa.float64(): ("double", pa.float64(), ">f8"),
}

#: Arrow type for a declared `dac_lake.adql.model.DATATYPES` value, used when the schema says only `null`
_DECLARED_ARROW = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "timestamp": pa.timestamp("us"),
}


def _numeric(t: pa.DataType) -> tuple[str, pa.DataType, str] | None:
    if pa.types.is_decimal(t):
        return ("double", pa.float64(), ">f8")
    return _NUMERIC.get(t)


def vo_type(arrow_type: pa.DataType, declared: str = "") -> VoType:
    """The VOTable declaration and encoder for a column of `arrow_type` (`declared`: the OutputColumn's
    datatype, used only when Arrow knows nothing, i.e. an all-NULL column)."""
    t = arrow_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return vo_type(_DECLARED_ARROW.get(declared, pa.string()))
    if pa.types.is_boolean(t):
        return VoType("boolean", "bool", arrow=pa.bool_())
    num = _numeric(t)
    if num is not None:
        return VoType(num[0], "fixed", arrow=num[1], element=num[2])
    if pa.types.is_timestamp(t):
        return VoType("char", "ascii", "*", "timestamp")
    if pa.types.is_date(t):
        return VoType("char", "ascii", "*", "timestamp", arrow=pa.date32())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return VoType("unicodeChar", "utf16", "*", arrow=pa.large_string())
    if pa.types.is_fixed_size_binary(t):
        return VoType("unsignedByte", "fixedlist", str(t.byte_width), arrow=t, element="u1")
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return VoType("unsignedByte", "bytes", "*", arrow=pa.large_binary(), element="u1")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _numeric(t.value_type)
        if inner is not None:
            if pa.types.is_fixed_size_list(t):
                arrow = pa.list_(inner[1], t.list_size)
                return VoType(inner[0], "fixedlist", str(t.list_size), arrow=arrow, element=inner[2])
            return VoType(inner[0], "list", "*", arrow=pa.large_list(inner[1]), element=inner[2])
    return VoType("unicodeChar", "utf16", "*", xtype=None, arrow=None)  # anything else: its text


def conform(array: pa.Array | pa.ChunkedArray, vt: VoType) -> pa.Array:
    """`array` as the canonical Arrow type of `vt` (dictionaries decoded, widths normalised)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if vt.kind == "utf16" and vt.arrow is None:  # unsupported type: its text
        return _as_text(array)
    if vt.kind == "ascii" and pa.types.is_timestamp(array.type):
        if array.type.tz is not None:  # keep the UTC instant, drop the zone: DALI timestamps carry none
            array = array.cast(pa.timestamp(array.type.unit))
        return array
    if pa.types.is_null(array.type) and vt.kind == "ascii":
        return pa.nulls(len(array), pa.timestamp("us"))
    if vt.arrow is not None and array.type != vt.arrow:
        array = array.cast(vt.arrow)
    return array


def _as_text(array: pa.Array) -> pa.Array:
    try:
        return array.cast(pa.large_string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in array.to_pylist()], pa.large_string())


# ------------------------------------------------------------------------------------------- text of cells


@dataclass(frozen=True)
class TextStyle:
    """How special values are spelled in a text serialisation."""

    nan: str
    posinf: str
    neginf: str
    true: str
    false: str


#: VOTable 1.4, primitive datatypes: "+Inf", "-Inf", "NaN"; booleans T/F
VOTABLE_TEXT = TextStyle("NaN", "+Inf", "-Inf", "T", "F")


def iso_timestamps(array: pa.Array) -> pa.Array:
    """DALI timestamps, YYYY-MM-DDThh:mm:ss[.fff], trailing zero fraction digits dropped."""
    if pa.types.is_date(array.type):
        return array.cast(pa.string())
    if array.type.tz is not None:
        array = array.cast(pa.timestamp(array.type.unit))
    # Arrow's cast gives "YYYY-MM-DD hh:mm:ss[.ffffff]" and is ~30x faster than its strftime
    text = pc.replace_substring(array.cast(pa.string()), " ", "T", max_replacements=1)
    if array.type.unit != "s":  # a fraction is always present: drop its trailing zeros, then a bare dot
        text = pc.ascii_rtrim(pc.ascii_rtrim(text, "0"), ".")
    return text


def text_cells(array: pa.Array, vt: VoType, style: TextStyle = VOTABLE_TEXT) -> pa.Array:
    """Each cell of a conformed column as text (nulls stay null): the shared core of TABLEDATA, CSV and TSV.
    Numbers use Arrow's shortest round-trip representation; arrays are space-separated values."""
    if vt.kind == "bool":
        return pc.if_else(array, style.true, style.false)
    if vt.kind == "fixed":
        text = array.cast(pa.string())
        if vt.is_float and len(array):
            nan = pc.is_nan(array)
            if pc.any(nan).as_py():
                text = pc.if_else(nan, style.nan, text)
            inf = pc.is_inf(array)
            if pc.any(inf).as_py():
                text = pc.if_else(inf, pc.if_else(pc.greater(array, 0), style.posinf, style.neginf), text)
        return text
    if vt.kind == "utf16":
        return array
    if vt.kind == "ascii":
        return iso_timestamps(array)
    if vt.kind == "bytes" or (vt.kind == "fixedlist" and pa.types.is_fixed_size_binary(array.type)):
        return pa.array(
            [None if v is None else " ".join(str(b) for b in v) for v in array.to_pylist()], pa.string()
        )
    # numeric arrays: the elements' text joined by spaces (VOTable TABLEDATA array syntax)
    element = VoType(vt.datatype, "fixed", element=vt.element)
    rel, values = list_children(array)
    if values.null_count:
        values = values.fill_null(float("nan") if element.is_float else 0)
    cells = text_cells(values, element, style)
    lists = pa.LargeListArray.from_arrays(pa.array(rel), cells, mask=array.is_null())
    return pc.binary_join(lists, " ")


def list_children(array: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(row offsets relative to the first row, child values of exactly these rows) of a list column.
    Unlike `flatten()`, null rows keep their backing elements, so the offsets stay valid."""
    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        rel = np.arange(0, (len(array) + 1) * size, size, dtype=np.int64)
        return rel, array.values.slice(array.offset * size, len(array) * size)
    offs = np.asarray(array.offsets.to_numpy(), dtype=np.int64)
    return offs - offs[0], array.values.slice(int(offs[0]), int(offs[-1] - offs[0]))


# --------------------------------------------------------------------------------------------- the header


_ID_BAD = re.compile(r"[^A-Za-z0-9_.\-]")
_UCD_OK = re.compile(r"[A-Za-z0-9_.:;\-]*")


def _xml_id(name: str, used: set[str]) -> str:
    """An XML ID (NCName) for a FIELD: the name itself when it already is one, else a sanitised form;
    unique in the document (astropy names columns after FIELD IDs, so ID = name is the friendliest)."""
    ident = _ID_BAD.sub("_", name) or "col"
    if not (ident[0].isalpha() or ident[0] == "_"):
        ident = "_" + ident
    base, n = ident, 1
    while ident in used:
        n += 1
        ident = f"{base}_{n}"
    used.add(ident)
    return ident


def _token(text: str) -> str:
    """xs:token normalisation (no leading/trailing/multiple spaces), as the XSD demands of unit and name."""
    return " ".join(text.split())


def field_element(col: OutputColumn, vt: VoType, ident: str) -> str:
    """One FIELD element (with DESCRIPTION) for `col`."""
    attrs = [f'name="{xml_attr(col.name)}"', f'ID="{ident}"', f'datatype="{vt.datatype}"']
    if vt.arraysize:
        attrs.append(f'arraysize="{vt.arraysize}"')
    if vt.xtype:
        attrs.append(f'xtype="{vt.xtype}"')
    unit = _token(col.unit or "")
    if unit:
        attrs.append(f'unit="{xml_attr(unit)}"')
    ucd = (col.ucd or "").strip()
    if ucd and _UCD_OK.fullmatch(ucd):  # the XSD pattern: an invalid UCD would make the document invalid
        attrs.append(f'ucd="{ucd}"')
    utype = getattr(col, "utype", "") or ""
    if utype:
        attrs.append(f'utype="{xml_attr(utype)}"')
    head = "<FIELD " + " ".join(attrs)
    if col.description:
        return f"{head}>\n<DESCRIPTION>{xml_text(col.description)}</DESCRIPTION>\n</FIELD>\n"
    return head + "/>\n"


def _info(name: str, value: str) -> str:
    return f'<INFO name="{xml_attr(_token(name))}" value="{xml_attr(value)}"/>\n'


def votable_header(
    columns: Sequence[OutputColumn],
    types: Sequence[VoType],
    *,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
) -> str:
    """Everything up to and including `<TABLE>` and its FIELDs."""
    parts = [XML_DECL, VOTABLE_OPEN, '<RESOURCE type="results">\n', _info("QUERY_STATUS", "OK")]
    if query is not None:
        parts.append(_info("QUERY", query))
    for key, value in (infos or {}).items():
        parts.append(_info(key, str(value)))
    parts.append("<TABLE>\n")
    used: set[str] = set()
    for col, vt in zip(columns, types, strict=True):
        parts.append(field_element(col, vt, _xml_id(col.name, used)))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- encoders


_NO_SEP = pa.scalar(b"", pa.large_binary())


def _text(value: str) -> pa.Scalar:
    """A large_string scalar: Arrow's join kernels want every argument of one type."""
    return pa.scalar(value, pa.large_string())


def _large_binary(offsets: np.ndarray, data: np.ndarray | bytes) -> pa.Array:
    """A large_binary array over existing buffers (zero copy): row i is data[offsets[i]:offsets[i+1]]."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    return pa.Array.from_buffers(
        pa.large_binary(), len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def var_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets relative to the first row, data bytes) of a string/binary/list-of-bytes-like array."""
    large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    width = np.int64 if large else np.int32
    bufs = array.buffers()
    offs = np.frombuffer(bufs[1], dtype=width)[array.offset : array.offset + len(array) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offs - offs[0], data[offs[0] : offs[-1]]


def utf16_cells(array: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(UTF-16 code units per row, payload large_binary array) of a string column; nulls are empty.

    ASCII batches (the usual case) are widened with one numpy assignment; others are transcoded as one
    string (the concatenation of valid UTF-8 is valid UTF-8, and its UTF-16 is the concatenation of the
    rows' UTF-16), with per-row lengths from code points plus one extra unit per astral character."""
    if array.null_count:
        array = array.fill_null("")
    rel, raw = var_buffers(array)
    if raw.size == 0 or int(raw.max()) < 0x80:
        out = np.zeros(2 * raw.size, np.uint8)
        out[1::2] = raw
        return np.diff(rel), _large_binary(rel * 2, out)
    encoded = raw.tobytes().decode("utf-8").encode("utf-16-be")
    astral = np.concatenate([[0], np.cumsum(raw >= 0xF0)])
    units = pc.utf8_length(array).to_numpy().astype(np.int64) + (astral[rel[1:]] - astral[rel[:-1]])
    offsets = np.concatenate([[0], np.cumsum(units)]) * 2
    return units, _large_binary(offsets, encoded)


class _Binary2:
    """BINARY2 rows of each batch, base64-encoded, with the 0-2 bytes left over carried between batches."""

    def __init__(self, types: Sequence[VoType]) -> None:
        self.types = list(types)
        self.nflags = (len(self.types) + 7) // 8
        self.pending = b""

    def start(self) -> bytes:
        return b'<DATA><BINARY2><STREAM encoding="base64">\n'

    def encode(self, arrays: list[pa.Array]) -> bytes:
        raw = self.rows(arrays)
        if self.pending:
            need = 3 - len(self.pending)
            head = self.pending + bytes(raw[:need])
            raw = raw[need:]
            if len(head) < 3:
                self.pending = head
                return b""
            out = [binascii.b2a_base64(head, newline=False)]
        else:
            out = []
        cut = len(raw) - len(raw) % 3
        out.append(binascii.b2a_base64(raw[:cut], newline=False))
        self.pending = bytes(raw[cut:])
        return b"".join(out) + b"\n"

    def finish(self) -> bytes:
        tail = binascii.b2a_base64(self.pending, newline=True) if self.pending else b""
        self.pending = b""
        return tail + b"</STREAM></BINARY2></DATA>\n"

    def rows(self, arrays: list[pa.Array]) -> memoryview:
        """The BINARY2 bytes of these rows: null flags, then each cell, row after row."""
        n = len(arrays[0])
        # Row layout: runs of fixed-width parts (flags, numbers, length prefixes) separated by the
        # variable-length payloads. Each run becomes one packed record array.
        runs: list[list[tuple[str, Any, np.ndarray]]] = [[]]
        payloads: list[pa.Array] = []
        nulls = np.zeros((n, len(arrays)), dtype=bool)
        for i, (arr, vt) in enumerate(zip(arrays, self.types, strict=True)):
            if arr.null_count:
                nulls[:, i] = arr.is_null().to_numpy(zero_copy_only=False)
            fixed, payload = self._cell(arr, vt, nulls[:, i])
            runs[-1].append((f"c{i}", *fixed))
            if payload is not None:
                payloads.append(payload)
                runs.append([])
        runs[0].insert(0, ("flags", (np.uint8, (self.nflags,)), np.packbits(nulls, axis=1)))
        pieces: list[pa.Array] = []
        for k, run in enumerate(runs):
            if run:
                specs = [(name, *spec) if isinstance(spec, tuple) else (name, spec) for name, spec, _ in run]
                dtype = np.dtype(specs)
                rec = np.empty(n, dtype=dtype)
                for name, _, values in run:
                    rec[name] = values
                flat = rec.view(np.uint8)
                if len(runs) == 1:
                    return memoryview(flat)
                width = dtype.itemsize
                pieces.append(_large_binary(np.arange(0, (n + 1) * width, width, dtype=np.int64), flat))
            if k < len(payloads):
                pieces.append(payloads[k])
        joined = pieces[0] if len(pieces) == 1 else pc.binary_join_element_wise(*pieces, _NO_SEP)
        offs = np.frombuffer(joined.buffers()[1], dtype=np.int64)[joined.offset : joined.offset + n + 1]
        data = joined.buffers()[2]
        if data is None:
            return memoryview(b"")
        return memoryview(data)[offs[0] : offs[-1]]

    @staticmethod
    def _cell(arr: pa.Array, vt: VoType, null: np.ndarray) -> tuple[tuple[Any, np.ndarray], pa.Array | None]:
        """((numpy dtype spec, values) of the fixed part, payload or None) of one column."""
        kind = vt.kind
        if kind == "fixed":
            fill = float("nan") if vt.is_float else 0
            values = (arr.fill_null(fill) if arr.null_count else arr).to_numpy(zero_copy_only=False)
            return (vt.element, values), None
        if kind == "bool":
            values = (arr.fill_null(False) if arr.null_count else arr).to_numpy(zero_copy_only=False)
            codes = np.where(values, np.uint8(ord("T")), np.uint8(ord("F")))
            codes[null] = ord("?")
            return (np.uint8, codes), None
        if kind == "utf16":
            units, payload = utf16_cells(arr)
            return (">u4", units), payload
        if kind in ("ascii", "bytes"):
            text = iso_timestamps(arr) if kind == "ascii" else arr
            if text.null_count:
                text = text.fill_null("" if kind == "ascii" else b"")
            rel, raw = var_buffers(text)
            return (">u4", np.diff(rel)), _large_binary(rel, raw)
        if kind == "fixedlist":
            if pa.types.is_fixed_size_binary(arr.type):
                size = arr.type.byte_width
                raw = np.frombuffer(arr.buffers()[1], np.uint8)
                raw = raw[arr.offset * size : (arr.offset + len(arr)) * size]
                return (("u1", (size,)), raw.reshape(len(arr), size)), None
            size = arr.type.list_size
            values = _list_values(list_children(arr)[1], vt).reshape(len(arr), size)
            if arr.null_count:
                values = values.copy()
                values[null] = np.nan if vt.is_float else 0
            return ((vt.element, (size,)), values), None
        # variable-length numeric arrays: element count in the record, big-endian elements as payload
        if arr.null_count:  # a null array is written as a zero-length one (VOTable 1.4's BINARY2 advice)
            arr = pc.if_else(pc.is_valid(arr), arr, pa.scalar([], type=arr.type))
        rel, child = list_children(arr)
        values = _list_values(child, vt).astype(vt.element)
        itemsize = np.dtype(vt.element).itemsize
        return (">u4", np.diff(rel)), _large_binary(rel * itemsize, values.view(np.uint8))


def _list_values(values: pa.Array, vt: VoType) -> np.ndarray:
    if values.null_count:
        values = values.fill_null(float("nan") if vt.is_float else 0)
    return values.to_numpy(zero_copy_only=False)


_XML_SPECIAL = r"[&<>\r\x00-\x08\x0b\x0c\x0e-\x1f\x{FFFE}\x{FFFF}]"


def xml_escape_cells(text: pa.Array) -> pa.Array:
    """XML-escape a string column with Arrow kernels (skipped when nothing needs escaping)."""
    if not len(text) or not pc.any(pc.match_substring_regex(text, _XML_SPECIAL)).as_py():
        return text
    text = pc.replace_substring_regex(text, r"[\x00-\x08\x0b\x0c\x0e-\x1f\x{FFFE}\x{FFFF}]", "\ufffd")
    for char, ref in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("\r", "&#13;")):
        text = pc.replace_substring(text, char, ref)
    return text


class _TableData:
    """TABLEDATA rows of each batch: `<TR><TD>..</TD>..</TR>`, an empty TD for a null."""

    def __init__(self, types: Sequence[VoType]) -> None:
        self.types = list(types)

    def start(self) -> bytes:
        return b"<DATA><TABLEDATA>\n"

    def encode(self, arrays: list[pa.Array]) -> bytes:
        cells = []
        for arr, vt in zip(arrays, self.types, strict=True):
            text = text_cells(arr, vt).cast(pa.large_string())
            if vt.kind == "utf16":
                text = xml_escape_cells(text)
            cells.append(text.fill_null("") if text.null_count else text)
        rows = cells[0] if len(cells) == 1 else pc.binary_join_element_wise(*cells, _text("</TD><TD>"))
        rows = pc.binary_join_element_wise(_text("<TR><TD>"), rows, _text("</TD></TR>\n"), _text(""))
        return joined_bytes(rows)

    def finish(self) -> bytes:
        return b"</TABLEDATA></DATA>\n"


def joined_bytes(rows: pa.Array) -> bytes:
    """The concatenated values of a string/binary array (its data between the first and last offset)."""
    if not len(rows):
        return b""
    _, raw = var_buffers(rows)
    return raw.tobytes()


# ------------------------------------------------------------------------------------------- the writer


def iter_batches(batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.RecordBatch]:
    """Batches, tolerating Tables in the stream, each cut to at most CHUNK_ROWS rows."""
    for item in batches:
        parts = item.to_batches() if isinstance(item, pa.Table) else [item]
        for batch in parts:
            for start in range(0, batch.num_rows, CHUNK_ROWS):
                yield batch.slice(start, CHUNK_ROWS)


def conform_batch(batch: pa.RecordBatch, types: Sequence[VoType]) -> list[pa.Array]:
    if batch.num_columns != len(types):
        raise ValueError(f"batch has {batch.num_columns} columns, the result declares {len(types)}")
    return [conform(batch.column(i), vt) for i, vt in enumerate(types)]


def column_types(columns: Sequence[OutputColumn], schema: pa.Schema) -> list[VoType]:
    if len(columns) != len(schema):
        raise ValueError(f"{len(columns)} output columns for a schema of {len(schema)} fields")
    return [vo_type(f.type, c.datatype) for c, f in zip(columns, schema, strict=True)]


def failure_message(exc: BaseException) -> str:
    """What the client is told when the result fails after its first bytes were sent."""
    if isinstance(exc, TapError):
        return exc.message
    return "the service failed while writing the result; the rows above are incomplete"


def votable_chunks(
    columns: list[OutputColumn],
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    *,
    serialization: str = "binary2",
    overflow: Callable[[], bool] | None = None,
    infos: Mapping[str, str] | None = None,
    query: str | None = None,
) -> Iterator[bytes]:
    """Stream a TAP result as a VOTable 1.4 document.

    Yields the header (before reading any batch), then one chunk per batch, then the footer. `overflow` is
    called once, after the last batch: if true, `<INFO name="QUERY_STATUS" value="OVERFLOW"/>` follows the
    TABLE (DALI 'Overflow'). With no batches the document has FIELDs and no rows: that is the MAXREC=0
    response, for which DALI asks the overflow indicator too (pass `overflow=lambda: True`).

    If reading a batch raises, the data written so far is closed properly and `QUERY_STATUS=ERROR` follows
    the TABLE (DALI 'Errors') — the message of a `TapError`, a generic one otherwise (logged) — instead
    of breaking the HTTP response mid-document.
    """
    serialization = serialization.lower()
    if serialization not in SERIALIZATIONS:
        raise ValueError(f"unknown VOTable serialization {serialization!r}; use one of {SERIALIZATIONS}")
    types = column_types(columns, schema)
    yield votable_header(columns, types, infos=infos, query=query).encode("utf-8")
    encoder: _Binary2 | _TableData = _Binary2(types) if serialization == "binary2" else _TableData(types)
    yield encoder.start()
    error: str | None = None
    try:
        for batch in iter_batches(batches):
            if batch.num_rows:
                chunk = encoder.encode(conform_batch(batch, types))
                if chunk:
                    yield chunk
    except Exception as exc:  # reported in-band: the HTTP status is long gone
        log.exception("result stream failed after the VOTable header was sent")
        error = failure_message(exc)
    tail = [encoder.finish().decode("ascii"), "</TABLE>\n"]
    if error is not None:
        tail.append(f'<INFO name="QUERY_STATUS" value="ERROR">{xml_text(error)}</INFO>\n')
    elif overflow is not None and overflow():
        tail.append('<INFO name="QUERY_STATUS" value="OVERFLOW"/>\n')
    tail.append("</RESOURCE>\n</VOTABLE>\n")
    yield "".join(tail).encode("utf-8")
