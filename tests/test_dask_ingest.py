"""`dac ingest release --dask`: a real `dask scheduler` and `dask worker` processes on 127.0.0.1 write the
same release as a local run (the same files, byte for byte, but for dates and the manifest's record of how
it ran); a worker killed mid-ingest is replaced by Dask, and when Dask gives up the ingest fails cleanly
with the previous release still current and readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import dac_lake
from dac_lake import layout
from dac_lake.catalog_def import load_definition
from dac_lake.lake import Lake
from dac_lake.settings import load_settings, section_setting
from dac_lake.storage import LakeStorage
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts
from tests.dask_fixtures import Cluster, _env

try:
    import distributed
except ImportError:  # pragma: no cover - distributed is a dependency
    distributed = None

pytestmark = pytest.mark.skipif(
    distributed is None, reason="the `distributed` package is not importable: pip install distributed"
)

N = 200_000
OPTIONS = {"max_rows_per_partition": 10_000, "highest_order": 7, "margin_arcsec": 60.0}
SMALL = {"max_rows_per_partition": 3_000, "highest_order": 7, "margin_arcsec": 60.0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dask")
    c = Cluster(tmp)
    c.pause_file.write_text("disarmed\n")
    try:
        c.add_worker("w1")
        c.add_worker("w2")
        c.connect(2)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The synthetic catalog in 4 files, its definition, and a local ingest of it as the reference."""
    import yaml

    from tests.conftest import TEST_DEFINITION

    tmp = tmp_path_factory.mktemp("inputs")
    definition_file = tmp / "testcat.yaml"
    definition_file.write_text(yaml.safe_dump(TEST_DEFINITION, sort_keys=False))
    files = write_parts(make_catalog(N), tmp / "big", parts=4)
    small = write_parts(make_catalog(40_000, seed=5), tmp / "small", parts=3)
    return {"definition_file": definition_file, "big": files, "small": small, "tmp": tmp}


def _lake(path: Path) -> Lake:
    lake = Lake(LakeStorage(str(path), load_settings()))
    lake.init()
    return lake


def _release_files(lake: Lake, release: str = "dr1") -> dict[str, Path]:
    root = Path(lake.storage.path(layout.release_prefix("testcat", release)))
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_release(local: Lake, dask: Lake, release: str = "dr1") -> dict:
    """Every file of the two releases is the same: Parquet byte for byte (and by content, for a readable
    failure message), properties but for the creation date, the manifest but for how it ran."""
    a, b = _release_files(local, release), _release_files(dask, release)
    assert sorted(a) == sorted(b)
    parquet = [name for name in a if name.endswith(".parquet")]
    assert len(parquet) > 20
    for name, path in a.items():
        other = b[name]
        if name.endswith(".parquet"):
            left, right = pq.read_table(path), pq.read_table(other)
            assert left.schema.equals(right.schema, check_metadata=True), name
            assert left.equals(right), f"{name}: rows differ"
            assert path.read_bytes() == other.read_bytes(), f"{name}: same rows, other bytes"
        elif name.endswith("properties"):

            def strip(p: Path) -> list[str]:
                return [x for x in p.read_text().splitlines() if not x.startswith("hats_creation_date")]

            assert strip(path) == strip(other), name
        elif name == layout.RELEASE_MANIFEST:
            continue
        else:  # partition_info.csv, _metadata, _common_metadata, skymap, the definition
            assert path.read_bytes() == other.read_bytes(), name
    left = json.loads(a[layout.RELEASE_MANIFEST].read_text())
    right = json.loads(b[layout.RELEASE_MANIFEST].read_text())
    executor = right.pop("executor")
    for m in (left, right):
        m.pop("created_at")
    assert left == right
    assert "executor" not in left
    return executor


def test_dask_ingest_writes_the_local_release(cluster, inputs, tmp_path):
    definition_file = inputs["definition_file"]
    local = _lake(tmp_path / "local")
    t0 = time.perf_counter()
    summary = ingest_release(
        local, "testcat", "dr1", inputs["big"], load_definition(definition_file), IngestOptions(**OPTIONS)
    )
    local_s = time.perf_counter() - t0
    assert summary.partitions > 20 and len(summary.orders) >= 2

    # the real CLI, pointed at the cluster with --dask
    dask_lake = _lake(tmp_path / "dask")
    started = time.time()
    cmd = [sys.executable, "-m", "dac_lake.cli", "ingest", "release", "testcat", "dr1", *inputs["big"]]
    cmd += ["--lake", dask_lake.storage.url, "--definition", str(definition_file), "--no-progress"]
    cmd += ["--max-rows-per-partition", "10000", "--highest-order", "7", "--margin-arcsec", "60"]
    cmd += ["--dask", cluster.address]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    dask_s = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{N:,} from 4 file(s)" in out.stdout
    print(f"\nlocal ingest {local_s:.2f} s, dask ingest (CLI, 2 workers) {dask_s:.2f} s")

    executor = _assert_same_release(local, dask_lake)
    workers = cluster.worker_addresses()
    assert executor["kind"] == "dask" and executor["scheduler"] == cluster.address
    assert executor["workers"] == 2
    assert set(executor["partition_files_by_worker"]) == {workers["w1"], workers["w2"]}
    assert sum(executor["partition_files_by_worker"].values()) == summary.partitions

    # the scheduler's own record: both workers ran partition writes of this ingest
    stream = cluster.client.get_task_stream(start=started)
    writers = {t["worker"] for t in stream if "-write-" in str(t["key"])}
    assert writers == {workers["w1"], workers["w2"]}

    # and the published dask release answers queries as the local one does
    s_local, s_dask = dac_lake.connect(local.storage.url), dac_lake.connect(dask_lake.storage.url)
    query = "SELECT count(*) AS n, sum(mag) AS m FROM testcat WHERE dec < -20"
    assert s_local.sql(query).equals(s_dask.sql(query))
    assert s_dask.count("testcat") == N


