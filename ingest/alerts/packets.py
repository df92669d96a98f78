"""Alert packets: the schema registry, decoding of every form ZTF and Rubin ship, and the dead-letter folder.

Forms understood (detected from the bytes, never from a file name):

- **Avro container file** (magic ``Obj\\x01``): how ZTF ships alerts, one per file in its nightly archives
  and one per Kafka message; also many alerts per file (replays, the generator's bundles) and Rubin
  container files. The writer schema is in the header, so the packet decodes whatever its version; the
  version is then checked against the registry (ZTF: the record's ``schemavsn``; Rubin: the schema name
  ``lsst.vX_Y.alert``), so an unknown version is refused loudly instead of being half-understood.
- **Confluent wire format** (byte 0 = 0, then a 4-byte big-endian schema id, then one schemaless Avro
  record): how Rubin publishes to Kafka. The id names the schema: Rubin's convention is
  ``int(f"{major}{minor:02d}")``, so 704 is lsst.v7_4.

Records are read through a *projection* reader schema (only the fields the lake uses): fastavro still walks
every byte but builds small dicts, which is most of the decode cost for packets with long histories.

A packet that cannot be decoded raises :class:`BadPacketError`; one whose schema version is not registered
raises :class:`UnknownSchemaError`. Both say what was seen and what is supported, and the ingest loop hands
such packets with the reason to :class:`DeadLetter` — nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import fastavro
from fastavro.schema import load_schema

SCHEMA_DIR = Path(__file__).parent / "schemas"
CONTAINER_MAGIC = b"Obj\x01"
CONFLUENT_MAGIC = 0
SYNC_SIZE = 16
FAMILIES = ("ztf", "rubin")
_FAMILY_DIRS = {"ztf": "ztf", "rubin": "lsst"}
_RUBIN_NAME = re.compile(r"^lsst\.v(\d+)_(\d+)\.alert$")


# --------------------------------------------------------------------------------------------- errors


class AlertPacketError(Exception):
    """A packet the ingest cannot turn into rows; carries what was seen and what would have been accepted."""

    def __init__(self, message: str, *, seen: str | None = None, supported: list[str] | None = None):
        super().__init__(message)
        self.reason = message
        self.seen = seen
        self.supported = supported or []

    def as_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "reason": self.reason,
            "seen": self.seen,
            "supported": self.supported,
        }


class UnknownSchemaError(AlertPacketError):
    """The packet names a schema family/version (or schema id) that is not in the registry."""


class BadPacketError(AlertPacketError):
    """The bytes are not a decodable alert (truncated, corrupt, wrong framing, impossible values)."""


# ------------------------------------------------------------------------------------------ positions


class FilePosition(NamedTuple):
    """Where a packet came from in a replay: the file (absolute path) and the alert's index inside it."""

    file: str
    index: int


class KafkaPosition(NamedTuple):
    """Where a packet came from on Kafka: the offset to commit is ``offset + 1``."""

    topic: str
    partition: int
    offset: int


Position = FilePosition | KafkaPosition


def position_to_json(position: Position) -> dict[str, Any]:
    """A position as JSON (lake snapshots, dead-letter reasons); inverse of :func:`position_from_json`."""
    if isinstance(position, KafkaPosition):
        return {"topic": position.topic, "partition": position.partition, "offset": position.offset}
    return {"file": position.file, "index": position.index}


def position_from_json(data: dict[str, Any]) -> Position:
    if "topic" in data:
        return KafkaPosition(str(data["topic"]), int(data["partition"]), int(data["offset"]))
    return FilePosition(str(data["file"]), int(data["index"]))


# ---------------------------------------------------------------------------------------- the registry

# The fields normalisation reads, per record type. A name missing from a version's schema is skipped, so
# one spec serves every version of a family. Nested dicts descend into records (through arrays/unions).
_ZTF_CANDIDATE = dict.fromkeys(
    [
        "jd",
        "fid",
        "pid",
        "candid",
        "isdiffpos",
        "ra",
        "dec",
        "magpsf",
        "sigmapsf",
        "diffmaglim",
        "rb",
        "drb",
        "ssdistnr",
        "ssmagnr",
        "ssnamenr",
        "sgscore1",
        "distpsnr1",
        "ndethist",
        "ncovhist",
        "jdstarthist",
        "jdendhist",
        "programid",
    ]
)
_ZTF_PRV = dict.fromkeys(
    [
        "jd",
        "fid",
        "pid",
        "candid",
        "isdiffpos",
        "ra",
        "dec",
        "magpsf",
        "sigmapsf",
        "diffmaglim",
        "rb",
        "programid",
    ]
)
_ZTF_FP = dict.fromkeys(
    ["jd", "fid", "pid", "forcediffimflux", "forcediffimfluxunc", "magzpsci", "diffmaglim", "procstatus"]
)
ZTF_PROJECTION: dict[str, Any] = {
    "schemavsn": None,
    "publisher": None,
    "objectId": None,
    "candid": None,
    "candidate": _ZTF_CANDIDATE,
    "prv_candidates": _ZTF_PRV,
    "fp_hists": _ZTF_FP,
}
_DIA_SOURCE = dict.fromkeys(
    [
        "diaSourceId",
        "diaObjectId",
        "ssObjectId",
        "midpointMjdTai",
        "ra",
        "dec",
        "band",
        "psfFlux",
        "psfFluxErr",
        "reliability",
        "snr",
    ]
)
RUBIN_PROJECTION: dict[str, Any] = {
    "alertId": None,
    "diaSourceId": None,
    "diaSource": _DIA_SOURCE,
    "prvDiaSources": _DIA_SOURCE,
    "prvDiaForcedSources": dict.fromkeys(
        ["diaForcedSourceId", "diaObjectId", "ra", "dec", "midpointMjdTai", "band", "psfFlux", "psfFluxErr"]
    ),
    "prvDiaNondetectionLimits": dict.fromkeys(["ccdVisitId", "midpointMjdTai", "band", "diaNoise"]),
    "diaObject": dict.fromkeys(
        ["diaObjectId", "ra", "dec", "nDiaSources", "firstDiaSourceMjdTai", "lastDiaSourceMjdTai"]
    ),
    "ssObject": dict.fromkeys(["ssObjectId"]),
    "ssSource": dict.fromkeys(["ssObjectId", "diaSourceId"]),
}


def rubin_schema_id(version: str) -> int:
    """Rubin's registry id for a schema version: major followed by the zero-padded minor (7.4 -> 704)."""
    major, minor = version.split(".")
    return int(f"{int(major)}{int(minor):02d}")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass
class SchemaInfo:
    """One registered schema: a family ('ztf' | 'rubin'), a version, its .avsc folder and (Rubin) its id."""

    family: str
    version: str
    directory: Path
    schema_id: int | None

    @property
    def root_file(self) -> Path:
        name = (
            "ztf.alert.avsc"
            if self.family == "ztf"
            else "lsst.v{}_{}.alert.avsc".format(*self.version.split("."))
        )
        return self.directory / name

    @cached_property
    def schema(self) -> dict[str, Any]:
        """The full parsed schema (what a writer of this version writes)."""
        return load_schema(str(self.root_file))

    @cached_property
    def projection(self) -> dict[str, Any]:
        """The parsed reader schema holding only the fields the lake reads."""
        spec = ZTF_PROJECTION if self.family == "ztf" else RUBIN_PROJECTION
        return fastavro.parse_schema(project_schema(self.schema, spec))

    @property
    def label(self) -> str:
        return f"{self.family} {self.version}"


