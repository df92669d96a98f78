"""`dac ingest alerts`: packets replayed from files and read from a real Kafka broker end up as queryable
alert tables, dead letters, filter results and watchlist hits; killing the ingest at any commit point (or at a
random instant) loses and duplicates nothing.

Ground truth comes from the generator's records (the dicts written to Avro), not from our decoders.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet
import pytest

from dac_lake.alerts_broker import AlertBroker, Caller
from dac_lake.engine import QueryEngine
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from ingest.alerts.generate import build_alerts, confluent_payload, container_payload, write_alerts
from ingest.alerts.packets import FilePosition, KafkaPosition
from ingest.alerts.pipeline import AlertIngest, batch_id_for, resume_position
from tests.kafka_fixtures import FAST_GROUP

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "alert_ingest_driver.py"
FILTER_ADQL = "SELECT object_id, n_detections, mag_r_latest FROM batch.objects WHERE n_detections >= 3"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def dac(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dac_lake.cli", *args], capture_output=True, text=True, env=_env(),
        timeout=timeout, cwd=REPO,
    )  # fmt: skip


def init_lake(path: Path) -> Lake:
    out = dac("lake", "init", "--lake", str(path))
    assert out.returncode == 0, out.stderr
    return Lake(LakeStorage(str(path)))


# ------------------------------------------------------------------------------------------ ground truth


def ztf_truth(records: list[dict]) -> dict:
    """Detections (candid -> mjd, band, mag), objects and upper-limit keys the records hold."""
    band = {1: "g", 2: "r", 3: "i"}
    det: dict[int, tuple] = {}
    obj_of: dict[int, str] = {}
    limits = set()
    for r in records:
        for c in [r["candidate"], *(r.get("prv_candidates") or [])]:
            if c.get("candid") is None:
                limits.add((r["objectId"], round(c["jd"] - 2400000.5, 5), band[c["fid"]]))
                continue
            det[c["candid"]] = (round(c["jd"] - 2400000.5, 6), band[c["fid"]], round(c["magpsf"], 3))
            obj_of[c["candid"]] = r["objectId"]
    return {"detections": det, "object_of": obj_of, "objects": {r["objectId"] for r in records},
            "alerts": {r["candid"] for r in records}, "limits": limits}  # fmt: skip


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> dict:
    """ZTF 4.02 alerts in nightly container files (6 telescope fields), plus three bad packets."""
    root = tmp_path_factory.mktemp("replay")
    info, records = build_alerts("ztf", 60, 5, seed=3, fields=6, cutout_pixels=4)
    write_alerts(records, info, root / "ztf", layout="night")
    bad = root / "ztf" / "zz_bad"
    bad.mkdir()
    odd = copy.deepcopy(records[0])
    odd["objectId"], odd["candid"] = "ZTF99unknown", 1
    odd["candidate"]["candid"], odd["schemavsn"] = 1, "9.9"
    (bad / "unknown_version.avro").write_bytes(container_payload([odd], info))
    cut = copy.deepcopy(records[1])
    cut["objectId"], cut["candid"], cut["candidate"]["candid"] = "ZTF99truncat", 2, 2
    whole = container_payload([cut], info)
    (bad / "truncated.avro").write_bytes(whole[: len(whole) - 300])
    (bad / "noise.avro").write_bytes(np.random.default_rng(5).bytes(2000))
    return {"root": root, "folder": root / "ztf", "records": records, "truth": ztf_truth(records)}


def engine_for(lake: Lake) -> QueryEngine:
    return QueryEngine(lake, frozenset(), connections=2)


def table_ids(engine: QueryEngine, sql: str, column: str) -> list:
    return engine.adql(sql, maxrec=10_000_000).table.column(column).to_pylist()


# ------------------------------------------------------------------------------------------ pure parts


def test_batch_ids_and_resume_positions_are_deterministic():
    files = [FilePosition("/a/x.avro", i) for i in range(5)]
    assert batch_id_for(files) == batch_id_for(list(files))
    assert batch_id_for(files) != batch_id_for(files[:4])
    kafka = [KafkaPosition("t", 0, 10), KafkaPosition("t", 1, 3), KafkaPosition("t", 0, 11)]
    assert batch_id_for(kafka) == batch_id_for([kafka[2], kafka[1], kafka[0]])  # order within a batch
    first = resume_position(kafka, None)
    assert first == {"kind": "kafka", "offsets": [{"topic": "t", "partition": 0, "offset": 12},
                                                  {"topic": "t", "partition": 1, "offset": 4}]}  # fmt: skip
    later = resume_position([KafkaPosition("t", 1, 9)], first)  # partition 0 had nothing new: kept
    assert later["offsets"] == [{"topic": "t", "partition": 0, "offset": 12},
                                {"topic": "t", "partition": 1, "offset": 10}]  # fmt: skip
    assert resume_position(files, None) == {"kind": "file", "last": {"file": "/a/x.avro", "index": 4}}


# ------------------------------------------------------------------------------------------ the CLI


def test_replay_through_the_cli_is_queryable_and_dead_letters_the_bad(replay, tmp_path):
    lake = init_lake(tmp_path / "lake")
    truth = replay["truth"]
    broker = AlertBroker(lake, "ztf")
    alice = Caller("alice")
    flt = broker.filters.create(alice, "three detections", FILTER_ADQL)
    some = sorted(truth["objects"])[:5]
    coords = {}
    for r in replay["records"]:
        if r["objectId"] in some:
            coords[r["objectId"]] = (r["candidate"]["ra"], r["candidate"]["dec"])
    csv = "name,ra,dec,radius\n" + "".join(f"{o},{ra},{dec},5\n" for o, (ra, dec) in coords.items())
    wl = broker.watchlists.create(alice, "mine", csv.encode(), fmt="csv")

    dead = tmp_path / "dead"
    args = ("ingest", "alerts", "ztf", str(replay["folder"]), "--lake", str(tmp_path / "lake"),
            "--dead-letter", str(dead), "--max-alerts", "80",
            "--report", str(tmp_path / "r.json"))  # fmt: skip
    out = dac(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["alerts"] == len(replay["records"])
    assert report["dead"] == 3

    # dead letters: each bad packet with its bytes and a reason that says what was wrong
    reasons = {}
    for f in dead.glob("*.json"):
        info = json.loads(f.read_text())
        assert (dead / info["payload"]).stat().st_size == info["bytes"]
        reasons[Path(info["position"]["file"]).name] = json.dumps(info)
    assert set(reasons) == {"unknown_version.avro", "truncated.avro", "noise.avro"}
    assert "9.9" in reasons["unknown_version.avro"] and "4.02" in reasons["unknown_version.avro"]

    # the tables hold exactly the packets' contents, once
    engine = engine_for(lake)
    det_ids = table_ids(engine, "SELECT detection_id FROM ztf.detections", "detection_id")
    assert len(det_ids) == len(set(det_ids)) == len(truth["detections"])
    assert set(det_ids) == set(truth["detections"])
    assert set(table_ids(engine, "SELECT object_id FROM ztf.objects", "object_id")) == truth["objects"]
    alert_ids = table_ids(engine, "SELECT alert_id FROM ztf.alerts", "alert_id")
    assert sorted(alert_ids) == sorted(truth["alerts"])
    n_limits = engine.adql("SELECT COUNT(*) AS n FROM ztf.upper_limits").table.column("n")[0].as_py()
    assert n_limits == len(truth["limits"])

    # an object's light curve is one query, and it is the packets' photometry
    oid = max(truth["objects"], key=lambda o: sum(1 for v in truth["object_of"].values() if v == o))
    lc = engine.adql(
        f"SELECT mjd, band, mag FROM ztf.detections WHERE object_id = '{oid}' ORDER BY mjd"
    ).table
    want = sorted(v for k, v in truth["detections"].items() if truth["object_of"][k] == oid)
    cols = (lc.column(c).to_pylist() for c in lc.column_names)
    got = [(round(m, 6), b, round(g, 3)) for m, b, g in zip(*cols,
                                                             strict=True)]  # fmt: skip
    assert got == want and len(got) >= 3
    n_det = engine.adql(f"SELECT n_detections FROM ztf.objects WHERE object_id = '{oid}'").table
    assert n_det.column(0)[0].as_py() == len(want)

    # the filter ran on every batch; its stored matches are the objects with >= 3 detections at that batch
    results = broker.filters.results(alice, flt.id)
    assert results.num_rows > 0
    assert pc.min(results.column("n_detections")).as_py() >= 3
    final = engine.adql("SELECT object_id FROM ztf.objects WHERE n_detections >= 3").table
    assert set(final.column(0).to_pylist()) <= set(results.column("object_id").to_pylist())
    # the watchlist's own objects were hit (each is within 5" of where it was first seen)
    hits = broker.watchlists.hits(alice, wl.id)
    assert set(hits.column("object_id").to_pylist()) == set(coords)

    # running it again resumes after the last packet: nothing new, nothing doubled
    again = dac(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["batches"] == 0
    assert len(table_ids(engine_for(lake), "SELECT detection_id FROM ztf.detections", "detection_id")) == len(
        det_ids
    )
    status = dac("alerts", "status", "ztf", "--lake", str(tmp_path / "lake"))
    assert status.returncode == 0 and "broker done up to snapshot" in status.stdout, status.stderr

    # compaction merges the batch files; gc then removes the merged ones; the rows stay the same
    def files_of(table: str) -> int:
        return sum(1 for _ in (tmp_path / "lake" / "alerts" / "ztf" / table).rglob("*.parquet"))

    before = files_of("detections")
    compact = dac("alerts", "compact", "ztf", "--lake", str(tmp_path / "lake"), "--min-files", "2")
    assert compact.returncode == 0 and "files ->" in compact.stdout, compact.stderr[-2000:]
    gc = dac("alerts", "gc", "ztf", "--lake", str(tmp_path / "lake"), "--grace", "0", "--keep-snapshots", "1")
    assert gc.returncode == 0, gc.stderr[-2000:]
    assert files_of("detections") < before
    after = table_ids(engine_for(lake), "SELECT detection_id FROM ztf.detections", "detection_id")
    assert sorted(after) == sorted(det_ids)


def test_new_objects_are_matched_once_with_context_catalogs(replay, tmp_path):
    """Stars planted 1" from a third of the objects' first positions: those objects get the star as their
    nearest context match (stored when the object was first seen, never again); the rest are orphans."""
    from dac_lake.alerts.context import ContextMatcher, context_of
    from tests.test_alert_context import STAR_DEFINITION, ingest_definition

    lake = init_lake(tmp_path / "lake")
    first: dict[str, tuple[float, float]] = {}
    for r in replay["records"]:
        first.setdefault(r["objectId"], (r["candidate"]["ra"], r["candidate"]["dec"]))
    planted = sorted(first)[::3]
    ra = np.array([first[o][0] for o in planted])
    dec = np.array([first[o][1] for o in planted]) + 1 / 3600
    stars = pa.table({"star_id": [f"star-{o}" for o in planted], "ra": ra, "dec": dec,
                      "g_mag": pa.array(np.full(len(planted), 15.0), pa.float32())})  # fmt: skip
    ingest_definition(lake, STAR_DEFINITION, stars, tmp_path / "input")
    pipeline = AlertIngest(lake, "ztf", dead_letter_dir=tmp_path / "dead", order=3,
                           context=ContextMatcher(lake, "ztf"))  # fmt: skip
    pipeline.run(pipeline.file_source([replay["folder"]]), max_alerts=60)
    files = list((tmp_path / "lake" / "alerts" / "ztf" / "context").rglob("*.parquet"))
    stored = pa.concat_tables([pa.parquet.read_table(f) for f in files])
    per_object = stored.group_by("object_id").aggregate([("object_id", "count")])
    assert per_object.num_rows == len(first)  # every object matched, once (a row, or an orphan row)
    for oid in planted[:5] + sorted(set(first) - set(planted))[:5]:
        rows = context_of(lake.storage, "ztf", oid, *first[oid])
        if oid in planted:
            assert rows[0]["source_id"] == f"star-{oid}" and rows[0]["separation_arcsec"] < 1.5, rows
        else:
            assert all(r.get("catalog") is None for r in rows), rows


def test_batch_boundaries_do_not_change_the_content(replay, tmp_path):
    """The same packets cut into batches of 7 or of 1000 (and one batch delivered twice) give equal tables."""
    lake = init_lake(tmp_path / "lake")
    contents = []
    for stream, size in (("small", 7), ("large", 1000)):
        pipeline = AlertIngest(lake, stream, dead_letter_dir=tmp_path / "dead", order=3)
        source = pipeline.file_source([replay["folder"]])
        batches = list(source.batches(max_alerts=size))
        if stream == "small":
            batches.insert(5, batches[3])  # a re-delivery
        pipeline.run(source, batches=iter(batches))
        engine = engine_for(lake)
        contents.append({
            t: engine.adql(f"SELECT * FROM {stream}.{t}", maxrec=10_000_000).table
            for t in ("detections", "objects", "alerts", "upper_limits")
        })  # fmt: skip
    keys = {"detections": ["detection_id"], "alerts": ["alert_id"], "objects": ["object_id"],
            "upper_limits": ["object_id", "mjd", "band"]}  # fmt: skip
    for table, cols in keys.items():
        a, b = (c[table] for c in contents)
        drop = [n for n in a.column_names if n in ("updated_batch", "_healpix_29")]
        a = a.drop_columns(drop).sort_by([(c, "ascending") for c in cols])
        b = b.drop_columns(drop).sort_by([(c, "ascending") for c in cols])
        assert a.num_rows == b.num_rows > 0, table
        for name in a.column_names:
            x, y = a.column(name), b.column(name)
            if table == "upper_limits" and name in ("ra", "dec"):
                # a limit has no position of its own: it is placed at its object's mean position as known
                # when it was committed, which depends on what came before (within an arcsecond here)
                assert np.allclose(x.to_numpy(), y.to_numpy(), atol=1 / 3600), name
            elif pa.types.is_floating(x.type):
                assert np.allclose(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False),
                                   rtol=1e-9, atol=1e-9, equal_nan=True), (table, name)  # fmt: skip
            else:
                assert x.to_pylist() == y.to_pylist(), (table, name)


# ------------------------------------------------------------------------------------------ crashes


def _snapshot_of(lake: Lake, stream: str) -> dict:
    engine = engine_for(lake)
    out = {}
    for table, key in (("detections", "detection_id"), ("alerts", "alert_id"), ("objects", "object_id")):
        ids = table_ids(engine, f"SELECT {key} FROM {stream}.{table}", key)
        assert len(ids) == len(set(ids)), f"duplicates in {table}"
        out[table] = sorted(ids)
    rows = engine.adql(f"SELECT object_id, n_detections FROM {stream}.objects", maxrec=10**7).table
    out["n_detections"] = sorted(zip(*(rows.column(c).to_pylist() for c in rows.column_names), strict=True))
    out["limits"] = engine.adql(f"SELECT COUNT(*) AS n FROM {stream}.upper_limits").table.column(0)[0].as_py()
    return out


def _broker_outputs(lake: Lake, stream: str, owner: Caller, filter_id: str, watchlist_id: str) -> tuple:
    broker = AlertBroker(lake, stream)
    res = broker.filters.results(owner, filter_id)
    hits = broker.watchlists.hits(owner, watchlist_id)
    return (
        sorted(set(res.column("object_id").to_pylist())) if res.num_rows else [],
        sorted(set(hits.column("object_id").to_pylist())) if hits.num_rows else [],
    )


def _setup_broker(lake: Lake, stream: str, replay: dict) -> tuple[Caller, str, str]:
    owner = Caller("carol")
    broker = AlertBroker(lake, stream)
    flt = broker.filters.create(owner, "bright and seen", FILTER_ADQL)
    rows = ["name,ra,dec,radius"]
    for r in replay["records"][::7]:
        rows.append(f"{r['objectId']},{r['candidate']['ra']},{r['candidate']['dec']},3")
    wl = broker.watchlists.create(owner, "some", ("\n".join(rows) + "\n").encode(), fmt="csv")
    return owner, flt.id, wl.id


def _drive(
    lake_path: Path, stream: str, folder: Path, dead: Path, *crash: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DRIVER), str(lake_path), stream, str(folder), str(dead), "60", *crash],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(replay, tmp_path_factory) -> dict:
    """The uncrashed run the crashed ones must equal."""
    path = tmp_path_factory.mktemp("reference") / "lake"
    lake = init_lake(path)
    owner, fid, wid = _setup_broker(lake, "ztf", replay)
    pipeline = AlertIngest(lake, "ztf", dead_letter_dir=path.parent / "dead", order=3,
                           broker=AlertBroker(lake, "ztf"))  # fmt: skip
    pipeline.run(pipeline.file_source([replay["folder"]]), max_alerts=60)
    return {"tables": _snapshot_of(lake, "ztf"), "broker": _broker_outputs(lake, "ztf", owner, fid, wid)}


@pytest.mark.parametrize("stage", ["before_snapshot", "after_commit", "before_progress"])
def test_a_kill_at_each_commit_point_loses_and_duplicates_nothing(stage, replay, reference, tmp_path):
    """SIGKILL at batch 3: files written but no snapshot / snapshot but no broker / broker but no progress
    mark. The restarted ingest ends with exactly the uncrashed tables and broker outputs."""
    path = tmp_path / "lake"
    lake = init_lake(path)
    owner, fid, wid = _setup_broker(lake, "ztf", replay)
    crashed = _drive(path, "ztf", replay["folder"], tmp_path / "dead", stage, "3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert f"killing myself at {stage} of batch 3" in crashed.stdout
    # the crash left the lake readable, with whole batches only
    partial = _snapshot_of(lake, "ztf")
    assert 0 < len(partial["alerts"]) < len(reference["tables"]["alerts"])
    assert len(partial["alerts"]) % 60 == 0
    pipeline = AlertIngest(lake, "ztf", dead_letter_dir=tmp_path / "dead", order=3,
                           broker=AlertBroker(lake, "ztf"))  # fmt: skip
    report = pipeline.run(pipeline.file_source([replay["folder"]]), max_alerts=60)
    if stage != "before_snapshot":
        assert report.recovered_batches == 1
    assert _snapshot_of(lake, "ztf") == reference["tables"]
    assert _broker_outputs(lake, "ztf", owner, fid, wid) == reference["broker"]


def test_sigkill_of_the_cli_at_a_random_instant(replay, reference, tmp_path):
    """The real `dac ingest alerts` killed while it works (batches of 20), then run again."""
    path = tmp_path / "lake"
    lake = init_lake(path)
    owner, fid, wid = _setup_broker(lake, "ztf", replay)
    args = ("ingest", "alerts", "ztf", str(replay["folder"]), "--lake", str(path), "--dead-letter",
            str(tmp_path / "dead"), "--max-alerts", "20", "--order", "3")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "dac_lake.cli", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    snapshots = path / "alerts" / "ztf" / "snapshots"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if snapshots.exists() and len(list(snapshots.glob("*.json"))) >= 4:
            break
        time.sleep(0.05)
    time.sleep(float(np.random.default_rng().uniform(0.0, 0.3)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"
    again = dac(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _snapshot_of(lake, "ztf") == reference["tables"]
    assert _broker_outputs(lake, "ztf", owner, fid, wid) == reference["broker"]


# ------------------------------------------------------------------------------------------ Kafka


def test_kafka_ingest_commits_offsets_and_produces_filter_matches(kafka, tmp_path):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    info, records = build_alerts("rubin", 40, 4, seed=11, fields=3, cutout_pixels=4)
    topic, matches_topic = f"rubin-{os.getpid()}-{time.time_ns()}", f"matches-{time.time_ns()}"
    admin = AdminClient({"bootstrap.servers": kafka})
    for f in admin.create_topics([NewTopic(topic, 2, 1), NewTopic(matches_topic, 1, 1)]).values():
        f.result(30)
    half = len(records) // 2
    producer = Producer({"bootstrap.servers": kafka})

    last_offset: dict[int, int] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        last_offset[msg.partition()] = max(last_offset.get(msg.partition(), -1), msg.offset())

    def produce(recs):
        for i, r in enumerate(recs):
            producer.produce(topic, confluent_payload(r, info), partition=i % 2, on_delivery=delivered)
        assert producer.flush(30) == 0

    produce(records[:half])
    lake = init_lake(tmp_path / "lake")
    owner = Caller("dave")
    flt = AlertBroker(lake, "lsst").filters.create(owner, "to kafka", FILTER_ADQL, kafka_topic=matches_topic)
    args = ["ingest", "alerts", "lsst", "--kafka", kafka, "--topic", topic, "--group", "dac-test",
            "--lake", str(tmp_path / "lake"), "--dead-letter", str(tmp_path / "dead"), "--idle-exit", "4",
            "--produce", kafka, "--max-wait", "0.5", "--report", str(tmp_path / "r.json")]  # fmt: skip
    for key, value in FAST_GROUP.items():
        args += ["--kafka-config", f"{key}={value}"]
    first = dac(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["alerts"] == half

    produce(records[half:])  # the second run starts where the lake says the first stopped
    second = dac(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["alerts"] == len(records) - half

    engine = engine_for(lake)
    alert_ids = table_ids(engine, "SELECT alert_id FROM lsst.alerts", "alert_id")
    assert sorted(alert_ids) == sorted(r["diaSourceId"] for r in records)
    objects = set(table_ids(engine, "SELECT object_id FROM lsst.objects", "object_id"))

    def object_id(src: dict) -> str:  # Solar System sources have no diaObject: ss<ssObjectId>
        return str(src["diaObjectId"]) if src["diaObjectId"] is not None else f"ss{src['ssObjectId']}"

    assert objects == {object_id(r["diaSource"]) for r in records}

    # the group's committed offsets are right after the last message of each partition
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "dac-test", **FAST_GROUP})
    committed = consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    consumer.close()
    assert [tp.offset for tp in committed] == [last_offset[0] + 1, last_offset[1] + 1]

    # the filter's matches were produced to its topic: the same rows as stored in the lake
    stored = AlertBroker(lake, "lsst").filters.results(owner, flt.id)
    assert stored.num_rows > 0
    reader = Consumer({"bootstrap.servers": kafka, "group.id": f"reader-{time.time_ns()}",
                       "auto.offset.reset": "earliest", **FAST_GROUP})  # fmt: skip
    reader.subscribe([matches_topic])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < stored.num_rows and time.monotonic() < deadline:
        for m in reader.consume(100, timeout=1.0):
            if m.error() is None:
                got.append(json.loads(m.value()))
    reader.close()
    assert sorted((g["object_id"], g["n_detections"]) for g in got) == sorted(
        zip(stored.column("object_id").to_pylist(), stored.column("n_detections").to_pylist(), strict=True)
    )