def _ingest_in_thread(lake: Lake, release: str, files, definition_file, address: str):
    """Run a dask ingest in a thread; the returned dict gets 'summary' or 'error'."""
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = ingest_release(
                lake,
                "testcat",
                release,
                files,
                load_definition(definition_file),
                IngestOptions(**SMALL, dask_address=address, validate_with_lsdb=False),
            )
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_killed_worker_is_replaced_and_the_release_is_the_same(cluster, inputs, tmp_path):
    definition_file = inputs["definition_file"]
    local = _lake(tmp_path / "local")
    ingest_release(
        local,
        "testcat",
        "dr1",
        inputs["small"],
        load_definition(definition_file),
        IngestOptions(**SMALL, validate_with_lsdb=False),
    )
    dask_lake = _lake(tmp_path / "dask")
    cluster.arm_pause()
    outcome = _ingest_in_thread(dask_lake, "dr1", inputs["small"], definition_file, cluster.address)
    os.kill(cluster.paused_worker_pid(outcome), signal.SIGKILL)  # its nanny starts a new one
    outcome["thread"].join(timeout=120)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome["summary"].published
    executor = _assert_same_release(local, dask_lake)
    assert executor["workers"] == 2
    assert dac_lake.connect(dask_lake.storage.url).count("testcat") == 40_000


def test_losing_the_only_worker_does_not_stall_the_ingest(inputs, tmp_path):
    """A cluster of one worker whose process dies mid-ingest (its nanny restarts it under a new address,
    as after a memory kill): the ingest's tasks are recomputed on the new process and the release is the
    local one. (Tasks restricted to a worker address, even loosely, stayed `no-worker` for ever: Dask
    ignores `allow_other_workers` when a worker joins.)"""
    definition_file = inputs["definition_file"]
    local = _lake(tmp_path / "local")
    opts = IngestOptions(**SMALL, validate_with_lsdb=False)
    ingest_release(local, "testcat", "dr1", inputs["small"], load_definition(definition_file), opts)
    (tmp_path / "solo").mkdir()
    solo = Cluster(tmp_path / "solo")
    solo.pause_file.write_text("disarmed\n")
    try:
        solo.add_worker("only")
        solo.connect(1)
        dask_lake = _lake(tmp_path / "dask")
        solo.arm_pause()
        outcome = _ingest_in_thread(dask_lake, "dr1", inputs["small"], definition_file, solo.address)
        os.kill(solo.paused_worker_pid(outcome), signal.SIGKILL)
        outcome["thread"].join(timeout=120)
        assert not outcome["thread"].is_alive(), "the ingest stalled after its only worker died"
        assert "error" not in outcome, repr(outcome.get("error"))
        assert outcome["summary"].published
        _assert_same_release(local, dask_lake)
    finally:
        solo.close()


def test_ingest_fails_cleanly_when_dask_gives_up(cluster, inputs, tmp_path):
    """With no retries allowed, a worker dying under a partition task fails the ingest: the error
    reaches the caller, the new release's prefix is removed, the previous release stays current."""
    definition_file = inputs["definition_file"]
    lake = _lake(tmp_path / "lake")
    first = write_parts(make_catalog(5_000, seed=9, id_offset=10**9), tmp_path / "v1", parts=1)
    ingest_release(
        lake,
        "testcat",
        "v1",
        first,
        load_definition(definition_file),
        IngestOptions(**SMALL, dask_address=cluster.address, validate_with_lsdb=False),
    )
    previous = cluster.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    cluster.client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        cluster.arm_pause()
        outcome = _ingest_in_thread(lake, "v2", inputs["small"], definition_file, cluster.address)
        pid = cluster.paused_worker_pid(outcome)
        assert lake.release_info("testcat", "v2").state == "incomplete"
        os.kill(pid, signal.SIGKILL)
        outcome["thread"].join(timeout=120)
    finally:
        cluster.client.run_on_scheduler(
            lambda dask_scheduler, n=previous: setattr(dask_scheduler, "allowed_failures", n)
        )
    from distributed import KilledWorker

    assert isinstance(outcome.get("error"), KilledWorker), outcome
    assert lake.current_release("testcat") == "v1"
    assert "v2" not in lake.releases("testcat")  # removed by the failed ingest itself, not left to gc
    session = dac_lake.connect(lake.storage.url)
    assert session.count("testcat") == 5_000
    assert session.sql("SELECT count(*) AS n FROM testcat")["n"][0].as_py() == 5_000
    # no late write of a cancelled task re-creates the prefix
    time.sleep(1.0)
    assert "v2" not in lake.releases("testcat") and lake.gc() == []
    # the survivors still serve the next ingest
    summary = ingest_release(
        lake,
        "testcat",
        "v2",
        inputs["small"],
        load_definition(definition_file),
        IngestOptions(**SMALL, dask_address=cluster.address, validate_with_lsdb=False),
    )
    assert summary.published and dac_lake.connect(lake.storage.url).count("testcat") == 40_000


