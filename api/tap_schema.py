"""TAP_SCHEMA 1.1 built from the published releases a caller may read (pure: tables in, Arrow tables out).

Why in memory and per caller: data rights mean that two callers see two different TAP_SCHEMAs (a catalog
a caller may not read must not exist for them), and the lake's release pointers can move at any time; the
tables are tiny, so they are rebuilt from the registry (which caches the lake for a few seconds) and handed
to the engine as in-memory relations, queryable with ADQL like any table.

Only the current release of each catalog is listed (`gaia.source`); older releases stay queryable as
`"gaia@dr2".source` and are named in the schema description, so TOPCAT's table browser stays readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from dac_lake.adql.model import ColumnMeta, TableMeta
from dac_lake.engine import MemoryTable
from dac_lake.registry import LakeTable

SCHEMA = "TAP_SCHEMA"

#: VOTable datatype, arraysize and xtype of each engine datatype
VOTABLE_TYPES: dict[str, tuple[str, str | None, str | None]] = {
    "bool": ("boolean", None, None),
    "int8": ("short", None, None),
    "int16": ("short", None, None),
    "int32": ("int", None, None),
    "int64": ("long", None, None),
    "float32": ("float", None, None),
    "float64": ("double", None, None),
    # unicodeChar: a streamed result cannot know in advance that a column is ASCII (api/formats/votable.py)
    "string": ("unicodeChar", "*", None),
    "timestamp": ("char", "*", "timestamp"),
}


def _c(name: str, datatype: str, description: str, *, ucd: str = "", unit: str = "") -> ColumnMeta:
    return ColumnMeta(name=name, datatype=datatype, unit=unit, ucd=ucd, description=description)


#: TAP 1.1 section 4: the TAP_SCHEMA tables and their columns, in the standard's order
TAP_SCHEMA_TABLES: dict[str, tuple[str, tuple[ColumnMeta, ...]]] = {
    "schemas": (
        "description of schemas in this tableset",
        (
            _c("schema_name", "string", "schema name for reference to tables"),
            _c("utype", "string", "lists the utypes of schemas in the tableset"),
            _c("description", "string", "describes schemas in the tableset"),
            _c("schema_index", "int32", "recommended sort order when listing schemas"),
        ),
    ),
    "tables": (
        "description of tables in this tableset",
        (
            _c("schema_name", "string", "the schema this table belongs to"),
            _c("table_name", "string", "the fully qualified table name"),
            _c("table_type", "string", "one of: table view"),
            _c("utype", "string", "lists the utype of tables in the tableset"),
            _c("description", "string", "describes tables in the tableset"),
            _c("table_index", "int32", "recommended sort order when listing tables"),
        ),
    ),
    "columns": (
        "description of columns in this tableset",
        (
            _c("table_name", "string", "the table this column belongs to"),
            _c("column_name", "string", "the column name"),
            _c("datatype", "string", "lists the ADQL datatype of columns in the tableset"),
            _c("arraysize", "string", "lists the size of variable-length columns in the tableset"),
            _c("xtype", "string", "a DALI or custom extended type annotation"),
            _c("size", "int32", "deprecated: use arraysize"),
            _c("description", "string", "describes the columns in the tableset"),
            _c("utype", "string", "lists the utypes of columns in the tableset"),
            _c("unit", "string", "lists the unit used for column values in the tableset"),
            _c("ucd", "string", "lists the UCDs of columns in the tableset"),
            _c("indexed", "int32", "an indexed column; 1 means true, 0 means false"),
            _c("principal", "int32", "a principal column; 1 means true, 0 means false"),
            _c("std", "int32", "a standard column; 1 means true, 0 means false"),
            _c("column_index", "int32", "recommended sort order when listing columns of a table"),
        ),
    ),
    "keys": (
        "description of foreign keys in this tableset",
        (
            _c("key_id", "string", "unique key to join to TAP_SCHEMA.key_columns"),
            _c("from_table", "string", "the table with the foreign key"),
            _c("target_table", "string", "the table with the primary key"),
            _c("description", "string", "describes keys in the tableset"),
            _c("utype", "string", "lists the utype of keys in the tableset"),
        ),
    ),
    "key_columns": (
        "description of foreign key columns in this tableset",
        (
            _c("key_id", "string", "key to join to TAP_SCHEMA.keys"),
            _c("from_column", "string", "column in the from_table"),
            _c("target_column", "string", "column in the target_table"),
        ),
    ),
}

_ARROW = {"string": pa.string(), "int32": pa.int32()}

#: ADQL reserved words used as TAP_SCHEMA column names: listed delimited (TAP 1.1 section 4.3), as
#: clients must write them in queries
_DELIMITED = {"size": '"size"'}

#: the foreign keys TAP 1.1 declares between the TAP_SCHEMA tables: (from, to, from column, to column)
TAP_SCHEMA_KEYS = (
    ("tables", "schemas", "schema_name", "schema_name"),
    ("columns", "tables", "table_name", "table_name"),
    ("keys", "tables", "from_table", "table_name"),
    ("keys", "tables", "target_table", "table_name"),
    ("key_columns", "keys", "key_id", "key_id"),
)


@dataclass(frozen=True)
class ColumnInfo:
    """One column as TAP_SCHEMA, /tables and VOTable FIELDs describe it."""

    name: str
    datatype: str  # engine datatype
    description: str
    unit: str
    ucd: str
    utype: str
    principal: bool
    indexed: bool
    std: bool = False

    @property
    def votable(self) -> tuple[str, str | None, str | None]:
        return VOTABLE_TYPES[self.datatype]


@dataclass(frozen=True)
class TableInfo:
    """One table as TAP_SCHEMA and /tables describe it."""

    schema: str
    name: str
    description: str
    columns: tuple[ColumnInfo, ...]
    table_type: str = "table"
    rows: int | None = None
    releases: tuple[str, ...] = ()
    #: (target table, from column, target column) of each foreign key
    foreign_keys: tuple[tuple[str, str, str], ...] = ()

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class SchemaInfo:
    name: str
    description: str
    tables: tuple[TableInfo, ...]


def lake_schemas(tables: Sequence[LakeTable]) -> list[SchemaInfo]:
    """The schemas a caller sees, each once with all its tables: one per catalog (its current release),
    one per alert stream (its tables at the newest snapshot), then TAP_SCHEMA itself.

    Grouped by schema because TAP_SCHEMA.schemas is keyed by `schema_name` (TAP 1.1 section 4.1) and
    `/tables` nests tables in their schema: an alert stream has four tables in one schema, and listing
    the schema once per table would give clients (TOPCAT's browser, pyvo) duplicate schemas."""
    releases: dict[str, list[str]] = {}
    for t in tables:
        releases.setdefault(t.catalog, []).append(t.release)
    grouped: dict[str, list[LakeTable]] = {}
    # sorted by catalog only: a stable sort keeps the registry's order of a stream's tables
    for t in sorted(tables, key=lambda t: t.catalog):
        if t.meta.schema != t.catalog:  # a "catalog@release" alias: described in its catalog's schema
            continue
        grouped.setdefault(t.catalog, []).append(t)
    out = [
        SchemaInfo(schema, _schema_description(members), tuple(_table_info(t, releases) for t in members))
        for schema, members in grouped.items()
    ]
    out.append(tap_schema_info())
    return out


def _is_alert_table(t: LakeTable) -> bool:
    return bool(t.manifest) and t.manifest.get("kind") == "alerts"


def _schema_description(members: Sequence[LakeTable]) -> str:
    first = members[0]
    if _is_alert_table(first):
        title = (first.manifest.get("stream_title") or f"{first.catalog} alert stream").strip()
        about = (first.manifest.get("stream_description") or "").strip()
        return f"{title}. {about}".strip() if about else title
    return (first.definition.get("title") or first.catalog).strip()


def _table_info(t: LakeTable, releases: dict[str, list[str]]) -> TableInfo:
    d = t.definition
    cols = []
    id_column = d.get("id_column")
    for c in d["columns"]:
        indexed = c["name"] in (d.get("ra_column"), d.get("dec_column"), id_column)
        cols.append(
            ColumnInfo(
                name=c["name"],
                datatype=c["datatype"],
                description=c.get("description") or "",
                unit=c.get("unit") or "",
                ucd=c.get("ucd") or "",
                utype=c.get("utype") or "",
                principal=bool(c.get("principal")),
                indexed=indexed,
            )
        )
    description = (d.get("description") or d.get("title") or "").strip()
    if _is_alert_table(t):
        others: list[str] = []
        note = f" Snapshot {t.manifest.get('snapshot')} (the stream's newest; micro-batches append rows)."
    else:
        others = sorted(r for r in set(releases[t.catalog]) if r != t.release)
        note = f" Release {t.release} (current)."
        if others:
            note += " Other releases, queryable as " + ", ".join(
                f'"{t.catalog}@{r}".{t.meta.name}' for r in others
            )
            note += "."
    return TableInfo(
        schema=t.catalog,
        name=t.meta.name,
        description=(description + note).strip(),
        columns=tuple(cols),
        rows=int(t.manifest.get("rows", 0)) if t.manifest else None,
        releases=tuple([t.release, *others]),
    )


def tap_schema_info() -> SchemaInfo:
    tables = []
    for name, (description, columns) in TAP_SCHEMA_TABLES.items():
        cols = tuple(
            ColumnInfo(
                _DELIMITED.get(c.name, c.name),
                c.datatype,
                c.description,
                "",
                "",
                "",
                principal=True,
                indexed=False,
                std=True,
            )
            for c in columns
        )
        keys = tuple(
            (f"{SCHEMA}.{dst}", src_col, dst_col)
            for src, dst, src_col, dst_col in TAP_SCHEMA_KEYS
            if src == name
        )
        tables.append(TableInfo(SCHEMA, name, description, cols, foreign_keys=keys))
    return SchemaInfo(
        SCHEMA, "a description of the tables and columns in this service (TAP 1.1)", tuple(tables)
    )


def tap_schema_tables(schemas: Sequence[SchemaInfo]) -> list[MemoryTable]:
    """TAP_SCHEMA's five tables as in-memory relations for the engine."""
    rows: dict[str, list[tuple]] = {name: [] for name in TAP_SCHEMA_TABLES}
    for s_index, schema in enumerate(schemas):
        rows["schemas"].append((schema.name, None, schema.description, s_index))
        for t_index, table in enumerate(schema.tables):
            rows["tables"].append(
                (schema.name, table.qualified_name, table.table_type, None, table.description, t_index)
            )
            for c_index, col in enumerate(table.columns):
                datatype, arraysize, xtype = col.votable
                rows["columns"].append(
                    (
                        table.qualified_name,
                        col.name,
                        datatype,
                        arraysize,
                        xtype,
                        None,
                        col.description,
                        col.utype or None,
                        col.unit or None,
                        col.ucd or None,
                        int(col.indexed),
                        int(col.principal),
                        int(col.std),
                        c_index,
                    )
                )
    if any(s.name == SCHEMA for s in schemas):
        for i, (src, dst, src_col, dst_col) in enumerate(TAP_SCHEMA_KEYS):
            key_id = f"tap_schema_{i}"
            rows["keys"].append(
                (key_id, f"{SCHEMA}.{src}", f"{SCHEMA}.{dst}", f"{src}.{src_col} -> {dst}.{dst_col}", None)
            )
            rows["key_columns"].append((key_id, src_col, dst_col))
    out = []
    for name, (_, columns) in TAP_SCHEMA_TABLES.items():
        arrays = {
            c.name: pa.array([r[i] for r in rows[name]], _ARROW[c.datatype]) for i, c in enumerate(columns)
        }
        meta = TableMeta(schema=SCHEMA, name=name, columns=columns)
        out.append(MemoryTable(meta, pa.table(arrays)))
    return out
