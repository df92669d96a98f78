"""Operations over real HTTP: Prometheus metrics at /metrics and the JSON query log, from `dac serve`.

Each test counts what it sent (queries, rows received, outcomes) and checks that the scraped metrics moved by
exactly that much and that the query log has one line per query saying the same; the last test runs two
worker processes and checks that every scrape, whichever worker answers it, sums both.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from tests.service_fixtures import TEAM_TOKEN, Served, start_service, stop_service

UWS = "{http://www.ivoa.net/xml/UWS/v1.0}"
LOG_FIELDS = {
    "ts", "endpoint", "who", "job_id", "query", "query_truncated", "format", "maxrec", "status",
    "http_status", "duration_ms", "rows", "overflow", "files_read", "bytes_read", "rows_scanned", "error",
    "pid",
}  # fmt: skip
CONE = (
    "SELECT source_id, ra, dec FROM demo_survey.source "
    "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 180, 0, 1))"
)

BAD_ASYNC = "SELECT nosuch FROM demo_survey.source"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settled(base: str, done: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    """A scrape once `done` holds. The counters move when a response's last byte has gone, which can be a
    moment after the client has read it; the assertions that follow are exact either way."""
    deadline = time.monotonic() + timeout
    samples = scrape(base)
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(base)
    return samples


def log_lines(path: Path, count: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def sync(base: str, query: str, token: str | None = None, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(
        f"{base}/tap/sync", params={"LANG": "ADQL", "QUERY": query, **params}, headers=headers, timeout=60
    )


def csv_rows(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text[-500:]
    return len(r.text.strip().splitlines()) - 1


@pytest.fixture(scope="module")
def observed(service_lake, tmp_path_factory):
    """The service with its query log in a file of its own (DAC_SERVICE_QUERY_LOG)."""
    root = tmp_path_factory.mktemp("observed")
    query_log = root / "log" / "query.log"
    served = start_service(
        service_lake, root / "jobs", root / "service.log", {"DAC_SERVICE_QUERY_LOG": str(query_log)}
    )
    yield served, query_log
    stop_service(served)


def test_sync_queries_move_the_metrics_and_log_one_line_each(observed, service_lake):
    served, query_log = observed
    base = served.base
    before = scrape(base)
    lines_before = len(log_lines(query_log, 0, timeout=0))
    release = Lake(LakeStorage(service_lake.url)).release_info("demo_survey", "dr1")
    partitions = len(release.manifest["partitions"])

    top = "SELECT TOP 7 source_id FROM demo_survey.source ORDER BY source_id"
    count = "SELECT COUNT(*) AS n FROM demo_survey.source"
    received = {
        "top": csv_rows(sync(base, top, FORMAT="csv")),
        "count": csv_rows(sync(base, count, TEAM_TOKEN, FORMAT="csv")),
        "cone": csv_rows(sync(base, CONE, FORMAT="csv")),
        "overflow": csv_rows(sync(base, "SELECT source_id FROM demo_survey.source", MAXREC=25, FORMAT="csv")),
    }
    bad_column = sync(base, "SELECT nosuch FROM demo_survey.source")
    bad_cast = sync(base, "SELECT CAST(source_id AS SMALLINT) AS s FROM demo_survey.source")
    assert bad_column.status_code == 400 and bad_cast.status_code == 400
    assert received["top"] == 7 and received["count"] == 1 and received["overflow"] == 25
    assert received["cone"] > 0

    after = settled(base, lambda m: value(m, "dac_query_duration_seconds_count", endpoint="sync")
                    >= value(before, "dac_query_duration_seconds_count", endpoint="sync") + 6)  # fmt: skip

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dac_queries_total", endpoint="sync", status="ok") == 4
    assert delta("dac_queries_total", endpoint="sync", status="error") == 2
    assert delta("dac_queries_total", endpoint="sync", status="failed") == 0
    assert delta("dac_query_duration_seconds_count", endpoint="sync") == 6
    assert delta("dac_query_rows_total", endpoint="sync") == sum(received.values())
    assert delta("dac_http_requests_total", method="GET", route="/tap/sync", status="200") == 4
    assert delta("dac_http_requests_total", method="GET", route="/tap/sync", status="400") == 2
    assert delta("dac_queries_total", endpoint="async", status="ok") == 0

    lines = log_lines(query_log, lines_before + 6)[lines_before:]
    assert len(lines) == 6
    for line in lines:
        assert set(line) == LOG_FIELDS and line["endpoint"] == "sync" and line["duration_ms"] > 0
    top, count, cone, overflow, column, cast = lines
    assert top["query"].startswith("SELECT TOP 7") and top["who"] is None and top["rows"] == 7
    assert top["format"] == "csv" and top["status"] == "ok" and top["error"] is None
    # the full scan opens every partition of the release; the cone only those it touches
    assert count["who"] == "alice" and count["rows"] == 1 and count["files_read"] == partitions
    assert count["rows_scanned"] and count["rows_scanned"] >= 60_000
    assert 0 < cone["files_read"] < partitions and cone["rows"] == received["cone"] and cone["bytes_read"] > 0
    assert overflow["overflow"] is True and overflow["rows"] == 25 and overflow["maxrec"] == 25
    assert column["status"] == "error" and column["http_status"] == 400 and "nosuch" in column["error"]
    assert cast["status"] == "error" and "SMALLINT" in cast["query"] and "INT16" in cast["error"]
    # the log and the metrics tell the same story
    assert delta("dac_query_files_read_total", endpoint="sync") == sum(x["files_read"] for x in lines)
    assert delta("dac_query_bytes_read_total", endpoint="sync") == sum(x["bytes_read"] for x in lines)
    scanned = sum(x["rows_scanned"] or 0 for x in lines)
    assert delta("dac_query_rows_scanned_total", endpoint="sync") == scanned
    seconds = sum(x["duration_ms"] for x in lines) / 1000
    assert delta("dac_query_duration_seconds_sum", endpoint="sync") == pytest.approx(seconds, abs=0.01)


def test_async_jobs_are_logged_and_the_job_gauge_reads_the_store(observed):
    served, query_log = observed
    base = served.base
    before = scrape(base)
    lines_before = len(log_lines(query_log, 0, timeout=0))
    with httpx.Client(follow_redirects=False, timeout=30) as c:
        pending = c.post(f"{served.tap}/async", data={"LANG": "ADQL", "QUERY": "SELECT 1 AS x"})
        assert pending.status_code == 303
        urls = []
        for query in ("SELECT TOP 3 source_id FROM demo_survey.source", BAD_ASYNC):
            params = {"LANG": "ADQL", "QUERY": query, "PHASE": "RUN", "RESPONSEFORMAT": "csv"}
            r = c.post(f"{served.tap}/async", data=params)
            urls.append(r.headers["location"])
        phases = []
        for url in urls:
            deadline = time.monotonic() + 30
            phase = "QUEUED"
            while phase in ("PENDING", "QUEUED", "EXECUTING") and time.monotonic() < deadline:
                job = ET.fromstring(c.get(url, params={"WAIT": 10}).content)
                phase = job.find(f"{UWS}phase").text
            phases.append(phase)
        assert phases == ["COMPLETED", "ERROR"]
        result_rows = len(c.get(f"{urls[0]}/results/result").text.strip().splitlines()) - 1
        assert result_rows == 3

    after = settled(base, lambda m: value(m, "dac_query_duration_seconds_count", endpoint="async")
                    >= value(before, "dac_query_duration_seconds_count", endpoint="async") + 2)  # fmt: skip

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dac_queries_total", endpoint="async", status="ok") == 1
    assert delta("dac_queries_total", endpoint="async", status="error") == 1
    assert delta("dac_query_duration_seconds_count", endpoint="async") == 2
    assert delta("dac_query_rows_total", endpoint="async") == 3
    assert delta("dac_async_jobs", phase="PENDING") == 1
    assert delta("dac_async_jobs", phase="COMPLETED") == 1
    assert delta("dac_async_jobs", phase="ERROR") == 1
    assert value(after, "dac_async_jobs", phase="EXECUTING") == 0

    lines = log_lines(query_log, lines_before + 2)[lines_before:]
    assert [x["endpoint"] for x in lines] == ["async", "async"]
    ok, failed = sorted(lines, key=lambda x: x["status"] != "ok")
    assert ok["status"] == "ok" and ok["rows"] == 3 and ok["job_id"] == urls[0].rsplit("/", 1)[1]
    assert failed["status"] == "error" and failed["job_id"] == urls[1].rsplit("/", 1)[1]
    assert "nosuch" in failed["error"] and failed["query"] == BAD_ASYNC


def test_long_queries_are_cut_in_the_log_not_in_the_metrics(observed):
    served, query_log = observed
    lines_before = len(log_lines(query_log, 0, timeout=0))
    padding = " AND ".join(f"source_id <> {i}" for i in range(400))
    query = f"SELECT TOP 2 source_id FROM demo_survey.source WHERE {padding}"
    assert len(query) > 2000
    assert csv_rows(sync(served.base, query, FORMAT="csv")) == 2
    line = log_lines(query_log, lines_before + 1)[lines_before]
    assert line["query_truncated"] is True and len(line["query"]) == 2000 and query.startswith(line["query"])


def _start_workers(service_lake, root: Path, workers: int, env: dict[str, str]) -> Served:
    return start_service(service_lake, root / "jobs", root / "service.log", extra_env=env, workers=workers)


def test_worker_processes_share_their_metrics(service_lake, tmp_path):
    """`dac serve --workers 2` with PROMETHEUS_MULTIPROC_DIR: every scrape, whichever worker answers it, sums
    the queries of both (without the directory each worker would report only its own share)."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    query_log = tmp_path / "query.log"
    served = _start_workers(
        service_lake, tmp_path, 2,
        {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "DAC_SERVICE_QUERY_LOG": str(query_log)},
    )  # fmt: skip
    try:
        counts: list[int] = []
        lines: list[dict] = []
        with ThreadPoolExecutor(4) as pool:  # rounds of concurrent queries until both workers took some
            for _ in range(25):
                start = len(counts)
                counts += pool.map(lambda i: csv_rows(sync(served.base, f"SELECT TOP {i + 1} source_id "
                                                           "FROM demo_survey.source", FORMAT="csv")),
                                   range(start, start + 4))  # fmt: skip
                lines = log_lines(query_log, len(counts))
                if len({x["pid"] for x in lines}) == 2:
                    break
        queries = len(counts)
        assert counts == [i + 1 for i in range(queries)]
        assert len(lines) == queries and sorted(x["rows"] for x in lines) == counts
        pids = {x["pid"] for x in lines}
        assert len(pids) == 2, f"all {queries} queries went to one worker ({pids}): nothing to sum"

        def all_counted(m: Samples) -> bool:
            return value(m, "dac_queries_total", endpoint="sync", status="ok") >= queries

        scrapes = [settled(served.base, all_counted) for _ in range(6)]
        for samples in scrapes:
            assert value(samples, "dac_queries_total", endpoint="sync", status="ok") == queries
            assert value(samples, "dac_query_duration_seconds_count", endpoint="sync") == queries
            assert value(samples, "dac_query_rows_total", endpoint="sync") == sum(counts)
            assert value(samples, "dac_http_requests_in_progress") == 1  # the scrape itself
        assert len(list(metrics_dir.glob("counter_*.db"))) == 2  # one file per worker process
    finally:
        stop_service(served)


