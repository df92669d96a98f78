"""The TAP output-format layer (api/formats): every writer read back by an independent reader.

Readers: astropy.io.votable (both VOTable serializations), pyvo's DALResults, a small BINARY2 decoder
written here from VOTable 1.4 'BINARY2 Serialization' (astropy ignores BINARY2 null flags of string
columns), xmllint against the VOTable 1.4 XSD that astropy ships, the csv and json modules,
astropy.io.fits and pyarrow.parquet.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import shutil
import struct
import subprocess
import warnings
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import astropy.io.votable
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.io.votable import from_table, parse, writeto
from astropy.table import MaskedColumn, Table
from pyvo.dal import DALOverflowWarning, DALQueryError, DALResults, TAPResults

from api.formats import (
    FORMATS,
    TapError,
    capability_formats,
    csv_chunks,
    dali_error_votable,
    fits_chunks,
    json_chunks,
    parquet_chunks,
    parse_votable_upload,
    resolve_format,
    tsv_chunks,
    votable_chunks,
)
from api.formats.tabular import PARQUET_ROW_GROUP
from dac_lake.adql.model import OutputColumn

NS = {"v": "http://www.ivoa.net/xml/VOTable/v1.3"}
XSD = Path(astropy.io.votable.__file__).parent / "data" / "VOTable.v1.4.xsd"
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
UNICODE = 'Ωμέγα ✓ 😀 <&> "q"'
NAN = float("nan")


def mixed_table() -> pa.Table:
    """Every type the engine returns, with nulls, NaN, infinities, extremes, unicode and XML specials."""
    return pa.table(
        {
            "flag": pa.array([True, False, None, True]),
            "tiny": pa.array([-128, 127, None, 0], pa.int8()),
            "small": pa.array([-32768, 32767, None, 1], pa.int16()),
            "num": pa.array([-(2**31), 2**31 - 1, None, 7], pa.int32()),
            "big": pa.array([I64_MIN, I64_MAX, None, 0], pa.int64()),
            "mag": pa.array([1.25, NAN, None, -0.5], pa.float32()),
            "ra": pa.array([0.1, math.inf, None, -math.inf], pa.float64()),
            "label": pa.array(["plain", UNICODE, None, ""]),
            "seen": pa.array(
                [
                    datetime(2021, 3, 4, 5, 6, 7, 500000),
                    datetime(1999, 12, 31),
                    None,
                    datetime(2000, 1, 1, 0, 0, 1),
                ],
                pa.timestamp("us"),
            ),
            "vec": pa.array([[1.5, -2.0], [], None, [3.0]], pa.list_(pa.float64())),
            "pair": pa.array([[1, 2], [3, 4], None, [5, 6]], pa.list_(pa.int32(), 2)),
        }
    )


def mixed_columns(table: pa.Table) -> list[OutputColumn]:
    meta = {
        "ra": ("deg", "pos.eq.ra;meta.main", "Right ascension <ICRS> & more"),
        "mag": ("mag", "phot.mag", "A magnitude"),
        "label": ("", "meta.id", "Ünïcode description"),
    }
    out = []
    for name in table.column_names:
        unit, ucd, desc = meta.get(name, ("", "", ""))
        out.append(OutputColumn(name, "x", unit=unit, ucd=ucd, description=desc))
    return out


def write(writer, table: pa.Table, *, chunk: int = 2, **kw) -> bytes:
    return b"".join(writer(mixed_columns(table), table.schema, table.to_batches(max_chunksize=chunk), **kw))


def read_votable(data: bytes):
    """Parse strictly: any astropy warning about the document is a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse(io.BytesIO(data), verify="exception")


