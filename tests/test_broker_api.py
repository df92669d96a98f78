"""The alert broker's HTTP API over real HTTP: a lake with a release catalog and an alert stream, served by
`dac serve` in a subprocess, definitions made through the API with real tokens, batches
committed with `AlertLake.commit` and matched in this process by `AlertBroker.process_batch` (as the ingest
does), and what they matched read back over HTTP in JSON, CSV and VOTable (parsed by astropy).

Also: TAP_SCHEMA with an alert stream present lists each schema once (and the stream's tables).
"""

from __future__ import annotations

import io
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from astropy import units as u
from astropy.io.votable import parse_single_table
from astropy.table import Table
from mocpy import MOC

from api.auth import hash_token
from dac_lake.alerts import AlertLake
from dac_lake.alerts_broker import AlertBroker, BatchReport
from dac_lake.catalog_def import load_definition
from dac_lake.engine import QueryEngine
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from ingest.release import IngestOptions, ingest_release
from tests.conftest import TEST_DEFINITION, make_catalog, write_parts
from tests.service_fixtures import OTHER_TOKEN, TEAM_TOKEN, launch_serve
from tests.test_alert_lake import AlertSimulator

REPO = Path(__file__).resolve().parents[1]
STREAM = "ztf"
TEAM = {"Authorization": f"Bearer {TEAM_TOKEN}"}
OTHER = {"Authorization": f"Bearer {OTHER_TOKEN}"}
VOT_NS = "{http://www.ivoa.net/xml/VOTable/v1.3}"


@dataclass
class BrokerEnv:
    """The served lake, the stream's writer and simulator, and the broker the ingest would run."""

    base: str
    lake: Lake
    writer: AlertLake
    sim: AlertSimulator
    broker: AlertBroker
    process: subprocess.Popen
    log: Path
    reports: list[BatchReport] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base}/alerts/{STREAM}{path}"

    def next_batch(self, fields=(0, 1), alerts_per_field: int = 80):
        """Commit one simulated batch, then match it as the ingest does: the objects the batch updated
        (read back from the lake, as the ingest's recovery does) and its detections, numbered by the
        commit's snapshot."""
        det, uls, alerts = self.sim.batch(list(fields), alerts_per_field)
        batch_id = f"b{len(self.writer.snapshots.history())}"
        commit = self.writer.commit(batch_id, det, uls, alerts)
        engine = QueryEngine(self.lake, frozenset({"*"}))  # a fresh registry: the new snapshot
        objects = engine.adql(f"SELECT * FROM {STREAM}.objects WHERE updated_batch = '{batch_id}'").table
        i = objects.column_names.index("updated_batch")
        objects = objects.set_column(i, "updated_batch", pa.array(np.full(objects.num_rows, commit.seq)))
        assert objects.num_rows == len(set(det["object_id"].to_pylist()))
        report = self.broker.process_batch(commit.seq, objects, det)
        self.reports.append(report)
        return commit.seq, objects, report


def start_broker_service(
    lake_url: str, config: Path, job_dir: Path, log: Path
) -> tuple[str, subprocess.Popen]:
    env = {"DAC_CONFIG": str(config), "DAC_LAKE_URL": lake_url, "DAC_SERVICE_JOB_DIR": str(job_dir)}
    return launch_serve(["--host", "127.0.0.1"], env, log, cwd=REPO)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[BrokerEnv]:
    root = tmp_path_factory.mktemp("broker_api")
    lake = Lake(LakeStorage(str(root / "lake")))
    lake.init()
    definition = root / "testcat.yaml"
    definition.write_text(yaml.safe_dump(TEST_DEFINITION, sort_keys=False))
    opts = IngestOptions(max_rows_per_partition=1000, highest_order=5, validate_with_lsdb=False)
    inputs = write_parts(make_catalog(2000, seed=5), root / "input", parts=2)
    ingest_release(lake, "testcat", "dr1", inputs, load_definition(definition), opts)
    sim = AlertSimulator(seed=3, n_fields=3, objects_per_field=300).seed_history()
    writer = AlertLake(lake.storage, STREAM)
    writer.commit("b0", *sim.batch([0, 1, 2], 60))  # the stream exists and is queryable
    config = root / "dac.toml"
    config.write_text(
        "[auth]\nallow_anonymous = true\n"
        f'[[auth.tokens]]\nuser = "alice"\ngroups = ["team"]\ntoken_sha256 = "{hash_token(TEAM_TOKEN)}"\n'
        f'[[auth.tokens]]\nuser = "bob"\ngroups = []\ntoken_sha256 = "{hash_token(OTHER_TOKEN)}"\n'
    )
    log = root / "service.log"
    base, process = start_broker_service(str(root / "lake"), config, root / "jobs", log)
    broker = AlertBroker(lake, STREAM, filter_workers=1)
    yield BrokerEnv(base, lake, writer, sim, broker, process, log)
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------------------------- helpers


