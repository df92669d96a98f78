"""Locked-down DuckDB: each query runs exactly one generated SELECT (DESIGN.md section 3).

Untrusted text never reaches DuckDB: the ADQL translator generates DuckDB SQL over relations such as
"__dac_t0". The engine then (1) defines those relations as views over explicit Parquet file lists taken
from the lake's manifests, (2) locks the connection, (3) executes the generated statement under a time
limit. The sandbox is defence in depth behind the translator, in two independent layers:

* **Our validator** (before DuckDB executes anything): at most `max_sql_chars`, no NUL; DuckDB's own
  parser (`extract_statements`) must find exactly one statement and it must be a SELECT; DuckDB's AST
  (`json_serialize_sql`) is then walked: every table reference must be a defined relation or a CTE in
  scope (with DuckDB's scoping: an out-of-scope or forward reference would bind to a catalog object of
  that name, such as the system view sqlite_master), table functions must be in an allow-list (default
  `range`, `generate_series`, `unnest`), DESCRIBE/SHOW/SUMMARIZE are refused and a few scalar functions
  that read server state are denied (`current_setting`, `getvariable`, `write_log`, ...). So
  `duckdb_settings()`, `duckdb_secrets()`, `information_schema.*`, `read_*`, `glob`, `query()`,
  `parquet_metadata()` and replacement scans (`FROM 'x.parquet'`, Python variables) are refused *before*
  they reach DuckDB: they expose the server's configuration (paths, S3 endpoint and key id) and the lake
  layout, which a user has no need of.
* **DuckDB's own lock** (`lock()`): `allowed_paths` = exactly the files of the defined views (or, with
  `scope="lake"`, `allowed_directories` = the lake root), then `enable_external_access=false`, then
  `lock_configuration=true`. Even a statement that got past the validator can read no other file.

What DuckDB 1.5.5 (duckdb==1.5.5, duckdb-extension-httpfs==1.5.5) actually does, measured with it (the
checks are repeated by tests/test_sandbox.py; quotes are DuckDB's error messages).

Settings (all exist in 1.5.5; `duckdb_settings()` lists 160):

* `enable_external_access=false` blocks read_csv/read_text/read_blob/read_parquet/glob/sniff_csv/
  parquet_metadata and ATTACH of files, COPY TO, EXPORT DATABASE, INSTALL, LOAD, Python replacement scans
  and `http://` reads: "Permission Error: Cannot access file ... - file system operations are disabled by
  configuration". It cannot be undone: "Cannot enable external access while database is running".
* `allowed_directories` (prefixes, local or `s3://bucket/prefix/`) and `allowed_paths` (exact files, local
  or s3://) must be set *before* external access is switched off: "Cannot change allowed_directories when
  enable_external_access is disabled". DuckDB appends `temp_directory` to allowed_directories by itself
  (its default, '.tmp' under the working directory, would open that folder: hence a private temp dir).
  With allowed_paths, glob() over the allowed files is refused too. `lock()` uses allowed_paths = the
  views' files by default (scope="files"): a query cannot read lake files of catalogs it was not given.
* Views defined before the lock are **not** readable after `enable_external_access=false` unless their
  files are in allowed_paths/allowed_directories (the files are opened at query time, not at CREATE VIEW):
  "Cannot access file .../p0.parquet".
* `lock_configuration=true`: SET, RESET and PRAGMA x=y then fail ("Cannot change configuration option
  "threads" - the configuration has been locked"). `allowed_configs` (options exempt from the lock) stays
  empty. ATTACH ':memory:', CREATE TABLE/MACRO, DROP VIEW and CHECKPOINT still run under the lock: hence
  SELECT-only in the validator.
* `autoload_known_extensions` / `autoinstall_known_extensions`: false at connect; httpfs is LOADed from the
  wheel's file (duckdb_io) before the lock. Also false: allow_community_extensions, allow_persistent_secrets.
* `python_enable_replacements` (false) and `python_scan_all_frames` (false, the default): a pandas or Arrow
  variable in the caller's frame is not scanned ("Table with name ... does not exist");
  enable_external_access=false alone blocks those scans too.
* `disabled_filesystems='LocalFileSystem'` must come *after* enable_external_access=false (before it, that
  statement itself fails) and disables spilling as well ("File system LocalFileSystem has been disabled by
  configuration"): used only for S3 lakes with `SandboxLimits(spill=False)`.
* `max_temp_directory_size` is honoured; under the lock a 30M-row sort at memory_limit=100MB spilled 263 MB
  into the private temp dir and finished.
* `enable_profiling='no_output'` (LOCAL scope) is set before the lock and the JSON tree is read after each
  query with `get_profiling_information()`: no profiling_output file is needed. `enable_logging`
  ('FileSystem') logs each OPEN/READ (path, pos, bytes) of LocalFileSystem and S3FileSystem: the I/O part
  of `last_profile` and `row_groups_read()`.

S3 under the lock (measured on the Ceph RGW of scripts/ceph-s3.sh): httpfs reads keep working after
enable_external_access=false when the files are in allowed_paths or the prefix in allowed_directories;
other buckets, other prefixes, `http://` URLs and local files are refused. With a *prefix* allow-list
(scope="lake") DuckDB passes `s3://bucket/lake/../other/key` to the server unnormalised (RGW answered 403
SignatureDoesNotMatch, another S3 server might resolve it), which is one more reason the default is the
exact file list.

What the lock cannot do (why the validator, SELECT-only, matters):
* DuckDB's allow-lists are not read-only: `COPY ... TO` an *allowed* path overwrites a lake file (seen on
  local disk and on S3). Give the query service read-only S3 keys / a read-only mount as well.
* `ATTACH ':memory:'`, `CREATE TABLE`, `DROP VIEW`, `CREATE MACRO` still run after the lock.
* `duckdb_secrets()` and `which_secret()` still answer after the lock: endpoint and key id in clear, the
  secret key redacted.
* The spill directory (a private temp dir) stays readable and writable by DuckDB.
* `operator_rows_scanned` in 1.5.5's profile is twice the rows of any file with more than one row group
  and does not drop when row groups are pruned (a 1M-row file, 10 row groups: 2,000,000 whether the filter
  keeps 150 rows or all); `row_groups_read()` gives the precise figure from the I/O log instead.
* The time limit works through `interrupt()`, which DuckDB checks between units of work; a query stuck
  inside one slow S3 request presumably returns only at httpfs's http_timeout (not measured: the test RGW
  is never that slow).

Two ways to hold the lock:

* `Sandbox`: one DuckDB instance for one set of relations: define views, lock, query, close. Simple, but
  every query pays a new instance (~20 ms) and starts with cold Parquet footer and object caches.
* `SandboxDatabase`: one DuckDB instance per query engine, opened and locked **once** over the files of
  every table its caller may read (`allowed_paths`, or the lake root with `scope="lake"`), and a pool of
  connections made before the lock (profiling and the Parquet metadata cache are per-connection settings
  that cannot be changed once the configuration is locked). `query()` lends one connection to one query
  (`SandboxQuery`): its relations are TEMP views and registered Arrow tables, which DuckDB keeps per
  connection, so concurrent queries in other threads never see them; they are dropped when the query is
  closed, before the connection goes back to the pool. The validator only admits the query's own
  relation names, the time limit interrupts only the query's connection, and the I/O log is read per
  connection and query id (DuckDB tags each log entry with both). Memory limit, threads and spill space
  are the instance's, shared by the concurrent queries: a service gets one bound for all of them.

A `Sandbox` or a `SandboxQuery` is not thread-safe: one query at a time on it (a new query supersedes an
unfinished stream). A `SandboxDatabase` is: `query()` may be called from any number of threads.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.duckdb_io import configure_s3
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

#: table functions a generated query may call (everything else: read_*, glob, query, duckdb_*, ... refused)
DEFAULT_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
#: scalar functions that reveal or change server state: refused wherever they appear
DENIED_FUNCTIONS = frozenset(
    {
        "current_setting",
        "getvariable",
        "getenv",
        "write_log",
        "query",
        "query_table",
        "json_execute_serialized_sql",
    }
)
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_GLOB_CHARS = frozenset("*?[]{}")
_BATCH_ROWS = 65_536
#: one FileSystem log message of DuckDB 1.5.5 (see _read_io_log)
_LOG_READ_RE = (
    r'^\{"fs":"[^"]*","path":"(?P<path>[^"\\]*)","op":"(?P<op>[A-Z]+)"'
    r'(?:,"bytes":"(?P<bytes>[0-9]+)","pos":"(?P<pos>[0-9]+)")?\}$'
)
#: validated SQL texts remembered per database (a repeated query shape skips DuckDB's parse + AST walk)
_VALIDATION_CACHE_SIZE = 1024
#: the I/O log is global to a DuckDB instance: emptied when no query runs, or after this many queries
_LOG_TRUNCATE_EVERY = 256
#: the watchdog drops cancelled deadlines once it holds this many (a one-hour limit keeps them that long)
_WATCHDOG_COMPACT_AT = 4096


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox.

    `max_rows` caps what `execute`/`stream` hand back (the engine asks for MAXREC+1 to detect overflow);
    the generated SQL should carry its own LIMIT too, so that DuckDB stops early (a TOP_N). `spill` lets
    DuckDB write to a private temp dir when a query exceeds `memory_limit` (at most `max_temp_size`);
    without it such a query fails, and on S3 lakes the local filesystem is disabled altogether. For a
    `SandboxDatabase`, `memory_limit`, `threads`, `max_temp_size` and `spill` are the instance's (shared by
    its concurrent queries); `timeout_s` and `max_rows` can be given per query.
    """

    memory_limit: str = "2GB"
    threads: int = 2
    timeout_s: float = 60.0
    max_rows: int | None = None
    max_temp_size: str = "8GB"
    spill: bool = True
    max_sql_chars: int = 2_000_000

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {self.timeout_s}")
        if int(self.threads) < 1:
            raise ValueError(f"threads must be >= 1, not {self.threads}")
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 or None, not {self.max_rows}")


