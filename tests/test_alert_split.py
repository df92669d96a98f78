"""Splitting crowded partitions of an alert stream (HATS-style mixed orders): compaction replaces a partition
holding more than `crowded_rows` rows by its children at order+1 (recursively), per table, in one snapshot,
without changing a row, blocking a reader or losing a concurrent commit.

Checked here: the partitioning (children at order+1 and +2, one file each, the parent gone from the
snapshot), rows and ADQL answers identical before and after (counts, every row, a light curve, a cone that
reads only the children it touches), hats and lsdb open the mixed-order tables, later commits (re-deliveries
included) land in the children - an empty child too - and find their stored rows there, a commit whose
snapshot predates a split and a split that raced commits both end exact (no loss, no duplicate), through
the ingest pipeline too, gc removes the parent's files only after its grace, old snapshots still read, and
`dac alerts compact --crowded-rows`.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import dac_lake
from dac_lake.alerts import AlertLake, Snapshot
from dac_lake.alerts import layout as alayout
from dac_lake.alerts.compaction import plan_split
from dac_lake.alerts.snapshots import FileEntry, TableState, registry_manifest
from dac_lake.coverage import cone_ranges29, partitions_touching
from dac_lake.engine import QueryEngine
from dac_lake.healpix import healpix29
from tests.test_alert_lake import (
    brute_force_objects,
    check_complete,
    counts,
    data_files,
    expected_detections,
    expected_upper_limits,
    make_batches,
    new_lake,
)

STREAM = "ztf"
ORDER = 3  # coarse partitions (~7.3 deg), so that the simulator's 3-degree fields crowd a few of them
SORT = {"detections": ["detection_id"], "alerts": ["alert_id"], "objects": ["object_id"],
        "upper_limits": ["object_id", "mjd", "band"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers
def committed(lake_url: str, n_batches: int = 4, total: int | None = None):
    """A stream at order 3 with the first `n_batches` of `make_batches(total)` committed."""
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=total or n_batches)
    writer = AlertLake(lake.storage, STREAM, order=ORDER)
    for i in range(n_batches):
        writer.commit(f"b{i}", *batches[i])
    return lake, writer, batches


def crowded_threshold(snap: Snapshot) -> int:
    """Below the objects' densest partition (so objects split too) and far below the detections' densest
    (so they split twice or more)."""
    return int(max(snap.table("objects").pixel_rows(k) for k in snap.table("objects").pixels) * 0.7)


def all_rows(lake_url: str) -> dict[str, pd.DataFrame]:
    session = dac_lake.connect(lake_url)
    return {
        t: session.adql(f"SELECT * FROM {STREAM}.{t}").to_pandas().sort_values(SORT[t]).reset_index(drop=True)
        for t in alayout.TABLES
    }


def assert_same_rows(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for t in alayout.TABLES:
        pd.testing.assert_frame_equal(a[t], b[t], obj=t)


def assert_exact(lake_url: str, batches) -> None:
    """The stream holds each detection, alert and limit of `batches` once, and objects equal to the
    brute-force aggregate of the detections."""
    det = expected_detections(batches)
    got = all_rows(lake_url)
    assert got["detections"].detection_id.is_unique
    assert set(got["detections"].detection_id) == set(det.index)
    assert counts(lake_url) == {
        "detections": len(det),
        "objects": det.object_id.nunique(),
        "upper_limits": len(expected_upper_limits(batches)),
        "alerts": sum(b[2].num_rows for b in batches),
    }
    from tests.test_alert_lake import assert_objects_equal

    assert_objects_equal(got["objects"], brute_force_objects(got["detections"]))


def leaves_ok(snap: Snapshot) -> None:
    """Every partition with files is a leaf, the splits form a tree below the stream's order."""
    for state in snap.tables.values():
        state.check(snap.order)
        assert not set(state.pixels) & set(state.splits)


