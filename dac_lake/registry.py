"""The tables a caller can query: published releases of the lake's catalogs, filtered by data rights.

Naming (ADQL `schema.table`): the schema is the catalog, the table is the definition's `table` (default
`main`), so `demo_survey.source` is the *current* release. A specific release is the schema
`"<catalog>@<release>"` (a delimited identifier: `SELECT * FROM "demo_survey@dr1".source`), so old releases
stay queryable after a new one is published, without ever being confused with the current one.

Alert streams (`dac_lake.alerts`) add one schema per stream with its tables: `ztf.detections`, `ztf.objects`,
`ztf.upper_limits`, `ztf.alerts`, always at the stream's newest snapshot. Their partitions are folders of
files, so the engine asks `LakeTable.files` for the files of the partitions it reads.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from dac_lake import layout
from dac_lake.adql import ColumnMeta, TableMeta
from dac_lake.alerts import layout as alert_layout
from dac_lake.alerts.snapshots import (
    AlertLakeError,
    SnapshotStore,
    list_streams,
    read_stream_config,
    registry_manifest,
)
from dac_lake.lake import Lake

log = logging.getLogger(__name__)

DEFAULT_TABLE = "main"
PUBLIC_GROUP = "public"


@dataclass(frozen=True)
class LakeTable:
    """A queryable table: its ADQL metadata and where its release lives."""

    meta: TableMeta
    catalog: str
    release: str
    manifest: dict = field(hash=False, compare=False)
    definition: dict = field(hash=False, compare=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.meta.schema}.{self.meta.name}"

    @property
    def dataset_prefix(self) -> str:
        if "dataset_prefix" in self.manifest:  # an alert table
            return self.manifest["dataset_prefix"]
        return f"{layout.release_prefix(self.catalog, self.release)}/{self.manifest['catalog_path']}/dataset"

    def files(self, partitions) -> list[str]:
        """Lake paths of the data files of `partitions` ((order, pixel, rows) items of the manifest): one
        file per partition for a release; for an alert table, the files its snapshot lists (a partition is
        a folder of batch files, and only the snapshot says which of them are committed)."""
        pixel_files = self.manifest.get("pixel_files")
        if pixel_files is None:
            return [f"{self.dataset_prefix}/{layout.pixel_file(o, p)}" for o, p, *_ in partitions]
        return [
            f"{self.dataset_prefix}/{alert_layout.pixel_dir(o, p)}/{name}"
            for o, p, *_ in partitions
            for name in pixel_files.get(f"{o}/{p}", ())
        ]

    @property
    def schema_file(self) -> str:
        """A file with the table's schema, for a view that must have the columns but no rows (a coverage
        that touches no partition, or an alert table with no rows yet)."""
        partitions = self.manifest.get("partitions") or []
        if "pixel_files" in self.manifest or not partitions:
            return f"{self.dataset_prefix}/_common_metadata"
        return self.files(partitions[:1])[0]

    @property
    def margin_prefix(self) -> str | None:
        margin = self.manifest.get("margin_path")
        if not margin:
            return None
        return f"{layout.release_prefix(self.catalog, self.release)}/{margin}/dataset"


def readable(definition: dict, groups: frozenset[str]) -> bool:
    """Data rights: a catalog is readable if it is public or shares a group with the caller ('*': all,
    for trusted notebook and admin sessions)."""
    if "*" in groups:
        return True
    allowed = set(definition.get("groups") or [PUBLIC_GROUP])
    return PUBLIC_GROUP in allowed or bool(allowed & groups)


class LakeRegistry:
    """Resolves catalogs to tables for one caller (its groups decide what exists for it)."""

    def __init__(
        self,
        lake: Lake,
        groups: frozenset[str] = frozenset(),
        all_releases: bool = True,
        ttl_seconds: float = 5.0,
    ):
        self.lake = lake
        self.groups = groups
        self.all_releases = all_releases
        # a long-lived session or service must see a newly published (or rolled back) release, but listing
        # the pointers of every catalog on each query would cost S3 round trips: re-read after a few seconds
        self.ttl_seconds = ttl_seconds
        self._tables: list[LakeTable] | None = None
        self._loaded_at = 0.0

    def refresh(self) -> None:
        self._tables = None

    def lake_tables(self) -> list[LakeTable]:
        if self._tables is None or time.monotonic() - self._loaded_at > self.ttl_seconds:
            self._tables = self._load()
            self._loaded_at = time.monotonic()
        return self._tables

    def tables(self) -> list[TableMeta]:
        return [t.meta for t in self.lake_tables()]

    def find(self, schema: str, name: str) -> LakeTable | None:
        for table in self.lake_tables():
            if table.meta.schema.lower() == schema.lower() and table.meta.name.lower() == name.lower():
                return table
        return None

    def _load(self) -> list[LakeTable]:
        out: list[LakeTable] = []
        storage = self.lake.storage
        for catalog in self.lake.catalogs():
            current = self.lake.current_release(catalog)
            releases = self.lake.releases(catalog) if self.all_releases else ([current] if current else [])
            for release in releases:
                prefix = layout.release_prefix(catalog, release)
                try:
                    manifest = json.loads(storage.read_text(f"{prefix}/{layout.RELEASE_MANIFEST}"))
                    definition = json.loads(storage.read_text(f"{prefix}/{layout.DEFINITION_FILE}"))
                except FileNotFoundError:
                    continue  # incomplete release
                if not readable(definition, self.groups):
                    continue
                if storage.exists(f"{prefix}/{layout.INCOMPLETE_MARKER}") and release != current:
                    continue
                schemas = [f"{catalog}@{release}"]
                if release == current:
                    schemas.insert(0, catalog)
                for schema in schemas:
                    out.append(
                        LakeTable(_table_meta(schema, definition), catalog, release, manifest, definition)
                    )
        out += self._alert_tables({t.catalog for t in out} | set(self.lake.catalogs()))
        return out

    def _alert_tables(self, taken: set[str]) -> list[LakeTable]:
        """The tables of each alert stream at its newest snapshot (none before its first commit)."""
        storage = self.lake.storage
        out: list[LakeTable] = []
        for stream in list_streams(storage):
            try:
                config = read_stream_config(storage, stream)
                snapshot = SnapshotStore(storage, stream).latest() if config is not None else None
            except (AlertLakeError, ValueError, KeyError) as exc:
                log.warning("alert stream %s is unreadable and not queryable: %s", stream, exc)
                continue
            if config is None or snapshot is None:
                continue
            if stream in taken:
                log.warning("alert stream %s has the name of a catalog: not queryable", stream)
                continue
            for table in alert_layout.TABLES:
                definition = dict(config.definitions[table])
                definition["groups"] = list(config.groups)
                if not readable(definition, self.groups):
                    break  # a stream's tables share its groups
                # the stream's title and description travel with each table: TAP_SCHEMA and /tables
                # describe the stream's schema with them (`api.tap_schema.lake_schemas`)
                manifest = dict(
                    registry_manifest(config, snapshot, table),
                    stream_title=config.title,
                    stream_description=config.description,
                )
                meta = _table_meta(stream, definition)
                out.append(LakeTable(meta, stream, f"snapshot-{snapshot.seq:06d}", manifest, definition))
        return out


def _table_meta(schema: str, definition: dict) -> TableMeta:
    columns = tuple(
        ColumnMeta(
            name=c["name"],
            datatype=c["datatype"],
            unit=c.get("unit") or "",
            ucd=c.get("ucd") or "",
            description=c.get("description") or "",
        )
        for c in definition["columns"]
    )
    name = (definition.get("extra") or {}).get("table") or definition.get("table") or DEFAULT_TABLE
    return TableMeta(
        schema=schema,
        name=name,
        columns=columns,
        ra_column=definition.get("ra_column"),
        dec_column=definition.get("dec_column"),
    )