def project_schema(parsed: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A reader schema keeping, in each record, only the fields named in ``spec`` (recursively).

    Named types are emitted in full at their first use and by name afterwards, as Avro requires. Field types
    are copied from the writer's schema, so the reader resolves against every writer of the same layout."""
    named = parsed.get("__named_schemas", {})
    seen: set[str] = set()

    def walk(node: Any, sub: dict[str, Any] | None) -> Any:
        if isinstance(node, str):
            if node in named:
                return walk(named[node], sub)
            return node
        if isinstance(node, list):
            return [walk(branch, sub) for branch in node]
        kind = node.get("type")
        if kind == "array":
            return {"type": "array", "items": walk(node["items"], sub)}
        if kind == "map":
            return {"type": "map", "values": walk(node["values"], sub)}
        if kind == "record":
            name = node["name"]
            if name in seen:
                return name
            seen.add(name)
            fields = []
            for f in node["fields"]:
                if sub is not None and f["name"] not in sub:
                    continue
                out = {"name": f["name"], "type": walk(f["type"], sub.get(f["name"]) if sub else None)}
                if "default" in f:
                    out["default"] = f["default"]
                fields.append(out)
            return {"type": "record", "name": name, "fields": fields}
        if isinstance(kind, (dict, list)):
            return walk(kind, sub)
        return {k: v for k, v in node.items() if not k.startswith("__")}

    return walk({k: v for k, v in parsed.items() if not k.startswith("__")}, spec)


class SchemaRegistry:
    """The schemas this ingest understands, keyed by (family, version), and Rubin's schema ids.

    The folder layout is ``schemas/ztf/<version>/ztf.alert*.avsc`` and
    ``schemas/lsst/<version>/lsst.vX_Y.*.avsc``; adding a version is adding a folder."""

    def __init__(self, root: Path = SCHEMA_DIR):
        self.root = Path(root)
        self._by_key: dict[tuple[str, str], SchemaInfo] = {}
        self._by_id: dict[int, SchemaInfo] = {}
        for family, sub in _FAMILY_DIRS.items():
            base = self.root / sub
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir(), key=lambda p: _version_key(p.name)):
                if not d.is_dir():
                    continue
                sid = rubin_schema_id(d.name) if family == "rubin" else None
                info = SchemaInfo(family, d.name, d, sid)
                self._by_key[(family, d.name)] = info
                if sid is not None:
                    self._by_id[sid] = info

    def versions(self, family: str) -> list[str]:
        return [v for (f, v) in self._by_key if f == family]

    def supported(self, family: str | None = None) -> list[str]:
        """Human-readable list for error messages."""
        out = []
        for (f, v), info in self._by_key.items():
            if family is None or f == family:
                out.append(f"{f} {v}" + (f" (schema id {info.schema_id})" if info.schema_id else ""))
        return out

    def get(self, family: str, version: str) -> SchemaInfo:
        try:
            return self._by_key[(family, version)]
        except KeyError:
            raise UnknownSchemaError(
                f"{family} alert schema version {version!r} is not supported "
                f"(supported: {', '.join(self.versions(family)) or 'none'})",
                seen=f"{family} {version}",
                supported=self.supported(family),
            ) from None

    def by_id(self, schema_id: int) -> SchemaInfo:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise UnknownSchemaError(
                f"Confluent schema id {schema_id} is not a known Rubin alert schema "
                f"(known ids: {', '.join(str(i) for i in sorted(self._by_id))})",
                seen=f"schema id {schema_id}",
                supported=self.supported("rubin"),
            ) from None

    def latest(self, family: str) -> SchemaInfo:
        return self._by_key[(family, max(self.versions(family), key=_version_key))]


_REGISTRY: SchemaRegistry | None = None


