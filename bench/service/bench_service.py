"""Benchmark: the TAP service under load, with a runaway query, and killed in the middle of its async jobs.

The query benchmark (bench/query) shows the engine is fast on one query at a time. A Data Access Centre is
judged on something else: many users at once, some of whom write the query that never ends, on a service
that is sometimes killed (OOM killer, a node reboot, a deploy). The issue's targets for the service are:

* 50 concurrent clients for 60 s, mixing cone searches, small queries and aggregates: **0 server errors**
  (5xx, dropped connections, truncated streams), throughput and p50/p99 latency reported;
* a runaway query is **stopped at its limit** (sync: the DALI error at `sync_timeout_s`; async: ERROR at its
  EXECUTIONDURATION) while the other clients keep being served;
* killing the service (SIGKILL, no clean shutdown) in the middle of async work **loses no job record**:
  finished jobs stay COMPLETED with their result, pending ones stay PENDING and can still run, running ones
  end in ERROR saying the service restarted.

One run of this script, against a real `dac serve` (uvicorn workers, the real job store) on 127.0.0.1:

1. builds the demo lake (`dac demo`, `--rows`) under `--work-dir`, or re-uses it; writes a config file
   (`sync_timeout_s` 10 s so the runaway test is quick, a static API token for the job owner) and starts
   `dac serve --workers N` as a subprocess in its own process group on a free port;
2. **load**: `--clients` asyncio clients (httpx) for `--seconds`, each looping over a weighted mix: cones
   through `/tap/sync` (ADQL CONTAINS, the exact text `Session.cone` generates) and `/scs/<catalog>` at
   random centres inside the survey footprint, small queries (TOP 100 with a magnitude filter, TAP_SCHEMA
   look-ups) and aggregates (GROUP BY over a band of declination, and over the full table). Every response
   is checked cheaply (status, a VOTable that ends, `QUERY_STATUS` OK) and every `--sample-every`-th one is
   parsed fully with astropy (`verify='exception'`) after the phase and checked for content (cone rows
   inside the circle and sorted by distance, TOP honoured, filters honoured);
3. **peer**: the same cones run sequentially through the Python API (`dac_lake.connect(lake).cone`) in
   this process and through `/tap/sync` and `/scs` on the idle service, interleaved, to show what HTTP and
   VOTable cost per cone (the median of per-cone ratios);
4. **runaway**: a shorter load (`--runaway-clients` for `--runaway-seconds`) during which a non-equi self
   join is sent to `/tap/sync` and as an async job with EXECUTIONDURATION=5; both must end with their limit
   within `--margin` seconds, the other clients must see no server error, and the service must be idle
   (no CPU) once the load stops, i.e. the runaway queries were really interrupted, not just answered;
5. **kill**: async jobs are made COMPLETED, ABORTED, PENDING and EXECUTING (a long join), and a few
   submitters keep creating jobs while the whole process group gets SIGKILL; the service is restarted on
   the same job folder and every acknowledged job (its 303 was received) is checked: lost records,
   wrong phases, results that changed or vanished, pending jobs that no longer run.

It prints a summary and a verdict per target and exits 1 if one fails; `--json FILE` keeps every figure.
The service's own log is kept (`--work-dir/run/service-*.log`) and scanned for tracebacks and 5xx lines.

Run (from the repository root)::

    /work/venv/bin/python bench/service/bench_service.py --json /tmp/service.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: api/ and ingest/ live at the repo root
    sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
SURVEY = "demo_survey"
XMATCH = "demo_xmatch"
TAP_SYNC = "/tap/sync"
UWS_NS = {"uws": "http://www.ivoa.net/xml/UWS/v1.0"}
OK_STATUS = b'<INFO name="QUERY_STATUS" value="OK"/>'
FINAL_PHASES = {"COMPLETED", "ERROR", "ABORTED", "ARCHIVED"}
#: the non-equi self join: a nested-loop join of 10^12 pairs that DuckDB cannot shortcut
RUNAWAY_ADQL = (
    f"SELECT COUNT(*) AS pairs FROM {SURVEY}.source AS a JOIN {SURVEY}.source AS b "
    "ON a.source_id <> b.source_id WHERE a.dec < 10 AND b.dec < 10"
)

#: the load mix: kind -> weight (cones dominate, as on a real catalog service)
MIX = {
    "cone_tap": 30,
    "cone_scs": 25,
    "small_top": 15,
    "small_schema": 10,
    "agg_band": 15,
    "agg_full": 5,
}
CONE_RADII_DEG = (0.02, 0.05, 0.1, 0.25)
DEEP_FIELD = (185.0, 47.0, 3.5)  # the survey's northern deep field (centre ra, dec, usable radius)
FOOTPRINT_DEC_MAX = 28.0  # the main footprint is dec < +30 with a ragged edge from +28.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ====================================================================================== the lake
def ensure_lake(work_dir: Path, rows: int) -> Path:
    """The demo lake with `rows` survey sources, built by `dac demo` (it re-uses what is published)."""
    lake = work_dir / f"lake-{rows}"
    if not _lake_complete(lake):
        log(f"building the demo lake ({rows:,} rows) in {lake} with `dac demo` ...")
        t0 = time.perf_counter()
        subprocess.run(
            [
                str(BIN / "dac"),
                "demo",
                "--lake",
                str(lake),
                "--rows",
                str(rows),
                "--data-dir",
                str(work_dir / f"data-{rows}"),
            ],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    else:
        log(f"re-using the demo lake {lake}")
    return lake


def _lake_complete(lake: Path) -> bool:
    if not lake.exists():
        return False
    from dac_lake.lake import Lake
    from dac_lake.storage import LakeStorage

    try:
        opened = Lake(LakeStorage(str(lake)))
        return all(opened.current_release(c) is not None for c in (SURVEY, XMATCH))
    except Exception:
        return False


def write_config(run_dir: Path, job_dir: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """The service's config file and the API token of the job owner used in the kill test."""
    from api.auth import new_token

    token = new_token("bench", ["public"])
    text = (
        "[service]\n"
        f"sync_timeout_s = {args.sync_timeout:g}\n"
        f"async_workers = {args.async_workers}\n"
        "async_duration_max_s = 3600\n"
        f'job_dir = "{job_dir}"\n'
        "\n[auth]\nallow_anonymous = true\n\n" + token.config_entry
    )
    path = run_dir / "dac.toml"
    path.write_text(text)
    return path, token.token


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat: with the service's own CPU
    time this tells whether the service was short of cores (neighbours) or waiting on itself."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ====================================================================================== the service
class ServiceStartError(RuntimeError):
    pass


