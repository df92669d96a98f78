"""Where alert packets come from: replay files and Kafka topics, behind one at-least-once batch interface.

The ingest loop is::

    for batch in source.batches(max_alerts=5000, max_wait_s=1.0):
        ...decode, dead-letter the refused, normalise, write and commit the lake snapshot
           (recording the batch's positions in the snapshot)...
        source.commit(batch.positions)        # only now: a crash before this re-delivers the batch

A source never acknowledges anything by itself, so a crash anywhere before ``commit`` re-delivers; the lake's
idempotent writes (keyed on detection_id / alert_id) make the re-delivery harmless.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.alerts.packets import (
    BadPacketError,
    Decoder,
    FilePosition,
    KafkaPosition,
    Packet,
    Position,
    split_container,
)


@dataclass
class Batch:
    """Packets in delivery order with their positions."""

    packets: list[Packet] = field(default_factory=list)
    #: wall-clock time (time.time()) the first packet of the batch arrived: the start of its latency
    first_at: float | None = None

    @property
    def positions(self) -> list[Position]:
        return [p.position for p in self.packets]

    def __len__(self) -> int:
        return len(self.packets)


def next_offsets(
    positions: Iterable[Position], into: Mapping[tuple[str, int], int] | None = None
) -> dict[tuple[str, int], int]:
    """Kafka offsets to resume from after ``positions`` (per (topic, partition): last offset + 1), merged
    into an earlier mapping — what a lake snapshot records so a restart resumes exactly after it."""
    out = dict(into or {})
    for p in positions:
        if isinstance(p, KafkaPosition):
            key = (p.topic, p.partition)
            out[key] = max(out.get(key, 0), p.offset + 1)
    return out


class AlertSource(ABC):
    """A stream of alert packets delivered in batches, acknowledged only by :meth:`commit`."""

    @abstractmethod
    def batches(self, max_alerts: int = 1000, max_wait_s: float = 1.0) -> Iterator[Batch]:
        """Batches of at most ``max_alerts`` packets; a batch is handed over when full or when ``max_wait_s``
        has passed since its first packet arrived (latency bound)."""

    @abstractmethod
    def commit(self, positions: Sequence[Position]) -> None:
        """Acknowledge packets: call after the lake commit that contains them, never before."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> AlertSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ files


