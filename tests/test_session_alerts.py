"""`dac_lake.connect` on a lake that holds a release catalog and an alert stream: `count`, `files`, `manifest`
and trusted `sql` work for both (alert tables through the newest snapshot's file list), on a local lake and
on the real Ceph RGW."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import dac_lake
from dac_lake.alerts import AlertLake
from dac_lake.alerts.layout import partition_key
from dac_lake.catalog_def import load_definition
from dac_lake.lake import LakeError
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts
from tests.test_alert_lake import make_batches

TABLES = ("detections", "objects", "upper_limits", "alerts")


@pytest.fixture
def mixed_lake(lake, definition_file, tmp_path):
    """testcat (a release, 3000 rows) and the stream `ztf` after two commits, the second without alerts
    and upper limits (so tables grow unevenly); `rubin`, created but empty of alerts, too."""
    opts = IngestOptions(max_rows_per_partition=1000, highest_order=5, validate_with_lsdb=False)
    inputs = write_parts(make_catalog(3000, seed=8), tmp_path / "in", parts=2)
    ingest_release(lake, "testcat", "dr1", inputs, load_definition(definition_file), opts)
    batches = make_batches(seed=4, n_batches=2, alerts_per_field=40)
    writer = AlertLake(lake.storage, "ztf")
    writer.commit("b0", *batches[0])
    writer.commit("b1", batches[1][0])
    AlertLake(lake.storage, "rubin").commit("r0", batches[0][0])  # detections only: empty alerts table
    return lake, writer.snapshot()


def test_connect_counts_files_and_sql_with_an_alert_stream(mixed_lake):
    lake, snapshot = mixed_lake
    session = dac_lake.connect(lake.storage.url)
    assert session.tables() == ["rubin", "testcat", "ztf"]

    # counts: manifests and snapshots, equal to what a scan finds (ADQL and trusted SQL)
    assert session.count("testcat") == 3000
    assert session.sql("SELECT COUNT(*) AS n FROM testcat")["n"][0].as_py() == 3000
    for table in TABLES:
        n = session.count(f"ztf.{table}")
        assert n == snapshot.rows(table)
        assert session.adql(f"SELECT COUNT(*) AS n FROM ztf.{table}")["n"][0].as_py() == n
        assert session.sql(f"SELECT COUNT(*) AS n FROM ztf.{table}")["n"][0].as_py() == n
    assert snapshot.rows("detections") > snapshot.rows("objects") > 0
    assert session.count("rubin.alerts") == 0
    assert session.sql("SELECT COUNT(*) AS n FROM rubin.alerts")["n"][0].as_py() == 0

    # files: exactly the snapshot's files for an alert table (a pixel folder holds a file per batch),
    # one per partition for the release; both readable as they are
    fs = lake.storage.pa_fs
    for name, want_rows in (("testcat", 3000), ("ztf.detections", snapshot.rows("detections"))):
        files = session.files(name)
        assert files and all(f.startswith(lake.storage.url_of("")) for f in files)
        paths = [lake.storage.path(lake.storage.rel_of(f)) for f in files]
        rows = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths)
        assert rows == want_rows
    det = snapshot.table("detections")
    assert len(session.files("ztf.detections")) == det.n_files > len(det.pixels)
    first = session.manifest("ztf.detections")["partitions"][:1]
    assert len(session.files("ztf.detections", first)) == len(det.files(partition_key(*first[0][:2])))
    assert len(session.files("testcat")) == len(session.manifest("testcat")["partitions"])

    # a join across the two kinds in trusted SQL, checked against the same join in ADQL
    sql = session.sql(
        "SELECT COUNT(*) AS n FROM ztf.objects AS o JOIN testcat AS t ON abs(o.dec - t.dec) < 1"
    )["n"][0].as_py()
    adql = session.adql(
        "SELECT COUNT(*) AS n FROM ztf.objects AS o JOIN testcat.main AS t ON ABS(o.dec - t.dec) < 1"
    )["n"][0].as_py()
    assert sql == adql > 0

    # a stream's name alone is ambiguous; unknown names say what exists
    with pytest.raises(LakeError, match="several tables"):
        session.count("ztf")
    with pytest.raises(
        LakeError, match="no published catalog 'nosuch'; catalogs and alert streams: rubin, testcat, ztf"
    ):
        session.files("nosuch")
    assert session.count("testcat", release="dr1") == 3000


def test_sessions_without_every_group_see_only_their_streams(mixed_lake):
    lake, _ = mixed_lake
    anonymous = dac_lake.connect(lake.storage.url, identity={"public"})
    assert "ztf" in anonymous.tables()
    with pytest.raises(LakeError, match="sql"):
        anonymous.sql("SELECT 1")
    assert anonymous.count("ztf.objects") == dac_lake.connect(lake.storage.url).count("ztf.objects")
