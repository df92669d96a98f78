"""ADQL's scalar and aggregate functions and how each maps onto DuckDB.

The table is the allow-list: a function name that is not here (or among the geometry functions handled
in translate.py) is rejected, which is what keeps `read_csv`, `glob`, `getenv`, ... out of the SQL. Some
names map to different DuckDB functions because the semantics differ (ADQL LOG is natural, DuckDB's LOG is
base 10; ADQL TRUNCATE takes a number of decimals; RAND's seed has undefined semantics in ADQL).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import AdqlError


@dataclass(frozen=True)
class Fn:
    """duckdb: target function name; result: a datatype, 'same' (of first arg) or 'first_meta'."""

    duckdb: str
    min_args: int
    max_args: int
    result: str
    const: Callable[..., float] | None = None


def _cot(x: float) -> float:
    return 1.0 / math.tan(x)


SCALAR: dict[str, Fn] = {
    "ABS": Fn("ABS", 1, 1, "same", abs),
    "CEILING": Fn("CEIL", 1, 1, "same", math.ceil),
    "FLOOR": Fn("FLOOR", 1, 1, "same", math.floor),
    "POWER": Fn("POWER", 2, 2, "float64", math.pow),
    "SQRT": Fn("SQRT", 1, 1, "float64", math.sqrt),
    "EXP": Fn("EXP", 1, 1, "float64", math.exp),
    "LOG": Fn("LN", 1, 1, "float64", math.log),
    "LOG10": Fn("LOG10", 1, 1, "float64", math.log10),
    "PI": Fn("PI", 0, 0, "float64", lambda: math.pi),
    "SIN": Fn("SIN", 1, 1, "float64", math.sin),
    "COS": Fn("COS", 1, 1, "float64", math.cos),
    "TAN": Fn("TAN", 1, 1, "float64", math.tan),
    "COT": Fn("COT", 1, 1, "float64", _cot),
    "ASIN": Fn("ASIN", 1, 1, "float64", math.asin),
    "ACOS": Fn("ACOS", 1, 1, "float64", math.acos),
    "ATAN": Fn("ATAN", 1, 1, "float64", math.atan),
    "ATAN2": Fn("ATAN2", 2, 2, "float64", math.atan2),
    "DEGREES": Fn("DEGREES", 1, 1, "float64", math.degrees),
    "RADIANS": Fn("RADIANS", 1, 1, "float64", math.radians),
    "LOWER": Fn("LOWER", 1, 1, "string"),
    "UPPER": Fn("UPPER", 1, 1, "string"),
    "COALESCE": Fn("COALESCE", 1, 1000, "first_meta"),
}

# Handled specially in translate.py (argument shapes or semantics differ from a plain call).
SPECIAL = {"ROUND", "TRUNCATE", "MOD", "RAND", "IN_UNIT", "IVO_HEALPIX_INDEX"}
AGGREGATES = {"COUNT", "SUM", "AVG", "MIN", "MAX"}
GEOMETRY = {
    "POINT",
    "CIRCLE",
    "BOX",
    "POLYGON",
    "CENTROID",
    "CONTAINS",
    "INTERSECTS",
    "DISTANCE",
    "AREA",
    "COORD1",
    "COORD2",
    "COORDSYS",
    "REGION",
}
ALL_NAMES = sorted(set(SCALAR) | SPECIAL | AGGREGATES | GEOMETRY)


def const_eval(fn: Fn, args: list[float]) -> float | None:
    """Value of a function of constants, or None if unknown or out of domain (the SQL then decides)."""
    if fn.const is None:
        return None
    try:
        value = float(fn.const(*args))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


@functools.lru_cache(maxsize=256)
def _unit(text: str):  # -> astropy UnitBase
    from astropy import units as u

    try:
        return u.Unit(text, format="vounit")
    except ValueError:
        return u.Unit(text)


def unit_factor(source_unit: str, target_unit: str) -> float:
    """Multiplicative factor converting `source_unit` values to `target_unit` (astropy units)."""
    from astropy import units as u

    if not source_unit:
        raise AdqlError(f"IN_UNIT: the value has no known unit, so it cannot be converted to '{target_unit}'")
    try:
        target = _unit(target_unit)
    except ValueError:
        raise AdqlError(f"IN_UNIT: '{target_unit}' is not a valid VOUnit") from None
    try:
        source = _unit(source_unit)
    except ValueError:
        raise AdqlError(f"IN_UNIT: the value's unit '{source_unit}' is not understood") from None
    try:
        return float(source.to(target))
    except u.UnitConversionError:
        raise AdqlError(f"IN_UNIT: cannot convert '{source_unit}' to '{target_unit}'") from None
