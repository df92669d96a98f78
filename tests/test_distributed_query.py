"""Big async queries as per-partition tasks on a real Dask cluster (`dask scheduler` + two `dask worker`
processes on 127.0.0.1): the distributed result equals the one-machine result for full scans, two-phase
aggregates, ORDER BY/TOP merges, DISTINCT, all-sky cross-matches (with margins), outer joins and upload
cross-matches; what cannot be split stays on one machine with a reason; the TAP service sends big async jobs
to the cluster (`[service] dask_scheduler`) and their VOTables equal the sync answers."""

from __future__ import annotations

import json
import math
import time
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pyarrow as pa
import pytest

from dac_lake.adql.model import ColumnMeta, TableMeta
from dac_lake.engine import MemoryTable, QueryControl, QueryEngine
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from tests.dask_fixtures import Cluster
from tests.service_fixtures import start_service, stop_service

distributed = pytest.importorskip("distributed", reason="the `distributed` package is not importable")

CHUNK_ROWS = 6_000  # demo_survey: 60,000 rows in partitions of at most 4,000 -> about 10-15 tasks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask-query"))
    c.pause_file.write_text("disarmed\n")
    try:
        c.add_worker("q1", threads=2)
        c.add_worker("q2", threads=2)
        c.connect(2, modules=("dac_lake.distributed.tasks",))
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def engine(service_lake):
    e = QueryEngine(Lake(LakeStorage(service_lake.url)), frozenset({"public", "team"}))
    yield e
    e.close()


@pytest.fixture(scope="module")
def dask_queries(cluster, service_lake):
    from dac_lake.distributed.executor import DaskQueries

    dq = DaskQueries(cluster.address, service_lake.url, min_rows=1_000, chunk_rows=CHUNK_ROWS)
    yield dq
    dq.close()


def _run_both(engine, dask_queries, adql: str, maxrec: int | None = 100_000, memory=()):
    """(one-machine result, distributed stream, its table)."""
    from dac_lake.distributed.executor import DistributedPlan

    local = engine.adql(adql, maxrec=maxrec, memory_tables=memory)
    translation = engine.translate(adql, maxrec, memory)
    plan = dask_queries.plan(engine, translation, memory)
    assert isinstance(plan, DistributedPlan), f"not distributed: {plan}"
    assert len(plan.chunks) >= 3
    control = QueryControl()
    stream = dask_queries.run(engine, plan, memory, maxrec=maxrec, timeout_s=120, control=control)
    with stream:
        table = pa.Table.from_batches(list(stream), schema=stream.schema)
    assert control.tasks_done == control.tasks_total == len(plan.chunks) or plan.split.early_stop_rows
    assert stream.overflow == local.overflow
    return local, stream, table


def _rows(table: pa.Table) -> list[tuple]:
    cols = [c.to_pylist() for c in table.columns]
    return list(zip(*cols, strict=True))


def _same(a: pa.Table, b: pa.Table, ordered: bool, rel: float = 1e-9) -> None:
    assert a.schema.names == b.schema.names
    assert a.schema.types == b.schema.types
    ra, rb = _rows(a), _rows(b)
    if not ordered:
        key = lambda r: tuple((x is None, x if x is not None else 0) for x in r)  # noqa: E731
        ra, rb = sorted(ra, key=key), sorted(rb, key=key)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for u, v in zip(x, y, strict=True):
            if isinstance(u, float) and isinstance(v, float):
                assert (math.isnan(u) and math.isnan(v)) or math.isclose(u, v, rel_tol=rel, abs_tol=1e-12)
            else:
                assert u == v


