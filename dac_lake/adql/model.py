"""The translator's public data model: what it needs from the registry and what it hands to the engine.

These are plain frozen/mutable dataclasses so that the engine, the TAP layer and the tests can build and
inspect them without touching sqlglot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

DATATYPES = ("bool", "int8", "int16", "int32", "int64", "float32", "float64", "string", "timestamp")


@dataclass(frozen=True)
class ColumnMeta:
    """One column of a registry table. `datatype` is one of `DATATYPES`; `unit` is a VOUnit string."""

    name: str
    datatype: str
    unit: str = ""
    ucd: str = ""
    description: str = ""


@dataclass(frozen=True)
class TableMeta:
    """One table as the caller may see it. `ra_column`/`dec_column` (ICRS degrees) enable spatial planning.

    The partition files also hold `_healpix_29` (the HATS spatial index); it is deliberately absent from
    `columns` so that it never leaks into `SELECT *`.
    """

    schema: str
    name: str
    columns: tuple[ColumnMeta, ...]
    ra_column: str | None = None
    dec_column: str | None = None


class Registry(Protocol):
    """Source of table metadata. Only the caller's visible tables are returned, which is how access
    control reaches the translator: an invisible table is simply unknown."""

    def tables(self) -> list[TableMeta]: ...


@dataclass(frozen=True)
class Circle:
    """A spherical cap: centre (ra, dec) and radius, all in degrees."""

    ra: float
    dec: float
    radius: float


@dataclass(frozen=True)
class Polygon:
    """A spherical polygon with great-circle edges; vertices (ra, dec) in degrees, interior = the smaller
    of the two regions the boundary delimits. ADQL BOXes are converted to 4-vertex polygons."""

    vertices: tuple[tuple[float, float], ...]


Region = Circle | Polygon


@dataclass
class TableRef:
    """One occurrence of a registry table in the query.

    `relation` is the only name by which the generated SQL reads the table: the engine must create it (a
    view over the partition files that may hold rows inside `regions`) before running the SQL. `regions`
    are constant regions every row that can contribute to the result lies in (conjunctive: the row lies
    in all of them); empty means a full scan. The SQL always re-checks the exact condition, so a coverage
    that is a superset of the regions is correct.
    """

    relation: str
    table: TableMeta
    alias: str | None
    regions: list[Region] = field(default_factory=list)


#: a point within this fraction of a HEALPix cell's mean size of another lies in that one's cell or one of
#: its 8 neighbours: the smallest such distance measured over every order 3-16 (random points, and points
#: near the base-pixel corners where a cell has 7 neighbours) was 0.65-0.70 mean cell sizes; hats assumes
#: 1/1.6 = 0.625; 0.45 leaves a margin of 1.4 below that
NEIGHBOUR_SAFE_FRACTION = 0.45
#: finest cells used for a neighbour join (0.2 arcsec: radii below that gain nothing from finer ones)
MAX_NEIGHBOUR_ORDER = 20


def neighbour_order(radius_deg: float) -> int | None:
    """The finest HEALPix order whose cells' neighbourhoods (the cell and its 8 neighbours) hold every
    point within `radius_deg` of any point of the cell; None above ~26 degrees (even order 0 is too fine,
    the declination band is used instead)."""
    if not math.isfinite(radius_deg) or radius_deg < 0:
        return None
    for order in range(MAX_NEIGHBOUR_ORDER, -1, -1):
        mean_size = math.degrees(math.sqrt(4 * math.pi / (12 * 4**order)))
        if radius_deg <= NEIGHBOUR_SAFE_FRACTION * mean_size:
            return order
    return None


@dataclass
class CrossMatch:
    """Two table refs (by relation) joined by `distance <= radius_deg`.

    Without `key`, the SQL carries a declination-band pre-filter plus the exact test (a range join). With
    `key` (a column name), the SQL instead requires `left.key = right.key` plus the exact test, and the
    engine must give both relations that column, at HEALPix `order` (cell = `_healpix_29 >> 2(29-order)`):
    one side (the anchor) its own cell, the other (the expanded side, one of `expandable`) one row per cell
    `a` whose neighbourhood (`a` and its 8 neighbours) holds the row's own cell, with `key = a`. Any pair
    within the radius then meets exactly once (`neighbour_order`).

    `expandable`: the relations whose rows this condition filters, i.e. not the preserved side of an outer
    join. Only those may be repeated through a neighbour table, and only those may be limited to the
    other side's region grown by the radius (a preserved side keeps its unmatched rows)."""

    left: str
    right: str
    radius_deg: float
    key: str | None = None
    order: int | None = None
    expandable: tuple[str, ...] = ()


@dataclass
class OutputColumn:
    """Metadata of one result column (for VOTable FIELDs). `datatype` is one of `DATATYPES`."""

    name: str
    datatype: str
    unit: str = ""
    ucd: str = ""
    description: str = ""


@dataclass
class Translation:
    """The result of `translate`.

    `maxrec` echoes the caller's MAXREC. The SQL's outermost LIMIT is min(TOP, maxrec + 1), so the caller
    detects overflow (and must then return only `maxrec` rows and flag OVERFLOW) exactly when it receives
    more than `maxrec` rows.
    """

    sql: str
    table_refs: list[TableRef]
    crossmatches: list[CrossMatch]
    columns: list[OutputColumn]
    maxrec: int | None
