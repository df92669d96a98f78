"""The Python entry point for notebook users and admins: `dac_lake.connect(lake_url)`.

ADQL, cone searches and cross-matches all go through the query engine (translation, HEALPix pruning, the
locked sandbox), so a notebook sees exactly what TAP users see; row counts come from the release manifest
(no scan). `sql()` runs trusted DuckDB SQL and exists only for sessions that see every catalog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa

from dac_lake.adql import AdqlUnknownTable
from dac_lake.duckdb_io import new_connection
from dac_lake.engine import QueryEngine, QueryResult
from dac_lake.lake import Lake, LakeError
from dac_lake.registry import LakeTable
from dac_lake.sandbox import SandboxLimits
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)


@dataclass
class QueryStats:
    """What the last query read: the figures `EXPLAIN`-style introspection reports."""

    files: int = 0
    total_files: int = 0
    ranges: int = 0
    detail: dict = field(default_factory=dict)


class Session:
    """A read session on one lake; catalogs resolve through their published release pointers."""

    def __init__(
        self, lake: Lake, groups: frozenset[str] = frozenset({"*"}), engine: QueryEngine | None = None
    ):
        self.lake = lake
        # notebook and admin sessions run long all-sky jobs; the TAP service passes its own engine, with
        # its own (shorter) limits, so that SCS and TAP share the cone code below
        self.engine = engine or QueryEngine(lake, groups, SandboxLimits(timeout_s=3600.0))
        self.last = QueryStats()
        self.last_result: QueryResult | None = None
        self._dask: dict = {}  # scheduler address -> dac_lake.distributed.executor.DaskQueries

    @cached_property
    def con(self):
        """A plain DuckDB connection for trusted `sql()` (admins and notebooks), made on first use."""
        return new_connection(self.lake.storage)

    # ------------------------------------------------------------------ catalogs
    @property
    def trusted(self) -> bool:
        return "*" in self.engine.registry.groups

    def tables(self) -> list[str]:
        """Published catalogs and alert streams this session may read (the ADQL schemas, without the
        `"catalog@release"` aliases)."""
        return sorted({t.catalog for t in self.engine.registry.lake_tables() if t.meta.schema == t.catalog})

    def lake_table(self, name: str, release: str | None = None) -> LakeTable:
        """The registry table behind 'catalog', 'catalog.table', '"catalog@release".table' or
        'stream.table' (an alert stream has several tables, so its name alone is ambiguous), optionally
        at a given `release` of a catalog. One resolution for `manifest`, `files` and `count`, so that
        they work for alert streams (files listed by a snapshot) as for release catalogs."""
        schema, dot, table = name.partition(".")
        schema = schema.strip('"')
        if release is not None:
            schema = f"{schema.split('@')[0]}@{release}"
        tables = self.engine.registry.lake_tables()
        candidates = [t for t in tables if t.meta.schema.lower() == schema.lower()]
        if dot:
            candidates = [t for t in candidates if t.meta.name.lower() == table.strip('"').lower()]
        if not candidates:
            published = ", ".join(self.tables()) or "none"
            raise LakeError(f"no published catalog {name!r}; catalogs and alert streams: {published}")
        if len(candidates) > 1:
            names = ", ".join(t.qualified_name for t in candidates)
            raise LakeError(f"{name!r} has several tables: name one of {names}")
        return candidates[0]

    def manifest(self, catalog: str, release: str | None = None) -> dict:
        """A release's manifest, or for an alert table its newest snapshot's partitions and files (the
        same keys: `partitions` as [order, pixel, rows], `rows`)."""
        return self.lake_table(catalog, release).manifest

    def files(self, catalog: str, partitions: list | None = None, release: str | None = None) -> list[str]:
        """URLs of the data files of `partitions` ([order, pixel, ...] items; default: all of them). An
        alert table's partition is a folder of batch files: only those its snapshot lists are returned."""
        lt = self.lake_table(catalog, release)
        parts = lt.manifest["partitions"] if partitions is None else partitions
        return [self.lake.storage.url_of(path) for path in lt.files(parts)]

    def count(self, catalog: str, release: str | None = None) -> int:
        """Row count from the manifest's (or the alert snapshot's) per-partition counts: never a scan."""
        return int(self.lake_table(catalog, release).manifest["rows"])

    # ------------------------------------------------------------------ queries
    def adql(
        self, text: str, maxrec: int | None = None, timeout_s: float | None = None, dask: str | None = None
    ) -> pa.Table:
        """Run ADQL 2.1 (validated and translated; only generated SQL reaches DuckDB). `self.last_result`
        keeps the overflow flag, column metadata and what was read (`.explain()`).

        `dask`: a Dask scheduler address (`tcp://HOST:8786`). The query then runs as per-partition tasks
        on that cluster, as the TAP service runs big async jobs (`dac_lake.distributed`), whatever its
        size; one that cannot be split runs here (the reason is logged). The result is the same."""
        result = self._distributed(text, maxrec, timeout_s, dask) if dask else None
        self.last_result = result or self.engine.adql(text, maxrec=maxrec, timeout_s=timeout_s)
        self._record(self.last_result)
        return self.last_result.table

    def _distributed(
        self, text: str, maxrec: int | None, timeout_s: float | None, address: str
    ) -> QueryResult | None:
        from dac_lake.distributed.executor import DaskQueries

        queries = self._dask.get(address)
        if queries is None:
            queries = self._dask[address] = DaskQueries(
                address, self.lake.storage.url, min_rows=0, limits=self.engine.limits
            )
        plan = queries.plan(self.engine, self.engine.translate(text, maxrec))
        if isinstance(plan, str):
            log.info("the query runs here, not on the Dask cluster: %s", plan)
            return None
        limit = timeout_s or self.engine.limits.timeout_s
        with queries.run(self.engine, plan, maxrec=maxrec, timeout_s=limit) as stream:
            batches = list(stream)
        table = pa.Table.from_batches(batches, schema=stream.schema)
        return QueryResult(
            table, stream.columns, stream.overflow, stream.sql, stream.scans, stream.profile, stream.seconds
        )

    def close(self) -> None:
        """Let go of the Dask clients this session opened (the engine's database closes with it)."""
        for queries in self._dask.values():
            queries.close()
        self._dask.clear()

    def _record(self, result: QueryResult) -> None:
        self.last = QueryStats(
            files=result.files_read,
            total_files=sum(s.total_files for s in result.scans),
            ranges=sum(0 if s.ranges is None else len(s.ranges) for s in result.scans),
            detail=result.explain(),
        )

    def _table(self, name: str):
        """A registry table from 'catalog', 'catalog.table' or '"catalog@release".table'."""
        try:
            return self.engine.find_table(name)
        except AdqlUnknownTable as exc:
            raise LakeError(str(exc)) from None

    def cone(
        self,
        catalog: str,
        ra: float,
        dec: float,
        radius_deg: float,
        columns: list[str] | None = None,
        where: str | None = None,
        maxrec: int | None = None,
    ) -> pa.Table:
        """Rows within `radius_deg` of (ra, dec), exactly, nearest first, with `dist_deg`. The engine's
        cone search (`QueryEngine.cone`), as SCS uses it: the same coverage and distance as ADQL's
        CONTAINS, read straight from the row groups it touches (or, with `where`, through ADQL)."""
        self._table(catalog)  # an unknown catalog: LakeError, as for the other methods
        self.last_result = self.engine.cone(
            catalog, ra, dec, radius_deg, columns=columns, where=where, maxrec=maxrec
        )
        self._record(self.last_result)
        return self.last_result.table

    def crossmatch(
        self,
        left: str,
        right: str,
        radius_arcsec: float,
        left_columns: list[str] | None = None,
        right_columns: list[str] | None = None,
        maxrec: int | None = None,
        dask: str | None = None,
    ) -> pa.Table:
        """All pairs closer than `radius_arcsec` (a band join on declination plus the exact distance; never
        a cartesian product), with their separation in arcsec; `dask`: on that cluster (see `adql`)."""
        text = self.crossmatch_adql(left, right, radius_arcsec, left_columns, right_columns)
        return self.adql(text, maxrec=maxrec, dask=dask)

    def crossmatch_adql(
        self,
        left: str,
        right: str,
        radius_arcsec: float,
        left_columns: list[str] | None = None,
        right_columns: list[str] | None = None,
    ) -> str:
        """The ADQL `crossmatch` runs (to send it as an async TAP job, or to a Dask cluster)."""
        a, b = self._table(left), self._table(right)
        lcols = left_columns or [a.definition["id_column"]]
        rcols = right_columns or [b.definition["id_column"]]
        la = ", ".join(f"a.{_adql_ident(c)}" for c in lcols)
        # a right column named like a left one gets the right catalog's name as suffix: id, id_gaia
        rb = ", ".join(
            f"b.{_adql_ident(c)}" + (f" AS {_adql_ident(f'{c}_{b.catalog}')}" if c in lcols else "")
            for c in rcols
        )
        pa_ = f"POINT('ICRS', a.{_adql_ident(a.meta.ra_column)}, a.{_adql_ident(a.meta.dec_column)})"
        pb_ = f"POINT('ICRS', b.{_adql_ident(b.meta.ra_column)}, b.{_adql_ident(b.meta.dec_column)})"
        r = float(radius_arcsec) / 3600.0
        text = (
            f"SELECT {la}, {rb}, DISTANCE({pa_}, {pb_}) * 3600.0 AS sep_arcsec "
            f"FROM {_adql_table(a)} AS a JOIN {_adql_table(b)} AS b ON DISTANCE({pa_}, {pb_}) <= {r!r}"
        )
        return text

    def sql(self, text: str) -> pa.Table:
        """Trusted DuckDB SQL (admins, notebooks; not for untrusted text). Each published catalog is a view
        of its name over the current release's files (`testcat`); each alert table a view in a schema of
        its stream's name over the newest snapshot's files (`ztf.objects`), as ADQL names it."""
        if not self.trusted:
            raise LakeError("sql() is for sessions that may read every catalog; use adql()")
        for lt in self.engine.registry.lake_tables():
            if lt.meta.schema != lt.catalog:  # "catalog@release" aliases: not views
                continue
            files = lt.files(lt.manifest["partitions"]) or [lt.schema_file]  # no rows yet: columns only
            listing = ", ".join("'" + self.lake.storage.url_of(f).replace("'", "''") + "'" for f in files)
            if lt.manifest.get("kind") == "alerts":
                self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(lt.catalog)}")
                view = f"{_quote_ident(lt.catalog)}.{_quote_ident(lt.meta.name)}"
            else:
                view = _quote_ident(lt.catalog)
            self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet([{listing}])")
        return self.con.execute(text).to_arrow_table()


def _adql_ident(name: str | None) -> str:
    if not name:
        raise LakeError("this table has no RA/Dec columns")
    return '"' + name.replace('"', '""') + '"'


def _adql_table(lt) -> str:
    return f"{_adql_ident(lt.meta.schema)}.{_adql_ident(lt.meta.name)}"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect(lake_url: str | None = None, identity: frozenset[str] | set[str] | None = None) -> Session:
    """Open a read session on the lake at `lake_url` (default: the configured lake).

    `identity` is the set of groups the caller belongs to (data rights); None, for notebook and admin
    use on a lake one can read directly anyway, sees every catalog."""
    lake = Lake(LakeStorage(lake_url))
    lake.check()
    return Session(lake, frozenset({"*"}) if identity is None else frozenset(identity))
