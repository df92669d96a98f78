"""UWS 1.1 job machinery (api/uws) through real HTTP: uvicorn on 127.0.0.1, httpx and pyvo as clients.

The executor here is small but real: it sums numbers into a file, sleeps while watching `cancelled`,
fails as a user error or as a crash, reads uploaded files and writes a VOTable for pyvo. Documents are
validated against the content model of the UWS 1.1 REC schema (UWS.xsd 1.1-REC-20161024), transcribed
below because the test machines cannot fetch www.ivoa.net.
"""

from __future__ import annotations

import io
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pyvo.io.uws import parse_job, parse_job_list

from api.uws import (
    RESTART_MESSAGE,
    Job,
    JobContext,
    JobResult,
    JobRunner,
    JobStore,
    Parameters,
    Phase,
    make_async_router,
)
from api.uws.store import format_timestamp

etree = pytest.importorskip("lxml.etree")

UWS = "{http://www.ivoa.net/xml/UWS/v1.0}"
XLINK = "{http://www.w3.org/1999/xlink}"
XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ schema
# The content model of UWS.xsd version 1.1-REC-20161024 (annotations left out), and the two xlink
# attributes it imports. Element order, occurrences and nil-ability are what clients rely on.
UWS_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0"
    xmlns:xlink="http://www.w3.org/1999/xlink" targetNamespace="http://www.ivoa.net/xml/UWS/v1.0"
    elementFormDefault="qualified" attributeFormDefault="unqualified" version="1.1">
  <xs:import namespace="http://www.w3.org/1999/xlink" schemaLocation="xlink.xsd"/>
  <xs:attributeGroup name="reference">
    <xs:attribute ref="xlink:type" use="optional" default="simple"/>
    <xs:attribute ref="xlink:href" use="optional"/>
  </xs:attributeGroup>
  <xs:simpleType name="ExecutionPhase">
    <xs:restriction base="xs:string">
      <xs:enumeration value="PENDING"/><xs:enumeration value="QUEUED"/><xs:enumeration value="EXECUTING"/>
      <xs:enumeration value="COMPLETED"/><xs:enumeration value="ERROR"/><xs:enumeration value="UNKNOWN"/>
      <xs:enumeration value="HELD"/><xs:enumeration value="SUSPENDED"/><xs:enumeration value="ABORTED"/>
      <xs:enumeration value="ARCHIVED"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:simpleType name="JobIdentifier"><xs:restriction base="xs:string"/></xs:simpleType>
  <xs:simpleType name="UWSVersion"><xs:restriction base="xs:string"/></xs:simpleType>
  <xs:element name="ownerId" type="xs:string" nillable="true"/>
  <xs:element name="creationTime" type="xs:dateTime"/>
  <xs:complexType name="ShortJobDescription">
    <xs:sequence>
      <xs:element name="phase" type="uws:ExecutionPhase"/>
      <xs:element name="runId" type="xs:string" minOccurs="0"/>
      <xs:element ref="uws:ownerId" minOccurs="0"/>
      <xs:element ref="uws:creationTime" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="id" type="uws:JobIdentifier" use="required"/>
    <xs:attributeGroup ref="uws:reference"/>
  </xs:complexType>
  <xs:complexType name="JobSummary">
    <xs:sequence>
      <xs:element name="jobId" type="uws:JobIdentifier"/>
      <xs:element name="runId" type="xs:string" minOccurs="0"/>
      <xs:element ref="uws:ownerId"/>
      <xs:element name="phase" type="uws:ExecutionPhase"/>
      <xs:element name="quote" type="xs:dateTime" nillable="true" minOccurs="0"/>
      <xs:element ref="uws:creationTime" minOccurs="0"/>
      <xs:element name="startTime" type="xs:dateTime" nillable="true"/>
      <xs:element name="endTime" type="xs:dateTime" nillable="true"/>
      <xs:element name="executionDuration" type="xs:int"/>
      <xs:element name="destruction" type="xs:dateTime" nillable="true"/>
      <xs:element ref="uws:parameters" minOccurs="0"/>
      <xs:element ref="uws:results"/>
      <xs:element name="errorSummary" type="uws:ErrorSummary" minOccurs="0"/>
      <xs:element name="jobInfo" minOccurs="0">
        <xs:complexType><xs:sequence>
          <xs:any namespace="##any" processContents="lax" minOccurs="0" maxOccurs="unbounded"/>
        </xs:sequence></xs:complexType>
      </xs:element>
    </xs:sequence>
    <xs:attribute name="version" type="uws:UWSVersion" use="optional"/>
  </xs:complexType>
  <xs:element name="job" type="uws:JobSummary"/>
  <xs:element name="jobs">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="jobref" type="uws:ShortJobDescription" minOccurs="0" maxOccurs="unbounded"/>
      </xs:sequence>
      <xs:attribute name="version" type="uws:UWSVersion" use="optional"/>
    </xs:complexType>
  </xs:element>
  <xs:complexType name="ResultReference" mixed="false">
    <xs:attribute name="id" type="xs:string" use="required"/>
    <xs:attributeGroup ref="uws:reference"/>
    <xs:attribute name="size" type="xs:long" use="optional"/>
    <xs:attribute name="mime-type" type="xs:string" use="optional"/>
    <xs:anyAttribute namespace="urn:uwscustom" processContents="lax"/>
  </xs:complexType>
  <xs:element name="results">
    <xs:complexType><xs:sequence>
      <xs:element name="result" type="uws:ResultReference" minOccurs="0" maxOccurs="unbounded"/>
    </xs:sequence></xs:complexType>
  </xs:element>
  <xs:simpleType name="ErrorType">
    <xs:restriction base="xs:string">
      <xs:enumeration value="transient"/><xs:enumeration value="fatal"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:complexType name="ErrorSummary">
    <xs:sequence><xs:element name="message" type="xs:string"/></xs:sequence>
    <xs:attribute name="type" type="uws:ErrorType" use="required"/>
    <xs:attribute name="hasDetail" type="xs:boolean" use="required"/>
  </xs:complexType>
  <xs:complexType name="Parameter" mixed="true">
    <xs:attribute name="byReference" type="xs:boolean" default="false"/>
    <xs:attribute name="id" type="xs:string" use="required"/>
    <xs:attribute name="isPost" type="xs:boolean"/>
  </xs:complexType>
  <xs:element name="parameters">
    <xs:complexType><xs:sequence>
      <xs:element name="parameter" type="uws:Parameter" minOccurs="0" maxOccurs="unbounded"/>
    </xs:sequence></xs:complexType>
  </xs:element>