def registry() -> SchemaRegistry:
    """The registry of the schemas shipped with dac-lake (built once)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = SchemaRegistry()
    return _REGISTRY


# ------------------------------------------------------------------------------------------- decoding


@dataclass
class DecodedAlert:
    """One decoded alert: its family, schema version, the (projected) record and where it came from."""

    family: str
    version: str
    record: dict[str, Any]
    position: Position | None = None


@dataclass
class Packet:
    """One alert as delivered, not yet (or already) decoded.

    ``raw`` is a standalone payload (a container file or a Confluent message). Records split out of a
    many-alert container file keep their bytes in ``record_bytes`` and build ``raw`` only when asked (a
    dead letter), and arrive decoded (``alert``) or with the ``error`` that stopped the split."""

    position: Position
    _raw: bytes | None = None
    record_bytes: bytes | None = None
    header: ContainerHeader | None = None
    alert: DecodedAlert | None = None
    error: AlertPacketError | None = None
    block: Block | None = None
    index_in_block: int = 0

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            assert self.header is not None and self.record_bytes is not None
            self._raw = self.header.single_record_file(self.record_bytes)
        return self._raw


@dataclass
class ContainerHeader:
    """The parsed header of an Avro container file and what the registry makes of its writer schema."""

    schema_json: bytes
    codec: str
    sync: bytes
    writer: dict[str, Any]
    family: str
    info: SchemaInfo | None  # Rubin: the registered version; ZTF: None (the version is in each record)
    reader: dict[str, Any]
    header_version: str | None = None
    metadata: dict[str, bytes] = field(default_factory=dict)

    def single_record_file(self, record: bytes) -> bytes:
        """A standalone container file holding one record (uncompressed), for dead letters."""
        out = io.BytesIO()
        out.write(CONTAINER_MAGIC)
        meta = {"avro.schema": self.schema_json, "avro.codec": b"null"}
        out.write(_zigzag(len(meta)))
        for k, v in meta.items():
            out.write(_zigzag(len(k)) + k.encode() + _zigzag(len(v)) + v)
        out.write(b"\x00" + self.sync + _zigzag(1) + _zigzag(len(record)) + record + self.sync)
        return out.getvalue()


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_long(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise BadPacketError("truncated Avro data (a varint runs past the end of the packet)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 63:
            raise BadPacketError("corrupt Avro data (a varint is longer than 10 bytes)")
    return (result >> 1) ^ -(result & 1), pos


class Decoder:
    """Decodes packets into :class:`DecodedAlert`; keeps parsed writer schemas so that one-alert-per-file
    replays (ZTF's archive layout) parse each distinct header schema once, not once per file."""

    def __init__(self, schema_registry: SchemaRegistry | None = None, *, validate: bool = True):
        self.registry = schema_registry or registry()
        self.validate = validate
        self._headers: dict[
            bytes, tuple[dict[str, Any], str, SchemaInfo | None, dict[str, Any], str | None]
        ] = {}

    # ---- container files
    def parse_header(self, data: bytes | memoryview) -> tuple[ContainerHeader, int]:
        if bytes(data[:4]) != CONTAINER_MAGIC:
            raise BadPacketError(
                "not an Avro container file (no 'Obj\\x01' magic)", seen=repr(bytes(data[:4]))
            )
        pos, meta = 4, {}
        while True:
            count, pos = _read_long(data, pos)
            if count == 0:
                break
            if count < 0:
                count = -count
                _, pos = _read_long(data, pos)
            for _ in range(count):
                klen, pos = _read_long(data, pos)
                key = bytes(data[pos : pos + klen]).decode("utf-8", "replace")
                pos += klen
                vlen, pos = _read_long(data, pos)
                if vlen < 0 or pos + vlen > len(data):
                    raise BadPacketError("truncated Avro container header")
                meta[key] = bytes(data[pos : pos + vlen])
                pos += vlen
        sync = bytes(data[pos : pos + SYNC_SIZE])
        if len(sync) != SYNC_SIZE:
            raise BadPacketError("truncated Avro container header (no sync marker)")
        pos += SYNC_SIZE
        schema_json = meta.get("avro.schema")
        if schema_json is None:
            raise BadPacketError("Avro container header has no avro.schema")
        codec = meta.get("avro.codec", b"null").decode()
        writer, family, info, reader, hversion = self._writer(schema_json)
        return ContainerHeader(schema_json, codec, sync, writer, family, info, reader, hversion, meta), pos

    def _writer(self, schema_json: bytes):
        hit = self._headers.get(schema_json)
        if hit is not None:
            return hit
        try:
            raw = json.loads(schema_json)
        except ValueError as e:
            raise BadPacketError(f"Avro container header schema is not JSON: {e}") from None
        name = raw.get("name", "") if isinstance(raw, dict) else ""
        ns = raw.get("namespace") if isinstance(raw, dict) else None
        full = name if "." in name or not ns else f"{ns}.{name}"
        hversion = raw.get("version") if isinstance(raw, dict) else None
        m = _RUBIN_NAME.match(full)
        if full == "ztf.alert":
            family, info = "ztf", None
            # every supported ZTF version shares the 4.02 projection (3.3 simply lacks fp_hists)
            reader = self.registry.latest("ztf").projection
        elif m:
            family = "rubin"
            info = self.registry.get("rubin", f"{int(m.group(1))}.{int(m.group(2))}")
            reader = info.projection
        else:
            raise UnknownSchemaError(
                f"writer schema {full or '(unnamed)'!r} is neither ZTF ('ztf.alert') nor Rubin "
                "('lsst.vX_Y.alert')",
                seen=full,
                supported=self.registry.supported(),
            )
        try:
            writer = fastavro.parse_schema(raw)
        except Exception as e:  # fastavro raises several types for bad schemas
            raise BadPacketError(f"writer schema in the container header does not parse: {e}") from None
        out = (writer, family, info, reader, str(hversion) if hversion is not None else None)
        self._headers[schema_json] = out
        return out

    def iter_container(self, data: bytes, source: str, start_index: int = 0) -> Iterator[Packet]:
        """The alerts of a container file as packets positioned (source, index), decoded as they are split.

        A file holding one record keeps its bytes as the packet's ``raw``. A record that fails to decode
        ends its block (Avro records carry no length, so the rest of the block cannot be delimited): the rest
        of the block becomes one dead packet; following blocks are read again from their sync markers."""
        try:
            header, pos = self.parse_header(data)
        except AlertPacketError as e:
            yield Packet(FilePosition(source, start_index), _raw=bytes(data), error=e)
            return
        index = 0
        view = memoryview(data)
        single = self._count_is_one(view, pos, header)
        while pos < len(data):
            try:
                count, pos = _read_long(view, pos)
                size, pos = _read_long(view, pos)
                if count < 0 or size < 0 or pos + size + SYNC_SIZE > len(data):
                    raise BadPacketError(f"truncated or corrupt Avro block at byte {pos} of {source}")
                block = bytes(view[pos : pos + size])
                if bytes(view[pos + size : pos + size + SYNC_SIZE]) != header.sync:
                    raise BadPacketError(
                        f"Avro block at byte {pos} of {source} does not end with the "
                        "file's sync marker (corrupt or truncated)"
                    )
            except AlertPacketError as e:
                yield Packet(FilePosition(source, index), _raw=bytes(view[pos:]), error=e)
                return
            pos += size + SYNC_SIZE
            block = self._decompress(block, header)
            bio = io.BytesIO(block)
            for k in range(count):
                start = bio.tell()
                position = FilePosition(source, index)
                try:
                    rec = self._read_record(bio, header.writer, header.reader)
                    alert = self._accept(header.family, header.info, rec, position)
                except AlertPacketError as e:
                    rest = block[start:]
                    if index >= start_index:
                        yield Packet(
                            position,
                            record_bytes=rest,
                            header=header,
                            error=e,
                            _raw=bytes(data) if single else None,
                        )
                    index += count - k
                    break
                if index >= start_index:
                    end = bio.tell()
                    yield Packet(
                        position,
                        _raw=bytes(data) if single else None,
                        record_bytes=None if single else block[start:end],
                        header=header,
                        alert=alert,
                    )
                index += 1
            else:
                if bio.tell() != len(block):
                    e = BadPacketError(
                        f"{len(block) - bio.tell()} unexplained bytes after the last record of a "
                        f"block in {source} (corrupt block)"
                    )
                    yield Packet(
                        FilePosition(source, index), record_bytes=block[bio.tell() :], header=header, error=e
                    )

    @staticmethod
    def _count_is_one(view: memoryview, pos: int, header: ContainerHeader) -> bool:
        try:
            count, p = _read_long(view, pos)
            size, p = _read_long(view, p)
            return count == 1 and p + size + SYNC_SIZE == len(view)
        except AlertPacketError:
            return False

    @staticmethod
    def _decompress(block: bytes, header: ContainerHeader) -> bytes:
        if header.codec == "null":
            return block
        if header.codec == "deflate":
            try:
                return zlib.decompress(block, -15)
            except zlib.error as e:
                raise BadPacketError(f"deflate block does not decompress: {e}") from None
        raise BadPacketError(
            f"Avro codec {header.codec!r} is not supported by the alert reader",
            seen=header.codec,
            supported=["null", "deflate"],
        )

    # ---- single payloads (Kafka messages)
    def decode_payload(self, raw: bytes, position: Position | None = None) -> list[DecodedAlert]:
        """Decode one Kafka message value: a container file (ZTF) or a Confluent-framed record (Rubin)."""
        raw = bytes(raw)
        if len(raw) >= 4 and raw[:4] == CONTAINER_MAGIC:
            alerts = []
            for packet in self.iter_container(raw, "<payload>"):
                if packet.error is not None:
                    raise packet.error
                assert packet.alert is not None
                packet.alert.position = position
                alerts.append(packet.alert)
            if not alerts:
                raise BadPacketError("Avro container payload holds no alert")
            return alerts
        if len(raw) >= 5 and raw[0] == CONFLUENT_MAGIC:
            (schema_id,) = struct.unpack(">I", raw[1:5])
            info = self.registry.by_id(schema_id)
            bio = io.BytesIO(raw[5:])
            rec = self._read_record(bio, info.schema, info.projection)
            left = len(raw) - 5 - bio.tell()
            if left:
                raise BadPacketError(
                    f"{left} bytes left after the {info.label} record (corrupt payload, or "
                    f"written with another schema than id {schema_id})",
                    seen=info.label,
                )
            return [self._accept("rubin", info, rec, position)]
        raise BadPacketError(
            "packet is neither an Avro container (magic 'Obj\\x01') nor Confluent wire format (magic byte 0 "
            "+ 4-byte schema id)",
            seen=repr(bytes(raw[:8])),
            supported=["Avro container file", "Confluent wire format"],
        )

    def decode(self, packet: Packet) -> DecodedAlert:
        """The alert of a packet (decoding its raw bytes if the source did not already)."""
        if packet.error is not None:
            raise packet.error
        if packet.alert is not None:
            return packet.alert
        alerts = self.decode_payload(packet.raw, packet.position)
        if len(alerts) != 1:
            raise BadPacketError(f"payload holds {len(alerts)} alerts where one was expected")
        packet.alert = alerts[0]
        return alerts[0]

    @staticmethod
    def _read_record(bio: io.BytesIO, writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, Any]:
        try:
            return fastavro.schemaless_reader(bio, writer, reader)
        except AlertPacketError:
            raise
        except Exception as e:  # EOFError, UnicodeDecodeError, IndexError, SchemaResolutionError, ...
            raise BadPacketError(f"Avro record does not decode ({type(e).__name__}: {e})") from None

    def _accept(
        self, family: str, info: SchemaInfo | None, rec: dict[str, Any], position: Position | None
    ) -> DecodedAlert:
        if family == "ztf":
            version = rec.get("schemavsn")
            info = self.registry.get("ztf", str(version))
        assert info is not None
        if self.validate:
            (_check_ztf if family == "ztf" else _check_rubin)(rec)
        return DecodedAlert(family, info.version, rec, position)


def _bad_position(ra: Any, dec: Any) -> bool:
    return not (
        isinstance(ra, float) and isinstance(dec, float) and 0.0 <= ra <= 360.0 and -90.0 <= dec <= 90.0
    )


def _check_ztf(rec: dict[str, Any]) -> None:
    """Refuse records whose essentials are impossible: random bytes sometimes decode as Avro."""
    c = rec.get("candidate") or {}
    if not rec.get("objectId") or _bad_position(c.get("ra"), c.get("dec")):
        raise BadPacketError(
            f"ZTF alert without a usable objectId/position (objectId={rec.get('objectId')!r}, "
            f"ra={c.get('ra')!r}, dec={c.get('dec')!r})"
        )
    if c.get("fid") not in (1, 2, 3) or not 2_400_000.0 < (c.get("jd") or 0.0) < 2_600_000.0:
        raise BadPacketError(f"ZTF alert with impossible fid={c.get('fid')!r} or jd={c.get('jd')!r}")


def _check_rubin(rec: dict[str, Any]) -> None:
    s = rec.get("diaSource") or {}
    if _bad_position(s.get("ra"), s.get("dec")):
        raise BadPacketError(
            f"Rubin alert with an impossible position (ra={s.get('ra')!r}, dec={s.get('dec')!r})"
        )
    if s.get("diaObjectId") is None and s.get("ssObjectId") is None:
        raise BadPacketError("Rubin diaSource belongs to neither a diaObject nor an ssObject")
    if not 30_000.0 < (s.get("midpointMjdTai") or 0.0) < 100_000.0:
        raise BadPacketError(f"Rubin alert with an impossible midpointMjdTai={s.get('midpointMjdTai')!r}")


def confluent_frame(schema_id: int, record_bytes: bytes) -> bytes:
    """Confluent wire format: magic byte 0, 4-byte big-endian schema id, the schemaless Avro record."""
    return struct.pack(">bI", CONFLUENT_MAGIC, schema_id) + record_bytes


# ----------------------------------------------------------------------------------------- dead letters


class DeadLetter:
    """A folder of packets the ingest refused: ``<name>.avro`` (the raw bytes) + ``<name>.json`` (why).

    Names derive from the source position and the content hash, so a re-delivered bad packet overwrites its
    own entry instead of piling up duplicates. The JSON is written last (both via rename), so an entry with
    a reason file always has its complete bytes."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    def put(self, raw: bytes, source_position: Position | None, reason: str | AlertPacketError) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(raw).hexdigest()
        if isinstance(source_position, KafkaPosition):
            stem = f"{source_position.topic}-{source_position.partition}-{source_position.offset}"
        elif isinstance(source_position, FilePosition):
            stem = f"{Path(source_position.file).name}-{source_position.index}"
        else:
            stem = "packet"
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:120] + "-" + digest[:12]
        info: dict[str, Any] = (
            reason.as_dict()
            if isinstance(reason, AlertPacketError)
            else {"error": "rejected", "reason": str(reason)}
        )
        info.update(
            {
                "position": position_to_json(source_position) if source_position else None,
                "bytes": len(raw),
                "sha256": digest,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "payload": f"{stem}.avro",
            }
        )
        for suffix, content in ((".avro", raw), (".json", json.dumps(info, indent=1).encode())):
            tmp = self.folder / f".{stem}{suffix}.tmp"
            tmp.write_bytes(content)
            os.replace(tmp, self.folder / f"{stem}{suffix}")
        return self.folder / f"{stem}.json"

    def entries(self) -> list[dict[str, Any]]:
        """The reasons on file (each with ``payload`` naming the bytes next to it), oldest name first."""
        if not self.folder.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))]


# ------------------------------------------------------------------------------- columnar fast path
#
# fastavro builds a Python dict per record and per history entry: ~600-1,400 alerts/s per core for packets
# with realistic histories, far from the 5,000 alerts/s the broker needs. The fast path compiles each writer
# schema once into a tiny program (read this varint into column k of table t, skip that float, loop over this
# array, ...) that a numba-compiled loop runs over the raw bytes of a whole batch, writing straight into
# numpy columns: the alert table, plus one child table per captured array (prv_candidates, prvDiaSources...)
# whose rows point at their parent row. Strings are kept as (offset, length) into the batch buffer.

(
    OP_DONE,
    OP_SKIP_VARINT,
    OP_SKIP_FIXED,
    OP_SKIP_BYTES,
    OP_RD_LONG,
    OP_RD_FLOAT,
    OP_RD_DOUBLE,
    OP_RD_BOOL,
    OP_RD_STR,
    OP_UNION,
    OP_TARGET,
    OP_JMP,
    OP_ARR_BEGIN,
    OP_ARR_END,
) = range(14)
ERR_TRUNCATED, ERR_UNION, ERR_LENGTH, ERR_TRAILING, ERR_LOST, ERR_DEPTH = 1, 2, 3, 4, 5, 6
VM_ERRORS = {
    ERR_TRUNCATED: "the record runs past the end of its bytes (truncated or corrupt)",
    ERR_UNION: "a union branch index is out of range (corrupt, or written with another schema)",
    ERR_LENGTH: "a negative length or count (corrupt)",
    ERR_TRAILING: "bytes are left after the record (corrupt, or written with another schema)",
    ERR_LOST: "an earlier record of the same Avro block did not decode, so this one cannot be delimited",
    ERR_DEPTH: "arrays nested too deeply",
}


@dataclass
class Program:
    """A writer schema compiled for the columnar decoder, for one projection spec."""

    code: Any  # int64[n, 4]: op, a, b, c
    tables: list[str]  # '' = the alert table, else the array's path ('prv_candidates')
    parents: list[int]
    columns: dict[tuple[int, str], tuple[str, int, int]]  # (table, path) -> (kind i|f|s, column, mask row)
    n_int: int
    n_float: int
    n_mask: int
    parent_col: list[int]  # int column holding each child table's parent row (-1 for the alert table)
    mask_table: list[int]


def compile_program(writer: dict[str, Any], spec: dict[str, Any]) -> Program:
    """Compile a parsed writer schema: fields named in ``spec`` become columns, everything else is skipped."""
    import numpy as np

    named = writer.get("__named_schemas", {})
    code: list[list[int]] = []
    tables, parents, parent_col, mask_table = [""], [-1], [-1], []
    columns: dict[tuple[int, str], tuple[str, int, int]] = {}
    counts = {"i": 0, "f": 0, "m": 0}

    def emit(op: int, a: int = 0, b: int = 0, c: int = 0) -> int:
        code.append([op, a, b, c])
        return len(code) - 1

    def column(table: int, path: str, kind: str) -> tuple[str, int, int]:
        key = (table, path)
        if key not in columns:
            width = 2 if kind == "s" else 1
            store = "f" if kind == "f" else "i"
            columns[key] = (kind, counts[store], counts["m"])
            counts[store] += width
            counts["m"] += 1
            mask_table.append(table)
        return columns[key]

    def gen(t: Any, table: int, path: str, sub: Any, capture: bool) -> None:
        if isinstance(t, str) and t in named:
            t = named[t]
        if isinstance(t, list):
            emit(OP_UNION, len(t))
            targets = [emit(OP_TARGET) for _ in t]
            jumps = []
            for i, branch in enumerate(t):
                code[targets[i]][1] = len(code)
                gen(branch, table, path, sub, capture)
                jumps.append(emit(OP_JMP))
            for j in jumps:
                code[j][1] = len(code)
            return
        if isinstance(t, dict):
            kind = t["type"]
            if kind == "record":
                for f in t["fields"]:
                    name = f["name"]
                    fpath = f"{path}.{name}" if path else name
                    take = capture and (sub is None or name in sub)
                    gen(
                        f["type"],
                        table,
                        fpath,
                        sub.get(name) if take and sub else None,
                        take if sub is not None else capture,
                    )
                return
            if kind in ("array", "map"):
                child = -1
                if capture and isinstance(sub, dict) and kind == "array" and table >= 0:
                    child = len(tables)
                    tables.append(path)
                    parents.append(table)
                    parent_col.append(counts["i"])
                    counts["i"] += 1
                begin = emit(OP_ARR_BEGIN, child)
                if kind == "map":
                    emit(OP_SKIP_BYTES)
                item = t["items"] if kind == "array" else t["values"]
                gen(item, child, "", sub if child >= 0 else None, child >= 0)
                emit(OP_ARR_END, begin)
                code[begin][2] = len(code)
                return
            if kind == "enum":
                emit(OP_SKIP_VARINT)
                return
            if kind == "fixed":
                emit(OP_SKIP_FIXED, int(t["size"]))
                return
            gen(kind, table, path, sub, capture)
            return
        if t == "null":
            return
        if not capture or table < 0:
            if t in ("int", "long", "enum"):
                emit(OP_SKIP_VARINT)
            elif t in ("float", "double", "boolean"):
                emit(OP_SKIP_FIXED, {"float": 4, "double": 8, "boolean": 1}[t])
            elif t in ("string", "bytes"):
                emit(OP_SKIP_BYTES)
            else:
                raise UnknownSchemaError(
                    f"Avro type {t!r} is not supported by the columnar decoder", seen=str(t)
                )
            return
        if t in ("int", "long"):
            _, col, m = column(table, path, "i")
            emit(OP_RD_LONG, table, col, m)
        elif t == "boolean":
            _, col, m = column(table, path, "b")
            emit(OP_RD_BOOL, table, col, m)
        elif t in ("float", "double"):
            _, col, m = column(table, path, "f")
            emit(OP_RD_FLOAT if t == "float" else OP_RD_DOUBLE, table, col, m)
        elif t in ("string", "bytes"):
            _, col, m = column(table, path, "s")
            emit(OP_RD_STR, table, col, m)
        else:
            raise UnknownSchemaError(f"Avro type {t!r} is not supported by the columnar decoder", seen=str(t))

    root = {k: v for k, v in writer.items() if not k.startswith("__")}
    gen(root, 0, "", spec, True)
    emit(OP_DONE)
    return Program(
        np.asarray(code, dtype=np.int64).reshape(-1, 4),
        tables,
        parents,
        columns,
        counts["i"],
        counts["f"],
        counts["m"],
        parent_col,
        mask_table,
    )


_VM = None


def _vm():
    """The numba-compiled interpreter (compiled on first use, cached on disk next to this module)."""
    global _VM
    if _VM is not None:
        return _VM
    import numba
    import numpy as np

    @numba.njit(cache=True, nogil=True, inline="always")
    def varint(buf, pos, end):
        shift = 0
        acc = np.uint64(0)
        while True:
            if pos >= end or shift > 63:
                return np.int64(0), pos, False
            b = buf[pos]
            pos += 1
            acc |= np.uint64(b & 0x7F) << np.uint64(shift)
            if b < 0x80:
                break
            shift += 7
        return np.int64(acc >> np.uint64(1)) ^ -np.int64(acc & np.uint64(1)), pos, True

    @numba.njit(cache=True, nogil=True)
    def run(
        code,
        buf,
        seg_start,
        seg_end,
        seg_count,
        ints,
        floats,
        masks,
        nrows,
        cap,
        parent_col,
        parents,
        mask_table,
        status,
        rec_end,
    ):
        ntab = nrows.shape[0]
        cur = np.zeros(ntab, np.int64)
        saved = np.zeros(ntab, np.int64)
        st_left = np.zeros(64, np.int64)
        st_begin = np.zeros(64, np.int64)
        u32 = np.zeros(1, np.uint32)
        u64 = np.zeros(1, np.uint64)
        f32 = u32.view(np.float32)
        f64 = u64.view(np.float64)
        g = 0
        for s in range(seg_start.shape[0]):
            pos = seg_start[s]
            end = seg_end[s]
            n = seg_count[s]
            failed = False
            for _k in range(n):
                if failed:
                    status[g] = 5
                    g += 1
                    continue
                cur[0] = g
                for t in range(ntab):
                    saved[t] = nrows[t]
                err = 0
                pc = 0
                sp = 0
                while err == 0:
                    op = code[pc, 0]
                    if op == 0:
                        break
                    if op == 1 or op == 4:
                        v, pos, ok = varint(buf, pos, end)
                        if not ok:
                            err = 1
                        elif op == 4:
                            t = code[pc, 1]
                            ints[code[pc, 2], cur[t]] = v
                            masks[code[pc, 3], cur[t]] = 0
                        pc += 1
                    elif op == 7:
                        if pos >= end:
                            err = 1
                        else:
                            t = code[pc, 1]
                            ints[code[pc, 2], cur[t]] = buf[pos]
                            masks[code[pc, 3], cur[t]] = 0
                            pos += 1
                        pc += 1
                    elif op == 2:
                        if pos + code[pc, 1] > end:
                            err = 1
                        pos += code[pc, 1]
                        pc += 1
                    elif op == 5:
                        if pos + 4 > end:
                            err = 1
                        else:
                            u32[0] = (
                                np.uint32(buf[pos])
                                | (np.uint32(buf[pos + 1]) << np.uint32(8))
                                | (np.uint32(buf[pos + 2]) << np.uint32(16))
                                | (np.uint32(buf[pos + 3]) << np.uint32(24))
                            )
                            t = code[pc, 1]
                            floats[code[pc, 2], cur[t]] = f32[0]
                            masks[code[pc, 3], cur[t]] = 0
                            pos += 4
                        pc += 1
                    elif op == 6:
                        if pos + 8 > end:
                            err = 1
                        else:
                            acc = np.uint64(0)
                            for j in range(8):
                                acc |= np.uint64(buf[pos + j]) << np.uint64(8 * j)
                            u64[0] = acc
                            t = code[pc, 1]
                            floats[code[pc, 2], cur[t]] = f64[0]
                            masks[code[pc, 3], cur[t]] = 0
                            pos += 8
                        pc += 1
                    elif op == 3 or op == 8:
                        v, pos, ok = varint(buf, pos, end)
                        if not ok:
                            err = 1
                        elif v < 0:
                            err = 3
                        elif pos + v > end:
                            err = 1
                        else:
                            if op == 8:
                                t = code[pc, 1]
                                ints[code[pc, 2], cur[t]] = pos
                                ints[code[pc, 2] + 1, cur[t]] = v
                                masks[code[pc, 3], cur[t]] = 0
                            pos += v
                        pc += 1
                    elif op == 9:
                        v, pos, ok = varint(buf, pos, end)
                        if not ok:
                            err = 1
                        elif v < 0 or v >= code[pc, 1]:
                            err = 2
                        else:
                            pc = code[pc + 1 + v, 1]
                    elif op == 11:
                        pc = code[pc, 1]
                    elif op == 12 or op == 13:
                        if op == 13:
                            begin = st_begin[sp - 1]
                            st_left[sp - 1] -= 1
                            more = st_left[sp - 1] > 0
                        else:
                            begin = pc
                            more = False
                        if not more:  # read the next block count
                            v, pos, ok = varint(buf, pos, end)
                            if not ok:
                                err = 1
                                break
                            if v < 0:
                                v = -v
                                _size, pos, ok = varint(buf, pos, end)
                                if not ok:
                                    err = 1
                                    break
                            if v == 0:
                                if op == 13:
                                    sp -= 1
                                    pc += 1
                                else:
                                    pc = code[pc, 2]
                                continue
                            if op == 12:
                                if sp >= 64:
                                    err = 6
                                    break
                                st_begin[sp] = pc
                                sp += 1
                            st_left[sp - 1] = v
                        t = code[begin, 1]
                        if t >= 0:
                            if nrows[t] >= cap:
                                return 1, s
                            r = nrows[t]
                            nrows[t] += 1
                            cur[t] = r
                            ints[parent_col[t], r] = cur[parents[t]]
                        pc = begin + 1
                    else:
                        err = 98
                if err != 0:
                    status[g] = err
                    for m in range(mask_table.shape[0]):
                        t = mask_table[m]
                        if t > 0:
                            for r in range(saved[t], nrows[t]):
                                masks[m, r] = 1
                        else:
                            masks[m, g] = 1
                    for t in range(ntab):
                        nrows[t] = saved[t]
                    failed = True
                else:
                    rec_end[g] = pos
                g += 1
            if not failed and n > 0 and pos != end:
                status[g - 1] = 4
        return 0, 0

    _VM = run
    return run


@dataclass
class Block:
    """One Avro block (or Confluent record) of a packet: ``count`` back-to-back records in ``data``."""

    data: bytes
    count: int
    writer: dict[str, Any]
    family: str
    info: SchemaInfo | None
    header: ContainerHeader | None = None
    source: str = ""


@dataclass
class DecodedTables:
    """Columns decoded from a batch, per family: the alert table and one child table per captured array.

    Every table has ``__record`` (index of the packet in the batch); child tables also ``__parent`` (row of
    the parent table). Column names are field paths ('candidate.jd', 'objectId'); a field absent from a
    writer's schema version is an all-null column."""

    family: str
    tables: dict[str, Any]  # '' -> alert table, 'prv_candidates' -> ..., as pyarrow Tables
    versions: Any  # pyarrow string array: schema version per alert row
    packets: list[Packet]


@dataclass
class BatchResult:
    decoded: dict[str, DecodedTables]
    dead: list[tuple[Packet, AlertPacketError]]


class BatchDecoder:
    """Decodes a whole batch of packets into columns with the compiled per-schema programs."""

    def __init__(self, schema_registry: SchemaRegistry | None = None):
        self.decoder = Decoder(schema_registry)
        self.registry = self.decoder.registry
        self._programs: dict[int, Program] = {}

    def program(self, writer: dict[str, Any], family: str) -> Program:
        key = id(writer)
        prog = self._programs.get(key)
        if prog is None:
            spec = ZTF_PROJECTION if family == "ztf" else RUBIN_PROJECTION
            prog = self._programs[key] = compile_program(writer, spec)
        return prog

    def blocks(self, packet: Packet) -> list[Block]:
        """The blocks of a packet; raises for packets that are not Avro alerts at all."""
        if packet.block is not None:
            return [packet.block]
        raw = packet.raw
        if raw[:4] == CONTAINER_MAGIC:
            header, pos = self.decoder.parse_header(raw)
            out = []
            view = memoryview(raw)
            while pos < len(raw):
                count, pos = _read_long(view, pos)
                size, pos = _read_long(view, pos)
                if (
                    count < 0
                    or size < 0
                    or pos + size + SYNC_SIZE > len(raw)
                    or raw[pos + size : pos + size + SYNC_SIZE] != header.sync
                ):
                    raise BadPacketError("truncated or corrupt Avro block (bad size or sync marker)")
                data = self.decoder._decompress(raw[pos : pos + size], header)
                out.append(Block(data, count, header.writer, header.family, header.info, header))
                pos += size + SYNC_SIZE
            if sum(b.count for b in out) == 0:
                raise BadPacketError("Avro container payload holds no alert")
            return out
        if len(raw) >= 5 and raw[0] == CONFLUENT_MAGIC:
            (schema_id,) = struct.unpack(">I", raw[1:5])
            info = self.registry.by_id(schema_id)
            return [Block(raw[5:], 1, info.schema, "rubin", info)]
        raise BadPacketError(
            "packet is neither an Avro container (magic 'Obj\\x01') nor Confluent wire format (magic byte 0 "
            "+ 4-byte schema id)",
            seen=repr(bytes(raw[:8])),
            supported=["Avro container file", "Confluent wire format"],
        )

    def decode(self, packets: list[Packet]) -> BatchResult:

        dead: list[tuple[Packet, AlertPacketError]] = []
        # (writer id) -> list of (block, [(record index in block, packet index)])
        groups: dict[int, dict[int, tuple[Block, list[tuple[int, int]]]]] = {}
        for i, p in enumerate(packets):
            if p.error is not None:
                dead.append((p, p.error))
                continue
            try:
                blocks = self.blocks(p)
            except AlertPacketError as e:
                dead.append((p, e))
                continue
            if p.block is not None:
                wanted = [(p.index_in_block, i)]
            elif len(blocks) == 1 and blocks[0].count == 1:
                wanted = [(0, i)]
            else:
                dead.append(
                    (
                        p,
                        BadPacketError(
                            f"payload holds {sum(b.count for b in blocks)} alerts where one "
                            "was expected (split it with FileSource)"
                        ),
                    )
                )
                continue
            b = blocks[0]
            groups.setdefault(id(b.writer), {}).setdefault(id(b), (b, []))[1].extend(wanted)
        per_family: dict[str, list[tuple[dict[str, Any], Any, list[int]]]] = {}
        for by_block in groups.values():
            blocks = list(by_block.values())
            family = blocks[0][0].family
            prog = self.program(blocks[0][0].writer, family)
            tables, status, starts, _ends, rec_packet = self._run(prog, blocks, packets)
            for g, pi in enumerate(rec_packet):
                if pi < 0:
                    continue
                if status[g] != 0:
                    blk = blocks[self._block_of(g, blocks)][0]
                    p = packets[pi]
                    if p._raw is None and blk.header is not None:
                        p.record_bytes, p.header = blk.data[starts[g] :], blk.header
                    reason = VM_ERRORS.get(int(status[g]), f"decoder status {int(status[g])}")
                    dead.append((p, BadPacketError(f"Avro record does not decode: {reason}")))
            per_family.setdefault(family, []).append((tables, status, rec_packet))
        decoded = {}
        for family, parts in per_family.items():
            tables = self._assemble(family, parts, packets, dead)
            bad = self._validate(tables, packets, dead)
            if bad:
                tables = self._drop(tables, bad)
            if tables.tables[""].num_rows:
                decoded[family] = tables
        return BatchResult(decoded, dead)

    def _validate(self, t: DecodedTables, packets: list[Packet], dead) -> set[int]:
        """Unknown ZTF schema versions and impossible values (random bytes can decode as Avro) -> dead."""
        import numpy as np
        import pyarrow.compute as pc

        a = t.tables[""]
        rec = np.asarray(a["__record"])
        bad: dict[int, AlertPacketError] = {}
        if t.family == "ztf":
            known = set(self.registry.versions("ztf"))
            for r, v in zip(rec, t.versions.to_pylist(), strict=True):
                if v not in known:
                    bad[int(r)] = UnknownSchemaError(
                        f"ztf alert schema version {v!r} (schemavsn) is not supported "
                        f"(supported: {', '.join(sorted(known))})",
                        seen=f"ztf {v}",
                        supported=self.registry.supported("ztf"),
                    )
            ra, dec = a["candidate.ra"], a["candidate.dec"]
            jd = np.asarray(a["candidate.jd"].fill_null(0.0))
            fid = np.asarray(a["candidate.fid"].fill_null(0))
            oid_ok = np.asarray(pc.fill_null(pc.greater(pc.utf8_length(a["objectId"]), 0), False))
            time_ok = (jd > 2_400_000.0) & (jd < 2_600_000.0) & np.isin(fid, [1, 2, 3]) & oid_ok
            what = "ZTF alert with an impossible objectId, fid, jd or position"
        else:
            ra, dec = a["diaSource.ra"], a["diaSource.dec"]
            mjd = np.asarray(a["diaSource.midpointMjdTai"].fill_null(0.0))
            owner = np.asarray(
                pc.or_(pc.is_valid(a["diaSource.diaObjectId"]), pc.is_valid(a["diaSource.ssObjectId"]))
            )
            time_ok = (mjd > 30_000.0) & (mjd < 100_000.0) & owner
            what = "Rubin alert with an impossible midpointMjdTai or position, or no diaObject/ssObject"
        ra_ = np.asarray(ra.fill_null(np.nan))
        dec_ = np.asarray(dec.fill_null(np.nan))
        ok = time_ok & (ra_ >= 0.0) & (ra_ <= 360.0) & (dec_ >= -90.0) & (dec_ <= 90.0)
        for r in rec[~ok]:
            bad.setdefault(int(r), BadPacketError(what, seen=f"{t.family} alert"))
        for r, e in bad.items():
            dead.append((packets[r], e))
        return set(bad)

    @staticmethod
    def _drop(t: DecodedTables, bad: set[int]) -> DecodedTables:
        import pyarrow as pa
        import pyarrow.compute as pc

        bad_arr = pa.array(sorted(bad), pa.int64())
        tables = {}
        for name, tab in t.tables.items():
            tables[name] = tab.filter(pc.invert(pc.is_in(tab["__record"], value_set=bad_arr)))
        keep = pc.invert(pc.is_in(t.tables[""]["__record"], value_set=bad_arr))
        return DecodedTables(t.family, tables, t.versions.filter(keep), t.packets)

    @staticmethod
    def _block_of(g: int, blocks: list[tuple[Block, list[tuple[int, int]]]]) -> int:
        n = 0
        for j, (b, _) in enumerate(blocks):
            n += b.count
            if g < n:
                return j
        return len(blocks) - 1

    def _run(self, prog: Program, blocks, packets):
        import numpy as np

        buf = np.frombuffer(b"".join(b.data for b, _ in blocks), dtype=np.uint8)
        seg_count = np.array([b.count for b, _ in blocks], dtype=np.int64)
        lens = np.array([len(b.data) for b, _ in blocks], dtype=np.int64)
        seg_end = np.cumsum(lens)
        seg_start = seg_end - lens
        n = int(seg_count.sum())
        rec_packet = np.full(n, -1, dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(seg_count)[:-1]]).astype(np.int64)
        for j, (_b, wanted) in enumerate(blocks):
            for k, pi in wanted:
                if 0 <= k < seg_count[j]:
                    rec_packet[base[j] + k] = pi
        cap = max(n, 1) * 32
        run = _vm()
        while True:
            ntab = len(prog.tables)
            ints = np.zeros((max(prog.n_int, 1), max(cap, n)), dtype=np.int64)
            floats = np.full((max(prog.n_float, 1), max(cap, n)), np.nan, dtype=np.float64)
            masks = np.ones((max(prog.n_mask, 1), max(cap, n)), dtype=np.uint8)
            nrows = np.zeros(ntab, dtype=np.int64)
            nrows[0] = n
            status = np.zeros(n, dtype=np.int64)
            rec_end = np.zeros(n, dtype=np.int64)
            over, _ = run(
                prog.code,
                buf,
                seg_start,
                seg_end,
                seg_count,
                ints,
                floats,
                masks,
                nrows,
                max(cap, n),
                np.array(prog.parent_col, dtype=np.int64),
                np.array(prog.parents, dtype=np.int64),
                np.array(prog.mask_table, dtype=np.int64),
                status,
                rec_end,
            )
            if not over:
                break
            cap *= 4
        # record start offsets inside their block (for dead letters of split records)
        starts = np.zeros(n, dtype=np.int64)
        for j in range(len(blocks)):
            lo, hi = base[j], base[j] + seg_count[j]
            if hi > lo:
                starts[lo] = 0
                starts[lo + 1 : hi] = rec_end[lo : hi - 1] - seg_start[j]
        tables = {}
        for t, name in enumerate(prog.tables):
            rows = n if t == 0 else int(nrows[t])
            cols = {}
            for (tt, path), (kind, col, m) in prog.columns.items():
                if tt != t:
                    continue
                mask = masks[m, :rows].astype(bool)
                if kind == "f":
                    cols[path] = ("f", floats[col, :rows], mask)
                elif kind in ("i", "b"):
                    cols[path] = (kind, ints[col, :rows], mask)
                else:
                    strings = _gather_strings(buf, ints[col, :rows], ints[col + 1, :rows], mask)
                    cols[path] = ("s", strings, mask)
            if t > 0:
                cols["__parent"] = ("p", ints[prog.parent_col[t], :rows].copy(), None)
            tables[name] = (cols, rows, prog.parents[t])
        return tables, status, starts, rec_end, rec_packet

    def _assemble(self, family, parts, packets, dead) -> DecodedTables:
        """Join the groups of one family into pyarrow tables, keeping good records that were asked for."""
        import numpy as np
        import pyarrow as pa

        spec_names: dict[str, dict[str, str]] = {}
        chunks: dict[str, list[dict[str, Any]]] = {}
        for tables, status, rec_packet in parts:
            keep_rec = (status == 0) & (rec_packet >= 0)
            root_of: dict[str, Any] = {"": np.arange(len(status))}
            order = sorted(tables, key=lambda nme: nme.count(".") if nme else -1)
            for name in order:
                cols, _rows, parent = tables[name]
                if name == "":
                    root = root_of[""]
                else:
                    parent_name = list(tables)[parent]
                    root = root_of[parent_name][cols["__parent"][1]]
                    root_of[name] = root
                keep = keep_rec[root]
                out: dict[str, Any] = {"__record": pa.array(rec_packet[root][keep], pa.int64())}
                for path, (kind, values, mask) in cols.items():
                    if path == "__parent":
                        continue
                    m = mask[keep]
                    if kind == "f":
                        out[path] = pa.array(values[keep], pa.float64(), mask=m)
                    elif kind == "i":
                        out[path] = pa.array(values[keep], pa.int64(), mask=m)
                    elif kind == "b":
                        out[path] = pa.array(values[keep].astype(bool), pa.bool_(), mask=m)
                    else:
                        out[path] = values.filter(pa.array(keep))
                    spec_names.setdefault(name, {})[path] = kind
                chunks.setdefault(name, []).append(out)
        types = {"f": pa.float64(), "i": pa.int64(), "b": pa.bool_(), "s": pa.string()}
        result = {}
        for name, pieces in chunks.items():
            cols_all = spec_names.get(name, {})
            tabs = []
            for piece in pieces:
                n = len(piece["__record"])
                data = {"__record": piece["__record"]}
                for path, kind in cols_all.items():
                    data[path] = piece.get(path, pa.nulls(n, types[kind]))
                tabs.append(pa.table(data))
            result[name] = pa.concat_tables(tabs) if len(tabs) > 1 else tabs[0]
        alerts = result[""]
        if family == "ztf":
            versions = alerts["schemavsn"]
        else:
            rec = np.asarray(alerts["__record"])
            versions = pa.array([self._rubin_version(packets[r]) for r in rec], pa.string())
        return DecodedTables(family, result, versions, packets)

    @staticmethod
    def _rubin_version(packet: Packet) -> str:
        blk = packet.block
        if blk is not None and blk.info is not None:
            return blk.info.version
        raw = packet.raw
        if raw[:1] == b"\x00":
            return registry().by_id(struct.unpack(">I", raw[1:5])[0]).version
        m = _RUBIN_NAME.match(json.loads(Decoder().parse_header(raw)[0].schema_json).get("name", ""))
        return f"{m.group(1)}.{m.group(2)}" if m else "?"