@dataclass
class Service:
    """`dac serve` (or uvicorn with the same app factory) in its own process group."""

    lake: Path
    config: Path
    job_dir: Path
    port: int
    workers: int
    log_path: Path
    launcher: str = "dac"
    proc: subprocess.Popen | None = None
    start_s: float = 0.0
    start_deaths: int = 0  # workers uvicorn killed and respawned before the service was ready

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.launcher == "dac":
            return [
                str(BIN / "dac"),
                "serve",
                "--lake",
                str(self.lake),
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--job-dir",
                str(self.job_dir),
            ]
        # what `dac serve` runs for several workers, with a worker health-check timeout that survives a
        # slow import (see the README: `dac serve` keeps uvicorn's 5 s)
        return [
            str(BIN / "python"),
            "-m",
            "uvicorn",
            "api.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--timeout-worker-healthcheck",
            "60",
            "--timeout-graceful-shutdown",
            "5",
        ]

    def start(self, timeout: float) -> None:
        env = dict(os.environ)
        env.update(
            DAC_CONFIG=str(self.config), DAC_LAKE_URL=str(self.lake), DAC_SERVICE_JOB_DIR=str(self.job_dir)
        )
        with self.log_path.open("ab") as out:
            out.write(f"\n===== start {datetime.now(UTC).isoformat()} {' '.join(self.command())}\n".encode())
            out.flush()
            offset = out.tell()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceStartError(f"the service exited with status {self.proc.returncode}")
            text = self.log_text(offset)
            deaths = text.count("] died")
            if deaths >= 2 * self.workers:
                raise ServiceStartError(
                    f"{deaths} worker processes died before the service was ready (a restart loop)"
                )
            started = text.count("Application startup complete.")
            if started >= self.workers and self._healthy():
                self.start_s, self.start_deaths = time.perf_counter() - t0, deaths
                return
            time.sleep(0.5)
        raise ServiceStartError(f"the service was not ready after {timeout:.0f} s")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self, offset: int = 0) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def pids(self) -> list[int]:
        """Every live process of the service's process group (the parent and its workers)."""
        if self.proc is None:
            return []
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                rest = stat.read_text().rsplit(")", 1)[1].split()
                if int(rest[2]) == self.proc.pid and rest[0] != "Z":
                    out.append(int(stat.parent.name))
        return out

    def cpu_seconds(self) -> float:
        """CPU time used so far by the process group (workers that died count through the parent)."""
        if self.proc is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in rest[11:15])
        return total / tick

    def kill(self) -> float:
        """SIGKILL the whole process group, as the OOM killer or a power cut would; returns when gone."""
        assert self.proc is not None
        t0 = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 30
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        return time.perf_counter() - t0

    def stop(self) -> None:
        """SIGTERM the group (uvicorn's clean shutdown), SIGKILL what is left after 20 s."""
        if self.proc is None or (self.proc.poll() is not None and not self.pids()):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (self.proc.poll() is None or self.pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.proc.poll() is None or self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def scan_log(text: str) -> dict[str, Any]:
    """What the service said about its own health: tracebacks, errors, 5xx answers, worker deaths.

    `dac serve` leaves the app's loggers unconfigured, so their warnings and errors reach the log bare
    (Python's last-resort handler: no level, no time); those lines are kept as `other_lines`."""
    lines = text.splitlines()
    access_5xx = [ln for ln in lines if re.search(r'HTTP/1\.[01]" 5\d\d ', ln)]
    errors = [
        ln
        for ln in lines
        if re.search(
            r"^(ERROR|CRITICAL|WARNING):|Traceback|failed unexpectedly|worker failed|monitor iteration failed"
            r"|^job \w+ failed|Error: ",
            ln,
        )
    ]
    known = ("INFO:", "=====", "TAP service for lake", "  ")
    other = [ln for ln in lines if ln.strip() and not ln.startswith(known) and ln not in errors]
    return {
        "tracebacks": sum("Traceback (most recent call last)" in ln for ln in lines),
        "error_lines": len(errors),
        "first_error_lines": errors[:15],
        "other_lines": other[:15],
        "access_5xx": len(access_5xx),
        "first_5xx_lines": access_5xx[:10],
        "worker_deaths": sum("] died" in ln for ln in lines),
        "worker_deaths_lines": [ln for ln in lines if "] died" in ln][:10],
    }


# ====================================================================================== the workload
@dataclass
class Request:
    kind: str
    method: str
    path: str
    params: dict[str, str] | None = None
    data: dict[str, str] | None = None
    check: dict[str, Any] = field(default_factory=dict)  # what the full validation checks


def random_centre(rng: random.Random) -> tuple[float, float]:
    """A point uniform in area inside the survey footprint (dec < +28, or the northern deep field).

    Area-uniform on purpose: a user's cone is anywhere; some land in the masked holes and return nothing,
    as real ones do."""
    if rng.random() < 0.05:
        ra0, dec0, r = DEEP_FIELD
        rho = r * math.sqrt(rng.random())
        phi = rng.uniform(0, 2 * math.pi)
        dec = dec0 + rho * math.sin(phi)
        ra = (ra0 + rho * math.cos(phi) / math.cos(math.radians(dec))) % 360
        return ra, dec
    s = rng.uniform(-1.0, math.sin(math.radians(FOOTPRINT_DEC_MAX)))
    return rng.uniform(0.0, 360.0), math.degrees(math.asin(s))


@dataclass
class Workload:
    """What the requests are drawn from: the columns a cone returns, and where users look."""

    principal: list[str]
    sources: list[tuple[float, float]] = field(default_factory=list)

    def centre(self, rng: random.Random) -> tuple[float, float]:
        """Half the cones at a catalog source (density-weighted: the Galactic plane and bulge, where cones
        are heavy and results are checked for content), half anywhere in the footprint (area-weighted)."""
        if self.sources and rng.random() < 0.5:
            return rng.choice(self.sources)
        return random_centre(rng)


def load_workload(lake: Path, seed: int) -> Workload:
    import dac_lake
    from dac_lake.catalog_def import load_definition

    principal = [c.name for c in load_definition(SURVEY).columns if getattr(c, "principal", False)]
    sample = dac_lake.connect(str(lake)).sql(
        f"SELECT ra, dec FROM {SURVEY} USING SAMPLE reservoir(5000 ROWS) REPEATABLE ({int(seed)})"
    )
    return Workload(principal, list(zip(sample["ra"].to_pylist(), sample["dec"].to_pylist(), strict=True)))


def cone_adql(catalog: str, columns: list[str], ra: float, dec: float, r: float) -> str:
    """Exactly the ADQL `Session.cone` sends, so the peer comparison compares transport, not queries."""
    cols = ", ".join(f'"{c}"' for c in columns)
    centre = f"POINT('ICRS', {ra!r}, {dec!r})"
    return (
        f'SELECT {cols}, DISTANCE(POINT(\'ICRS\', "ra", "dec"), {centre}) AS dist_deg '
        f'FROM "{catalog}"."source" '
        f"WHERE 1 = CONTAINS(POINT('ICRS', \"ra\", \"dec\"), CIRCLE('ICRS', {ra!r}, {dec!r}, {r!r})) "
        "ORDER BY dist_deg"
    )


def tap(kind: str, query: str, **check: Any) -> Request:
    return Request(
        kind, "POST", TAP_SYNC, data={"REQUEST": "doQuery", "LANG": "ADQL", "QUERY": query}, check=check
    )


def make_request(kind: str, rng: random.Random, wl: Workload) -> Request:
    """One request of the mix, with what its answer must satisfy."""
    if kind in ("cone_tap", "cone_scs"):
        ra, dec = wl.centre(rng)
        r = rng.choice(CONE_RADII_DEG)
        if kind == "cone_tap":
            return tap(kind, cone_adql(SURVEY, wl.principal, ra, dec, r), cone=(ra, dec, r))
        catalog = XMATCH if rng.random() < 0.2 else SURVEY
        return Request(
            kind,
            "GET",
            f"/scs/{catalog}",
            params={"RA": f"{ra:.6f}", "DEC": f"{dec:.6f}", "SR": repr(r), "VERB": "2"},
            check={"cone": (float(f"{ra:.6f}"), float(f"{dec:.6f}"), r)},
        )
    if kind == "small_top":
        lo = round(rng.uniform(15.0, 23.0), 2)
        q = (
            f"SELECT TOP 100 source_id, ra, dec, g_mag, r_mag FROM {SURVEY}.source "
            f"WHERE r_mag BETWEEN {lo} AND {lo + 0.05:.2f}"
        )
        return tap(kind, q, max_rows=100, between=("r_mag", lo, lo + 0.05))
    if kind == "small_schema":
        if rng.random() < 0.5:
            q = (
                "SELECT column_name, datatype, unit, ucd, principal FROM TAP_SCHEMA.columns "
                f"WHERE table_name = '{SURVEY}.source' ORDER BY column_index"
            )
        else:
            q = "SELECT schema_name, table_name, table_type, description FROM TAP_SCHEMA.tables"
        return tap(kind, q, min_rows=2)
    if kind == "agg_band":
        d = round(rng.uniform(-88.0, 26.0), 1)
        q = (
            f"SELECT FLOOR(ra / 10) AS ra_bin, COUNT(*) AS n, AVG(r_mag) AS mean_r, "
            f"AVG(g_mag - r_mag) AS mean_gr FROM {SURVEY}.source "
            f"WHERE dec BETWEEN {d} AND {d + 2:.1f} GROUP BY FLOOR(ra / 10) ORDER BY ra_bin"
        )
        return tap(kind, q, max_rows=36)
    if kind == "agg_full":
        if rng.random() < 0.5:
            q = (
                f"SELECT COUNT(*) AS n, AVG(r_mag) AS mean_r FROM {SURVEY}.source "
                "WHERE g_mag - r_mag > 0.8 AND g_mag < 99 AND r_mag < 99"
            )
            return tap(kind, q, min_rows=1, max_rows=1)
        q = (
            f"SELECT FLOOR(dec / 10) AS dec_bin, COUNT(*) AS n, AVG(parallax) AS mean_plx "
            f"FROM {SURVEY}.source GROUP BY FLOOR(dec / 10) ORDER BY dec_bin"
        )
        return tap(kind, q, min_rows=10, max_rows=19)
    raise ValueError(kind)


def cheap_check(status: int, ctype: str, body: bytes) -> str | None:
    """Every answer: a 200 VOTable that says OK and is complete (a stream cut short fails here)."""
    if status != 200:
        return f"HTTP {status}"
    if "votable" not in ctype:
        return f"content type {ctype!r}"
    if not body.startswith(b"<?xml") or OK_STATUS not in body[:4096]:
        return "no QUERY_STATUS OK at the top"
    if not body.rstrip().endswith(b"</VOTABLE>"):
        return "truncated VOTable (no </VOTABLE>)"
    return None


def full_check(req: Request, body: bytes) -> tuple[str | None, int]:
    """A sampled answer, parsed by astropy as strictly as it can and checked for content."""
    from astropy.io.votable import parse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vot = parse(io.BytesIO(body), verify="exception")
        status = [i.value for r in vot.resources for i in r.infos if i.name == "QUERY_STATUS"]
        if status[:1] != ["OK"]:
            return f"QUERY_STATUS {status}", 0
        arr = vot.get_first_table().array
    except Exception as exc:
        return f"astropy: {type(exc).__name__}: {str(exc)[:200]}", 0
    n = len(arr)
    return _content_problem(req.check, arr, n), n


def _content_problem(c: dict[str, Any], arr: Any, n: int) -> str | None:
    """What the request promised (a cone, TOP, a filter, a row count) checked against the rows: a fast
    wrong answer must not count as a served request."""
    if "max_rows" in c and n > c["max_rows"]:
        return f"{n} rows > {c['max_rows']}"
    if "min_rows" in c and n < c["min_rows"]:
        return f"{n} rows < {c['min_rows']}"
    if "between" in c and n:
        col, lo, hi = c["between"]
        v = np.asarray(arr[col], dtype=float)
        if np.any((v < lo - 1e-4) | (v > hi + 1e-4)):
            return f"{col} outside [{lo}, {hi}]"
    if "cone" in c and n:
        ra0, dec0, r = c["cone"]
        sep = angular_sep(np.asarray(arr["ra"], float), np.asarray(arr["dec"], float), ra0, dec0)
        if np.any(sep > r + 1e-9):
            return f"row at {sep.max():.6f} deg outside the {r} deg cone"
        dist = np.asarray(arr["dist_deg"], float)
        if np.any(np.diff(dist) < -1e-12):
            return "cone not sorted by distance"
        if np.max(np.abs(dist - sep)) > 1e-6:
            return "dist_deg disagrees with the positions"
    return None


def angular_sep(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    ra, dec, ra0, dec0 = map(np.radians, (ra, dec, ra0, dec0))
    h = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * np.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


# ====================================================================================== load
@dataclass
class Sample:
    kind: str
    status: int
    latency_s: float
    bytes: int
    t_start: float
    t_end: float
    outcome: str  # ok | server_error | timeout (the sync limit's 400) | client_error | bad_body
    detail: str | None = None


@dataclass
class LoadResult:
    samples: list[Sample]
    wall_s: float
    seconds: float
    clients: int
    sample_every: int = 20
    validated: int = 0
    cones_checked: int = 0
    cones_with_rows: int = 0
    invalid: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    machine_busy_s: float = 0.0
    side: dict[str, Any] = field(default_factory=dict)


SideTask = Callable[[httpx.AsyncClient, float], Awaitable[dict[str, Any]]]


async def run_load(
    base: str,
    clients: int,
    seconds: float,
    seed: int,
    wl: Workload,
    sample_every: int,
    service: Service,
    side: dict[str, SideTask] | None = None,
) -> LoadResult:
    """`clients` loops of mixed requests for `seconds`; in-flight requests at the deadline are finished."""
    kinds, weights = list(MIX), list(MIX.values())
    samples: list[Sample] = []
    sampled: list[tuple[Request, bytes]] = []
    counter = 0
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(connect=15.0, read=180.0, write=30.0, pool=180.0)
    cpu0, scpu0, mcpu0 = time.process_time(), service.cpu_seconds(), machine_cpu()
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as http:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def client(i: int) -> None:
            nonlocal counter
            rng = random.Random(seed * 100_003 + i)
            while time.perf_counter() < deadline:
                req = make_request(rng.choices(kinds, weights)[0], rng, wl)
                start = time.perf_counter()
                try:
                    resp = await http.request(req.method, req.path, params=req.params, data=req.data)
                    body, status = resp.content, resp.status_code
                    ctype = resp.headers.get("content-type", "")
                    err = None
                except httpx.HTTPError as exc:
                    body, status, ctype, err = b"", 0, "", f"{type(exc).__name__}: {exc}"[:300]
                end = time.perf_counter()
                if err is not None or status >= 500:
                    outcome, detail = "server_error", err or body[:300].decode("utf-8", "replace")
                elif status == 400 and b"limit and was stopped" in body:
                    outcome, detail = "timeout", body[:400].decode("utf-8", "replace")
                elif status >= 400:
                    outcome, detail = "client_error", body[:400].decode("utf-8", "replace")
                else:
                    detail = cheap_check(status, ctype, body)
                    outcome = "ok" if detail is None else "bad_body"
                samples.append(
                    Sample(req.kind, status, end - start, len(body), start - t0, end - t0, outcome, detail)
                )
                counter += 1
                if outcome == "ok" and counter % sample_every == 0:
                    sampled.append((req, body))

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        side_tasks = {name: asyncio.create_task(fn(http, t0)) for name, fn in (side or {}).items()}
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        side_results = {name: await task for name, task in side_tasks.items()}
    result = LoadResult(
        samples,
        wall,
        seconds,
        clients,
        sample_every=sample_every,
        side=side_results,
        client_cpu_s=time.process_time() - cpu0,
        server_cpu_s=service.cpu_seconds() - scpu0,
        machine_busy_s=machine_cpu()[0] - mcpu0[0],
    )
    for req, body in sampled:  # after the phase: parsing must not slow the clients being measured
        problem, rows = full_check(req, body)
        result.validated += 1
        if "cone" in req.check:
            result.cones_checked += 1
            result.cones_with_rows += rows > 0
        if problem:
            result.invalid.append(f"{req.kind}: {problem}")
    return result


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(result: LoadResult) -> dict[str, Any]:
    """Per kind and overall: requests, throughput, latency percentiles (ms), errors by class."""

    def block(samples: list[Sample]) -> dict[str, Any]:
        lat = [s.latency_s * 1000 for s in samples if s.outcome == "ok"]
        outcomes = Counter(s.outcome for s in samples)
        return {
            "requests": len(samples),
            "ok": outcomes["ok"],
            "rps": round(len(samples) / result.wall_s, 2) if result.wall_s else None,
            "p50_ms": _r(pct(lat, 50)),
            "p95_ms": _r(pct(lat, 95)),
            "p99_ms": _r(pct(lat, 99)),
            "max_ms": _r(max(lat) if lat else None),
            "server_errors": outcomes["server_error"],
            "timeouts": outcomes["timeout"],
            "client_errors": outcomes["client_error"],
            "bad_bodies": outcomes["bad_body"],
            "mean_bytes": int(np.mean([s.bytes for s in samples])) if samples else 0,
        }

    per_kind = {k: block([s for s in result.samples if s.kind == k]) for k in MIX}
    problems = Counter(
        f"{s.kind} {s.outcome}: {(s.detail or '')[:160]}" for s in result.samples if s.outcome != "ok"
    )
    return {
        "clients": result.clients,
        "seconds": result.seconds,
        "wall_s": round(result.wall_s, 2),
        "overall": block(result.samples),
        "per_kind": per_kind,
        "sample_every": result.sample_every,
        "validated_full": result.validated,
        "validated_cones": result.cones_checked,
        "validated_cones_with_rows": result.cones_with_rows,
        "invalid_full": len(result.invalid),
        "invalid_examples": result.invalid[:10],
        "problems": dict(problems.most_common(15)),
        "client_cpu_s": round(result.client_cpu_s, 1),
        "server_cpu_s": round(result.server_cpu_s, 1),
        "server_cpu_cores": round(result.server_cpu_s / result.wall_s, 2) if result.wall_s else None,
        "machine_busy_cores": round(result.machine_busy_s / result.wall_s, 2) if result.wall_s else None,
        "server_cpu_ms_per_request": round(1000 * result.server_cpu_s / len(result.samples), 1)
        if result.samples
        else None,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# ====================================================================================== peer
def run_peer(base: str, lake: Path, n: int, seed: int, wl: Workload) -> dict[str, Any]:
    """The same cones through the Python API and over HTTP (TAP and SCS), interleaved, on an idle service."""
    import dac_lake

    session = dac_lake.connect(str(lake))
    rng = random.Random(seed + 7)
    cones = [(*wl.centre(rng), rng.choice(CONE_RADII_DEG)) for _ in range(n)]
    rows_mismatch = 0
    rows: list[int] = []
    times: dict[str, list[float]] = {"python": [], "tap": [], "scs": []}
    with httpx.Client(base_url=base, timeout=60) as http:

        def via_python(ra: float, dec: float, r: float) -> int:
            return session.cone(SURVEY, ra, dec, r, columns=wl.principal).num_rows

        def via_tap(ra: float, dec: float, r: float) -> int:
            resp = http.post(
                TAP_SYNC, data={"LANG": "ADQL", "QUERY": cone_adql(SURVEY, wl.principal, ra, dec, r)}
            )
            resp.raise_for_status()
            return -1  # rows are not decoded here: the time to the last byte is the figure

        def via_scs(ra: float, dec: float, r: float) -> int:
            resp = http.get(f"/scs/{SURVEY}", params={"RA": repr(ra), "DEC": repr(dec), "SR": repr(r)})
            resp.raise_for_status()
            return -1

        fns = {"python": via_python, "tap": via_tap, "scs": via_scs}
        for ra, dec, r in cones[:5]:  # warm-up: first connections, caches
            for fn in fns.values():
                fn(ra, dec, r)
        order = list(fns)
        for i, (ra, dec, r) in enumerate(cones):
            for name in order[i % 3 :] + order[: i % 3]:  # rotate who goes first
                t0 = time.perf_counter()
                got = fns[name](ra, dec, r)
                times[name].append(time.perf_counter() - t0)
                if name == "python":
                    rows.append(got)
        # one content check: TAP and the Python API return the same number of rows for a dense cone
        t = session.cone(SURVEY, 266.4, -29.0, 0.25, columns=wl.principal)
        resp = http.post(
            TAP_SYNC, data={"LANG": "ADQL", "QUERY": cone_adql(SURVEY, wl.principal, 266.4, -29.0, 0.25)}
        )
        from astropy.io.votable import parse_single_table

        if len(parse_single_table(io.BytesIO(resp.content)).array) != t.num_rows:
            rows_mismatch += 1
    ratios_tap = [a / b for a, b in zip(times["tap"], times["python"], strict=True)]
    ratios_scs = [a / b for a, b in zip(times["scs"], times["python"], strict=True)]
    return {
        "cones": n,
        "python_p50_ms": _r(pct([x * 1000 for x in times["python"]], 50)),
        "tap_p50_ms": _r(pct([x * 1000 for x in times["tap"]], 50)),
        "scs_p50_ms": _r(pct([x * 1000 for x in times["scs"]], 50)),
        "python_p95_ms": _r(pct([x * 1000 for x in times["python"]], 95)),
        "tap_p95_ms": _r(pct([x * 1000 for x in times["tap"]], 95)),
        "scs_p95_ms": _r(pct([x * 1000 for x in times["scs"]], 95)),
        "median_ratio_tap_over_python": round(float(np.median(ratios_tap)), 2),
        "median_ratio_scs_over_python": round(float(np.median(ratios_scs)), 2),
        "cone_rows_mean": round(float(np.mean(rows)), 1) if rows else None,
        "cones_non_empty": sum(x > 0 for x in rows),
        "dense_cone_rows_mismatch": rows_mismatch,
    }


# ====================================================================================== runaway
def uws_job(xml_text: str) -> dict[str, Any]:
    root = ET.fromstring(xml_text)

    def text(tag: str) -> str | None:
        el = root.find(f"uws:{tag}", UWS_NS)
        return None if el is None or el.text is None else el.text.strip()

    msg = root.find("uws:errorSummary/uws:message", UWS_NS)
    return {
        "phase": text("phase"),
        "start": text("startTime"),
        "end": text("endTime"),
        "duration": text("executionDuration"),
        "error": None if msg is None else (msg.text or ""),
        "results": [r.get("id") for r in root.findall("uws:results/uws:result", UWS_NS)],
    }


def iso_s(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def sync_runaway_task(delay: float, limit: float) -> SideTask:
    async def task(http: httpx.AsyncClient, t0: float) -> dict[str, Any]:
        await asyncio.sleep(delay)
        start = time.perf_counter()
        try:
            resp = await http.post(
                TAP_SYNC, data={"LANG": "ADQL", "QUERY": RUNAWAY_ADQL}, timeout=limit * 10 + 60
            )
            status, body = resp.status_code, resp.text
        except httpx.HTTPError as exc:
            status, body = 0, f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        m = re.search(r'<INFO name="QUERY_STATUS" value="ERROR">(.*?)</INFO>', body, re.S)
        return {
            "status": status,
            "elapsed_s": round(end - start, 2),
            "message": m.group(1) if m else body[:300],
            "t_start": start - t0,
            "t_end": end - t0,
        }

    return task


def async_runaway_task(delay: float, duration: int) -> SideTask:
    async def task(http: httpx.AsyncClient, t0: float) -> dict[str, Any]:
        await asyncio.sleep(delay)
        start = time.perf_counter()
        resp = await http.post(
            "/tap/async",
            data={"LANG": "ADQL", "QUERY": RUNAWAY_ADQL, "EXECUTIONDURATION": str(duration), "PHASE": "RUN"},
        )
        if resp.status_code != 303:
            return {"created": False, "status": resp.status_code, "body": resp.text[:300]}
        url = resp.headers["location"]
        job: dict[str, Any] = {}
        while time.perf_counter() - start < duration * 10 + 60:
            r = await http.get(url, params={"WAIT": "5"})
            job = uws_job(r.text)
            if job["phase"] in FINAL_PHASES:
                break
        end = time.perf_counter()
        ran = iso_s(job["end"]) - iso_s(job["start"]) if job.get("start") and job.get("end") else None
        error_doc = (await http.get(url + "/error")).text if job.get("phase") == "ERROR" else ""
        return {
            "created": True,
            "job": url.rsplit("/", 1)[-1],
            "phase": job.get("phase"),
            "error": job.get("error"),
            "ran_s": None if ran is None else round(ran, 2),
            "observed_s": round(end - start, 2),
            "error_doc_ok": "QUERY_STATUS" in error_doc,
            "t_start": start - t0,
            "t_end": end - t0,
        }

    return task


def idle_cpu(service: Service, seconds: float = 4.0) -> float:
    """Cores the idle service uses: ~0 unless an interrupted query is in fact still running."""
    time.sleep(1.0)
    c0, t0 = service.cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (service.cpu_seconds() - c0) / (time.perf_counter() - t0)


# ====================================================================================== kill
SMALL_JOB_QUERIES = [
    f"SELECT TOP 50 source_id, ra, dec, r_mag FROM {SURVEY}.source WHERE r_mag BETWEEN 19 AND 19.1",
    f"SELECT COUNT(*) AS n FROM {SURVEY}.source WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
    "CIRCLE('ICRS', 266.4, -29.0, 1.0))",
    cone_adql(SURVEY, ["source_id", "ra", "dec", "g_mag"], 83.8, -5.4, 0.5),
    f"SELECT FLOOR(dec / 10) AS b, COUNT(*) AS n FROM {XMATCH}.source GROUP BY FLOOR(dec / 10)",
]


@dataclass
class TrackedJob:
    job_id: str
    category: str  # completed | aborted | pending | executing | midway_run | midway_pending
    phase_before: str | None = None
    result_sha256: str | None = None


class Jobs:
    """A UWS client for the job owner (a static API token: jobs are private and listed per owner)."""

    def __init__(self, base: str, token: str):
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def create(self, query: str, run: bool, duration: int | None = None) -> str:
        data = {"LANG": "ADQL", "QUERY": query}
        if run:
            data["PHASE"] = "RUN"
        if duration is not None:
            data["EXECUTIONDURATION"] = str(duration)
        resp = self.http.post("/tap/async", data=data)
        if resp.status_code != 303:
            raise RuntimeError(f"job creation answered {resp.status_code}: {resp.text[:300]}")
        return resp.headers["location"].rsplit("/", 1)[-1]

    def get(self, job_id: str, wait: float | None = None) -> tuple[int, dict[str, Any] | None]:
        params = {"WAIT": str(wait)} if wait else None
        resp = self.http.get(f"/tap/async/{job_id}", params=params, timeout=(wait or 0) + 60)
        return resp.status_code, uws_job(resp.text) if resp.status_code == 200 else None

    def wait_final(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            _, job = self.get(job_id, wait=5)
            if job is None or job["phase"] in FINAL_PHASES:
                return job
        return job

    def result_sha(self, job_id: str) -> str | None:
        resp = self.http.get(f"/tap/async/{job_id}/results/result")
        if resp.status_code != 200 or cheap_check(200, resp.headers.get("content-type", ""), resp.content):
            return None
        return hashlib.sha256(resp.content).hexdigest()

    def listed(self) -> set[str]:
        resp = self.http.get("/tap/async")
        return set(re.findall(r'<uws:jobref id="([0-9a-f]+)"', resp.text))

    def close(self) -> None:
        self.http.close()


def run_kill(
    service: Service, token: str, args: argparse.Namespace, checks: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Make jobs in every phase, SIGKILL the service while submitters are busy, restart, audit."""
    jobs = Jobs(service.base, token)
    tracked: list[TrackedJob] = []
    t_phase = time.perf_counter()
    setup_failures: list[str] = []
    # finished jobs, with their results fingerprinted
    for i in range(args.kill_completed):
        jid = jobs.create(SMALL_JOB_QUERIES[i % len(SMALL_JOB_QUERIES)], run=True)
        job = jobs.wait_final(jid, 120)
        tj = TrackedJob(jid, "completed", job and job["phase"])
        if tj.phase_before == "COMPLETED":
            tj.result_sha256 = jobs.result_sha(jid)
        else:  # a small job that fails is a bug of its own, whatever the kill does later
            setup_failures.append(f"{jid}: {tj.phase_before} {job and job['error']}")
        tracked.append(tj)
    jid = jobs.create(SMALL_JOB_QUERIES[0], run=False)
    jobs.http.post(f"/tap/async/{jid}/phase", data={"PHASE": "ABORT"})
    tracked.append(TrackedJob(jid, "aborted", jobs.get(jid)[1]["phase"]))
    for i in range(args.kill_pending):
        tracked.append(
            TrackedJob(
                jobs.create(SMALL_JOB_QUERIES[i % len(SMALL_JOB_QUERIES)], run=False), "pending", "PENDING"
            )
        )
    long_ids = [jobs.create(RUNAWAY_ADQL, run=True, duration=3600) for _ in range(args.kill_executing)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        phases = [jobs.get(j)[1]["phase"] for j in long_ids]
        if all(p == "EXECUTING" for p in phases):
            break
        time.sleep(0.5)
    # submitters creating jobs while the service dies: what was acknowledged must survive
    acked: list[TrackedJob] = []
    failures: list[str] = []
    stop = threading.Event()

    def submitter(n: int) -> None:
        client = Jobs(service.base, token)
        k = 0
        while not stop.is_set():
            run = (k + n) % 2 == 0
            try:
                jid = client.create(SMALL_JOB_QUERIES[k % len(SMALL_JOB_QUERIES)], run=run)
                acked.append(TrackedJob(jid, "midway_run" if run else "midway_pending"))
            except (httpx.HTTPError, RuntimeError) as exc:
                failures.append(type(exc).__name__)
                time.sleep(0.2)
            k += 1
        client.close()

    threads = [
        threading.Thread(target=submitter, args=(n,), daemon=True) for n in range(args.kill_submitters)
    ]
    for t in threads:
        t.start()
    time.sleep(args.kill_after)
    for j in long_ids:
        tracked.append(TrackedJob(j, "executing", jobs.get(j)[1]["phase"]))
    before_kill = len(acked)
    kill_s = service.kill()
    killed_at = time.perf_counter()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(30)
    log(
        f"  SIGKILLed the service ({before_kill} jobs acknowledged by the submitters before the kill, "
        f"{len(acked)} in all); restarting on the same job folder ..."
    )
    bring_up(service, args, checks, "service restarts after SIGKILL")
    restart_s = time.perf_counter() - killed_at
    tracked.extend(acked)
    # ---- audit
    audit: list[dict[str, Any]] = []
    lost = wrong = bad_result = not_runnable = 0
    listed = jobs.listed()
    to_run: list[TrackedJob] = []
    for tj in tracked:
        code, job = jobs.get(tj.job_id)
        row: dict[str, Any] = {
            "job": tj.job_id,
            "category": tj.category,
            "before": tj.phase_before,
            "http": code,
            "after": job and job["phase"],
            "listed": tj.job_id in listed,
        }
        problem = None
        if job is None:
            lost += 1
            problem = f"record lost (HTTP {code})"
        else:
            after = job["phase"]
            expect = expected_after(tj)
            if after not in expect:
                problem = f"phase {after}, expected {'/'.join(sorted(expect))}"
            elif (
                after == "ERROR"
                and tj.category in ("executing", "midway_run")
                and "restart" not in (job["error"] or "")
            ):
                problem = f"ERROR without a restart reason: {job['error']!r}"
            elif after == "COMPLETED":
                sha = jobs.result_sha(tj.job_id)
                if sha is None or (tj.result_sha256 and sha != tj.result_sha256):
                    bad_result += 1
                    problem = "result missing or changed"
            elif after == "PENDING":
                to_run.append(tj)
            if problem and not problem.startswith("result"):
                wrong += 1
            row["error"] = job["error"]
        row["problem"] = problem
        audit.append(row)
    by_id = {row["job"]: row for row in audit}
    for tj in to_run:  # pending before the kill: still runnable after it
        try:
            jobs.http.post(f"/tap/async/{tj.job_id}/phase", data={"PHASE": "RUN"})
            job = jobs.wait_final(tj.job_id, 120)
            ok = job is not None and job["phase"] == "COMPLETED" and jobs.result_sha(tj.job_id) is not None
        except httpx.HTTPError:
            ok = False
        by_id[tj.job_id]["ran_after_restart"] = ok
        if not ok:
            not_runnable += 1
            by_id[tj.job_id]["problem"] = "pending job did not run to COMPLETED after the restart"
    jobs.close()
    cats = Counter(tj.category for tj in tracked)
    after_phases = Counter(f"{r['category']}:{r['after']}" for r in audit)
    return {
        "jobs_tracked": len(tracked),
        "categories": dict(cats),
        "phases_after": dict(sorted(after_phases.items())),
        "executing_before_kill": [tj.phase_before for tj in tracked if tj.category == "executing"],
        "midway_acknowledged": len(acked),
        "midway_submit_failures": dict(Counter(failures)),
        "kill_s": round(kill_s, 2),
        "restart_to_ready_s": round(restart_s, 1),
        "small_jobs_not_completed": setup_failures,
        "lost_records": lost,
        "wrong_phase": wrong,
        "bad_results": bad_result,
        "pending_not_runnable": not_runnable,
        "pending_rerun": len(to_run),
        "not_listed": sum(not r["listed"] for r in audit),
        # created while the service died, the 303 never reached the client: kept anyway (not required)
        "unacknowledged_records": len(listed - {tj.job_id for tj in tracked}),
        "problems": [r for r in audit if r.get("problem")][:20],
        "phase_s": round(time.perf_counter() - t_phase, 1),
    }


def expected_after(tj: TrackedJob) -> set[str]:
    """The phases a job may have after the restart, given what it was before the kill."""
    if tj.category == "completed":
        return {tj.phase_before or "COMPLETED"}
    if tj.category == "aborted":
        return {"ABORTED"}
    if tj.category in ("pending", "midway_pending"):
        return {"PENDING"}
    if tj.category == "executing":
        return {"ERROR"}
    return {"COMPLETED", "ERROR"}  # midway_run: finished before the kill, or failed by the restart


# ====================================================================================== phases
Checks = dict[str, dict[str, Any]]


@dataclass
class Ctx:
    """What every phase needs."""

    args: argparse.Namespace
    service: Service
    lake: Path
    token: str
    wl: Workload
    report: dict[str, Any]
    checks: Checks


def phase_load(ctx: Ctx) -> None:
    a = ctx.args
    log(f"load: {a.clients} clients for {a.seconds:g} s ...")
    res = asyncio.run(
        run_load(ctx.service.base, a.clients, a.seconds, a.seed, ctx.wl, a.sample_every, ctx.service)
    )
    load = ctx.report["load"] = summarise(res)
    print_load("LOAD", load)
    o = load["overall"]
    ctx.checks["0 server errors under load"] = {
        "ok": o["server_errors"] == 0 and o["bad_bodies"] == 0 and load["invalid_full"] == 0,
        "detail": f"{o['requests']} requests in {load['wall_s']} s: {o['server_errors']} server errors, "
        f"{o['timeouts']} sync time-outs, {o['client_errors']} other 4xx, {o['bad_bodies']} bad "
        f"bodies, {load['invalid_full']} invalid of {load['validated_full']} parsed; {o['rps']} req/s, "
        f"p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms",
    }


def phase_peer(ctx: Ctx) -> None:
    a = ctx.args
    log(f"peer: {a.peer_cones} cones, Python API vs /tap/sync vs /scs, one client, interleaved ...")
    peer = ctx.report["peer"] = run_peer(ctx.service.base, ctx.lake, a.peer_cones, a.seed, ctx.wl)
    print(
        f"\nPEER (idle service, one client, {peer['cones']} cones): p50 Python API "
        f"{peer['python_p50_ms']} ms, "
        f"/tap/sync {peer['tap_p50_ms']} ms, /scs {peer['scs_p50_ms']} ms; median ratio over the Python API: "
        f"TAP {peer['median_ratio_tap_over_python']}x, SCS {peer['median_ratio_scs_over_python']}x "
        f"({peer['cones_non_empty']} cones with rows, {peer['cone_rows_mean']} rows on average)"
    )


def phase_runaway(ctx: Ctx) -> None:
    a = ctx.args
    log(
        f"runaway: {a.runaway_clients} clients for {a.runaway_seconds:g} s with a runaway sync query (limit "
        f"{a.sync_timeout:g} s) and an async one (EXECUTIONDURATION={a.async_duration}) ..."
    )
    side = {
        "sync": sync_runaway_task(2.0, a.sync_timeout),
        "async": async_runaway_task(2.5, a.async_duration),
    }
    res = asyncio.run(
        run_load(
            ctx.service.base,
            a.runaway_clients,
            a.runaway_seconds,
            a.seed + 1,
            ctx.wl,
            a.sample_every,
            ctx.service,
            side,
        )
    )
    idle = idle_cpu(ctx.service)
    s = summarise(res)
    sync, asy = res.side["sync"], res.side["async"]
    during = [x for x in res.samples if x.t_end >= sync["t_start"] and x.t_start <= sync["t_end"]]
    lat = [x.latency_s * 1000 for x in during if x.outcome == "ok"]
    r = ctx.report["runaway"] = {
        "load": s,
        "sync": sync,
        "async": asy,
        "idle_cpu_cores_after": round(idle, 3),
        "served_during_sync_runaway": len(during),
        "server_errors_during_sync_runaway": sum(x.outcome == "server_error" for x in during),
        "p99_ms_during_sync_runaway": _r(pct(lat, 99)),
    }
    print_load("RUNAWAY PHASE LOAD", s)
    print(f"sync runaway: HTTP {sync['status']} after {sync['elapsed_s']} s: {sync['message'][:150]}")
    print(
        f"async runaway: {asy.get('phase')} after {asy.get('ran_s')} s executing "
        f"({asy.get('observed_s')} s observed): {asy.get('error')}"
    )
    print(
        f"while the sync runaway ran: {len(during)} other requests served, p99 "
        f"{r['p99_ms_during_sync_runaway']} ms, {r['server_errors_during_sync_runaway']} server errors; "
        f"service CPU once idle: {idle:.2f} cores"
    )
    limit, margin = a.sync_timeout, a.margin
    sync_ok = (
        sync["status"] == 400
        and "limit" in sync["message"]
        and limit * 0.9 <= sync["elapsed_s"] <= limit + margin
    )
    ran = asy.get("ran_s")
    async_ok = (
        asy.get("phase") == "ERROR"
        and "duration" in (asy.get("error") or "")
        and ran is not None
        and ran <= a.async_duration + margin
    )
    others_ok = s["overall"]["server_errors"] == 0 and s["overall"]["bad_bodies"] == 0
    ctx.checks["runaway stopped at its limit"] = {
        "ok": sync_ok and async_ok and others_ok and idle < 0.3,
        "detail": f"sync {'ok' if sync_ok else 'FAIL'} (HTTP {sync['status']} after {sync['elapsed_s']} s, "
        f"limit {limit:g} s); async {'ok' if async_ok else 'FAIL'} ({asy.get('phase')} after {ran} s, "
        f"limit {a.async_duration} s); others: {s['overall']['server_errors']} server errors, "
        f"p99 {s['overall']['p99_ms']} ms; idle CPU after {idle:.2f} cores",
    }


def phase_kill(ctx: Ctx) -> None:
    log("kill: jobs COMPLETED / ABORTED / PENDING / EXECUTING, submitters busy, then SIGKILL ...")
    k = ctx.report["kill"] = run_kill(ctx.service, ctx.token, ctx.args, ctx.checks)
    print(
        f"\nKILL: {k['jobs_tracked']} jobs tracked {k['categories']}; executing before the kill: "
        f"{k['executing_before_kill']}; SIGKILL to ready again {k['restart_to_ready_s']} s"
    )
    print(f"  phases after restart: {k['phases_after']}")
    print(
        f"  lost records {k['lost_records']}, wrong phase {k['wrong_phase']}, results missing or changed "
        f"{k['bad_results']}, pending not runnable {k['pending_not_runnable']} (of {k['pending_rerun']} "
        f"re-run), not in the job list {k['not_listed']}; recorded though never acknowledged "
        f"{k['unacknowledged_records']}"
    )
    for prob in k["problems"][:8]:
        print(f"  problem: {prob}")
    ctx.checks["0 lost async jobs after SIGKILL"] = {
        "ok": k["lost_records"] == 0
        and k["wrong_phase"] == 0
        and k["bad_results"] == 0
        and k["pending_not_runnable"] == 0
        and not k["small_jobs_not_completed"],
        "detail": f"{k['jobs_tracked']} jobs: {k['lost_records']} lost, {k['wrong_phase']} wrong phase, "
        f"{k['bad_results']} bad results, {k['pending_not_runnable']} pending not runnable",
    }


def bring_up(service: Service, args: argparse.Namespace, checks: Checks, name: str) -> None:
    """Start the service and record whether it came up; retry with uvicorn when `dac serve` did not.

    The fallback keeps the other targets measurable when `dac serve` itself is what fails (a finding of
    its own, reported as a failed check), unless --no-fallback."""
    log(
        f"starting `{' '.join(Path(c).name for c in service.command()[:3])} ... --workers {service.workers}` "
        f"on {service.base}"
    )
    offset = service.log_path.stat().st_size if service.log_path.exists() else 0
    try:
        service.start(args.start_timeout)
        respawned = (
            f" ({service.start_deaths} worker(s) killed by uvicorn's health check and respawned)"
            if service.start_deaths
            else ""
        )
        checks[name] = {
            "ok": True,
            "detail": f"{service.launcher} ready in {service.start_s:.1f} s{respawned}",
        }
        log(f"  ready in {service.start_s:.1f} s")
        return
    except ServiceStartError as exc:
        scan = scan_log(service.log_text(offset))
        detail = f"`{service.launcher}` with {service.workers} workers did not start: {exc}"
        log(detail)
        for line in scan["worker_deaths_lines"][:4]:
            log(f"  log: {line}")
        service.stop()
        checks[name] = {"ok": False, "detail": detail, "log": scan}
        if args.no_fallback or service.launcher != "dac":
            raise
    service.launcher = "uvicorn"
    log("retrying with uvicorn (same app factory, --timeout-worker-healthcheck 60)")
    service.start(args.start_timeout)
    log(f"  ready in {service.start_s:.1f} s")


# ====================================================================================== report
def print_load(title: str, s: dict[str, Any]) -> None:
    print(
        f"\n{title}: {s['clients']} clients, {s['seconds']:g} s (wall {s['wall_s']} s); service CPU "
        f"{s['server_cpu_cores']} cores ({s['server_cpu_ms_per_request']} ms per request; the whole machine "
        f"{s['machine_busy_cores']} of {os.cpu_count()} cores busy), "
        f"client CPU {s['client_cpu_s']} s"
    )
    head = (
        f"{'kind':<13}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'5xx/conn':>9}{'t-out':>6}{'4xx':>5}{'bad':>5}{'bytes':>8}"
    )
    print(head)
    print("-" * len(head))
    for kind, b in [*s["per_kind"].items(), ("ALL", s["overall"])]:
        print(
            f"{kind:<13}{b['requests']:>9}{_f(b['rps']):>8}{_f(b['p50_ms']):>9}{_f(b['p95_ms']):>9}"
            f"{_f(b['p99_ms']):>9}{_f(b['max_ms']):>9}{b['server_errors']:>9}{b['timeouts']:>6}"
            f"{b['client_errors']:>5}{b['bad_bodies']:>5}{b['mean_bytes']:>8}"
        )
    print(
        f"full VOTable checks (astropy, every {s['sample_every']}th answer): {s['validated_full']} parsed, "
        f"{s['invalid_full']} invalid; {s['validated_cones_with_rows']} of the {s['validated_cones']} cones "
        "checked had rows"
    )
    for text, n in list(s["problems"].items())[:8]:
        print(f"  x{n}: {text}")
    for line in s["invalid_examples"][:5]:
        print(f"  invalid: {line}")


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def cpu_pressure() -> str | None:
    """The kernel's CPU pressure (PSI): how much of the time runnable tasks waited for a core."""
    with contextlib.suppress(OSError):
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    return None


def machine() -> dict[str, Any]:
    import duckdb
    import uvicorn

    model = ""
    with contextlib.suppress(OSError):
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_start": cpu_pressure(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="survey rows of the demo lake")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients of the load phase")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/dac-bench-service"), help="cache and logs")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sync-timeout", type=float, default=10.0, help="the service's sync_timeout_s")
    p.add_argument("--async-workers", type=int, default=2, help="the service's async_workers (per process)")
    p.add_argument("--sample-every", type=int, default=20, help="parse every n-th answer fully")
    p.add_argument("--peer-cones", type=int, default=100, help="cones of the Python-API comparison")
    p.add_argument("--runaway-clients", type=int, default=20)
    p.add_argument("--runaway-seconds", type=float, default=15.0)
    p.add_argument("--async-duration", type=int, default=5, help="EXECUTIONDURATION of the async runaway")
    p.add_argument("--margin", type=float, default=3.0, help="seconds past a limit a runaway may take to end")
    p.add_argument("--kill-completed", type=int, default=6)
    p.add_argument("--kill-pending", type=int, default=4)
    p.add_argument("--kill-executing", type=int, default=2)
    p.add_argument("--kill-submitters", type=int, default=4)
    p.add_argument("--kill-after", type=float, default=2.0, help="seconds of submissions before SIGKILL")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument(
        "--launcher",
        choices=["dac", "uvicorn"],
        default="dac",
        help="`dac serve`, or uvicorn with the same app factory and a 60 s worker health check",
    )
    p.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail at once when `dac serve` does not start instead of retrying with uvicorn",
    )
    p.add_argument("--skip", default="", help="comma-separated phases to skip: load,peer,runaway,kill")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    m = report["machine"]
    log(
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), load average "
        f"{' '.join(f'{x:.1f}' for x in m['loadavg_start'])}, CPU pressure {m['cpu_pressure_start']}"
    )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    lake = ensure_lake(args.work_dir, args.rows)
    run_dir = args.work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    job_dir = run_dir / "jobs"
    job_dir.mkdir(parents=True)
    config, token = write_config(run_dir, job_dir, args)
    wl = load_workload(lake, args.seed)
    service = Service(
        lake, config, job_dir, free_port(), args.workers, run_dir / "service.log", args.launcher
    )
    ctx = Ctx(args, service, lake, token, wl, report, {})

    def on_term(signum: int, frame: Any) -> None:
        service.stop()
        sys.exit(130)

    signal.signal(signal.SIGTERM, on_term)
    try:
        bring_up(service, args, ctx.checks, "service starts")
        report["launcher"] = service.launcher
        for name, phase in (
            ("load", phase_load),
            ("peer", phase_peer),
            ("runaway", phase_runaway),
            ("kill", phase_kill),
        ):
            if name not in skip:
                phase(ctx)
    finally:
        service.stop()
    report["machine"].update(loadavg_end=os.getloadavg(), cpu_pressure_end=cpu_pressure())
    sl = report["service_log"] = scan_log(service.log_text())
    report["service_log_path"] = str(service.log_path)
    report["checks"] = ctx.checks
    print(
        f"\nservice log {service.log_path}: {sl['tracebacks']} tracebacks, {sl['error_lines']} error lines, "
        f"{sl['access_5xx']} 5xx answers, {sl['worker_deaths']} worker deaths"
    )
    for line in sl["first_error_lines"][:6] + sl["other_lines"][:6]:
        print(f"  {line[:200]}")
    print("\nVERDICT")
    for name, c in ctx.checks.items():
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {name}: {c['detail']}")
    failed = [n for n, c in ctx.checks.items() if not c["ok"]]
    report["verdict"] = "FAIL" if failed else "PASS"
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=_json_default))
        log(f"figures written to {args.json}")
    return 1 if failed else 0


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
