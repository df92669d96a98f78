"""Broker definitions (filters, watchlists, watchmaps) kept in the lake, so every API process and the ingest
see the same ones.

Layout, under `alerts/<stream>/broker/`:

    <kind>/<id>.<version:06d>.json            one version of a definition (newest number wins)
    <kind>/blobs/<id>.<version>.<token>.<n>   large parts of a version (watchlist sources as Parquet, a
                                              watchmap's MOC as FITS), written before the JSON names them

Why versions instead of overwriting one JSON: S3 has no compare-and-swap on content, but it does honour
create-only writes (`LakeStorage.put_if_absent`). An edit based on version n creates n+1; two editors racing
from n cannot both win, so an edit is never lost silently (the loser gets `ConflictError`). After a write
the predecessor is removed, which keeps one listing of `<kind>/` enough to know every definition and its
newest version (the matcher re-lists once per batch and re-reads only what changed). A deletion is a
tombstone version, so a slow editor cannot resurrect a deleted definition.

Ownership: every definition has an `owner` (the authenticated identity's name). Owner-facing methods take
the owner and treat another owner's definition exactly like a missing one (`NotFound`), so ids of other
users' definitions cannot even be probed. The batch runner reads every owner's active definitions through
`records()`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

KINDS = ("filters", "watchlists", "watchmaps")
ID_PREFIX = {"filters": "flt", "watchlists": "wl", "watchmaps": "wm"}
_ID_RE = re.compile(r"^(flt|wl|wm)-[0-9a-f]{16}$")
_VERSION_RE = re.compile(r"^((?:flt|wl|wm)-[0-9a-f]{16})\.(\d{6,})\.json$")
_STREAM_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_BLOB_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
#: file name extensions of the known blob parts (for people browsing the lake)
BLOB_EXTENSIONS = {"sources": "parquet", "moc": "fits"}
MAX_NAME_CHARS = 200
#: re-reads of a listing when a version vanished between listing and reading (an edit removed it)
READ_ATTEMPTS = 4


class BrokerError(ValueError):
    """A request about a broker definition that cannot be done; the message says why."""


class NotFound(BrokerError):
    """No such definition for this owner (another owner's definition is reported the same way)."""


class ConflictError(BrokerError):
    """The definition was changed by someone else since it was read; reload and retry."""


class NotAllowed(BrokerError):
    """The caller may not own definitions (anonymous)."""


class Owner(Protocol):
    """Who is asking: `api.auth.Identity` satisfies this (name None = anonymous)."""

    @property
    def name(self) -> str | None: ...

    @property
    def groups(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class Caller:
    """A plain `Owner` for code that has no `api.auth.Identity` (CLI, tests, the ingest)."""

    name: str | None
    groups: frozenset[str] = frozenset({"public"})


def owner_name(owner: Owner | str) -> str:
    """The owner's name; anonymous callers cannot own broker definitions."""
    name = owner if isinstance(owner, str) else owner.name
    if not name:
        raise NotAllowed(
            "sign in to create or see filters, watchlists and watchmaps (anonymous callers own none)"
        )
    return name


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_stream(stream: str) -> str:
    if not _STREAM_RE.match(stream):
        raise ValueError(f"stream name {stream!r}: use lowercase letters, digits, '_' or '-'")
    return stream


def check_id(kind: str, def_id: str) -> str:
    """Ids come from URLs: refuse anything that is not an id of `kind` before it reaches a path."""
    if (
        not isinstance(def_id, str)
        or not _ID_RE.match(def_id)
        or not def_id.startswith(ID_PREFIX[kind] + "-")
    ):
        raise NotFound(f"no {kind[:-1]} {def_id!r}")
    return def_id


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BrokerError("a name is required")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise BrokerError(f"name must be at most {MAX_NAME_CHARS} printable characters")
    return name


@dataclass(frozen=True)
class BrokerRecord:
    """One version of a definition. `spec` holds the kind's own fields (a filter's ADQL, a watchlist's
    radius range, ...); `blobs` maps a part's name to its lake path. Treat both as read-only."""

    kind: str
    id: str
    owner: str
    name: str
    created: str
    updated: str
    active: bool
    version: int
    spec: Mapping[str, Any] = field(default_factory=dict)
    blobs: Mapping[str, str] = field(default_factory=dict)
    deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "created": self.created,
            "updated": self.updated,
            "active": self.active,
            "version": self.version,
            "spec": dict(self.spec),
            "blobs": dict(self.blobs),
            "deleted": self.deleted,
        }

    def public_dict(self) -> dict[str, Any]:
        """What an owner is shown (API responses): no internal blob paths."""
        out = self.to_dict()
        out.pop("blobs")
        out.pop("deleted")
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BrokerRecord:
        return cls(
            kind=doc["kind"],
            id=doc["id"],
            owner=doc["owner"],
            name=doc["name"],
            created=doc["created"],
            updated=doc["updated"],
            active=bool(doc["active"]),
            version=int(doc["version"]),
            spec=dict(doc.get("spec") or {}),
            blobs=dict(doc.get("blobs") or {}),
            deleted=bool(doc.get("deleted", False)),
        )


class BrokerStore:
    """Definitions of one alert stream, persisted in the lake (thread-safe; one per process is enough)."""

    def __init__(self, storage: LakeStorage, stream: str):
        self.storage = storage
        self.stream = check_stream(stream)
        self.prefix = f"alerts/{stream}/broker"
        # parsed versions by file name: a version is immutable, so this cache never goes stale
        self._cache: dict[tuple[str, str], BrokerRecord] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ paths
    def kind_prefix(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
        return f"{self.prefix}/{kind}"

    def _version_path(self, kind: str, def_id: str, version: int) -> str:
        return f"{self.kind_prefix(kind)}/{def_id}.{version:06d}.json"

    # ------------------------------------------------------------------ reading
    def _listing(self, kind: str) -> dict[str, list[int]]:
        """id -> sorted versions present, from one listing of the kind's folder."""
        out: dict[str, list[int]] = {}
        for name in self.storage.list_dir(self.kind_prefix(kind)):
            m = _VERSION_RE.match(name)
            if m:
                out.setdefault(m.group(1), []).append(int(m.group(2)))
        for versions in out.values():
            versions.sort()
        return out

    def _read_version(self, kind: str, def_id: str, version: int) -> BrokerRecord:
        path = self._version_path(kind, def_id, version)
        with self._lock:
            cached = self._cache.get((kind, path))
        if cached is not None:
            return cached
        record = BrokerRecord.from_dict(json.loads(self.storage.read_text(path)))
        with self._lock:
            self._cache[(kind, path)] = record
        return record

    def _latest(self, kind: str, def_id: str) -> BrokerRecord | None:
        """The newest version of one definition (tombstones included), None if it never existed."""
        for _ in range(READ_ATTEMPTS):
            versions = [
                int(m.group(2))
                for m in map(_VERSION_RE.match, self.storage.list_dir(self.kind_prefix(kind)))
                if m and m.group(1) == def_id
            ]
            if not versions:
                return None
            try:
                return self._read_version(kind, def_id, max(versions))
            except FileNotFoundError:
                continue  # removed by an edit after our listing: list again
        raise ConflictError(f"{kind[:-1]} {def_id} is being edited very often; try again")

    def records(
        self, kind: str, owner: str | None = None, include_inactive: bool = True
    ) -> list[BrokerRecord]:
        """Every live definition of `kind` (of `owner` if given), sorted by creation time then id.

        One listing plus reads of versions not seen before: cheap enough to call once per batch."""
        for _ in range(READ_ATTEMPTS):
            out = []
            try:
                for def_id, versions in self._listing(kind).items():
                    record = self._read_version(kind, def_id, versions[-1])
                    if record.deleted or (owner is not None and record.owner != owner):
                        continue
                    if include_inactive or record.active:
                        out.append(record)
            except FileNotFoundError:
                continue
            out.sort(key=lambda r: (r.created, r.id))
            return out
        raise ConflictError(f"{kind} are being edited very often; try again")

    def get(self, kind: str, def_id: str, owner: Owner | str) -> BrokerRecord:
        """The owner's definition; `NotFound` for a missing, deleted or someone else's definition."""
        name = owner_name(owner)
        check_id(kind, def_id)
        record = self._latest(kind, def_id)
        if record is None or record.deleted or record.owner != name:
            raise NotFound(f"no {kind[:-1]} {def_id!r}")
        return record

    def read_blob(self, record: BrokerRecord, part: str) -> bytes:
        if part not in record.blobs:
            raise KeyError(f"{record.kind[:-1]} {record.id} has no part {part!r}")
        return self.storage.read_bytes(record.blobs[part])

    # ------------------------------------------------------------------ writing
    def create(
        self,
        kind: str,
        owner: Owner | str,
        name: str,
        spec: Mapping[str, Any],
        blobs: Mapping[str, bytes] | None = None,
        active: bool = True,
    ) -> BrokerRecord:
        """A new definition (version 1) owned by `owner`."""
        now = utcnow()
        record = BrokerRecord(
            kind=kind,
            id=f"{ID_PREFIX[kind]}-{uuid.uuid4().hex[:16]}",
            owner=owner_name(owner),
            name=check_name(name),
            created=now,
            updated=now,
            active=bool(active),
            version=1,
            spec=dict(spec),
        )
        return self._write(record, blobs or {}, previous=None)

    def update(
        self,
        kind: str,
        def_id: str,
        owner: Owner | str,
        *,
        name: str | None = None,
        spec: Mapping[str, Any] | None = None,
        blobs: Mapping[str, bytes] | None = None,
        active: bool | None = None,
        expected_version: int | None = None,
    ) -> BrokerRecord:
        """A new version with the given fields changed (blobs not given are kept).

        `expected_version`: the version the caller's edit is based on (an API client that showed version 3
        to a person); if the definition moved on since, `ConflictError` instead of overwriting."""
        current = self.get(kind, def_id, owner)
        if expected_version is not None and expected_version != current.version:
            raise ConflictError(
                f"{kind[:-1]} {def_id} is at version {current.version}, not {expected_version}: "
                "it was changed meanwhile; reload it and edit again"
            )
        record = replace(
            current,
            name=current.name if name is None else check_name(name),
            spec=current.spec if spec is None else dict(spec),
            active=current.active if active is None else bool(active),
            version=current.version + 1,
            updated=utcnow(),
        )
        return self._write(record, blobs or {}, previous=current)

    def delete(self, kind: str, def_id: str, owner: Owner | str) -> None:
        """Delete: a tombstone version, then the older version and its blobs go."""
        current = self.get(kind, def_id, owner)
        tomb = replace(
            current, version=current.version + 1, updated=utcnow(), active=False, deleted=True, blobs={}
        )
        self._write(tomb, {}, previous=current)

    def _write(
        self, record: BrokerRecord, new_blobs: Mapping[str, bytes], previous: BrokerRecord | None
    ) -> BrokerRecord:
        kind, def_id = record.kind, record.id
        token = uuid.uuid4().hex[:8]
        paths = dict(record.blobs)
        written = []
        for part, data in new_blobs.items():
            if not _BLOB_NAME_RE.match(part):
                raise ValueError(f"blob name {part!r}")
            ext = BLOB_EXTENSIONS.get(part, "bin")
            path = f"{self.kind_prefix(kind)}/blobs/{def_id}.{record.version:06d}.{token}.{part}.{ext}"
            self.storage.write_bytes(path, data)  # unreferenced until the JSON below exists
            written.append(path)
            paths[part] = path
        record = replace(record, blobs=paths)
        body = json.dumps(record.to_dict(), indent=1, sort_keys=True).encode()
        target = self._version_path(kind, def_id, record.version)
        won = self.storage.put_if_absent(target, body)
        if won:
            # A very slow editor can re-create a number that a cleanup removed; it must not win over a
            # newer version, so check that ours is still the newest before reporting success.
            newest = max(self._listing(kind).get(def_id, [record.version]))
            if newest != record.version:
                self.storage.delete_file(target)
                won = False
        if not won:
            for path in written:
                self.storage.delete_file(path)
            raise ConflictError(
                f"{kind[:-1]} {def_id} was changed by someone else at the same time; reload it and retry"
            )
        with self._lock:
            self._cache[(kind, target)] = record
        if previous is not None:
            self._drop_version(previous, keep=set(record.blobs.values()))
        log.info(
            "%s %s v%d by %s%s",
            kind[:-1],
            def_id,
            record.version,
            record.owner,
            " (deleted)" if record.deleted else "",
        )
        return record

    def _drop_version(self, old: BrokerRecord, keep: set[str]) -> None:
        """Best effort: a failure only leaves garbage that `gc` removes."""
        with contextlib.suppress(Exception):
            for path in old.blobs.values():
                if path not in keep:
                    self.storage.delete_file(path)
            self.storage.delete_file(self._version_path(old.kind, old.id, old.version))

    def gc(self, grace_seconds: float = 3600.0) -> list[str]:
        """Remove versions older than the newest and blobs no newest version references (leftovers of
        crashed writers). Safe while others write: a blob of a newer version than the newest listed one,
        or of a definition not created yet, is only removed once older than `grace_seconds`."""
        import time

        removed: list[str] = []
        now = time.time()
        for kind in KINDS:
            listing = self._listing(kind)
            referenced: set[str] = set()
            newest: dict[str, int] = {}
            for def_id, versions in listing.items():
                try:
                    record = self._read_version(kind, def_id, versions[-1])
                except FileNotFoundError:
                    continue
                referenced.update(record.blobs.values())
                newest[def_id] = versions[-1]
                for v in versions[:-1]:
                    path = self._version_path(kind, def_id, v)
                    self.storage.delete_file(path)
                    removed.append(path)
            blob_dir = f"{self.kind_prefix(kind)}/blobs"
            for name in self.storage.list_dir(blob_dir):
                path = f"{blob_dir}/{name}"
                parts = name.split(".")
                if path in referenced or len(parts) < 4 or not parts[1].isdigit():
                    continue
                def_id, version = parts[0], int(parts[1])
                superseded = def_id in newest and version < newest[def_id]
                if not superseded:
                    info = self.storage.pa_fs.get_file_info(self.storage.path(path))
                    mtime = info.mtime.timestamp() if info.mtime is not None else now
                    if now - mtime < grace_seconds:
                        continue
                self.storage.delete_file(path)
                removed.append(path)
        return removed


# --------------------------------------------------------------------------- per-batch tables


def hits_prefix(stream: str, kind: str) -> str:
    """Where a batch's watchlist or watchmap hits are kept: `<prefix>/<batch>.parquet`, all owners."""
    if kind not in ("watchlists", "watchmaps"):
        raise ValueError(kind)
    return f"alerts/{check_stream(stream)}/broker/hits/{kind}"


def batch_file(batch_id: int) -> str:
    if int(batch_id) < 0:
        raise ValueError("batch ids are >= 0")
    return f"{int(batch_id):012d}.parquet"


def write_table(storage, rel: str, table: pa.Table) -> None:
    """One Parquet object (small: a batch's matches), written whole so readers never see half of it."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(rel, sink.getvalue())


def read_tables(
    storage, prefix: str, first_batch: int | None = None, last_batch: int | None = None
) -> pa.Table | None:
    """All per-batch Parquet files under `prefix` (in batch order), with schemas unified by name (a filter
    edited between batches may have changed its columns); None when there is none."""
    tables = []
    for name in storage.list_dir(prefix):
        if not name.endswith(".parquet") or not name[:-8].isdigit():
            continue
        batch = int(name[:-8])
        if (first_batch is not None and batch < first_batch) or (
            last_batch is not None and batch > last_batch
        ):
            continue
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile (filter deleted): skip
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(f"{prefix}/{name}"))))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")
