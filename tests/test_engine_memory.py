"""The engine's service-facing features: in-memory tables (uploads), streaming with overflow, cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord, search_around_sky

from dac_lake.adql.model import ColumnMeta, TableMeta
from dac_lake.catalog_def import load_definition
from dac_lake.engine import MemoryTable, QueryCancelled, QueryControl, QueryEngine
from dac_lake.sandbox import SandboxLimits
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts

N = 20_000


@pytest.fixture
def testcat(lake, definition_file, tmp_path):
    main = make_catalog(N, seed=11)
    opts = IngestOptions(
        max_rows_per_partition=1500, highest_order=7, margin_arcsec=10, validate_with_lsdb=False
    )
    parts = write_parts(main, tmp_path / "a")
    ingest_release(lake, "testcat", "dr1", parts, load_definition(definition_file), opts)
    return lake, main


def _upload(ra, dec) -> MemoryTable:
    meta = TableMeta(
        schema="TAP_UPLOAD",
        name="mine",
        columns=(
            ColumnMeta("name", "string"),
            ColumnMeta("ra", "float64", "deg", "pos.eq.ra;meta.main"),
            ColumnMeta("dec", "float64", "deg", "pos.eq.dec;meta.main"),
        ),
        ra_column="ra",
        dec_column="dec",
    )
    table = pa.table(
        {
            "name": [f"s{i}" for i in range(len(ra))],
            "ra": pa.array(ra, pa.float64()),
            "dec": pa.array(dec, pa.float64()),
        }
    )
    return MemoryTable(meta, table)


def test_upload_crossmatch_reads_only_nearby_partitions_and_equals_astropy(testcat):
    lake, main = testcat
    rng = np.random.default_rng(5)
    # 30 catalog sources, jittered by < 2", plus 10 positions far from everything near the clump
    pick = rng.choice(N, 30, replace=False)
    sub = main.take(pick)
    up = SkyCoord(sub["ra"].to_numpy(), sub["dec"].to_numpy(), unit="deg").directional_offset_by(
        rng.uniform(0, 360, 30) * u.deg, rng.uniform(0, 2.0, 30) * u.arcsec
    )
    upload = _upload(up.ra.deg, up.dec.deg)
    engine = QueryEngine(lake, frozenset({"*"}))
    result = engine.adql(
        "SELECT u.name, t.object_id FROM TAP_UPLOAD.mine AS u JOIN testcat.main AS t "
        "ON DISTANCE(POINT(u.ra, u.dec), POINT(t.ra, t.dec)) < 3.0/3600",
        memory_tables=[upload],
    )
    cat = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    i, j, _, _ = search_around_sky(up, cat, 3 * u.arcsec)
    ids = main["object_id"].to_numpy()
    want = {(f"s{a}", int(ids[b])) for a, b in zip(i, j, strict=True)}
    got = set(zip(result.table["name"].to_pylist(), result.table["object_id"].to_pylist(), strict=True))
    assert got == want and len(want) >= 30
    scan = result.scans[0]
    assert scan.table == "testcat.main"
    assert 0 < len(scan.files) < scan.total_files  # HEALPix-indexed on the fly: not the whole catalog


def test_memory_table_alone_and_unknown_to_other_queries(testcat):
    lake, _ = testcat
    engine = QueryEngine(lake, frozenset({"*"}))
    upload = _upload([10.0, 20.0, 30.0], [-5.0, 0.0, 5.0])
    got = engine.adql("SELECT COUNT(*) AS n FROM tap_upload.mine WHERE dec >= 0", memory_tables=[upload])
    assert got.table["n"].to_pylist() == [2]
    from dac_lake.adql import AdqlError

    with pytest.raises(AdqlError, match=r"(?i)mine"):
        engine.adql("SELECT * FROM TAP_UPLOAD.mine")


def test_stream_yields_maxrec_rows_then_flags_overflow(testcat):
    lake, _ = testcat
    engine = QueryEngine(lake, frozenset({"*"}))
    stream = engine.stream("SELECT object_id FROM testcat.main", maxrec=1234)
    rows = sum(b.num_rows for b in stream)
    assert rows == 1234 and stream.overflow
    exact = engine.stream("SELECT TOP 10 object_id FROM testcat.main", maxrec=10)
    assert sum(b.num_rows for b in exact) == 10 and not exact.overflow
    meta = engine.stream("SELECT object_id, ra FROM testcat.main", maxrec=0)
    assert sum(b.num_rows for b in meta) == 0 and meta.schema.names == ["object_id", "ra"]


def test_cancel_stops_a_running_query_and_engine_stays_usable(testcat):
    lake, _ = testcat
    engine = QueryEngine(lake, frozenset({"*"}), SandboxLimits(timeout_s=120, threads=1))
    control = QueryControl()
    slow = (
        "SELECT COUNT(*) AS n FROM testcat.main AS a JOIN testcat.main AS b ON a.object_id <> b.object_id "
        "WHERE SIN(a.ra) * COS(b.dec) > 0.5"
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.adql(slow, control=control)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    t0 = time.monotonic()
    thread.start()
    deadline = time.monotonic() + 30
    while control.progress() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert control.progress() is not None, "the query never started"
    assert control.files_total > 0 and "partitions" in control.describe()
    control.cancel()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - t0 < 60
    assert len(errors) == 1 and isinstance(errors[0], QueryCancelled)
    assert engine.adql("SELECT COUNT(*) AS n FROM testcat.main").table["n"].to_pylist() == [N]
