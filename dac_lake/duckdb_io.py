"""DuckDB connections that read the lake: local folders directly, S3 through the httpfs extension.

The httpfs extension comes from PyPI's `duckdb-extension-httpfs` wheel (a signed binary matching the
pinned DuckDB), installed from its file path: lake machines reach only the package registries, never
extensions.duckdb.org. The choice of httpfs over an fsspec filesystem or a pyarrow dataset is measured in
bench/storage/duckdb_read_paths.py (figures in the README).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from dac_lake.storage import LakeStorage


class DuckDBSetupError(RuntimeError):
    pass


def httpfs_extension_path() -> Path:
    """The httpfs extension binary shipped for this DuckDB version."""
    import duckdb_extension_httpfs

    base = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    found = sorted(base.rglob("httpfs.duckdb_extension"))
    if not found:
        raise DuckDBSetupError(
            f"no httpfs extension for DuckDB {duckdb.__version__} under {base}: install "
            f"duckdb-extension-httpfs=={duckdb.__version__}"
        )
    return found[0]


def new_connection(storage: LakeStorage, threads: int | None = None, memory_limit: str | None = None):
    """A DuckDB connection able to read `storage` (and nothing configured beyond it)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute("SET memory_limit = ?", [memory_limit])
    if storage.is_s3:
        configure_s3(con, storage)
    return con


def configure_s3(con, storage: LakeStorage) -> None:
    """Load httpfs from its local file and give it the lake's S3 endpoint and keys as a secret."""
    con.execute(f"LOAD '{httpfs_extension_path()}'")
    s3 = storage.settings.s3
    options = {
        "TYPE": "s3",
        "REGION": s3.region,
        "URL_STYLE": "path" if s3.path_style else "vhost",
        "USE_SSL": "true" if s3.use_ssl else "false",
    }
    if s3.endpoint_host:
        options["ENDPOINT"] = s3.endpoint_host
    if s3.access_key_id:
        options["KEY_ID"] = s3.access_key_id
        options["SECRET"] = s3.secret_access_key or ""
    # values come from our own settings, never from query text; quote them as SQL string literals anyway
    body = ", ".join(
        f"{k} {v}" if k in {"TYPE", "USE_SSL"} else f"{k} '{str(v).replace(chr(39), chr(39) * 2)}'"
        for k, v in options.items()
    )
    con.execute(f"CREATE OR REPLACE SECRET dac_lake_s3 ({body})")
    con.execute("SET http_retries = ?", [max(1, s3.retries)])
    con.execute("SET enable_http_metadata_cache = true")
    con.execute("SET parquet_metadata_cache = true")
