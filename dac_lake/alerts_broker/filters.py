"""Filters (Lasair's core): a user's stored ADQL query, run on every committed alert batch.

A filter reads the batch through memory tables in the schema `batch` - `batch.objects` (the objects the
batch updated), `batch.detections`, and the owner's own `batch.watchlist_hits` and `batch.watchmap_hits`
of this batch - and may join lake catalogs the owner may read (`JOIN demo_survey.source AS s ON
DISTANCE(...) < r`: the engine then reads only the partitions near the batch's positions). It runs through
`QueryEngine.adql`, so it gets the same translator, sandbox and limits as a TAP query, and it is validated at
save time by the same translator: an invalid filter is refused with its line/column message.

Each batch's matches are written to `alerts/<stream>/filters/<filter_id>/results/<batch>.parquet` (with a
`_batch` column), readable by DuckDB (`read_parquet('.../results/*.parquet', union_by_name=true)`),
pyarrow or `FilterService.results`. A filter may name a Kafka topic; producing to it is the `on_match`
hook's job (called with the filter and its matches after they are stored).

Data rights: a filter runs with the groups its owner had when it was last saved (the ingest has no
caller to ask); editing a filter refreshes them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.adql.model import ColumnMeta, TableMeta
from dac_lake.alerts_broker.store import (
    BrokerError,
    BrokerRecord,
    BrokerStore,
    Owner,
    batch_file,
    owner_name,
    read_tables,
    write_table,
)
from dac_lake.engine import MemoryTable, QueryEngine
from dac_lake.lake import Lake
from dac_lake.sandbox import SandboxLimits

log = logging.getLogger(__name__)

BATCH_SCHEMA = "batch"
BATCH_COLUMN = "_batch"
BANDS = "ugrizy"
MAX_ADQL_CHARS = 20_000
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAXREC = 100_000
#: filters run at once on a batch (each with a one-thread DuckDB: `FILTER_LIMITS`)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
#: a filter sees one batch (and joins a catalog near it): small limits, many filters side by side
FILTER_LIMITS = SandboxLimits(memory_limit="1GB", threads=1, timeout_s=DEFAULT_TIMEOUT_S)
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_UNSET: Any = object()


class FilterError(BrokerError):
    """A filter that cannot be saved (not about the ADQL itself: those are `AdqlError`s)."""


# --------------------------------------------------------------------------- the batch tables


def _c(name: str, datatype: str, unit: str = "", ucd: str = "", description: str = "") -> ColumnMeta:
    return ColumnMeta(name, datatype, unit, ucd, description)


def _object_columns() -> tuple[ColumnMeta, ...]:
    cols = [
        _c("object_id", "string", "", "meta.id;meta.main", "object identifier"),
        _c("ra", "float64", "deg", "pos.eq.ra;meta.main", "mean right ascension (ICRS)"),
        _c("dec", "float64", "deg", "pos.eq.dec;meta.main", "mean declination (ICRS)"),
        _c("first_mjd", "float64", "d", "time.start", "MJD of the first detection"),
        _c("last_mjd", "float64", "d", "time.end", "MJD of the latest detection"),
        _c("n_detections", "int32", "", "meta.number", "number of detections"),
    ]
    for b in BANDS:
        cols += [
            _c(f"mag_{b}_latest", "float32", "mag", "phot.mag", f"latest {b} magnitude"),
            _c(f"mjd_{b}_latest", "float64", "d", "time.epoch", f"MJD of the latest {b} detection"),
            _c(f"rate_{b}", "float32", "mag/d", "arith.rate;phot.mag", f"{b} magnitude change per day"),
        ]
    cols += [
        _c("n_bands", "int32", "", "meta.number", "number of bands with detections"),
        _c("last_alert_id", "int64", "", "meta.id", "id of the latest alert"),
        _c("updated_batch", "int64", "", "meta.id", "micro-batch that last updated the object"),
    ]
    return tuple(cols)


OBJECTS_META = TableMeta(BATCH_SCHEMA, "objects", _object_columns(), "ra", "dec")
DETECTIONS_META = TableMeta(
    BATCH_SCHEMA,
    "detections",
    (
        _c("detection_id", "int64", "", "meta.id;meta.main", "detection identifier"),
        _c("object_id", "string", "", "meta.id", "object identifier"),
        _c("alert_id", "int64", "", "meta.id", "alert identifier"),
        _c("ra", "float64", "deg", "pos.eq.ra;meta.main", "right ascension (ICRS)"),
        _c("dec", "float64", "deg", "pos.eq.dec;meta.main", "declination (ICRS)"),
        _c("mjd", "float64", "d", "time.epoch", "MJD of the detection"),
        _c("band", "string", "", "instr.filter", "photometric band"),
        _c("mag", "float32", "mag", "phot.mag", "magnitude"),
        _c("mag_err", "float32", "mag", "stat.error;phot.mag", "magnitude error"),
        _c("flux", "float32", "", "phot.flux", "difference flux"),
        _c("flux_err", "float32", "", "stat.error;phot.flux", "difference flux error"),
        _c("is_positive", "bool", "", "meta.code", "positive difference"),
        _c("reliability", "float32", "", "stat.probability", "real/bogus score"),
        _c("is_history", "bool", "", "meta.code", "from the alert's history, not new"),
        _c("survey", "string", "", "meta.id;instr.tel", "survey (ztf, lsst)"),
        _c("schema_version", "string", "", "meta.version", "alert schema version"),
    ),
    "ra",
    "dec",
)
WATCHLIST_HITS_META = TableMeta(
    BATCH_SCHEMA,
    "watchlist_hits",
    (
        _c("watchlist_id", "string", "", "meta.id", "watchlist identifier"),
        _c("source_name", "string", "", "meta.id", "name of the watchlist source"),
        _c("source_ra", "float64", "deg", "pos.eq.ra", "source right ascension"),
        _c("source_dec", "float64", "deg", "pos.eq.dec", "source declination"),
        _c("radius_arcsec", "float64", "arcsec", "phys.angSize", "match radius of the source"),
        _c("object_id", "string", "", "meta.id", "object identifier"),
        _c("alert_id", "int64", "", "meta.id", "alert identifier"),
        _c("detection_id", "int64", "", "meta.id", "detection identifier (null for object matches)"),
        _c("ra", "float64", "deg", "pos.eq.ra;meta.main", "object right ascension"),
        _c("dec", "float64", "deg", "pos.eq.dec;meta.main", "object declination"),
        _c("mjd", "float64", "d", "time.epoch", "MJD of the matched alert"),
        _c("separation_arcsec", "float64", "arcsec", "pos.angDistance", "object-source separation"),
    ),
    "ra",
    "dec",
)
WATCHMAP_HITS_META = TableMeta(
    BATCH_SCHEMA,
    "watchmap_hits",
    (
        _c("watchmap_id", "string", "", "meta.id", "watchmap identifier"),
        _c("object_id", "string", "", "meta.id", "object identifier"),
        _c("alert_id", "int64", "", "meta.id", "alert identifier"),
        _c("detection_id", "int64", "", "meta.id", "detection identifier (null for object matches)"),
        _c("ra", "float64", "deg", "pos.eq.ra;meta.main", "object right ascension"),
        _c("dec", "float64", "deg", "pos.eq.dec;meta.main", "object declination"),
        _c("mjd", "float64", "d", "time.epoch", "MJD of the matched alert"),
    ),
    "ra",
    "dec",
)
BATCH_METAS = (OBJECTS_META, DETECTIONS_META, WATCHLIST_HITS_META, WATCHMAP_HITS_META)

_ARROW = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
}


def arrow_schema(meta: TableMeta) -> pa.Schema:
    return pa.schema([pa.field(c.name, _ARROW[c.datatype]) for c in meta.columns])


def conform(table: pa.Table | None, meta: TableMeta) -> pa.Table:
    """The batch table with exactly `meta`'s columns and types: extra columns are dropped (they are not in
    the filter's view), a missing one becomes nulls (logged: the batch contract drifted)."""
    schema = arrow_schema(meta)
    if table is None:
        return schema.empty_table()
    arrays = []
    for f in schema:
        column = None
        if f.name in table.column_names:
            try:
                column = table.column(f.name).cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                log.warning(
                    "batch table %s: column %s is not %s (%s): filters see nulls",
                    meta.name,
                    f.name,
                    f.type,
                    exc,
                )
        else:
            log.warning("batch table %s has no column %s: filters see nulls", meta.name, f.name)
        arrays.append(column if column is not None else pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def batch_memory_tables(
    objects: pa.Table | None,
    detections: pa.Table | None,
    watchlist_hits: pa.Table | None = None,
    watchmap_hits: pa.Table | None = None,
) -> list[MemoryTable]:
    """The four `batch.*` memory tables a filter sees (hits: already restricted to the filter's owner)."""
    tables = (objects, detections, watchlist_hits, watchmap_hits)
    return [MemoryTable(m, conform(t, m)) for m, t in zip(BATCH_METAS, tables, strict=True)]


EMPTY_BATCH = batch_memory_tables(None, None)


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class Filter:
    """A filter as its owner sees it."""

    id: str
    owner: str
    name: str
    adql: str
    kafka_topic: str | None
    active: bool
    version: int
    created: str
    updated: str
    groups: tuple[str, ...]

    @classmethod
    def from_record(cls, r: BrokerRecord) -> Filter:
        return cls(
            id=r.id,
            owner=r.owner,
            name=r.name,
            adql=r.spec["adql"],
            kafka_topic=r.spec.get("kafka_topic"),
            active=r.active,
            version=r.version,
            created=r.created,
            updated=r.updated,
            groups=tuple(r.spec.get("groups") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "adql": self.adql,
            "kafka_topic": self.kafka_topic,
            "active": self.active,
            "version": self.version,
            "created": self.created,
            "updated": self.updated,
        }


def results_prefix(stream: str, filter_id: str) -> str:
    return f"alerts/{stream}/filters/{filter_id}/results"


# --------------------------------------------------------------------------- the owner-facing service


class FilterService:
    """Create, list, edit, pause, delete filters and read their results, for their owners."""

    def __init__(self, lake: Lake, store: BrokerStore, limits: SandboxLimits | None = FILTER_LIMITS):
        self.lake = lake
        self.store = store
        self.limits = limits
        self._engines: dict[frozenset[str], QueryEngine] = {}
        self._lock = threading.Lock()

    def engine(self, groups: Sequence[str] | frozenset[str]) -> QueryEngine:
        """One engine per set of groups (it caches translations and the registry listing)."""
        key = frozenset(groups)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = QueryEngine(self.lake, key, self.limits)
            return engine

    def validate(self, owner: Owner, adql: str) -> None:
        """Translate against the batch tables and the owner's catalogs; raise `AdqlError` (with line and
        column) or `FilterError`."""
        if not isinstance(adql, str) or not adql.strip():
            raise FilterError(
                "a filter needs an ADQL query, e.g. SELECT object_id FROM batch.objects WHERE ..."
            )
        if len(adql) > MAX_ADQL_CHARS:
            raise FilterError(f"the filter is longer than {MAX_ADQL_CHARS} characters")
        translation = self.engine(_groups(owner)).translate(adql, memory_tables=EMPTY_BATCH)
        if not any(ref.table.schema.lower() == BATCH_SCHEMA for ref in translation.table_refs):
            raise FilterError(
                "a filter must read the batch (FROM batch.objects, batch.detections, batch.watchlist_hits or "
                "batch.watchmap_hits): otherwise it returns the same rows for every batch"
            )
        if any(c.name.lower() == BATCH_COLUMN for c in translation.columns):
            raise FilterError(f"the output column name {BATCH_COLUMN!r} is reserved (results add it)")

    def create(
        self,
        owner: Owner,
        name: str,
        adql: str,
        kafka_topic: str | None = None,
        active: bool = True,
        description: str | None = None,
    ) -> Filter:
        """A new filter (one version written). `description` is for people (the REST API shows it)."""
        owner_name(owner)
        self.validate(owner, adql)
        spec = {"adql": adql, "kafka_topic": _topic(kafka_topic), "groups": sorted(_groups(owner))}
        if description is not None:
            spec["description"] = description
        return Filter.from_record(self.store.create("filters", owner, name, spec, active=active))

    def list(self, owner: Owner) -> list[Filter]:
        return [Filter.from_record(r) for r in self.store.records("filters", owner_name(owner))]

    def get(self, owner: Owner, filter_id: str) -> Filter:
        return Filter.from_record(self.store.get("filters", filter_id, owner))

    def update(
        self,
        owner: Owner,
        filter_id: str,
        *,
        name: str | None = None,
        adql: str | None = None,
        kafka_topic: str | None = _UNSET,
        active: bool | None = None,
        expected_version: int | None = None,
        description: str | None = _UNSET,
    ) -> Filter:
        """Edit (only the fields given; `description=None` removes it). Saving refreshes the data rights
        the filter runs with to the owner's current groups, so the query (new or kept) is validated again
        with them: a filter that lost access to a catalog it joins is refused here, not left to fail on
        every batch.
        (`pause`/`resume` change only the active flag.)"""
        current = self.store.get("filters", filter_id, owner)
        spec = dict(current.spec)
        if adql is not None:
            spec["adql"] = adql
        self.validate(owner, spec["adql"])
        if kafka_topic is not _UNSET:
            spec["kafka_topic"] = _topic(kafka_topic)
        if description is not _UNSET:
            spec.pop("description", None)
            if description is not None:
                spec["description"] = description
        spec["groups"] = sorted(_groups(owner))
        record = self.store.update(
            "filters",
            filter_id,
            owner,
            name=name,
            spec=spec,
            active=active,
            expected_version=expected_version,
        )
        return Filter.from_record(record)

    def pause(self, owner: Owner, filter_id: str) -> Filter:
        return Filter.from_record(self.store.update("filters", filter_id, owner, active=False))

    def resume(self, owner: Owner, filter_id: str) -> Filter:
        return Filter.from_record(self.store.update("filters", filter_id, owner, active=True))

    def delete(self, owner: Owner, filter_id: str) -> None:
        """Delete the filter and its stored results."""
        self.store.delete("filters", filter_id, owner)
        self.store.storage.delete_tree(f"alerts/{self.store.stream}/filters/{filter_id}")

    def results(
        self, owner: Owner, filter_id: str, first_batch: int | None = None, last_batch: int | None = None
    ) -> pa.Table:
        """Every stored match of the owner's filter (optionally of a batch range), in batch order."""
        f = self.get(owner, filter_id)
        table = read_tables(
            self.store.storage, results_prefix(self.store.stream, f.id), first_batch, last_batch
        )
        return table if table is not None else pa.table({BATCH_COLUMN: pa.array([], pa.int64())})

    def results_url(self, owner: Owner, filter_id: str) -> str:
        """A glob of the filter's result files for DuckDB (`read_parquet(url, union_by_name=true)`)."""
        f = self.get(owner, filter_id)
        return self.store.storage.url_of(results_prefix(self.store.stream, f.id)) + "/*.parquet"


def _groups(owner: Owner) -> frozenset[str]:
    return frozenset(getattr(owner, "groups", None) or ())


def _topic(topic: str | None) -> str | None:
    if topic is None or topic == "":
        return None
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic) or topic in (".", ".."):
        raise FilterError(f"Kafka topic {topic!r}: use 1-249 letters, digits, '.', '_' or '-'")
    return topic


# --------------------------------------------------------------------------- running on a batch


@dataclass
class FilterRun:
    """What one filter did on one batch."""

    filter_id: str
    owner: str
    rows: int = 0
    overflow: bool = False
    seconds: float = 0.0
    error: str | None = None
    path: str | None = None
    #: lake partition files the query read, of how many its catalogs have (the pruning at work)
    files_read: int = 0
    files_total: int = 0


OnMatch = Callable[[Filter, pa.Table], None]


class FilterRunner:
    """Runs every active filter on a committed batch and stores what each matched.

    One filter's failure (a time-out, a catalog it joins was dropped) is reported in its `FilterRun` and
    does not stop the others or the ingest; a failing `on_match` hook is reported the same way (the
    results are stored already, so the hook can be retried from them).
    """

    def __init__(
        self,
        service: FilterService,
        on_match: OnMatch | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        maxrec: int = DEFAULT_MAXREC,
        workers: int = DEFAULT_WORKERS,
    ):
        self.service = service
        self.on_match = on_match
        self.timeout_s = timeout_s
        self.maxrec = maxrec
        self.workers = max(1, int(workers))

    def run(
        self,
        batch_id: int,
        objects: pa.Table,
        detections: pa.Table,
        watchlist_hits: pa.Table | None = None,
        watchmap_hits: pa.Table | None = None,
        filters: Sequence[Filter] | None = None,
    ) -> list[FilterRun]:
        store = self.service.store
        if filters is None:
            filters = [Filter.from_record(r) for r in store.records("filters", include_inactive=False)]
        filters = [f for f in filters if f.active]
        if not filters:
            return []
        objects_t = conform(objects, OBJECTS_META)
        detections_t = conform(detections, DETECTIONS_META)
        wl_by_owner = _split_by_owner(watchlist_hits, WATCHLIST_HITS_META)
        wm_by_owner = _split_by_owner(watchmap_hits, WATCHMAP_HITS_META)
        empty_wl = conform(None, WATCHLIST_HITS_META)
        empty_wm = conform(None, WATCHMAP_HITS_META)

        def one(f: Filter) -> FilterRun:
            memory = [
                MemoryTable(OBJECTS_META, objects_t),
                MemoryTable(DETECTIONS_META, detections_t),
                MemoryTable(WATCHLIST_HITS_META, wl_by_owner.get(f.owner, empty_wl)),
                MemoryTable(WATCHMAP_HITS_META, wm_by_owner.get(f.owner, empty_wm)),
            ]
            return self._run_one(f, batch_id, memory)

        if self.workers == 1 or len(filters) == 1:
            return [one(f) for f in filters]
        # a filter on a 10k-alert batch is mostly fixed cost (a fresh locked DuckDB connection, setup
        # statements) that releases the GIL: running a few at once keeps the cores busy
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="filter") as pool:
            return list(pool.map(one, filters))

    def _run_one(self, f: Filter, batch_id: int, memory: list[MemoryTable]) -> FilterRun:
        run = FilterRun(f.id, f.owner)
        t0 = time.perf_counter()
        try:
            result = self.service.engine(f.groups).adql(
                f.adql, maxrec=self.maxrec, timeout_s=self.timeout_s, memory_tables=memory
            )
        except Exception as exc:  # the user's query failing must not stop the ingest
            run.error = f"{type(exc).__name__}: {exc}"
            run.seconds = time.perf_counter() - t0
            log.warning("filter %s (%s) failed on batch %s: %s", f.id, f.owner, batch_id, run.error)
            return run
        table = result.table
        run.rows, run.overflow = table.num_rows, result.overflow
        run.files_read = result.files_read
        run.files_total = sum(s.total_files for s in result.scans)
        if table.num_rows:
            table = table.append_column(BATCH_COLUMN, pa.array([int(batch_id)] * table.num_rows, pa.int64()))
            table = table.replace_schema_metadata(
                {"dac_lake.filter_id": f.id, "dac_lake.filter_version": str(f.version)}
            )
            path = f"{results_prefix(self.service.store.stream, f.id)}/{batch_file(batch_id)}"
            write_table(self.service.store.storage, path, table)
            run.path = path
            if self.on_match is not None:
                try:
                    self.on_match(f, table)
                except Exception as exc:
                    run.error = f"on_match hook: {type(exc).__name__}: {exc}"
                    log.warning("filter %s: on_match hook failed on batch %s: %s", f.id, batch_id, exc)
        run.seconds = time.perf_counter() - t0
        return run


def _split_by_owner(hits: pa.Table | None, meta: TableMeta) -> Mapping[str, pa.Table]:
    """Hits per owner, each conformed to the filter's view (no owner column)."""
    if hits is None or hits.num_rows == 0:
        return {}
    owners = hits.column("owner")
    out = {}
    for owner in pc.unique(owners).to_pylist():
        mask = pc.equal(owners, owner)
        out[owner] = conform(hits.filter(mask), meta)
    return out
