"""Alert streams in the lake (Lasair's model on HATS): detections, objects, upper limits and alerts tables,
appended by atomic micro-batch commits (`AlertLake.commit`), each commit one create-only snapshot.

    from dac_lake.alerts import AlertLake
    lake = AlertLake(LakeStorage(url), "ztf")
    lake.commit("batch-42", detections, upper_limits, alerts, source_position={"ztf": {"0": 1234}})

The tables are queryable as `<stream>.detections`, `<stream>.objects`, `<stream>.upper_limits` and
`<stream>.alerts` through the registry (TAP, `dac_lake.connect(...).adql(...)`), and readable by hats/lsdb as
plain HATS catalogs at `alerts/<stream>/<table>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dac_lake.alerts.snapshots import AlertLakeError, CommitConflict, Snapshot

if TYPE_CHECKING:
    from dac_lake.alerts.compaction import CompactionReport, GcReport, compact_stream
    from dac_lake.alerts.writer import AlertLake, CommitResult

__all__ = [
    "AlertLake",
    "AlertLakeError",
    "CommitConflict",
    "CommitResult",
    "CompactionReport",
    "GcReport",
    "Snapshot",
    "compact_stream",
]


def __getattr__(name: str):
    """The writer pulls in hats and pandas: import it only when asked for (the query registry reads
    snapshots through this package and must stay light)."""
    if name in {"AlertLake", "CommitResult"}:
        from dac_lake.alerts import writer

        return getattr(writer, name)
    if name in {"CompactionReport", "GcReport", "compact_stream"}:
        from dac_lake.alerts import compaction

        return getattr(compaction, name)
    raise AttributeError(name)