SURVEY = "demo_survey.source"
XMATCH = "demo_xmatch.source"
QUERIES = {
    "count": (f"SELECT COUNT(*) AS n FROM {SURVEY}", False),
    "count_where_nothing": (f"SELECT COUNT(*) AS n FROM {SURVEY} WHERE g_mag > 1000", False),
    "group_having_order": (
        f"SELECT flags, COUNT(*) AS n, AVG(r_mag) AS mean_r, MIN(g_mag) AS lo, MAX(i_mag) AS hi, "
        f"SUM(parallax) AS s FROM {SURVEY} GROUP BY flags HAVING COUNT(*) > 10 ORDER BY n DESC, flags",
        True,
    ),
    "group_expression": (
        f"SELECT FLOOR(r_mag) AS bin, COUNT(*) AS n, AVG(pm_ra) AS pm FROM {SURVEY} "
        "GROUP BY FLOOR(r_mag) ORDER BY bin",
        True,
    ),
    "top_order": (
        f"SELECT TOP 25 source_id, ra, dec, r_mag FROM {SURVEY} ORDER BY r_mag DESC, source_id",
        True,
    ),
    "top_order_hidden_column": (f"SELECT TOP 40 source_id FROM {SURVEY} ORDER BY epoch, source_id", True),
    "offset": (f"SELECT source_id, g_mag FROM {SURVEY} ORDER BY source_id OFFSET 59950", True),
    "distinct": (f"SELECT DISTINCT flags, extended FROM {SURVEY}", False),
    "full_scan_filter": (
        f"SELECT source_id, ra, dec FROM {SURVEY} WHERE r_mag BETWEEN 17 AND 17.2 AND flags = 0",
        False,
    ),
    "region": (
        f"SELECT COUNT(*) AS n, AVG(g_mag) AS g FROM {SURVEY} "
        "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 270, -30, 40))",
        False,
    ),
    "crossmatch_all_sky": (
        f"SELECT s.source_id, x.obj_id, DISTANCE(POINT('ICRS', s.ra, s.dec), POINT('ICRS', x.ra, x.dec)) "
        f"AS d FROM {SURVEY} AS s JOIN {XMATCH} AS x "
        "ON 1 = CONTAINS(POINT('ICRS', s.ra, s.dec), CIRCLE('ICRS', x.ra, x.dec, 2.0 / 3600))",
        False,
    ),
    "crossmatch_aggregate": (
        f"SELECT s.flags, COUNT(*) AS pairs, AVG(s.r_mag - x.j_mag) AS colour FROM {SURVEY} AS s "
        f"JOIN {XMATCH} AS x ON DISTANCE(POINT('ICRS', s.ra, s.dec), POINT('ICRS', x.ra, x.dec)) "
        "< 2.0 / 3600 "
        "GROUP BY s.flags ORDER BY s.flags",
        True,
    ),
    "crossmatch_left_join": (
        f"SELECT s.source_id, x.obj_id FROM {SURVEY} AS s LEFT JOIN {XMATCH} AS x "
        "ON 1 = CONTAINS(POINT('ICRS', s.ra, s.dec), CIRCLE('ICRS', x.ra, x.dec, 1.0 / 3600)) "
        "WHERE s.r_mag < 16",
        False,
    ),
    "crossmatch_wide_radius_top": (
        f"SELECT TOP 100 s.source_id, x.obj_id, "
        "DISTANCE(POINT('ICRS', s.ra, s.dec), POINT('ICRS', x.ra, x.dec)) AS d "
        f"FROM {SURVEY} AS s JOIN {XMATCH} AS x "
        "ON 1 = CONTAINS(POINT('ICRS', s.ra, s.dec), CIRCLE('ICRS', x.ra, x.dec, 0.05)) "
        "WHERE s.r_mag < 15 ORDER BY d, s.source_id, x.obj_id",
        True,
    ),
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_distributed_result_equals_one_machine(engine, dask_queries, name):
    adql, ordered = QUERIES[name]
    local, stream, table = _run_both(engine, dask_queries, adql)
    assert local.table.num_rows > 0 or name == "count_where_nothing"
    _same(local.table, table, ordered)
    assert [c.name for c in stream.columns] == [c.name for c in local.columns]
    profile = stream.profile
    assert profile["tasks_run"] == profile["tasks"]
    if name in ("count", "crossmatch_all_sky", "group_having_order"):
        assert len(profile["workers"]) == 2, profile["workers"]  # both workers took part


def test_crossmatch_tasks_read_only_their_margin(engine, dask_queries):
    """Each task of an all-sky cross-match reads the other catalog's files near its chunk only, yet every
    pair is found once (a pair straddling two chunks is not lost nor doubled)."""
    adql, _ = QUERIES["crossmatch_all_sky"]
    translation = engine.translate(adql, 100_000)
    plan = dask_queries.plan(engine, translation)
    other = next(r for r in plan.scans if r != plan.partitioned)
    total_other = len(plan.scans[other].files)
    lt = plan.pinned[other]
    from dac_lake.coverage import partitions_touching

    per_task = [len(partitions_touching(lt.manifest["partitions"], c.restrict[other])) for c in plan.chunks]
    # all-sky chunks touch many partner partitions (low-order partitions are large), but not all of them
    assert sum(per_task) < 0.7 * len(per_task) * total_other, (per_task, total_other)
    assert min(per_task) <= total_other // 2
    local, _, table = _run_both(engine, dask_queries, adql)
    pairs = _rows(table.select(["source_id", "obj_id"]))
    assert len(pairs) == len(set(pairs)) == local.table.num_rows


def test_maxrec_overflow_matches(engine, dask_queries):
    adql = f"SELECT source_id, r_mag FROM {SURVEY} WHERE r_mag < 19"
    local, stream, table = _run_both(engine, dask_queries, adql, maxrec=500)
    assert local.overflow and stream.overflow and table.num_rows == 500
    # an unordered result may be any 500 rows: they must be rows of the query
    allowed = set(_rows(engine.adql(adql, maxrec=100_000).table))
    assert set(_rows(table)) <= allowed


def _upload(n: int, seed: int, engine) -> MemoryTable:
    """Positions of survey sources, jittered by < 1 arcsec, plus unrelated ones."""
    rng = np.random.default_rng(seed)
    survey = engine.adql(f"SELECT ra, dec FROM {SURVEY} WHERE r_mag < 21", maxrec=100_000).table
    pick = rng.choice(survey.num_rows, n // 2, replace=False)
    ra = np.concatenate(
        [survey["ra"].to_numpy()[pick] + rng.normal(0, 1e-4, n // 2), rng.uniform(0, 360, n - n // 2)]
    )
    dec = np.concatenate([survey["dec"].to_numpy()[pick], rng.uniform(-90, 30, n - n // 2)])
    meta = TableMeta(
        "TAP_UPLOAD",
        "mine",
        (
            ColumnMeta("tag", "int64"),
            ColumnMeta("ra", "float64", "deg", "pos.eq.ra;meta.main"),
            ColumnMeta("dec", "float64", "deg", "pos.eq.dec;meta.main"),
        ),
        "ra",
        "dec",
    )
    return MemoryTable(meta, pa.table({"tag": np.arange(n), "ra": ra % 360, "dec": dec}))


def test_upload_crossmatch_is_sliced_per_task(engine, dask_queries):
    upload = _upload(3_000, 11, engine)
    adql = (
        "SELECT u.tag, s.source_id FROM TAP_UPLOAD.mine AS u JOIN demo_survey.source AS s "
        "ON 1 = CONTAINS(POINT('ICRS', u.ra, u.dec), CIRCLE('ICRS', s.ra, s.dec, 1.0 / 3600))"
    )
    translation = engine.translate(adql, 100_000, [upload])
    plan = dask_queries.plan(engine, translation, [upload])
    sizes = [sum(m.table.num_rows for m in c.memory) for c in plan.chunks]
    assert plan.broadcast == [] and 0 < max(sizes) < upload.table.num_rows
    local, _, table = _run_both(engine, dask_queries, adql, memory=[upload])
    assert local.table.num_rows > 1000
    _same(local.table, table, ordered=False)


@pytest.mark.parametrize(
    ("adql", "reason"),
    [
        (f"SELECT COUNT(DISTINCT flags) AS n FROM {SURVEY}", "DISTINCT"),
        (f"SELECT source_id FROM {SURVEY} UNION SELECT obj_id FROM {XMATCH}", ""),
        (f"SELECT COUNT(*) AS n FROM {SURVEY} WHERE r_mag > (SELECT AVG(r_mag) FROM {SURVEY})", ""),
        # both sides large and not positionally matched: a task would read all of the other table
        (
            f"SELECT COUNT(*) AS n FROM {SURVEY} AS a JOIN {SURVEY} AS b ON a.source_id = b.source_id",
            "every task",
        ),
    ],
)
def test_what_cannot_be_split_stays_on_one_machine(engine, dask_queries, adql, reason):
    translation = engine.translate(adql, 1000)
    plan = dask_queries.plan(engine, translation)
    assert isinstance(plan, str) and plan, plan
    assert reason.lower() in plan.lower()


def test_small_queries_stay_in_the_service(engine, cluster, service_lake):
    from dac_lake.distributed.executor import DaskQueries

    dq = DaskQueries(cluster.address, service_lake.url, min_rows=10_000_000)
    try:
        plan = dq.plan(engine, engine.translate(f"SELECT COUNT(*) FROM {SURVEY}", 10))
        assert isinstance(plan, str) and "below" in plan
    finally:
        dq.close()


def test_unreachable_cluster_is_a_clear_error(engine, service_lake):
    from dac_lake.distributed.executor import DaskQueries, QueryUnavailable

    dq = DaskQueries("tcp://127.0.0.1:9", service_lake.url, min_rows=0, connect_timeout=2)
    with pytest.raises(QueryUnavailable, match="cannot be reached"):
        dq.plan(engine, engine.translate(f"SELECT COUNT(*) FROM {SURVEY}", 10))
    dq.close()


def test_workers_that_cannot_read_the_lake_give_a_clear_error(engine, cluster, tmp_path):
    """A misconfigured cluster (its workers see no lake at the URL the service gives them) fails the job
    with a message for the operators, not a traceback or a 'bug' error."""
    from dac_lake.distributed.executor import DaskQueries, QueryUnavailable

    dq = DaskQueries(cluster.address, str(tmp_path / "no-lake-here"), min_rows=0, chunk_rows=CHUNK_ROWS)
    try:
        adql = f"SELECT COUNT(*) AS n FROM {SURVEY}"
        plan = dq.plan(engine, engine.translate(adql, 10))
        with pytest.raises(QueryUnavailable, match="failed on the Dask cluster"):
            dq.run(engine, plan, maxrec=10, timeout_s=60)
    finally:
        dq.close()


def test_cancel_stops_the_tasks(engine, dask_queries):
    """A cancel (ABORT of the async job) during the tasks ends the query with QueryCancelled and cancels
    what the cluster still holds."""
    import threading

    from dac_lake.engine import QueryCancelled

    adql, _ = QUERIES["crossmatch_wide_radius_top"]
    plan = dask_queries.plan(engine, engine.translate(adql, 1000))
    control = QueryControl()
    threading.Timer(0.05, control.cancel).start()
    t0 = time.perf_counter()
    with pytest.raises(QueryCancelled):
        dask_queries.run(engine, plan, maxrec=1000, timeout_s=120, control=control)
    assert time.perf_counter() - t0 < 30


# ---------------------------------------------------------------------------------------------- TAP service
NS = {"v": "http://www.ivoa.net/xml/VOTable/v1.3"}


def _tsv(response: httpx.Response) -> list[list[str]]:
    assert response.status_code == 200, response.text[:2000]
    lines = response.text.strip("\n").split("\n")
    return [line.split("\t") for line in lines]


@pytest.fixture(scope="module")
def served_with_dask(service_lake, cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-dask")
    env = {
        "DAC_SERVICE_DASK_SCHEDULER": cluster.address,
        "DAC_SERVICE_DASK_MIN_ROWS": "20000",
        "DAC_SERVICE_DASK_CHUNK_ROWS": str(CHUNK_ROWS),
        "DAC_SERVICE_QUERY_LOG": str(root / "query.log"),
    }
    s = start_service(service_lake, root / "jobs", root / "service.log", extra_env=env)
    yield s, root
    stop_service(s)


def _async(base: str, adql: str, fmt: str = "tsv") -> httpx.Response:
    with httpx.Client(base_url=base, timeout=120, follow_redirects=False) as client:
        r = client.post(
            "/tap/async",
            data={"REQUEST": "doQuery", "LANG": "ADQL", "QUERY": adql, "FORMAT": fmt, "PHASE": "RUN"},
        )
        assert r.status_code == 303, r.text
        job = r.headers["location"]
        deadline = time.monotonic() + 120
        while True:
            phase = client.get(f"{job}/phase").text.strip()
            if phase in ("COMPLETED", "ERROR", "ABORTED"):
                break
            assert time.monotonic() < deadline, f"job still {phase}"
            client.get(job, params={"WAIT": "10", "PHASE": phase})
        assert phase == "COMPLETED", client.get(f"{job}/error").text
        return client.get(f"{job}/results/result")


@pytest.mark.parametrize("name", ["group_having_order", "crossmatch_aggregate", "top_order"])
def test_async_job_on_the_cluster_equals_sync(served_with_dask, name):
    served, root = served_with_dask
    adql, ordered = QUERIES[name]
    sync = _tsv(
        httpx.post(
            f"{served.tap}/sync",
            data={"REQUEST": "doQuery", "LANG": "ADQL", "QUERY": adql, "FORMAT": "tsv"},
            timeout=120,
        )
    )
    dist = _tsv(_async(served.base, adql))
    assert dist[0] == sync[0]  # header
    body_s, body_d = sync[1:], dist[1:]
    if not ordered:
        body_s, body_d = sorted(body_s), sorted(body_d)
    assert len(body_d) == len(body_s) > 0
    for a, b in zip(body_s, body_d, strict=True):
        for x, y in zip(a, b, strict=True):
            try:
                assert math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12) or x == y
            except ValueError:
                assert x == y
    records = [json.loads(line) for line in (root / "query.log").read_text().splitlines()]
    mine = [r for r in records if r["query"] == " ".join(adql.split())]
    assert {r["endpoint"] for r in mine} == {"sync", "async"}
    for r in mine:  # the sync query ran in the service, the async job on the cluster
        assert r.get("executor") == ("dask" if r["endpoint"] == "async" else None), r
        assert r["status"] == "ok" and r["rows_scanned"] >= 60_000
    assert next(r for r in mine if r["endpoint"] == "async")["dask_tasks"] >= 3


def test_async_votable_from_the_cluster_has_the_same_fields(served_with_dask):
    served, _ = served_with_dask
    adql = QUERIES["group_having_order"][0]
    sync = httpx.post(
        f"{served.tap}/sync", data={"REQUEST": "doQuery", "LANG": "ADQL", "QUERY": adql}, timeout=120
    )
    dist = _async(served.base, adql, fmt="votable")

    def fields(text: bytes):
        root = ET.fromstring(text)
        return [dict(f.attrib) for f in root.iter("{http://www.ivoa.net/xml/VOTable/v1.3}FIELD")]

    assert fields(sync.content) == fields(dist.content)


@pytest.mark.s3
def test_distributed_queries_on_the_ceph_lake(cluster, service_lake):
    """Workers read an S3 lake (the real Ceph RGW) with their own settings: the distributed aggregate and
    cross-match equal the one-machine answers there too."""
    import os

    from dac_lake.catalog_def import load_definition
    from dac_lake.distributed.executor import DaskQueries
    from dac_lake.settings import load_settings
    from ingest.release import IngestOptions, ingest_release
    from tests.conftest import S3_SKIP_REASON, _drop_bucket, s3_available

    if not s3_available():
        pytest.skip(S3_SKIP_REASON)
    bucket = f"dac-test-dq-{os.getpid()}-{int(time.time())}"
    lake = Lake(LakeStorage(f"s3://{bucket}/lake", load_settings()))
    lake.init()
    opts = IngestOptions(max_rows_per_partition=4000, margin_arcsec=10, validate_with_lsdb=False)
    e = dq = None
    try:
        for catalog in ("demo_survey", "demo_xmatch"):
            ingest_release(lake, catalog, "dr1", service_lake.inputs[catalog], load_definition(catalog), opts)
        e = QueryEngine(lake, frozenset({"public"}))
        dq = DaskQueries(cluster.address, lake.storage.url, min_rows=1_000, chunk_rows=CHUNK_ROWS)
        for name in ("group_having_order", "crossmatch_all_sky"):
            adql, ordered = QUERIES[name]
            local, _, table = _run_both(e, dq, adql)
            assert local.table.num_rows > 0
            _same(local.table, table, ordered)
    finally:
        if dq is not None:
            dq.close()
        if e is not None:
            e.close()
        _drop_bucket(lake.storage, bucket)


def test_pyvo_async_job_on_the_cluster(served_with_dask, engine):
    """pyvo's run_async (submit, wait, fetch the VOTable) against the service whose big jobs go to the
    cluster: the all-sky cross-match comes back whole and equal to the one-machine pairs."""
    import pyvo

    served, root = served_with_dask
    adql, _ = QUERIES["crossmatch_all_sky"]
    result = pyvo.dal.TAPService(served.tap).run_async(adql, maxrec=100_000).to_table()
    pairs = sorted(zip(result["source_id"].tolist(), result["obj_id"].tolist(), strict=True))
    local = engine.adql(adql, maxrec=100_000).table
    expected = sorted(zip(local["source_id"].to_pylist(), local["obj_id"].to_pylist(), strict=True))
    assert pairs == expected and len(pairs) > 1000
    records = [json.loads(line) for line in (root / "query.log").read_text().splitlines()]
    assert any(r.get("executor") == "dask" and r["query"] == " ".join(adql.split()) for r in records)


def test_notebook_session_runs_queries_on_the_cluster(cluster, service_lake):
    """`dac_lake.connect(...).adql(text, dask=ADDRESS)` and `.crossmatch(..., dask=ADDRESS)`: a notebook
    user sends a big query to the cluster and gets the one-machine answer; an unsplittable one runs in
    the notebook, with the same answer."""
    import dac_lake

    session = dac_lake.connect(service_lake.url)
    try:
        adql, ordered = QUERIES["crossmatch_aggregate"]
        local = session.adql(adql)
        remote = session.adql(adql, dask=cluster.address)
        assert session.last_result.profile["tasks_run"] >= 3  # it ran on the cluster
        _same(local, remote, ordered)
        pairs = session.crossmatch("demo_survey", "demo_xmatch", 2.0, dask=cluster.address)
        assert session.last_result.profile.get("tasks_run", 0) >= 3
        assert pairs.num_rows == session.crossmatch("demo_survey", "demo_xmatch", 2.0).num_rows > 1000
        odd = f"SELECT COUNT(DISTINCT flags) AS n FROM {SURVEY}"
        via = session.adql(odd, dask=cluster.address)
        assert "tasks_run" not in session.last_result.profile  # COUNT(DISTINCT): ran here
        assert via.equals(session.adql(odd))
    finally:
        session.close()
