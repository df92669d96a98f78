"""The alert ingest loop: source -> decode -> dead letters -> normalise -> lake commit -> ack -> broker.

Ordering is what makes it safe to kill at any instant:

1. refused packets go to the dead-letter folder first (entries are named by position + content hash, so a
   re-delivery overwrites its own entry);
2. the batch is committed to the lake as one create-only snapshot that also records the source position;
   its id derives from the packets' positions, and rows are keyed on detection_id / alert_id, so a batch
   delivered again — whole or cut differently — adds nothing;
3. only then is the source acknowledged (Kafka offsets committed). A crash before this re-delivers the batch
   (harmless, see 2); on restart the lake's recorded position wins over the group's committed offsets;
4. the broker (watchlists, watchmaps, filters, context) runs on the committed batch and records its progress
   (`alerts/<stream>/broker/progress.json`). A crash between 2 and 4 is repaired at start-up: committed
   batches the broker has not seen are rebuilt from their files and processed (`recover_broker`).

The snapshot number (`seq`) is the broker's batch number: hits, filter results and context rows carry it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.alerts import layout as alayout
from dac_lake.alerts.writer import AlertLake, CommitResult
from dac_lake.lake import Lake
from ingest.alerts.normalise import normalise
from ingest.alerts.packets import BatchDecoder, DeadLetter, FilePosition, KafkaPosition, position_to_json
from ingest.alerts.sources import AlertSource, Batch, FileSource, next_offsets

log = logging.getLogger(__name__)

PROGRESS_FILE = "broker/progress.json"


# ------------------------------------------------------------------ positions and batch ids (pure)


def batch_id_for(positions: list[Any]) -> str:
    """A batch id that is the same whenever the same packets are delivered as one batch again: a digest of
    the first and last position of each Kafka partition (or file), plus the count."""
    spans: dict[str, list[int]] = {}
    for p in positions:
        key, idx = (
            (f"k:{p.topic}:{p.partition}", p.offset)
            if isinstance(p, KafkaPosition)
            else (f"f:{p.file}", p.index)
        )
        span = spans.setdefault(key, [idx, idx, 0])
        span[0], span[1], span[2] = min(span[0], idx), max(span[1], idx), span[2] + 1
    text = json.dumps(sorted(spans.items()))
    kind = "k" if positions and isinstance(positions[0], KafkaPosition) else "f"
    return f"{kind}{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def resume_position(positions: list[Any], previous: Any) -> dict[str, Any] | None:
    """What a snapshot records for resuming after `positions`: Kafka next offsets per partition (merged
    into the previous snapshot's), or the last file position."""
    if not positions:
        return previous
    if isinstance(positions[0], KafkaPosition):
        before = {}
        if isinstance(previous, dict) and previous.get("kind") == "kafka":
            before = {(o["topic"], int(o["partition"])): int(o["offset"]) for o in previous["offsets"]}
        merged = next_offsets(positions, into=before)
        return {
            "kind": "kafka",
            "offsets": [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(merged.items())],
        }
    return {"kind": "file", "last": position_to_json(positions[-1])}


def kafka_start_offsets(recorded: Any) -> dict[tuple[str, int], int] | None:
    """The offsets a Kafka source must start from, per the lake (None: use the group's offsets)."""
    if isinstance(recorded, dict) and recorded.get("kind") == "kafka":
        return {(o["topic"], int(o["partition"])): int(o["offset"]) for o in recorded["offsets"]}
    return None


def file_start_after(recorded: Any) -> FilePosition | None:
    """The last file position a replay committed (None: from the start)."""
    if isinstance(recorded, dict) and recorded.get("kind") == "file":
        last = recorded["last"]
        return FilePosition(str(last["file"]), int(last["index"]))
    return None


# ------------------------------------------------------------------ reports


@dataclass
class BatchOutcome:
    """One batch through the pipeline."""

    packets: int
    alerts: int
    dead: int
    commit: CommitResult | None
    latency_s: float  # first packet received -> snapshot committed (queryable)
    seconds: dict[str, float] = field(default_factory=dict)
    broker: Any = None  # alerts_broker.BatchReport


@dataclass
class IngestReport:
    """A whole run: what a CLI prints and a benchmark records."""

    stream: str
    batches: int = 0
    skipped_batches: int = 0
    packets: int = 0
    alerts: int = 0
    dead: int = 0
    detections_new: int = 0
    objects_new: int = 0
    objects_updated: int = 0
    watchlist_hits: int = 0
    watchmap_hits: int = 0
    filter_matches: int = 0
    filter_failures: int = 0
    recovered_batches: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.packets += outcome.packets
        self.alerts += outcome.alerts
        self.dead += outcome.dead
        self.latencies.append(outcome.latency_s)
        for k, v in outcome.seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v
        c = outcome.commit
        if c is not None:
            if c.skipped:
                self.skipped_batches += 1
            else:
                self.detections_new += c.rows_new.get(alayout.DETECTIONS, 0)
                self.objects_new += c.objects_new
                self.objects_updated += c.objects_updated
        b = outcome.broker
        if b is not None:
            self.watchlist_hits += b.watchlist_hits.num_rows
            self.watchmap_hits += b.watchmap_hits.num_rows
            self.filter_matches += sum(r.rows for r in b.filters)
            self.filter_failures += len(b.failed_filters)

    @property
    def alerts_per_second(self) -> float:
        return self.alerts / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        lat = np.asarray(self.latencies) if self.latencies else np.zeros(1)
        return [
            f"stream {self.stream}: {self.batches} batches ({self.skipped_batches} already committed), "
            f"{self.packets} packets, {self.alerts} alerts, {self.dead} dead-lettered",
            f"new detections {self.detections_new}, new objects {self.objects_new}, "
            f"updated objects {self.objects_updated}",
            f"watchlist hits {self.watchlist_hits}, watchmap hits {self.watchmap_hits}, "
            f"filter matches {self.filter_matches} ({self.filter_failures} filter failures)",
            f"{self.seconds:.1f} s, {self.alerts_per_second:,.0f} alerts/s; latency p50 "
            f"{np.median(lat):.2f} s, max {lat.max():.2f} s"
            + (f"; recovered {self.recovered_batches} broker batches" if self.recovered_batches else ""),
        ]

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        lat = self.latencies or [0.0]
        out.update(alerts_per_second=self.alerts_per_second, latency_p50=float(np.median(lat)),
                   latency_max=float(max(lat)))  # fmt: skip
        return out


# ------------------------------------------------------------------ the pipeline


class AlertIngest:
    """Long-lived ingest of one stream (keeps the decoder's compiled programs and the writer's caches).

    `broker`: run watchlists/watchmaps/filters on each batch (an `AlertBroker`, or None for none).
    `context`: an object with `match(objects) -> pa.Table` and `store(seq, table)` run on the objects first
    seen in each batch (None: no context matching). `crash_hook(stage)` is called at the pipeline's
    commit points (tests kill the process there)."""

    def __init__(
        self,
        lake: Lake,
        stream: str,
        *,
        dead_letter_dir: str | Path,
        order: int | None = None,
        groups: list[str] | None = None,
        broker: Any = None,
        context: Any = None,
        crash_hook: Callable[[str], None] | None = None,
        threads: int = 4,
    ):
        self.lake = lake
        self.stream = stream
        self.writer = AlertLake(lake.storage, stream, order=order, groups=groups, threads=threads)
        self.decoder = BatchDecoder()
        self.dead = DeadLetter(dead_letter_dir)
        self.broker = broker
        self.context = context
        self.crash_hook = crash_hook or (lambda stage: None)

    def warm_up(self) -> float:
        """Compile the decoder's loop now (numba: a few seconds, once per process) rather than inside the
        first batch's latency. Returns the seconds it took."""
        from ingest.alerts.generate import build_alerts, container_payload
        from ingest.alerts.packets import Packet

        t = time.perf_counter()
        info, records = build_alerts("ztf", 1, 1, seed=1, cutout_pixels=4)
        packets = [Packet(FilePosition("warm-up", 0), _raw=container_payload(records[:1], info))]
        self.decoder.decode(packets)
        return time.perf_counter() - t

    # ---- progress of the broker, in the lake
    @property
    def _progress_path(self) -> str:
        return f"{alayout.stream_prefix(self.stream)}/{PROGRESS_FILE}"

    def broker_progress(self) -> int:
        """The last snapshot seq the broker finished (0: none)."""
        try:
            return int(json.loads(self.lake.storage.read_text(self._progress_path))["seq"])
        except FileNotFoundError:
            return 0

    def _set_progress(self, seq: int) -> None:
        self.lake.storage.write_text(
            self._progress_path, json.dumps({"seq": seq, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                               time.gmtime())})
        )  # fmt: skip

    # ---- one batch
    def process(self, batch: Batch, source: AlertSource | None = None) -> BatchOutcome:
        """Decode, dead-letter, commit, acknowledge, then run the broker on one batch."""
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        decoded = self.decoder.decode(batch.packets)
        seconds["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        for packet, error in decoded.dead:
            self.dead.put(packet.raw or b"", packet.position, error)
            log.warning("%s: dead-lettered %s: %s", self.stream, packet.position, error)
        tables = normalise(decoded)
        seconds["normalise"] = time.perf_counter() - t
        positions = batch.positions
        self.crash_hook("before_commit")
        commit = self.writer.commit(
            batch_id_for(positions),
            tables.detections,
            tables.upper_limits,
            tables.alerts,
            source_position=resume_position(positions, self.writer.snapshot(refresh=False).source_position),
            before_snapshot=lambda: self.crash_hook("before_snapshot"),
        )
        seconds["commit"] = commit.seconds
        latency = time.time() - (batch.first_at or time.time())
        self.crash_hook("after_commit")
        if source is not None:
            source.commit(positions)
        self.crash_hook("after_ack")
        outcome = BatchOutcome(
            len(batch), tables.alerts.num_rows, len(decoded.dead), commit, latency, seconds
        )
        if not commit.skipped:
            t = time.perf_counter()
            outcome.broker = self._broker_batch(
                commit.seq, commit.objects, commit.detections, commit.first_seen
            )
            seconds["broker"] = time.perf_counter() - t
        return outcome

    def _broker_batch(
        self, seq: int, objects: pa.Table | None, detections: pa.Table | None, first_seen: pa.Array | None
    ) -> Any:
        report = None
        objects = _with_int_batch(objects, seq)
        if self.broker is not None and objects is not None and detections is not None:
            report = self.broker.process_batch(seq, objects, detections)
        if self.context is not None and objects is not None and first_seen is not None and len(first_seen):
            fresh = objects.filter(pc.is_in(objects.column("object_id"), value_set=first_seen))
            self.context.store(seq, self.context.match(fresh))
        self.crash_hook("before_progress")
        self._set_progress(seq)
        return report

    # ---- recovery
    def recover_broker(self) -> int:
        """Run the broker on committed batches it has not processed (a crash after a lake commit). Returns
        how many batches were recovered."""
        if self.broker is None and self.context is None:
            return 0
        done = self.broker_progress()
        latest = self.writer.snapshot()
        todo = [s for s in self.writer.snapshots.history() if done < s <= latest.seq]
        recovered = 0
        for seq in todo:
            snap = self.writer.snapshots.read(seq)
            if snap.operation != "commit":
                continue
            detections, objects, first_seen = self._rebuild(seq, snap.batches[0] if snap.batches else "")
            if detections is None:
                log.warning("%s: cannot rebuild batch #%d for the broker (compacted since); skipped",
                            self.stream, seq)  # fmt: skip
                continue
            log.info("%s: recovering broker batch #%d (%d detections)", self.stream, seq, detections.num_rows)
            self._broker_batch(seq, objects, detections, first_seen)
            recovered += 1
        if todo and not recovered and latest.seq > done:
            self._set_progress(latest.seq)
        return recovered

    def _rebuild(self, seq: int, batch_id: str) -> tuple[pa.Table | None, pa.Table | None, pa.Array | None]:
        """A committed batch's new detections (its own files, named after its seq) and its objects (current
        rows of the objects it touched)."""
        latest = self.writer.snapshot()
        prefix = f"{seq:06d}-"
        state = latest.table(alayout.DETECTIONS)
        parts = []
        for pixel, files in state.pixels.items():
            for entry in files:
                if entry.name.startswith(prefix):
                    parts.append(self.writer.read_file(alayout.DETECTIONS, pixel, entry.name))
        if not parts:
            return None, None, None
        detections = pa.concat_tables(parts, promote_options="default")
        ids = pc.unique(detections.column("object_id").combine_chunks().cast(pa.large_string()))
        near = self.writer.objects_near(
            detections.column("ra").to_numpy(), detections.column("dec").to_numpy(), latest
        )
        rows = [t for t in near.values() if t.num_rows]
        if not rows:
            return detections, None, None
        objects = pa.concat_tables(rows, promote_options="default")
        objects = objects.filter(pc.is_in(objects.column("object_id").cast(pa.large_string()), value_set=ids))
        first_seen = (
            objects.filter(
                pc.equal(objects.column("n_detections"), _detections_per_object(detections, objects))
            )
            .column("object_id")
            .combine_chunks()
        )
        return detections, objects, first_seen

    # ---- the loop
    def run(
        self,
        source: AlertSource,
        *,
        max_alerts: int = 5000,
        max_wait_s: float = 1.0,
        max_batches: int | None = None,
        on_batch: Callable[[BatchOutcome], None] | None = None,
        batches: Iterator[Batch] | None = None,
    ) -> IngestReport:
        """Ingest until the source ends (files) or `max_batches` (Kafka runs until stopped)."""
        report = IngestReport(self.stream)
        report.recovered_batches = self.recover_broker()
        t0 = time.perf_counter()
        iterator = (
            batches if batches is not None else source.batches(max_alerts=max_alerts, max_wait_s=max_wait_s)
        )
        for n, batch in enumerate(iterator, start=1):
            outcome = self.process(batch, source)
            report.add(outcome)
            report.seconds = time.perf_counter() - t0
            if on_batch is not None:
                on_batch(outcome)
            if max_batches is not None and n >= max_batches:
                break
        report.seconds = time.perf_counter() - t0
        return report

    def file_source(self, paths: list[str | Path]) -> FileSource:
        """A replay of `paths` that resumes after the last packet the lake has."""
        return FileSource(paths, start_after=file_start_after(self.writer.source_position()))


def _with_int_batch(objects: pa.Table | None, seq: int) -> pa.Table | None:
    """The broker numbers batches by snapshot seq; the lake's objects carry the batch id string."""
    if objects is None or "updated_batch" not in objects.column_names:
        return objects
    i = objects.column_names.index("updated_batch")
    return objects.set_column(i, "updated_batch", pa.array(np.full(objects.num_rows, seq, np.int64)))


def _detections_per_object(detections: pa.Table, objects: pa.Table) -> pa.Array:
    """For each object row, its number of detections in `detections` (non-history and history alike)."""
    counts = detections.group_by("object_id").aggregate([("detection_id", "count")])
    keys = counts.column("object_id").cast(pa.large_string())
    idx = pc.index_in(objects.column("object_id").cast(pa.large_string()), value_set=keys)
    vals = counts.column("detection_id_count").to_numpy()
    out = np.where(pc.is_null(idx).to_numpy(zero_copy_only=False), -1,
                   vals[pc.fill_null(idx, 0).to_numpy()])  # fmt: skip
    return pa.array(out.astype(np.int32))
