"""The alert tables of a stream (dac_lake.alerts): commits and snapshots, idempotent re-delivery, crashes
(an exception before the snapshot, and a real SIGKILL of a committing process), gc, objects aggregates
against a brute-force pandas groupby, compaction, ADQL through `dac_lake.connect` (light curves, cones with
HEALPix pruning), hats/lsdb reading the tables as plain HATS catalogs, and the commit throughput.

Every test runs on a local lake and on the real Ceph RGW (`lake_url`). The batches come from
`AlertSimulator`: alerts whose history repeats earlier detections and upper limits, as ZTF's do.

    python -m tests.test_alert_lake --bench [LAKE_URL]   # the throughput figure: 10,000 alerts x ~20 dets
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import dac_lake
from dac_lake.alerts import AlertLake, AlertLakeError, CommitConflict
from dac_lake.alerts import layout as alayout
from dac_lake.alerts.objects import BANDS, update_objects
from dac_lake.engine import QueryEngine
from dac_lake.lake import Lake
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage

STREAM = "ztf"
#: detection ids above 2**53, as ZTF candids are: int64 exactness is part of what the tests check
DETECTION_ID_BASE = 1_500_000_000_000_000_000
BANDS_ZTF = ("g", "r", "i")


# ---------------------------------------------------------------------------------------------- simulator
class AlertSimulator:
    """A synthetic alert stream in the packet layer's contract, fast enough for tests and the benchmark.

    Objects sit in a few survey fields (discs of `field_radius` degrees; a batch observes whole fields, as
    an exposure does). Each alert of a batch is a new detection of an object carrying, as history, the
    object's detections and upper limits of the last 30 days (at most `max_history`), as ZTF's
    prv_candidates do: later alerts repeat earlier detections. Deterministic for a seed."""

    def __init__(
        self,
        seed: int = 0,
        n_fields: int = 3,
        objects_per_field: int = 500,
        field_radius: float = 1.5,
        bands: tuple[str, ...] = BANDS_ZTF,
        max_history: int = 19,
    ):
        self.rng = rng = np.random.default_rng(seed)
        self.bands = np.array(bands)
        self.max_history = max_history
        self.mjd = 60000.0
        self.next_id = DETECTION_ID_BASE + seed * 10**12
        ra, dec, fld = [], [], []
        for f in range(n_fields):
            ra0 = 360.0 * f / n_fields + float(rng.uniform(0, 30))
            dec0 = float(rng.uniform(-60, 40))
            r = field_radius * np.sqrt(rng.uniform(0, 1, objects_per_field))
            th = rng.uniform(0, 2 * np.pi, objects_per_field)
            d = np.clip(dec0 + r * np.sin(th), -89.5, 89.5)
            ra.append((ra0 + r * np.cos(th) / np.cos(np.radians(d))) % 360)
            dec.append(d)
            fld.append(np.full(objects_per_field, f))
        self.obj_ra, self.obj_dec = np.concatenate(ra), np.concatenate(dec)
        self.obj_field = np.concatenate(fld)
        self.obj_id = np.array([f"ZTF{seed:02d}{i:08d}" for i in range(len(self.obj_ra))], dtype=object)
        # every detection and upper limit generated so far (the survey's own database)
        self.det: dict[str, list] = {k: [] for k in ("obj", "id", "mjd", "band", "mag", "ra", "dec")}
        self.ul: dict[str, list] = {k: [] for k in ("obj", "mjd", "band", "lim")}

    @staticmethod
    def _all(store: dict) -> dict:
        return {k: (np.concatenate(v) if v else np.empty(0)) for k, v in store.items()}

    def _new_detections(self, objs: np.ndarray, mjd: np.ndarray) -> dict:
        n = len(objs)
        ids = self.next_id + np.arange(n, dtype=np.int64)
        self.next_id += n
        s = 0.2 / 3600  # 0.2 arcsec astrometric scatter
        dec = self.obj_dec[objs] + self.rng.normal(0, s, n)
        ra = (self.obj_ra[objs] + self.rng.normal(0, s, n) / np.cos(np.radians(dec))) % 360
        mag = self.rng.normal(19, 0.8, n)
        mag[self.rng.uniform(size=n) < 0.03] = np.nan  # no magnitude (e.g. a negative flux)
        cols = dict(obj=objs, id=ids, mjd=mjd, band=self.rng.choice(self.bands, n), mag=mag, ra=ra, dec=dec)
        for k, v in cols.items():
            self.det[k].append(np.asarray(v))
        return cols

    def seed_history(self, n_prev: int = 5, n_ul: int = 2, days: float = 30.0) -> AlertSimulator:
        """Past detections and upper limits of every object (in no lake yet: an object's first alert
        carries them as history)."""
        n = len(self.obj_ra)
        objs = np.repeat(np.arange(n), n_prev)
        self._new_detections(objs, self.mjd - self.rng.uniform(0.01, days, len(objs)))
        objs = np.repeat(np.arange(n), n_ul)
        self.ul["obj"].append(objs)
        self.ul["mjd"].append(self.mjd - self.rng.uniform(0.01, days, len(objs)))
        self.ul["band"].append(self.rng.choice(self.bands, len(objs)))
        self.ul["lim"].append(self.rng.normal(20.5, 0.3, len(objs)))
        return self

    def batch(self, fields, alerts_per_field: int, dt: float = 0.02, history_days: float = 30.0):
        """One batch of alerts: (detections, upper_limits, alerts) pyarrow tables of the contract."""
        self.mjd += dt
        rng = self.rng
        chosen = np.concatenate(
            [rng.choice(np.flatnonzero(self.obj_field == f), alerts_per_field, replace=False) for f in fields]
        )
        old, olds = self._all(self.det), self._all(self.ul)
        new = self._new_detections(chosen, self.mjd + rng.uniform(0, 0.001, len(chosen)))
        alert_of = np.full(len(self.obj_ra), -1, dtype=np.int64)
        alert_of[chosen] = new["id"]
        # history: each alerting object's last `max_history` detections within `history_days`
        sel = np.flatnonzero(np.isin(old["obj"], chosen) & (old["mjd"] > self.mjd - history_days))
        order = sel[np.lexsort((-old["mjd"][sel], old["obj"][sel]))]
        grp = old["obj"][order]
        start = np.r_[0, np.flatnonzero(grp[1:] != grp[:-1]) + 1] if len(grp) else np.empty(0, int)
        rank = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
        hist = order[rank < self.max_history]
        usel = np.flatnonzero(np.isin(olds["obj"], chosen) & (olds["mjd"] > self.mjd - history_days))
        # a non-detection in another band at this epoch for 30% of the alerting objects (later alerts
        # carry it)
        later = chosen[rng.uniform(size=len(chosen)) < 0.3]
        self.ul["obj"].append(later)
        self.ul["mjd"].append(np.full(len(later), self.mjd + 0.0005))
        self.ul["band"].append(rng.choice(self.bands, len(later)))
        self.ul["lim"].append(rng.normal(20.5, 0.3, len(later)))

        def cat(key):
            return np.concatenate([new[key], old[key][hist]])

        det_obj = cat("obj").astype(np.int64)
        n_new, n = len(chosen), len(det_obj)
        mag = cat("mag").astype(np.float32)
        flux = (10 ** (-0.4 * (mag.astype(np.float64) - 31.4))).astype(np.float32)
        detections = pa.table(
            {
                "detection_id": pa.array(cat("id").astype(np.int64), pa.int64()),
                "object_id": pa.array(self.obj_id[det_obj], pa.string()),
                "alert_id": pa.array(alert_of[det_obj], pa.int64()),
                "ra": cat("ra"),
                "dec": cat("dec"),
                "mjd": cat("mjd"),
                "band": pa.array(cat("band"), pa.string()),
                "mag": mag,
                "mag_err": np.full(n, 0.05, np.float32),
                "flux": flux,
                "flux_err": flux * np.float32(0.05),
                "is_positive": np.ones(n, bool),
                "reliability": rng.uniform(0.5, 1.0, n).astype(np.float32),
                "is_history": np.r_[np.zeros(n_new, bool), np.ones(n - n_new, bool)],
                "survey": pa.array(["ZTF"] * n, pa.string()),
                "schema_version": pa.array(["4.02"] * n, pa.string()),
            }
        )
        ul_obj = olds["obj"][usel].astype(np.int64)
        upper_limits = pa.table(
            {
                "object_id": pa.array(self.obj_id[ul_obj], pa.string()),
                "mjd": olds["mjd"][usel],
                "band": pa.array(olds["band"][usel], pa.string()),
                "limiting_mag": olds["lim"][usel].astype(np.float32),
            }
        )
        alerts = pa.table(
            {
                "alert_id": pa.array(new["id"], pa.int64()),
                "object_id": pa.array(self.obj_id[chosen], pa.string()),
                "mjd": new["mjd"],
                "ra": new["ra"],
                "dec": new["dec"],
                "band": pa.array(new["band"], pa.string()),
                "mag": new["mag"].astype(np.float32),
                "survey": pa.array(["ZTF"] * n_new, pa.string()),
                "cutout_url": pa.array(["https://example.org/cutout"] * n_new),  # a context column
            }
        )
        return detections, upper_limits, alerts


def make_batches(seed: int = 7, n_batches: int = 4, alerts_per_field: int = 120, **sim_options) -> list:
    """A deterministic list of batches: each observes two of three fields (so history overlaps)."""
    sim = AlertSimulator(seed=seed, **sim_options).seed_history()
    return [sim.batch([i % 3, (i + 1) % 3], alerts_per_field) for i in range(n_batches)]


# ---------------------------------------------------------------------------------------------- helpers
def new_lake(lake_url: str) -> Lake:
    lake = Lake(LakeStorage(lake_url, load_settings()))
    lake.init()
    return lake


def expected_detections(batches) -> pd.DataFrame:
    """The rows the detections table must hold: each detection_id once."""
    df = pa.concat_tables([b[0] for b in batches]).to_pandas()
    return df.drop_duplicates("detection_id").set_index("detection_id").sort_index()


def expected_upper_limits(batches) -> pd.DataFrame:
    df = pa.concat_tables([b[1] for b in batches]).to_pandas()
    return df.drop_duplicates(["object_id", "mjd", "band"])


def adql(lake_url: str, text: str) -> pd.DataFrame:
    return dac_lake.connect(lake_url).adql(text).to_pandas()


def counts(lake_url: str) -> dict[str, int]:
    return counts_of(lake_url, STREAM)


def check_complete(lake: Lake, stream: str = STREAM) -> None:
    """The newest snapshot is whole: every file it lists exists and holds the rows it says."""
    import pyarrow.parquet as pq

    alert_lake = AlertLake(lake.storage, stream)
    snap = alert_lake.snapshot()
    for table, state in snap.tables.items():
        for pixel, files in state.pixels.items():
            for f in files:
                path = lake.storage.path(alert_lake.file_path(table, pixel, f.name))
                assert pq.ParquetFile(path, filesystem=lake.storage.pa_fs).metadata.num_rows == f.rows


def data_files(lake: Lake, stream: str = STREAM) -> set[str]:
    out = set()
    for table in alayout.TABLES:
        for rel, _ in lake.storage.walk_files(alayout.dataset_prefix(stream, table)):
            if alayout.pixel_of_path(rel) is not None:
                out.add(rel)
    return out


def brute_force_objects(det: pd.DataFrame) -> pd.DataFrame:
    """The objects table computed from all detections at once with pandas (the reference)."""
    d = det.reset_index() if "detection_id" not in det.columns else det.copy()
    ra, dec = np.radians(d["ra"].to_numpy()), np.radians(d["dec"].to_numpy())
    d["x"], d["y"], d["z"] = np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)
    g = d.groupby("object_id")
    out = g.agg(
        first_mjd=("mjd", "min"),
        last_mjd=("mjd", "max"),
        n_detections=("mjd", "size"),
        x=("x", "sum"),
        y=("y", "sum"),
        z=("z", "sum"),
    )
    out["ra"] = np.degrees(np.arctan2(out.y, out.x)) % 360
    out["dec"] = np.degrees(np.arctan2(out.z, np.hypot(out.x, out.y)))
    n_bands = np.zeros(len(out), dtype=int)
    for b in BANDS:
        sub = d[(d.band == b) & np.isfinite(d.mag.astype(float))].sort_values(
            ["object_id", "mjd", "detection_id"]
        )
        last = sub.groupby("object_id").nth(-1).set_index("object_id")
        prev = sub.groupby("object_id").nth(-2).set_index("object_id")
        out[f"mag_{b}_latest"] = last.mag.reindex(out.index).astype(float)
        out[f"mjd_{b}_latest"] = last.mjd.reindex(out.index)
        out[f"mjd_{b}_prev"] = prev.mjd.reindex(out.index)
        rate = (last.mag.astype(float) - prev.mag.reindex(last.index).astype(float)) / (
            last.mjd - prev.mjd.reindex(last.index)
        )
        out[f"rate_{b}"] = rate.reindex(out.index)
        n_bands += out[f"mjd_{b}_latest"].notna().to_numpy()
    out["n_bands"] = n_bands
    live = d[~d.is_history].sort_values(["object_id", "mjd", "detection_id"]).groupby("object_id").nth(-1)
    live = live.set_index("object_id")
    out["last_alert_id"] = live.alert_id.reindex(out.index)
    out["last_alert_mjd"] = live.mjd.reindex(out.index)
    return out.drop(columns=["x", "y", "z"])


def assert_objects_equal(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    actual = actual.set_index("object_id").sort_index()
    expected = expected.sort_index()
    assert list(actual.index) == list(expected.index), "one row per object, for exactly these objects"
    assert (actual.n_detections.to_numpy() == expected.n_detections.to_numpy()).all()
    assert (actual.n_bands.to_numpy() == expected.n_bands.to_numpy()).all()
    for col in ("first_mjd", "last_mjd", "ra", "dec", "last_alert_mjd"):
        np.testing.assert_allclose(actual[col].astype(float), expected[col].astype(float), rtol=0, atol=1e-9)
    la = actual.last_alert_id.astype("Int64").to_numpy()
    le = expected.last_alert_id.astype("Int64").to_numpy()
    assert (pd.isna(la) == pd.isna(le)).all() and (la[~pd.isna(la)] == le[~pd.isna(le)]).all()
    for b in BANDS:
        for col, tol in (
            (f"mag_{b}_latest", 1e-6),
            (f"mjd_{b}_latest", 0),
            (f"mjd_{b}_prev", 0),
            (f"rate_{b}", 1e-5),
        ):
            np.testing.assert_allclose(
                actual[col].astype(float), expected[col].astype(float), rtol=tol, atol=1e-9, err_msg=col
            )


# ---------------------------------------------------------------------------------------------- tests
def test_objects_update_is_exact_whatever_the_batching():
    """The pure aggregate: folding detections batch by batch, in any order (late history included), gives
    the brute-force answer over all of them at once."""
    batches = make_batches(seed=3, n_batches=5, alerts_per_field=60, objects_per_field=80)
    det = expected_detections(batches).reset_index()
    rng = np.random.default_rng(0)
    parts = np.array_split(rng.permutation(len(det)), 7)  # random order: history arrives late
    rows = None
    for i, part in enumerate(parts):
        chunk = pa.Table.from_pandas(det.iloc[np.sort(part)], preserve_index=False)
        new = update_objects(rows, chunk, f"b{i}")
        if rows is None:
            rows = new
        else:
            keep = pc.invert(pc.is_in(rows.column("object_id"), value_set=new.column("object_id")))
            rows = pa.concat_tables([rows.filter(keep), new])
    assert_objects_equal(rows.to_pandas(), brute_force_objects(det))
    whole = update_objects(None, pa.Table.from_pandas(det, preserve_index=False), "all")
    assert_objects_equal(whole.to_pandas(), brute_force_objects(det))


def test_commits_snapshots_and_queries(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=3)
    alerts_lake = AlertLake(lake.storage, STREAM)
    assert alerts_lake.source_position() is None
    for i, batch in enumerate(batches):
        result = alerts_lake.commit(f"b{i}", *batch, source_position={"topic": {"0": 100 * (i + 1)}})
        assert result.seq == i + 1 and not result.skipped
    snaps = alerts_lake.snapshots
    assert snaps.history() == [1, 2, 3]
    snap = snaps.read(3)
    assert snap.batches == ("b2",) and snap.recent_batches == ("b0", "b1", "b2")
    assert snap.source_position == {"topic": {"0": 300}}
    assert AlertLake(lake.storage, STREAM).source_position() == {"topic": {"0": 300}}
    # the snapshot lists, per table and pixel, files and row counts; they add up to the committed rows
    det = expected_detections(batches)
    assert snap.rows("detections") == len(det)
    assert all(f.rows > 0 for files in snap.table("detections").pixels.values() for f in files)
    assert counts(lake_url) == {
        "detections": len(det),
        "objects": det.object_id.nunique(),
        "upper_limits": len(expected_upper_limits(batches)),
        "alerts": sum(b[2].num_rows for b in batches),
    }
    check_complete(lake)
    # the committed rows, exactly, through ADQL (int64 ids above 2**53 included)
    got = adql(lake_url, "SELECT detection_id, object_id, mjd, band, mag FROM ztf.detections")
    got = got.set_index("detection_id").sort_index()
    assert list(got.index) == list(det.index)
    assert (got.object_id == det.object_id).all() and (got.band == det.band).all()
    np.testing.assert_array_equal(got.mjd.to_numpy(), det.mjd.to_numpy())
    # a light curve is one query
    oid = det.object_id.value_counts().index[0]
    lc = adql(
        lake_url, f"SELECT mjd, band, mag, mag_err FROM ztf.detections WHERE object_id = '{oid}' ORDER BY mjd"
    )
    want = det[det.object_id == oid].sort_values("mjd")
    assert len(lc) == len(want) > 3
    np.testing.assert_array_equal(lc.mjd.to_numpy(), want.mjd.to_numpy())
    assert list(lc.band) == list(want.band) and list(lc.columns) == ["mjd", "band", "mag", "mag_err"]
    # HATS layout: files inside pixel folders, named after the snapshot and batch
    some = sorted(data_files(lake))[0]
    assert "/dataset/Norder=5/Dir=" in some and "/Npix=" in some and some.endswith(".parquet")


def test_redelivery_and_overlapping_history_add_no_rows(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=3)
    alerts_lake = AlertLake(lake.storage, STREAM)
    alerts_lake.commit("b0", *batches[0])
    alerts_lake.commit("b1", *batches[1])  # its alerts' history repeats b0's detections
    before = counts(lake_url)
    # the same batch id: recognised at once, nothing written
    again = alerts_lake.commit("b1", *batches[1])
    assert again.skipped and alerts_lake.snapshots.history() == [1, 2]
    # the same packets under a new batch id (a Kafka re-delivery after a crash), by a restarted writer
    # (empty caches: the look-up reads the stored files): no row added anywhere
    alerts_lake = AlertLake(lake.storage, STREAM)
    redo = alerts_lake.commit("b1-redelivered", *batches[1])
    assert not redo.skipped and redo.seq == 3
    assert redo.rows_new == {"detections": 0, "upper_limits": 0, "alerts": 0, "objects": 0}
    assert redo.files_written == 0
    assert counts(lake_url) == before
    # a batch mixing re-delivered alerts of b0 with new ones
    mixed = [pa.concat_tables([batches[0][k], batches[2][k]]) for k in range(3)]
    alerts_lake.commit("b2-mixed", *mixed)
    det = expected_detections(batches)
    assert counts(lake_url) == {
        "detections": len(det),
        "objects": det.object_id.nunique(),
        "upper_limits": len(expected_upper_limits(batches)),
        "alerts": sum(b[2].num_rows for b in batches),
    }
    ids = adql(lake_url, "SELECT detection_id FROM ztf.detections").detection_id
    assert ids.is_unique and set(ids) == set(det.index)


def test_objects_match_a_brute_force_groupby(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=5, alerts_per_field=100, objects_per_field=300)
    alerts_lake = AlertLake(lake.storage, STREAM)
    for i, batch in enumerate(batches):
        alerts_lake.commit(f"b{i}", *batch)
    stored = adql(lake_url, "SELECT * FROM ztf.detections")
    objects = adql(lake_url, "SELECT * FROM ztf.objects")
    assert objects.object_id.is_unique
    assert_objects_equal(objects, brute_force_objects(stored))
    assert (objects.updated_batch.isin([f"b{i}" for i in range(5)])).all()
    # objects sit at their mean position: the row's pixel is the one of (ra, dec)
    snap = alerts_lake.snapshot()
    assert snap.rows("objects") == len(objects)


def test_exception_before_snapshot_leaves_previous_and_gc_removes_orphans(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=2)
    alerts_lake = AlertLake(lake.storage, STREAM)
    alerts_lake.commit("b0", *batches[0])
    committed = counts(lake_url)
    files_before = data_files(lake)

    class Crash(RuntimeError):
        pass

    def crash():
        raise Crash("simulated crash after the files, before the snapshot")

    with pytest.raises(Crash):
        alerts_lake.commit("b1", *batches[1], before_snapshot=crash)
    orphans = data_files(lake) - files_before
    assert orphans, "the crashed commit had written its files"
    assert alerts_lake.snapshots.history() == [1]
    assert counts(lake_url) == committed  # readers see the previous snapshot, whole
    check_complete(lake)
    # gc keeps young files (a commit may be in flight), then removes the orphans once past the grace
    assert alerts_lake.gc(grace_seconds=3600).removed_files == []
    report = alerts_lake.gc(grace_seconds=0)
    assert set(report.removed_files) == orphans
    assert data_files(lake) == files_before
    # the batch commits cleanly afterwards, with a fresh writer as after a restart
    AlertLake(lake.storage, STREAM).commit("b1", *batches[1])
    det = expected_detections(batches)
    assert counts(lake_url)["detections"] == len(det)


_CHILD = """
import sys, time, json
from tests.test_alert_lake import child_commit
child_commit(*json.loads(sys.argv[1]))
"""


def child_commit(lake_url: str, mode: str, first: int, n_batches: int, signal_file: str) -> None:
    """Run in a child process: commit batches `first`.. of `make_batches(n_batches)`. mode "pause": stop
    after writing the files of batch `first`, before its snapshot (the parent kills us there); mode
    "loop": commit them one after another, announcing each (the parent kills us at a random moment)."""
    batches = make_batches(n_batches=n_batches)
    alerts_lake = AlertLake(LakeStorage(lake_url, load_settings()), STREAM)

    def pause():
        with open(signal_file, "w") as fh:
            fh.write("files-written")
        while True:
            time.sleep(1)

    for i in range(first, n_batches):
        with open(signal_file, "a") as fh:
            fh.write(f"start {i}\n")
        alerts_lake.commit(
            f"b{i}",
            *batches[i],
            source_position={"next": i + 1},
            before_snapshot=pause if mode == "pause" else None,
        )


def _spawn(lake_url, mode, first, n_batches, signal_file) -> subprocess.Popen:
    args = json.dumps([lake_url, mode, first, n_batches, str(signal_file)])
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, args],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for(path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and text in path.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"the child ended early: {proc.stdout.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the child never reached {text!r}")
        time.sleep(0.02)


def test_sigkill_between_files_and_snapshot(lake_url, tmp_path):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=2)
    AlertLake(lake.storage, STREAM).commit("b0", *batches[0], source_position={"next": 1})
    committed = counts(lake_url)
    files_before = data_files(lake)
    signal_file = tmp_path / "child"
    proc = _spawn(lake_url, "pause", 1, 2, signal_file)
    _wait_for(signal_file, "files-written", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the previous snapshot is current and whole; the killed commit's files are orphans
    alerts_lake = AlertLake(lake.storage, STREAM)
    assert alerts_lake.snapshots.history() == [1]
    assert alerts_lake.source_position() == {"next": 1}
    assert counts(lake_url) == committed
    check_complete(lake)
    orphans = data_files(lake) - files_before
    assert orphans
    assert set(alerts_lake.gc(grace_seconds=0).removed_files) == orphans
    # resume from the committed source position: nothing lost, nothing twice
    alerts_lake.commit("b1", *batches[1], source_position={"next": 2})
    det = expected_detections(batches)
    assert counts(lake_url)["detections"] == len(det)


def test_sigkill_at_a_random_moment_then_resume(lake_url, tmp_path):
    """Kill a process committing batch after batch at an arbitrary moment; the ingest resumes from the
    committed source position and re-delivers the batch in flight: the result is exactly the stream."""
    n = 6
    lake = new_lake(lake_url)
    signal_file = tmp_path / "child"
    proc = _spawn(lake_url, "loop", 0, n, signal_file)
    _wait_for(signal_file, "start 2", proc)
    time.sleep(float(np.random.default_rng().uniform(0.0, 0.4)))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    check_complete(lake)
    alerts_lake = AlertLake(lake.storage, STREAM)
    position = alerts_lake.source_position()
    done = position["next"] if position else 0
    assert 1 <= done < n, f"killed after {done} batches"
    batches = make_batches(n_batches=n)
    committed = expected_detections(batches[:done])
    assert counts(lake_url)["detections"] == len(committed)
    # resume: re-deliver from the batch in flight, as a Kafka consumer does from its committed offsets
    for i in range(done, n):
        alerts_lake.commit(f"b{i}", *batches[i], source_position={"next": i + 1})
    alerts_lake.gc(grace_seconds=0)
    det = expected_detections(batches)
    got = adql(lake_url, "SELECT detection_id FROM ztf.detections").detection_id
    assert got.is_unique and set(got) == set(det.index)
    assert counts(lake_url)["upper_limits"] == len(expected_upper_limits(batches))
    assert_objects_equal(adql(lake_url, "SELECT * FROM ztf.objects"), brute_force_objects(det))


def test_concurrent_writers_conflict_and_compaction_does_not(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=4)
    one = AlertLake(lake.storage, STREAM)
    two = AlertLake(lake.storage, STREAM)
    one.commit("b0", *batches[0])
    two.snapshot()  # both writers now stand on snapshot 1
    one.commit("b1", *batches[1])
    with pytest.raises(CommitConflict):
        two.commit("b1-other", *batches[1])
    assert one.snapshots.history() == [1, 2]  # nothing of the loser was published
    assert two.commit("b2", *batches[2]).seq == 3  # the loser re-reads and goes on
    # a compaction committed under a writer's feet is not a conflict: the writer re-applies its batch
    one.snapshot()
    report = two.compact()
    assert report.seq == 4 and report.files_after < report.files_before
    assert one.commit("b3", *batches[3]).seq == 5
    det = expected_detections(batches)
    got = adql(lake_url, "SELECT detection_id FROM ztf.detections").detection_id
    assert got.is_unique and set(got) == set(det.index)


def test_compaction_keeps_exact_rows_and_never_blocks_readers(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=4)
    alerts_lake = AlertLake(lake.storage, STREAM)
    for i, batch in enumerate(batches):
        alerts_lake.commit(f"b{i}", *batch)
    queries = {t: f"SELECT * FROM ztf.{t}" for t in alayout.TABLES}
    sort = {"detections": ["detection_id"], "alerts": ["alert_id"], "objects": ["object_id"],
            "upper_limits": ["object_id", "mjd", "band"]}  # fmt: skip
    before = {t: adql(lake_url, q).sort_values(sort[t]).reset_index(drop=True) for t, q in queries.items()}
    reader = dac_lake.connect(lake_url)  # a session that resolved the pre-compaction snapshot
    reader.adql("SELECT COUNT(*) FROM ztf.detections")
    old_snapshot = alerts_lake.snapshot()
    report = alerts_lake.compact(crowded_rows=50, split=False)  # merge only; splits: test_alert_split.py
    assert report.seq == old_snapshot.seq + 1
    assert report.files_after == sum(report.pixels.values()) and report.files_before > report.files_after
    assert report.crowded and all(rows > 50 for _, _, rows in report.crowded)
    snap = alerts_lake.snapshot()
    for t in ("detections", "upper_limits", "alerts"):
        assert all(len(files) == 1 for files in snap.table(t).pixels.values())
        assert snap.rows(t) == old_snapshot.rows(t)
    for t, q in queries.items():
        after = adql(lake_url, q).sort_values(sort[t]).reset_index(drop=True)
        pd.testing.assert_frame_equal(after, before[t])
    # the old files stay for readers of the old snapshot until gc's grace period has passed
    got = reader.adql("SELECT COUNT(*) AS n FROM ztf.detections")["n"][0].as_py()
    assert got == len(before["detections"])
    assert alerts_lake.gc(grace_seconds=3600).removed_files == []
    on_disk = data_files(lake)
    assert old_snapshot.referenced() - snap.referenced() <= on_disk
    removed = alerts_lake.gc(grace_seconds=0, keep_snapshots=1)
    assert set(removed.removed_files) == on_disk - snap.referenced()
    assert removed.removed_snapshots == list(range(1, snap.seq))
    assert data_files(lake) == snap.referenced()
    for t, q in queries.items():
        pd.testing.assert_frame_equal(
            adql(lake_url, q).sort_values(sort[t]).reset_index(drop=True), before[t]
        )
    # compaction with nothing to merge commits nothing
    assert alerts_lake.compact().seq is None


def test_cone_search_prunes_pixels(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=3)
    alerts_lake = AlertLake(lake.storage, STREAM)
    for i, batch in enumerate(batches):
        alerts_lake.commit(f"b{i}", *batch)
    det = expected_detections(batches)
    ra0, dec0 = float(det.ra.iloc[0]), float(det.dec.iloc[0])
    session = dac_lake.connect(lake_url)
    got = session.adql(
        "SELECT detection_id FROM ztf.detections WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
        f"CIRCLE('ICRS', {ra0}, {dec0}, 0.2))"
    ).to_pandas()
    files, total = session.last.files, session.last.total_files
    assert 0 < files < alerts_lake.snapshot().table("detections").n_files and total > 1
    from astropy.coordinates import SkyCoord

    sep = SkyCoord(det.ra, det.dec, unit="deg").separation(SkyCoord(ra0, dec0, unit="deg")).deg
    assert set(got.detection_id) == set(det.index[sep <= 0.2])
    objects = session.adql(
        "SELECT object_id FROM ztf.objects WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
        f"CIRCLE('ICRS', {ra0}, {dec0}, 0.2))"
    )
    assert objects.num_rows > 0 and session.last.files < session.last.total_files


def test_hats_and_lsdb_read_the_tables(lake_url):
    import hats
    import lsdb

    lake = new_lake(lake_url)
    batches = make_batches(n_batches=3)
    alerts_lake = AlertLake(lake.storage, STREAM)
    for i, batch in enumerate(batches):
        alerts_lake.commit(f"b{i}", *batch)
    det = expected_detections(batches)
    root = lake.storage.upath(alayout.table_prefix(STREAM, "detections"))
    catalog = hats.read_hats(root)
    assert catalog.catalog_info.total_rows == len(det)
    assert catalog.catalog_info.npix_suffix == "/"
    assert {(p.order, p.pixel) for p in catalog.get_healpix_pixels()} == {
        alayout.order_pixel(k) for k in alerts_lake.snapshot().table("detections").pixels
    }
    if not lake.storage.is_s3:
        from hats.io.validation import is_valid_catalog

        assert is_valid_catalog(root, strict=True)
    frame = lsdb.open_catalog(root).compute()
    assert len(frame) == len(det) and set(frame.detection_id) == set(det.index)
    assert frame.index.name == "_healpix_29" and frame.index.is_monotonic_increasing is not None
    # objects are rewritten per pixel: an outside reader lists the pixel folders, so it also sees the
    # superseded files until gc has removed them (the engine reads the snapshot's files only)
    objects_root = lake.storage.upath(alayout.table_prefix(STREAM, "objects"))
    assert len(lsdb.open_catalog(objects_root).compute()) > det.object_id.nunique()
    alerts_lake.gc(grace_seconds=0, keep_snapshots=1)
    objects_root.fs.invalidate_cache()  # s3fs keeps folder listings: a live table needs fresh ones
    objects = lsdb.open_catalog(objects_root).compute()
    assert objects.object_id.is_unique and len(objects) == det.object_id.nunique()
    ra0, dec0 = float(det.ra.iloc[0]), float(det.dec.iloc[0])
    cone = lsdb.open_catalog(root).cone_search(ra0, dec0, 600).compute()
    assert det.index[0] in set(cone.detection_id)


def test_registry_metadata_groups_and_empty_tables(lake_url):
    lake = new_lake(lake_url)
    batches = make_batches(n_batches=1)
    private = AlertLake(lake.storage, "rubin", groups=["rubin_partners"], order=4)
    det, uls, _ = batches[0]
    private.commit("b0", det, uls)  # no alerts table in this batch: the alerts table stays empty
    anonymous = QueryEngine(lake, frozenset())
    assert not [t for t in anonymous.registry.tables() if t.schema == "rubin"]
    partner = QueryEngine(lake, frozenset({"rubin_partners"}))
    tables = {t.name: t for t in partner.registry.tables() if t.schema == "rubin"}
    assert set(tables) == {"detections", "objects", "upper_limits", "alerts"}
    cols = {c.name: c for c in tables["detections"].columns}
    assert cols["mag"].unit == "mag" and cols["mag"].ucd == "phot.mag" and cols["mjd"].unit == "d"
    assert cols["ra"].ucd == "pos.eq.ra;meta.main" and "_healpix_29" not in cols
    assert {c.name for c in tables["objects"].columns} >= {"mag_g_latest", "rate_r", "n_bands"}
    empty = partner.adql("SELECT alert_id, mag FROM rubin.alerts")
    assert empty.table.num_rows == 0 and empty.table.column_names == ["alert_id", "mag"]
    assert partner.adql("SELECT COUNT(*) AS n FROM rubin.detections").table["n"][0].as_py() == det.num_rows
    with pytest.raises(AlertLakeError):
        AlertLake(lake.storage, "rubin", order=5).commit("b1", det)  # the order is fixed at creation


@pytest.mark.parametrize("family", ["ztf", "rubin"])
def test_packets_from_the_packet_layer(family, lake_url, tmp_path):
    """Real packets (the packet layer's generator, decoder and normaliser; real ZTF / Rubin schemas) replayed
    from files in batches, resumed from the snapshot's source position after a stop, then replayed whole
    again: the tables hold each detection, limit and alert once, and objects match the brute force."""
    gen = pytest.importorskip("ingest.alerts.generate")
    from ingest.alerts.normalise import normalise
    from ingest.alerts.packets import BatchDecoder, position_from_json, position_to_json
    from ingest.alerts.sources import FileSource

    info, records = gen.build_alerts(family, 40, 5, seed=2)
    gen.write_alerts(records, info, tmp_path / "packets", layout="night" if family == "ztf" else "alert")
    lake = new_lake(lake_url)
    decoder = _shared_decoder(BatchDecoder)

    def run(alerts_lake, limit=None) -> int:
        position = alerts_lake.source_position()
        start = position_from_json(position) if position else None
        source = FileSource(tmp_path / "packets", start_after=start)
        delivered = 0
        for i, batch in enumerate(source.batches(max_alerts=100)):
            if limit is not None and i >= limit:
                break
            delivered += len(batch)
            tables = normalise(decoder.decode(batch.packets))
            last = position_to_json(batch.positions[-1])
            alerts_lake.commit(
                f"{last['index']}-{len(batch)}-{abs(hash(last['file'])) % 10**8}",
                tables.detections,
                tables.upper_limits,
                tables.alerts,
                source_position=last,
            )
        return delivered

    first = run(AlertLake(lake.storage, family), limit=2)  # the ingest stops after 2 batches ...
    rest = run(AlertLake(lake.storage, family))  # ... a new one resumes right after the last committed packet
    assert first == 200 and first + rest == len(records)
    got = counts_of(lake_url, family)
    assert got["alerts"] == len(records)
    session = dac_lake.connect(lake_url)
    det = session.adql(f"SELECT * FROM {family}.detections").to_pandas()
    assert det.detection_id.is_unique
    assert_objects_equal(
        session.adql(f"SELECT * FROM {family}.objects").to_pandas(), brute_force_objects(det)
    )
    # a full replay (all packets re-delivered under new batch ids) adds nothing
    alerts_lake = AlertLake(lake.storage, family)
    for i, batch in enumerate(FileSource(tmp_path / "packets").batches(max_alerts=200)):
        tables = normalise(decoder.decode(batch.packets))
        alerts_lake.commit(f"replay-{i}", tables.detections, tables.upper_limits, tables.alerts)
    assert counts_of(lake_url, family) == got


@functools.cache
def _shared_decoder(cls):
    """One batch decoder for the whole session: it compiles a program per writer schema on first use."""
    return cls()


def counts_of(lake_url: str, stream: str) -> dict[str, int]:
    session = dac_lake.connect(lake_url)
    return {
        t: int(session.adql(f"SELECT COUNT(*) AS n FROM {stream}.{t}")["n"][0].as_py())
        for t in alayout.TABLES
    }


def test_bad_batches_are_refused_and_leave_nothing(lake_url):
    lake = new_lake(lake_url)
    det, uls, alerts = make_batches(n_batches=1)[0]
    alerts_lake = AlertLake(lake.storage, STREAM)
    with pytest.raises(AlertLakeError, match="mag_err"):
        alerts_lake.commit("b0", det.drop_columns(["mag_err"]), uls, alerts)
    with pytest.raises(AlertLakeError, match="upper limit"):  # limits of an object never seen: no position
        stray = pa.table(
            {"object_id": ["ZTF-unknown"], "mjd": [60000.5], "band": ["g"], "limiting_mag": [20.0]}
        )
        alerts_lake.commit("b0", det, pa.concat_tables([uls, stray.cast(uls.schema)]), alerts)
    bad = det.set_column(det.schema.get_field_index("dec"), "dec", pa.array(np.full(det.num_rows, 95.0)))
    with pytest.raises(AlertLakeError, match="position"):
        alerts_lake.commit("b0", bad, uls, alerts)
    with pytest.raises(ValueError, match="batch id"):
        alerts_lake.commit("../b0", det, uls, alerts)
    assert alerts_lake.snapshots.history() == [] and data_files(lake) == set()
    assert alerts_lake.commit("b0", det, uls, alerts).seq == 1


def test_commit_throughput(lake_url, capsys):
    """A small version of the benchmark (run the module with --bench for the 10,000-alert figure)."""
    lake = new_lake(lake_url)
    sim = AlertSimulator(seed=11, n_fields=2, objects_per_field=2000).seed_history(n_prev=19, n_ul=2)
    batches = [sim.batch([0, 1], 500) for _ in range(3)]
    alerts_lake = AlertLake(lake.storage, STREAM)
    t0 = time.perf_counter()
    rows = 0
    for i, batch in enumerate(batches):
        rows += alerts_lake.commit(f"b{i}", *batch).rows_in["detections"]
    seconds = time.perf_counter() - t0
    where = "s3" if lake_url.startswith("s3://") else "local"
    with capsys.disabled():
        print(f"\n[{where}] commit: {rows / seconds:,.0f} detections/s ({rows} in {seconds:.2f} s)")
    assert rows > 25_000 and rows / seconds > 5_000


# ---------------------------------------------------------------------------------------------- benchmark
def bench(lake_url: str, n_batches: int = 6, alerts: int = 10_000) -> None:
    """Commit throughput for batches of `alerts` alerts x ~20 detections (each alert carries 19 history
    detections, as a ZTF alert of a known object does), on a fresh stream."""
    import resource

    lake = new_lake(lake_url)
    sim = AlertSimulator(seed=5, n_fields=4, objects_per_field=3 * alerts).seed_history(n_prev=19, n_ul=3)
    batches = [sim.batch([i % 4, (i + 1) % 4], alerts // 2) for i in range(n_batches)]
    alerts_lake = AlertLake(lake.storage, STREAM)
    print(f"lake {lake_url}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for i, batch in enumerate(batches):
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        r = alerts_lake.commit(f"b{i}", *batch)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        n = r.rows_in["detections"]
        print(
            f"batch {i}: {r.rows_in['alerts']:,} alerts, {n:,} detections in "
            f"({r.rows_new['detections']:,} new), "
            f"{r.files_written} files: {wall:.2f} s wall, {cpu:.2f} s CPU -> {n / wall:,.0f} detections/s, "
            f"{r.rows_in['alerts'] / wall:,.0f} alerts/s; {r.timings}"
        )


if __name__ == "__main__":
    if "--bench" in sys.argv:
        rest = [a for a in sys.argv[1:] if a != "--bench"]
        import tempfile

        bench(rest[0] if rest else tempfile.mkdtemp(prefix="alert-bench-") + "/lake")