</xs:schema>
"""

XLINK_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="http://www.w3.org/1999/xlink"
    attributeFormDefault="qualified">
  <xs:attribute name="type">
    <xs:simpleType><xs:restriction base="xs:string">
      <xs:enumeration value="simple"/><xs:enumeration value="extended"/><xs:enumeration value="locator"/>
      <xs:enumeration value="arc"/><xs:enumeration value="resource"/><xs:enumeration value="title"/>
    </xs:restriction></xs:simpleType>
  </xs:attribute>
  <xs:attribute name="href" type="xs:anyURI"/>
</xs:schema>
"""


@pytest.fixture(scope="module")
def uws_schema(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xsd")
    (folder / "xlink.xsd").write_text(XLINK_XSD)
    (folder / "UWS.xsd").write_text(UWS_XSD)
    return etree.XMLSchema(etree.parse(str(folder / "UWS.xsd")))


def valid(schema, content: bytes):
    """Parse a UWS document and assert it validates; returns the root element."""
    doc = etree.fromstring(content)
    assert schema.validate(doc), f"{schema.error_log}\n{content.decode()}"
    return doc


# ------------------------------------------------------------------------------------------------ executor
class UserError(Exception):
    http_status = 400


class Recorder:
    """A real executor with a memory of what it ran and what it was asked to cancel."""

    def __init__(self):
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, job: Job, ctx: JobContext) -> list[JobResult]:
        with self.lock:
            self.started.append(job.job_id)
        if job.param("QUERY") is not None:
            return self._votable(job, ctx)
        mode = (job.param("MODE") or "sum").lower()
        if mode == "sum":
            total = self._numbers(job.param("NUMBERS") or "")
            ctx.set_progress("numbers summed: some")
            ctx.set_progress("numbers summed: all")  # within the throttle interval: written at the end
            (ctx.results_dir / "sum.txt").write_text(f"{total:g}\n")
            return [JobResult(id="result", path="sum.txt", mime_type="text/plain", rows=1)]
        if mode == "sleep":
            ctx.on_cancel(lambda: self._cancelled(job.job_id))
            end = time.monotonic() + float(job.param("SECONDS") or "30")
            while time.monotonic() < end:
                ctx.set_progress(f"{end - time.monotonic():.0f} s to go")
                if ctx.cancelled.wait(0.02):
                    raise InterruptedError("interrupted")
            (ctx.results_dir / "slept.txt").write_text("done\n")
            return [JobResult(id="result", path=ctx.results_dir / "slept.txt", mime_type="text/plain")]
        if mode == "crash":
            raise RuntimeError("disk on fire\nsecret traceback detail")
        if mode == "errordoc":
            (ctx.results_dir / "error.xml").write_text("<VOTABLE><INFO name='QUERY_STATUS' value='ERROR'/>"
                                                        "</VOTABLE>")
            ctx.set_error_document("error.xml", "application/x-votable+xml")
            raise UserError("see the error document")
        if mode == "upload":
            lines = []
            for table, path in job.upload_files():
                lines.append(f"{table}:{len(path.read_text().splitlines())}")
            (ctx.results_dir / "uploads.txt").write_text("\n".join(sorted(lines)))
            return [JobResult(id="result", path="uploads.txt", mime_type="text/plain")]
        raise UserError(f"unknown MODE {mode!r}")

    def _cancelled(self, job_id: str) -> None:
        with self.lock:
            self.cancelled.append(job_id)

    @staticmethod
    def _numbers(text: str) -> float:
        try:
            return sum(float(x) for x in text.replace(" ", ",").split(",") if x.strip())
        except ValueError:
            raise UserError(f"cannot sum {text!r}") from None

    def _votable(self, job: Job, ctx: JobContext) -> list[JobResult]:
        from astropy.table import Table

        words = (job.param("QUERY") or "").split()
        if not words or words[0].upper() != "SUM":
            raise UserError("QUERY must be SUM followed by numbers")
        total = self._numbers(",".join(words[1:]))
        Table({"total": [total]}).write(ctx.results_dir / "result.xml", format="votable")
        return [JobResult(id="result", path="result.xml", rows=1)]


def require_something(params: Parameters) -> None:
    """The integrator's validator: a job must say what to do (TAP would require QUERY)."""
    if not any(params.has(n) for n in ("QUERY", "NUMBERS", "MODE")):
        error = ValueError("missing QUERY")
        error.http_status = 400  # type: ignore[attr-defined]
        error.message = "missing QUERY: say what the job should compute"  # type: ignore[attr-defined]
        raise error


def votable_error(message: str, status: int) -> Response:
    body = (f'<VOTABLE version="1.4"><RESOURCE type="results"><INFO name="QUERY_STATUS" value="ERROR">'
            f"{message}</INFO></RESOURCE></VOTABLE>")
    return Response(body, status_code=status, media_type="application/x-votable+xml")


def header_identity(request: Request):
    """Test identity: the X-User header names the caller; no header = anonymous."""
    return SimpleNamespace(name=request.headers.get("x-user") or None)