class FileSource(AlertSource):
    """Alert files and folders (replays, tests): Avro container files with one or many alerts, and files
    holding one Confluent-framed payload.

    Folders are walked recursively in sorted order, so the order — and each packet's position
    ``(file, index)`` — is stable between runs. ``commit`` records nothing: the lake snapshot stores the last
    position and a restart passes it as ``start_after`` to resume right after it. Positions name files by
    absolute path; a replay moved elsewhere is resumed by ``start_after=(new path, index)``."""

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        start_after: Position | None = None,
        suffixes: Sequence[str] = (".avro", ".bin"),
        decoder: Decoder | None = None,
    ):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.decoder = decoder or Decoder()
        self.files = self._expand([Path(p) for p in paths], tuple(suffixes))
        self.start_after = FilePosition(*start_after) if start_after is not None else None
        if self.start_after is not None and str(Path(self.start_after.file).resolve()) not in self.files:
            raise ValueError(
                f"cannot resume after {self.start_after}: that file is not among the "
                f"{len(self.files)} files of this source"
            )

    @staticmethod
    def _expand(paths: list[Path], suffixes: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        for p in paths:
            if p.is_dir():
                found = sorted(
                    (
                        f
                        for f in p.rglob("*")
                        if f.is_file() and f.name.endswith(suffixes) and not f.name.startswith(".")
                    ),
                    key=lambda f: f.relative_to(p).parts,
                )
                out.extend(str(f.resolve()) for f in found)
            elif p.is_file():
                out.append(str(p.resolve()))
            else:
                raise FileNotFoundError(f"alert source {p} does not exist")
        return out

    def packets(self) -> Iterator[Packet]:
        """Every packet after ``start_after``, in order."""
        skip_until = None
        start_index = 0
        if self.start_after is not None:
            skip_until = str(Path(self.start_after.file).resolve())
        for f in self.files:
            if skip_until is not None:
                if f != skip_until:
                    continue
                skip_until = None
                start_index = self.start_after.index + 1
            data = Path(f).read_bytes()
            if data[:4] == b"Obj\x01":
                yield from split_container(data, f, start_index, self.decoder)
            elif start_index == 0:
                if not data:
                    yield Packet(FilePosition(f, 0), _raw=data, error=BadPacketError(f"{f} is empty"))
                else:
                    yield Packet(FilePosition(f, 0), _raw=data)  # a Confluent payload: decoded by the loop
            start_index = 0

    def batches(self, max_alerts: int = 1000, max_wait_s: float = 1.0) -> Iterator[Batch]:
        """Files are all there: batches are full ones and a last partial one; the iterator then ends."""
        batch = Batch()
        for p in self.packets():
            if batch.first_at is None:
                batch.first_at = time.time()
            batch.packets.append(p)
            if len(batch.packets) >= max_alerts:
                yield batch
                batch = Batch()
        if batch.packets:
            yield batch

    def commit(self, positions: Sequence[Position]) -> None:
        """Nothing to acknowledge: a file replay resumes from the position in the lake snapshot."""


# ------------------------------------------------------------------------------------------------ Kafka


class KafkaSource(AlertSource):
    """A Kafka consumer in a consumer group, offsets committed by hand after each lake commit.

    ``enable.auto.commit`` is off and so is the offset store: the only commits are :meth:`commit`'s. A
    consumer killed mid-batch leaves its uncommitted messages to the next member of the group. When the lake
    snapshot knows where it stopped (``start_from``: {(topic, partition): next offset} or the last
    positions), assigned partitions start there, which beats the group's committed offset if the crash came
    between the lake commit and the Kafka commit."""

    def __init__(
        self,
        bootstrap: str,
        topics: str | Sequence[str],
        group: str,
        *,
        start_from: Mapping[tuple[str, int], int] | Iterable[KafkaPosition] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        from confluent_kafka import Consumer

        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if isinstance(start_from, Mapping):
            self.start_from = {(str(t), int(p)): int(o) for (t, p), o in start_from.items()}
        else:
            self.start_from = next_offsets(start_from or [])
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # packets are big (cutouts); let a fetch carry many of them
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
        conf.update(config or {})
        self.consumer = Consumer(conf)
        self.consumer.subscribe(self.topics, on_assign=self._on_assign)
        self._closed = False

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        if self.start_from:
            for tp in partitions:
                offset = self.start_from.get((tp.topic, tp.partition))
                if offset is not None:
                    tp.offset = offset
            consumer.assign(partitions)

    def batches(
        self, max_alerts: int = 1000, max_wait_s: float = 1.0, *, stop_after_idle_s: float | None = None
    ) -> Iterator[Batch]:
        """Endless, unless ``stop_after_idle_s`` is given: then it ends after that long without a message
        (replays, tests). Empty batches are never yielded."""
        from confluent_kafka import KafkaError, KafkaException

        idle_since = time.monotonic()
        while True:
            batch = Batch()
            first_at: float | None = None
            while len(batch.packets) < max_alerts:
                now = time.monotonic()
                if first_at is not None:
                    left = max_wait_s - (now - first_at)
                    if left <= 0:
                        break
                else:
                    left = max_wait_s
                    if stop_after_idle_s is not None:
                        left = min(left, max(0.0, stop_after_idle_s - (now - idle_since)))
                        if left <= 0:
                            return
                msgs = self.consumer.consume(num_messages=max_alerts - len(batch.packets), timeout=left)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        if err.fatal() or not err.retriable():
                            raise KafkaException(err)
                        continue
                    pos = KafkaPosition(m.topic(), m.partition(), m.offset())
                    value = m.value()
                    if value is None:
                        batch.packets.append(
                            Packet(pos, _raw=b"", error=BadPacketError("Kafka message with no value"))
                        )
                    else:
                        batch.packets.append(Packet(pos, _raw=value))
                if batch.packets and first_at is None:
                    first_at = time.monotonic()
                    batch.first_at = time.time()
            if batch.packets:
                idle_since = time.monotonic()
                yield batch

    def commit(self, positions: Sequence[Position]) -> None:
        """Commit, synchronously, the offset after the highest position of each partition."""
        from confluent_kafka import TopicPartition

        offsets = next_offsets(positions)
        if offsets:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())], asynchronous=False
            )

    def committed(self, timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
        """The group's committed offsets for the assigned partitions (for checks and monitoring)."""
        parts = self.consumer.committed(self.consumer.assignment(), timeout=timeout_s)
        return {(tp.topic, tp.partition): tp.offset for tp in parts if tp.offset >= 0}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.consumer.close()
