"""Shared fixtures: lakes on a local folder and on the real Ceph RGW, and small synthetic catalogs.

The S3 variant of every storage/ingest/release test needs the Ceph RGW that `scripts/test` starts (it
exports DAC_TEST_S3=1 and the endpoint and keys); without it those variants skip and say why.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dac_lake.lake import Lake
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage

S3_SKIP_REASON = (
    "no Ceph RGW: run the suite with scripts/test (it starts one on 127.0.0.1), "
    "or export the variables printed by `scripts/ceph-s3.sh start DIR PORT`"
)

TEST_DEFINITION = {
    "name": "testcat",
    "title": "Test catalog",
    "description": "Synthetic positions for the tests",
    "groups": ["public"],
    "ra_column": "ra",
    "dec_column": "dec",
    "id_column": "object_id",
    "columns": [
        {
            "name": "object_id",
            "datatype": "int64",
            "description": "id",
            "ucd": "meta.id;meta.main",
            "nullable": False,
            "principal": True,
        },
        {
            "name": "ra",
            "datatype": "float64",
            "unit": "deg",
            "ucd": "pos.eq.ra;meta.main",
            "description": "RA",
        },
        {
            "name": "dec",
            "datatype": "float64",
            "unit": "deg",
            "ucd": "pos.eq.dec;meta.main",
            "description": "Dec",
        },
        {"name": "mag", "datatype": "float32", "unit": "mag", "ucd": "phot.mag", "description": "magnitude"},
        {"name": "label", "datatype": "string", "description": "a text column"},
    ],
}


def s3_available() -> bool:
    return bool(os.environ.get("DAC_TEST_S3") and os.environ.get("AWS_ENDPOINT_URL"))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def lake_url(request, tmp_path) -> str:
    """A fresh, empty lake URL: a local folder, or a new bucket on the real Ceph RGW."""
    if request.param == "local":
        yield str(tmp_path / "lake")
        return
    if not s3_available():
        pytest.skip(S3_SKIP_REASON)
    bucket = f"dac-test-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/lake"
    yield url
    storage = LakeStorage(url, load_settings())
    _drop_bucket(storage, bucket)


def _drop_bucket(storage: LakeStorage, bucket: str) -> None:
    client = storage.boto3
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:
        return
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def lake(lake_url) -> Lake:
    the_lake = Lake(LakeStorage(lake_url, load_settings()))
    the_lake.init()
    return the_lake


@pytest.fixture
def definition_file(tmp_path) -> Path:
    path = tmp_path / "testcat.yaml"
    path.write_text(yaml.safe_dump(TEST_DEFINITION, sort_keys=False))
    return path


def make_catalog(n: int, seed: int = 0, id_offset: int = 0) -> pa.Table:
    """Random positions over the sky with a dense clump (so partitions come out at several orders)."""
    rng = np.random.default_rng(seed)
    n_clump = n // 3
    ra = np.concatenate([rng.uniform(0, 360, n - n_clump), rng.normal(45.0, 2.0, n_clump) % 360])
    dec = np.concatenate(
        [
            np.degrees(np.arcsin(rng.uniform(-1, 1, n - n_clump))),
            np.clip(rng.normal(-30.0, 2.0, n_clump), -90, 90),
        ]
    )
    return pa.table(
        {
            "object_id": pa.array(rng.permutation(n).astype(np.int64) * 7 + 1000 + id_offset),
            "ra": ra,
            "dec": dec,
            "mag": rng.normal(19, 1.5, n).astype(np.float32),
            "label": [f"obj{i}" for i in range(n)],
        }
    )


def write_parts(table: pa.Table, folder: Path, parts: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    step = -(-table.num_rows // parts)
    for i in range(parts):
        path = folder / f"part-{i}.parquet"
        pq.write_table(table.slice(i * step, step), path)
        paths.append(str(path))
    return paths


# the real TAP service (a demo lake served by `dac serve` on 127.0.0.1) for the service tests
from tests.kafka_fixtures import kafka  # noqa: E402, F401
from tests.service_fixtures import served, service_lake  # noqa: E402, F401
