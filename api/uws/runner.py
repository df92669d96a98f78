"""The worker pool that runs UWS jobs: PENDING -(RUN)-> QUEUED -> EXECUTING -> COMPLETED / ERROR / ABORTED.

What the integrator supplies is a `JobExecutor`: a callable that does the work of one job (e.g. run an
ADQL query with DuckDB and write a VOTable into `ctx.results_dir`) and returns its results. Everything
else — queueing, phases, timestamps, execution-duration limits, ABORT, destruction, restart recovery — is
here, so the executor stays a plain function that is easy to test.

Threads of a runner:
- `workers` worker threads take job ids from a bounded queue (a full queue answers 503 to RUN rather than
  letting work pile up without limit);
- one monitor thread enforces execution durations, notices ABORT/DELETE made by other processes, beats the
  runner's heartbeat, sweeps jobs past their destruction time and fails jobs left behind by dead processes.

Multi-process deployments (several uvicorn workers sharing one job store on one host) — what holds:
- a job runs in the process that accepted its RUN (each process has its own queue and threads);
- only the process running a job fires its cancel callbacks (it alone holds the DuckDB connection). An
  ABORT or DELETE received by another process changes the phase in the database at once; the running
  process notices within `poll_interval` seconds and cancels;
- every process beats a heartbeat in the store; a process that starts, and every sweep, fails the
  QUEUED/EXECUTING jobs of runners with no recent heartbeat (crashed processes): no job stays stuck.
Limits: a running job keeps its worker thread until the executor returns, even after ABORT or timeout (the
phase is final at once, but an executor that ignores `cancelled` and its callbacks still holds the thread);
a process stalled for longer than `3 * heartbeat_interval` (e.g. SIGSTOP) is taken for dead and its jobs
are failed; queue limits are per process, not global; the store must be on a local disk of the host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from api.uws.store import (
    ANY_OWNER,
    FINAL_PHASES,
    NOT_STARTED_PHASES,
    ErrorSummary,
    InvalidPhase,
    Job,
    JobNotFound,
    JobResult,
    JobStore,
    Owner,
    Phase,
    UWSError,
    utcnow,
)

log = logging.getLogger(__name__)

#: seconds between two progress writes of one job
PROGRESS_INTERVAL = 0.25
#: executionDuration is an xs:int in UWS.xsd
MAX_XS_INT = 2**31 - 1


class JobContext:
    """What a running job may use besides its `Job`: where to write, whether to stop, how to report.

    `cancelled` is set, and the `on_cancel` callbacks are called (once each, from the monitor or the
    request thread), when the job is aborted, deleted, or exceeds its execution duration. An executor
    should check `cancelled` between steps and register a callback that interrupts a blocking call
    (e.g. `duckdb_connection.interrupt`).
    """

    def __init__(self, job: Job, store: JobStore):
        self.job_id = job.job_id
        self.results_dir: Path = job.results_dir
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        self._store = store
        self._callbacks: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._last_progress: str | None = None
        self._last_progress_at = -PROGRESS_INTERVAL
        self._pending_progress: str | None = None
        self.error_document: tuple[str, str] | None = None

    def set_progress(self, text: str) -> None:
        """Show how far the job is (e.g. "partitions 3/17"); stored, so every process can show it.

        Writes at most every `PROGRESS_INTERVAL` seconds (each is a database write); a report held back by
        that throttle is written by a later one or when the executor returns, so the last one always shows.
        """
        with self._lock:
            now = time.monotonic()
            if text == self._last_progress or now - self._last_progress_at < PROGRESS_INTERVAL:
                self._pending_progress = None if text == self._last_progress else text
                return
            self._last_progress, self._last_progress_at, self._pending_progress = text, now, None
        self._store.set_progress(self.job_id, text)

    def _flush_progress(self) -> None:
        with self._lock:
            text, self._pending_progress = self._pending_progress, None
            if text is None:
                return
            self._last_progress = text
        self._store.set_progress(self.job_id, text)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Register `callback()` to be called on ABORT / timeout (at once if that already happened)."""
        with self._lock:
            if not self.cancelled.is_set():
                self._callbacks.append(callback)
                return
        _call_quietly(callback, self.job_id)

    def set_error_document(self, filename: str, mime_type: str = "application/x-votable+xml") -> None:
        """Declare a file in `results_dir` as the job's error document (served at /{id}/error).

        Call it before raising: e.g. a DALI error VOTable written by the executor."""
        self.error_document = (filename, mime_type)

    def _cancel(self, reason: str) -> None:
        with self._lock:
            if self.cancelled.is_set():
                return
            self.cancel_reason = reason
            self.cancelled.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _call_quietly(callback, self.job_id)


