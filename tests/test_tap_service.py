"""The TAP service over real HTTP: pyvo and httpx against `dac serve` on 127.0.0.1 (demo lake)."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import pyvo
from astropy import units as u
from astropy.coordinates import SkyCoord, search_around_sky
from astropy.io import fits
from astropy.io.votable import parse_single_table
from astropy.table import Table

import dac_lake

VOT_NS = "{http://www.ivoa.net/xml/VOTable/v1.3}"


def _infos(body: bytes) -> list[tuple[str, str, str]]:
    root = ET.fromstring(body)
    return [(i.get("name"), i.get("value"), (i.text or "").strip()) for i in root.iter(f"{VOT_NS}INFO")]


def _status(body: bytes) -> list[str]:
    return [v for n, v, _ in _infos(body) if n == "QUERY_STATUS"]


@pytest.fixture(scope="module")
def tap(served):
    return pyvo.dal.TAPService(served.tap)


@pytest.fixture(scope="module")
def survey(service_lake):
    """The demo survey as the Python API reads it (the reference for what TAP must return)."""
    return dac_lake.connect(service_lake.url)


def test_sync_cone_equals_python_api_and_astropy(tap, survey):
    ra, dec, r = 266.4, -29.0, 0.5
    q = (
        "SELECT source_id, ra, dec FROM demo_survey.source "
        f"WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra}, {dec}, {r}))"
    )
    got = tap.run_sync(q).to_table()
    everything = survey.adql("SELECT source_id, ra, dec FROM demo_survey.source")
    sep = SkyCoord(everything["ra"].to_numpy(), everything["dec"].to_numpy(), unit="deg").separation(
        SkyCoord(ra, dec, unit="deg")
    )
    want = set(everything["source_id"].to_numpy()[sep.deg <= r].tolist())
    assert len(want) > 10
    assert set(got["source_id"].tolist()) == want
    assert got["ra"].unit == u.deg and got["source_id"].dtype == np.int64


def test_votable_fields_carry_definition_metadata(served):
    r = httpx.get(
        f"{served.tap}/sync",
        params={"lang": "ADQL", "query": "SELECT TOP 5 source_id, ra, r_mag FROM demo_survey.source"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-votable+xml")
    assert b"BINARY2" in r.content
    table = parse_single_table(io.BytesIO(r.content))
    fields = {f.name: f for f in table.fields}
    assert fields["ra"].ucd == "pos.eq.ra;meta.main" and str(fields["ra"].unit) == "deg"
    assert fields["source_id"].datatype == "long" and fields["r_mag"].datatype == "float"
    assert "Right ascension" in fields["ra"].description
    assert _status(r.content) == ["OK"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_parameter_names_are_case_insensitive(served, method):
    params = {"ReQuEsT": "doQuery", "lang": "adql", "Query": "SELECT COUNT(*) AS n FROM demo_survey.source"}
    params["responseFormat"] = "csv"
    if method == "GET":
        r = httpx.get(f"{served.tap}/sync", params=params)
    else:
        r = httpx.post(f"{served.tap}/sync", data=params)
    assert r.status_code == 200, r.text
    lines = r.text.strip().splitlines()
    assert lines[0] == "n" and int(lines[1]) == dac_lake.connect(served.lake.url).count("demo_survey")


@pytest.mark.parametrize(
    ("fmt", "reader"),
    [
        ("votable/td", lambda b: Table.read(io.BytesIO(b), format="votable")),
        (
            "application/x-votable+xml;serialization=TABLEDATA",
            lambda b: Table.read(io.BytesIO(b), format="votable"),
        ),
        ("text/csv", lambda b: Table.read(b.decode(), format="ascii.csv")),
        ("tsv", lambda b: Table.read(b.decode(), format="ascii.tab")),
        ("fits", lambda b: Table.read(fits.open(io.BytesIO(b))[1])),
        ("parquet", lambda b: Table(pq.read_table(io.BytesIO(b)).to_pandas().to_dict("list"))),
        (
            "json",
            lambda b: Table(rows=json.loads(b)["data"], names=[m["name"] for m in json.loads(b)["metadata"]]),
        ),
    ],
)
def test_every_output_format_gives_the_same_rows(served, fmt, reader):
    q = "SELECT TOP 50 source_id, ra, g_mag FROM demo_survey.source ORDER BY source_id"
    ref = httpx.get(f"{served.tap}/sync", params={"LANG": "ADQL", "QUERY": q})
    want = parse_single_table(io.BytesIO(ref.content)).to_table()
    r = httpx.get(f"{served.tap}/sync", params={"LANG": "ADQL", "QUERY": q, "RESPONSEFORMAT": fmt})
    assert r.status_code == 200, r.text
    got = reader(r.content)
    assert list(got["source_id"]) == list(want["source_id"])
    np.testing.assert_allclose(np.asarray(got["ra"], dtype=float), np.asarray(want["ra"], dtype=float))


def test_maxrec_overflow_and_metadata_only(tap, served):
    result = tap.run_sync("SELECT source_id FROM demo_survey.source", maxrec=100)
    assert len(result) == 100 and result.query_status == "OVERFLOW"
    r = httpx.get(
        f"{served.tap}/sync",
        params={"LANG": "ADQL", "QUERY": "SELECT source_id, ra FROM demo_survey.source", "MAXREC": 0},
    )
    table = parse_single_table(io.BytesIO(r.content))
    assert [f.name for f in table.fields] == ["source_id", "ra"] and len(table.array) == 0
    # OVERFLOW is announced after the table (DALI): the first status is OK, the last OVERFLOW
    full = httpx.get(
        f"{served.tap}/sync",
        params={"LANG": "ADQL", "QUERY": "SELECT source_id FROM demo_survey.source", "MAXREC": 10},
    )
    assert _status(full.content) == ["OK", "OVERFLOW"]
    assert full.content.rindex(b"OVERFLOW") > full.content.rindex(b"</TABLE>")


def test_default_and_hard_maxrec_from_configuration(served):
    # the test configuration: maxrec_default 20000, maxrec_max 200000
    r = httpx.get(
        f"{served.tap}/sync",
        params={"LANG": "ADQL", "QUERY": "SELECT source_id FROM demo_survey.source", "FORMAT": "csv"},
    )
    assert len(r.text.strip().splitlines()) - 1 == 20000
    caps = httpx.get(f"{served.tap}/capabilities").text
    assert re.search(r'<default unit="row">20000</default>\s*<hard unit="row">200000</hard>', caps)


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"LANG": "ADQL", "QUERY": "SELEC * FROM demo_survey.source"}, 400, r"line 1, column"),
        ({"LANG": "ADQL", "QUERY": "SELECT nosuch FROM demo_survey.source"}, 400, r"nosuch"),
        ({"LANG": "ADQL"}, 400, r"QUERY"),
        ({"LANG": "SQL", "QUERY": "SELECT 1"}, 400, r"LANG=SQL"),
        ({"LANG": "ADQL", "QUERY": "SELECT 1 FROM demo_survey.source", "MAXREC": "lots"}, 400, r"MAXREC"),
        ({"LANG": "ADQL", "QUERY": "SELECT 1 FROM demo_survey.source", "RESPONSEFORMAT": "xls"}, 400, r"xls"),
        (
            {"LANG": "ADQL", "QUERY": "SELECT * FROM read_csv('/etc/passwd')"},
            400,
            r"(?i)read_csv|not|unknown",
        ),
    ],
)
def test_errors_are_dali_documents_with_http_status(served, params, status, message):
    r = httpx.get(f"{served.tap}/sync", params=params)
    assert r.status_code == status
    infos = _infos(r.content)
    assert [(n, v) for n, v, _ in infos] == [("QUERY_STATUS", "ERROR")]
    assert re.search(message, infos[0][2]), infos[0][2]
    assert "root:" not in r.text


def test_tap_schema_matches_tables_endpoint_and_is_queryable(tap, served):
    tables = {t.name for t in tap.tables}
    assert {"demo_survey.source", "demo_xmatch.source", "TAP_SCHEMA.columns"} <= tables
    assert "private_cat.source" not in tables
    rows = tap.run_sync(
        "SELECT column_name, unit, ucd, datatype, arraysize, principal, indexed FROM TAP_SCHEMA.columns "
        "WHERE table_name = 'demo_survey.source'"
    ).to_table()
    by_name = {r["column_name"]: r for r in rows}
    assert by_name["ra"]["unit"] == "deg" and by_name["ra"]["indexed"] == 1
    assert by_name["source_id"]["datatype"] == "long"
    detail = httpx.get(f"{served.tap}/tables/demo_survey.source")
    assert detail.status_code == 200 and b"<name>r_mag</name>" in detail.content
    minimal = httpx.get(f"{served.tap}/tables", params={"detail": "min"})
    assert b"<column" not in minimal.content and b"demo_survey.source" in minimal.content
    assert httpx.get(f"{served.tap}/tables/private_cat.source").status_code == 404


def test_capabilities_availability_and_examples_run(tap, served):
    avail = ET.fromstring(httpx.get(f"{served.tap}/availability").content)
    assert avail.find("{http://www.ivoa.net/xml/VOSIAvailability/v1.0}available").text == "true"
    caps = tap.capabilities
    tap_cap = next(c for c in caps if (c.standardid or "").lower().startswith("ivo://ivoa.net/std/tap"))
    assert any(lang.name == "ADQL" for lang in tap_cap.languages)
    ran = 0
    for example in tap.examples:
        if "TAP_UPLOAD" in example["QUERY"]:
            continue
        result = tap.run_sync(example["QUERY"], maxrec=50)
        assert len(result) > 0, example["QUERY"]
        ran += 1
    assert ran >= 4


def test_upload_join_and_crossmatch(tap, service_lake):
    survey = dac_lake.connect(service_lake.url)
    sample = survey.adql("SELECT TOP 40 source_id, ra, dec FROM demo_survey.source ORDER BY source_id")
    mine = Table(
        {
            "name": [f"s{i}" for i in range(len(sample))],
            "ra": sample["ra"].to_numpy() + 0.5 / 3600,  # half an arcsec off in RA
            "dec": sample["dec"].to_numpy(),
        }
    )
    mine["ra"].unit = u.deg
    mine["dec"].unit = u.deg
    q = (
        "SELECT u.name, t.source_id FROM TAP_UPLOAD.mine AS u JOIN demo_survey.source AS t "
        "ON DISTANCE(POINT('ICRS', u.ra, u.dec), POINT('ICRS', t.ra, t.dec)) < 2.0/3600"
    )
    got = tap.run_sync(q, uploads={"mine": mine}).to_table()
    everything = survey.adql("SELECT source_id, ra, dec FROM demo_survey.source")
    cat = SkyCoord(everything["ra"].to_numpy(), everything["dec"].to_numpy(), unit="deg")
    i, j, _, _ = search_around_sky(SkyCoord(mine["ra"], mine["dec"]), cat, 2 * u.arcsec)
    ids = everything["source_id"].to_numpy()
    want = {(f"s{a}", int(ids[b])) for a, b in zip(i, j, strict=True)}
    assert {(str(r["name"]), int(r["source_id"])) for r in got} == want and len(want) >= 40
    # the same through an async job
    job_result = tap.run_async(q, uploads={"mine": mine}).to_table()
    assert {(str(r["name"]), int(r["source_id"])) for r in job_result} == want


def test_upload_limits_give_clear_errors(served):
    rows = "".join(f"<TR><TD>{i}</TD><TD>{i % 360}</TD><TD>0</TD></TR>" for i in range(6000))
    vot = (
        '<?xml version="1.0"?><VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">'
        '<RESOURCE><TABLE><FIELD name="id" datatype="int"/><FIELD name="ra" datatype="double"/>'
        f'<FIELD name="dec" datatype="double"/><DATA><TABLEDATA>{rows}</TABLEDATA></DATA>'
        "</TABLE></RESOURCE></VOTABLE>"
    )
    r = httpx.post(
        f"{served.tap}/sync",
        data={"LANG": "ADQL", "QUERY": "SELECT COUNT(*) FROM TAP_UPLOAD.big", "UPLOAD": "big,param:t"},
        files={"t": ("t.xml", vot.encode(), "application/x-votable+xml")},
    )
    assert r.status_code == 413, r.text
    assert re.search(r"6,000 rows.*5,000", _infos(r.content)[0][2])
    missing = httpx.post(
        f"{served.tap}/sync",
        data={"LANG": "ADQL", "QUERY": "SELECT * FROM TAP_UPLOAD.x", "UPLOAD": "x,param:nothere"},
    )
    assert missing.status_code == 400 and "nothere" in missing.text


def test_scs_matches_the_cone_of_the_python_api(served, survey):
    scs = pyvo.dal.SCSService(f"{served.base}/scs/demo_survey")
    got = scs.search(pos=(266.4, -29.0), radius=0.3, verbosity=3).to_table()
    want = survey.cone("demo_survey", 266.4, -29.0, 0.3)
    assert sorted(got["source_id"].tolist()) == sorted(want["source_id"].to_pylist()) and len(want) > 5
    brief = scs.search(pos=(266.4, -29.0), radius=0.3, verbosity=1).to_table()
    assert {"source_id", "ra", "dec"} <= set(brief.colnames) and "r_mag" not in brief.colnames
    bad = httpx.get(f"{served.base}/scs/demo_survey", params={"RA": 10, "DEC": 95, "SR": 1})
    assert bad.status_code == 400 and "DEC" in bad.text
    unknown = httpx.get(f"{served.base}/scs/private_cat", params={"RA": 10, "DEC": 5, "SR": 1})
    assert unknown.status_code == 404 and "private_cat" in unknown.text  # it names what was asked only
    assert "demo_survey" in unknown.text
