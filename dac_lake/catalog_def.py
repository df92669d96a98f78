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