@dataclass(frozen=True)
class CellKey:
    """An extra column of a relation holding a HEALPix cell: `_healpix_29 >> shift` of the row, or, with
    `neighbours` (the name of a hidden Arrow relation with int64 columns `a` and `e`), one row per `a` such
    that (a, `_healpix_29 >> shift`) is a row of it (so a row of the relation appears once per neighbouring
    cell `a`). The engine's HEALPix-neighbour cross-match joins two relations on such columns."""

    column: str
    shift: int
    neighbours: str | None = None


class SandboxError(RuntimeError):
    """The sandbox refused a query or the query failed; the message says which and why."""


class QueryRejected(SandboxError):
    """The SQL was refused before DuckDB executed it (not one SELECT, or a forbidden table/function)."""


class QueryTimeout(RuntimeError):
    """The query ran past `SandboxLimits.timeout_s` and was interrupted; the sandbox stays usable."""


class _Watchdog:
    """One daemon thread that fires every deadline of the process (a thread per query would cost a thread
    start per query, a noticeable share of a 3 ms cone)."""

    _instance: _Watchdog | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._seq = itertools.count()
        thread = threading.Thread(target=self._run, name="dac-sandbox-watchdog", daemon=True)
        thread.start()

    @classmethod
    def get(cls) -> _Watchdog:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def add(self, when: float, deadline: _Deadline) -> None:
        with self._cond:
            if len(self._heap) >= _WATCHDOG_COMPACT_AT:  # mostly cancelled deadlines of finished queries
                self._heap = [item for item in self._heap if item[2].active]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (when, next(self._seq), deadline))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, deadline = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
            deadline.fire()


class _Deadline:
    """Interrupts one connection once at `timeout_s`, unless cancelled first; `fired` tells an interrupt
    from another error."""

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout_s: float):
        self._con: duckdb.DuckDBPyConnection | None = con
        self._lock = threading.Lock()
        self._active = True
        self.fired = False
        self.started = time.monotonic()
        _Watchdog.get().add(self.started + timeout_s, self)

    @property
    def active(self) -> bool:
        return self._active

    def fire(self) -> None:
        with self._lock:
            if not self._active or self._con is None:
                return
            self._active = False
            self.fired = True
            # an interrupt that lands after the query finished is harmless: DuckDB clears it at the next
            # query (checked: `interrupt()` on an idle connection does not affect the next statement)
            with contextlib.suppress(Exception):
                self._con.interrupt()

    def cancel(self) -> None:
        with self._lock:
            self._active = False
            self._con = None  # the watchdog may keep this object until its time: not the connection


# ---------------------------------------------------------------------------------------------- instances
def _instance_config(limits: SandboxLimits, tmp: str) -> dict[str, Any]:
    """Settings given at connect: everything that must hold before any statement runs."""
    spill_dir = os.path.join(tmp, "spill")
    os.mkdir(spill_dir, 0o700)
    return {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "allow_persistent_secrets": False,
        "python_enable_replacements": False,
        "python_scan_all_frames": False,
        "memory_limit": limits.memory_limit,
        "threads": int(limits.threads),
        # a private dir: DuckDB adds temp_directory to allowed_directories, so it must hold nothing else
        "temp_directory": spill_dir if limits.spill else "",
        "max_temp_directory_size": limits.max_temp_size,
        "extension_directory": os.path.join(tmp, "extensions"),
        "secret_directory": os.path.join(tmp, "secrets"),
    }


def _configure_connection(con: duckdb.DuckDBPyConnection, profile: bool) -> None:
    """The per-connection settings (DuckDB scopes them LOCAL), set before the instance is locked."""
    # progress is tracked (async jobs report it) but never drawn: a server has no terminal
    con.execute("SET enable_progress_bar = true")
    con.execute("SET enable_progress_bar_print = false")
    con.execute("SET progress_bar_time = 0")
    con.execute("SET parquet_metadata_cache = true")  # footers parsed once per instance, not per query
    if profile:
        con.execute("SET enable_profiling = 'no_output'")


