"""The lake and its releases: init, list, show, publish (atomic pointer), drop, gc.

A release is immutable once written. Publishing is one create-only write of a sequence-numbered pointer
object (`catalogs/<c>/current/000042.json`); the highest number wins. Two publishers that both read 41 race
for 42: exactly one create succeeds (S3 `If-None-Match: *`, or link(2) locally) and the other gets
`PublishConflict` instead of silently overwriting. The pointer history doubles as an audit log of
publications and roll-backs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from dac_lake import layout
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)


class LakeError(RuntimeError):
    """A lake operation cannot be done; the message says why and what to do."""


class PublishConflict(LakeError):
    """Another publisher moved the pointer between our read and our write."""


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Pointer:
    """One publication of a release: the content of `current/NNNNNN.json`."""

    seq: int
    release: str
    published_at: str
    previous: str | None = None
    by: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1).encode()


@dataclass
class ReleaseInfo:
    """What `dac release list/show` reports about one release."""

    catalog: str
    release: str
    state: str  # "ready" | "incomplete"
    current: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    marker: dict[str, Any] = field(default_factory=dict)


class Lake:
    """Operations on one lake root."""

    def __init__(self, storage: LakeStorage):
        self.storage = storage

    @classmethod
    def open(cls, url: str | None = None) -> Lake:
        return cls(LakeStorage(url))

    # ------------------------------------------------------------------ lake
    def init(self) -> bool:
        """Create the lake root and lake.json. Idempotent; returns False if it already existed."""
        self.storage.ensure_root()
        doc = {"format": layout.LAKE_FORMAT, "version": layout.LAKE_VERSION, "created_at": utcnow()}
        created = self.storage.put_if_absent(layout.LAKE_FILE, json.dumps(doc, indent=1).encode())
        self.check()
        return created

    def check(self) -> dict[str, Any]:
        """Read lake.json and refuse a lake of another format or a newer version."""
        try:
            doc = json.loads(self.storage.read_text(layout.LAKE_FILE))
        except FileNotFoundError:
            raise LakeError(
                f"{self.storage.url} is not a dac-lake lake (no lake.json): run `dac lake init`"
            ) from None
        if doc.get("format") != layout.LAKE_FORMAT:
            raise LakeError(f"{self.storage.url}/lake.json is not a dac-lake lake file")
        if int(doc.get("version", 0)) > layout.LAKE_VERSION:
            raise LakeError(
                f"lake format version {doc['version']} is newer than this dac-lake supports "
                f"({layout.LAKE_VERSION}): upgrade dac-lake"
            )
        return doc

    def catalogs(self) -> list[str]:
        return [n for n in self.storage.list_dir(layout.catalogs_prefix()) if not n.startswith((".", "_"))]

    # ------------------------------------------------------------------ pointers
    def pointer_history(self, catalog: str) -> list[int]:
        names = self.storage.list_dir(layout.pointer_prefix(catalog))
        return sorted(s for s in (layout.pointer_seq(n) for n in names) if s is not None)

    def current_pointer(self, catalog: str) -> Pointer | None:
        """The newest pointer of `catalog`, or None if it was never published."""
        history = self.pointer_history(catalog)
        if not history:
            return None
        data = json.loads(self.storage.read_text(layout.pointer_key(catalog, history[-1])))
        return Pointer(**data)

    def current_release(self, catalog: str) -> str | None:
        pointer = self.current_pointer(catalog)
        return pointer.release if pointer else None

    def publish(self, catalog: str, release: str, expected_seq: int | None = None) -> Pointer:
        """Make `release` the current release of `catalog` with one create-only write.

        `expected_seq` is the pointer number the caller based its decision on (an ingest passes the one it
        saw when it started); if another publication happened since, we refuse rather than overwrite it.
        """
        info = self.release_info(catalog, release)
        if not info.manifest:  # validated releases have a manifest (their ingest may still hold the marker)
            raise LakeError(
                f"release {catalog}/{release} is incomplete (an ingest is running or crashed); "
                "it cannot be published"
            )
        history = self.pointer_history(catalog)
        last = history[-1] if history else 0
        if expected_seq is not None and last != expected_seq:
            raise PublishConflict(
                f"{catalog}: the release pointer moved while this ingest ran (expected #{expected_seq}, "
                f"now #{last}, release {self.current_release(catalog)!r}); not overwriting it. "
                f"Publish explicitly with `dac release publish {catalog} {release}` if intended."
            )
        previous = self.current_release(catalog)
        pointer = Pointer(
            seq=last + 1,
            release=release,
            published_at=utcnow(),
            previous=previous,
            by=f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}:{os.getpid()}",
        )
        if not self.storage.put_if_absent(layout.pointer_key(catalog, pointer.seq), pointer.to_json()):
            winner = self.current_release(catalog)
            raise PublishConflict(
                f"{catalog}: another publisher wrote pointer #{pointer.seq} (release {winner!r}) at the same "
                f"time; {release!r} was not published"
            )
        # the release is referenced now: it can lose its incomplete marker if the ingest left one
        self.storage.delete_file(f"{layout.release_prefix(catalog, release)}/{layout.INCOMPLETE_MARKER}")
        log.info("published %s/%s as pointer #%d (previous: %s)", catalog, release, pointer.seq, previous)
        return pointer

    # ------------------------------------------------------------------ releases
    def releases(self, catalog: str) -> list[str]:
        return self.storage.list_dir(layout.releases_prefix(catalog))

    def release_info(self, catalog: str, release: str) -> ReleaseInfo:
        prefix = layout.release_prefix(catalog, release)
        manifest: dict[str, Any] = {}
        marker: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError):
            manifest = json.loads(self.storage.read_text(f"{prefix}/{layout.RELEASE_MANIFEST}"))
        with contextlib.suppress(FileNotFoundError):
            marker = json.loads(self.storage.read_text(f"{prefix}/{layout.INCOMPLETE_MARKER}"))
        if not manifest and not marker and not self.storage.list_dir(prefix):
            raise LakeError(f"no release {release!r} in catalog {catalog!r}")
        current = self.current_release(catalog) == release
        # the marker goes only after publication (or at once with --no-publish): while it is there and the
        # release is not referenced, the release is not finished, even if its manifest was written
        state = "ready" if manifest and (current or not marker) else "incomplete"
        return ReleaseInfo(catalog, release, state, current, manifest, marker)

    def list_releases(self, catalog: str | None = None) -> list[ReleaseInfo]:
        out = []
        for cat in [catalog] if catalog else self.catalogs():
            for rel in self.releases(cat):
                out.append(self.release_info(cat, rel))
        return out

    def drop(self, catalog: str, release: str) -> None:
        """Delete a release that is not current (publish another one first to roll away from it)."""
        if self.current_release(catalog) == release:
            raise LakeError(
                f"{catalog}/{release} is the current release; publish another release before dropping it"
            )
        self.release_info(catalog, release)  # raises if it does not exist
        self.storage.delete_tree(layout.release_prefix(catalog, release))
        log.info("dropped %s/%s", catalog, release)

    # ------------------------------------------------------------------ gc
    def gc(self, grace_seconds: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove incomplete, unreferenced release prefixes left by crashed ingests.

        An incomplete release is left alone while its ingest may still be running: its marker names the
        host and pid, and carries a heartbeat the ingest refreshes; it is garbage when that process is gone
        (same host) or its heartbeat is older than `grace_seconds`. A release that is referenced by a
        pointer is never removed (a crash between publishing and removing the marker is finished here).
        """
        removed = []
        host = socket.gethostname()
        now = time.time()
        for cat in self.catalogs():
            referenced = {self.current_release(cat)}
            for rel in self.releases(cat):
                info = self.release_info(cat, rel)
                prefix = layout.release_prefix(cat, rel)
                if rel in referenced:
                    if info.marker:  # crashed between publishing and removing the marker: finish it
                        self.storage.delete_file(f"{prefix}/{layout.INCOMPLETE_MARKER}")
                    continue
                if info.state == "ready":
                    continue
                marker = info.marker
                alive = False
                if marker.get("host") == host and marker.get("pid"):
                    alive = _pid_alive(int(marker["pid"]))
                elif marker.get("heartbeat_unix"):
                    alive = now - float(marker["heartbeat_unix"]) < grace_seconds
                if alive:
                    log.info("gc: %s/%s is being written by pid %s; left alone", cat, rel, marker.get("pid"))
                    continue
                removed.append(f"{cat}/{rel}")
                if not dry_run:
                    self.storage.delete_tree(prefix)
                    log.info("gc: removed incomplete release %s/%s", cat, rel)
        return removed


def _pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