def table_json(response: httpx.Response) -> pa.Table:
    """The TAP-style JSON document of a table route as an Arrow table (columns by name)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["query_status"] == "OK"
    names = [m["name"] for m in doc["metadata"]]
    rows = doc["data"]
    return (
        pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})
        if rows
        else pa.table({n: pa.array([], pa.null()) for n in names})
    )


def votable(response: httpx.Response) -> Table:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-votable+xml")
    return parse_single_table(io.BytesIO(response.content)).to_table()


def csv_table(response: httpx.Response) -> Table:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return Table.read(response.text, format="ascii.csv")


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def objects_near(env: BrokerEnv, fields, n: int, seed: int) -> tuple[list[str], list[float], list[float]]:
    """Names and true positions of `n` simulated objects of these fields (what a watchlist would list)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(np.flatnonzero(np.isin(env.sim.obj_field, fields)), n, replace=False)
    ra, dec = env.sim.obj_ra[pick].tolist(), env.sim.obj_dec[pick].tolist()
    return [str(x) for x in env.sim.obj_id[pick]], ra, dec


# --------------------------------------------------------------------------------------------- tests


def test_anonymous_callers_are_refused_and_streams_must_exist(env):
    for method, path in [
        ("GET", "/filters"),
        ("POST", "/filters"),
        ("GET", "/watchlists"),
        ("POST", "/watchmaps"),
        ("GET", "/filters/flt-0123456789abcdef/results"),
    ]:
        r = httpx.request(method, env.url(path), json={"name": "x", "adql": "SELECT 1"})
        assert "sign in" in error_of(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    bad_token = httpx.get(env.url("/filters"), headers={"Authorization": "Bearer nope-0123456789"})
    assert bad_token.status_code == 401
    assert "no alert stream" in error_of(httpx.get(f"{env.base}/alerts/nosuch/filters", headers=TEAM), 404)
    assert "no alert stream" in error_of(httpx.get(f"{env.base}/alerts/No-Such/filters", headers=TEAM), 404)
    # the catalog is not a stream
    assert error_of(httpx.get(f"{env.base}/alerts/testcat/watchlists", headers=TEAM), 404)


def test_filters_through_the_api_ownership_validation_pause_and_results(env):
    adql = "SELECT object_id, ra, dec, n_detections\nFROM batch.objects\nWHERE n_detections >= 7"
    r = httpx.post(
        env.url("/filters"),
        headers=TEAM,
        json={"name": "well observed", "adql": adql, "description": "7+ detections", "topic": "alice.many"},
    )
    assert r.status_code == 201, r.text
    many = r.json()
    assert many["owner"] == "alice" and many["adql"] == adql and many["description"] == "7+ detections"
    assert many["kafka_topic"] == "alice.many" and many["active"] is True
    assert many["version"] == 1  # the description is written with the filter, not as a second version
    assert r.headers["etag"] == f'"{many["version"]}"'
    assert r.headers["location"].endswith(f"/alerts/{STREAM}/filters/{many['id']}")
    every = httpx.post(
        env.url("/filters"),
        headers=TEAM,
        json={"name": "everything", "adql": "SELECT object_id FROM batch.objects"},
    ).json()

    # ownership: bob sees none of alice's filters and cannot touch them (404, as for a missing one)
    mine = httpx.get(env.url("/filters"), headers=TEAM).json()["filters"]
    assert {many["id"], every["id"]} <= {f["id"] for f in mine}
    assert all(f["owner"] == "alice" for f in mine)
    assert httpx.get(env.url("/filters"), headers=OTHER).json()["filters"] == []
    for method, path, body in [
        ("GET", f"/filters/{many['id']}", None),
        ("PATCH", f"/filters/{many['id']}", {"name": "mine now"}),
        ("DELETE", f"/filters/{many['id']}", None),
        ("POST", f"/filters/{many['id']}/pause", None),
        ("GET", f"/filters/{many['id']}/results", None),
    ]:
        r = httpx.request(method, env.url(path), headers=OTHER, json=body)
        assert f"no filter '{many['id']}'" in error_of(r, 404)
    assert httpx.get(env.url(f"/filters/{many['id']}"), headers=TEAM).json() == many

    # ADQL is validated at save time: the translator's message, with line and column
    r = httpx.post(
        env.url("/filters"),
        headers=TEAM,
        json={"name": "typo", "adql": "SELECT object_id\nFROM batch.objects\nWHERE mag_q_latest < 17"},
    )
    assert "mag_q_latest" in error_of(r, 400) and (r.json()["line"], r.json()["column"]) == (3, 7)
    r = httpx.post(
        env.url("/filters"), headers=TEAM, json={"name": "static", "adql": "SELECT ra FROM testcat.main"}
    )
    assert "must read the batch" in error_of(r, 400)
    r = httpx.post(
        env.url("/filters"), headers=TEAM, json={"name": "x", "adq": "SELECT object_id FROM batch.objects"}
    )
    assert "unknown field(s) adq" in error_of(r, 400)
    r = httpx.post(env.url("/filters"), headers=TEAM, content=b"name=x", params={})
    assert error_of(r, 400)  # not JSON
    assert [f["id"] for f in httpx.get(env.url("/filters"), headers=TEAM).json()["filters"]].count(
        many["id"]
    ) == 1

    # pause: the paused filter does not run on the next batch; the other does, and its results are exact
    paused = httpx.post(env.url(f"/filters/{every['id']}/pause"), headers=TEAM)
    assert paused.status_code == 200 and paused.json()["active"] is False
    seq, objects, report = env.next_batch()
    ran = {run.filter_id: run for run in report.filters}
    assert many["id"] in ran and every["id"] not in ran and ran[many["id"]].error is None
    want = set(objects.filter(pc.greater_equal(objects["n_detections"], 7))["object_id"].to_pylist())
    assert 5 < len(want) < objects.num_rows
    got = table_json(httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM))
    assert set(got["object_id"].to_pylist()) == want and set(got["_batch"].to_pylist()) == {seq}
    vot = votable(
        httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM, params={"format": "votable"})
    )
    assert set(vot["object_id"]) == want
    # units and UCDs from the filter's ADQL (the batch tables' metadata): TOPCAT sees positions
    doc = httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM, params={"format": "votable"})
    fields = {f.name: f for f in parse_single_table(io.BytesIO(doc.content)).fields}
    assert fields["ra"].ucd == "pos.eq.ra;meta.main" and str(fields["ra"].unit) == "deg"
    csv = csv_table(
        httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM, params={"format": "csv"})
    )
    assert set(csv["object_id"]) == want
    empty = table_json(httpx.get(env.url(f"/filters/{every['id']}/results"), headers=TEAM))
    assert empty.num_rows == 0

    # resume: it runs again from the next batch on; batch ranges select results
    assert httpx.post(env.url(f"/filters/{every['id']}/resume"), headers=TEAM).json()["active"] is True
    seq2, objects2, report2 = env.next_batch(fields=(1, 2))
    assert every["id"] in {run.filter_id for run in report2.filters}
    got = table_json(httpx.get(env.url(f"/filters/{every['id']}/results"), headers=TEAM))
    assert set(got["_batch"].to_pylist()) == {seq2}
    assert set(got["object_id"].to_pylist()) == set(objects2["object_id"].to_pylist())
    both = table_json(httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM))
    assert set(both["_batch"].to_pylist()) == {seq, seq2}
    only = table_json(
        httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM, params={"first_batch": seq2})
    )
    assert set(only["_batch"].to_pylist()) == {seq2} and only.num_rows < both.num_rows
    r = httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM, params={"first_batch": "x"})
    assert "first_batch" in error_of(r, 400)
    r = httpx.get(env.url(f"/filters/{many['id']}/results"), headers=TEAM, params={"format": "xls"})
    assert "unsupported" in error_of(r, 400)

    # delete: gone for its owner too, results included
    assert httpx.delete(env.url(f"/filters/{every['id']}"), headers=TEAM).status_code == 204
    assert error_of(httpx.get(env.url(f"/filters/{every['id']}/results"), headers=TEAM), 404)