def _call_quietly(callback: Callable[[], object], job_id: str) -> None:
    try:
        callback()
    except Exception:  # a failing interrupt must not stop the other callbacks nor the runner
        log.exception("cancel callback of job %s failed", job_id)


class JobExecutor(Protocol):
    """Runs one job; returns its results (files written under `ctx.results_dir`, or external hrefs).

    Raise to fail the job: the message is `str(exc)`; an exception with an `http_status` attribute below 500
    is the user's fault (a fatal error shown as is), anything else is logged with its traceback and shown
    as an internal error with the exception's first line.
    """

    def __call__(self, job: Job, ctx: JobContext) -> list[JobResult]: ...


@dataclass
class _Running:
    ctx: JobContext
    deadline: float | None  # time.monotonic() value; None = unlimited
    duration: int
    expired: bool = field(default=False)


class JobRunner:
    """A bounded pool of worker threads running UWS jobs from one `JobStore`.

    `default_execution_duration` / `max_execution_duration` are in seconds (0 = unlimited; with a maximum,
    a request for "unlimited" gets the maximum). `destruction_interval` is how long after creation a job
    is destroyed unless the client asks otherwise, `max_destruction_interval` the longest it may ask for.
    """

    def __init__(
        self,
        store: JobStore,
        executor: JobExecutor,
        *,
        workers: int = 2,
        queue_size: int = 100,
        default_execution_duration: int = 600,
        max_execution_duration: int = 3600,
        destruction_interval: timedelta = timedelta(days=7),
        max_destruction_interval: timedelta | None = None,
        sweep_interval: float = 60.0,
        poll_interval: float = 1.0,
        heartbeat_interval: float = 10.0,
    ):
        if workers < 1:
            raise ValueError("a job runner needs at least one worker")
        self.store = store
        self.executor = executor
        self.workers = workers
        self.default_execution_duration = int(default_execution_duration)
        self.max_execution_duration = int(max_execution_duration)
        self.destruction_interval = destruction_interval
        self.max_destruction_interval = max_destruction_interval or destruction_interval
        self.sweep_interval = sweep_interval
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_size)
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    # ---------------------------------------------------------------------------- lifecycle
    @property
    def liveness_window(self) -> timedelta:
        return timedelta(seconds=3 * self.heartbeat_interval)

    def start(self) -> JobRunner:
        """Announce this runner, fail jobs orphaned by dead processes, start the threads."""
        if self._started:
            return self
        self._started = True
        self._stopping.clear()
        self._queue = queue.Queue(maxsize=self._queue.maxsize)  # what a previous stop() left is void
        self.store.heartbeat(self.runner_id)
        self.store.recover_after_restart(spare_runners=self.store.live_runners(self.liveness_window))
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"uws-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        monitor = threading.Thread(target=self._monitor, name="uws-monitor", daemon=True)
        monitor.start()
        self._threads.append(monitor)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel running jobs, fail queued ones (they would never run), stop the threads."""
        if not self._started:
            return
        self._stopping.set()
        self._wake.set()
        with self._lock:
            running = list(self._running.values())
        for run in running:
            run.ctx._cancel("the service is shutting down")
        self.store.fail_jobs_of_runner(self.runner_id)
        for _ in range(self.workers):
            with contextlib.suppress(queue.Full):  # workers leave on _stopping anyway
                self._queue.put(None, timeout=1.0)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.store.unregister_runner(self.runner_id)
        self._threads.clear()
        self._started = False

    def __enter__(self) -> JobRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------- limits
    def clamp_execution_duration(self, seconds: int) -> int:
        """The duration a job gets when `seconds` is asked for (UWS lets the service choose)."""
        if seconds < 0:
            raise UWSError("EXECUTIONDURATION must be a whole number of seconds >= 0 (0 = unlimited)")
        if self.max_execution_duration > 0 and (seconds == 0 or seconds > self.max_execution_duration):
            return self.max_execution_duration
        return min(seconds, MAX_XS_INT)

    def clamp_destruction(self, when: datetime, now: datetime | None = None) -> datetime:
        latest = (now or utcnow()) + self.max_destruction_interval
        return min(when, latest)

    def new_job_settings(self, now: datetime | None = None) -> tuple[int, datetime]:
        """(executionDuration, destruction) of a job created now."""
        now = now or utcnow()
        return (self.clamp_execution_duration(self.default_execution_duration),
                now + self.destruction_interval)

    # ---------------------------------------------------------------------------- control
    def run(self, job_id: str, owner: Owner = ANY_OWNER) -> Job:
        """PHASE=RUN: queue a PENDING job. Running an already queued/running job changes nothing."""
        job = self.store.require(job_id, owner)
        if job.phase in (Phase.QUEUED, Phase.EXECUTING):
            return job
        if job.phase not in NOT_STARTED_PHASES:
            raise InvalidPhase(f"the job is {job.phase}: only a PENDING job can be run")
        if self._stopping.is_set() or not self._started:
            raise UWSError("the service is not accepting jobs right now; try again later", 503)
        if not self.store.transition(job_id, Phase.QUEUED, expected=NOT_STARTED_PHASES,
                                     runner_id=self.runner_id):
            return self.store.require(job_id, owner)  # someone else moved it meanwhile
        try:
            self._queue.put_nowait(job_id)
        except queue.Full:
            self.store.transition(job_id, Phase.PENDING, expected={Phase.QUEUED}, runner_id=None)
            raise UWSError("too many jobs are queued; run this one again later", 503) from None
        return self.store.require(job_id, owner)

    def abort(self, job_id: str, owner: Owner = ANY_OWNER, reason: str = "aborted") -> Job:
        """PHASE=ABORT: a job not yet finished becomes ABORTED at once; a running one is also cancelled.

        A QUEUED job stays in the queue but is skipped: the worker only starts QUEUED jobs."""
        job = self.store.require(job_id, owner)
        if job.phase not in FINAL_PHASES:
            self.store.transition(
                job_id, Phase.ABORTED,
                expected={Phase.PENDING, Phase.HELD, Phase.QUEUED, Phase.EXECUTING, Phase.SUSPENDED,
                          Phase.UNKNOWN},
                end_time=utcnow(),
            )
        self._cancel_local(job_id, reason)
        return self.store.require(job_id, owner)

    def delete(self, job_id: str, owner: Owner = ANY_OWNER) -> bool:
        """Destroy a job: cancel it if it runs here, then remove its record and files."""
        if self.store.get(job_id, owner) is None:
            return False
        self._cancel_local(job_id, "deleted")
        return self.store.delete(job_id, owner)

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Destroy every job past its destruction time; returns their ids."""
        gone = []
        for job_id in self.store.expired(now):
            if self.delete(job_id):
                gone.append(job_id)
        if gone:
            log.info("UWS: destroyed %d job(s) past their destruction time", len(gone))
        return gone

    def running_jobs(self) -> list[str]:
        """Ids of the jobs executing in this process."""
        with self._lock:
            return list(self._running)

    def _cancel_local(self, job_id: str, reason: str) -> None:
        with self._lock:
            run = self._running.get(job_id)
        if run is not None:
            run.ctx._cancel(reason)

    # ---------------------------------------------------------------------------- workers
    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            try:
                if job_id is None or self._stopping.is_set():
                    return
                self._execute(job_id)
            except Exception:  # the worker must survive anything a job does
                log.exception("UWS worker failed on job %s", job_id)
            finally:
                self._queue.task_done()

    def _execute(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.phase != Phase.QUEUED:
            return  # aborted or deleted while queued: never run it
        ctx = JobContext(job, self.store)
        duration = job.execution_duration
        deadline = time.monotonic() + duration if duration > 0 else None
        with self._lock:  # registered before EXECUTING, so an ABORT in between finds and cancels it
            self._running[job_id] = _Running(ctx, deadline, duration)
        try:
            started = utcnow()
            if not self.store.transition(job_id, Phase.EXECUTING, expected={Phase.QUEUED},
                                         start_time=started, runner_id=self.runner_id):
                return
            self._wake.set()  # the monitor must learn the new deadline
            job = replace(job, phase=Phase.EXECUTING, start_time=started, runner_id=self.runner_id)
            ctx.results_dir.mkdir(parents=True, exist_ok=True)
            self._run_executor(job, ctx)
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def _run_executor(self, job: Job, ctx: JobContext) -> None:
        job_id = job.job_id
        try:
            try:
                results = self.executor(job, ctx)
            finally:
                ctx._flush_progress()
            stored = [self._normalise_result(job, r) for r in (results or [])]
        except Exception as exc:
            if ctx.cancelled.is_set():
                # the phase is already ABORTED/ERROR; the exception is the interruption we asked for
                log.debug("job %s ended after cancellation (%s): %s", job_id, ctx.cancel_reason, exc)
                return
            error = self._error_summary(job, ctx, exc)
            self.store.transition(job_id, Phase.ERROR, expected={Phase.EXECUTING}, end_time=utcnow(),
                                  error=error)
            return
        self.store.transition(job_id, Phase.COMPLETED, expected={Phase.EXECUTING}, end_time=utcnow(),
                              results=stored)

    def _error_summary(self, job: Job, ctx: JobContext, exc: Exception) -> ErrorSummary:
        status = getattr(exc, "http_status", None)
        if isinstance(status, int) and status < 500:
            message, kind = str(exc) or type(exc).__name__, "fatal"
        else:
            log.error("job %s failed", job.job_id, exc_info=exc)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            message = f"internal error while running the job ({type(exc).__name__}: {first})"
            kind = "transient"
        document = mime = None
        if ctx.error_document is not None:
            name, mime_type = ctx.error_document
            path = self._inside(job, ctx.results_dir / name)
            if path is not None and path.is_file():
                document, mime = str(path.relative_to(job.job_dir)), mime_type
        return ErrorSummary(message=message, type=kind, has_detail=True, document=document, mime_type=mime)

    @staticmethod
    def _inside(job: Job, path: Path) -> Path | None:
        resolved = path.resolve()
        root = job.job_dir.resolve()
        return resolved if resolved.is_relative_to(root) else None

    def _normalise_result(self, job: Job, result: JobResult) -> JobResult:
        """Result paths relative to the job folder, sizes filled in; refuse files outside the folder."""
        if result.path is None:
            if not result.href:
                raise RuntimeError(f"result {result.id!r} has neither a file nor an href")
            return result
        path = Path(result.path)
        if not path.is_absolute():
            path = job.results_dir / path
        inside = self._inside(job, path)
        if inside is None:
            raise RuntimeError(f"result {result.id!r} is outside the job's folder")
        if not inside.is_file():
            raise RuntimeError(f"result {result.id!r} was announced but its file was not written")
        size = result.size if result.size is not None else inside.stat().st_size
        return replace(result, path=str(inside.relative_to(job.job_dir.resolve())), size=size)

    # ---------------------------------------------------------------------------- monitor
    def _monitor(self) -> None:
        now = time.monotonic()
        next_poll = now + self.poll_interval
        next_beat = now + self.heartbeat_interval
        next_sweep = now  # sweep once at start-up: jobs may have expired while the service was down
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                self._expire_overdue(now)
                if now >= next_poll:
                    next_poll = now + self.poll_interval
                    self._poll_foreign_changes()
                if now >= next_beat:
                    next_beat = now + self.heartbeat_interval
                    self.store.heartbeat(self.runner_id)
                if now >= next_sweep:
                    next_sweep = now + self.sweep_interval
                    self.sweep()
                    self.store.recover_after_restart(
                        spare_runners=self.store.live_runners(self.liveness_window) | {self.runner_id}
                    )
                with self._lock:
                    deadlines = [r.deadline for r in self._running.values()
                                 if r.deadline is not None and not r.expired]
                wake_at = min([next_poll, next_beat, next_sweep, *deadlines])
            except Exception:  # e.g. a locked database for longer than busy_timeout: try again soon
                log.exception("UWS monitor iteration failed")
                wake_at = time.monotonic() + 1.0
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            self._wake.clear()

    def _expire_overdue(self, now: float) -> None:
        with self._lock:
            overdue = [(job_id, run) for job_id, run in self._running.items()
                       if run.deadline is not None and not run.expired and now >= run.deadline]
            for _, run in overdue:
                run.expired = True
        for job_id, run in overdue:
            message = f"the query exceeded its execution duration of {run.duration} s"
            self.store.transition(
                job_id, Phase.ERROR, expected={Phase.EXECUTING}, end_time=utcnow(),
                error=ErrorSummary(message=message, type="fatal", has_detail=True),
            )
            run.ctx._cancel("execution duration exceeded")

    def _poll_foreign_changes(self) -> None:
        """Cancel jobs running here that another process aborted, deleted or failed."""
        with self._lock:
            ids = list(self._running)
        if not ids:
            return
        phases = self.store.phases(ids)
        for job_id in ids:
            phase = phases.get(job_id)
            if phase is None:
                self._cancel_local(job_id, "deleted")
            elif phase != Phase.EXECUTING and phase != Phase.QUEUED:
                self._cancel_local(job_id, f"job became {phase}")


__all__ = ["JobContext", "JobExecutor", "JobNotFound", "JobRunner"]
