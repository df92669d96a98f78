"""What a Dask worker runs for a distributed query: the partial SQL of one chunk, with DuckDB, in its sandbox.

A worker keeps one `QueryEngine` per (lake, groups) for its life (DuckDB's footer cache stays warm across
the tasks of a query and across queries). It reaches the lake with its own settings (environment or config
file, like the ingest tasks): the task carries the lake URL, never credentials. The task's tables are the
ones its driver planned (`pinned`), so every task of a query reads the same release and alert snapshot.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dac_lake.adql.model import Translation
from dac_lake.engine import MemoryTable, QueryEngine
from dac_lake.lake import Lake
from dac_lake.registry import LakeTable
from dac_lake.sandbox import SandboxLimits
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage


@dataclass
class ChunkResult:
    """One task's partial result and what it cost (the driver's profile sums these)."""

    table: pa.Table
    files: dict[str, list[str]]  # relation -> files its scan opened
    rows_scanned: int
    seconds: float
    worker: str


@functools.lru_cache(maxsize=16)
def _engine(lake_url: str, groups: frozenset[str], limits: SandboxLimits) -> QueryEngine:
    storage = LakeStorage(lake_url, load_settings())
    return QueryEngine(Lake(storage), groups, limits, connections=4)


def run_chunk(
    lake_url: str,
    groups: frozenset[str],
    limits: SandboxLimits,
    translation: Translation,
    restrict: Mapping[str, np.ndarray],
    pinned: Mapping[str, LakeTable],
    memory_tables: Sequence[MemoryTable],
    timeout_s: float,
) -> ChunkResult:
    """Run `translation` (its SQL is the partial step) over one chunk: `restrict` limits the split table
    to the chunk's partitions and a cross-matched table to the chunk's margin."""
    t0 = time.perf_counter()
    engine = _engine(lake_url, groups, limits)
    stream = engine.stream_translation(
        translation, None, timeout_s, memory_tables, restrict=restrict, pinned=pinned
    )
    with stream:
        batches = list(stream)
        table = pa.Table.from_batches(batches, schema=stream.schema)
    return ChunkResult(
        table=table,
        files={s.relation: list(s.files) for s in stream.scans},
        rows_scanned=sum(s.rows for s in stream.scans),
        seconds=time.perf_counter() - t0,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )
