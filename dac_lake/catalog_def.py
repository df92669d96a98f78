"""Catalog definitions (`catalogs/<name>.yaml`): what each column means, its unit, UCD and type.

The definition is the contract between the survey team and the DAC: ingest checks the input against it
(a column not in the definition, or of another type, is an error, not a surprise in TAP_SCHEMA later), and
writes it into the release so the TAP service can publish the metadata with no access to this folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from dac_lake.layout import check_catalog_name

#: definition datatype -> Arrow type
ARROW_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.large_string(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


#: context catalogs (see CatalogDef.context): default and largest match radius, kinds of source
DEFAULT_CONTEXT_RADIUS_ARCSEC = 30.0
MAX_CONTEXT_RADIUS_ARCSEC = 600.0
CONTEXT_TYPES = ("star", "galaxy", "qso", "unknown")
_CONTEXT_KEYS = (
    "context",
    "context_radius_arcsec",
    "context_fields",
    "context_type_column",
    "context_default_type",
)


class DefinitionError(ValueError):
    """A catalog definition file is malformed."""


@dataclass(frozen=True)
class ColumnDef:
    name: str
    datatype: str
    description: str = ""
    unit: str = ""
    ucd: str = ""
    principal: bool = False
    nullable: bool = True
    utype: str = ""

    @property
    def arrow_type(self) -> pa.DataType:
        return ARROW_TYPES[self.datatype]

    def field_metadata(self) -> dict[bytes, bytes]:
        """What goes into the Parquet schema for this column (read back by the TAP service and notebooks)."""
        meta = {"description": self.description, "unit": self.unit, "ucd": self.ucd, "utype": self.utype}
        meta["principal"] = "true" if self.principal else "false"
        return {k.encode(): v.encode() for k, v in meta.items() if v}


@dataclass(frozen=True)
class CatalogDef:
    name: str
    title: str
    description: str
    ra_column: str
    dec_column: str
    id_column: str
    columns: tuple[ColumnDef, ...]
    groups: tuple[str, ...] = ("public",)
    extra: dict[str, Any] = field(default_factory=dict)
    #: a context catalog (`dac_lake.alerts.context`): alert objects are cross-matched with it once, when
    #: first seen, and the nearest sources within `context_radius_arcsec` are recorded with the values of
    #: `context_fields`; `context_type_column` (string, bool or stellarity float) or else
    #: `context_default_type` says what kind of source a row is, for the Sherlock-style classification
    context: bool = False
    context_radius_arcsec: float = DEFAULT_CONTEXT_RADIUS_ARCSEC
    context_fields: tuple[str, ...] = ()
    context_type_column: str = ""
    context_default_type: str = ""

    def column(self, name: str) -> ColumnDef | None:
        for col in self.columns:
            if col.name == name:
                return col
        return None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["columns"] = [asdict(c) for c in self.columns]
        data["groups"] = list(self.groups)
        data["context_fields"] = list(self.context_fields)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<definition>") -> CatalogDef:
        try:
            name = check_catalog_name(str(data["name"]))
            columns = []
            for i, raw in enumerate(data["columns"]):
                if "name" not in raw or "datatype" not in raw:
                    raise DefinitionError(f"{source}: column #{i + 1} needs 'name' and 'datatype'")
                if raw["datatype"] not in ARROW_TYPES:
                    raise DefinitionError(
                        f"{source}: column {raw['name']!r} has datatype {raw['datatype']!r}; "
                        f"use one of {', '.join(ARROW_TYPES)}"
                    )
                known = {f for f in ColumnDef.__dataclass_fields__}
                unknown = set(raw) - known
                if unknown:
                    raise DefinitionError(
                        f"{source}: column {raw['name']!r} has unknown keys {sorted(unknown)}"
                    )
                columns.append(ColumnDef(**{k: ("" if v is None else v) for k, v in raw.items()}))
            names = [c.name for c in columns]
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise DefinitionError(f"{source}: columns defined twice: {sorted(dupes)}")
            known_top = {
                "name",
                "title",
                "description",
                "ra_column",
                "dec_column",
                "id_column",
                "columns",
                "groups",
                *_CONTEXT_KEYS,
            }
            definition = cls(
                name=name,
                title=str(data.get("title", name)),
                description=str(data.get("description", "")).strip(),
                ra_column=str(data["ra_column"]),
                dec_column=str(data["dec_column"]),
                id_column=str(data["id_column"]),
                columns=tuple(columns),
                groups=tuple(data.get("groups") or ("public",)),
                extra={k: v for k, v in data.items() if k not in known_top},
                **_context_options(data, {c.name: c for c in columns}, source),
            )
        except KeyError as exc:
            raise DefinitionError(f"{source}: missing required key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DefinitionError):
                raise
            raise DefinitionError(f"{source}: {exc}") from None
        for role in ("ra_column", "dec_column", "id_column"):
            if definition.column(getattr(definition, role)) is None:
                raise DefinitionError(
                    f"{source}: {role} {getattr(definition, role)!r} is not among the columns"
                )
        return definition


def _context_options(data: dict[str, Any], columns: dict[str, ColumnDef], source: str) -> dict[str, Any]:
    """The context-catalog keys of a definition, checked: a typo here would otherwise surface as an alert
    stream whose objects silently never get a host galaxy."""
    given = {k: data[k] for k in _CONTEXT_KEYS if data.get(k) is not None}
    if not given:
        return {}
    enabled = given.get("context", False)
    if not isinstance(enabled, bool):
        raise DefinitionError(f"{source}: context must be true or false, not {enabled!r}")
    if not enabled:
        # a stored definition (`to_dict`) carries every key with its default: only settings count
        defaults = {"context_radius_arcsec": DEFAULT_CONTEXT_RADIUS_ARCSEC}
        others = sorted(
            k for k, v in given.items() if k != "context" and v not in ("", [], (), defaults.get(k))
        )
        if others:
            raise DefinitionError(f"{source}: {', '.join(others)} need context: true")
        return {"context": False}
    radius = given.get("context_radius_arcsec", DEFAULT_CONTEXT_RADIUS_ARCSEC)
    if (
        isinstance(radius, bool)
        or not isinstance(radius, int | float)
        or not 0 < radius <= MAX_CONTEXT_RADIUS_ARCSEC
    ):
        raise DefinitionError(
            f"{source}: context_radius_arcsec must be a number of arcsec in "
            f"(0, {MAX_CONTEXT_RADIUS_ARCSEC:g}], not {radius!r}"
        )
    fields = given.get("context_fields", [])
    if isinstance(fields, str) or not isinstance(fields, list | tuple):
        raise DefinitionError(f"{source}: context_fields must be a list of column names, not {fields!r}")
    for name in fields:
        if name not in columns:
            raise DefinitionError(f"{source}: context_fields names {name!r}, which is not among the columns")
    if len(set(fields)) != len(fields):
        raise DefinitionError(f"{source}: context_fields lists a column twice: {list(fields)}")
    type_column = str(given.get("context_type_column", ""))
    if type_column:
        col = columns.get(type_column)
        if col is None:
            raise DefinitionError(f"{source}: context_type_column {type_column!r} is not among the columns")
        if col.datatype not in ("string", "bool", "float32", "float64"):
            raise DefinitionError(
                f"{source}: context_type_column {type_column!r} is {col.datatype}; it must be a string "
                "(star/galaxy/qso/...), a bool (true: extended, a galaxy) or a float stellarity (0-1)"
            )
    default_type = str(given.get("context_default_type", ""))
    if default_type and default_type not in CONTEXT_TYPES:
        raise DefinitionError(
            f"{source}: context_default_type {default_type!r}: use one of {', '.join(CONTEXT_TYPES)}"
        )
    return {
        "context": True,
        "context_radius_arcsec": float(radius),
        "context_fields": tuple(str(f) for f in fields),
        "context_type_column": type_column,
        "context_default_type": default_type,
    }


def catalogs_dir() -> Path:
    """Where catalog definitions live: $DAC_CATALOGS_DIR, else the repository's catalogs/ folder."""
    if os.environ.get("DAC_CATALOGS_DIR"):
        return Path(os.environ["DAC_CATALOGS_DIR"])
    repo = Path(__file__).resolve().parents[1] / "catalogs"
    return repo if repo.is_dir() else Path("catalogs")


def load_definition(name_or_path: str | Path) -> CatalogDef:
    """Load a definition by catalog name (from `catalogs_dir()`) or by file path."""
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = catalogs_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise DefinitionError(f"no catalog definition {path} (write one: see catalogs/README.md)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DefinitionError(f"{path}: expected a mapping at the top level")
    return CatalogDef.from_dict(data, source=str(path))