def test_a_client_that_leaves_mid_result_is_logged_as_cancelled(observed):
    served, query_log = observed
    before = scrape(served.base)
    lines_before = len(log_lines(query_log, 0, timeout=0))
    # ~200,000 rows of TABLEDATA (tens of MB): far more than the sockets buffer, so the server is still
    # writing when the client goes
    query = (
        "SELECT a.source_id, a.ra, b.source_id AS other FROM demo_survey.source AS a, demo_survey.source AS b"
    )
    params = {"LANG": "ADQL", "QUERY": query, "MAXREC": 200_000, "RESPONSEFORMAT": "votable/td"}
    received = 0
    with httpx.stream("GET", f"{served.tap}/sync", params=params, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes():  # some rows, then go
            received += len(chunk)
            if received > 200_000:
                break
    assert received > 200_000
    lines = log_lines(query_log, lines_before + 1, timeout=10)[lines_before:]
    assert len(lines) == 1
    line = lines[0]
    assert line["status"] == "cancelled" and "closed the connection" in line["error"], line
    assert 0 < line["rows"] < 200_000 and line["http_status"] == 200
    after = settled(
        served.base,
        lambda m: (
            value(m, "dac_queries_total", endpoint="sync", status="cancelled")
            > value(before, "dac_queries_total", endpoint="sync", status="cancelled")
        ),
    )
    assert (
        value(after, "dac_queries_total", endpoint="sync", status="cancelled")
        - value(before, "dac_queries_total", endpoint="sync", status="cancelled")
        == 1
    )


def test_io_log_setting_measures_the_bytes_of_full_scans(service_lake, tmp_path):
    """Without `[service] io_log` a DuckDB full scan reports its files but no bytes (only reads the service
    makes itself are measured); with `DAC_SERVICE_IO_LOG=true` DuckDB's read log gives the bytes, and the
    query log and the metrics agree on them."""
    query_log = tmp_path / "query.log"
    served = start_service(
        service_lake,
        tmp_path / "jobs",
        tmp_path / "service.log",
        {"DAC_SERVICE_QUERY_LOG": str(query_log), "DAC_SERVICE_IO_LOG": "true"},
    )
    try:
        count = "SELECT COUNT(*) AS n, AVG(r_mag) AS r FROM demo_survey.source"
        assert csv_rows(sync(served.base, count, FORMAT="csv")) == 1
        line = log_lines(query_log, 1)[0]
        files = sorted(Path(service_lake.url).rglob("demo_survey/dataset/**/*.parquet"))
        total = sum(f.stat().st_size for f in files)
        # the footers and the two columns' pages of every partition: more than nothing, less than the files
        assert line["files_read"] == len(files) and 0 < line["bytes_read"] < total
        samples = scrape(served.base)
        assert samples[("dac_query_bytes_read_total", (("endpoint", "sync"),))] == line["bytes_read"]
    finally:
        stop_service(served)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("off", False), ("True", True)])
def test_boolean_service_settings_from_the_environment(value, expected):
    from api.config import ServiceSettings
    from dac_lake.settings import Settings

    assert ServiceSettings.from_settings(Settings(), {"DAC_SERVICE_IO_LOG": value}).io_log is expected
    with pytest.raises(ValueError, match="io_log"):
        ServiceSettings.from_settings(Settings(), {"DAC_SERVICE_IO_LOG": "maybe"})
