"""ADQL 2.1 -> DuckDB SQL translator (pure: no I/O).

`translate(adql, registry, maxrec)` parses ADQL with a dedicated sqlglot dialect, rebuilds the query from
an allow-list (SELECT, set operations, WITH; ADQL functions only; registry tables only), resolves names
against the caller's visible tables, rewrites geometry into exact spherical SQL and returns the DuckDB SQL
with the plan (table refs with their spatial regions, cross-matches, output column metadata).
"""

from .errors import (
    AdqlError,
    AdqlSyntaxError,
    AdqlTooComplex,
    AdqlUnknownColumn,
    AdqlUnknownTable,
    AdqlUnsupported,
)
from .model import (
    Circle,
    ColumnMeta,
    CrossMatch,
    OutputColumn,
    Polygon,
    Region,
    Registry,
    TableMeta,
    TableRef,
    Translation,
)
from .translate import translate

__all__ = [
    "AdqlError",
    "AdqlSyntaxError",
    "AdqlTooComplex",
    "AdqlUnknownColumn",
    "AdqlUnknownTable",
    "AdqlUnsupported",
    "Circle",
    "ColumnMeta",
    "CrossMatch",
    "OutputColumn",
    "Polygon",
    "Region",
    "Registry",
    "TableMeta",
    "TableRef",
    "Translation",
    "translate",
]