def _gather_strings(buf, offs, lens, mask):
    """A pyarrow string array from (offset, length) pairs into ``buf``, without a Python loop."""
    import numpy as np
    import pyarrow as pa

    lens = np.where(mask, 0, lens)
    total = int(lens.sum())
    out_offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_offsets[1:])
    if total:
        idx = np.repeat(offs - out_offsets[:-1], lens) + np.arange(total, dtype=np.int64)
        data = buf[idx]
    else:
        data = np.zeros(0, dtype=np.uint8)
    validity = pa.array(~mask).buffers()[1] if mask.any() else None
    return pa.LargeStringArray.from_buffers(
        len(lens),
        pa.py_buffer(out_offsets.tobytes()),
        pa.py_buffer(data.tobytes()),
        validity,
        int(mask.sum()),
    ).cast(pa.string())


def split_container(
    data: bytes, source: str, start_index: int = 0, decoder: Decoder | None = None
) -> Iterator[Packet]:
    """The alerts of a container file as packets (source, index) pointing into their block, not decoded.

    Framing errors (bad header, truncated block, wrong sync marker) give one dead packet holding the rest
    of the file; the blocks before it are still delivered."""
    decoder = decoder or Decoder()
    try:
        header, pos = decoder.parse_header(data)
    except AlertPacketError as e:
        if start_index == 0:
            yield Packet(FilePosition(source, 0), _raw=bytes(data), error=e)
        return
    view = memoryview(data)
    index = 0
    single = Decoder._count_is_one(view, pos, header)
    while pos < len(data):
        try:
            count, p = _read_long(view, pos)
            size, p = _read_long(view, p)
            if count <= 0 or size < 0 or p + size + SYNC_SIZE > len(data):
                raise BadPacketError(f"truncated or corrupt Avro block at byte {pos} of {source}")
            if bytes(view[p + size : p + size + SYNC_SIZE]) != header.sync:
                raise BadPacketError(
                    f"Avro block at byte {pos} of {source} does not end with the file's sync "
                    "marker (corrupt or truncated)"
                )
            block = Block(
                decoder._decompress(bytes(view[p : p + size]), header),
                count,
                header.writer,
                header.family,
                header.info,
                header,
                source,
            )
        except AlertPacketError as e:
            if index >= start_index:
                yield Packet(FilePosition(source, index), _raw=bytes(view[pos:]), error=e)
            return
        pos = p + size + SYNC_SIZE
        for k in range(count):
            if index >= start_index:
                yield Packet(
                    FilePosition(source, index),
                    _raw=bytes(data) if single else None,
                    header=header,
                    block=block,
                    index_in_block=k,
                )
            index += 1