# ------------------------------------------------------------------------------------------------ service
@dataclass
class Service:
    url: str
    store: JobStore
    runner: JobRunner
    recorder: Recorder
    server: uvicorn.Server
    thread: threading.Thread
    clients: dict[str | None, httpx.Client] = field(default_factory=dict)

    @property
    def async_url(self) -> str:
        return f"{self.url}/tap/async"

    def client(self, user: str | None = None) -> httpx.Client:
        if user not in self.clients:
            headers = {"X-User": user} if user else {}
            self.clients[user] = httpx.Client(headers=headers, timeout=30.0)
        return self.clients[user]

    def create(self, user: str | None = None, files=None, **params) -> str:
        """POST a job; returns its URL (checking the 303)."""
        response = self.client(user).post(self.async_url, data=params, files=files)
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        assert location.startswith(self.async_url + "/")
        return location

    def job(self, url: str, user: str | None = None, **query):
        response = self.client(user).get(url, params=query)
        assert response.status_code == 200, response.text
        return etree.fromstring(response.content)

    def phase(self, url: str, user: str | None = None) -> str:
        return self.client(user).get(f"{url}/phase").text

    def wait_final(self, url: str, user: str | None = None, timeout: float = 10.0):
        """Block (with UWS WAIT) until the job is in a final phase."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            doc = self.job(url, user, WAIT=2)
            if doc.findtext(f"{UWS}phase") in ("COMPLETED", "ERROR", "ABORTED"):
                return doc
        raise AssertionError(f"{url} did not finish: {self.phase(url, user)}")

    def wait_phase(self, url: str, phase: str, user: str | None = None, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        current = self.phase(url, user)
        while current != phase:  # block until the phase is no longer the one we saw
            assert time.monotonic() < end, f"{url} never reached {phase}: {current}"
            current = self.job(url, user, WAIT=1, PHASE=current).findtext(f"{UWS}phase")


def start_service(tmp_path: Path, *, runner_options=None, router_options=None) -> Service:
    store = JobStore(tmp_path / "state" / "uws.sqlite")
    recorder = Recorder()
    options = dict(workers=2, queue_size=10, default_execution_duration=60, max_execution_duration=120,
                   destruction_interval=timedelta(days=1), max_destruction_interval=timedelta(days=2),
                   sweep_interval=0.2, poll_interval=0.2, heartbeat_interval=1.0)
    options.update(runner_options or {})
    runner = JobRunner(store, recorder, **options).start()
    app = FastAPI()
    app.include_router(make_async_router(store, runner, identity_dependency=header_identity,
                                         **(router_options or {})))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.02)
    return Service(f"http://127.0.0.1:{port}", store, runner, recorder, server, thread)


def stop_service(service: Service) -> None:
    for client in service.clients.values():
        client.close()
    service.server.should_exit = True
    service.thread.join(10)
    service.runner.stop()
    service.store.close()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """The shared service: callers are kept apart by their X-User, as the privacy rules promise."""
    service = start_service(
        tmp_path_factory.mktemp("uws"),
        router_options=dict(job_params_validator=require_something, error_renderer=votable_error,
                            max_wait=5.0, wait_poll_interval=30.0),
    )
    yield service
    stop_service(service)


@pytest.fixture
def solo(tmp_path):
    """One worker, plain-text errors, fast polling of changes made by other processes."""
    service = start_service(tmp_path, runner_options=dict(workers=1),
                            router_options=dict(max_wait=5.0, wait_poll_interval=0.2, max_upload_bytes=1000))
    yield service
    stop_service(service)


# ------------------------------------------------------------------------------------------------ tests
def test_create_run_wait_and_fetch_result(svc, uws_schema):
    url = svc.create("ann", NUMBERS="1,2,3.5", RUNID="my-run", PHASE="RUN")
    doc = svc.wait_final(url, "ann")
    assert doc.findtext(f"{UWS}phase") == "COMPLETED"
    response = svc.client("ann").get(url)
    doc = valid(uws_schema, response.content)
    assert response.headers["content-type"].startswith("application/xml")
    assert doc.get("version") == "1.1"
    assert doc.findtext(f"{UWS}jobId") == url.rsplit("/", 1)[1]
    assert doc.findtext(f"{UWS}runId") == "my-run"
    assert doc.findtext(f"{UWS}ownerId") == "ann"
    for name in ("creationTime", "startTime", "endTime", "destruction"):
        assert doc.find(f"{UWS}{name}").text.endswith("Z")
    assert doc.find(f"{UWS}quote").get(XSI_NIL) == "true"
    assert doc.findtext(f"{UWS}executionDuration") == "60"
    assert doc.findtext(f"{UWS}jobInfo/progress") == "numbers summed: all"
    params = {p.get("id"): p.text for p in doc.iter(f"{UWS}parameter")}
    assert params == {"NUMBERS": "1,2,3.5"}  # PHASE and RUNID drive the job, they are not parameters

    (result,) = doc.iter(f"{UWS}result")
    assert result.get("id") == "result"
    assert result.get("mime-type") == "text/plain"
    assert result.get("{urn:uwscustom}rows") == "1"
    assert result.get(f"{XLINK}href") == f"{url}/results/result"
    fetched = svc.client("ann").get(result.get(f"{XLINK}href"))
    assert fetched.status_code == 200
    assert fetched.text == "6.5\n"
    assert fetched.headers["content-type"].startswith("text/plain")
    assert int(result.get("size")) == len(fetched.content)

    parsed = parse_job(io.BytesIO(response.content))  # pyvo reads it, jobInfo included
    assert (parsed.jobid, parsed.runid, parsed.ownerid, parsed.phase) == (
        url.rsplit("/", 1)[1], "my-run", "ann", "COMPLETED")
    assert parsed.quote is None and parsed.executionduration.sec == 60
    assert parsed.results[0].mimetype == "text/plain"

    results = svc.client("ann").get(f"{url}/results")
    assert valid(uws_schema, results.content).tag == f"{UWS}results"
    parameters = svc.client("ann").get(f"{url}/parameters")
    assert valid(uws_schema, parameters.content).tag == f"{UWS}parameters"
    assert svc.client("ann").get(f"{url}/phase").text == "COMPLETED"
    assert svc.client("ann").get(f"{url}/owner").text == "ann"
    assert svc.client("ann").get(f"{url}/quote").text == ""
    assert svc.client("ann").get(f"{url}/executionduration").text == "60"
    assert svc.client("ann").get(f"{url}/results/nothing").status_code == 404


def test_parameters_change_only_while_pending(svc):
    url = svc.create("pat", NUMBERS="1,2")
    client = svc.client("pat")
    assert svc.phase(url, "pat") == "PENDING"
    # names are matched case-insensitively: "numbers" replaces NUMBERS; EXTRA is multi-valued
    response = client.post(f"{url}/parameters", data={"numbers": "3,4", "EXTRA": ["x", "y"], "RUNID": "r2"})
    assert response.status_code == 303 and response.headers["location"] == url
    assert client.get(f"{url}/parameters/NUMBERS").text == "3,4"
    assert client.get(f"{url}/parameters/extra").text == "x\ny"
    assert client.get(f"{url}/parameters/runid").text == "r2"
    assert client.get(f"{url}/parameters/absent").status_code == 404
    assert client.post(f"{url}/parameters/Numbers", data={"NUMBERS": "5,5"}).status_code == 303
    assert client.get(f"{url}/parameters/numbers").text == "5,5"
    assert client.post(url, data={"NUMBERS": "6,6"}).status_code == 303  # POST to the job sets them too
    doc = svc.job(url, "pat")
    assert doc.findtext(f"{UWS}runId") == "r2"
    assert [p.text for p in doc.iter(f"{UWS}parameter") if p.get("id").lower() == "numbers"] == ["6,6"]

    assert client.post(f"{url}/phase", data={"PHASE": "RUN"}).status_code == 303
    doc = svc.wait_final(url, "pat")
    assert doc.findtext(f"{UWS}phase") == "COMPLETED"
    assert client.get(f"{url}/results/result").text == "12\n"
    refused = client.post(f"{url}/parameters", data={"NUMBERS": "100"})
    assert refused.status_code == 400
    assert "PENDING" in refused.text
    assert client.post(f"{url}/parameters/NUMBERS", data={"NUMBERS": "100"}).status_code == 400
    assert client.post(url, data={"NUMBERS": "100"}).status_code == 400
    assert client.get(f"{url}/parameters/NUMBERS").text == "6,6"
    assert client.post(f"{url}/phase", data={"PHASE": "RUN"}).status_code == 400  # finished: cannot rerun


def test_abort_of_an_executing_job_calls_its_cancel_callbacks(svc, uws_schema):
    url = svc.create("abe", MODE="sleep", SECONDS="30", PHASE="RUN")
    svc.wait_phase(url, "EXECUTING", "abe")
    job_id = url.rsplit("/", 1)[1]
    started = time.monotonic()
    assert svc.client("abe").post(f"{url}/phase", data={"PHASE": "ABORT"}).status_code == 303
    doc = valid(uws_schema, svc.client("abe").get(url).content)
    assert doc.findtext(f"{UWS}phase") == "ABORTED"
    assert doc.find(f"{UWS}endTime").get(XSI_NIL) is None
    assert time.monotonic() - started < 2
    assert job_id in svc.recorder.cancelled
    assert svc.client("abe").get(f"{url}/results/result").status_code == 404
    # aborting again is harmless; PHASE values other than RUN/ABORT are refused
    assert svc.client("abe").post(f"{url}/phase", data={"PHASE": "ABORT"}).status_code == 303
    bad = svc.client("abe").post(f"{url}/phase", data={"PHASE": "SUSPEND"})
    assert bad.status_code == 400 and "RUN or ABORT" in bad.text
    assert svc.client("abe").post(f"{url}/phase").status_code == 400


def test_abort_of_a_queued_job_never_runs_it(solo):
    first = solo.create(MODE="sleep", SECONDS="30", PHASE="RUN")
    solo.wait_phase(first, "EXECUTING")
    second = solo.create(NUMBERS="1", PHASE="RUN")
    assert solo.phase(second) == "QUEUED"  # the only worker is busy
    assert solo.client().post(f"{second}/phase", data={"PHASE": "ABORT"}).status_code == 303
    assert solo.phase(second) == "ABORTED"
    solo.client().post(f"{first}/phase", data={"PHASE": "ABORT"})
    third = solo.create(NUMBERS="2,3", PHASE="RUN")
    assert solo.wait_final(third).findtext(f"{UWS}phase") == "COMPLETED"  # the worker is free again
    ids = [u.rsplit("/", 1)[1] for u in (first, second, third)]
    assert ids[0] in solo.recorder.started and ids[2] in solo.recorder.started
    assert ids[1] not in solo.recorder.started
    assert solo.phase(second) == "ABORTED"


def test_execution_duration_is_enforced(svc, uws_schema):
    started = time.monotonic()
    url = svc.create("eve", MODE="sleep", SECONDS="30", EXECUTIONDURATION="1", PHASE="RUN")
    doc = svc.wait_final(url, "eve")
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 5
    valid(uws_schema, etree.tostring(doc))
    assert doc.findtext(f"{UWS}phase") == "ERROR"
    assert doc.findtext(f"{UWS}executionDuration") == "1"
    summary = doc.find(f"{UWS}errorSummary")
    assert summary.get("type") == "fatal"
    assert summary.findtext(f"{UWS}message") == "the query exceeded its execution duration of 1 s"
    assert url.rsplit("/", 1)[1] in svc.recorder.cancelled

    # the service chooses: "unlimited" and too much both become the maximum; only before the run
    pending = svc.create("eve", NUMBERS="1", EXECUTIONDURATION="0")
    assert svc.client("eve").get(f"{pending}/executionduration").text == "120"
    assert svc.client("eve").post(f"{pending}/executionduration",
                                  data={"EXECUTIONDURATION": "30"}).status_code == 303
    assert svc.client("eve").get(f"{pending}/executionduration").text == "30"
    svc.client("eve").post(f"{pending}/executionduration", data={"EXECUTIONDURATION": "99999"})
    assert svc.client("eve").get(f"{pending}/executionduration").text == "120"
    assert svc.client("eve").post(f"{pending}/executionduration",
                                  data={"EXECUTIONDURATION": "soon"}).status_code == 400
    assert svc.client("eve").post(f"{url}/executionduration",
                                  data={"EXECUTIONDURATION": "30"}).status_code == 400


def test_errors_user_crash_document_and_validator(svc, uws_schema):
    client = svc.client("erin")
    user = svc.create("erin", MODE="sum", NUMBERS="one,two", PHASE="RUN")
    doc = svc.wait_final(user, "erin")
    valid(uws_schema, etree.tostring(doc))
    summary = doc.find(f"{UWS}errorSummary")
    assert doc.findtext(f"{UWS}phase") == "ERROR"
    assert summary.get("type") == "fatal" and summary.get("hasDetail") == "true"
    assert summary.findtext(f"{UWS}message") == "cannot sum 'one,two'"
    error = client.get(f"{user}/error")  # no document from the executor: the integrator's renderer
    assert error.status_code == 200
    assert error.headers["content-type"].startswith("application/x-votable+xml")
    assert "cannot sum" in error.text

    crash = svc.create("erin", MODE="crash", PHASE="RUN")
    message = svc.wait_final(crash, "erin").findtext(f"{UWS}errorSummary/{UWS}message")
    assert "disk on fire" in message and "internal error" in message
    assert "secret traceback detail" not in message

    documented = svc.create("erin", MODE="errordoc", PHASE="RUN")
    svc.wait_final(documented, "erin")
    error = client.get(f"{documented}/error")
    assert error.headers["content-type"].startswith("application/x-votable+xml")
    assert "QUERY_STATUS" in error.text

    done = svc.create("erin", NUMBERS="1", PHASE="RUN")
    svc.wait_final(done, "erin")
    assert client.get(f"{done}/error").status_code == 404

    # the validator refuses the job at creation: its status, the renderer's document, no job left behind
    before = len(etree.fromstring(client.get(svc.async_url).content))
    refused = client.post(svc.async_url, data={"LANG": "ADQL"})
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith("application/x-votable+xml")
    assert "missing QUERY" in refused.text
    assert len(etree.fromstring(client.get(svc.async_url).content)) == before
    assert client.post(svc.async_url, data={"NUMBERS": "1", "PHASE": "ABORT"}).status_code == 400


def test_plain_text_errors_and_upload_limit(solo):
    response = solo.client().get(f"{solo.async_url}/{'0' * 32}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/plain")
    assert "no job" in response.text
    too_big = solo.client().post(solo.async_url, data={"MODE": "upload", "UPLOAD": "t,param:f"},
                                 files={"f": ("f", b"x" * 2000)})
    assert too_big.status_code == 413 and "1000 bytes" in too_big.text
    assert solo.store.list(None) == []  # no half-made job left behind


def test_blocking_wait(svc):
    client = svc.client("walt")
    pending = svc.create("walt", NUMBERS="1")
    started = time.monotonic()
    assert svc.job(pending, "walt", WAIT=1).findtext(f"{UWS}phase") == "PENDING"
    assert 0.9 < time.monotonic() - started < 3

    # PHASE names the phase the client believes the job is in: a mismatch returns at once
    started = time.monotonic()
    svc.job(pending, "walt", WAIT=5, PHASE="EXECUTING")
    assert time.monotonic() - started < 0.8
    assert client.get(pending, params={"WAIT": "x"}).status_code == 400
    assert client.get(pending, params={"WAIT": 1, "PHASE": "NOPE"}).status_code == 400

    # a waiter wakes up when the phase changes, long before its WAIT is over
    box = {}

    def wait_for_it():
        t0 = time.monotonic()
        box["phase"] = svc.job(pending, "walt", WAIT=5, PHASE="PENDING").findtext(f"{UWS}phase")
        box["seconds"] = time.monotonic() - t0

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.5)
    client.post(f"{pending}/phase", data={"PHASE": "RUN"})
    waiter.join(10)
    assert box["phase"] in ("QUEUED", "EXECUTING", "COMPLETED")
    assert box["seconds"] < 3

    # a finished job never blocks
    svc.wait_final(pending, "walt")
    started = time.monotonic()
    svc.job(pending, "walt", WAIT=5)
    assert time.monotonic() - started < 0.8


def test_many_waiters_do_not_block_other_requests(svc):
    """80 clients blocked in WAIT (more than the 40-thread pool) while others are served at once."""
    url = svc.create("wendy", NUMBERS="1")
    waiting = httpx.Client(headers={"X-User": "wendy"}, timeout=20,
                           limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
    with waiting, ThreadPoolExecutor(80) as pool:
        futures = [pool.submit(lambda: waiting.get(url, params={"WAIT": 3}).status_code) for _ in range(80)]
        time.sleep(1.0)  # let them all block
        started = time.monotonic()
        listing = svc.client("wendy").get(svc.async_url)
        other = svc.create("wendy", NUMBERS="2", PHASE="RUN")
        assert listing.status_code == 200
        assert time.monotonic() - started < 1.5
        assert all(not f.done() for f in futures)
        assert [f.result() for f in futures] == [200] * 80
    assert svc.wait_final(other, "wendy").findtext(f"{UWS}phase") == "COMPLETED"


def test_job_list_filters(svc, uws_schema):
    client = svc.client("fil")
    pending1 = svc.create("fil", NUMBERS="1")
    time.sleep(0.01)
    completed = svc.create("fil", NUMBERS="1", PHASE="RUN")
    svc.wait_final(completed, "fil")
    time.sleep(0.01)
    pending2 = svc.create("fil", NUMBERS="2")
    time.sleep(0.01)
    failed = svc.create("fil", NUMBERS="oops", PHASE="RUN")
    svc.wait_final(failed, "fil")
    ids = {u.rsplit("/", 1)[1]: name for u, name in
           ((pending1, "p1"), (completed, "c"), (pending2, "p2"), (failed, "f"))}

    def listed(**query) -> list[str]:
        response = client.get(svc.async_url, params=query)
        assert response.status_code == 200, response.text
        doc = valid(uws_schema, response.content)
        for ref in doc:
            assert ref.get(f"{XLINK}href") == f"{svc.async_url}/{ref.get('id')}"
            assert ref.findtext(f"{UWS}ownerId") == "fil"
            assert ref.findtext(f"{UWS}creationTime").endswith("Z")
        return [ids[ref.get("id")] for ref in doc]

    assert listed() == ["p1", "c", "p2", "f"]
    assert listed(PHASE="PENDING") == ["p1", "p2"]
    assert listed(PHASE=["PENDING", "ERROR"]) == ["p1", "p2", "f"]
    assert listed(phase="COMPLETED") == ["c"]  # parameter names are case-insensitive
    created = datetime.fromisoformat(svc.job(completed, "fil").findtext(f"{UWS}creationTime"))
    assert listed(AFTER=(created + timedelta(milliseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%f")) == ["p2", "f"]
    assert listed(AFTER="2000-01-01") == ["p1", "c", "p2", "f"]
    assert listed(AFTER="2999") == []
    assert listed(LAST=2) == ["f", "p2"]  # the most recent, newest first
    assert listed(LAST=0) == []
    assert listed(LAST=1, PHASE="PENDING") == ["p2"]
    for bad in ({"PHASE": "pendingish"}, {"LAST": "-1"}, {"LAST": "many"}, {"AFTER": "yesterday"}):
        assert client.get(svc.async_url, params=bad).status_code == 400


def test_jobs_are_private_to_their_owner(svc):
    alice = svc.create("alice", NUMBERS="1")
    bob = svc.client("bob")
    for path in ("", "/phase", "/parameters", "/parameters/NUMBERS", "/results", "/error", "/owner",
                 "/quote", "/destruction", "/executionduration", "/results/result"):
        assert bob.get(alice + path).status_code == 404, path
    assert bob.get(alice, params={"WAIT": 1}).status_code == 404
    assert bob.post(f"{alice}/phase", data={"PHASE": "RUN"}).status_code == 404
    assert bob.post(f"{alice}/parameters", data={"NUMBERS": "2"}).status_code == 404
    assert bob.post(f"{alice}/destruction", data={"DESTRUCTION": "2030-01-01T00:00:00Z"}).status_code == 404
    assert bob.post(alice, data={"ACTION": "DELETE"}).status_code == 404
    assert bob.delete(alice).status_code == 404
    alice_id = alice.rsplit("/", 1)[1]
    assert alice_id not in bob.get(svc.async_url).text
    assert svc.phase(alice, "alice") == "PENDING"  # bob's RUN did nothing
    assert svc.client("alice").get(f"{alice}/parameters/NUMBERS").text == "1"

    anonymous = svc.create(None, NUMBERS="1")
    anonymous_id = anonymous.rsplit("/", 1)[1]
    anonymous_list = svc.client(None).get(svc.async_url).text
    assert anonymous_id in anonymous_list and alice_id not in anonymous_list
    assert anonymous_id not in svc.client("alice").get(svc.async_url).text
    assert svc.client("alice").get(anonymous).status_code == 404
    doc = svc.job(anonymous)
    assert doc.find(f"{UWS}ownerId").get(XSI_NIL) == "true"
    assert svc.client(None).get(f"{anonymous}/owner").text == ""
    assert svc.client(None).get(alice).status_code == 404


def test_delete_removes_the_job_and_its_files(svc):
    client = svc.client("dora")
    url = svc.create("dora", NUMBERS="4", PHASE="RUN")
    svc.wait_final(url, "dora")
    job_id = url.rsplit("/", 1)[1]
    folder = svc.store.job_dir(job_id)
    assert (folder / "results" / "sum.txt").is_file()
    response = client.delete(url)
    assert response.status_code == 303 and response.headers["location"] == svc.async_url
    assert client.get(url).status_code == 404
    assert not folder.exists()

    running = svc.create("dora", MODE="sleep", SECONDS="30", PHASE="RUN")
    svc.wait_phase(running, "EXECUTING", "dora")
    response = client.post(running, data={"ACTION": "DELETE"})
    assert response.status_code == 303 and response.headers["location"] == svc.async_url
    assert client.get(running).status_code == 404
    assert running.rsplit("/", 1)[1] in svc.recorder.cancelled
    kept = svc.create("dora", NUMBERS="1")
    assert client.post(kept, data={"ACTION": "EXPLODE"}).status_code == 400
    assert client.get(kept).status_code == 200


def test_destruction_time_and_sweep(svc):
    client = svc.client("dex")
    url = svc.create("dex", NUMBERS="1", PHASE="RUN")
    svc.wait_final(url, "dex")
    job_id = url.rsplit("/", 1)[1]
    default = datetime.fromisoformat(client.get(f"{url}/destruction").text)
    assert timedelta(hours=23) < default - datetime.now(UTC) <= timedelta(days=1)

    far = client.post(f"{url}/destruction", data={"DESTRUCTION": "2999-01-01T00:00:00Z"})
    assert far.status_code == 303
    clamped = datetime.fromisoformat(client.get(f"{url}/destruction").text)
    assert clamped - datetime.now(UTC) <= timedelta(days=2)  # the service's maximum
    assert client.post(f"{url}/destruction", data={"DESTRUCTION": "soon"}).status_code == 400

    soon = datetime.now(UTC) + timedelta(seconds=1)
    text = soon.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert client.post(f"{url}/destruction", data={"DESTRUCTION": text}).status_code == 303
    assert client.get(f"{url}/destruction").text == text
    assert svc.store.job_dir(job_id).exists()
    end = time.monotonic() + 6
    while client.get(url).status_code == 200:
        assert time.monotonic() < end, "the sweeper did not destroy the job"
        time.sleep(0.1)
    assert datetime.now(UTC) >= soon
    assert not svc.store.job_dir(job_id).exists()


def test_uploads_are_stored_with_the_job(svc):
    client = svc.client("ulla")
    files = {"f1": ("t1.vot", b"a\nb\nc\n"), "extra": ("x.txt", b"only\n")}
    url = svc.create("ulla", files=files, MODE="upload", UPLOAD="t1,param:f1", PHASE="RUN")
    svc.wait_final(url, "ulla")
    assert client.get(f"{url}/results/result").text == "None:1\nt1:3"
    job = svc.store.get(url.rsplit("/", 1)[1])
    assert {(u.table, u.source) for u in job.uploads} == {("t1", "param:f1"), (None, "param:extra")}
    assert all(job.resolve(u.path).is_file() for u in job.uploads)

    # uploads added later accumulate (pyvo's AsyncTAPJob.upload posts UPLOAD to /parameters)
    pending = svc.create("ulla", files={"f1": ("a", b"1\n")}, MODE="upload", UPLOAD="t1,param:f1")
    added = client.post(f"{pending}/parameters", data={"UPLOAD": "t2,param:g"},
                        files={"g": ("b", b"1\n2\n")})
    assert added.status_code == 303
    assert client.get(f"{pending}/parameters/UPLOAD").text == "t1,param:f1\nt2,param:g"
    client.post(f"{pending}/phase", data={"PHASE": "RUN"})
    svc.wait_final(pending, "ulla")
    assert client.get(f"{pending}/results/result").text == "t1:1\nt2:2"

    missing = client.post(svc.async_url, data={"MODE": "upload", "UPLOAD": "t1,param:nothere"},
                          files={"f1": ("a", b"1\n")})
    assert missing.status_code == 400 and "nothere" in missing.text
    malformed = client.post(svc.async_url, data={"MODE": "upload", "UPLOAD": "just-a-name"})
    assert malformed.status_code == 400


def test_pyvo_async_job_round_trip(svc, uws_schema):
    from pyvo.dal import DALQueryError
    from pyvo.dal.tap import AsyncTAPJob

    job = AsyncTAPJob.create(f"{svc.url}/tap", "SUM 1 2 3.25")
    assert job.phase == "PENDING"
    assert job.query == "SUM 1 2 3.25"
    job.run()
    job.wait(timeout=10)
    assert job.phase == "COMPLETED"
    assert job.uws_version == "1.1"
    table = job.fetch_result().to_table()
    assert float(table["total"][0]) == 6.25
    parsed = parse_job(io.BytesIO(svc.client().get(job.url).content))
    assert parsed.jobid == job.url.rsplit("/", 1)[1]
    assert parsed.phase == "COMPLETED"
    assert parsed.ownerid is None
    assert parsed.creationtime is not None and parsed.endtime >= parsed.starttime
    assert parsed.results[0].id_ == "result"
    assert parsed.results[0].href == f"{job.url}/results/result"
    assert [p.id_ for p in parsed.parameters] == ["REQUEST", "LANG", "QUERY"]
    job.delete()
    assert svc.client().get(parsed.results[0].href).status_code == 404

    failing = AsyncTAPJob.create(f"{svc.url}/tap", "SUM x y")
    failing.run()
    failing.wait(timeout=10)
    assert failing.phase == "ERROR"
    with pytest.raises(DALQueryError, match="cannot sum"):
        failing.raise_if_error()
    parsed = parse_job(io.BytesIO(svc.client().get(failing.url).content))
    assert parsed.errorsummary.message.content == "cannot sum 'x,y'"
    assert parsed.errorsummary.type_ == "fatal"

    listing = svc.client().get(svc.async_url).content
    valid(uws_schema, listing)
    jobs = parse_job_list(io.BytesIO(listing))
    assert failing.url.rsplit("/", 1)[1] in [j.jobid for j in jobs]
    failing.delete()


def test_restart_recovery_turns_running_jobs_into_errors(tmp_path):
    path = tmp_path / "uws.sqlite"
    first = JobStore(path)
    executing = first.create(owner_id="rita", parameters=[("NUMBERS", "1")]).job_id
    first.transition(executing, Phase.EXECUTING, start_time=datetime.now(UTC))
    queued = first.create(owner_id="rita", parameters=[("NUMBERS", "1")]).job_id
    first.transition(queued, Phase.QUEUED, runner_id="gone-host:1234:dead")
    pending = first.create(owner_id="rita").job_id
    completed = first.create(owner_id=None).job_id
    first.transition(completed, Phase.COMPLETED, end_time=datetime.now(UTC))
    first.close()  # the service "died" here

    second = JobStore(path)
    runner = JobRunner(second, Recorder(), sweep_interval=60).start()
    try:
        for job_id in (executing, queued):
            job = second.get(job_id, "rita")
            assert job.phase == Phase.ERROR
            assert job.error.message == RESTART_MESSAGE
            assert job.error.type == "transient"
            assert job.end_time is not None
            assert job.parameters.get("numbers") == "1"  # nothing lost: it can be resubmitted as is
        assert second.get(pending).phase == Phase.PENDING
        assert second.get(completed).phase == Phase.COMPLETED
    finally:
        runner.stop()
        second.close()


def test_other_processes_jobs_are_spared_and_cancelled_through_the_store(tmp_path):
    """Two runners on one file stand for two worker processes: B's start must not kill A's running job;
    an ABORT that reaches B is carried out by A, the process that runs the job."""
    path = tmp_path / "uws.sqlite"
    store_a, store_b = JobStore(path), JobStore(path)
    recorder = Recorder()
    runner_a = JobRunner(store_a, recorder, poll_interval=0.1, sweep_interval=0.2).start()
    runner_b = JobRunner(store_b, Recorder(), poll_interval=0.1, sweep_interval=0.2).start()
    try:
        job_id = store_a.create(owner_id=None, parameters=[("MODE", "sleep"), ("SECONDS", "30")]).job_id
        runner_a.run(job_id)
        end = time.monotonic() + 5
        while store_a.get(job_id).phase != Phase.EXECUTING:
            assert time.monotonic() < end
            time.sleep(0.02)
        store_c = JobStore(path)
        runner_c = JobRunner(store_c, Recorder()).start()  # a third process starting up...
        runner_c.stop()  # ...and shutting down: neither touches A's job
        store_c.close()
        time.sleep(0.5)  # several sweeps of B
        assert store_b.get(job_id).phase == Phase.EXECUTING
        assert runner_b.running_jobs() == []

        runner_b.abort(job_id)
        assert store_b.get(job_id).phase == Phase.ABORTED
        end = time.monotonic() + 3
        while job_id not in recorder.cancelled:
            assert time.monotonic() < end, "runner A never cancelled the job B aborted"
            time.sleep(0.02)
    finally:
        runner_a.stop()
        runner_b.stop()
        store_a.close()
        store_b.close()


def test_jobs_of_a_dead_process_do_not_stay_stuck(tmp_path):
    store = JobStore(tmp_path / "uws.sqlite")
    store.heartbeat("ghost:1:beef")  # a process that was alive a moment ago...
    job_id = store.create(owner_id=None).job_id
    store.transition(job_id, Phase.EXECUTING, runner_id="ghost:1:beef")
    runner = JobRunner(store, Recorder(), heartbeat_interval=0.1, sweep_interval=0.1).start()
    try:
        end = time.monotonic() + 5
        while store.get(job_id).phase != Phase.ERROR:  # ...and then stopped beating
            assert time.monotonic() < end, "the orphaned job stayed EXECUTING"
            time.sleep(0.05)
        assert store.get(job_id).error.message == RESTART_MESSAGE
    finally:
        runner.stop()

    # a process of this host that exited is known dead at once, without waiting for its heartbeat to age
    script = (
        "import sys; from api.uws.store import JobStore, Phase\n"
        "s = JobStore(sys.argv[1]); s.heartbeat('crashed:1:cafe')\n"
        "j = s.create(owner_id=None)\n"
        "s.transition(j.job_id, Phase.EXECUTING, runner_id='crashed:1:cafe'); print(j.job_id)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(store.path)], cwd=REPO, check=True,
                          capture_output=True, text=True)
    orphan = done.stdout.strip()
    runner = JobRunner(store, Recorder(), heartbeat_interval=60, sweep_interval=60).start()
    try:
        assert store.get(orphan).phase == Phase.ERROR
    finally:
        runner.stop()
        store.close()


def test_wait_sees_changes_made_by_another_process(solo):
    url = solo.create(NUMBERS="1")
    job_id = url.rsplit("/", 1)[1]
    box = {}

    def wait_for_it():
        box["phase"] = solo.job(url, WAIT=5).findtext(f"{UWS}phase")

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.3)
    other = JobStore(solo.store.path)  # another process's store: no in-process notification
    other.transition(job_id, Phase.ABORTED, expected={Phase.PENDING}, end_time=datetime.now(UTC))
    other.close()
    started = time.monotonic()
    waiter.join(10)
    assert box["phase"] == "ABORTED"
    assert time.monotonic() - started < 2


def test_store_is_safe_across_processes(tmp_path):
    path = tmp_path / "uws.sqlite"
    store = JobStore(path)
    script = (
        "import sys; from api.uws.store import JobStore\n"
        "s = JobStore(sys.argv[1])\n"
        "for i in range(40):\n"
        "    j = s.create(owner_id='proc', parameters=[('I', str(i))])\n"
        "    s.update_parameters(j.job_id, 'proc', [('I', str(i + 1))])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO)

    def create_many(n: int) -> None:
        own = JobStore(path)  # one store per thread: separate connections, as in other processes
        for i in range(n):
            j = own.create(owner_id="proc", parameters=[("I", str(i))])
            own.transition(j.job_id, Phase.ABORTED, expected={Phase.PENDING})
        own.close()

    threads = [threading.Thread(target=create_many, args=(40,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert child.wait(60) == 0
    jobs = store.list("proc")
    assert len(jobs) == 120
    assert len({j.job_id for j in jobs}) == 120
    assert sum(j.phase == Phase.ABORTED for j in jobs) == 80
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_parameters_and_expiry_in_the_store(tmp_path):
    store = JobStore(tmp_path / "uws.sqlite")
    params = Parameters([("Query", "a"), ("UPLOAD", "t1,param:x"), ("upload", "t2,param:y")])
    assert params.get("QUERY") == "a" and params.getall("Upload") == ["t1,param:x", "t2,param:y"]
    updated = params.updated([("query", "b"), ("UPLOAD", "t3,param:z")], accumulate={"upload"})
    assert updated.getall("QUERY") == ["b"]
    assert updated.getall("upload") == ["t1,param:x", "t2,param:y", "t3,param:z"]

    now = datetime.now(UTC)
    old = store.create(owner_id=None, destruction=now - timedelta(seconds=1)).job_id
    young = store.create(owner_id=None, destruction=now + timedelta(hours=1)).job_id
    assert store.expired(now) == [old]
    assert young in store.expired(now + timedelta(hours=2))
    assert format_timestamp(now) < format_timestamp(now + timedelta(microseconds=1))
    assert store.get("../../etc/passwd") is None
    store.close()
