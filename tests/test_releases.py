"""Releases: publish (atomic, create-only pointer), roll back, drop, list; concurrent publishers."""

from __future__ import annotations

import threading

import pyarrow.parquet as pq
import pytest

import dac_lake
from dac_lake.catalog_def import load_definition
from dac_lake.lake import Lake, LakeError, PublishConflict
from dac_lake.storage import LakeStorage
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts

FAST = IngestOptions(
    max_rows_per_partition=2000, highest_order=6, margin_arcsec=60.0, validate_with_lsdb=False
)


def _ingest(lake, definition_file, tmp_path, release, n=3000, seed=0, publish=True):
    inputs = write_parts(make_catalog(n, seed=seed), tmp_path / f"in-{release}", parts=2)
    opts = IngestOptions(**{**FAST.__dict__, "publish": publish})
    return ingest_release(lake, "testcat", release, inputs, load_definition(definition_file), opts)


def test_publish_rollback_drop(lake, definition_file, tmp_path):
    _ingest(lake, definition_file, tmp_path, "dr1", n=3000)
    _ingest(lake, definition_file, tmp_path, "dr2", n=4000, seed=1)
    session = dac_lake.connect(lake.storage.url)
    assert lake.current_release("testcat") == "dr2" and session.count("testcat") == 4000
    # roll back: the pointer moves, nothing is copied
    pointer = lake.publish("testcat", "dr1")
    assert pointer.seq == 3 and pointer.previous == "dr2"
    assert lake.current_release("testcat") == "dr1"
    assert dac_lake.connect(lake.storage.url).count("testcat") == 3000
    assert lake.pointer_history("testcat") == [1, 2, 3]
    with pytest.raises(LakeError, match="current release"):
        lake.drop("testcat", "dr1")
    lake.drop("testcat", "dr2")
    assert lake.releases("testcat") == ["dr1"]
    with pytest.raises(LakeError, match="no release"):
        lake.publish("testcat", "dr2")


def test_release_names_are_immutable(lake, definition_file, tmp_path):
    _ingest(lake, definition_file, tmp_path, "dr1")
    with pytest.raises(LakeError, match="already exists"):
        _ingest(lake, definition_file, tmp_path, "dr1", seed=3)
    assert lake.current_release("testcat") == "dr1"


def test_unpublished_release_then_publish(lake, definition_file, tmp_path):
    _ingest(lake, definition_file, tmp_path, "dr1")
    summary = _ingest(lake, definition_file, tmp_path, "dr2", publish=False)
    assert not summary.published
    infos = {i.release: i for i in lake.list_releases("testcat")}
    assert infos["dr2"].state == "ready" and not infos["dr2"].current and infos["dr1"].current
    assert lake.gc() == []  # a complete release is never garbage
    lake.publish("testcat", "dr2")
    assert lake.current_release("testcat") == "dr2"


def test_stale_publisher_is_refused(lake, definition_file, tmp_path):
    """A publisher that decided on an old pointer (expected_seq) must not overwrite a newer one."""
    _ingest(lake, definition_file, tmp_path, "dr1")
    _ingest(lake, definition_file, tmp_path, "dr2", publish=False)
    _ingest(lake, definition_file, tmp_path, "dr3", publish=False)
    seen = lake.pointer_history("testcat")[-1]
    lake.publish("testcat", "dr2")  # someone else publishes meanwhile
    with pytest.raises(PublishConflict, match="moved"):
        lake.publish("testcat", "dr3", expected_seq=seen)
    assert lake.current_release("testcat") == "dr2"


def test_concurrent_publishers_never_overwrite(lake_url, definition_file, tmp_path):
    """Many processes' worth of publishers racing: every successful publish has its own pointer number,
    losers get PublishConflict, and the history is gap-free."""
    lake = Lake(LakeStorage(lake_url))
    lake.init()
    for rel in ("a1", "a2"):
        _ingest(lake, definition_file, tmp_path, rel, publish=False)
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def publisher(i: int) -> None:
        own = Lake(LakeStorage(lake_url))
        barrier.wait()
        try:
            pointer = own.publish("testcat", "a1" if i % 2 else "a2")
            outcomes.append(f"ok {pointer.seq}")
        except PublishConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    oks = sorted(int(o.split()[1]) for o in outcomes if o.startswith("ok"))
    assert len(oks) == len(set(oks)) >= 1
    assert lake.pointer_history("testcat") == list(range(1, len(oks) + 1))
    assert len(outcomes) == 6


def test_release_list_and_show_cli(lake, definition_file, tmp_path):
    from typer.testing import CliRunner

    from dac_lake.cli import app

    _ingest(lake, definition_file, tmp_path, "dr1")
    runner = CliRunner()
    out = runner.invoke(app, ["release", "list", "--lake", lake.storage.url])
    assert out.exit_code == 0 and "testcat" in out.output and "* testcat" in out.output
    out = runner.invoke(app, ["release", "show", "testcat", "--lake", lake.storage.url])
    assert out.exit_code == 0 and '"rows": 3000' in out.output
    out = runner.invoke(app, ["release", "publish", "testcat", "nope", "--lake", lake.storage.url])
    assert out.exit_code == 1 and "no release 'nope'" in out.output


def test_previous_release_files_untouched_by_new_release(lake, definition_file, tmp_path):
    _ingest(lake, definition_file, tmp_path, "dr1")
    before = dict(lake.storage.walk_files("catalogs/testcat/releases/dr1"))
    _ingest(lake, definition_file, tmp_path, "dr2", seed=5)
    assert dict(lake.storage.walk_files("catalogs/testcat/releases/dr1")) == before
    table = pq.read_table(
        lake.storage.path("catalogs/testcat/releases/dr1/testcat/dataset"),
        filesystem=lake.storage.pa_fs,
        partitioning=None,
    )
    assert table.num_rows == 3000


def test_gc_finishes_a_release_published_just_before_a_crash(lake, definition_file, tmp_path):
    """Killed after the pointer write but before the marker removal: gc keeps it and removes the marker."""
    import json

    from dac_lake import layout

    _ingest(lake, definition_file, tmp_path, "dr1", publish=False)
    marker = f"{layout.release_prefix('testcat', 'dr1')}/{layout.INCOMPLETE_MARKER}"
    lake.storage.write_text(marker, json.dumps({"host": "elsewhere", "pid": 1, "heartbeat_unix": 0}))
    assert lake.release_info("testcat", "dr1").state == "incomplete"
    lake.storage.put_if_absent(
        layout.pointer_key("testcat", 1),
        json.dumps({"seq": 1, "release": "dr1", "published_at": "x"}).encode(),
    )
    assert lake.gc() == []
    assert not lake.storage.exists(marker)
    assert lake.release_info("testcat", "dr1").state == "ready"
