"""The persistent UWS job store: one SQLite file shared by every thread and every worker process of a host.

Why SQLite: async jobs must survive a restart (DESIGN.md §4) and be visible to every uvicorn worker process
behind the same port, without a database server to run. WAL mode lets readers proceed while one writer
commits; every read-modify-write runs inside `BEGIN IMMEDIATE`, so two processes changing the same job
serialise on the file lock instead of overwriting each other. Each thread has its own connection (sqlite3
connections must not be shared between threads that use them at the same time).

Why phase changes are conditional (`transition(..., expected=...)`): the runner, the ABORT request, the
execution-duration timer and the destruction sweeper may race for the same job, possibly in different
processes. An `UPDATE ... WHERE phase IN (...)` decides atomically who wins; the loser sees `False` and
leaves the job alone, so a job aborted while it finished is ABORTED, never both.

Files of a job (uploads, results, error documents) live in `jobs_dir/<job_id>/`; paths stored in the
database are relative to that folder, so the folder can move with the database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)


class Phase(StrEnum):
    """UWS 1.1 execution phases (the `uws:ExecutionPhase` enumeration)."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    ABORTED = "ABORTED"
    UNKNOWN = "UNKNOWN"
    HELD = "HELD"
    SUSPENDED = "SUSPENDED"
    ARCHIVED = "ARCHIVED"


#: phases in which a blocking WAIT may block (UWS 1.1: only "active" phases block)
ACTIVE_PHASES: Final = frozenset({Phase.PENDING, Phase.QUEUED, Phase.EXECUTING})
#: phases a job never leaves by itself
FINAL_PHASES: Final = frozenset({Phase.COMPLETED, Phase.ERROR, Phase.ABORTED, Phase.ARCHIVED})
#: phases whose job has not started yet (its settings may still change)
NOT_STARTED_PHASES: Final = frozenset({Phase.PENDING, Phase.HELD})
#: phases a dead process may have left behind: nobody will ever finish these jobs
RUNNING_PHASES: Final = frozenset({Phase.QUEUED, Phase.EXECUTING})

RESTART_MESSAGE: Final = "the service restarted while this job was running; resubmit it"

_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class _AnyOwner:
    """Sentinel: internal callers (runner, sweeper) that may see every job whatever its owner."""

    def __repr__(self) -> str:
        return "ANY_OWNER"


ANY_OWNER: Final = _AnyOwner()
Owner = str | None | _AnyOwner


# --------------------------------------------------------------------------------------------- errors
class UWSError(Exception):
    """An error a UWS request can be answered with: an HTTP status and a message a person can act on."""

    http_status: int = 400

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        if http_status is not None:
            self.http_status = http_status


class JobNotFound(UWSError):
    """No such job *for this caller*: someone else's job is reported exactly like a missing one."""

    http_status = 404

    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r} here (it may have been destroyed)")


class InvalidPhase(UWSError):
    """The request is not allowed in the job's current phase (e.g. changing parameters of a running job)."""

    http_status = 400


# --------------------------------------------------------------------------------------------- time
def utcnow() -> datetime:
    return datetime.now(UTC)


