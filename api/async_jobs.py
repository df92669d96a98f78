"""TAP `/tap/async`: the UWS machinery (api/uws) wired to the query engine.

A job runs the same `DacService.prepare` as `/tap/sync`, with the job's execution duration as its time
limit, writes its result file under the job folder (streamed: never held whole), reports progress from
DuckDB's estimate (partitions done of total) and is cancelled by ABORT or its duration through
`QueryControl`. Jobs run with the data rights of their owner as last seen by the service (recorded on
each request, so a job started after a restart still knows its owner's groups; an owner unknown to this
job folder gets the public catalogs only).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api import querylog
from api.formats import TapError
from api.formats.dali import dali_error_votable
from api.service import DacService, as_tap_error
from api.tap.params import fold, parse_query
from api.uws.router import make_async_router
from api.uws.runner import JobContext, JobRunner
from api.uws.store import Job, JobResult, JobStore
from dac_lake.engine import QueryControl

log = logging.getLogger("api.async")
PUBLIC = frozenset({"public"})


class OwnerGroups:
    """owner name -> groups, in a small SQLite file beside the jobs (shared by worker processes)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS owners (name TEXT PRIMARY KEY, groups TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
        return db

    def remember(self, name: str | None, groups: frozenset[str]) -> None:
        if name is None:
            return
        text = json.dumps(sorted(groups))
        db = self._db()
        row = db.execute("SELECT groups FROM owners WHERE name = ?", (name,)).fetchone()
        if row is None or row[0] != text:
            db.execute("INSERT OR REPLACE INTO owners (name, groups) VALUES (?, ?)", (name, text))

    def groups(self, name: str | None) -> frozenset[str]:
        if name is None:
            return PUBLIC
        row = self._db().execute("SELECT groups FROM owners WHERE name = ?", (name,)).fetchone()
        return PUBLIC if row is None else frozenset(json.loads(row[0])) | PUBLIC


@dataclass
class AsyncJobs:
    store: JobStore
    runner: JobRunner
    router: APIRouter
    owners: OwnerGroups

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()


def make_async_jobs(service: DacService, identity: Callable, job_dir: Path) -> AsyncJobs:
    s = service.settings
    store = JobStore(job_dir / "jobs.sqlite", job_dir / "jobs")
    owners = OwnerGroups(job_dir / "owners.sqlite")

    def execute(job: Job, ctx: JobContext) -> list[JobResult]:
        return _execute(service, owners, job, ctx)

    runner = JobRunner(
        store,
        execute,
        workers=s.async_workers,
        default_execution_duration=s.async_duration_default_s,
        max_execution_duration=s.async_duration_max_s,
        destruction_interval=timedelta(days=s.destruction_days),
        max_destruction_interval=timedelta(days=s.destruction_days),
    )

    def remembering_identity(request: Request, who=Depends(identity)):
        owners.remember(who.name, who.groups)
        return who

    def render_error(message: str, status: int) -> Response:
        return Response(
            dali_error_votable(message), status_code=status, media_type="application/x-votable+xml"
        )

    router = make_async_router(
        store,
        runner,
        identity_dependency=remembering_identity,
        error_renderer=render_error,
        max_wait=s.wait_max_s,
        list_anonymous_jobs=False,
        max_upload_bytes=s.upload_max_bytes,
    )
    return AsyncJobs(store, runner, router, owners)


def _execute(service: DacService, owners: OwnerGroups, job: Job, ctx: JobContext) -> list[JobResult]:
    s = service.settings
    started = time.perf_counter()
    query = None
    try:
        query = parse_query(fold(job.parameters), maxrec_default=s.maxrec_default, maxrec_max=s.maxrec_max)
        files = {}
        for upload in job.uploads:
            if upload.path and upload.source.startswith("param:"):
                files[upload.source[len("param:") :]] = job.resolve(upload.path).read_bytes()
        control = QueryControl()
        ctx.on_cancel(control.cancel)
        timeout = job.execution_duration or s.async_duration_max_s
        prepared = service.prepare(
            owners.groups(job.owner_id),
            query,
            files,
            timeout_s=float(timeout),
            control=control,
            who=job.owner_id,
            distributed=True,
        )
        stop = threading.Event()

        def report() -> None:
            while not stop.wait(1.0):
                ctx.set_progress(control.describe())

        reporter = threading.Thread(target=report, name=f"progress-{job.job_id}", daemon=True)
        reporter.start()
        ctx.results_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.results_dir / f"result.{prepared.extension.lstrip('.')}"
        try:
            with path.open("wb") as out:
                for chunk in prepared.chunks:
                    out.write(chunk)
        finally:
            stop.set()
            reporter.join(5)
        stream = prepared.stream
        querylog.finished(
            querylog.from_stream("async", job.owner_id, query, stream, started, job_id=job.job_id)
        )
        ctx.set_progress(f"done: {stream.rows} rows{' (overflow)' if stream.overflow else ''}")
        return [JobResult(id="result", mime_type=prepared.media_type, path=path.name, rows=stream.rows)]
    except Exception as exc:
        err = as_tap_error(exc)
        text = query.query if query else querylog.query_param(fold(job.parameters))
        querylog.finished(
            querylog.from_error(
                "async", job.owner_id, text, err.http_status, ctx.cancel_reason or err.message, started,
                job_id=job.job_id, cancelled=ctx.cancelled.is_set(), request=query,
            )
        )
        if ctx.cancelled.is_set():
            raise
        ctx.results_dir.mkdir(parents=True, exist_ok=True)
        (ctx.results_dir / "error.xml").write_bytes(dali_error_votable(err.message))
        ctx.set_error_document("error.xml")
        raise err from exc


__all__ = ["AsyncJobs", "OwnerGroups", "TapError", "make_async_jobs"]
