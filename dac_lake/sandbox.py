"""A locked-down DuckDB connection that runs exactly one generated SELECT at a time (DESIGN.md section 3).

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

A `Sandbox` is not thread-safe: one query at a time (a new query supersedes an unfinished stream).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import duckdb
import pyarrow as pa

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


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox.

    `max_rows` caps what `execute`/`stream` hand back (the engine asks for MAXREC+1 to detect overflow);
    the generated SQL should carry its own LIMIT too, so that DuckDB stops early (a TOP_N). `spill` lets
    DuckDB write to a private temp dir when a query exceeds `memory_limit` (at most `max_temp_size`);
    without it such a query fails, and on S3 lakes the local filesystem is disabled altogether.
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


class SandboxError(RuntimeError):
    """The sandbox refused a query or the query failed; the message says which and why."""


class QueryRejected(SandboxError):
    """The SQL was refused before DuckDB executed it (not one SELECT, or a forbidden table/function)."""


class QueryTimeout(RuntimeError):
    """The query ran past `SandboxLimits.timeout_s` and was interrupted; the sandbox stays usable."""


class _Deadline:
    """A timer that interrupts the connection once; `fired` tells an interrupt from another error."""

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout_s: float):
        self._con = con
        self._lock = threading.Lock()
        self._active = True
        self.fired = False
        self.started = time.monotonic()
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._active:
                return
            self.fired = True
            # an interrupt that lands after the query finished is harmless: DuckDB clears it at the next
            # query (checked: `interrupt()` on an idle connection does not affect the next statement)
            self._con.interrupt()

    def cancel(self) -> None:
        with self._lock:
            self._active = False
        self._timer.cancel()


class Sandbox:
    """One locked-down DuckDB connection: define views, lock, then run generated SELECTs.

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
        self._relations: dict[str, list[str]] = {}  # lower-case name -> files
        self._files: set[str] = set()
        self._locked = False
        self._closed = False
        self._deadline: _Deadline | None = None
        self._stream_token: object | None = None
        self._last_profile: dict[str, Any] = {}
        self._last_reads: dict[str, list[tuple[int, int]]] = {}
        self._rg_cache: dict[str, list[tuple[int, int, int, int]]] = {}
        self._tmp = tempfile.mkdtemp(prefix="dac-sandbox-")
        self._tmp_cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        spill_dir = os.path.join(self._tmp, "spill")
        os.mkdir(spill_dir, 0o700)
        config: dict[str, Any] = {
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
            "extension_directory": os.path.join(self._tmp, "extensions"),
            "secret_directory": os.path.join(self._tmp, "secrets"),
        }
        try:
            self._con = duckdb.connect(config=config)
            # progress is tracked (async jobs report it) but never drawn: a server has no terminal
            self._con.execute("SET enable_progress_bar = true")
            self._con.execute("SET enable_progress_bar_print = false")
            self._con.execute("SET progress_bar_time = 0")
            if storage.is_s3:
                configure_s3(self._con, storage)
            if profile:
                self._con.execute("SET enable_profiling = 'no_output'")
                # the file cache would hide repeated reads from the I/O log that last_profile reports
                self._con.execute("SET enable_external_file_cache = false")
                self._con.execute("CALL enable_logging('FileSystem')")
        except BaseException:
            self._tmp_cleanup()
            raise

    # ------------------------------------------------------------------ state
    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def relations(self) -> dict[str, list[str]]:
        """Defined relations (lower-case name -> files): what a query may name."""
        return {k: list(v) for k, v in self._relations.items()}

    @property
    def last_profile(self) -> dict[str, Any]:
        """What the last `execute`/`stream`/`explain` read; see `_collect_profile` for the keys."""
        return dict(self._last_profile)

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

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox is closed")

    # ------------------------------------------------------------------ set-up
    def define_relation(
        self,
        name: str,
        files: Sequence[str],
        columns: Sequence[str] | None = None,
        healpix_ranges: Any = None,
    ) -> None:
        """Create view `name` over exactly `files` (lake paths) with `columns` (default: all).

        Only before `lock()`: afterwards DuckDB could not open files outside the allow-list, and the list is
        frozen by the lock. Files come from the lake manifest, not from users, but each is still checked to
        lie inside the lake root (no '..', no globs, no symlink out of a local lake) because the allow-list
        is built from them. Hive partitioning is off: HATS paths (`Norder=3/Dir=0/Npix=12.parquet`) would
        otherwise add `Norder`/`Dir` columns that are not in the catalog definition.
        """
        self._check_open()
        if self._locked:
            raise SandboxError(
                "define_relation() after lock(): relations are fixed once the sandbox is locked"
            )
        if not isinstance(name, str) or not _IDENT_RE.match(name):
            raise ValueError(f"relation name {name!r}: use a plain identifier (letters, digits, '_')")
        if name.lower() in self._relations:
            raise ValueError(f"relation {name!r} is already defined")
        if isinstance(files, str) or not files:
            raise ValueError(
                f"relation {name!r}: give a non-empty list of files (an empty coverage has no rows)"
            )
        paths = [self._lake_file(f) for f in files]
        if columns is not None:
            if isinstance(columns, str) or not columns:
                raise ValueError(f"relation {name!r}: columns must be a non-empty list or None")
            for c in columns:
                if not isinstance(c, str) or not c or "\x00" in c:
                    raise ValueError(f"relation {name!r}: bad column name {c!r}")
            select = ", ".join(_quote_ident(c) for c in columns)
        else:
            select = "*"
        listing = ", ".join(_quote_literal(p) for p in paths)
        where = "" if healpix_ranges is None else " WHERE " + _healpix_filter(healpix_ranges)
        try:
            self._con.execute(
                f"CREATE VIEW {_quote_ident(name)} AS SELECT {select} "
                f"FROM read_parquet([{listing}], hive_partitioning = false){where}"
            )
        except duckdb.Error as exc:
            raise SandboxError(f"cannot define relation {name!r}: {_first_line(exc)}") from exc
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
        if not isinstance(name, str) or not _IDENT_RE.match(name):
            raise ValueError(f"relation name {name!r}: use a plain identifier (letters, digits, '_')")
        if name.lower() in self._relations:
            raise ValueError(f"relation {name!r} is already defined")
        if not isinstance(table, pa.Table):
            raise TypeError(f"relation {name!r}: expected a pyarrow.Table, got {type(table).__name__}")
        try:
            self._con.register(name, table)
        except duckdb.Error as exc:
            raise SandboxError(f"cannot define relation {name!r}: {_first_line(exc)}") from exc
        self._relations[name.lower()] = []

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

    def _lake_file(self, f: str) -> str:
        """`f` (absolute, s3:// or relative to the lake root) as the exact string DuckDB will open."""
        if not isinstance(f, str) or not f or "\x00" in f:
            raise ValueError(f"bad file name {f!r}")
        if _GLOB_CHARS & set(f):
            raise ValueError(f"{f!r}: glob characters are not allowed, list the files explicitly")
        root = self.storage.url_of("")
        if self.storage.is_s3:
            url = f if f.startswith("s3://") else self.storage.url_of(f)
            if not url.startswith(root + "/") or any(ch in url for ch in "?#\\"):
                raise ValueError(f"{f!r} is not inside the lake {root}")
            if any(seg in ("", ".", "..") for seg in url[len(root) + 1 :].split("/")):
                raise ValueError(f"{f!r}: empty, '.' or '..' path segments are not allowed")
            return url
        path = f if os.path.isabs(f) else self.storage.path(f)
        if any(seg in (".", "..") for seg in path.split("/")) or os.path.normpath(path) != path:
            raise ValueError(f"{f!r}: use a normalised path without '.' or '..' segments")
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root or real == real_root:
            raise ValueError(f"{f!r} is not inside the lake {root}")
        return path

    def lock(self, scope: Literal["files", "lake"] = "files") -> None:
        """Freeze the connection: only the views' files (or the lake root) stay readable, nothing else.

        Order matters and is what DuckDB 1.5.5 accepts: allow-lists first (they cannot change once
        external access is off), then `enable_external_access=false`, then (S3 without spill) the local
        filesystem off, then `lock_configuration=true`. The settings are read back, so a DuckDB that
        silently ignored one would fail here rather than run unlocked.
        """
        self._check_open()
        if self._locked:
            return
        con = self._con
        try:
            if scope == "files":
                con.execute("SET allowed_paths = ?", [sorted(self._files)])
            elif scope == "lake":
                con.execute("SET allowed_directories = ?", [[self.storage.url_of("").rstrip("/") + "/"]])
            else:
                raise ValueError(f"scope must be 'files' or 'lake', not {scope!r}")
            con.execute("SET enable_external_access = false")
            if self.storage.is_s3 and not self.limits.spill:
                con.execute("SET disabled_filesystems = 'LocalFileSystem'")
            con.execute("SET lock_configuration = true")
            external, locked = con.execute(
                "SELECT current_setting('enable_external_access'), current_setting('lock_configuration')"
            ).fetchone()
        except duckdb.Error as exc:
            raise SandboxError(f"could not lock the sandbox: {_first_line(exc)}") from exc
        if external or not locked:
            raise SandboxError(f"DuckDB did not lock: enable_external_access={external}, lock={locked}")
        self._locked = True
        log.debug(
            "sandbox locked: scope=%s, %d files, relations %s", scope, len(self._files), list(self._relations)
        )

    # ------------------------------------------------------------------ validation
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
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryRejected(f"the query does not parse: {_first_line(exc)}") from exc
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
            raise QueryRejected(f"the query does not parse: {_first_line(exc)}") from exc
        if tree.get("error"):
            raise QueryRejected(f"the query is not allowed: {tree.get('error_message', 'not a SELECT')}")
        if len(tree.get("statements", [])) != 1:
            raise QueryRejected("exactly one statement is allowed")
        self._check_tree(tree["statements"][0])

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

    # ------------------------------------------------------------------ execution
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
        if not self._locked:
            raise SandboxError("lock() the sandbox before running queries on it")
        self._end_run()  # supersede any unfinished stream
        self._stream_token = None
        self.check(sql)
        self._last_profile, self._last_reads = {}, {}
        if self.profile_enabled:
            self._con.execute("CALL truncate_duckdb_logs()")

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
                f"the query needs more than the {self.limits.memory_limit} memory limit: {_first_line(exc)}"
            )
        if isinstance(exc, duckdb.PermissionException):
            return SandboxError(f"the sandbox refused an access: {_first_line(exc)}")
        if isinstance(exc, duckdb.Error):
            return SandboxError(f"the query failed: {_first_line(exc)}")
        return exc

    # ------------------------------------------------------------------ profile
    def _collect_profile(self, deadline: _Deadline, rows: int, complete: bool, truncated: bool) -> None:
        """Fill `last_profile`.

        Keys: `rows_returned`, `truncated` (stopped at max_rows), `complete` (DuckDB's profile is whole: it
        is empty for a result abandoned early), `elapsed_s` (wall clock, ours); from DuckDB's profile:
        `latency_s`, `cpu_time_s`, `rows_scanned` (DuckDB's cumulative_rows_scanned, see the module notes),
        `files_scanned` (sum of the scans' 'Total Files Read': an ORDER BY .. LIMIT has two scans, as DuckDB
        re-reads the winning rows), `peak_memory_bytes`, `peak_temp_bytes`,
        `scans` (one dict per TABLE_SCAN: function, files, rows_scanned, rows_out, filters); and from the
        FileSystem log: `io` = {files_read, read_requests, bytes_read, files: {path: {reads, bytes}}}.
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
        reads: dict[str, list[tuple[int, int]]] = {}
        try:
            messages = self._con.execute(
                "SELECT message FROM duckdb_logs() WHERE type = 'FileSystem'"
            ).fetchall()
        except duckdb.Error:
            messages = []
        for (message,) in messages:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                entry = json.loads(message)
                if entry.get("op") == "READ":
                    reads.setdefault(entry["path"], []).append((int(entry["pos"]), int(entry["bytes"])))
        reads = {p: r for p, r in reads.items() if p in self._files or not self._files}
        self._last_reads = reads
        profile["io"] = {
            "files_read": len(reads),
            "read_requests": sum(len(r) for r in reads.values()),
            "bytes_read": sum(n for r in reads.values() for _, n in r),
            "files": {p: {"reads": len(r), "bytes": sum(n for _, n in r)} for p, r in sorted(reads.items())},
        }
        self._last_profile = profile

    def row_groups_read(self) -> dict[str, list[int]]:
        """For the last query: file -> indices of the row groups whose column chunks DuckDB actually read.

        Maps the FileSystem log's (pos, bytes) reads onto each file's column-chunk byte ranges (from
        `parquet_metadata`, read once per file per sandbox and only for files that were read). Footer reads
        map to no row group. On S3, DuckDB fetches a small file in one request, so all its row groups count
        as read: the figure is I/O truth, not a statistic. Also adds `row_groups_read` and
        `rows_in_row_groups_read` to `last_profile`.
        """
        self._check_open()
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
        """(row group, start, stop, rows) per column chunk of `path`, cached for the sandbox's life."""
        if path not in self._rg_cache:
            result = self._con.execute(
                "SELECT row_group_id, "
                "least(coalesce(dictionary_page_offset, data_page_offset), data_page_offset), "
                "total_compressed_size, row_group_num_rows FROM parquet_metadata(?)",
                [path],
            ).fetchall()
            self._rg_cache[path] = [(int(rg), int(s), int(s) + int(n), int(r)) for rg, s, n, r in result]
        return self._rg_cache[path]


def _healpix_filter(ranges: Any) -> str:
    """`_healpix_29` range predicates (from the engine's coverage, integers only): DuckDB pushes them into
    the Parquet scan and skips row groups whose statistics fall outside. No ranges: no rows."""
    pairs = [(int(lo), int(hi)) for lo, hi in ranges]
    if not pairs:
        return "false"
    return " OR ".join(f"(_healpix_29 >= {lo} AND _healpix_29 < {hi})" for lo, hi in pairs)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    """DuckDB messages carry a LINE/caret excerpt of the SQL; the engine reports only the first line."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