def format_timestamp(when: datetime) -> str:
    """Fixed-width UTC text, so that SQL string comparison orders instants correctly."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?$")


def parse_iso8601(text: str) -> datetime:
    """An ISO-8601 instant as UWS/DALI clients send it; no zone means UTC (DALI timestamps are UTC).

    Accepts `YYYY`, `YYYY-MM`, dates, date-times with or without fraction, `Z` or an offset.
    Raises `UWSError` (400) with a readable message otherwise.
    """
    value = text.strip()
    m = _PARTIAL_DATE.match(value)
    try:
        if m:
            when = datetime(int(m.group(1)), int(m.group(2) or 1), 1)
        else:
            if value.endswith(("Z", "z")):
                value = value[:-1] + "+00:00"
            when = datetime.fromisoformat(value)
    except ValueError:
        raise UWSError(f"{text!r} is not an ISO-8601 date/time such as 2026-01-31T12:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


# --------------------------------------------------------------------------------------------- model
class Parameters(Sequence[tuple[str, str]]):
    """Ordered, multi-valued job parameters; names keep the client's spelling but match case-insensitively.

    TAP and DALI say parameter names are case-insensitive while values are not; UWS shows them back as sent.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._items: tuple[tuple[str, str], ...] = tuple((str(n), str(v)) for n, v in items)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of `name` (any case), or `default`."""
        key = name.lower()
        for n, v in self._items:
            if n.lower() == key:
                return v
        return default

    def getall(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def has(self, name: str) -> bool:
        key = name.lower()
        return any(n.lower() == key for n, _ in self._items)

    def names(self) -> list[str]:
        return [n for n, _ in self._items]

    def updated(self, updates: Iterable[tuple[str, str]], accumulate: Collection[str] = ()) -> Parameters:
        """These parameters with `updates` applied: a name given replaces all its old values (UWS: the
        POST sets the parameter), except names in `accumulate` (lower case), whose values are appended
        (TAP UPLOAD: each POST adds tables)."""
        updates = list(updates)
        acc = {a.lower() for a in accumulate}
        replaced = {n.lower() for n, _ in updates} - acc
        kept = [(n, v) for n, v in self._items if n.lower() not in replaced]
        return Parameters([*kept, *updates])

    def to_json(self) -> str:
        return json.dumps([list(p) for p in self._items])

    @classmethod
    def from_json(cls, text: str) -> Parameters:
        return cls((n, v) for n, v in json.loads(text))

    def __getitem__(self, index):  # type: ignore[override]
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parameters) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Parameters({list(self._items)!r})"


@dataclass(frozen=True)
class Upload:
    """A table the client uploaded (TAP UPLOAD=table,URI) or an inline file part of the request.

    `source` is the URI as given (`param:part` or an http(s) URL the executor must fetch itself);
    `path` is where the inline part was saved, relative to the job folder (None for a URL).
    `table` is None for a file part that no UPLOAD parameter names.
    """

    table: str | None
    source: str
    path: str | None = None


@dataclass(frozen=True)
class JobResult:
    """One result of a job: a file in the job's results folder (`path`) or an external `href`.

    `path` may be relative to the results folder or absolute inside it; the runner stores it relative to
    the job folder. `size` is filled in from the file when left None. `rows` is informative (shown as a
    custom attribute of uws:result).
    """

    id: str
    mime_type: str = "application/x-votable+xml"
    path: str | None = None
    href: str | None = None
    size: int | None = None
    rows: int | None = None


@dataclass(frozen=True)
class ErrorSummary:
    """uws:errorSummary, plus where the fuller error document is, if the executor wrote one."""

    message: str
    type: str = "fatal"  # "fatal" or "transient"
    has_detail: bool = True
    document: str | None = None  # relative to the job folder
    mime_type: str | None = None


@dataclass(frozen=True)
class Job:
    """A snapshot of one job as stored; change it through the store, not by mutating this."""

    job_id: str
    owner_id: str | None
    phase: Phase
    creation_time: datetime
    job_dir: Path
    run_id: str | None = None
    quote: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    execution_duration: int = 0
    destruction: datetime | None = None
    parameters: Parameters = field(default_factory=Parameters)
    uploads: tuple[Upload, ...] = ()
    results: tuple[JobResult, ...] = ()
    error: ErrorSummary | None = None
    progress: str | None = None
    runner_id: str | None = None

    @property
    def results_dir(self) -> Path:
        return self.job_dir / "results"

    @property
    def uploads_dir(self) -> Path:
        return self.job_dir / "uploads"

    def param(self, name: str, default: str | None = None) -> str | None:
        """First value of a parameter, case-insensitively."""
        return self.parameters.get(name, default)

    def resolve(self, relative: str) -> Path:
        """Absolute path of a file recorded relative to the job folder."""
        return self.job_dir / relative

    def upload_files(self) -> list[tuple[str | None, Path]]:
        """(table name, local file) of every upload saved with the job."""
        return [(u.table, self.resolve(u.path)) for u in self.uploads if u.path]

    def result(self, result_id: str) -> JobResult | None:
        return next((r for r in self.results if r.id == result_id), None)


# --------------------------------------------------------------------------------------------- store
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    run_id TEXT,
    owner_id TEXT,
    phase TEXT NOT NULL,
    quote TEXT,
    creation_time TEXT NOT NULL,
    start_time TEXT,
    end_time TEXT,
    execution_duration INTEGER NOT NULL DEFAULT 0,
    destruction TEXT,
    parameters TEXT NOT NULL DEFAULT '[]',
    uploads TEXT NOT NULL DEFAULT '[]',
    results TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    progress TEXT,
    runner_id TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner_id, creation_time);
CREATE INDEX IF NOT EXISTS jobs_by_destruction ON jobs (destruction);
CREATE INDEX IF NOT EXISTS jobs_by_phase ON jobs (phase);
CREATE TABLE IF NOT EXISTS runners (
    runner_id TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER,
    heartbeat TEXT NOT NULL
);
"""