# ---------------------------------------------------------------------------------------------- pure parts
def test_keys_routing_and_plan_are_consistent():
    assert alayout.partition_key(0, 0) == 4 and alayout.partition_key(3, 34) == 4 * 64 + 34
    for order in range(0, alayout.MAX_ORDER + 1):
        for pixel in (0, 1, 12 * 4**order - 1):
            key = alayout.partition_key(order, pixel)
            assert alayout.order_pixel(key) == (order, pixel)
            assert alayout.parse_key_name(alayout.key_name(key)) == key
    parent = alayout.partition_key(3, 34)
    children = alayout.children_keys(parent)
    assert [alayout.order_pixel(c) for c in children] == [(4, 136 + i) for i in range(4)]
    lo, hi = alayout.key_range29(parent)
    assert (alayout.key_range29(children[0])[0], alayout.key_range29(children[-1])[1]) == (lo, hi)
    # routing: a split region goes to the child, also to an empty one, recursively
    state = TableState({children[0]: (FileEntry("a.parquet", 3),)}, frozenset({parent, children[1]}))
    step = (hi - lo) // 4
    values = np.array([lo, lo + step, lo + 2 * step, hi - 1, hi, lo - 1], dtype=np.int64)
    got = [alayout.order_pixel(k) for k in state.route(values, 3)]
    grandchild_first = alayout.order_pixel(alayout.children_keys(children[1])[0])
    assert got == [(4, 136), grandchild_first, (4, 138), (4, 139), (3, 35), (3, 33)]
    assert (
        state.is_leaf(children[2], 3) and not state.is_leaf(parent, 3) and not state.is_leaf(children[1], 3)
    )
    with pytest.raises(Exception, match="not a leaf"):
        TableState({parent: (FileEntry("a.parquet", 1),)}, frozenset({parent})).check(3)
    # the plan: crowded partitions split until no leaf holds more than the threshold
    rng = np.random.default_rng(1)
    hp = np.sort(np.r_[rng.integers(lo, lo + step // 16, 900), rng.integers(lo + 2 * step, hi, 100)])
    splits, leaves = plan_split(hp, parent, crowded_rows=200, max_order=10)
    assert parent in splits and sum(b - a for _, a, b in leaves) == len(hp)
    assert all(b - a <= 200 for _, a, b in leaves)
    assert max(alayout.order_pixel(k)[0] for k, _, _ in leaves) >= 6
    routed = TableState({}, frozenset(splits)).route(hp, 3)
    for k, a, b in leaves:
        assert (routed[a:b] == k).all()
    _, capped = plan_split(hp, parent, crowded_rows=200, max_order=4)
    assert {alayout.order_pixel(k)[0] for k, _, _ in capped} == {4}


def test_snapshot_json_keeps_the_single_order_form_until_a_split():
    key = alayout.partition_key(3, 34)
    flat = Snapshot("s", 1, 3, {"detections": TableState({key: (FileEntry("f.parquet", 5),)})})
    doc = json.loads(flat.to_json())
    assert doc["version"] == 1 and doc["tables"]["detections"]["pixels"] == {"34": [["f.parquet", 5]]}
    assert Snapshot.from_json(flat.to_json()).tables == flat.tables
    child = alayout.children_keys(key)[1]
    mixed = Snapshot("s", 2, 3, {"detections": TableState({child: (FileEntry("g.parquet", 5),)},
                                                          frozenset({key}))})  # fmt: skip
    doc = json.loads(mixed.to_json())
    assert doc["version"] == 2
    assert doc["tables"]["detections"] == {"rows": 5, "partitions": {"4/137": [["g.parquet", 5]]},
                                           "splits": ["3/34"]}  # fmt: skip
    assert Snapshot.from_json(mixed.to_json()).tables == mixed.tables
    assert Snapshot.from_json(mixed.to_json()).referenced() == {
        "alerts/s/detections/dataset/Norder=4/Dir=0/Npix=137/g.parquet"
    }


# ---------------------------------------------------------------------------------------------- splitting
def test_split_gives_children_and_identical_answers(lake_url):
    lake, writer, batches = committed(lake_url)
    old = writer.snapshot()
    crowded = crowded_threshold(old)
    before = all_rows(lake_url)
    det = expected_detections(batches)
    engine = QueryEngine(lake, frozenset({"*"}))
    oid = det.object_id.value_counts().index[0]
    light_curve = f"SELECT mjd, band, mag FROM ztf.detections WHERE object_id = '{oid}' ORDER BY mjd"
    densest = max(old.table("detections").pixels, key=old.table("detections").pixel_rows)
    lo, hi = alayout.key_range29(densest)
    inside = det[(healpix29(det.ra.to_numpy(), det.dec.to_numpy()) >= lo)
                 & (healpix29(det.ra.to_numpy(), det.dec.to_numpy()) < hi)]  # fmt: skip
    ra0, dec0 = float(inside.ra.iloc[0]), float(inside.dec.iloc[0])
    cone = (f"SELECT detection_id, mag FROM ztf.detections WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
            f"CIRCLE('ICRS', {ra0}, {dec0}, 0.25)) ORDER BY detection_id")  # fmt: skip
    objects_cone = cone.replace(
        "detection_id, mag FROM ztf.detections", "object_id FROM ztf.objects"
    ).replace("ORDER BY detection_id", "ORDER BY object_id")
    queries = {"light curve": light_curve, "cone": cone, "objects cone": objects_cone,
               "count": "SELECT COUNT(*) AS n, MIN(mjd) AS a, MAX(mjd) AS b, COUNT(DISTINCT object_id) AS o "
                        "FROM ztf.detections WHERE band = 'g'"}  # fmt: skip
    answers = {name: engine.adql(q) for name, q in queries.items()}

    report = writer.compact(crowded_rows=crowded)
    snap = writer.snapshot()
    assert report.seq == old.seq + 1 and snap.operation == "compact" and report.crowded == []
    leaves_ok(snap)
    for table in alayout.TABLES:
        was, now = old.table(table), snap.table(table)
        assert now.rows == was.rows, table
        for key in was.pixels:  # exactly the crowded partitions were split
            assert (key in now.splits) == (was.pixel_rows(key) > crowded), (table, key)
            assert (key in now.pixels) == (was.pixel_rows(key) <= crowded)
        split_leaves = [k for k in now.pixels if alayout.order_pixel(k)[0] > ORDER]
        assert all(now.pixel_rows(k) <= crowded and len(now.files(k)) == 1 for k in split_leaves)
    det_orders = snap.table("detections").orders()
    assert {ORDER + 1, ORDER + 2} <= set(det_orders), det_orders
    assert snap.table("objects").splits, "objects split too"
    assert {(s.table, s.order, s.pixel) for s in report.splits} == {
        (t, *alayout.order_pixel(k), ) for t in alayout.TABLES for k in old.table(t).pixels
        if old.table(t).pixel_rows(k) > crowded
    }  # fmt: skip
    assert all(sum(r for _, _, r in s.children) == s.rows for s in report.splits)
    # files sit in HATS folders at their partition's own order
    for path in snap.referenced():
        order, _pixel = alayout.pixel_of_path(path)
        assert f"/Norder={order}/" in path and order >= ORDER
    check_complete(lake)
    # the registry lists the leaves at their orders, with their files
    manifest = registry_manifest(writer.config, snap, "detections")
    assert {p[0] for p in manifest["partitions"]} == set(det_orders)
    assert sum(p[2] for p in manifest["partitions"]) == len(det)
    assert set(manifest["pixel_files"]) == {f"{o}/{p}" for o, p, _ in manifest["partitions"]}

    # rows and answers: identical
    assert_same_rows(all_rows(lake_url), before)
    engine.registry.refresh()
    for name, q in queries.items():
        after = engine.adql(q)
        assert after.table.equals(answers[name].table), name
    # the cone reads the files of the partitions it touches only: fewer rows' worth than the whole
    # order-3 partition it read before
    after = engine.adql(cone)
    scan, scan_before = after.scans[0], answers["cone"].scans[0]
    ranges = cone_ranges29(ra0, dec0, 0.25)
    touched = partitions_touching(snap.table("detections").partitions(), ranges)
    assert {alayout.pixel_of_path(f) for f in scan.files} == {(o, p) for o, p, _ in touched}
    assert len(scan.files) == sum(len(snap.table("detections").files(alayout.partition_key(o, p)))
                                  for o, p, _ in touched)  # fmt: skip
    assert scan.rows < scan_before.rows and len(scan.files) < snap.table("detections").n_files
    assert any(o > ORDER for o, _, _ in touched)


def test_hats_and_lsdb_open_mixed_orders(lake_url):
    import hats
    import lsdb

    lake, writer, batches = committed(lake_url)
    # merge first and gc: then the split parents' folders are the only ones holding superseded files
    writer.compact(split=False)
    writer.gc(grace_seconds=0, keep_snapshots=1)
    writer.compact(crowded_rows=crowded_threshold(writer.snapshot()))
    snap = writer.snapshot()
    det = expected_detections(batches)
    for table, n in (("detections", len(det)), ("objects", det.object_id.nunique())):
        root = lake.storage.upath(alayout.table_prefix(STREAM, table))
        catalog = hats.read_hats(root)
        assert catalog.catalog_info.total_rows == n
        assert {(p.order, p.pixel) for p in catalog.get_healpix_pixels()} == {
            alayout.order_pixel(k) for k in snap.table(table).pixels
        }
        assert len({p.order for p in catalog.get_healpix_pixels()}) >= 2
        # the parent's folder is not a listed partition: an outside reader does not see its files twice
        frame = lsdb.open_catalog(root).compute()
        assert len(frame) == n
    writer.gc(grace_seconds=0, keep_snapshots=1)
    root = lake.storage.upath(alayout.table_prefix(STREAM, "detections"))
    root.fs.invalidate_cache()
    if not lake.storage.is_s3:
        from hats.io.validation import is_valid_catalog

        assert is_valid_catalog(root, strict=True)
    frame = lsdb.open_catalog(root).compute()
    assert set(frame.detection_id) == set(det.index) and frame.detection_id.is_unique
    ra0, dec0 = float(det.ra.iloc[0]), float(det.dec.iloc[0])
    cone = lsdb.open_catalog(root).cone_search(ra0, dec0, 600).compute()
    assert det.index[0] in set(cone.detection_id)


def test_later_commits_land_in_the_children(lake_url):
    lake, writer, batches = committed(lake_url, n_batches=4, total=6)
    split_at = writer.compact(crowded_rows=crowded_threshold(writer.snapshot())).seq
    writer.commit("b4", *batches[4])
    writer = AlertLake(lake.storage, STREAM)  # a restarted writer: empty caches, look-ups read the children
    writer.commit("b1-again", *batches[1])  # re-delivered history: already stored in the children
    writer.commit("b5", *batches[5])
    snap = writer.snapshot()
    leaves_ok(snap)
    assert_exact(lake_url, batches)
    # the new batches' files are in split children, never in a split partition
    late = {
        (t, k) for t, s in snap.tables.items() for k, files in s.pixels.items()
        for f in files if int(f.name[:6]) > split_at
    }  # fmt: skip
    assert any(alayout.order_pixel(k)[0] > ORDER for _, k in late)
    assert all(snap.table(t).is_leaf(k, ORDER) for t, k in late)

    # a new object in an empty child of a split partition: its rows go to that child, at its order
    state = snap.table("detections")
    empty = next(c for s in sorted(state.splits) for c in alayout.children_keys(s)
                 if c not in state.pixels and c not in state.splits)  # fmt: skip
    order, pixel = alayout.order_pixel(empty)
    from cdshealpix.nested import healpix_to_lonlat

    lon, lat = healpix_to_lonlat(np.array([pixel], np.uint64), order)
    ra, dec = float(lon.to_value("deg")[0]), float(lat.to_value("deg")[0])
    det0, _, alr0 = batches[0]
    one_det = det0.slice(0, 1)
    new_id = 9_000_000_000_000_000_001
    for name, value in (("detection_id", pa.array([new_id], pa.int64())),
                        ("object_id", pa.array(["ZTFlonely"])), ("alert_id", pa.array([new_id], pa.int64())),
                        ("ra", pa.array([ra])), ("dec", pa.array([dec])),
                        ("is_history", pa.array([False]))):  # fmt: skip
        one_det = one_det.set_column(one_det.schema.get_field_index(name), name, value)
    one_alert = alr0.slice(0, 1)
    for name, value in (("alert_id", pa.array([new_id], pa.int64())), ("object_id", pa.array(["ZTFlonely"])),
                        ("ra", pa.array([ra])), ("dec", pa.array([dec]))):  # fmt: skip
        one_alert = one_alert.set_column(one_alert.schema.get_field_index(name), name, value)
    result = writer.commit("lonely", one_det, None, one_alert)
    snap = writer.snapshot()
    assert [f.name for f in snap.table("detections").files(empty)] == [
        f.name for f in snap.table("detections").files(empty) if int(f.name[:6]) == result.seq
    ] and snap.table("detections").pixel_rows(empty) == 1
    assert snap.table("alerts").route(np.array([healpix29(np.array([ra]), np.array([dec]))[0]]), ORDER)[
        0
    ] in (snap.table("alerts").pixels)
    # and is found there: delivered again, it adds nothing
    again = AlertLake(lake.storage, STREAM).commit("lonely-again", one_det, None, one_alert)
    assert again.rows_new["detections"] == 0 and again.rows_new["alerts"] == 0
    assert counts(lake_url)["detections"] == len(expected_detections(batches)) + 1


def test_a_commit_planned_before_a_split_is_retried_on_the_new_partitioning(lake_url):
    lake, writer, batches = committed(lake_url, n_batches=4, total=5)
    crowded = crowded_threshold(writer.snapshot())
    splitter = AlertLake(lake.storage, STREAM)
    base = writer.snapshot()
    raced = []

    def split_now():  # the commit has written its files at the old partitioning; a split publishes first
        if not raced:
            raced.append(splitter.compact(crowded_rows=crowded))

    files_before = data_files(lake)
    result = writer.commit("b4", *batches[4], before_snapshot=split_now)
    split = raced[0]
    assert split.seq == base.seq + 1 and split.splits
    assert result.seq == split.seq + 1 and not result.skipped
    history = [writer.snapshots.read(s).operation for s in writer.snapshots.history()]
    assert history[-2:] == ["compact", "commit"]
    snap = writer.snapshot()
    leaves_ok(snap)
    assert_exact(lake_url, batches)
    # the first attempt's files (named for snapshot base+1) were never published: orphans for gc
    stray = {f for f in data_files(lake) - files_before - snap.referenced() if "-b4-" in f}
    assert stray and all(f"/{base.seq + 1:06d}-b4-" in f for f in stray)
    assert stray <= set(writer.gc(grace_seconds=0, keep_snapshots=1).removed_files)
    assert_exact(lake_url, batches)


def test_a_split_that_raced_commits_reroutes_their_files(lake_url):
    lake, writer, batches = committed(lake_url, n_batches=4, total=6)
    compactor = AlertLake(lake.storage, STREAM)
    crowded = crowded_threshold(writer.snapshot())
    writer.snapshot()
    done = []

    def commit_now():  # the split has read and written its children; a commit publishes first
        if not done:
            done.append(writer.commit("b4", *batches[4]))

    report = compactor.compact(crowded_rows=crowded, before_commit=commit_now)
    assert report.rebased == 1 and report.seq == done[0].seq + 1 and report.splits
    snap = writer.snapshot()
    leaves_ok(snap)
    for table in ("detections", "objects"):
        assert snap.table(table).splits, table
    # detections: the commit's batch files were read and routed into the children, next to the merged
    # files; objects (copy-on-write): the rewritten partitions were split again from their new file
    det = snap.table("detections")
    rerouted = [k for k, files in det.pixels.items() if alayout.order_pixel(k)[0] > ORDER and len(files) > 1]
    assert rerouted and all(int(det.files(k)[-1].name[:6]) == report.seq for k in rerouted)
    objs = snap.table("objects")
    assert all(len(files) == 1 for files in objs.pixels.values())
    # the commit's files of split partitions were re-routed into the children: nothing lost, nothing twice
    assert_exact(lake_url, batches[:5])
    writer.commit("b5", *batches[5])
    assert_exact(lake_url, batches)
    check_complete(lake)


def test_the_ingest_pipeline_retries_a_batch_that_raced_a_split(tmp_path):
    from ingest.alerts.generate import build_alerts, write_alerts
    from ingest.alerts.pipeline import AlertIngest

    info, records = build_alerts("ztf", 40, 4, seed=5, fields=2, cutout_pixels=4)
    write_alerts(records, info, tmp_path / "packets", layout="night")
    lake = new_lake(str(tmp_path / "lake"))
    compactor = AlertLake(lake.storage, "raced")
    splits = []

    def hook(stage: str) -> None:
        if stage == "before_snapshot" and compactor.snapshot().seq == 2 and not splits:
            splits.append(compactor.compact(crowded_rows=40))

    outcomes = {}
    for stream, crash_hook in (("plain", None), ("raced", hook)):
        pipeline = AlertIngest(
            lake, stream, dead_letter_dir=tmp_path / "dead", order=2, crash_hook=crash_hook
        )
        outcomes[stream] = pipeline.run(pipeline.file_source([tmp_path / "packets"]), max_alerts=40)
    assert splits and splits[0].splits, "a split published while batch 3 was committing"
    raced = AlertLake(lake.storage, "raced").snapshot()
    leaves_ok(raced)
    assert any(o > 2 for o in raced.table("detections").orders())
    assert outcomes["raced"].batches == outcomes["plain"].batches >= 4
    assert outcomes["raced"].detections_new == outcomes["plain"].detections_new
    # batch 3's first attempt (files for snapshot #3, at the old partitioning) was not published; its
    # second attempt was committed after the split, as #4
    ops = [compactor.snapshots.read(s).operation for s in compactor.snapshots.history()]
    assert ops[:4] == ["commit", "commit", "compact", "commit"]
    ever = set().union(*(compactor.snapshots.read(s).referenced() for s in compactor.snapshots.history()))
    stray = data_files(lake, "raced") - ever
    assert stray and all("/000003-" in f for f in stray)
    session = dac_lake.connect(str(tmp_path / "lake"))
    for table, key in (("detections", "detection_id"), ("alerts", "alert_id"), ("objects", "object_id")):
        got = {s: session.adql(f"SELECT {key} FROM {s}.{table}").to_pandas()[key] for s in ("plain", "raced")}
        assert got["raced"].is_unique and set(got["raced"]) == set(got["plain"]), table
    obj = {s: session.adql(f"SELECT object_id, n_detections, ra FROM {s}.objects").to_pandas()
           .sort_values("object_id").reset_index(drop=True) for s in ("plain", "raced")}  # fmt: skip
    pd.testing.assert_frame_equal(obj["raced"], obj["plain"])
    assert len(got["raced"]) == len({r["objectId"] for r in records})


def test_gc_keeps_the_parent_files_until_the_grace_period(lake_url):
    lake, writer, _batches = committed(lake_url)
    before = all_rows(lake_url)
    reader = dac_lake.connect(lake_url)  # resolved the pre-split snapshot and keeps it for a while
    n = reader.adql("SELECT COUNT(*) AS n FROM ztf.detections")["n"][0].as_py()
    old = writer.snapshot()
    writer.compact(crowded_rows=crowded_threshold(old))
    snap = writer.snapshot()
    parents = old.referenced() - snap.referenced()  # of split partitions, and of merged ones
    assert any("/Norder=3/" in p for p in parents)
    assert writer.gc(grace_seconds=3600).removed_files == []
    assert parents <= data_files(lake)
    assert reader.adql("SELECT COUNT(*) AS n FROM ztf.detections")["n"][0].as_py() == n
    on_disk = data_files(lake)
    removed = writer.gc(grace_seconds=0, keep_snapshots=1)
    # the parents' files, and whatever else no kept snapshot lists (objects files superseded by commits)
    assert parents <= set(removed.removed_files) == on_disk - snap.referenced()
    assert data_files(lake) == snap.referenced()
    assert_same_rows(all_rows(lake_url), before)
    if not lake.storage.is_s3:  # the emptied parent folders are gone too
        import os

        split = [p for p in parents if alayout.partition_key(*alayout.pixel_of_path(p)) in
                 snap.table(p.split("/")[2]).splits]  # fmt: skip
        assert split
        for p in split:
            assert not os.path.isdir(os.path.dirname(lake.storage.path(p)))


def test_cli_compact_splits_and_prints(tmp_path):
    from typer.testing import CliRunner

    from dac_lake.cli import app

    lake_url = str(tmp_path / "lake")
    lake, writer, _ = committed(lake_url)
    snap = writer.snapshot()
    crowded = crowded_threshold(snap)
    runner = CliRunner()
    out = runner.invoke(app, ["alerts", "compact", STREAM, "--lake", lake_url, "--crowded-rows", str(crowded),
                              "--max-order", "4"])  # fmt: skip
    assert out.exit_code == 0, out.output
    split_lines = [line for line in out.output.splitlines() if line.strip().startswith("split:")]
    crowded_lines = [line for line in out.output.splitlines() if line.strip().startswith("crowded:")]
    assert split_lines and all("at order 4" in line for line in split_lines)
    assert crowded_lines, "order-4 partitions still crowded are reported: --max-order 4 stops there"
    after = AlertLake(lake.storage, STREAM).snapshot()
    assert set(after.table("detections").orders()) == {ORDER, ORDER + 1}
    status = runner.invoke(app, ["alerts", "status", STREAM, "--lake", lake_url])
    assert status.exit_code == 0 and "orders 3-4" in status.output, status.output
