"""SIGKILL the ingest at several points: the previous release stays current and fully readable, and
`dac lake gc` then removes what the killed ingest left. Runs the real `dac` CLI in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import dac_lake
from dac_lake import layout
from dac_lake.catalog_def import load_definition
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts

STAGES = ["read", "claimed", "partitions", "catalog", "written", "publish"]


def _full_read(lake, release: str) -> int:
    table = pq.read_table(
        lake.storage.path(f"{layout.release_prefix('testcat', release)}/testcat/dataset"),
        filesystem=lake.storage.pa_fs,
        partitioning=None,
    )
    return table.num_rows


def _paused_ingest(stage, inputs, lake, definition_file, tmp_path, *extra: str) -> subprocess.Popen:
    """Run the real `dac ingest release testcat v2` in a child process and return once it is parked at
    `stage` (the DAC_INGEST_PAUSE_AT test hook), ready to be killed or inspected."""
    pause_file = tmp_path / "paused"
    env = dict(os.environ, DAC_INGEST_PAUSE_AT=stage, DAC_INGEST_PAUSE_FILE=str(pause_file))
    cmd = [
        sys.executable, "-m", "dac_lake.cli", "ingest", "release", "testcat", "v2", *inputs,
        "--lake", lake.storage.url, "--definition", str(definition_file),
        "--max-rows-per-partition", "300", "--highest-order", "7", "--no-progress", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not pause_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"ingest ended before reaching {stage}: {proc.stdout.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("ingest never reached the pause point")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_leaves_previous_release(stage, lake, definition_file, tmp_path):
    first = write_parts(make_catalog(3000, seed=1), tmp_path / "v1", parts=2)
    ingest_release(
        lake,
        "testcat",
        "v1",
        first,
        load_definition(definition_file),
        IngestOptions(
            max_rows_per_partition=500, highest_order=7, margin_arcsec=30, validate_with_lsdb=False
        ),
    )
    second = write_parts(make_catalog(6000, seed=2), tmp_path / "v2", parts=3)
    proc = _paused_ingest(
        stage, second, lake, definition_file, tmp_path, "--margin-arcsec", "30", "--threads", "2"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # the previous release is still current and every row of it readable, through every reader
    assert lake.current_release("testcat") == "v1"
    session = dac_lake.connect(lake.storage.url)
    assert session.count("testcat") == 3000
    assert session.sql("SELECT count(*) AS n FROM testcat")["n"][0].as_py() == 3000
    assert _full_read(lake, "v1") == 3000

    if stage == "read":  # nothing was written yet
        assert "v2" not in lake.releases("testcat")
    else:
        info = lake.release_info("testcat", "v2")
        assert info.state == "incomplete" or stage == "publish"
        assert info.marker, "the killed ingest's prefix must still carry its incomplete marker"
    removed = lake.gc()
    assert removed == ([] if stage == "read" else ["testcat/v2"])
    assert "v2" not in lake.releases("testcat")
    assert lake.current_release("testcat") == "v1" and _full_read(lake, "v1") == 3000
    # and the release name can be used again
    summary = ingest_release(
        lake,
        "testcat",
        "v2",
        second,
        load_definition(definition_file),
        IngestOptions(
            max_rows_per_partition=300, highest_order=7, margin_arcsec=30, validate_with_lsdb=False
        ),
    )
    assert summary.published and dac_lake.connect(lake.storage.url).count("testcat") == 6000


def test_gc_leaves_a_running_ingest_alone(lake, definition_file, tmp_path):
    """An incomplete prefix whose writer is alive (same host, live pid) is not garbage."""
    second = write_parts(make_catalog(2000, seed=2), tmp_path / "v2", parts=1)
    proc = _paused_ingest("partitions", second, lake, definition_file, tmp_path)
    try:
        assert lake.gc() == []
        assert lake.release_info("testcat", "v2").state == "incomplete"
    finally:
        proc.kill()
        proc.wait()
    assert lake.gc() == ["testcat/v2"]
