"""Broker features of an alert stream (Lasair's model): watchlists, watchmaps and filters.

`AlertBroker.process_batch` is what the alert ingest calls after each committed micro-batch: it refreshes
the definitions from the lake (one listing per kind; only changed definitions are re-read), matches the
batch against every watchlist and watchmap at once, stores the hits, runs every active filter and stores
its matches. The services (`broker.filters`, `broker.watchlists`, `broker.watchmaps`) are what the API
exposes to owners.

Modules: `store` (definitions in the lake, ownership), `watchlists` (sources, HEALPix join),
`watchmaps` (MOCs), `filters` (stored ADQL over the batch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.alerts_broker.filters import (
    DEFAULT_WORKERS,
    FILTER_LIMITS,
    Filter,
    FilterError,
    FilterRun,
    FilterRunner,
    FilterService,
    OnMatch,
)
from dac_lake.alerts_broker.store import (
    BrokerError,
    BrokerRecord,
    BrokerStore,
    Caller,
    ConflictError,
    NotAllowed,
    NotFound,
    batch_file,
    hits_prefix,
    write_table,
)
from dac_lake.alerts_broker.watchlists import (
    WatchlistError,
    WatchlistIndex,
    WatchlistService,
    healpix29,
)
from dac_lake.alerts_broker.watchmaps import WatchmapError, WatchmapIndex, WatchmapService
from dac_lake.lake import Lake
from dac_lake.sandbox import SandboxLimits

log = logging.getLogger(__name__)

__all__ = [
    "AlertBroker",
    "BatchReport",
    "BrokerError",
    "BrokerRecord",
    "BrokerStore",
    "Caller",
    "ConflictError",
    "Filter",
    "FilterError",
    "FilterRun",
    "FilterService",
    "NotAllowed",
    "NotFound",
    "WatchlistError",
    "WatchlistService",
    "WatchmapError",
    "WatchmapService",
]


@dataclass
class BatchReport:
    """What the broker did with one batch."""

    batch_id: int
    watchlist_hits: pa.Table
    watchmap_hits: pa.Table
    filters: list[FilterRun] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed_filters(self) -> list[FilterRun]:
        return [r for r in self.filters if r.error]


class AlertBroker:
    """Filters, watchlists and watchmaps of one alert stream.

    `match_on`: "objects" (Lasair's way: an updated object is matched at its mean position) or
    "detections" (every new detection of the batch, `is_history` false).
    """

    def __init__(
        self,
        lake: Lake,
        stream: str,
        *,
        on_match: OnMatch | None = None,
        match_on: str = "objects",
        filter_timeout_s: float = 30.0,
        filter_maxrec: int = 100_000,
        limits: SandboxLimits | None = None,
        filter_workers: int | None = None,
    ):
        if match_on not in ("objects", "detections"):
            raise ValueError("match_on must be 'objects' or 'detections'")
        self.lake = lake
        self.stream = stream
        self.store = BrokerStore(lake.storage, stream)
        self.filters = FilterService(lake, self.store, limits or FILTER_LIMITS)
        self.watchlists = WatchlistService(self.store)
        self.watchmaps = WatchmapService(self.store)
        self.watchlist_index = WatchlistIndex()
        self.watchmap_index = WatchmapIndex()
        self.runner = FilterRunner(
            self.filters, on_match, filter_timeout_s, filter_maxrec, filter_workers or DEFAULT_WORKERS
        )
        self.match_on = match_on

    def refresh(self) -> None:
        """Bring the in-memory indexes up to date with the definitions in the lake."""
        self.watchlist_index.sync(self.store.records("watchlists"), self.watchlists.load)
        self.watchmap_index.sync(self.store.records("watchmaps"), self.watchmaps.load)

    def process_batch(self, batch_id: int, objects: pa.Table, detections: pa.Table) -> BatchReport:
        """Match, store hits, run filters for one committed batch. Idempotent: processing a batch again
        (after a crash) rewrites the same files; only `on_match` hooks see it twice."""
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        self.refresh()
        seconds["refresh"] = time.perf_counter() - t0
        t = time.perf_counter()
        if self.match_on == "objects":
            positions = objects
        else:
            positions = detections.filter(pc.invert(detections.column("is_history").fill_null(False)))
        if positions.num_rows and "_healpix_29" not in positions.column_names:
            hp29 = healpix29(
                positions.column("ra").to_numpy(zero_copy_only=False),
                positions.column("dec").to_numpy(zero_copy_only=False),
            )
            positions = positions.append_column("_healpix_29", pa.array(np.asarray(hp29, dtype=np.int64)))
        wl_hits = self.watchlist_index.match_table(positions, self.match_on)
        seconds["watchlists"] = time.perf_counter() - t
        t = time.perf_counter()
        wm_hits = self.watchmap_index.match_table(positions, self.match_on)
        seconds["watchmaps"] = time.perf_counter() - t
        t = time.perf_counter()
        for kind, hits in (("watchlists", wl_hits), ("watchmaps", wm_hits)):
            if hits.num_rows:
                stored = hits.append_column("_batch", pa.array(np.full(hits.num_rows, batch_id, np.int64)))
                write_table(
                    self.lake.storage, f"{hits_prefix(self.stream, kind)}/{batch_file(batch_id)}", stored
                )
        seconds["store_hits"] = time.perf_counter() - t
        t = time.perf_counter()
        runs = self.runner.run(batch_id, objects, detections, wl_hits, wm_hits)
        seconds["filters"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        log.info(
            "broker batch %s: %d watchlist hits, %d watchmap hits, %d filters (%d failed) in %.3f s",
            batch_id,
            wl_hits.num_rows,
            wm_hits.num_rows,
            len(runs),
            sum(1 for r in runs if r.error),
            seconds["total"],
        )
        return BatchReport(batch_id, wl_hits, wm_hits, runs, seconds)
