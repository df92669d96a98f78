"""The query sandbox: hostile SQL is refused (by our validator, and by DuckDB's own lock behind it), the
time and memory limits hold, and the sandbox stays usable after every refusal, error and timeout.

Every check runs on both forms of the sandbox ("kind"): a `Sandbox` (one locked instance per query) and a
query of a long-lived `SandboxDatabase` (one locked instance, a connection per query); the database's own
guarantees (relations private to a query, concurrent queries in threads, per-query time limits, clean-up)
are tested at the end.

The lake is a folder in tmp_path with two granted Parquet files and a "private" catalog file that the
sandbox is not given; canaries (a text file and a Parquet file holding secret strings) sit outside the lake.
`test_key_checks_on_both_backends` repeats the key checks on the Ceph RGW when DAC_TEST_S3=1 (see
conftest.py), else its S3 variant skips and says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dac_lake.duckdb_io import httpfs_extension_path
from dac_lake.sandbox import (
    QueryRejected,
    QueryTimeout,
    Sandbox,
    SandboxDatabase,
    SandboxError,
    SandboxLimits,
)
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage

CANARY_TEXT = "CANARY-7f3a-text-secret"
CANARY_PARQUET = "CANARY-7f3a-parquet-secret"
CANARY_PRIVATE = "CANARY-7f3a-private-catalog"
CANARIES = (CANARY_TEXT, CANARY_PARQUET, CANARY_PRIVATE)
ROWS_PER_FILE = 20_000
ROW_GROUP = 2_000
TOTAL = 2 * ROWS_PER_FILE
COUNT_SQL = "SELECT count(*) AS n FROM __dac_t0"
# 40,000^3 row combinations: minutes of CPU, over the views alone (no table function needed)
SLOW_SQL = "SELECT count(*) FROM __dac_t0 a, __dac_t0 b, __dac_t0 c WHERE a.ra + b.ra + c.ra < -1"


@dataclass
class LakeFixture:
    storage: LakeStorage
    files: list[str]  # granted: what define_relation gets
    private: str  # inside the lake, not granted
    canary_parquet: str  # outside the lake
    canary_text: str  # outside the lake
    scratch: str  # a writable place outside the lake, as a COPY target


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP)
    return buf.getvalue()


def _catalog_part(first_id: int) -> pa.Table:
    rng = np.random.default_rng(first_id)
    n = ROWS_PER_FILE
    return pa.table(
        {
            "object_id": np.arange(first_id, first_id + n, dtype=np.int64),
            "ra": rng.uniform(0, 360, n),
            "dec": rng.uniform(-90, 90, n),
            "label": [f"obj{i}" for i in range(n)],
        }
    )


def _write_lake(storage: LakeStorage) -> tuple[list[str], str]:
    """Two granted HATS-named partition files and one private one; returns their full paths/URLs."""
    storage.ensure_root()
    rels = [f"catalogs/demo/dr1/dataset/Norder=0/Dir=0/Npix={p}.parquet" for p in (1, 2)]
    for i, rel in enumerate(rels):
        storage.write_bytes(rel, _parquet_bytes(_catalog_part(i * ROWS_PER_FILE)))
    private = "catalogs/secret/dr1/dataset/Norder=0/Dir=0/Npix=3.parquet"
    storage.write_bytes(private, _parquet_bytes(pa.table({"secret": [CANARY_PRIVATE]})))
    storage.write_text("catalogs/demo/dr1/_dac_release.json", '{"note": "' + CANARY_PRIVATE + '"}')
    return [storage.url_of(r) for r in rels], storage.url_of(private)


@pytest.fixture
def local(tmp_path) -> LakeFixture:
    storage = LakeStorage(str(tmp_path / "lake"), load_settings())
    files, private = _write_lake(storage)
    (tmp_path / "canary.txt").write_text(CANARY_TEXT + "\n")
    pq.write_table(pa.table({"secret": [CANARY_PARQUET]}), tmp_path / "canary.parquet")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return LakeFixture(
        storage, files, private, str(tmp_path / "canary.parquet"), str(tmp_path / "canary.txt"), str(scratch)
    )


KINDS = ["sandbox", "database"]


class _DatabaseQuery:
    """A SandboxDatabase query that also closes its database: the tests' stand-in for a Sandbox."""

    def __init__(self, db: SandboxDatabase, limits: SandboxLimits):
        self.db = db
        self.q = db.query(limits)

    def __getattr__(self, name):
        return getattr(self.q, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.q.close()
        self.db.close()


def _locked(
    fx: LakeFixture,
    limits: SandboxLimits = SandboxLimits(timeout_s=20),  # noqa: B008
    kind: str = "sandbox",
):
    """`__dac_t0` over the two granted files, locked: a Sandbox, or a query on a SandboxDatabase opened
    for exactly those files."""
    if kind == "sandbox":
        sb = Sandbox(fx.storage, limits)
        sb.define_relation("__dac_t0", fx.files)
        sb.lock()
        return sb
    q = _DatabaseQuery(SandboxDatabase(fx.storage, fx.files, limits, connections=2), limits)
    q.define_relation("__dac_t0", fx.files)
    return q


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def sandbox(local, kind):
    sb = _locked(local, kind=kind)
    yield sb
    sb.close()


def _count(sb: Sandbox) -> int:
    return sb.execute(COUNT_SQL).column("n")[0].as_py()


def _assert_no_canary(text: str) -> None:
    for canary in CANARIES:
        assert canary not in text


# ---------------------------------------------------------------------------------------------- hostile SQL
# Each is refused by the validator before DuckDB executes it. Placeholders: {txt} {pq} canaries outside the
# lake, {private} a lake file not granted, {scratch} a folder outside the lake, {lake} the lake root,
# {ext} the httpfs extension file.
HOSTILE = {
    # file readers of every kind, on the canaries and on the lake file not granted
    "read_csv": "SELECT * FROM read_csv('{txt}')",
    "read_csv_auto": "SELECT * FROM read_csv_auto('{txt}', header=false)",
    "read_text": "SELECT content FROM read_text('{txt}')",
    "read_blob": "SELECT content FROM read_blob('{txt}')",
    "read_json": "SELECT * FROM read_json('{txt}')",
    "read_parquet": "SELECT * FROM read_parquet('{pq}')",
    "read_parquet_list": "SELECT * FROM read_parquet(['{pq}'])",
    "read_parquet_private": "SELECT * FROM read_parquet('{private}')",
    "read_parquet_dotdot": "SELECT * FROM read_parquet('{lake}/../canary.parquet')",
    "parquet_metadata": "SELECT * FROM parquet_metadata('{pq}')",
    "parquet_schema": "SELECT * FROM parquet_schema('{private}')",
    "sniff_csv": "SELECT * FROM sniff_csv('{txt}')",
    "glob": "SELECT * FROM glob('{lake}/**')",
    "glob_outside": "SELECT * FROM glob('/etc/*')",
    "scalar_subquery_reader": "SELECT (SELECT content FROM read_text('{txt}')) AS x",
    "reader_in_cte": "WITH c AS (SELECT * FROM read_text('{txt}')) SELECT * FROM c",
    "reader_in_where": "SELECT 1 FROM __dac_t0 WHERE label IN (SELECT content FROM read_text('{txt}'))",
    "reader_qualified": "SELECT * FROM system.main.read_text('{txt}')",
    "reader_homoglyph": "SELECT * FROM r\u0435ad_text('{txt}')",  # Cyrillic 'е'
    # replacement scans: a file path or an unknown name used as a table
    "replacement_scan_single": "SELECT * FROM '{pq}'",
    "replacement_scan_double": 'SELECT * FROM "{pq}"',
    "replacement_scan_txt": "FROM '{txt}'",
    "replacement_scan_relative": "SELECT * FROM 'canary.parquet'",
    "cte_out_of_scope_file": "SELECT * FROM (WITH \"{pq}\" AS (SELECT 1) SELECT 1), '{pq}'",
    "cte_self_reference": "WITH tables AS (SELECT * FROM tables) SELECT * FROM tables",
    "cte_qualified": "WITH sqlite_master AS (SELECT 1) SELECT * FROM main.sqlite_master",
    "cte_in_sibling_subquery": "SELECT * FROM (WITH t AS (SELECT 1) SELECT 1) a, (SELECT * FROM t) b",
    "unknown_table": "SELECT * FROM __dac_t1",
    "cte_shadow_out_of_scope": "SELECT * FROM (WITH sqlite_master AS (SELECT 1) SELECT 1), sqlite_master",
    "cte_forward_reference": "WITH a AS (FROM duckdb_views), duckdb_views AS (SELECT 1) SELECT * FROM a",
    # writing, attaching, extensions
    "copy_to": "COPY (SELECT 1) TO '{scratch}/out.csv'",
    "copy_view_to": "COPY __dac_t0 TO '{scratch}/out.parquet' (FORMAT parquet)",
    "copy_to_lake": "COPY (SELECT 1) TO '{private}'",
    "copy_from": "COPY __dac_t0 FROM '{txt}'",
    "export_database": "EXPORT DATABASE '{scratch}/exp'",
    "attach_file": "ATTACH '{scratch}/x.duckdb' AS x",
    "attach_memory": "ATTACH ':memory:' AS m",
    "detach": "DETACH memory",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "load_path": "LOAD '{ext}'",
    "force_install": "FORCE INSTALL httpfs FROM core",
    # configuration
    "set": "SET threads = 64",
    "set_external": "SET enable_external_access = true",
    "set_paths": "SET allowed_directories = ['/']",
    "reset": "RESET memory_limit",
    "set_variable": "SET VARIABLE x = 1",
    "pragma_set": "PRAGMA threads = 64",
    "pragma_call": "PRAGMA database_list",
    "pragma_profiling": "PRAGMA enable_profiling",
    "call": "CALL duckdb_settings()",
    "use": "USE system.main",
    "checkpoint": "CHECKPOINT",
    "begin": "BEGIN TRANSACTION",
    "create_secret": "CREATE SECRET s (TYPE s3, KEY_ID 'x', SECRET 'y')",
    # statement stacking and comment tricks
    "stacked": "SELECT 1; SELECT 2",
    "stacked_drop": "SELECT 1; DROP VIEW __dac_t0",
    "stacked_after_comment": "SELECT 1 --\n; DROP VIEW __dac_t0",
    "stacked_block_comment": "SELECT 1 /* x */; COPY (SELECT 1) TO '{scratch}/c.csv'",
    "comment_hides_select": "/* SELECT */ DROP VIEW __dac_t0",
    "fullwidth_semicolon": "SELECT 1\uff1b DROP VIEW __dac_t0",
    "nul_truncation": "SELECT 1\x00; DROP VIEW __dac_t0",
    "empty": "",
    "only_comment": "-- nothing",
    # DDL / DML
    "create_table": "CREATE TABLE t AS SELECT * FROM __dac_t0",
    "create_temp": "CREATE TEMP TABLE t AS SELECT 1",
    "create_view": "CREATE VIEW v AS SELECT * FROM read_text('{txt}')",
    "create_macro": "CREATE MACRO m(a) AS a + 1",
    "drop_view": "DROP VIEW __dac_t0",
    "insert": "INSERT INTO __dac_t0 VALUES (1, 2, 3, 'x')",
    "update": "UPDATE __dac_t0 SET ra = 0",
    "delete": "DELETE FROM __dac_t0",
    "pivot": "PIVOT __dac_t0 ON label USING count(*)",
    "explain": "EXPLAIN SELECT 1",
    "describe": "DESCRIBE __dac_t0",
    "show_tables": "SHOW TABLES",
    "summarize": "SUMMARIZE __dac_t0",
    # server state and system catalogs (decided: refused, see the module docstring)
    "current_setting": "SELECT current_setting('allowed_paths')",
    "current_setting_qualified": "SELECT system.main.current_setting('temp_directory')",
    "current_setting_upper": "SELECT \"CURRENT_SETTING\"('threads')",
    "getvariable": "SELECT getvariable('x')",
    "getenv": "SELECT getenv('HOME')",
    "write_log": "SELECT write_log('x')",
    "duckdb_settings": "SELECT * FROM duckdb_settings()",
    "duckdb_secrets": "SELECT * FROM duckdb_secrets()",
    "which_secret": "SELECT * FROM which_secret('s3://b/k', 's3')",
    "duckdb_extensions": "SELECT * FROM duckdb_extensions()",
    "duckdb_logs": "SELECT * FROM duckdb_logs()",
    "duckdb_tables_view": "SELECT * FROM duckdb_tables",
    "information_schema": "SELECT * FROM information_schema.tables",
    "pg_catalog": "SELECT * FROM pg_catalog.pg_tables",
    "sqlite_master": "SELECT * FROM sqlite_master",
    "other_catalog": "SELECT * FROM system.main.__dac_t0",
    "temp_catalog": "SELECT * FROM temp.main.x",
    # dynamic SQL
    "query": "SELECT * FROM query('SELECT * FROM read_text(''{txt}'')')",
    "query_table": "SELECT * FROM query_table('__dac_t0')",
    "json_execute": "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
    # size and depth
    "too_long": "SELECT 1 AS x" + " " * 2_000_001,
    "deep_expression": "SELECT " + "+".join(["1"] * 5000),
    "deep_subqueries": "SELECT * FROM " + "(SELECT * FROM " * 600 + "__dac_t0" + ") t" * 600,
    "non_ascii_reader": "SELECT '\u2603' AS snow, * FROM read_text('{txt}') -- \u00e9t\u00e9",
}


def _fill(template: str, fx: LakeFixture) -> str:
    return (
        template.replace("{txt}", fx.canary_text)
        .replace("{pq}", fx.canary_parquet)
        .replace("{private}", fx.private)
        .replace("{scratch}", fx.scratch)
        .replace("{lake}", fx.storage.url_of(""))
        .replace("{ext}", str(httpfs_extension_path()))
    )


def _lake_digest(fx: LakeFixture) -> str:
    h = hashlib.sha256()
    for rel, size in sorted(fx.storage.walk_files("")):
        h.update(f"{rel}:{size}:".encode())
        h.update(fx.storage.read_bytes(rel))
    return h.hexdigest()


def test_hostile_corpus_is_refused_and_the_sandbox_stays_healthy(sandbox, local):
    """Every statement is refused with a clear QueryRejected, nothing leaks, nothing is written."""
    before = _lake_digest(local)
    for name, template in HOSTILE.items():
        sql = _fill(template, local)
        with pytest.raises(QueryRejected) as info:
            sandbox.execute(sql)
        message = str(info.value)
        assert message.strip(), name
        assert "\n" not in message, f"{name}: the error should be one line: {message!r}"
        _assert_no_canary(message)
        assert _count(sandbox) == TOTAL, f"{name} broke the sandbox"
    assert _lake_digest(local) == before
    assert os.listdir(local.scratch) == []
    assert sandbox.execute("SELECT min(object_id) AS m FROM __dac_t0").column("m")[0].as_py() == 0


@pytest.mark.parametrize(
    "name", ["read_text", "copy_to", "stacked", "pragma_set", "duckdb_settings", "replacement_scan_single"]
)
def test_explain_and_stream_validate_too(sandbox, local, name):
    sql = _fill(HOSTILE[name], local)
    with pytest.raises(QueryRejected):
        sandbox.explain(sql)
    with pytest.raises(QueryRejected):
        sandbox.stream(sql)
    with pytest.raises(QueryRejected):
        sandbox.check(sql)


def test_refusal_messages_say_why(sandbox, local):
    cases = {
        "stacked": "exactly one statement",
        "drop_view": "only SELECT",
        "read_text": "table function read_text() is not allowed",
        "current_setting": "function current_setting() is not allowed",
        "replacement_scan_single": "unknown table",
        "describe": "DESCRIBE",
        "too_long": "characters long",
        "information_schema": "is not allowed",
    }
    for name, expected in cases.items():
        with pytest.raises(QueryRejected, match=re.escape(expected)):
            sandbox.execute(_fill(HOSTILE[name], local))


def test_python_variables_are_never_scanned(sandbox):
    """Neither a variable named like a defined relation nor one named like an undefined one is read."""
    __dac_t0 = pd.DataFrame({"secret": [CANARY_TEXT]})
    __dac_t9 = pd.DataFrame({"secret": [CANARY_TEXT]})
    canary_tbl = pa.table({"secret": [CANARY_PARQUET]})
    assert len(__dac_t0) == len(__dac_t9) == canary_tbl.num_rows == 1
    assert _count(sandbox) == TOTAL  # the view, not the DataFrame
    for sql in ("SELECT * FROM __dac_t9", "SELECT * FROM canary_tbl"):
        with pytest.raises(QueryRejected, match="unknown table"):
            sandbox.execute(sql)
        # and DuckDB itself (python_enable_replacements=false, no external access) does not scan them
        with pytest.raises(duckdb.CatalogException):
            sandbox._con.execute(sql).fetchall()


# ----------------------------------------------------------------------------- DuckDB's lock on its own
# Run on the raw connection, i.e. as if a statement had got past the validator.
RAW_REFUSED = [
    "SELECT * FROM read_text('{txt}')",
    "SELECT * FROM read_csv('{txt}')",
    "SELECT * FROM read_blob('{txt}')",
    "SELECT * FROM read_parquet('{pq}')",
    "SELECT * FROM '{pq}'",
    "SELECT * FROM read_parquet('{private}')",
    "SELECT * FROM read_parquet('{lake}/../canary.parquet')",
    "SELECT * FROM read_text('{lake}/catalogs/demo/dr1/_dac_release.json')",
    "SELECT * FROM glob('{lake}/**')",
    "SELECT * FROM glob('{scratch}/../*')",
    "SELECT * FROM parquet_metadata('{pq}')",
    "COPY (SELECT 1) TO '{scratch}/out.csv'",
    "COPY (SELECT 1) TO '{lake}/new.csv'",
    "EXPORT DATABASE '{scratch}/exp'",
    "ATTACH '{scratch}/x.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{ext}'",
    "SET threads = 64",
    "RESET memory_limit",
    "PRAGMA threads = 64",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET lock_configuration = false",
    "SELECT * FROM read_text('http://127.0.0.1:1/x')",
]


def test_duckdb_lock_alone_refuses_files_and_settings(sandbox, local):
    con = sandbox._con
    for template in RAW_REFUSED:
        sql = _fill(template, local)
        with pytest.raises(duckdb.Error) as info:
            con.execute(sql).fetchall()
        _assert_no_canary(str(info.value))
        assert isinstance(info.value, duckdb.PermissionException | duckdb.InvalidInputException), (
            sql,
            info.value,
        )
    assert os.listdir(local.scratch) == []
    assert not local.storage.exists("new.csv")
    # the views, defined before the lock, still read their (allow-listed) files
    assert _count(sandbox) == TOTAL


def test_duckdb_lock_alone_does_not_stop_ddl(sandbox):
    """Why the validator is SELECT-only: DuckDB's lock lets these through (1.5.5, measured)."""
    con = sandbox._con
    con.execute("ATTACH ':memory:' AS m")
    con.execute("CREATE TABLE m.t AS SELECT 1 AS x")
    con.execute("CREATE MACRO plus1(a) AS a + 1")
    assert con.execute("SELECT plus1(x) FROM m.t").fetchall() == [(2,)]


def test_settings_in_force_after_lock(sandbox, local):
    con = sandbox._con

    def setting(name):
        return con.execute("SELECT current_setting(?)", [name]).fetchone()[0]

    assert setting("enable_external_access") is False
    assert setting("lock_configuration") is True
    assert setting("autoload_known_extensions") is False
    assert setting("autoinstall_known_extensions") is False
    assert setting("python_enable_replacements") is False
    assert setting("python_scan_all_frames") is False
    assert setting("allow_community_extensions") is False
    assert setting("allow_persistent_secrets") is False
    assert setting("allowed_configs") == []
    assert sorted(setting("allowed_paths")) == sorted(local.files)
    spill = setting("temp_directory")
    tmp = sandbox._tmp if isinstance(sandbox, Sandbox) else sandbox.db._tmp
    assert spill.startswith(tmp + os.sep)
    # DuckDB adds the temp directory to the allowed directories by itself: that is all there is
    assert setting("allowed_directories") == [spill.rstrip("/") + "/"]
    assert setting("threads") == 2
    assert duckdb.__version__ == "1.5.5"


# ------------------------------------------------------------------------------------------ normal use
def test_queries_params_and_unusual_but_harmless_sql(sandbox):
    assert _count(sandbox) == TOTAL
    t = sandbox.execute(
        "SELECT count(*) AS n FROM __dac_t0 WHERE object_id BETWEEN $lo AND $hi", {"lo": 10, "hi": 19}
    )
    assert t.column("n")[0].as_py() == 10
    t = sandbox.execute("SELECT object_id FROM __dac_t0 WHERE object_id < ? ORDER BY 1", [3])
    assert t.column("object_id").to_pylist() == [0, 1, 2]
    # a huge IN list, as a generated HEALPix-range query may carry
    ids = ",".join(str(i) for i in range(0, 40_000, 2))
    t = sandbox.execute(f"SELECT count(*) AS n FROM __dac_t0 WHERE object_id IN ({ids})")
    assert t.column("n")[0].as_py() == TOTAL // 2
    # non-ASCII literals and identifiers, comments, a trailing semicolon
    t = sandbox.execute("SELECT '\u2603 \u00e9t\u00e9' AS \"\u00e9toile\" /* \u2603 */ -- fin\n;")
    assert t.to_pylist() == [{"\u00e9toile": "\u2603 \u00e9t\u00e9"}]
    # CTEs, set operations, window functions and the allowed table functions
    t = sandbox.execute(
        "WITH a AS (SELECT object_id FROM __dac_t0 WHERE object_id < 5), b AS (SELECT * FROM range(3) r(x)) "
        "SELECT count(*) AS n FROM (SELECT object_id FROM a UNION ALL SELECT x FROM b "
        "UNION ALL SELECT unnest([1, 2]) UNION ALL SELECT * FROM generate_series(1, 2))"
    )
    assert t.column("n")[0].as_py() == 12
    t = sandbox.execute(
        "SELECT object_id, row_number() OVER (ORDER BY ra DESC) AS rk FROM __dac_t0 QUALIFY rk <= 3"
    )
    assert t.num_rows == 3
    # CTEs may take any name, system views' included: inside their scope the name means the CTE
    t = sandbox.execute(
        'WITH tables AS (SELECT 7 AS n), "x.parquet" AS (SELECT n + 1 AS n FROM tables) '
        "SELECT (SELECT n FROM 'x.parquet') AS a, (SELECT n FROM tables) AS b"
    )
    assert t.to_pylist() == [{"a": 8, "b": 7}]
    # a moderately deep generated query is fine
    t = sandbox.execute("SELECT count(*) AS n FROM " + "(SELECT * FROM " * 100 + "__dac_t0" + ") t" * 100)
    assert t.column("n")[0].as_py() == TOTAL
    # the relation name is case-insensitive, as in DuckDB
    assert sandbox.execute('SELECT count(*) AS n FROM "__DAC_T0"').column("n")[0].as_py() == TOTAL


def test_hive_partitioning_off_and_columns(local):
    """HATS paths (Norder=0/Dir=0/...) must not add Norder/Dir columns; `columns` restricts the view."""
    with Sandbox(local.storage) as sb:
        sb.define_relation("__dac_t0", local.files)
        sb.define_relation("__dac_t1", local.files[:1], columns=["object_id", "ra"])
        sb.lock()
        assert sb.execute("SELECT * FROM __dac_t0 LIMIT 1").schema.names == [
            "object_id",
            "ra",
            "dec",
            "label",
        ]
        assert sb.execute("SELECT * FROM __dac_t1 LIMIT 1").schema.names == ["object_id", "ra"]
        with pytest.raises(SandboxError, match="failed"):
            sb.execute("SELECT dec FROM __dac_t1")
        assert _count(sb) == TOTAL


def test_max_rows_and_stream(local, kind):
    with _locked(local, SandboxLimits(max_rows=25), kind=kind) as sb:
        t = sb.execute("SELECT object_id FROM __dac_t0 ORDER BY object_id")
        assert t.column("object_id").to_pylist() == list(range(25))
        assert sb.last_profile["truncated"] is True
        t = sb.execute("SELECT object_id FROM __dac_t0 WHERE object_id < 5")
        assert t.num_rows == 5 and sb.last_profile["truncated"] is False
        # the generated SQL's own LIMIT max_rows: not truncated, and DuckDB's profile is complete
        t = sb.execute("SELECT object_id FROM __dac_t0 ORDER BY ra LIMIT 25")
        assert t.num_rows == 25 and sb.last_profile["truncated"] is False
        assert sb.last_profile["complete"] is True
        # ORDER BY .. LIMIT is a TOP_N with late materialisation: two scans, each over both files
        assert [sc["files"] for sc in sb.last_profile["scans"]] == [2, 2]
        assert sb.execute("SELECT 1 AS x WHERE false").num_rows == 0
    with _locked(local, SandboxLimits(max_rows=0), kind=kind) as sb:
        t = sb.execute("SELECT object_id FROM __dac_t0")
        assert t.num_rows == 0 and t.schema.names == ["object_id"] and sb.last_profile["truncated"] is True
    with _locked(local, kind=kind) as sb:
        reader = sb.stream("SELECT object_id FROM __dac_t0", batch_rows=1000)
        total = sum(batch.num_rows for batch in reader)
        assert total == TOTAL
        assert sb.last_profile["rows_returned"] == TOTAL and sb.last_profile["complete"] is True
        # a stream left unfinished is superseded by the next query, which works
        reader = sb.stream("SELECT object_id FROM __dac_t0", batch_rows=1000)
        reader.read_next_batch()
        assert _count(sb) == TOTAL
        with pytest.raises(SandboxError, match="superseded"):
            reader.read_all()


def test_lifecycle_rules(local):
    sb = Sandbox(local.storage)
    with pytest.raises(SandboxError, match="lock"):
        sb.execute("SELECT 1")
    sb.define_relation("__dac_t0", local.files)
    sb.lock()
    with pytest.raises(SandboxError, match="after lock"):
        sb.define_relation("__dac_t1", local.files)
    tmp = sb._tmp
    assert os.path.isdir(tmp)
    sb.close()
    assert not os.path.exists(tmp)
    with pytest.raises(SandboxError, match="closed"):
        sb.execute("SELECT 1")
    sb.close()  # idempotent


def test_define_relation_checks_files_and_names(local, tmp_path):
    lake = local.storage.url_of("")
    link = Path(lake) / "catalogs" / "demo" / "link.parquet"
    link.symlink_to(local.canary_parquet)
    with Sandbox(local.storage) as sb:
        bad_files = [
            local.canary_parquet,
            f"{lake}/../canary.parquet",
            f"{lake}/catalogs/./demo/dr1/dataset/Norder=0/Dir=0/Npix=1.parquet",
            f"{lake}/catalogs/demo/dr1/dataset/Norder=0/Dir=0/*.parquet",
            f"{lake}//catalogs/demo/x.parquet",
            str(link),
            "s3://bucket/lake/x.parquet",
            "../canary.parquet",
            lake,
            "",
            "x\x00y",
        ]
        for f in bad_files:
            with pytest.raises(ValueError):
                sb.define_relation("__dac_t0", [f])
        for name in ("x y", "a;b", '"q"', "1abc", "", "t" * 64):
            with pytest.raises(ValueError, match="relation name"):
                sb.define_relation(name, local.files)
        with pytest.raises(ValueError, match="non-empty"):
            sb.define_relation("__dac_t0", [])
        with pytest.raises(ValueError, match="non-empty"):
            sb.define_relation("__dac_t0", local.files[0])
        with pytest.raises(ValueError, match="column"):
            sb.define_relation("__dac_t0", local.files, columns=["ra", ""])
        # a relative path is taken relative to the lake root
        rel = local.storage.rel_of(local.files[0])
        sb.define_relation("__dac_t0", [rel])
        with pytest.raises(ValueError, match="already defined"):
            sb.define_relation("__DAC_T0", local.files)
        with pytest.raises(SandboxError, match="cannot define"):
            sb.define_relation("__dac_t1", [f"{lake}/missing.parquet"])
        sb.lock()
        assert _count(sb) == ROWS_PER_FILE


def test_scope_lake_allows_the_lake_at_duckdb_level_only(local):
    """scope='lake': DuckDB may read the whole lake root, the validator still refuses anything else."""
    with Sandbox(local.storage) as sb:
        sb.define_relation("__dac_t0", local.files)
        sb.lock(scope="lake")
        assert _count(sb) == TOTAL
        assert sb._con.execute(f"SELECT secret FROM read_parquet('{local.private}')").fetchall() == [
            (CANARY_PRIVATE,)
        ]
        with pytest.raises(QueryRejected):
            sb.execute(f"SELECT * FROM read_parquet('{local.private}')")
        with pytest.raises(duckdb.PermissionException):
            sb._con.execute(f"SELECT * FROM read_parquet('{local.canary_parquet}')").fetchall()


# ------------------------------------------------------------------------------------------ limits
def test_timeout_interrupts_and_the_next_query_works(local, kind):
    with _locked(local, SandboxLimits(timeout_s=1.0), kind=kind) as sb:
        for run in (sb.execute, lambda sql: sb.stream(sql).read_all(), sb.explain):
            t0 = time.monotonic()
            with pytest.raises(QueryTimeout, match="1 s limit"):
                run(SLOW_SQL)
            elapsed = time.monotonic() - t0
            assert 0.9 <= elapsed < 2.0, elapsed
            assert _count(sb) == TOTAL
        # the range() table function is allowed, and timed out the same way
        t0 = time.monotonic()
        with pytest.raises(QueryTimeout):
            sb.execute(
                "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range * b.range < 0"
            )
        assert time.monotonic() - t0 < 2.0
        assert _count(sb) == TOTAL


def test_many_quick_queries_under_a_short_timeout(local, kind):
    """Timer races: a timer firing just after a query ends must not break the next query."""
    with _locked(local, SandboxLimits(timeout_s=0.1), kind=kind) as sb:
        ok = 0
        for _ in range(60):
            with contextlib.suppress(QueryTimeout):
                ok += _count(sb) == TOTAL
        assert ok > 0
        time.sleep(0.1)
        assert sb.execute("SELECT 42 AS x").column("x")[0].as_py() == 42


def test_memory_limit_without_spill_fails_cleanly(local, kind):
    with _locked(local, SandboxLimits(memory_limit="64MB", spill=False), kind=kind) as sb:
        with pytest.raises(SandboxError, match="memory limit"):
            sb.execute("SELECT count(*) FROM (SELECT range, random() AS r FROM range(20000000) ORDER BY r)")
        assert _count(sb) == TOTAL


def test_spill_goes_to_the_private_temp_dir(local, kind):
    with _locked(local, SandboxLimits(memory_limit="64MB", threads=1, timeout_s=60), kind=kind) as sb:
        t = sb.execute(
            "SELECT count(*) AS n FROM (SELECT range, random() AS r FROM range(6000000) ORDER BY r)"
        )
        assert t.column("n")[0].as_py() == 6_000_000
        assert sb.last_profile["peak_temp_bytes"] > 0


# ------------------------------------------------------------------------------------------ profile
def test_profile_reports_files_rows_and_row_groups(sandbox, local):
    sandbox.execute("SELECT count(*) FROM __dac_t0 WHERE object_id < 1500")
    profile = sandbox.last_profile
    assert profile["complete"] is True and profile["rows_returned"] == 1
    assert profile["files_scanned"] == 2
    assert profile["rows_scanned"] > 0
    (scan,) = profile["scans"]
    assert scan["function"] == "READ_PARQUET" and scan["rows_out"] == 1500
    assert profile["io"]["files_read"] >= 1 and profile["io"]["bytes_read"] > 0
    # row-group pruning: only the first row group of the first file holds object_id < 1500
    assert sandbox.row_groups_read() == {local.files[0]: [0]}
    assert sandbox.last_profile["row_groups_read"] == 1
    assert sandbox.last_profile["rows_in_row_groups_read"] == ROW_GROUP

    sandbox.execute("SELECT sum(ra) FROM __dac_t0")
    per_file = sandbox.row_groups_read()
    assert per_file == {f: list(range(ROWS_PER_FILE // ROW_GROUP)) for f in local.files}
    assert sandbox.last_profile["rows_in_row_groups_read"] == TOTAL

    text = sandbox.explain("SELECT count(*) FROM __dac_t0 WHERE object_id > 39000")
    assert "READ_PARQUET" in text and "Total Files Read: 2" in text
    assert sandbox.row_groups_read() == {local.files[1]: [ROWS_PER_FILE // ROW_GROUP - 1]}


# ---------------------------------------------------------------------------------- local and S3 lakes
def _s3_put(storage: LakeStorage, bucket: str, key: str, data: bytes) -> None:
    storage.boto3.put_object(Bucket=bucket, Key=key, Body=data)


def test_key_checks_on_both_backends(lake_url, tmp_path, kind):
    """The views read through the lock, and the canaries (outside the lake prefix, in another bucket,
    on local disk) and the private catalog stay out of reach: on a local folder and on Ceph RGW."""
    storage = LakeStorage(lake_url, load_settings())
    files, private = _write_lake(storage)
    local_txt = tmp_path / "canary.txt"
    local_txt.write_text(CANARY_TEXT)
    other_bucket = None
    if storage.is_s3:
        bucket = storage.location.bucket
        _s3_put(storage, bucket, "canary.parquet", _parquet_bytes(pa.table({"secret": [CANARY_PARQUET]})))
        _s3_put(storage, bucket, "canary.txt", CANARY_TEXT.encode())
        canary_pq, canary_txt = f"s3://{bucket}/canary.parquet", f"s3://{bucket}/canary.txt"
        other_bucket = f"dac-test-canary-{uuid.uuid4().hex[:8]}"
        storage.boto3.create_bucket(Bucket=other_bucket)
        _s3_put(storage, other_bucket, "c.parquet", _parquet_bytes(pa.table({"secret": [CANARY_PARQUET]})))
    else:
        pq.write_table(pa.table({"secret": [CANARY_PARQUET]}), tmp_path / "canary.parquet")
        canary_pq, canary_txt = str(tmp_path / "canary.parquet"), str(local_txt)
    try:
        fx = LakeFixture(storage, files, private, canary_pq, canary_txt, str(tmp_path))
        with _locked(fx, SandboxLimits(timeout_s=1.5, spill=False), kind=kind) as sb:
            assert _count(sb) == TOTAL  # httpfs reads work after enable_external_access=false
            assert sb.execute("SELECT * FROM __dac_t0 LIMIT 1").schema.names == [
                "object_id",
                "ra",
                "dec",
                "label",
            ]
            sb.execute("SELECT count(*) FROM __dac_t0 WHERE object_id >= 38500")
            assert sb.last_profile["files_scanned"] == 2
            assert set(sb.row_groups_read()) <= {files[1]}
            for name in (
                "read_parquet",
                "read_text",
                "read_parquet_private",
                "glob",
                "copy_to_lake",
                "stacked",
                "install",
                "set",
                "replacement_scan_single",
                "duckdb_secrets",
                "which_secret",
            ):
                with pytest.raises(QueryRejected):
                    sb.execute(_fill(HOSTILE[name], fx))
            raw = [
                f"SELECT * FROM read_parquet('{canary_pq}')",
                f"SELECT * FROM read_text('{canary_txt}')",
                f"SELECT * FROM read_parquet('{private}')",
                f"SELECT * FROM glob('{storage.url_of('')}/**')",
                f"SELECT * FROM read_text('{local_txt}')",
                f"COPY (SELECT 1) TO '{storage.url_of('new.csv')}'",
                "SET s3_endpoint = 'example.com'",
            ]
            if other_bucket:
                raw.append(f"SELECT * FROM read_parquet('s3://{other_bucket}/c.parquet')")
                raw.append(f"SELECT * FROM read_parquet('{storage.url_of('catalogs')}/../../canary.parquet')")
            for sql in raw:
                with pytest.raises(duckdb.Error) as info:
                    sb._con.execute(sql).fetchall()
                _assert_no_canary(str(info.value))
            assert not storage.exists("new.csv")
            t0 = time.monotonic()
            with pytest.raises(QueryTimeout):
                sb.execute(SLOW_SQL)
            assert time.monotonic() - t0 < 2.5
            assert _count(sb) == TOTAL
            if storage.is_s3:
                # spill=False on an S3 lake switches the local filesystem off altogether
                with pytest.raises(duckdb.PermissionException, match="LocalFileSystem"):
                    sb._con.execute(f"SELECT * FROM read_text('{local_txt}')").fetchall()
    finally:
        if other_bucket:
            storage.boto3.delete_object(Bucket=other_bucket, Key="c.parquet")
            storage.boto3.delete_bucket(Bucket=other_bucket)


# ---------------------------------------------------------------------------------- the long-lived database
def test_database_relations_are_private_to_a_query_and_dropped_after_it(local):
    with SandboxDatabase(local.storage, local.files, SandboxLimits(timeout_s=20), connections=1) as db:
        with db.query() as q:
            q.define_relation("__dac_t0", local.files[:1])
            q.register_table("__dac_u0", pa.table({"x": [1, 2, 3]}))
            assert _count(q) == ROWS_PER_FILE
            assert q.execute("SELECT sum(x) AS s FROM __dac_u0").column("s")[0].as_py() == 6
            con = q._con
        # the same (only) connection, lent to the next query: the previous relations are gone
        with db.query() as q:
            assert q._con is con
            for sql in (COUNT_SQL, "SELECT * FROM __dac_u0"):
                with pytest.raises(QueryRejected, match="unknown table"):
                    q.execute(sql)
                with pytest.raises(duckdb.CatalogException):
                    q._con.execute(sql).fetchall()
            q.define_relation("__dac_t0", local.files)  # the name is free again
            assert _count(q) == TOTAL
        assert db.active == 0


def test_database_refuses_files_it_was_not_opened_for(local):
    with SandboxDatabase(local.storage, local.files[:1], connections=1) as db, db.query() as q:
        with pytest.raises(SandboxError, match="not readable by this database"):
            q.define_relation("__dac_t0", local.files)
        with pytest.raises(ValueError):
            q.define_relation("__dac_t0", [local.canary_parquet])
        # DuckDB's own lock: the second file is not in allowed_paths
        with pytest.raises(duckdb.PermissionException):
            q._con.execute(f"SELECT count(*) FROM read_parquet('{local.files[1]}')").fetchall()
        q.define_relation("__dac_t0", local.files[:1])
        assert _count(q) == ROWS_PER_FILE


def test_database_hidden_relations_feed_views_but_not_queries(local):
    """The cross-match's neighbour table: usable inside a view (CellKey), never by the query text."""
    from dac_lake.healpix import healpix29
    from dac_lake.sandbox import CellKey

    part = _catalog_part(0)
    hp = healpix29(part["ra"].to_numpy(), part["dec"].to_numpy())
    part = part.append_column("_healpix_29", pa.array(hp))
    rel = "catalogs/demo/dr1/dataset/Norder=0/Dir=0/Npix=4.parquet"
    local.storage.write_bytes(rel, _parquet_bytes(part))
    files = [local.storage.url_of(rel)]
    with SandboxDatabase(local.storage, files, connections=1) as db, db.query() as q:
        cells = pa.array([0, 1, 2, 3], pa.int64())
        # base pixel e is seen from "neighbour" a = e + 100: a relation joined through it is renamed
        q.register_table("__dac_n0", pa.table({"a": pa.compute.add(cells, 100), "e": cells}), hidden=True)
        with pytest.raises(QueryRejected, match="unknown table"):
            q.execute("SELECT * FROM __dac_n0")
        # shift 58: the key is the row's base pixel (order 0, 0..11)
        q.define_relation("__dac_t0", files, keys=[CellKey("__dac_k", 58, "__dac_n0")])
        q.define_relation("__dac_t1", files, keys=[CellKey("__dac_k", 58)])
        got = q.execute("SELECT __dac_k - 100 AS k, count(*) AS n FROM __dac_t0 GROUP BY 1 ORDER BY 1")
        want = q.execute(
            "SELECT __dac_k AS k, count(*) AS n FROM __dac_t1 WHERE __dac_k < 4 GROUP BY 1 ORDER BY 1"
        )
        assert got.to_pylist() == want.to_pylist() and len(want) == 4
        base = (part["_healpix_29"].to_numpy() >> 58).tolist()
        assert sorted(q.distinct_cells("__dac_t1", "__dac_k").to_pylist()) == sorted(set(base))


def test_database_concurrent_queries_in_threads(local):
    """Eight threads, four connections: each query defines `__dac_t0` over its own files and its own Arrow
    table, and sees exactly those, while the other threads do the same; a slow query times out alone."""
    limits = SandboxLimits(timeout_s=20)
    expected = {0: ROWS_PER_FILE, 1: ROWS_PER_FILE, 2: TOTAL}
    errors: list[BaseException] = []
    with SandboxDatabase(local.storage, local.files, limits, connections=4) as db:

        def work(worker: int) -> None:
            try:
                for i in range(12):
                    which = (worker + i) % 3
                    files = local.files if which == 2 else [local.files[which]]
                    marker = worker * 1000 + i
                    with db.query() as q:
                        q.define_relation("__dac_t0", files)
                        q.register_table("__dac_u0", pa.table({"m": [marker] * (worker + 1)}))
                        t = q.execute(
                            "SELECT (SELECT count(*) FROM __dac_t0) AS n, "
                            "(SELECT min(m) FROM __dac_u0) AS m, (SELECT count(*) FROM __dac_u0) AS k"
                        )
                        assert t.to_pylist() == [{"n": expected[which], "m": marker, "k": worker + 1}]
                        q.execute("SELECT object_id FROM __dac_t0 WHERE object_id % 997 = 0")
                        assert q.last_profile["io"]["files_read"] <= len(files)
                        assert set(q.last_profile["io"]["files"]) <= set(files)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        def slow() -> None:
            try:
                with db.query(SandboxLimits(timeout_s=1.0)) as q:
                    q.define_relation("__dac_t0", local.files)
                    t0 = time.monotonic()
                    with pytest.raises(QueryTimeout):
                        q.execute(SLOW_SQL)
                    assert time.monotonic() - t0 < 3.0
                    assert _count(q) == TOTAL
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
        threads.append(threading.Thread(target=slow))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        assert db.active == 0


def test_database_waits_for_a_free_connection_and_retires(local):
    db = SandboxDatabase(local.storage, local.files, SandboxLimits(timeout_s=20), connections=1)
    first = db.query()
    with pytest.raises(QueryTimeout, match="busy"):
        db.query(wait_s=0.2)
    released = threading.Timer(0.3, first.close)
    released.start()
    with db.query(wait_s=5) as q:  # gets the connection once the first query closes
        q.define_relation("__dac_t0", local.files)
        assert _count(q) == TOTAL
        db.retire()  # no new queries; closes when this one ends
        with pytest.raises(SandboxError, match="closed"):
            db.query()
        assert not db.closed
    assert db.closed
    tmp = db._tmp
    assert not os.path.exists(tmp)


def test_io_log_parser_reads_duckdb_messages_and_falls_back_to_json():
    from dac_lake.sandbox import _parse_io_log

    messages = pa.array(
        [
            '{"fs":"LocalFileSystem","path":"/l/a.parquet","op":"OPEN"}',
            '{"fs":"LocalFileSystem","path":"/l/a.parquet","op":"READ","bytes":"8","pos":"100"}',
            '{"fs":"S3FileSystem","path":"s3://b/l/x.parquet","op":"READ","bytes":"4096","pos":"0"}',
            '{"fs":"LocalFileSystem","path":"/l/q\\"uote.parquet","op":"READ","bytes":"5","pos":"7"}',
            '{"path":"/l/other-order.parquet","op":"READ","pos":"1","bytes":"2","fs":"x"}',
            "not json",
        ]
    )
    got = sorted(zip(*_parse_io_log(messages).to_pydict().values(), strict=True))
    assert got == sorted(
        [
            ("/l/a.parquet", 100, 8),
            ('/l/q"uote.parquet', 7, 5),
            ("/l/other-order.parquet", 1, 2),
            ("s3://b/l/x.parquet", 0, 4096),
        ]
    )
