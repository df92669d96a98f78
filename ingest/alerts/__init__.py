"""Alert packets for the alert broker: schemas, decoding, normalisation to lake rows, sources, a generator.

The public pieces, by module:

- :mod:`.packets` — the schema registry, :class:`~.packets.BatchDecoder` (columnar, the fast path),
  :class:`~.packets.Decoder` (dicts, for inspection), positions, errors, :class:`~.packets.DeadLetter`
- :mod:`.normalise` — decoded alerts -> pyarrow tables (detections, upper limits, forced photometry, alerts)
- :mod:`.sources` — :class:`~.sources.FileSource` and :class:`~.sources.KafkaSource` (at-least-once batches)
- :mod:`.generate` — realistic synthetic ZTF and Rubin packets (``python -m ingest.alerts.generate``)
"""

from ingest.alerts.packets import (
    AlertPacketError,
    BadPacketError,
    BatchDecoder,
    DeadLetter,
    DecodedAlert,
    Decoder,
    FilePosition,
    KafkaPosition,
    Packet,
    Position,
    SchemaRegistry,
    UnknownSchemaError,
    registry,
)

__all__ = [
    "AlertPacketError",
    "BadPacketError",
    "BatchDecoder",
    "DeadLetter",
    "DecodedAlert",
    "Decoder",
    "FilePosition",
    "KafkaPosition",
    "Packet",
    "Position",
    "SchemaRegistry",
    "UnknownSchemaError",
    "registry",
]