def test_versions_conflicts_and_if_match(env):
    created = httpx.post(
        env.url("/filters"), headers=TEAM, json={"name": "v", "adql": "SELECT object_id FROM batch.objects"}
    )
    f = created.json()
    v1 = f["version"]
    r = httpx.patch(env.url(f"/filters/{f['id']}"), headers=TEAM, json={"name": "v2", "version": v1})
    assert r.status_code == 200 and r.json()["name"] == "v2" and r.json()["version"] == v1 + 1
    # a second editor still on v1 is told, not silently overwritten
    r = httpx.patch(env.url(f"/filters/{f['id']}"), headers=TEAM, json={"name": "stale", "version": v1})
    assert f"not {v1}" in error_of(r, 409)
    r = httpx.patch(
        env.url(f"/filters/{f['id']}"), headers={**TEAM, "If-Match": f'"{v1}"'}, json={"name": "stale"}
    )
    assert error_of(r, 412)
    current = httpx.get(env.url(f"/filters/{f['id']}"), headers=TEAM)
    assert current.json()["name"] == "v2"
    tag = current.headers["etag"]
    # an edit of the query and the description, based on the current ETag
    r = httpx.patch(
        env.url(f"/filters/{f['id']}"),
        headers={**TEAM, "If-Match": tag},
        json={"adql": "SELECT object_id, n_bands FROM batch.objects", "description": "with bands"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["adql"].endswith("batch.objects") and r.json()["description"] == "with bands"
    assert r.headers["etag"] != tag
    assert r.json()["version"] == current.json()["version"] + 1  # query and description: one version
    # a description-only edit keeps the query; a broken query is refused and changes nothing
    r = httpx.patch(env.url(f"/filters/{f['id']}"), headers=TEAM, json={"description": "renamed"})
    assert r.json()["description"] == "renamed" and "n_bands" in r.json()["adql"]
    r = httpx.patch(
        env.url(f"/filters/{f['id']}"), headers=TEAM, json={"adql": "SELECT nope FROM batch.objects"}
    )
    assert "nope" in error_of(r, 400)
    assert "n_bands" in httpx.get(env.url(f"/filters/{f['id']}"), headers=TEAM).json()["adql"]
    r = httpx.patch(env.url(f"/filters/{f['id']}"), headers={**TEAM, "If-Match": "soon"}, json={})
    assert "If-Match" in error_of(r, 400)
    # delete with a stale If-Match is refused; with the current one it goes
    r = httpx.delete(env.url(f"/filters/{f['id']}"), headers={**TEAM, "If-Match": f'"{v1}"'})
    assert error_of(r, 412)
    tag = httpx.get(env.url(f"/filters/{f['id']}"), headers=TEAM).headers["etag"]
    assert httpx.delete(env.url(f"/filters/{f['id']}"), headers={**TEAM, "If-Match": tag}).status_code == 204
    assert error_of(httpx.get(env.url(f"/filters/{f['id']}"), headers=TEAM), 404)
    assert error_of(httpx.patch(env.url(f"/filters/{f['id']}"), headers=TEAM, json={"name": "zombie"}), 404)


def test_watchlists_uploads_errors_and_hits_as_votable(env):
    bad = "name,ra,dec,radius\nok,10,20,2\nB,abc,95,4\n"
    r = httpx.post(
        env.url("/watchlists"),
        headers=TEAM,
        files={"file": ("list.csv", bad, "text/csv")},
        data={"name": "bad"},
    )
    message = error_of(r, 400)
    assert "row 2 ('B')" in message and "ra 'abc' is not a number" in message and "row 1" not in message
    r = httpx.post(
        env.url("/watchlists"),
        headers=TEAM,
        json={"name": "bad json", "sources": [{"name": "a", "ra": 1, "dec": 99}]},
    )
    assert "row 1 ('a')" in error_of(r, 400) and "dec 99" in r.json()["error"]
    assert "needs a name" in error_of(
        httpx.post(env.url("/watchlists"), headers=TEAM, files={"file": ("l.csv", "name,ra,dec\na,1,2\n")}),
        400,
    )
    assert httpx.get(env.url("/watchlists"), headers=TEAM).json()["watchlists"] == []

    names, ra, dec = objects_near(env, [0, 1], 80, seed=1)
    text = "name,ra,dec,radius_arcsec\n" + "".join(
        f"{n},{a!r},{d!r},2\n" for n, a, d in zip(names, ra, dec, strict=True)
    )
    r = httpx.post(
        env.url("/watchlists"),
        headers=TEAM,
        files={"file": ("mine.csv", text, "text/csv")},
        data={"name": "mine"},
    )
    assert r.status_code == 201, r.text
    wl = r.json()
    assert wl["spec"]["n_sources"] == 80 and wl["owner"] == "alice" and "blobs" not in wl
    # bob's watchlist, as JSON sources over the same objects: hits are his only
    bob = httpx.post(
        env.url("/watchlists"),
        headers=OTHER,
        json={
            "name": "bob's",
            "sources": [
                {"name": n, "ra": a, "dec": d} for n, a, d in zip(names[:10], ra[:10], dec[:10], strict=True)
            ],
        },
    )
    assert bob.status_code == 201, bob.text
    bob_wl = bob.json()
    assert [w["id"] for w in httpx.get(env.url("/watchlists"), headers=TEAM).json()["watchlists"]] == [
        wl["id"]
    ]
    assert error_of(httpx.get(env.url(f"/watchlists/{wl['id']}"), headers=OTHER), 404)
    assert error_of(httpx.get(env.url(f"/watchlists/{wl['id']}/hits"), headers=OTHER), 404)
    # sources download (VOTable with positions TOPCAT recognises)
    src = votable(
        httpx.get(env.url(f"/watchlists/{wl['id']}/sources"), headers=TEAM, params={"format": "votable"})
    )
    assert sorted(src["name"]) == sorted(names) and np.allclose(sorted(src["ra"]), sorted(ra))

    seq, _, report = env.next_batch(fields=(0, 1), alerts_per_field=120)
    want = report.watchlist_hits.filter(pc.equal(report.watchlist_hits["watchlist_id"], wl["id"]))
    assert want.num_rows > 10
    key = ("source_name", "object_id", "alert_id", "separation_arcsec")

    def pairs(t) -> set:
        return set(zip(*(list(t[k]) for k in key), strict=True))

    want_pairs = pairs({k: want[k].to_pylist() for k in key})
    got = votable(
        httpx.get(env.url(f"/watchlists/{wl['id']}/hits"), headers=TEAM, params={"format": "votable"})
    )
    assert pairs(got) == want_pairs and set(got["_batch"]) == {seq}
    assert "owner" not in got.colnames and got["separation_arcsec"].unit == u.arcsec
    as_json = table_json(httpx.get(env.url(f"/watchlists/{wl['id']}/hits"), headers=TEAM))
    assert pairs({k: as_json[k].to_pylist() for k in key}) == want_pairs
    as_csv = csv_table(
        httpx.get(env.url(f"/watchlists/{wl['id']}/hits"), headers=TEAM, params={"format": "csv"})
    )
    assert len(as_csv) == want.num_rows
    bob_hits = table_json(httpx.get(env.url(f"/watchlists/{bob_wl['id']}/hits"), headers=OTHER))
    assert set(bob_hits["watchlist_id"].to_pylist()) <= {bob_wl["id"]} and bob_hits.num_rows > 0

    # replace the sources (a VOTable this time), rename, pause; stale version refused
    t = Table({"name": names[:5], "ra": ra[:5], "dec": dec[:5], "radius": [3.0] * 5})
    buf = io.BytesIO()
    t.write(buf, format="votable")
    r = httpx.put(
        env.url(f"/watchlists/{wl['id']}/sources"),
        headers={**TEAM, "If-Match": f'"{wl["version"]}"'},
        files={"file": ("five.xml", buf.getvalue(), "application/x-votable+xml")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["n_sources"] == 5 and r.json()["version"] == wl["version"] + 1
    r = httpx.patch(
        env.url(f"/watchlists/{wl['id']}"), headers=TEAM, json={"name": "x", "version": wl["version"]}
    )
    assert error_of(r, 409)
    r = httpx.patch(env.url(f"/watchlists/{wl['id']}"), headers=TEAM, json={"name": "five", "active": False})
    assert r.json()["name"] == "five" and r.json()["active"] is False
    _, _, report = env.next_batch(fields=(0, 1), alerts_per_field=120)
    assert wl["id"] not in set(report.watchlist_hits["watchlist_id"].to_pylist())
    assert httpx.delete(env.url(f"/watchlists/{wl['id']}"), headers=TEAM).status_code == 204
    assert httpx.get(env.url("/watchlists"), headers=TEAM).json()["watchlists"] == []


def test_watchmaps_in_every_format_and_hits(env):
    centre_ra, centre_dec = (
        float(env.sim.obj_ra[env.sim.obj_field == 2].mean()),
        float(env.sim.obj_dec[env.sim.obj_field == 2].mean()),
    )
    region = MOC.from_cone(lon=centre_ra * u.deg, lat=centre_dec * u.deg, radius=1.0 * u.deg, max_depth=10)
    fits_bytes = io.BytesIO()
    region.serialize(format="fits").writeto(fits_bytes)
    r = httpx.post(
        env.url("/watchmaps"),
        headers=TEAM,
        files={"file": ("region.fits", fits_bytes.getvalue(), "application/fits")},
        data={"name": "field 2"},
    )
    assert r.status_code == 201, r.text
    wm = r.json()
    assert wm["spec"]["cells"] == len(region.uniq_hpx)
    as_json = httpx.post(
        env.url("/watchmaps"),
        headers=TEAM,
        json={"name": "json", "moc": json.loads(region.to_string("json"))},
    )
    assert as_json.status_code == 201, as_json.text
    as_ascii = httpx.post(
        env.url("/watchmaps"),
        headers={**TEAM, "Content-Type": "text/plain"},
        params={"name": "ascii", "active": "false"},
        content=region.to_string("ascii"),
    )
    assert as_ascii.status_code == 201 and as_ascii.json()["active"] is False
    assert "cannot read" in error_of(
        httpx.post(env.url("/watchmaps"), headers=TEAM, json={"name": "bad", "moc": "3/x"}), 400
    )
    assert "empty" in error_of(
        httpx.post(env.url("/watchmaps"), headers=TEAM, files={"file": ("e.txt", b"")}, data={"name": "e"}),
        400,
    )
    # the MOC comes back as it went in
    back = httpx.get(env.url(f"/watchmaps/{wm['id']}/moc"), headers=TEAM, params={"format": "json"})
    assert MOC.from_string(back.text, format="json") == region
    fits_back = httpx.get(env.url(f"/watchmaps/{wm['id']}/moc"), headers=TEAM)
    assert fits_back.headers["content-type"] == "application/fits"
    assert MOC.from_fits(io.BytesIO(fits_back.content)) == region
    assert error_of(httpx.get(env.url(f"/watchmaps/{wm['id']}/moc"), headers=OTHER), 404)

    seq, _, report = env.next_batch(fields=(1, 2), alerts_per_field=100)
    want = report.watchmap_hits.filter(pc.equal(report.watchmap_hits["watchmap_id"], wm["id"]))
    assert want.num_rows > 10
    got = votable(
        httpx.get(env.url(f"/watchmaps/{wm['id']}/hits"), headers=TEAM, params={"format": "votable"})
    )
    assert sorted(got["object_id"]) == sorted(want["object_id"].to_pylist()) and set(got["_batch"]) == {seq}
    assert got["ra"].unit == u.deg
    paused = set(report.watchmap_hits["watchmap_id"].to_pylist())
    assert as_ascii.json()["id"] not in paused and as_json.json()["id"] in paused
    for made in (wm, as_json.json(), as_ascii.json()):
        assert httpx.delete(env.url(f"/watchmaps/{made['id']}"), headers=TEAM).status_code == 204


def test_tap_schema_lists_each_schema_once_with_an_alert_stream(env):
    def sync(query: str) -> Table:
        r = httpx.get(f"{env.base}/tap/sync", params={"LANG": "ADQL", "QUERY": query})
        return votable(r)

    schemas = list(sync("SELECT schema_name FROM TAP_SCHEMA.schemas")["schema_name"])
    assert len(schemas) == len(set(schemas))
    assert {STREAM, "testcat", "TAP_SCHEMA"} <= set(schemas)
    tables = sync(f"SELECT table_name FROM TAP_SCHEMA.tables WHERE schema_name = '{STREAM}'")
    assert set(tables["table_name"]) == {
        f"{STREAM}.{t}" for t in ("detections", "objects", "upper_limits", "alerts")
    }
    columns = sync(f"SELECT column_name, unit FROM TAP_SCHEMA.columns WHERE table_name = '{STREAM}.objects'")
    assert "n_detections" in set(columns["column_name"])
    tableset = ET.fromstring(httpx.get(f"{env.base}/tap/tables").content)
    names = [s.findtext("name") for s in tableset.iter("schema")]
    assert names.count(STREAM) == 1
    stream_schema = next(s for s in tableset.iter("schema") if s.findtext("name") == STREAM)
    assert len(list(stream_schema.iter("table"))) == 4