def test_dask_setting_from_config_and_environment(tmp_path):
    config = tmp_path / "dac.toml"
    config.write_text('[ingest]\ndask = "tcp://10.0.0.5:8786"\n')
    settings = load_settings({"DAC_CONFIG": str(config)})
    assert section_setting(settings, "ingest", "dask", {}) == "tcp://10.0.0.5:8786"
    env = {"DAC_INGEST_DASK": "tcp://127.0.0.1:9999"}
    assert section_setting(settings, "ingest", "dask", env) == "tcp://127.0.0.1:9999"
    assert section_setting(load_settings({}), "ingest", "dask", {}) is None


def test_bad_input_on_the_cluster_is_reported_and_writes_nothing(cluster, inputs, tmp_path):
    """Errors raised on a worker (here: a duplicate id across two files) reach the caller with the same
    message as a local run, before anything is written."""
    definition_file = inputs["definition_file"]
    table = make_catalog(6_000, seed=3)
    files = write_parts(table, tmp_path / "in", parts=2)
    dup = write_parts(table.slice(4_000, 10), tmp_path / "dup", parts=1)
    messages = []
    for address in (None, cluster.address):
        lake = _lake(tmp_path / f"lake-{bool(address)}")
        with pytest.raises(ValueError, match="duplicate id") as err:
            ingest_release(
                lake,
                "testcat",
                "dr1",
                [*files, *dup],
                load_definition(definition_file),
                IngestOptions(**SMALL, dask_address=address),
            )
        messages.append(str(err.value))
        assert lake.releases("testcat") == []
    assert messages[0] == messages[1]


@pytest.mark.s3
def test_dask_ingest_to_s3_writes_the_local_release(cluster, inputs, tmp_path):
    """Workers write straight to the Ceph RGW with their own settings (the S3 endpoint and keys reach
    them through their environment, not the task graph): the release is the local one, file for file."""
    from tests.conftest import S3_SKIP_REASON, _drop_bucket, s3_available

    if not s3_available():
        pytest.skip(S3_SKIP_REASON)
    definition = load_definition(inputs["definition_file"])
    local = _lake(tmp_path / "local")
    ingest_release(local, "testcat", "dr1", inputs["small"], definition, IngestOptions(**SMALL))
    bucket = f"dac-test-dask-{os.getpid()}-{int(time.time())}"
    s3 = Lake(LakeStorage(f"s3://{bucket}/lake", load_settings()))
    s3.init()
    try:
        summary = ingest_release(
            s3,
            "testcat",
            "dr1",
            inputs["small"],
            definition,
            IngestOptions(**SMALL, dask_address=cluster.address),
        )
        assert summary.published
        prefix = layout.release_prefix("testcat", "dr1")
        left = dict(local.storage.walk_files(prefix))
        right = dict(s3.storage.walk_files(prefix))
        assert sorted(left) == sorted(right)
        parquet = [name for name in left if name.endswith(".parquet")]
        assert len(parquet) > 10
        for name in parquet:
            assert local.storage.read_bytes(name) == s3.storage.read_bytes(name), name
        assert dac_lake.connect(s3.storage.url).count("testcat") == 40_000
    finally:
        _drop_bucket(s3.storage, bucket)


def test_cli_takes_the_cluster_from_the_environment(cluster, inputs, tmp_path):
    """`DAC_INGEST_DASK` sends `dac ingest release` to the cluster; `--dask local` keeps it in-process."""
    from typer.testing import CliRunner

    from dac_lake.cli import app

    runner = CliRunner()
    for name, extra, expect in (("env", [], "dask"), ("local", ["--dask", "local"], None)):
        lake = _lake(tmp_path / name)
        args = ["ingest", "release", "testcat", "dr1", *inputs["small"], "--lake", lake.storage.url]
        args += ["--definition", str(inputs["definition_file"]), "--no-progress"]
        args += ["--max-rows-per-partition", "3000", "--highest-order", "7", "--margin-arcsec", "60", *extra]
        result = runner.invoke(app, args, env={"DAC_INGEST_DASK": cluster.address})
        assert result.exit_code == 0, result.output
        manifest = json.loads(
            lake.storage.read_text(f"{layout.release_prefix('testcat', 'dr1')}/{layout.RELEASE_MANIFEST}")
        )
        assert (manifest.get("executor") or {}).get("kind") == expect
