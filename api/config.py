"""Settings of the TAP service: the `[service]` table of the config file, overridden by `DAC_SERVICE_*`.

```toml
[service]
public_url = "https://tap.lsst.ac.uk"   # how clients reach us (links in capabilities and job documents)
maxrec_default = 100000                 # rows a query returns when it gives no MAXREC
maxrec_max = 10000000                   # the largest MAXREC honoured (sync and async)
sync_timeout_s = 60                     # a sync query running longer is stopped: use async
async_workers = 2                       # async jobs running at once per service process
async_duration_default_s = 3600
async_duration_max_s = 86400
destruction_days = 7                    # async jobs (and results) are deleted after this
job_dir = "./dac-jobs"                  # job database and results (local disk of the API node)
upload_max_rows = 100000
upload_max_bytes = 52428800
memory_limit = "2GB"                    # per query
threads = 2                             # per query
query_log = "/var/log/dac-lake/query.log"  # one JSON line per query (unset: the process log)
query_log_max_chars = 2000              # ADQL text longer than this is cut in the query log
io_log = false                          # DuckDB's read log: bytes read by every query in the metrics
                                        # and query log (costs 10-20% on full scans; off: cones' bytes only)
dask_scheduler = "tcp://10.0.0.5:8786"  # big async queries run as tasks on this Dask cluster (unset: never)
dask_min_rows = 50000000                # ... when their lake scans hold at least this many rows
dask_chunk_rows = 5000000               # rows of the split table per task
```
Environment: `DAC_SERVICE_<KEY>` for each key (e.g. `DAC_SERVICE_SYNC_TIMEOUT_S=30`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dac_lake.settings import Settings, parse_bool


@dataclass(frozen=True)
class ServiceSettings:
    """What the service needs beyond the lake settings."""

    public_url: str | None = None
    title: str = "dac-lake TAP service"
    description: str = "Survey catalogs served from a HATS lake by dac-lake (DuckDB over HEALPix Parquet)."
    maxrec_default: int = 100_000
    maxrec_max: int = 10_000_000
    sync_timeout_s: float = 60.0
    async_workers: int = 2
    async_duration_default_s: int = 3600
    async_duration_max_s: int = 86_400
    destruction_days: float = 7.0
    job_dir: str = "./dac-jobs"
    upload_max_rows: int = 100_000
    upload_max_bytes: int = 50 * 1024 * 1024
    memory_limit: str = "2GB"
    threads: int = 2
    wait_max_s: float = 600.0
    #: file for the structured query log (api/querylog.py); None: the lines go to the process log
    query_log: str | None = None
    query_log_max_chars: int = 2000
    #: record every read DuckDB makes (bytes read of full scans in the metrics and query log; +10-20%)
    io_log: bool = False
    #: Dask scheduler for big async queries (dac_lake/distributed); None: every query runs in the service
    dask_scheduler: str | None = None
    dask_min_rows: int = 50_000_000
    dask_chunk_rows: int = 5_000_000

    def __post_init__(self) -> None:
        if not 0 <= self.maxrec_default <= self.maxrec_max:
            raise ValueError(
                f"[service] maxrec_default ({self.maxrec_default}) must be between 0 and maxrec_max "
                f"({self.maxrec_max})"
            )
        if self.sync_timeout_s <= 0 or self.async_duration_default_s <= 0:
            raise ValueError("[service] time limits must be positive")
        if self.async_workers < 1:
            raise ValueError("[service] async_workers must be >= 1")
        if self.dask_min_rows < 0 or self.dask_chunk_rows < 1:
            raise ValueError("[service] dask_min_rows must be >= 0 and dask_chunk_rows >= 1")
        if self.query_log_max_chars < 0:
            raise ValueError("[service] query_log_max_chars must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None, **overrides: Any):
        """From the config file's `[service]` table, `DAC_SERVICE_*` variables and explicit overrides."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = dict(settings.sections.get("service") or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"[service] has unknown keys {unknown}; known: {sorted(known)}")
        for name in known:
            value = env.get(f"DAC_SERVICE_{name.upper()}")
            if value not in (None, ""):
                data[name] = value
        data.update({k: v for k, v in overrides.items() if v is not None})
        typed: dict[str, Any] = {}
        for name, value in data.items():
            kind = known[name].type
            try:
                if kind == "int":
                    typed[name] = int(value)
                elif kind == "bool":
                    typed[name] = parse_bool(value, f"[service] {name}")
                elif kind == "float":
                    typed[name] = float(value)
                else:
                    typed[name] = value
            except (TypeError, ValueError) as exc:
                raise ValueError(f"[service] {name} = {value!r} is not a valid {kind}") from exc
        return cls(**typed)
