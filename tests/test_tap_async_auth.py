"""TAP async (UWS) through pyvo and httpx, data rights with real tokens, and job survival across a restart."""

from __future__ import annotations

import io
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
import pyvo
import requests
from astropy.io.votable import parse_single_table

from tests.service_fixtures import OTHER_TOKEN, TEAM_TOKEN, start_service, stop_service

UWS = "{http://www.ivoa.net/xml/UWS/v1.0}"
#: a query that runs for many seconds on the test lake (a join of 60k x 20k rows on a non-equality)
SLOW = (
    "SELECT COUNT(*) AS n FROM demo_survey.source AS a JOIN demo_xmatch.source AS b "
    "ON a.source_id <> b.obj_id WHERE SIN(a.ra) * COS(b.dec) > 0.1"
)


def _session(token: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    return s


def _phase(client: httpx.Client, url: str) -> str:
    return client.get(f"{url}/phase").text.strip()


def test_async_job_with_pyvo_wait_and_result(served):
    tap = pyvo.dal.TAPService(served.tap)
    job = tap.submit_job("SELECT TOP 7 source_id, ra FROM demo_survey.source ORDER BY source_id")
    job.run()
    job.wait(phases=["COMPLETED", "ERROR", "ABORTED"], timeout=60)
    assert job.phase == "COMPLETED"
    table = job.fetch_result().to_table()
    assert len(table) == 7 and list(table["source_id"]) == sorted(table["source_id"])
    job.delete()


def test_async_error_document_and_blocking_wait(served):
    with httpx.Client(follow_redirects=False) as c:
        r = c.post(
            f"{served.tap}/async", data={"LANG": "ADQL", "QUERY": "SELECT nosuch FROM demo_survey.source"}
        )
        assert r.status_code == 303
        url = r.headers["location"]
        c.post(f"{url}/phase", data={"PHASE": "RUN"})
        t0 = time.monotonic()
        job = ET.fromstring(c.get(url, params={"WAIT": 30}).content)
        phase = job.find(f"{UWS}phase").text
        while phase in ("QUEUED", "EXECUTING") and time.monotonic() - t0 < 30:
            phase = ET.fromstring(c.get(url, params={"WAIT": 30}).content).find(f"{UWS}phase").text
        assert phase == "ERROR"
        err = c.get(f"{url}/error")
        status = [
            i
            for i in ET.fromstring(err.content).iter("{http://www.ivoa.net/xml/VOTable/v1.3}INFO")
            if i.get("name") == "QUERY_STATUS"
        ]
        assert status and status[0].get("value") == "ERROR" and "nosuch" in status[0].text


def test_abort_stops_a_running_query_and_others_are_served(served):
    with httpx.Client(follow_redirects=False, timeout=30) as c:
        r = c.post(f"{served.tap}/async", data={"LANG": "ADQL", "QUERY": SLOW, "PHASE": "RUN"})
        url = r.headers["location"]
        deadline = time.monotonic() + 30
        while _phase(c, url) != "EXECUTING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _phase(c, url) == "EXECUTING"
        # the service keeps answering while the job runs
        quick = c.get(
            f"{served.tap}/sync", params={"LANG": "ADQL", "QUERY": "SELECT TOP 1 ra FROM demo_survey.source"}
        )
        assert quick.status_code == 200
        t0 = time.monotonic()
        c.post(f"{url}/phase", data={"PHASE": "ABORT"})
        while _phase(c, url) == "EXECUTING" and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        assert _phase(c, url) == "ABORTED" and time.monotonic() - t0 < 20


def test_execution_duration_stops_a_runaway_job(served):
    with httpx.Client(follow_redirects=False, timeout=30) as c:
        r = c.post(f"{served.tap}/async", data={"LANG": "ADQL", "QUERY": SLOW, "EXECUTIONDURATION": 2})
        url = r.headers["location"]
        assert c.get(f"{url}/executionduration").text.strip() == "2"
        c.post(f"{url}/phase", data={"PHASE": "RUN"})
        deadline = time.monotonic() + 30
        while _phase(c, url) in ("PENDING", "QUEUED", "EXECUTING") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _phase(c, url) == "ERROR"
        assert "execution duration" in c.get(url).text


def test_sync_time_limit_gives_an_error_document(served):
    # the test configuration's sync limit is 20 s
    t0 = time.monotonic()
    r = httpx.get(f"{served.tap}/sync", params={"LANG": "ADQL", "QUERY": SLOW}, timeout=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 40
    assert r.status_code == 400 and "20 s" in r.text and "async" in r.text


def test_private_catalog_exists_only_for_its_group(served):
    anon = pyvo.dal.TAPService(served.tap)
    team = pyvo.dal.TAPService(served.tap, session=_session(TEAM_TOKEN))
    other = pyvo.dal.TAPService(served.tap, session=_session(OTHER_TOKEN))
    # (pyvo 1.9 fetches per-table details without the session's headers, so /tables is read directly)
    listing = httpx.get(f"{served.tap}/tables", headers={"Authorization": f"Bearer {TEAM_TOKEN}"}).text
    assert "<name>private_cat.source</name>" in listing
    assert "private_cat.source" in {
        str(n) for n in team.run_sync("SELECT table_name FROM TAP_SCHEMA.tables").to_table()["table_name"]
    }
    for svc in (anon, other):
        assert "private_cat.source" not in {t.name for t in svc.tables}
        names = svc.run_sync("SELECT table_name FROM TAP_SCHEMA.tables").to_table()["table_name"]
        assert not any("private" in str(n) for n in names)
        with pytest.raises(pyvo.dal.DALQueryError) as err:
            svc.run_sync("SELECT TOP 1 * FROM private_cat.source")
        assert "private_cat" in str(err.value) and "did you mean" not in str(err.value).lower()
    n = team.run_sync("SELECT COUNT(*) AS n FROM private_cat.source").to_table()["n"][0]
    assert n > 0
    # HTTP Basic with the token as password (clients that only do Basic)
    r = httpx.get(
        f"{served.tap}/sync",
        params={"LANG": "ADQL", "QUERY": "SELECT COUNT(*) AS n FROM private_cat.source", "FORMAT": "csv"},
        auth=("alice", TEAM_TOKEN),
    )
    assert r.status_code == 200 and int(r.text.split()[1]) == n
    bad = httpx.get(f"{served.tap}/tables", headers={"Authorization": "Bearer not-a-real-token"})
    assert bad.status_code == 401 and "WWW-Authenticate" in bad.headers
    assert "not-a-real-token" not in bad.text


def test_jobs_are_private_to_their_owner(served):
    with httpx.Client(follow_redirects=False, headers={"Authorization": f"Bearer {TEAM_TOKEN}"}) as alice:
        r = alice.post(
            f"{served.tap}/async", data={"LANG": "ADQL", "QUERY": "SELECT TOP 1 * FROM private_cat.source"}
        )
        url = r.headers["location"]
        job_id = url.rstrip("/").rsplit("/", 1)[1]
        assert job_id in alice.get(f"{served.tap}/async").text
    with httpx.Client(headers={"Authorization": f"Bearer {OTHER_TOKEN}"}) as bob:
        assert bob.get(url).status_code == 404
        assert job_id not in bob.get(f"{served.tap}/async").text
        assert bob.post(f"{url}/phase", data={"PHASE": "RUN"}).status_code == 404
    assert httpx.get(url).status_code == 404  # anonymous


def test_private_job_runs_with_its_owners_rights(served):
    team = pyvo.dal.TAPService(served.tap, session=_session(TEAM_TOKEN))
    table = team.run_async("SELECT COUNT(*) AS n FROM private_cat.source").to_table()
    assert table["n"][0] > 0


def test_no_job_is_lost_or_stuck_when_the_service_dies(service_lake, tmp_path):
    served = start_service(service_lake, tmp_path / "jobs", tmp_path / "a.log")
    try:
        with httpx.Client(follow_redirects=False, timeout=30) as c:
            done = c.post(
                f"{served.tap}/async",
                data={"LANG": "ADQL", "QUERY": "SELECT TOP 3 ra FROM demo_survey.source", "PHASE": "RUN"},
            ).headers["location"]
            pending = c.post(
                f"{served.tap}/async",
                data={"LANG": "ADQL", "QUERY": "SELECT TOP 2 ra FROM demo_survey.source"},
            ).headers["location"]
            running = c.post(
                f"{served.tap}/async", data={"LANG": "ADQL", "QUERY": SLOW, "PHASE": "RUN"}
            ).headers["location"]
            deadline = time.monotonic() + 30
            while (
                _phase(c, running) != "EXECUTING" or _phase(c, done) != "COMPLETED"
            ) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _phase(c, running) == "EXECUTING" and _phase(c, done) == "COMPLETED"
    finally:
        served.process.kill()  # no clean shutdown: SIGKILL
        served.process.wait()
    port_path = [p.split("/tap/async/")[1] for p in (done, pending, running)]
    again = start_service(service_lake, tmp_path / "jobs", tmp_path / "b.log")
    try:
        with httpx.Client(follow_redirects=False, timeout=30) as c:
            done, pending, running = (f"{again.tap}/async/{p}" for p in port_path)
            assert _phase(c, done) == "COMPLETED"
            table = parse_single_table(io.BytesIO(c.get(f"{done}/results/result").content)).to_table()
            assert len(table) == 3
            assert _phase(c, running) == "ERROR"
            assert "restart" in c.get(f"{running}/error").text
            assert _phase(c, pending) == "PENDING"
            c.post(f"{pending}/phase", data={"PHASE": "RUN"})
            deadline = time.monotonic() + 30
            while _phase(c, pending) != "COMPLETED" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _phase(c, pending) == "COMPLETED"
    finally:
        stop_service(again)