_COLUMNS = (
    "job_id, run_id, owner_id, phase, quote, creation_time, start_time, end_time, execution_duration, "
    "destruction, parameters, uploads, results, error, progress, runner_id"
)

#: fields `transition` may set besides the phase, and how each is stored
_FIELD_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "start_time": lambda v: None if v is None else format_timestamp(v),
    "end_time": lambda v: None if v is None else format_timestamp(v),
    "error": lambda v: None if v is None else json.dumps(v.__dict__),
    "results": lambda v: json.dumps([r.__dict__ for r in v]),
    "runner_id": lambda v: v,
    "progress": lambda v: v,
}


class JobStore:
    """UWS jobs in one SQLite file (WAL), safe across threads and across processes of one host.

    Network file systems are not supported (SQLite locking over NFS is unreliable); keep the file on a
    local disk of the host that runs the worker processes.
    """

    def __init__(self, path: str | os.PathLike[str], jobs_dir: str | os.PathLike[str] | None = None,
                 *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.jobs_dir = Path(jobs_dir) if jobs_dir is not None else self.path.parent / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._closed = False
        with self._write() as db:
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(statement)

    # ---------------------------------------------------------------------------- connections
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise RuntimeError("the job store is closed")
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.db = db
            with self._connections_lock:
                self._all_connections.append(db)
        return db

    class _Tx:
        """`BEGIN IMMEDIATE` ... `COMMIT`: takes the write lock up front so read-modify-write is atomic."""

        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")

    def _write(self) -> JobStore._Tx:
        return JobStore._Tx(self._db())

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        self._closed = True
        with self._connections_lock:
            for db in self._all_connections:
                with contextlib.suppress(sqlite3.Error):  # closing is best effort
                    db.close()
            self._all_connections.clear()
        self._local = threading.local()

    # ---------------------------------------------------------------------------- listeners
    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call `callback(job_id)` after a job made *through this store object* is created, changes phase,
        parameters, duration or destruction, or is deleted (progress and quote updates are not announced).

        Changes made by other processes are not seen here; waiters must also poll (the router does)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self, job_id: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(job_id)
            except Exception:  # a broken listener must not break the job machinery
                log.exception("UWS job listener failed for %s", job_id)

    # ---------------------------------------------------------------------------- helpers
    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID_RE.match(job_id):
            raise JobNotFound(job_id)
        return self.jobs_dir / job_id

    def _row_to_job(self, row: tuple) -> Job:
        (job_id, run_id, owner_id, phase, quote, creation, start, end, duration, destruction, params,
         uploads, results, error, progress, runner_id) = row
        return Job(
            job_id=job_id,
            run_id=run_id,
            owner_id=owner_id,
            phase=Phase(phase),
            quote=parse_timestamp(quote),
            creation_time=parse_timestamp(creation),  # type: ignore[arg-type]
            start_time=parse_timestamp(start),
            end_time=parse_timestamp(end),
            execution_duration=int(duration),
            destruction=parse_timestamp(destruction),
            parameters=Parameters.from_json(params),
            uploads=tuple(Upload(**u) for u in json.loads(uploads)),
            results=tuple(JobResult(**r) for r in json.loads(results)),
            error=None if error is None else ErrorSummary(**json.loads(error)),
            progress=progress,
            runner_id=runner_id,
            job_dir=self.jobs_dir / job_id,
        )

    @staticmethod
    def _owner_clause(owner: Owner) -> tuple[str, tuple]:
        if isinstance(owner, _AnyOwner):
            return "", ()
        return " AND owner_id IS ?", (owner,)

    def _select_one(self, db: sqlite3.Connection, job_id: str, owner: Owner) -> Job | None:
        if not _JOB_ID_RE.match(job_id):
            return None
        clause, args = self._owner_clause(owner)
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?{clause}", (job_id, *args)).fetchone()
        return None if row is None else self._row_to_job(row)

    # ---------------------------------------------------------------------------- operations
    def new_job_id(self) -> str:
        """128 random bits: the job URL is all an anonymous client needs, so it must be unguessable."""
        return secrets.token_hex(16)

    def create(
        self,
        *,
        owner_id: str | None,
        parameters: Iterable[tuple[str, str]] = (),
        uploads: Iterable[Upload] = (),
        run_id: str | None = None,
        execution_duration: int = 0,
        destruction: datetime | None = None,
        quote: datetime | None = None,
        job_id: str | None = None,
    ) -> Job:
        """A new PENDING job, with its folder (results/ and uploads/) created."""
        job_id = job_id or self.new_job_id()
        if not _JOB_ID_RE.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        params = parameters if isinstance(parameters, Parameters) else Parameters(parameters)
        job_dir = self.jobs_dir / job_id
        (job_dir / "results").mkdir(parents=True, exist_ok=True)
        (job_dir / "uploads").mkdir(parents=True, exist_ok=True)
        with self._write() as db:
            db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, '[]', NULL,"
                " NULL, NULL)",
                (
                    job_id,
                    run_id,
                    owner_id,
                    Phase.PENDING.value,
                    None if quote is None else format_timestamp(quote),
                    format_timestamp(utcnow()),
                    int(execution_duration),
                    None if destruction is None else format_timestamp(destruction),
                    params.to_json(),
                    json.dumps([u.__dict__ for u in uploads]),
                ),
            )
            job = self._select_one(db, job_id, ANY_OWNER)
        self._notify(job_id)
        assert job is not None
        return job

    def get(self, job_id: str, owner: Owner = ANY_OWNER) -> Job | None:
        """The job, or None if it does not exist or belongs to someone else (privacy: same answer)."""
        return self._select_one(self._db(), job_id, owner)

    def require(self, job_id: str, owner: Owner = ANY_OWNER) -> Job:
        job = self.get(job_id, owner)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(
        self,
        owner: Owner,
        *,
        phases: Collection[Phase] | None = None,
        after: datetime | None = None,
        last: int | None = None,
    ) -> list[Job]:
        """The caller's jobs, filtered as UWS 1.1 job lists are.

        PHASE: any of `phases` (without it, ARCHIVED jobs are left out, as UWS 1.1 asks);
        AFTER: created strictly after `after`; LAST: the `last` most recently created, newest first.
        Without LAST the list is in creation order.
        """
        where, args = ["1 = 1"], []
        if not isinstance(owner, _AnyOwner):
            where.append("owner_id IS ?")
            args.append(owner)
        if phases:
            where.append(f"phase IN ({', '.join('?' * len(phases))})")
            args.extend(Phase(p).value for p in phases)
        else:
            where.append("phase != ?")
            args.append(Phase.ARCHIVED.value)
        if after is not None:
            where.append("creation_time > ?")
            args.append(format_timestamp(after))
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
        if last is not None:
            sql += " ORDER BY creation_time DESC, rowid DESC LIMIT ?"
            args.append(int(last))
        else:
            sql += " ORDER BY creation_time, rowid"
        return [self._row_to_job(row) for row in self._db().execute(sql, args)]

    def update_parameters(
        self,
        job_id: str,
        owner: Owner,
        updates: Iterable[tuple[str, str]],
        *,
        uploads: Iterable[Upload] = (),
        accumulate: Collection[str] = (),
        run_id: str | None = None,
    ) -> Job:
        """Set parameters of a job that has not started (UWS: parameters are frozen once it runs)."""
        updates, uploads = list(updates), list(uploads)
        with self._write() as db:
            job = self._select_one(db, job_id, owner)
            if job is None:
                raise JobNotFound(job_id)
            if job.phase not in NOT_STARTED_PHASES:
                raise InvalidPhase(
                    f"the job is {job.phase}: its parameters can only be changed while it is PENDING"
                )
            params = job.parameters.updated(updates, accumulate)
            db.execute(
                "UPDATE jobs SET parameters = ?, uploads = ?, run_id = ? WHERE job_id = ?",
                (
                    params.to_json(),
                    json.dumps([u.__dict__ for u in (*job.uploads, *uploads)]),
                    job.run_id if run_id is None else run_id,
                    job_id,
                ),
            )
            job = self._select_one(db, job_id, ANY_OWNER)
        self._notify(job_id)
        assert job is not None
        return job

    def transition(
        self, job_id: str, phase: Phase, *, expected: Collection[Phase] | None = None, **fields: Any
    ) -> bool:
        """Move a job to `phase` (setting `fields` too) if it is in one of the `expected` phases.

        Returns False, changing nothing, when the job is gone or in another phase: the caller lost a race
        (ABORT vs completion, timer vs completion) and must leave the job alone.
        Allowed fields: start_time, end_time, error, results, runner_id, progress.
        """
        sets, args = ["phase = ?"], [Phase(phase).value]
        for name, value in fields.items():
            if name not in _FIELD_ENCODERS:
                raise TypeError(f"transition() cannot set {name!r}")
            sets.append(f"{name} = ?")
            args.append(_FIELD_ENCODERS[name](value))
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?"
        args.append(job_id)
        if expected is not None:
            expected = list(expected)
            if not expected:
                return False
            sql += f" AND phase IN ({', '.join('?' * len(expected))})"
            args.extend(Phase(p).value for p in expected)
        with self._write() as db:
            changed = db.execute(sql, args).rowcount > 0
        if changed:
            self._notify(job_id)
        return changed

    def set_phase(self, job_id: str, phase: Phase, *, expected: Collection[Phase] | None = None,
                  **fields: Any) -> bool:
        """Alias of `transition` (reads better at call sites that force a phase)."""
        return self.transition(job_id, phase, expected=expected, **fields)

    def set_execution_duration(self, job_id: str, owner: Owner, seconds: int) -> Job:
        """Change the run-time limit of a job that has not started (a running job keeps its deadline)."""
        if seconds < 0:
            raise UWSError("EXECUTIONDURATION must be a whole number of seconds >= 0 (0 = unlimited)")
        with self._write() as db:
            job = self._select_one(db, job_id, owner)
            if job is None:
                raise JobNotFound(job_id)
            if job.phase not in NOT_STARTED_PHASES | {Phase.QUEUED}:
                raise InvalidPhase(
                    f"the job is {job.phase}: its execution duration can only be changed before it runs"
                )
            db.execute("UPDATE jobs SET execution_duration = ? WHERE job_id = ?", (int(seconds), job_id))
            job = replace(job, execution_duration=int(seconds))
        self._notify(job_id)
        return job

    def set_destruction(self, job_id: str, owner: Owner, when: datetime | None) -> Job:
        with self._write() as db:
            job = self._select_one(db, job_id, owner)
            if job is None:
                raise JobNotFound(job_id)
            db.execute(
                "UPDATE jobs SET destruction = ? WHERE job_id = ?",
                (None if when is None else format_timestamp(when), job_id),
            )
            job = replace(job, destruction=when)
        self._notify(job_id)
        return job

    def set_quote(self, job_id: str, when: datetime | None) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET quote = ? WHERE job_id = ?",
                       (None if when is None else format_timestamp(when), job_id))

    def set_progress(self, job_id: str, text: str | None) -> None:
        """Not announced to listeners: executors may report often, and waiters only care about phases."""
        with self._write() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE job_id = ?", (text, job_id))

    def delete(self, job_id: str, owner: Owner = ANY_OWNER) -> bool:
        """Remove the job and its folder. False if there was no such job (for this owner)."""
        if not _JOB_ID_RE.match(job_id):
            return False
        clause, args = self._owner_clause(owner)
        with self._write() as db:
            deleted = db.execute(f"DELETE FROM jobs WHERE job_id = ?{clause}", (job_id, *args)).rowcount > 0
        if deleted:
            shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
            self._notify(job_id)
        return deleted

    def expired(self, now: datetime | None = None) -> list[str]:
        """Ids of jobs whose destruction time has come."""
        stamp = format_timestamp(now or utcnow())
        rows = self._db().execute(
            "SELECT job_id FROM jobs WHERE destruction IS NOT NULL AND destruction <= ? ORDER BY destruction",
            (stamp,),
        )
        return [r[0] for r in rows]

    def recover_after_restart(self, spare_runners: Collection[str] = ()) -> list[str]:
        """Turn every QUEUED/EXECUTING job into ERROR: the process that would have finished it is gone.

        Nothing is lost (the job, its parameters and uploads stay) and nothing stays stuck (no job waits
        forever for a worker that no longer exists). `spare_runners` lists runners known to be alive (other
        worker processes sharing the file): their jobs are left alone. Returns the ids of the jobs failed.
        """
        return self._fail_running(spare_runners=spare_runners, only_runner=None, message=RESTART_MESSAGE)

    def fail_jobs_of_runner(self, runner_id: str, message: str = RESTART_MESSAGE) -> list[str]:
        """ERROR the QUEUED/EXECUTING jobs one runner owns (it is shutting down)."""
        return self._fail_running(spare_runners=(), only_runner=runner_id, message=message)

    def _fail_running(self, *, spare_runners: Collection[str], only_runner: str | None,
                      message: str) -> list[str]:
        error = ErrorSummary(message=message, type="transient", has_detail=True)
        now = format_timestamp(utcnow())
        running = [p.value for p in RUNNING_PHASES]
        sql = f"SELECT job_id, runner_id FROM jobs WHERE phase IN ({', '.join('?' * len(running))})"
        with self._write() as db:
            rows = db.execute(sql, running).fetchall()
            if only_runner is not None:
                victims = [job_id for job_id, runner in rows if runner == only_runner]
            else:
                victims = [job_id for job_id, runner in rows if runner is None or runner not in spare_runners]
            for job_id in victims:
                db.execute(
                    f"UPDATE jobs SET phase = ?, end_time = ?, error = ? WHERE job_id = ? "
                    f"AND phase IN ({', '.join('?' * len(running))})",
                    (Phase.ERROR.value, now, json.dumps(error.__dict__), job_id, *running),
                )
        for job_id in victims:
            self._notify(job_id)
        if victims:
            log.warning("UWS: %d job(s) put in ERROR: %s", len(victims), message)
        return victims

    def phases(self, job_ids: Collection[str]) -> dict[str, Phase]:
        """Current phase of each of `job_ids` that still exists (one query; used by the runner's poller)."""
        if not job_ids:
            return {}
        ids = list(job_ids)
        rows = self._db().execute(
            f"SELECT job_id, phase FROM jobs WHERE job_id IN ({', '.join('?' * len(ids))})", ids
        )
        return {job_id: Phase(phase) for job_id, phase in rows}

    # ---------------------------------------------------------------------------- runner liveness
    def heartbeat(self, runner_id: str) -> None:
        """Record that a runner (one worker process) is alive; others spare its jobs while it beats."""
        with self._write() as db:
            db.execute(
                "INSERT INTO runners (runner_id, host, pid, heartbeat) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (runner_id) DO UPDATE SET heartbeat = excluded.heartbeat",
                (runner_id, socket.gethostname(), os.getpid(), format_timestamp(utcnow())),
            )

    def unregister_runner(self, runner_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM runners WHERE runner_id = ?", (runner_id,))

    def live_runners(self, max_age: timedelta) -> set[str]:
        """Runners whose last heartbeat is younger than `max_age`, less those of this host whose process
        is gone (a restarted service recovers its jobs at once); stale rows are purged."""
        limit = format_timestamp(utcnow() - max_age)
        here = socket.gethostname()
        with self._write() as db:
            db.execute("DELETE FROM runners WHERE heartbeat < ?", (limit,))
            rows = db.execute("SELECT runner_id, host, pid FROM runners").fetchall()
        return {runner for runner, host, pid in rows if host != here or _process_exists(pid)}


def _process_exists(pid: int | None) -> bool:
    """Whether a process of this host has that id (a reused id reads as alive: the heartbeat then decides)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