def _lock_instance(
    con: duckdb.DuckDBPyConnection,
    storage: LakeStorage,
    limits: SandboxLimits,
    scope: str,
    files: Sequence[str],
) -> None:
    """Freeze a DuckDB instance: only `files` (or the lake root) stay readable, nothing else.

    Order matters and is what DuckDB 1.5.5 accepts: allow-lists first (they cannot change once external
    access is off), then `enable_external_access=false`, then (S3 without spill) the local filesystem off,
    then `lock_configuration=true`. The settings are read back, so a DuckDB that silently ignored one would
    fail here rather than run unlocked.
    """
    try:
        if scope == "files":
            con.execute("SET allowed_paths = ?", [sorted(files)])
        elif scope == "lake":
            con.execute("SET allowed_directories = ?", [[storage.url_of("").rstrip("/") + "/"]])
        else:
            raise ValueError(f"scope must be 'files' or 'lake', not {scope!r}")
        con.execute("SET enable_external_access = false")
        if storage.is_s3 and not limits.spill:
            con.execute("SET disabled_filesystems = 'LocalFileSystem'")
        con.execute("SET lock_configuration = true")
        external, locked = con.execute(
            "SELECT current_setting('enable_external_access'), current_setting('lock_configuration')"
        ).fetchone()
    except duckdb.Error as exc:
        raise SandboxError(f"could not lock the sandbox: {first_line(exc)}") from exc
    if external or not locked:
        raise SandboxError(f"DuckDB did not lock: enable_external_access={external}, lock={locked}")


def _lake_file(storage: LakeStorage, f: str) -> str:
    """`f` (absolute, s3:// or relative to the lake root) as the exact string DuckDB will open.

    Files come from the lake manifest, not from users, but each is still checked to lie inside the lake
    root (no '..', no globs, no symlink out of a local lake) because the allow-list is built from them.
    """
    if not isinstance(f, str) or not f or "\x00" in f:
        raise ValueError(f"bad file name {f!r}")
    if _GLOB_CHARS & set(f):
        raise ValueError(f"{f!r}: glob characters are not allowed, list the files explicitly")
    root = storage.url_of("")
    if storage.is_s3:
        url = f if f.startswith("s3://") else storage.url_of(f)
        if not url.startswith(root + "/") or any(ch in url for ch in "?#\\"):
            raise ValueError(f"{f!r} is not inside the lake {root}")
        if any(seg in ("", ".", "..") for seg in url[len(root) + 1 :].split("/")):
            raise ValueError(f"{f!r}: empty, '.' or '..' path segments are not allowed")
        return url
    path = f if os.path.isabs(f) else storage.path(f)
    if any(seg in (".", "..") for seg in path.split("/")) or os.path.normpath(path) != path:
        raise ValueError(f"{f!r}: use a normalised path without '.' or '..' segments")
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ValueError(f"{f!r} is not inside the lake {root}")
    return path


def _check_name(name: str, what: str = "relation") -> None:
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise ValueError(f"{what} name {name!r}: use a plain identifier (letters, digits, '_')")


def _view_sql(
    name: str,
    paths: Sequence[str] | None,
    columns: Sequence[str] | None,
    healpix_ranges: Any,
    keys: Sequence[CellKey],
    temp: bool,
    source: str | None = None,
    index_column: str = "_healpix_29",
) -> str:
    """CREATE VIEW over exactly `paths`, built from validated names and integers only (no text from a
    query ever gets here). Hive partitioning is off: HATS paths (`Norder=3/Dir=0/Npix=12.parquet`) would
    otherwise add `Norder`/`Dir` columns that are not in the catalog definition."""
    if columns is not None:
        if isinstance(columns, str) or not columns:
            raise ValueError(f"relation {name!r}: columns must be a non-empty list or None")
        for c in columns:
            if not isinstance(c, str) or not c or "\x00" in c:
                raise ValueError(f"relation {name!r}: bad column name {c!r}")
        select = ", ".join("t." + _quote_ident(c) for c in columns)
    else:
        select = "t.*"
    joins = []
    for i, key in enumerate(keys):
        _check_name(key.column, "key column")
        shift = int(key.shift)
        if not 0 <= shift <= 58:
            raise ValueError(f"key {key.column}: shift {shift} out of range")
        cell = f"(t.{_quote_ident(index_column)} >> {shift})"
        if key.neighbours is None:
            select += f", {cell} AS {_quote_ident(key.column)}"
        else:
            _check_name(key.neighbours, "neighbour relation")
            alias = f"n{i}"
            select += f", {alias}.a AS {_quote_ident(key.column)}"
            joins.append(f" JOIN {_quote_ident(key.neighbours)} AS {alias} ON {cell} = {alias}.e")
    if source is not None:  # a registered (hidden) relation of the same connection
        scan = _quote_ident(source)
    else:
        listing = ", ".join(_quote_literal(p) for p in paths or ())
        scan = f"read_parquet([{listing}], hive_partitioning = false)"
    where = "" if healpix_ranges is None else " WHERE " + _healpix_filter(healpix_ranges, "t._healpix_29")
    return (
        f"CREATE {'TEMP ' if temp else ''}VIEW {_quote_ident(name)} AS SELECT {select} "
        f"FROM {scan} AS t{''.join(joins)}{where}"
    )


