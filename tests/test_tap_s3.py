"""The service on a lake in the real Ceph RGW: what TOPCAT sees is what the local lake gives."""

from __future__ import annotations

import uuid

import pytest
import pyvo

from dac_lake.catalog_def import load_definition
from dac_lake.lake import Lake
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage
from ingest.release import IngestOptions, ingest_release
from tests.conftest import S3_SKIP_REASON, _drop_bucket, s3_available
from tests.service_fixtures import ServiceLake, start_service, stop_service

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def served_s3(service_lake, tmp_path_factory):
    if not s3_available():
        pytest.skip(S3_SKIP_REASON)
    bucket = f"dac-tap-{uuid.uuid4().hex[:10]}"
    url = f"s3://{bucket}/lake"
    storage = LakeStorage(url, load_settings())
    lake = Lake(storage)
    lake.init()
    opts = IngestOptions(max_rows_per_partition=4000, margin_arcsec=10, validate_with_lsdb=False)
    for catalog in ("demo_survey", "demo_xmatch"):
        ingest_release(lake, catalog, "dr1", service_lake.inputs[catalog], load_definition(catalog), opts)
    root = tmp_path_factory.mktemp("served-s3")
    s3_lake = ServiceLake(url, service_lake.root, service_lake.config, service_lake.inputs)
    served = start_service(s3_lake, root / "jobs", root / "service.log")
    yield served
    stop_service(served)
    _drop_bucket(storage, bucket)


def test_s3_lake_answers_like_the_local_lake(served_s3, served):
    queries = [
        "SELECT source_id FROM demo_survey.source "
        "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 266.4, -29.0, 0.7))",
        "SELECT COUNT(*) AS n, AVG(r_mag) AS r FROM demo_survey.source WHERE dec < -30 AND r_mag < 25",
        "SELECT a.source_id, b.obj_id FROM demo_survey.source AS a JOIN demo_xmatch.source AS b "
        "ON DISTANCE(POINT('ICRS', a.ra, a.dec), POINT('ICRS', b.ra, b.dec)) < 1.0/3600 "
        "WHERE 1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS', 266.4, -29.0, 1.0))",
    ]
    s3 = pyvo.dal.TAPService(served_s3.tap)
    local = pyvo.dal.TAPService(served.tap)
    for q in queries:
        a = s3.run_sync(q).to_table()
        b = local.run_sync(q).to_table()
        assert len(a) == len(b) and len(a) > 0, q
        key = a.colnames[0]
        if len(a) > 1:
            assert sorted(a[key].tolist()) == sorted(b[key].tolist()), q
        else:
            assert a[0].as_void().tolist() == pytest.approx(b[0].as_void().tolist()), q
    job = s3.run_async(queries[0]).to_table()
    assert len(job) == len(local.run_sync(queries[0]).to_table())
