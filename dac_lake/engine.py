"""ADQL over the lake: translate, prune HEALPix partitions, run in a locked sandbox, report what was read.

One implementation serves `Session.adql`, `Session.cone`, the TAP service and SCS: the translator finds the
constant regions each table reference must lie in; this module turns them into the partition files to read
and `_healpix_29` ranges (so DuckDB skips row groups inside those files), defines one view per table
reference on a fresh sandbox, locks it and runs the generated SQL.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dac_lake.adql import CrossMatch, OutputColumn, TableRef, Translation, translate
from dac_lake.coverage import partitions_touching, regions_ranges29
from dac_lake.lake import Lake
from dac_lake.layout import pixel_file
from dac_lake.registry import LakeRegistry, LakeTable
from dac_lake.sandbox import Sandbox, SandboxLimits

log = logging.getLogger(__name__)

#: above this many ranges, row-group pruning predicates cost more than they save
MAX_RANGE_PREDICATES = 512
TRANSLATION_CACHE_SIZE = 256


@dataclass
class ScanPlan:
    """What one table reference will read."""

    relation: str
    table: str
    files: list[str]
    total_files: int
    ranges: np.ndarray | None  # None: no spatial constraint


@dataclass
class QueryResult:
    table: pa.Table
    columns: list[OutputColumn]
    overflow: bool
    sql: str
    scans: list[ScanPlan] = field(default_factory=list)
    profile: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def files_read(self) -> int:
        return sum(len(s.files) for s in self.scans)

    def explain(self) -> dict:
        """The introspection the issue asks for: files and row groups each query read."""
        return {
            "sql": self.sql,
            "seconds": round(self.seconds, 4),
            "scans": [
                {
                    "relation": s.relation,
                    "table": s.table,
                    "files": len(s.files),
                    "of_files": s.total_files,
                    "healpix_ranges": None if s.ranges is None else len(s.ranges),
                }
                for s in self.scans
            ],
            "profile": self.profile,
        }


def effective_regions(
    ref: TableRef, refs: list[TableRef], crossmatches: list[CrossMatch]
) -> tuple[list, float]:
    """The regions bounding `ref` and how much to grow them: its own, or, for the unconstrained side of a
    cross-match, the other side's regions grown by the match radius (a pair is never farther apart)."""
    if ref.regions:
        return ref.regions, 0.0
    by_relation = {r.relation: r for r in refs}
    for cm in crossmatches:
        if ref.relation in (cm.left, cm.right):
            other = by_relation.get(cm.right if ref.relation == cm.left else cm.left)
            if other is not None and other.regions:
                return other.regions, cm.radius_deg
    return [], 0.0


def plan_scan(lt: LakeTable, ref: TableRef, regions: list, extra_deg: float = 0.0) -> ScanPlan:
    partitions = lt.manifest["partitions"]
    ranges = regions_ranges29(regions, extra_deg) if regions else None
    touched = partitions if ranges is None else partitions_touching(partitions, ranges)
    files = [f"{lt.dataset_prefix}/{pixel_file(o, p)}" for o, p, _ in touched]
    return ScanPlan(ref.relation, lt.qualified_name, files, len(partitions), ranges)


class QueryEngine:
    """Runs ADQL for one caller (its groups decide which catalogs exist)."""

    def __init__(self, lake: Lake, groups: frozenset[str] = frozenset(), limits: SandboxLimits | None = None):
        self.lake = lake
        self.registry = LakeRegistry(lake, groups)
        self.limits = limits or SandboxLimits()
        self._translations: OrderedDict[tuple, Translation] = OrderedDict()

    def _translate(self, text: str, maxrec: int | None) -> Translation:
        """Translate, remembering recent translations: TAP clients and SCS repeat the same queries, and
        translation (sqlglot, with a re-parse of the output as a safety check) is ~15 ms. The key includes
        the tables visible now, so a new release or changed data rights never reuse a stale plan."""
        visible = tuple((t.meta.schema, t.meta.name, t.release) for t in self.registry.lake_tables())
        key = (text, maxrec, visible)
        cached = self._translations.get(key)
        if cached is not None:
            self._translations.move_to_end(key)
            return cached
        translation = translate(text, self.registry, maxrec=maxrec)
        self._translations[key] = translation
        if len(self._translations) > TRANSLATION_CACHE_SIZE:
            self._translations.popitem(last=False)
        return translation

    def adql(self, text: str, maxrec: int | None = None, timeout_s: float | None = None) -> QueryResult:
        t0 = time.perf_counter()
        translation = self._translate(text, maxrec)
        scans: list[ScanPlan] = []
        limits = self.limits
        if timeout_s is not None or maxrec is not None:
            from dataclasses import replace

            limits = replace(
                limits,
                timeout_s=timeout_s or limits.timeout_s,
                max_rows=None if maxrec is None else maxrec + 1,
            )
        with Sandbox(self.lake.storage, limits) as sandbox:
            for ref in translation.table_refs:
                lt = self.registry.find(ref.table.schema, ref.table.name)
                assert lt is not None, (
                    f"translator returned unknown table {ref.table.schema}.{ref.table.name}"
                )
                regions, grow = effective_regions(ref, translation.table_refs, translation.crossmatches)
                plan = plan_scan(lt, ref, regions, grow)
                scans.append(plan)
                ranges = plan.ranges
                if ranges is not None and len(ranges) > MAX_RANGE_PREDICATES:
                    ranges = None
                files = plan.files
                if not files:  # empty coverage: a view with the right columns and no rows
                    files = [f"{lt.dataset_prefix}/{pixel_file(*lt.manifest['partitions'][0][:2])}"]
                    ranges = np.empty((0, 2), dtype=np.int64)
                sandbox.define_relation(ref.relation, files, healpix_ranges=ranges)
            sandbox.lock()
            table = sandbox.execute(translation.sql)
            profile = sandbox.last_profile
        io = profile.get("io", {})
        log.info(
            "query: %d rows in %.3f s; files %s; read %s files, %s bytes in %s requests",
            table.num_rows,
            time.perf_counter() - t0,
            ", ".join(f"{s.table} {len(s.files)}/{s.total_files}" for s in scans),
            io.get("files_read"),
            io.get("bytes_read"),
            io.get("read_requests"),
        )
        overflow = maxrec is not None and table.num_rows > maxrec
        if overflow:
            table = table.slice(0, maxrec)
        return QueryResult(
            table=table,
            columns=translation.columns,
            overflow=overflow,
            sql=translation.sql,
            scans=scans,
            profile=profile,
            seconds=time.perf_counter() - t0,
        )