# ---------------------------------------------------------------------------------------------- runner
class _Runner:
    """Validation, execution under a deadline and profile collection on one DuckDB connection.

    Subclasses provide the connection (`_con`), the relations a query may name (`_relations`: lower-case
    name -> files, empty for an in-memory relation) and `_files` (the Parquet files behind them).
    """

    storage: LakeStorage
    limits: SandboxLimits
    table_functions: frozenset[str]
    profile_enabled: bool
    io_log: bool = True
    _con: duckdb.DuckDBPyConnection

    def _init_runner(self) -> None:
        self._relations: dict[str, list[str]] = {}
        self._files: set[str] = set()
        self._closed = False
        self._deadline: _Deadline | None = None
        self._stream_token: object | None = None
        self._last_profile: dict[str, Any] = {}
        self._log_reads: pa.Table | None = None
        self._log_mark: tuple[int, int] | None = None

    # hooks --------------------------------------------------------------------------------------------
    def _validated(self, key: tuple) -> bool:
        return False

    def _remember_valid(self, key: tuple) -> None:
        pass

    def _rg_cache_get(self, path: str) -> list[tuple[int, int, int, int]] | None:
        raise NotImplementedError

    def _rg_cache_put(self, path: str, value: list[tuple[int, int, int, int]]) -> None:
        raise NotImplementedError

    def _ready(self) -> None:
        """Raise unless queries may run now."""

    def _before_query(self) -> None:
        """Start of a query: remember where this connection's I/O log starts."""
        if self.profile_enabled and self.io_log:
            self._log_mark = tuple(  # type: ignore[assignment]
                self._con.execute("SELECT current_connection_id(), current_query_id()").fetchone()
            )

    # state --------------------------------------------------------------------------------------------
    @property
    def relations(self) -> dict[str, list[str]]:
        """Defined relations (lower-case name -> files): what a query may name."""
        return {k: list(v) for k, v in self._relations.items()}

    @property
    def last_profile(self) -> dict[str, Any]:
        """What the last `execute`/`stream`/`explain` read; see `_collect_profile` for the keys."""
        return dict(self._last_profile)

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox is closed")

    def progress(self) -> float | None:
        """Fraction (0-1) of the running query done, as DuckDB estimates it; None when unknown."""
        if self._closed:
            return None
        try:
            pct = self._con.query_progress()
        except duckdb.Error:
            return None
        return None if pct is None or pct < 0 else min(1.0, pct / 100.0)

    def interrupt(self) -> None:
        """Stop the running query (a cancelled async job); the sandbox stays usable."""
        if not self._closed:
            with contextlib.suppress(Exception):
                self._con.interrupt()

    # validation ---------------------------------------------------------------------------------------
    def check(self, sql: str) -> None:
        """Raise QueryRejected unless `sql` is one SELECT over defined relations and allowed functions."""
        self._check_open()
        if not isinstance(sql, str):
            raise QueryRejected("the query must be a string")
        if len(sql) > self.limits.max_sql_chars:
            raise QueryRejected(
                f"the query is {len(sql):,} characters long; the limit is {self.limits.max_sql_chars:,}"
            )
        if "\x00" in sql:
            raise QueryRejected("the query contains a NUL character")
        key = (sql, frozenset(self._relations), self.table_functions)
        if self._validated(key):
            return
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryRejected(f"the query does not parse: {first_line(exc)}") from exc
        if len(statements) != 1:
            raise QueryRejected(f"exactly one statement is allowed; found {len(statements)}")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise QueryRejected(f"only SELECT statements are allowed; found {kind.name}")
        try:
            text = self._con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
            tree = json.loads(text)
        except RecursionError as exc:
            raise QueryRejected("the query is nested too deeply") from exc
        except duckdb.OutOfMemoryException as exc:
            raise QueryRejected(
                f"the query is too large to analyse within the {self.limits.memory_limit} memory limit"
            ) from exc
        except duckdb.Error as exc:
            raise QueryRejected(f"the query does not parse: {first_line(exc)}") from exc
        if tree.get("error"):
            raise QueryRejected(f"the query is not allowed: {tree.get('error_message', 'not a SELECT')}")
        if len(tree.get("statements", [])) != 1:
            raise QueryRejected("exactly one statement is allowed")
        self._check_tree(tree["statements"][0])
        self._remember_valid(key)

    def _check_tree(self, tree: dict) -> None:
        """Walk DuckDB's AST (iteratively: generated SQL can be deep) and apply the allow-lists.

        CTE names are tracked with DuckDB's scoping: a CTE is visible in the body of the query that defines
        it (subqueries included) and in the *later* CTEs of the same WITH, not in itself or earlier ones
        (checked: a forward or out-of-scope reference binds to a catalog object of that name, such as the
        system view sqlite_master). A schema- or catalog-qualified name never means a CTE (checked:
        `main.sqlite_master` is the system view even with a CTE of that name), so it must be a relation.
        """
        stack: list[tuple[Any, frozenset[str]]] = [(tree, frozenset())]
        while stack:
            node, visible = stack.pop()
            if isinstance(node, list):
                stack.extend((item, visible) for item in node)
                continue
            if not isinstance(node, dict):
                continue
            kind = node.get("type")
            if kind == "BASE_TABLE":
                self._check_table_ref(node, visible)
            elif kind == "TABLE_FUNCTION":
                fn = node.get("function") or {}
                name = str(fn.get("function_name", "")).lower()
                if name not in self.table_functions:
                    allowed = ", ".join(sorted(self.table_functions)) or "none"
                    raise QueryRejected(f"table function {name}() is not allowed; allowed: {allowed}")
            elif kind == "SHOW_REF":
                raise QueryRejected("DESCRIBE, SHOW and SUMMARIZE are not allowed")
            if node.get("class") == "FUNCTION":
                name = str(node.get("function_name", "")).lower()
                if name in DENIED_FUNCTIONS:
                    raise QueryRejected(f"function {name}() is not allowed")
            cte_map = node.get("cte_map")
            entries = cte_map.get("map", []) if isinstance(cte_map, dict) else []
            if not entries:
                stack.extend((value, visible) for value in node.values())
                continue
            seen = set(visible)
            for entry in entries:
                stack.append((entry.get("value"), frozenset(seen)))
                seen.add(str(entry.get("key", "")).lower())
            inner = frozenset(seen)
            stack.extend((value, inner) for key, value in node.items() if key != "cte_map")

    def _check_table_ref(self, ref: dict, visible: frozenset[str]) -> None:
        name = str(ref.get("table_name", ""))
        catalog, schema = str(ref.get("catalog_name", "")), str(ref.get("schema_name", ""))
        if catalog.lower() not in ("", "memory") or schema.lower() not in ("", "main"):
            raise QueryRejected(f"table {'.'.join(p for p in (catalog, schema, name) if p)} is not allowed")
        if name.lower() in self._relations or (not catalog and not schema and name.lower() in visible):
            return
        known = ", ".join(sorted(self._relations)) or "none"
        raise QueryRejected(
            f"unknown table {name!r}: a query may read its relations ({known}) and WITH queries in scope"
        )

    # execution ----------------------------------------------------------------------------------------
    def execute(self, sql: str, params: dict | list | None = None) -> pa.Table:
        """Run one validated SELECT under the time limit; at most `limits.max_rows` rows come back."""
        reader = self.stream(sql, params)
        try:
            return reader.read_all()
        finally:
            reader.close()

    def stream(
        self, sql: str, params: dict | list | None = None, batch_rows: int = _BATCH_ROWS
    ) -> pa.RecordBatchReader:
        """Like `execute`, as Arrow record batches; the time limit runs until the reader is drained.

        `last_profile` is filled when the reader reaches its end (or max_rows). A reader abandoned early is
        finalised when it is garbage-collected; the next query on the sandbox supersedes it, and reading
        it afterwards raises SandboxError (DuckDB keeps one pending result per connection).
        """
        self._begin(sql)
        token = object()
        self._stream_token = token
        deadline = self._start_deadline()
        try:
            self._con.execute(sql, params)
            reader = self._con.to_arrow_reader(batch_rows)
            schema = reader.schema
        except BaseException as exc:
            self._end_run()
            self._raise(exc, deadline)
        return pa.RecordBatchReader.from_batches(schema, self._batches(reader, deadline, token))

    def _batches(
        self, reader: pa.RecordBatchReader, deadline: _Deadline, token: object
    ) -> Iterator[pa.RecordBatch]:
        """DuckDB's batches, cut at max_rows. After max_rows rows one more batch is asked for, so that a
        query with its own LIMIT max_rows ends normally (and leaves a complete profile) rather than being
        marked truncated."""
        max_rows = self.limits.max_rows
        rows, truncated, finished = 0, False, False
        try:
            while not truncated:
                if self._closed:
                    raise SandboxError("the sandbox was closed while this result was being read")
                if self._stream_token is not token:
                    raise SandboxError("this result was superseded by a later query on the same sandbox")
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    finished = True
                    break
                except BaseException as exc:
                    self._raise(exc, deadline)
                if max_rows is not None and rows + batch.num_rows > max_rows:
                    batch = batch.slice(0, max_rows - rows)
                    truncated = True
                if batch.num_rows:
                    rows += batch.num_rows
                    yield batch
        finally:
            if self._stream_token is token and not self._closed:
                self._end_run()
                with contextlib.suppress(Exception):
                    reader.close()
                self._collect_profile(deadline, rows, complete=finished, truncated=truncated)

    def explain(self, sql: str, params: dict | list | None = None) -> str:
        """EXPLAIN ANALYZE of a validated SELECT (it runs the query, under the same time limit).

        The text names the scan operators with their filters, files and row counts; `last_profile` and
        `row_groups_read()` are filled as for `execute`.
        """
        self._begin(sql)
        self._stream_token = None
        deadline = self._start_deadline()
        try:
            text = "EXPLAIN ANALYZE\n" + sql
            statements = self._con.extract_statements(text)
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.EXPLAIN:
                raise QueryRejected("the query cannot be explained as one statement")
            rows = self._con.execute(text, params).fetchall()
        except BaseException as exc:
            self._end_run()
            self._raise(exc, deadline)
        self._end_run()
        self._collect_profile(deadline, 0, complete=True, truncated=False)
        return "\n".join(str(r[-1]) for r in rows)

    def _begin(self, sql: str) -> None:
        self._check_open()
        self._ready()
        self._end_run()  # supersede any unfinished stream
        self._stream_token = None
        self.check(sql)
        self._last_profile, self._log_reads = {}, None
        self._before_query()

    def _start_deadline(self) -> _Deadline:
        self._deadline = _Deadline(self._con, self.limits.timeout_s)
        return self._deadline

    def _end_run(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._stream_token = None

    def _raise(self, exc: BaseException, deadline: _Deadline) -> NoReturn:
        translated = self._translate(exc, deadline)
        if translated is exc:
            raise exc
        raise translated from exc

    def _translate(self, exc: BaseException, deadline: _Deadline) -> BaseException:
        """DuckDB's exception as one the engine can report: a timeout, a refusal or a failure."""
        if isinstance(exc, QueryTimeout | SandboxError):
            return exc
        if deadline.fired:
            return QueryTimeout(
                f"the query ran longer than the {self.limits.timeout_s:g} s limit and was stopped; "
                "narrow it (a smaller region, fewer columns, a TOP/LIMIT) or run it as an async job"
            )
        if isinstance(exc, duckdb.InterruptException):
            return SandboxError("the query was interrupted (the sandbox is closing)")
        if isinstance(exc, duckdb.OutOfMemoryException):
            return SandboxError(
                f"the query needs more than the {self.limits.memory_limit} memory limit: {first_line(exc)}"
            )
        if isinstance(exc, duckdb.PermissionException):
            return SandboxError(f"the sandbox refused an access: {first_line(exc)}")
        if isinstance(exc, duckdb.Error):
            return SandboxError(f"the query failed: {first_line(exc)}")
        return exc

    # profile ------------------------------------------------------------------------------------------
    def _collect_profile(self, deadline: _Deadline, rows: int, complete: bool, truncated: bool) -> None:
        """Fill `last_profile`.

        Keys: `rows_returned`, `truncated` (stopped at max_rows), `complete` (DuckDB's profile is whole: it
        is empty for a result abandoned early), `elapsed_s` (wall clock, ours); from DuckDB's profile:
        `latency_s`, `cpu_time_s`, `rows_scanned` (DuckDB's cumulative_rows_scanned, see the module notes),
        `files_scanned` (sum of the scans' 'Total Files Read': an ORDER BY .. LIMIT has two scans, as DuckDB
        re-reads the winning rows), `peak_memory_bytes`, `peak_temp_bytes`,
        `scans` (one dict per TABLE_SCAN: function, files, rows_scanned, rows_out, filters); and from the
        FileSystem log (this connection's entries since the query began): `io` = {files_read,
        read_requests, bytes_read, files: {path: {reads, bytes}}}. Reads served by DuckDB's caches (the
        Parquet footer cache, the external file cache of an S3 `SandboxDatabase`) are not storage reads and
        are not counted.
        """
        profile: dict[str, Any] = {
            "rows_returned": rows,
            "truncated": truncated,
            "complete": complete,
            "elapsed_s": round(time.monotonic() - deadline.started, 6),
        }
        if not self.profile_enabled:
            self._last_profile = profile
            return
        try:
            info = json.loads(self._con.get_profiling_information(format="json") or "{}")
        except (duckdb.Error, ValueError):
            info = {}
        if info.get("query_name"):
            scans = []
            stack = [info]
            while stack:
                node = stack.pop()
                stack.extend(node.get("children", []))
                if node.get("operator_type") == "TABLE_SCAN":
                    extra = node.get("extra_info") or {}
                    files = extra.get("Total Files Read")
                    scans.append(
                        {
                            "function": extra.get("Function", node.get("operator_name")),
                            "files": int(files) if str(files).isdigit() else None,
                            "rows_scanned": node.get("operator_rows_scanned"),
                            "rows_out": node.get("operator_cardinality"),
                            "filters": extra.get("Filters"),
                        }
                    )
            profile.update(
                latency_s=info.get("latency"),
                cpu_time_s=info.get("cpu_time"),
                rows_scanned=info.get("cumulative_rows_scanned"),
                files_scanned=sum(s["files"] or 0 for s in scans),
                peak_memory_bytes=info.get("system_peak_buffer_memory"),
                peak_temp_bytes=info.get("system_peak_temp_dir_size"),
                scans=scans,
            )
        per_file: dict[str, tuple[int, int]] = {}
        self._log_reads = None
        if self._log_mark is not None:
            log_reads = self._read_io_log(*self._log_mark)
            if log_reads is not None and log_reads.num_rows:
                if self._files:
                    log_reads = log_reads.filter(pc.is_in(log_reads["path"], pa.array(sorted(self._files))))
                self._log_reads = log_reads
                grouped = log_reads.group_by("path").aggregate([("bytes", "count"), ("bytes", "sum")])
                for row in grouped.to_pylist():
                    per_file[row["path"]] = (int(row["bytes_count"]), int(row["bytes_sum"] or 0))
        if self._log_mark is None:
            self._last_profile = profile
            return
        profile["io"] = {
            "files_read": len(per_file),
            "read_requests": sum(n for n, _ in per_file.values()),
            "bytes_read": sum(b for _, b in per_file.values()),
            "files": {p: {"reads": n, "bytes": b} for p, (n, b) in sorted(per_file.items())},
        }
        self._last_profile = profile

    def _read_io_log(self, connection: int, query: int) -> pa.Table | None:
        """(path, pos, bytes) of every READ this connection logged since query id `query`.

        The messages are fetched raw and parsed with one vectorised regex (DuckDB 1.5.5 writes
        {"fs":..,"path":..,"op":..,"bytes":..,"pos":..}); a message it does not match falls back to
        json.loads. Parsing with DuckDB's JSON functions took ~20 us an entry, i.e. ~50 ms for the ~2,000
        reads of a full scan of the bench survey, against ~5 ms here."""
        try:
            messages = (
                self._con.execute(
                    "SELECT l.message FROM duckdb_logs() AS l JOIN duckdb_log_contexts() AS c "
                    "ON l.context_id = c.context_id "
                    "WHERE l.type = 'FileSystem' AND c.connection_id = ? AND c.query_id > ?",
                    [connection, query],
                )
                .to_arrow_table()["message"]
                .combine_chunks()
            )
        except duckdb.Error:
            return None
        if len(messages) == 0:
            return None
        return _parse_io_log(messages)

    @property
    def _last_reads(self) -> dict[str, list[tuple[int, int]]]:
        """The last query's reads (path -> [(pos, bytes)]), from the log entries kept by _collect_profile."""
        reads: dict[str, list[tuple[int, int]]] = {}
        if self._log_reads is not None:
            cols = self._log_reads.to_pydict()
            for path, pos, size in zip(cols["path"], cols["pos"], cols["bytes"], strict=True):
                reads.setdefault(path, []).append((int(pos), int(size)))
        return reads

    def row_groups_read(self) -> dict[str, list[int]]:
        """For the last query: file -> indices of the row groups whose column chunks DuckDB actually read.

        Maps the FileSystem log's (pos, bytes) reads onto each file's column-chunk byte ranges (from
        `parquet_metadata`, read once per file and only for files that were read). Footer reads map to no
        row group. On S3, DuckDB fetches a small file in one request, so all its row groups count as read:
        the figure is I/O truth, not a statistic. Also adds `row_groups_read` and `rows_in_row_groups_read`
        to `last_profile`.
        """
        self._check_open()
        if not (self.profile_enabled and self.io_log):
            raise SandboxError("the I/O log is off for this sandbox (io_log=False): no reads to report")
        out: dict[str, list[int]] = {}
        rows = 0
        for path, reads in sorted(self._last_reads.items()):
            chunks = self._row_group_ranges(path)
            hit: set[int] = set()
            for pos, size in reads:
                end = pos + size
                for rg, start, stop, _ in chunks:
                    if pos < stop and start < end:
                        hit.add(rg)
            if hit:
                out[path] = sorted(hit)
                counts = {rg: n for rg, _, _, n in chunks}
                rows += sum(counts[rg] for rg in hit)
        if self._last_profile:
            self._last_profile["row_groups_read"] = sum(len(v) for v in out.values())
            self._last_profile["rows_in_row_groups_read"] = rows
        return out

    def _row_group_ranges(self, path: str) -> list[tuple[int, int, int, int]]:
        """(row group, start, stop, rows) per column chunk of `path` (files never change once written)."""
        cached = self._rg_cache_get(path)
        if cached is None:
            result = self._con.execute(
                "SELECT row_group_id, "
                "least(coalesce(dictionary_page_offset, data_page_offset), data_page_offset), "
                "total_compressed_size, row_group_num_rows FROM parquet_metadata(?)",
                [path],
            ).fetchall()
            cached = [(int(rg), int(s), int(s) + int(n), int(r)) for rg, s, n, r in result]
            self._rg_cache_put(path, cached)
        return cached


# ---------------------------------------------------------------------------------------------- Sandbox
class Sandbox(_Runner):
    """One locked-down DuckDB instance: define views, lock, then run generated SELECTs.

    Typical use (one sandbox per query, or per set of relations)::

        with Sandbox(storage, SandboxLimits(timeout_s=30, max_rows=maxrec + 1)) as sb:
            sb.define_relation("__dac_t0", files, columns=["ra", "dec", "mag"])
            sb.lock()
            table = sb.execute(generated_sql, params)
            stats = sb.last_profile
    """

    def __init__(
        self,
        storage: LakeStorage,
        limits: SandboxLimits = SandboxLimits(),
        *,
        table_functions: frozenset[str] = DEFAULT_TABLE_FUNCTIONS,
        profile: bool = True,
    ):
        self.storage = storage
        self.limits = limits
        self.table_functions = frozenset(f.lower() for f in table_functions)
        self.profile_enabled = profile
        self._init_runner()
        self._locked = False
        self._rg_cache: dict[str, list[tuple[int, int, int, int]]] = {}
        self._tmp = tempfile.mkdtemp(prefix="dac-sandbox-")
        self._tmp_cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        try:
            self._con = duckdb.connect(config=_instance_config(limits, self._tmp))
            _configure_connection(self._con, profile)
            if storage.is_s3:
                configure_s3(self._con, storage)
            if profile:
                # the file cache would hide repeated reads from the I/O log that last_profile reports
                self._con.execute("SET enable_external_file_cache = false")
                self._con.execute("CALL enable_logging('FileSystem')")
        except BaseException:
            self._tmp_cleanup()
            raise

    @property
    def locked(self) -> bool:
        return self._locked

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Interrupt anything running, close the connection, remove the private temp dir."""
        if self._closed:
            return
        self._closed = True
        self._end_run()
        with contextlib.suppress(Exception):
            self._con.interrupt()
        with contextlib.suppress(Exception):
            self._con.close()
        self._tmp_cleanup()

    def _ready(self) -> None:
        if not self._locked:
            raise SandboxError("lock() the sandbox before running queries on it")

    def _before_query(self) -> None:
        if self.profile_enabled:
            self._con.execute("CALL truncate_duckdb_logs()")
        super()._before_query()

    def _rg_cache_get(self, path: str) -> list[tuple[int, int, int, int]] | None:
        return self._rg_cache.get(path)

    def _rg_cache_put(self, path: str, value: list[tuple[int, int, int, int]]) -> None:
        self._rg_cache[path] = value

    def define_relation(
        self,
        name: str,
        files: Sequence[str],
        columns: Sequence[str] | None = None,
        healpix_ranges: Any = None,
        keys: Sequence[CellKey] = (),
    ) -> None:
        """Create view `name` over exactly `files` (lake paths) with `columns` (default: all), rows with
        `_healpix_29` in `healpix_ranges` (default: all) and the extra `keys` columns.

        Only before `lock()`: afterwards DuckDB could not open files outside the allow-list, and the list is
        frozen by the lock. See `_lake_file` for the checks on each file.
        """
        self._check_open()
        if self._locked:
            raise SandboxError(
                "define_relation() after lock(): relations are fixed once the sandbox is locked"
            )
        _check_name(name)
        if name.lower() in self._relations:
            raise ValueError(f"relation {name!r} is already defined")
        if isinstance(files, str) or not files:
            raise ValueError(
                f"relation {name!r}: give a non-empty list of files (an empty coverage has no rows)"
            )
        paths = [_lake_file(self.storage, f) for f in files]
        sql = _view_sql(name, paths, columns, healpix_ranges, keys, temp=False)
        try:
            self._con.execute(sql)
        except duckdb.Error as exc:
            raise SandboxError(f"cannot define relation {name!r}: {first_line(exc)}") from exc
        self._relations[name.lower()] = paths
        self._files.update(paths)

    def define_arrow_relation(self, name: str, table: pa.Table) -> None:
        """Make an in-memory Arrow table (a TAP upload, TAP_SCHEMA) readable as `name`.

        Registered explicitly on this connection (replacement scans stay off), so it is visible to this
        sandbox's queries only; like files, only before `lock()`.
        """
        self._check_open()
        if self._locked:
            raise SandboxError("define_arrow_relation() after lock(): relations are fixed once locked")
        _check_name(name)
        if name.lower() in self._relations:
            raise ValueError(f"relation {name!r} is already defined")
        if not isinstance(table, pa.Table):
            raise TypeError(f"relation {name!r}: expected a pyarrow.Table, got {type(table).__name__}")
        try:
            self._con.register(name, table)
        except duckdb.Error as exc:
            raise SandboxError(f"cannot define relation {name!r}: {first_line(exc)}") from exc
        self._relations[name.lower()] = []

    def lock(self, scope: Literal["files", "lake"] = "files") -> None:
        """Freeze the connection: only the views' files (scope="files", the default) or the lake root
        (scope="lake") stay readable, nothing else (see `_lock_instance`)."""
        self._check_open()
        if self._locked:
            return
        _lock_instance(self._con, self.storage, self.limits, scope, sorted(self._files))
        self._locked = True
        log.debug(
            "sandbox locked: scope=%s, %d files, relations %s", scope, len(self._files), list(self._relations)
        )


# ---------------------------------------------------------------------------------------------- database
class SandboxDatabase:
    """A long-lived locked DuckDB instance with a pool of connections; `query()` runs one query on one.

    `files` (lake paths) are every file a query on this database may ever read (scope="files": exactly
    those; scope="lake": DuckDB may open anything under the lake root, the validator still admits only a
    query's own relations). The instance is locked before `__init__` returns; nothing about it changes
    afterwards. A query that needs a file outside `files` gets a SandboxError: the owner (the engine)
    opens a new database when the set of readable tables changes.

    `profile`: DuckDB's profiler per query (operators, rows, files per scan, timings: +~10% on a full scan).
    `io_log`: also DuckDB's FileSystem log, for `last_profile["io"]` and `row_groups_read()` (every read
    with its offset: another +~10-20% on a full scan of many small row groups, measured on the bench
    survey), so a service may keep it for debugging only.
    """

    def __init__(
        self,
        storage: LakeStorage,
        files: Sequence[str] = (),
        limits: SandboxLimits = SandboxLimits(),
        *,
        scope: Literal["files", "lake"] = "files",
        connections: int = 8,
        table_functions: frozenset[str] = DEFAULT_TABLE_FUNCTIONS,
        profile: bool = True,
        io_log: bool = True,
    ):
        if connections < 1:
            raise ValueError(f"connections must be >= 1, not {connections}")
        self.storage = storage
        self.limits = limits
        self.scope = scope
        self.table_functions = frozenset(f.lower() for f in table_functions)
        self.profile_enabled = profile
        self.io_log = io_log
        self._allowed = frozenset(_lake_file(storage, f) for f in files)
        self._lock = threading.Lock()
        self._pool: queue.LifoQueue[duckdb.DuckDBPyConnection] = queue.LifoQueue()
        self._size = connections
        self._active = 0
        self._since_truncate = 0
        self._closed = False
        self._retired = False
        self._valid: OrderedDict[tuple, None] = OrderedDict()
        self._rg_cache: dict[str, list[tuple[int, int, int, int]]] = {}
        self._tmp = tempfile.mkdtemp(prefix="dac-sandbox-db-")
        self._tmp_cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._cons: list[duckdb.DuckDBPyConnection] = []
        try:
            root = duckdb.connect(config=_instance_config(limits, self._tmp))
            self._root = root
            if storage.is_s3:
                configure_s3(root, storage)  # the secret and httpfs settings are the instance's
            # a remote lake gains from DuckDB's cache of file data; on a local one the OS page cache does it
            root.execute(f"SET enable_external_file_cache = {'true' if storage.is_s3 else 'false'}")
            if profile and io_log:
                root.execute("CALL enable_logging('FileSystem')")
            for _ in range(connections):
                con = root.cursor()
                _configure_connection(con, profile)
                self._cons.append(con)
            _lock_instance(root, storage, limits, scope, sorted(self._allowed))
        except BaseException:
            self._close_connections()
            self._tmp_cleanup()
            raise
        for con in self._cons:
            self._pool.put(con)
        log.debug(
            "sandbox database locked: scope=%s, %d files, %d connections", scope, len(files), connections
        )

    @property
    def allowed_files(self) -> frozenset[str]:
        return self._allowed

    @property
    def active(self) -> int:
        """Queries running now."""
        return self._active

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SandboxDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, limits: SandboxLimits | None = None, wait_s: float | None = None) -> SandboxQuery:
        """Lend a connection to one query; close the returned `SandboxQuery` (or use it as a context
        manager) to give it back. Waits up to `wait_s` (default: the database's time limit) for a free
        connection when all are busy."""
        limits = limits or self.limits
        with self._lock:
            if self._closed or self._retired:
                raise SandboxError("the sandbox database is closed")
            self._active += 1
        wait = self.limits.timeout_s if wait_s is None else wait_s
        try:
            con = self._pool.get(timeout=wait)
        except queue.Empty:
            self._released(None)
            busy = f"all {self._size} query slots stayed busy for {wait:g} s; try again"
            raise QueryTimeout(busy) from None
        return SandboxQuery(self, con, limits)

    def retire(self) -> None:
        """No new queries; close once the running ones have finished (an engine swapping databases)."""
        with self._lock:
            self._retired = True
            idle = self._active == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Interrupt anything running, close every connection, remove the private temp dir."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close_connections()
        self._tmp_cleanup()

    def _close_connections(self) -> None:
        for con in self._cons:
            with contextlib.suppress(Exception):
                con.interrupt()
            with contextlib.suppress(Exception):
                con.close()
        if getattr(self, "_root", None) is not None:
            with contextlib.suppress(Exception):
                self._root.close()

    def _released(self, con: duckdb.DuckDBPyConnection | None) -> None:
        """A query is over: its connection (None: broken or never taken) goes back; maybe empty the log."""
        close = False
        with self._lock:
            if con is not None and not self._closed:
                self._pool.put(con)
            self._active -= 1
            self._since_truncate += 1
            # reading the log scans all of it: empty it whenever no query is running, and, under constant
            # load, after _LOG_TRUNCATE_EVERY queries anyway (a query running across that moment then
            # reports the reads it made since, not all of them)
            if (
                self.profile_enabled
                and self.io_log
                and not self._closed
                and (self._active == 0 or self._since_truncate >= _LOG_TRUNCATE_EVERY)
            ):
                self._since_truncate = 0
                with contextlib.suppress(duckdb.Error):
                    self._root.execute("CALL truncate_duckdb_logs()")
            close = self._retired and self._active == 0
        if close:
            self.close()

    def _broken(self, con: duckdb.DuckDBPyConnection) -> None:
        """A connection whose clean-up failed is closed, not reused; the pool shrinks by one."""
        with contextlib.suppress(Exception):
            con.close()
        with self._lock:
            self._size -= 1
            if self._size == 0:
                self._retired = True  # nothing left to lend: the owner must open a new database
        log.warning(
            "sandbox database: a connection was dropped after a failed clean-up (%d left)", self._size
        )

    def _validated(self, key: tuple) -> bool:
        with self._lock:
            if key in self._valid:
                self._valid.move_to_end(key)
                return True
            return False

    def _remember_valid(self, key: tuple) -> None:
        with self._lock:
            self._valid[key] = None
            if len(self._valid) > _VALIDATION_CACHE_SIZE:
                self._valid.popitem(last=False)


class SandboxQuery(_Runner):
    """One query's use of a `SandboxDatabase` connection: relations (TEMP views over lake files, Arrow
    tables), then one or more generated SELECTs over them, then `close()`, which drops the relations and
    returns the connection. Nothing defined here is visible to another query."""

    def __init__(self, db: SandboxDatabase, con: duckdb.DuckDBPyConnection, limits: SandboxLimits):
        self.db = db
        self.storage = db.storage
        self.limits = limits
        self.table_functions = db.table_functions
        self.profile_enabled = db.profile_enabled
        self.io_log = db.io_log
        self._con = con
        self._init_runner()
        self._views: list[str] = []
        self._registered: list[str] = []
        self._hidden: set[str] = set()

    locked = True

    def __enter__(self) -> SandboxQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop this query's relations and give the connection back (an unfinished stream is cut)."""
        if self._closed:
            return
        self._closed = True
        self._end_run()
        con, ok = self._con, True
        try:
            for name in reversed(self._views):
                con.execute(f"DROP VIEW IF EXISTS temp.main.{_quote_ident(name)}")
            for name in self._registered:
                con.unregister(name)
        except Exception:  # a connection in an unknown state must not be lent again
            ok = False
            log.exception("sandbox query clean-up failed")
        if ok:
            self.db._released(con)
        else:
            self.db._broken(con)
            self.db._released(None)

    def _ready(self) -> None:
        if self.db.closed:
            raise SandboxError("the sandbox database is closed")

    def _validated(self, key: tuple) -> bool:
        return self.db._validated(key)

    def _remember_valid(self, key: tuple) -> None:
        self.db._remember_valid(key)

    def _rg_cache_get(self, path: str) -> list[tuple[int, int, int, int]] | None:
        return self.db._rg_cache.get(path)

    def _rg_cache_put(self, path: str, value: list[tuple[int, int, int, int]]) -> None:
        self.db._rg_cache[path] = value

    def _new_name(self, name: str) -> None:
        self._check_open()
        _check_name(name)
        lower = name.lower()
        if lower in self._relations or lower in self._hidden:
            raise ValueError(f"relation {name!r} is already defined")

    def define_relation(
        self,
        name: str,
        files: Sequence[str],
        columns: Sequence[str] | None = None,
        healpix_ranges: Any = None,
        keys: Sequence[CellKey] = (),
    ) -> None:
        """A TEMP view `name` over exactly `files`, as `Sandbox.define_relation`; every file must be one
        the database was opened for (scope="lake": inside the lake)."""
        self._new_name(name)
        if isinstance(files, str) or not files:
            raise ValueError(
                f"relation {name!r}: give a non-empty list of files (an empty coverage has no rows)"
            )
        paths = [_lake_file(self.storage, f) for f in files]
        if self.db.scope == "files":
            outside = [p for p in paths if p not in self.db.allowed_files]
            if outside:
                raise SandboxError(
                    f"relation {name!r}: {len(outside)} file(s) are not readable by this database, "
                    f"e.g. {outside[0]}"
                )
        for key in keys:
            if key.neighbours is not None and key.neighbours.lower() not in self._hidden:
                raise ValueError(f"relation {name!r}: unknown neighbour relation {key.neighbours!r}")
        sql = _view_sql(name, paths, columns, healpix_ranges, keys, temp=True)
        try:
            self._con.execute(sql)
        except duckdb.Error as exc:
            raise SandboxError(f"cannot define relation {name!r}: {first_line(exc)}") from exc
        self._views.append(name)
        self._relations[name.lower()] = paths
        self._files.update(paths)

    def define_arrow_relation(self, name: str, table: pa.Table) -> None:
        """`Sandbox.define_arrow_relation` for this query: an Arrow table readable as `name`."""
        self.register_table(name, table)

    def define_view(
        self, name: str, source: str, keys: Sequence[CellKey] = (), index_column: str = "_healpix_29"
    ) -> None:
        """A TEMP view `name` over a hidden relation `source` (an in-memory table this query registered
        with hidden=True, holding the order-29 HEALPix index in `index_column`), with the extra `keys`
        columns: how an uploaded table takes part in a HEALPix-neighbour cross-match."""
        self._new_name(name)
        _check_name(source)
        if source.lower() not in self._hidden:
            raise ValueError(f"relation {name!r}: unknown hidden relation {source!r}")
        for key in keys:
            if key.neighbours is not None and key.neighbours.lower() not in self._hidden:
                raise ValueError(f"relation {name!r}: unknown neighbour relation {key.neighbours!r}")
        _check_name(index_column, "index column")
        sql = _view_sql(name, None, None, None, keys, temp=True, source=source, index_column=index_column)
        try:
            self._con.execute(sql)
        except duckdb.Error as exc:
            raise SandboxError(f"cannot define relation {name!r}: {first_line(exc)}") from exc
        self._views.append(name)
        self._relations[name.lower()] = []

    def register_table(self, name: str, table: pa.Table, hidden: bool = False) -> None:
        """An in-memory Arrow relation on this query's connection only. `hidden`: usable inside views
        (`CellKey.neighbours`) but not by the query text (the validator does not admit it)."""
        self._new_name(name)
        if not isinstance(table, pa.Table):
            raise TypeError(f"relation {name!r}: expected a pyarrow Table, not {type(table).__name__}")
        try:
            self._con.register(name, table)
        except duckdb.Error as exc:
            raise SandboxError(f"cannot register relation {name!r}: {first_line(exc)}") from exc
        self._registered.append(name)
        if hidden:
            self._hidden.add(name.lower())
        else:
            self._relations[name.lower()] = []

    def distinct_cells(self, relation: str, column: str) -> pa.Array:
        """The distinct values of an int64 key column of one of this query's relations (the engine reads
        the cells of a cross-match's anchor side with it). Names only, checked: no query text involved."""
        self._check_open()
        _check_name(relation)
        _check_name(column, "column")
        if relation.lower() not in self._relations:
            raise ValueError(f"unknown relation {relation!r}")
        deadline = self._start_deadline()
        try:
            table = self._con.execute(
                f"SELECT DISTINCT {_quote_ident(column)} AS c FROM {_quote_ident(relation)} "
                f"WHERE {_quote_ident(column)} IS NOT NULL"
            ).to_arrow_table()
        except BaseException as exc:
            self._end_run()
            self._raise(exc, deadline)
        self._end_run()
        return table.column("c").combine_chunks()


def _parse_io_log(messages: pa.Array) -> pa.Table:
    """(path, pos, bytes) of the READ entries among DuckDB FileSystem log messages (see
    `_Runner._read_io_log`): one vectorised regex, json.loads for what it does not match."""
    parts = pc.extract_regex(messages, _LOG_READ_RE)
    unmatched = pc.is_null(parts)  # (a struct's children keep values under a null parent: test the parent)
    op = pc.if_else(unmatched, pa.scalar(None, pa.string()), parts.field("op"))
    paths, pos, size = [], [], []
    if pc.any(unmatched).as_py():
        for message in messages.filter(unmatched).to_pylist():
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                entry = json.loads(message)
                if entry.get("op") == "READ":
                    paths.append(entry["path"])
                    pos.append(int(entry["pos"]))
                    size.append(int(entry["bytes"]))
    reads = parts.filter(pc.fill_null(pc.equal(op, "READ"), False))
    table = pa.table(
        {
            "path": reads.field("path"),
            "pos": pc.cast(reads.field("pos"), pa.int64()),
            "bytes": pc.cast(reads.field("bytes"), pa.int64()),
        }
    )
    if paths:
        extra = pa.table(
            {"path": paths, "pos": pa.array(pos, pa.int64()), "bytes": pa.array(size, pa.int64())}
        )
        table = pa.concat_tables([table, extra])
    return table


def _healpix_filter(ranges: Any, column: str = "_healpix_29") -> str:
    """`_healpix_29` range predicates (from the engine's coverage, integers only): DuckDB pushes them into
    the Parquet scan and skips row groups whose statistics fall outside. No ranges: no rows."""
    pairs = [(int(lo), int(hi)) for lo, hi in ranges]
    if not pairs:
        return "false"
    return " OR ".join(f"({column} >= {lo} AND {column} < {hi})" for lo, hi in pairs)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type if it has none): DuckDB messages carry a LINE/caret
    excerpt of the SQL, other errors tracebacks or detail a person does not need in a one-line report."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