def xsd_validate(data: bytes, tmp_path: Path) -> None:
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        pytest.skip("xmllint not installed (apt-get install libxml2-utils)")
    doc = tmp_path / "doc.xml"
    doc.write_bytes(data)
    run = subprocess.run([xmllint, "--noout", "--schema", str(XSD), str(doc)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ----------------------------------------------------------------- an independent BINARY2 reader (spec)

_STRUCT = {"short": ">h", "int": ">i", "long": ">q", "float": ">f", "double": ">d", "unsignedByte": ">B"}


def decode_binary2(data: bytes) -> tuple[list[str], list[list]]:
    """Rows of a BINARY2 VOTable, decoded cell by cell as VOTable 1.4 describes (None: null flag set)."""
    root = ET.fromstring(data)
    fields = root.findall(".//v:FIELD", NS)
    text = root.find(".//v:BINARY2/v:STREAM", NS).text or ""
    raw = base64.b64decode("".join(text.split()))
    nflags = (len(fields) + 7) // 8
    pos, rows = 0, []
    while pos < len(raw):
        flags = raw[pos : pos + nflags]
        pos += nflags
        row = []
        for i, f in enumerate(fields):
            null = bool(flags[i // 8] & (0x80 >> (i % 8)))
            datatype, arraysize = f.get("datatype"), f.get("arraysize")
            if datatype in ("char", "unicodeChar"):
                (count,) = struct.unpack_from(">I", raw, pos)
                width = 1 if datatype == "char" else 2
                value = raw[pos + 4 : pos + 4 + count * width].decode("ascii" if width == 1 else "utf-16-be")
                pos += 4 + count * width
            elif datatype == "boolean":
                value = {b"T": True, b"F": False}.get(raw[pos : pos + 1])
                pos += 1
            else:
                fmt = _STRUCT[datatype]
                size = struct.calcsize(fmt)
                if arraysize is None:
                    (value,) = struct.unpack_from(fmt, raw, pos)
                    pos += size
                else:
                    if arraysize == "*":
                        (count,) = struct.unpack_from(">I", raw, pos)
                        pos += 4
                    else:
                        count = int(arraysize)
                    value = [struct.unpack_from(fmt, raw, pos + k * size)[0] for k in range(count)]
                    pos += count * size
            row.append(None if null else value)
        rows.append(row)
    return [f.get("name") for f in fields], rows


def same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (also inside lists)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def iso(value: datetime | None) -> str | None:
    """DALI timestamp text as the writers produce it (no zero fraction digits)."""
    if value is None:
        return None
    text = value.isoformat()
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------------------------- VOTable


@pytest.mark.parametrize("serialization", ["binary2", "tabledata"])
def test_votable_round_trip_through_astropy(serialization):
    table = mixed_table()
    data = write(
        votable_chunks, table, serialization=serialization, query="SELECT *\nFROM t", infos={"k": "v"}
    )
    vot = read_votable(data)
    resource = vot.resources[0]
    assert vot.version == "1.4" and resource.type == "results"
    infos = [(i.name, i.value) for i in resource.infos]
    assert infos[:3] == [("QUERY_STATUS", "OK"), ("QUERY", "SELECT *\nFROM t"), ("k", "v")]
    vtable = resource.tables[0]
    fields = {f.name: f for f in vtable.fields}
    expected = {
        "flag": ("boolean", None, None),
        "tiny": ("short", None, None),
        "small": ("short", None, None),
        "num": ("int", None, None),
        "big": ("long", None, None),
        "mag": ("float", None, None),
        "ra": ("double", None, None),
        "label": ("unicodeChar", "*", None),
        "seen": ("char", "*", "timestamp"),
        "vec": ("double", "*", None),
        "pair": ("int", "2", None),
    }
    for name, (datatype, arraysize, xtype) in expected.items():
        f = fields[name]
        assert (f.datatype, f.arraysize, f.xtype) == (datatype, arraysize, xtype), name
    assert str(fields["ra"].unit) == "deg" and fields["ra"].ucd == "pos.eq.ra;meta.main"
    assert fields["ra"].description == "Right ascension <ICRS> & more"
    assert fields["label"].description == "Ünïcode description"

    arr = vtable.array
    assert len(arr) == 4
    for name in ("flag", "tiny", "small", "num", "big"):
        assert arr[name].mask.tolist() == [False, False, True, False], name
        assert arr[name].data[[0, 1, 3]].tolist() == [table[name][i].as_py() for i in (0, 1, 3)], name
    assert arr["big"].data[0] == I64_MIN and arr["big"].data[1] == I64_MAX
    assert arr["mag"].data[0] == np.float32(1.25) and math.isnan(arr["mag"].data[1])
    assert bool(arr["mag"].mask[2]) and bool(arr["ra"].mask[2])
    assert arr["ra"].data[0] == 0.1 and arr["ra"].data[1] == math.inf and arr["ra"].data[3] == -math.inf
    assert arr["label"].data[0] == "plain" and arr["label"].data[1] == UNICODE and arr["label"].data[3] == ""
    assert list(arr["seen"].data[[0, 1, 3]]) == [
        "2021-03-04T05:06:07.5",
        "1999-12-31T00:00:00",
        "2000-01-01T00:00:01",
    ]
    assert list(arr["vec"][0]) == [1.5, -2.0] and len(arr["vec"][1]) == 0 and list(arr["vec"][3]) == [3.0]
    assert arr["pair"].data[1].tolist() == [3, 4]
    if serialization == "tabledata":  # null = empty TD for every type (astropy does not mask strings)
        tds = ET.fromstring(data).findall(".//v:TR", NS)[2].findall("v:TD", NS)
        assert len(tds) == len(table.column_names) and all(td.text is None for td in tds)


def test_binary2_null_flags_and_values_by_the_spec():
    """Decode the BINARY2 stream independently: null flags for every column (strings too, which astropy
    ignores), NaN distinct from null, extremes and unicode exact."""
    table = mixed_table()
    names, rows = decode_binary2(write(votable_chunks, table, chunk=3))
    assert names == table.column_names
    expected = table.to_pylist()
    for got, want in zip(rows, expected, strict=True):
        for name, value in zip(names, got, strict=True):
            w = want[name]
            if isinstance(w, datetime):
                w = iso(w)
            if name == "mag" and w is not None:
                w = float(np.float32(w))
            assert same(value, w), (name, value, w)
    assert rows[2] == [None] * len(names)  # the all-null row: every flag set
    assert math.isnan(rows[1][names.index("mag")])  # NaN is a value, not a null


@pytest.mark.parametrize("serialization", ["binary2", "tabledata"])
def test_votable_validates_against_the_xsd(serialization, tmp_path):
    data = write(
        votable_chunks, mixed_table(), serialization=serialization, overflow=lambda: True, query="q<&>"
    )
    xsd_validate(data, tmp_path)


@pytest.mark.parametrize("serialization", ["binary2", "tabledata"])
def test_metadata_only_result_has_fields_and_no_rows(serialization, tmp_path):
    table = mixed_table()
    data = b"".join(
        votable_chunks(
            mixed_columns(table), table.schema, [], serialization=serialization, overflow=lambda: True
        )
    )
    xsd_validate(data, tmp_path)
    vot = read_votable(data)
    vtable = vot.get_first_table()
    assert len(vtable.array) == 0
    assert [f.name for f in vtable.fields] == table.column_names
    results = TAPResults(vot)
    assert results.status[0] == "OVERFLOW"  # DALI: MAXREC=0 answers metadata and the overflow indicator
    assert len(results) == 0 and results.fieldnames == tuple(table.column_names)


def _resource_children(data: bytes) -> list[tuple[str, str | None]]:
    resource = ET.fromstring(data).find("v:RESOURCE", NS)
    return [(child.tag.split("}")[1], child.get("value")) for child in resource]


def test_overflow_info_follows_the_table():
    table = mixed_table()
    calls = []

    def overflow() -> bool:
        calls.append(True)
        return True

    children = _resource_children(write(votable_chunks, table, overflow=overflow))
    assert children[0] == ("INFO", "OK")
    assert children[-2:] == [("TABLE", None), ("INFO", "OVERFLOW")]
    assert calls == [True]
    for no_overflow in (None, lambda: False):
        children = _resource_children(write(votable_chunks, table, overflow=no_overflow))
        assert children[-1] == ("TABLE", None)
        assert [v for tag, v in children if tag == "INFO"] == ["OK"]


def test_overflow_is_asked_only_after_the_last_batch():
    table = mixed_table()
    batches = table.to_batches(max_chunksize=1)
    consumed = []

    def counted():
        for b in batches:
            consumed.append(b)
            yield b

    seen_at = []
    doc = b"".join(
        votable_chunks(
            mixed_columns(table), table.schema, counted(), overflow=lambda: seen_at.append(len(consumed))
        )
    )
    assert seen_at == [len(batches)]
    assert _resource_children(doc)[-1] == ("TABLE", None)  # overflow() returned None: no OVERFLOW INFO


def test_pyvo_reads_results_and_overflow():
    table = mixed_table()
    results = TAPResults(read_votable(write(votable_chunks, table)))
    assert results.fieldnames == tuple(table.column_names)
    got = results.to_table()
    assert got["big"][1] == I64_MAX and got["label"][1] == UNICODE and got["flag"][0]
    over = read_votable(write(votable_chunks, table, serialization="tabledata", overflow=lambda: True))
    assert TAPResults(over).status[0] == "OVERFLOW"
    with pytest.warns(DALOverflowWarning):
        DALResults(over)


def test_failure_after_the_header_is_reported_in_band(tmp_path):
    table = mixed_table()

    def failing():
        yield table.to_batches()[0]
        raise TapError("the query exceeded its time limit of 5 s; run it as an async job", 400)

    data = b"".join(votable_chunks(mixed_columns(table), table.schema, failing(), overflow=lambda: True))
    xsd_validate(data, tmp_path)
    children = _resource_children(data)
    assert children[-2:] == [("TABLE", None), ("INFO", "ERROR")]  # ERROR, not OVERFLOW
    assert len(read_votable(data).get_first_table().array) == 4  # the rows sent before the failure
    with pytest.raises(DALQueryError, match="time limit of 5 s"):
        TAPResults(read_votable(data))

    def broken():
        raise RuntimeError("/secret/path/partition.parquet is corrupt")
        yield  # pragma: no cover

    data = b"".join(votable_chunks(mixed_columns(table), table.schema, broken(), serialization="tabledata"))
    assert b"/secret/path" not in data  # internal details are logged, not sent
    with pytest.raises(DALQueryError, match="failed while writing"):
        TAPResults(read_votable(data))


class Counter:
    """A batch source that records how many batches were taken when each output chunk appeared."""

    def __init__(self, table: pa.Table, size: int) -> None:
        self.batches = table.to_batches(max_chunksize=size)
        self.taken = 0

    def __iter__(self):
        for b in self.batches:
            self.taken += 1
            yield b


@pytest.mark.parametrize(
    "writer",
    [
        votable_chunks,
        lambda *a, **k: votable_chunks(*a, serialization="tabledata", **k),
        csv_chunks,
        tsv_chunks,
        json_chunks,
    ],
    ids=["binary2", "tabledata", "csv", "tsv", "json"],
)
def test_writers_stream_batch_by_batch(writer):
    table = pa.concat_tables([mixed_table()] * 5)
    source = Counter(table, 2)
    chunks = writer(mixed_columns(table), table.schema, source)
    next(chunks)
    assert source.taken == 0  # the header goes out before any batch is read
    taken = [source.taken for c in chunks if c]
    assert source.taken == len(source.batches) == 10
    # every batch gives its chunk before the next batch is read: 1, 2, ..., 10 (then a footer, if any)
    after_start = [t for t in taken if t > 0]
    assert after_start[:10] == list(range(1, 11)) and set(after_start[10:]) <= {10}


def test_binary2_encoding_of_a_large_batch_is_exact():
    """Batches bigger than the encoder's internal chunk, with a var-length column in the middle."""
    n = 70_000  # more than the encoder's 65,536-row step
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "name": pa.array([f"o{i}" if i % 7 else None for i in range(n)]),
            "x": pa.array(rng.random(n)),
        }
    )
    cols = [OutputColumn(c, "x") for c in table.column_names]
    vot = read_votable(b"".join(votable_chunks(cols, table.schema, table.to_batches())))
    arr = vot.get_first_table().array
    assert len(arr) == n
    assert np.array_equal(arr["id"].data, np.arange(n)) and np.array_equal(
        arr["x"].data, table["x"].to_numpy()
    )
    assert (
        arr["name"].data[1] == "o1" and arr["name"].data[n - 1] == f"o{n - 1}" and arr["name"].data[7] == ""
    )


def test_duplicate_and_odd_names_get_unique_xml_ids(tmp_path):
    table = pa.table({"a": [1], "b": [2], "c": [3]})
    cols = [OutputColumn("ra", "int64"), OutputColumn("ra", "int64"), OutputColumn("2 odd name", "int64")]
    data = b"".join(votable_chunks(cols, table.schema, table.to_batches(), serialization="tabledata"))
    xsd_validate(data, tmp_path)
    fields = ET.fromstring(data).findall(".//v:FIELD", NS)
    assert [f.get("name") for f in fields] == ["ra", "ra", "2 odd name"]
    ids = [f.get("ID") for f in fields]
    assert len(set(ids)) == 3 and ids[0] == "ra"


def test_null_typed_column_uses_the_declared_datatype():
    table = pa.table({"n": pa.nulls(2)})
    data = b"".join(votable_chunks([OutputColumn("n", "int32")], table.schema, table.to_batches()))
    vtable = read_votable(data).get_first_table()
    assert vtable.fields[0].datatype == "int" and vtable.array["n"].mask.tolist() == [True, True]


# ------------------------------------------------------------------------------------------ DALI errors


def test_dali_error_document(tmp_path):
    message = "column 'rr' does not exist; did you mean 'ra'? <line 1> & \x01 more\nsecond line"
    data = dali_error_votable(message)
    xsd_validate(data, tmp_path)
    vot = read_votable(data)
    info = vot.resources[0].infos[0]
    assert vot.resources[0].type == "results"
    assert (info.name, info.value) == ("QUERY_STATUS", "ERROR")
    assert info.content == message.replace("\x01", "\ufffd")
    with pytest.raises(DALQueryError, match="did you mean 'ra'"):
        TAPResults(vot)


def test_tap_error_carries_status():
    err = TapError("upload too big", 413)
    assert (err.message, err.http_status, str(err)) == ("upload too big", 413, "upload too big")
    assert b"upload too big" in err.to_votable()
    assert TapError("bad").http_status == 400
    with pytest.raises(ValueError):
        TapError("x", 418)


# -------------------------------------------------------------------------------------- CSV, TSV, JSON


def test_csv_round_trip():
    table = mixed_table()
    text = write(csv_chunks, table).decode("utf-8")
    assert text.endswith("\r\n") and "\r\n" in text.split(UNICODE[:3])[0]
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == table.column_names
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert len(body) == 4
    assert body[0]["flag"] == "true" and body[2]["flag"] == "" and body[1]["flag"] == "false"
    assert int(body[0]["big"]) == I64_MIN and int(body[1]["big"]) == I64_MAX
    assert float(body[0]["ra"]) == 0.1 and body[1]["ra"] == "Infinity" and float(body[3]["ra"]) == -math.inf
    assert body[1]["mag"] == "NaN" and np.float32(float(body[0]["mag"])) == np.float32(1.25)
    assert body[1]["label"] == UNICODE  # quotes doubled, commas/specials survive
    assert body[3]["label"] == "" and '""' in text.splitlines()[4]  # empty string quoted; null is empty
    assert body[0]["seen"] == "2021-03-04T05:06:07.5"
    assert body[0]["vec"] == "1.5 -2" and body[0]["pair"] == "1 2"


def test_csv_quotes_commas_and_line_breaks():
    table = pa.table({"s": ["a,b", 'say "hi"', "two\nlines", "cr\rhere", None]})
    data = b"".join(csv_chunks([OutputColumn("s", "string")], table.schema, table.to_batches()))
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert [r[0] if r else None for r in rows[1:]] == ["a,b", 'say "hi"', "two\nlines", "cr\rhere", None]


def test_tsv_round_trip():
    table = pa.table({"s": ["tab\there", "nl\nthere", None], "x": [1.5, None, 3.0]})
    data = b"".join(
        tsv_chunks(
            [OutputColumn("s", "string"), OutputColumn("x", "float64")], table.schema, table.to_batches()
        )
    )
    lines = data.decode().split("\n")
    assert lines[0] == "s\tx" and lines[-1] == ""
    assert [line.split("\t") for line in lines[1:-1]] == [["tab here", "1.5"], ["nl there", ""], ["", "3"]]


def test_json_round_trip():
    table = mixed_table()
    doc = json.loads(write(json_chunks, table, overflow=lambda: True, query="SELECT 1"))
    assert [m["name"] for m in doc["metadata"]] == table.column_names
    ra = doc["metadata"][table.column_names.index("ra")]
    assert ra == {
        "name": "ra",
        "datatype": "double",
        "unit": "deg",
        "ucd": "pos.eq.ra;meta.main",
        "description": "Right ascension <ICRS> & more",
    }
    assert doc["overflow"] is True and doc["query_status"] == "OVERFLOW" and doc["query"] == "SELECT 1"
    rows = [dict(zip(table.column_names, r, strict=True)) for r in doc["data"]]
    assert len(rows) == 4 and rows[2] == dict.fromkeys(table.column_names)
    assert rows[0]["big"] == I64_MIN and rows[1]["big"] == I64_MAX
    assert rows[1]["mag"] is None and rows[1]["ra"] is None  # NaN and Infinity have no JSON spelling
    assert rows[0]["mag"] == 1.25 and rows[0]["ra"] == 0.1
    assert rows[1]["label"] == UNICODE and rows[3]["label"] == ""
    assert rows[0]["seen"] == "2021-03-04T05:06:07.5"
    assert rows[0]["vec"] == [1.5, -2.0] and rows[1]["vec"] == [] and rows[0]["pair"] == [1, 2]
    assert rows[0]["flag"] is True and rows[1]["flag"] is False


def test_json_empty_and_control_characters_and_failure():
    table = pa.table({"s": ["bell\x07", "back\\slash"]})
    cols = [OutputColumn("s", "string")]
    doc = json.loads(b"".join(json_chunks(cols, table.schema, table.to_batches())))
    assert doc["data"] == [["bell\x07"], ["back\\slash"]] and doc["overflow"] is False
    empty = json.loads(b"".join(json_chunks(cols, table.schema, [])))
    assert empty["data"] == [] and empty["query_status"] == "OK"

    def failing():
        yield table.to_batches()[0]
        raise TapError("out of time", 400)

    doc = json.loads(b"".join(json_chunks(cols, table.schema, failing())))
    assert doc["query_status"] == "ERROR" and doc["error"] == "out of time" and len(doc["data"]) == 2


# ------------------------------------------------------------------------------------------ FITS, Parquet


def test_fits_round_trip(tmp_path):
    # FITS marks integer nulls with a TNULL value: a column holding both extremes and nulls is ambiguous
    table = mixed_table().drop_columns(["big", "num"])
    table = table.append_column("big", pa.array([I64_MIN, I64_MAX, 5, 0], pa.int64()))
    table = table.append_column("num", pa.array([-(2**31), 5, None, 7], pa.int32()))
    data = write(partial_fits(tmp_path), table, overflow=lambda: True)
    assert len(data) % 2880 == 0
    with fits.open(io.BytesIO(data)) as hdus:
        hdr = hdus[1].header
        assert hdr["NAXIS2"] == 4 and hdr["OVERFLOW"] is True
        i = table.column_names.index("ra") + 1
        assert (hdr[f"TTYPE{i}"], hdr[f"TUNIT{i}"], hdr[f"TUCD{i}"]) == ("ra", "deg", "pos.eq.ra;meta.main")
        assert hdr[f"TCOMM{i}"] == "Right ascension <ICRS> & more"
        assert "TNULL" + str(table.column_names.index("big") + 1) not in hdr  # no nulls: no TNULL
    with fits.open(io.BytesIO(data), logical_as_bytes=True) as hdus:  # a zero byte is a null logical
        assert hdus[1].data["flag"].tolist() == [b"T", b"F", b"", b"T"]  # numpy strips the zero byte
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy: "NULL logical values will be converted to False"
        t = Table.read(io.BytesIO(data), hdu=1)
    assert t["big"][0] == I64_MIN and t["big"][1] == I64_MAX
    assert t["num"].mask.tolist() == [False, False, True, False] and t["num"][0] == -(2**31)
    assert t["tiny"][0] == -128 and bool(t["tiny"].mask[2])
    mag, ra = np.ma.filled(t["mag"], np.nan), np.ma.filled(t["ra"], np.nan)
    assert mag[0] == 1.25 and math.isnan(mag[1]) and math.isnan(ra[2]) and ra[1] == math.inf
    labels = [v.decode() if isinstance(v, bytes) else v for v in t["label"]]
    assert labels[0] == "plain" and labels[1] == UNICODE  # UTF-8 bytes, read back intact
    seen = [v.decode() if isinstance(v, bytes) else v for v in t["seen"]]
    assert seen[0] == "2021-03-04T05:06:07.5"
    assert t["pair"][1].tolist() == [3, 4]
    assert list(t["flag"][:2]) == [True, False]


def partial_fits(tmp_path):
    def writer(*args, **kw):
        return fits_chunks(*args, spool_dir=str(tmp_path), **kw)

    return writer


def test_fits_tnull_avoids_the_data_and_empty_results(tmp_path):
    table = pa.table({"k": pa.array([I64_MIN, None, 3], pa.int64()), "s": ["", None, "x"]})
    cols = [OutputColumn("k", "int64"), OutputColumn("s", "string")]
    data = b"".join(fits_chunks(cols, table.schema, table.to_batches(), spool_dir=str(tmp_path)))
    t = Table.read(io.BytesIO(data), hdu=1)
    assert t["k"][0] == I64_MIN and t["k"].mask.tolist() == [False, True, False]
    empty = b"".join(fits_chunks(cols, table.schema, [], spool_dir=str(tmp_path)))
    with fits.open(io.BytesIO(empty)) as hdus:
        assert hdus[1].header["NAXIS2"] == 0 and len(hdus[1].data) == 0
    assert list(tmp_path.iterdir()) == []  # the spool file is gone


def test_parquet_round_trip():
    table = mixed_table()
    data = write(parquet_chunks, table, overflow=lambda: True, query="SELECT *")
    got = pq.read_table(io.BytesIO(data))
    assert got.column_names == table.column_names
    for name in table.column_names:
        assert all(same(a, b) for a, b in zip(got[name].to_pylist(), table[name].to_pylist(), strict=True)), (
            name
        )
    field = got.schema.field("ra")
    assert field.metadata[b"unit"] == b"deg" and field.metadata[b"ucd"] == b"pos.eq.ra;meta.main"
    meta = pq.read_metadata(io.BytesIO(data)).metadata
    assert meta[b"QUERY_STATUS"] == b"OVERFLOW" and meta[b"QUERY"] == b"SELECT *"


def test_parquet_streams_row_groups():
    n = PARQUET_ROW_GROUP * 2 + 10
    table = pa.table({"i": np.arange(n)})
    source = Counter(table, PARQUET_ROW_GROUP // 4)
    chunks = parquet_chunks([OutputColumn("i", "int64")], table.schema, source)
    first = next(chunks)
    assert first.startswith(b"PAR1") and source.taken < len(source.batches)
    rest = b"".join(chunks)
    got = pq.read_table(io.BytesIO(first + rest))
    assert got["i"].to_pylist() == list(range(n))
    assert pq.read_metadata(io.BytesIO(first + rest)).num_row_groups == 3


# ---------------------------------------------------------------------------------- RESPONSEFORMAT


@pytest.mark.parametrize(
    ("value", "name", "media"),
    [
        (None, "votable", "application/x-votable+xml"),
        ("", "votable", "application/x-votable+xml"),
        ("votable", "votable", "application/x-votable+xml"),
        ("VOTable/TD", "votable/td", "application/x-votable+xml;serialization=TABLEDATA"),
        ("votable/b2", "votable", "application/x-votable+xml;serialization=BINARY2"),
        ("application/x-votable+xml", "votable", "application/x-votable+xml"),
        (
            "application/x-votable+xml; serialization=TABLEDATA",
            "votable/td",
            "application/x-votable+xml;serialization=TABLEDATA",
        ),
        (
            " Application/X-VOTable+XML ;Serialization = binary2 ",
            "votable",
            "application/x-votable+xml;serialization=BINARY2",
        ),
        (
            "application/x-votable+xml;charset=UTF-8;serialization=binary2",
            "votable",
            "application/x-votable+xml;serialization=BINARY2",
        ),
        ("text/xml", "votable", "text/xml"),
        ("csv", "csv", "text/csv;header=present"),
        ("text/csv", "csv", "text/csv;header=present"),
        ("text/csv; header=absent", "csv", "text/csv;header=absent"),
        ("tsv", "tsv", "text/tab-separated-values"),
        ("text/tab-separated-values", "tsv", "text/tab-separated-values"),
        ("json", "json", "application/json"),
        ("application/json", "json", "application/json"),
        ("FITS", "fits", "application/fits"),
        ("application/fits", "fits", "application/fits"),
        ("parquet", "parquet", "application/vnd.apache.parquet"),
        ("application/vnd.apache.parquet", "parquet", "application/vnd.apache.parquet"),
    ],
)
def test_resolve_format(value, name, media):
    fmt = resolve_format(value)
    assert (fmt.name, fmt.media_type) == (name, media)


def test_resolved_writers_produce_their_format():
    table = pa.table({"x": [1, 2]})
    cols = [OutputColumn("x", "int64")]
    td = b"".join(resolve_format("votable/td").writer(cols, table.schema, table.to_batches()))
    assert b"<TABLEDATA>" in td and b"<TD>2</TD>" in td
    b2 = b"".join(resolve_format("text/xml").writer(cols, table.schema, table.to_batches()))
    assert b"<BINARY2>" in b2
    no_header = b"".join(
        resolve_format("text/csv;header=absent").writer(cols, table.schema, table.to_batches())
    )
    assert no_header == b"1\r\n2\r\n"


@pytest.mark.parametrize(
    "value",
    [
        "xml",
        "application/x-votable+xml;serialization=BINARY",
        "text/csv;charset=latin-1",
        "html",
        "text/csv;header",
    ],
)
def test_unknown_format_is_a_400_listing_the_accepted_values(value):
    with pytest.raises(TapError) as info:
        resolve_format(value)
    assert info.value.http_status == 400
    for accepted in ("votable", "csv", "application/x-votable+xml", "application/vnd.apache.parquet"):
        assert accepted in info.value.message


def test_capability_formats():
    caps = {c.mime: c for c in capability_formats()}
    b2 = caps["application/x-votable+xml;serialization=BINARY2"]
    assert b2.ivo_id == "ivo://ivoa.net/std/TAPRegExt#output-votable-binary2" and "votable" in b2.aliases
    assert caps["application/x-votable+xml;serialization=TABLEDATA"].ivo_id.endswith("#output-votable-td")
    assert (
        "csv" in caps["text/csv;header=present"].aliases
        and "tsv" in caps["text/tab-separated-values"].aliases
    )
    for cap in capability_formats():  # everything declared is accepted
        for value in (cap.mime, *cap.aliases):
            resolve_format(value)
    assert all(resolve_format(k) is not None for k in FORMATS)


# ------------------------------------------------------------------------------------------- uploads


def astropy_votable(table: Table, serialization: str) -> bytes:
    vot = from_table(table)
    vot.get_first_table().format = serialization
    out = io.BytesIO()
    writeto(vot, out)
    return out.getvalue()


def upload_source() -> Table:
    t = Table()
    t["RAJ2000"] = MaskedColumn([10.5, 200.25, 359.0], unit="deg")
    t["DEJ2000"] = MaskedColumn([-1.0, 45.0, 89.5], unit="deg")
    t["id"] = MaskedColumn(np.array([1, I64_MAX, I64_MIN]), mask=[False, True, False])
    t["mag"] = MaskedColumn(np.array([1.5, np.nan, 3.0], dtype=np.float32), mask=[False, False, True])
    t["name"] = ["a", "Ωμέγα ✓", ""]  # astropy's BINARY2 writer miscounts characters beyond U+FFFF
    t["ok"] = MaskedColumn([True, False, True], mask=[False, False, True])
    t["small"] = MaskedColumn(np.array([1, -2, 3], dtype=np.int16))
    t["vec"] = np.zeros((3, 2))
    return t


@pytest.mark.parametrize("serialization", ["tabledata", "binary2"])
def test_upload_round_trip(serialization):
    up = parse_votable_upload(
        astropy_votable(upload_source(), serialization), "targets", max_rows=10, max_bytes=10**6
    )
    assert up.name == "targets"
    kinds = {c.name: c.datatype for c in up.columns}
    assert kinds == {
        "RAJ2000": "float64",
        "DEJ2000": "float64",
        "id": "int64",
        "mag": "float32",
        "name": "string",
        "ok": "bool",
        "small": "int16",
    }
    assert up.table.column_names == list(kinds)
    assert up.table["id"].to_pylist() == [1, None, I64_MIN]
    mag = up.table["mag"].to_pylist()
    assert mag[0] == 1.5 and mag[2] is None and (mag[1] is None or math.isnan(mag[1]))
    assert up.table["name"].to_pylist()[:2] == ["a", "Ωμέγα ✓"]
    assert up.table["ok"].to_pylist() == [True, False, None]
    assert up.table["small"].to_pylist() == [1, -2, 3]
    assert (up.ra_column, up.dec_column) == ("RAJ2000", "DEJ2000")
    assert next(c for c in up.columns if c.name == "RAJ2000").unit == "deg"
    assert up.notes and "'vec'" in up.notes[0] and "array" in up.notes[0]


@pytest.mark.parametrize("serialization", ["binary2", "tabledata"])
def test_our_own_votable_uploads_back(serialization):
    """A result VOTable re-uploaded (a common TOPCAT workflow) keeps its values, UCDs and timestamps."""
    table = mixed_table().drop_columns(["vec", "pair"])
    up = parse_votable_upload(
        write(votable_chunks, table, serialization=serialization), "again", max_rows=100, max_bytes=10**6
    )
    assert up.table.column_names == table.column_names
    assert up.table["big"].to_pylist() == [I64_MIN, I64_MAX, None, 0]
    assert up.table["seen"].type == pa.timestamp("us")
    assert up.table["seen"].to_pylist()[0] == datetime(2021, 3, 4, 5, 6, 7, 500000)
    assert up.table["label"].to_pylist()[1] == UNICODE
    assert next(c for c in up.columns if c.name == "ra").ucd == "pos.eq.ra;meta.main"
    assert {c.name: c.datatype for c in up.columns}["tiny"] == "int16"


def test_upload_position_guessed_from_ucds():
    t = Table()
    t["x"] = MaskedColumn([1.0], unit="deg")
    t["y"] = MaskedColumn([2.0], unit="deg")
    t["ra"] = MaskedColumn([3.0], unit="deg")  # a name match loses against UCDs
    t["dec"] = MaskedColumn([4.0], unit="deg")
    vot = from_table(t)
    fields = vot.get_first_table().fields
    fields[0].ucd, fields[1].ucd = "pos.eq.ra;meta.main", "pos.eq.dec;meta.main"
    out = io.BytesIO()
    writeto(vot, out)
    up = parse_votable_upload(out.getvalue(), "t", max_rows=5, max_bytes=10**5)
    assert (up.ra_column, up.dec_column) == ("x", "y")

    t2 = Table({"alpha": [1.0], "Delta": [2.0], "flux": [3.0]})
    up = parse_votable_upload(astropy_votable(t2, "tabledata"), "t", max_rows=5, max_bytes=10**5)
    assert (up.ra_column, up.dec_column) == ("alpha", "Delta")
    t3 = Table({"ra": ["12:00:00"], "dec": ["+10:00:00"]})  # sexagesimal strings: not usable
    up = parse_votable_upload(astropy_votable(t3, "tabledata"), "t", max_rows=5, max_bytes=10**5)
    assert (up.ra_column, up.dec_column) == (None, None)


def test_upload_limits_are_413_with_actionable_messages():
    data = astropy_votable(upload_source(), "binary2")
    with pytest.raises(TapError) as info:
        parse_votable_upload(data, "big", max_rows=2, max_bytes=10**6)
    assert info.value.http_status == 413
    assert info.value.message.startswith("upload 'big' has 3 rows; this service accepts at most 2")
    # 2,000,000 rows of TABLEDATA: refused from a cheap count, before astropy spends seconds parsing
    many = (
        b'<?xml version="1.0"?><VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">'
        b'<RESOURCE type="results"><TABLE><FIELD name="x" datatype="int"/><DATA><TABLEDATA>\n'
        + b"<TR><TD>1</TD></TR>\n" * 2_000_000
        + b"</TABLEDATA></DATA></TABLE></RESOURCE></VOTABLE>"
    )
    with pytest.raises(TapError) as info:
        parse_votable_upload(many, "x", max_rows=100_000, max_bytes=10**8)
    assert info.value.http_status == 413
    assert "upload 'x' has 2,000,000 rows; this service accepts at most 100,000" in info.value.message
    with pytest.raises(TapError) as info:
        parse_votable_upload(many, "x", max_rows=10**7, max_bytes=1_000_000)
    assert info.value.http_status == 413 and "at most 1.0 MB" in info.value.message
    # the cheap count is exact: exactly at the limit is accepted
    small = many.replace(b"<TR><TD>1</TD></TR>\n" * 2_000_000, b"<TR><TD>1</TD></TR>\n" * 3)
    assert len(parse_votable_upload(small, "x", max_rows=3, max_bytes=10**5).table) == 3


def test_upload_rejections_are_400():
    good = astropy_votable(Table({"a": [1]}), "tabledata")
    for bad_name in ("1table", "my-table", "", "tab le"):
        with pytest.raises(TapError) as info:
            parse_votable_upload(good, bad_name, max_rows=5, max_bytes=10**5)
        assert info.value.http_status == 400 and "letter" in info.value.message
    with pytest.raises(TapError) as info:
        parse_votable_upload(b"<html>not a votable</html>", "t", max_rows=5, max_bytes=10**5)
    assert info.value.http_status == 400 and "'t'" in info.value.message
    dup = Table({"ra": [1.0], "RA": [2.0]})
    with pytest.raises(TapError, match="case-insensitively") as info:
        parse_votable_upload(astropy_votable(dup, "tabledata"), "t", max_rows=5, max_bytes=10**5)
    reserved = Table({"_HEALPIX_29": [1]})
    with pytest.raises(TapError, match="reserved"):
        parse_votable_upload(astropy_votable(reserved, "tabledata"), "t", max_rows=5, max_bytes=10**5)
    only_arrays = Table({"v": np.zeros((2, 3))})
    with pytest.raises(TapError, match="no column"):
        parse_votable_upload(astropy_votable(only_arrays, "tabledata"), "t", max_rows=5, max_bytes=10**5)


def test_upload_keeps_names_that_need_delimiting_and_parses_timestamps():
    doc = (
        b'<?xml version="1.0"?><VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">'
        b'<RESOURCE type="results"><TABLE>'
        b'<FIELD name="flux (1.4GHz)" datatype="double"/>'
        b'<FIELD name="obs time" datatype="char" arraysize="*" xtype="timestamp"/>'
        b"<DATA><TABLEDATA>"
        b"<TR><TD>1.5</TD><TD>2020-01-02T03:04:05.25Z</TD></TR>"
        b"<TR><TD></TD><TD>2020-01-02</TD></TR>"
        b"<TR><TD>NaN</TD><TD></TD></TR>"
        b"</TABLEDATA></DATA></TABLE></RESOURCE></VOTABLE>"
    )
    up = parse_votable_upload(doc, "odd", max_rows=5, max_bytes=10**5)
    assert [c.name for c in up.columns] == ["flux (1.4GHz)", "obs time"]
    assert [c.datatype for c in up.columns] == ["float64", "timestamp"]
    assert up.table["obs time"].to_pylist() == [
        datetime(2020, 1, 2, 3, 4, 5, 250000),
        datetime(2020, 1, 2),
        None,
    ]
    assert up.table["flux (1.4GHz)"].to_pylist()[:2] == [1.5, None]
    bad = doc.replace(b"2020-01-02</TD>", b"yesterday</TD>")
    with pytest.raises(TapError, match="obs time"):
        parse_votable_upload(bad, "odd", max_rows=5, max_bytes=10**5)
