"""Checking one input table against the catalog definition and bringing it to the definition's schema.

Pure functions over Arrow tables (no I/O), so every rule is tested on its own. Each failure raises
`InputError` naming the file, the column and, where one row is at fault, the row (1-based, as an
astronomer counting lines in a CSV would).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dac_lake.catalog_def import CatalogDef
from ingest.readers import InputError


@dataclass
class ConformResult:
    table: pa.Table
    skipped_rows: int
    skipped_reasons: dict[str, int]
    #: 0-based row of each kept row in the input file (so later errors can name the original row)
    row_numbers: np.ndarray


def conform_table(
    table: pa.Table,
    definition: CatalogDef,
    source: str,
    skip_bad_rows: bool = False,
) -> ConformResult:
    """Check and cast `table` (read from `source`) to the definition; optionally drop bad positions."""
    names = table.column_names
    for role, col in (
        ("RA", definition.ra_column),
        ("Dec", definition.dec_column),
        ("id", definition.id_column),
    ):
        if col not in names:
            raise InputError(f"{source}: the {role} column {col!r} is missing (columns: {', '.join(names)})")
    extra = [n for n in names if definition.column(n) is None]
    if extra:
        raise InputError(
            f"{source}: column(s) {', '.join(map(repr, extra))} are not in the catalog definition "
            f"{definition.name!r}; add them to catalogs/{definition.name}.yaml or drop them from the input"
        )
    missing = [c.name for c in definition.columns if c.name not in names]
    if missing:
        raise InputError(f"{source}: column(s) {', '.join(map(repr, missing))} of the definition are missing")

    arrays = []
    for col in definition.columns:
        arrays.append(_cast_column(table.column(col.name), col.arrow_type, col.name, source))
        if not col.nullable and arrays[-1].null_count:
            row = _first_true(pc.is_null(arrays[-1]))
            raise InputError(
                f"{source}: column {col.name!r} must not be null but row {row + 1} is "
                f"({arrays[-1].null_count} null rows in all)"
            )
    schema = pa.schema([pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in definition.columns])
    out = pa.Table.from_arrays(arrays, schema=schema)

    ids = out.column(definition.id_column)
    if ids.null_count:
        row = _first_true(pc.is_null(ids))
        raise InputError(f"{source}: id column {definition.id_column!r} is null at row {row + 1}")

    ra = out.column(definition.ra_column).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    dec = out.column(definition.dec_column).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    reasons = {
        f"{definition.ra_column} is NaN or null": ~np.isfinite(ra),
        f"{definition.ra_column} outside [0, 360)": np.isfinite(ra) & ((ra < 0) | (ra >= 360)),
        f"{definition.dec_column} is NaN or null": ~np.isfinite(dec),
        f"{definition.dec_column} outside [-90, 90]": np.isfinite(dec) & ((dec < -90) | (dec > 90)),
    }
    bad = np.zeros(len(ra), dtype=bool)
    for mask in reasons.values():
        bad |= mask
    counts = {reason: int(mask.sum()) for reason, mask in reasons.items() if mask.any()}
    if bad.any():
        if not skip_bad_rows:
            reason, mask = next((r, m) for r, m in reasons.items() if m.any())
            row = int(np.argmax(mask))
            raise InputError(
                f"{source}: row {row + 1}: {reason} (ra={ra[row]!r}, dec={dec[row]!r}); "
                f"{int(bad.sum())} bad position(s) in this file. Fix the input, or pass --skip-bad-rows "
                "to leave such rows out"
            )
        out = out.filter(pa.array(~bad))
        return ConformResult(out, int(bad.sum()), counts, np.flatnonzero(~bad))
    return ConformResult(out, 0, counts, np.arange(len(ra)))


def _cast_column(column: pa.ChunkedArray, target: pa.DataType, name: str, source: str) -> pa.ChunkedArray:
    """Safe cast: ints to floats and narrower-to-wider are fine; lossy or impossible casts are errors."""
    if column.type == target:
        return column
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), target)
    src = column.type
    if (pa.types.is_string(src) or pa.types.is_large_string(src)) and not (
        pa.types.is_string(target) or pa.types.is_large_string(target)
    ):
        raise InputError(f"{source}: column {name!r} holds text ({src}) but the definition says {target}")
    if (pa.types.is_floating(src) and pa.types.is_integer(target)) or (
        pa.types.is_boolean(target) and not pa.types.is_boolean(src) and not pa.types.is_integer(src)
    ):
        raise InputError(f"{source}: column {name!r} is {src} but the definition says {target}")
    try:
        return pc.cast(column, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{source}: column {name!r} ({src}) cannot be read as {target}: {exc}") from None


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    arr = np.asarray(mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy") else mask)
    return int(np.argmax(arr))


def find_duplicate_ids(ids: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """How many ids repeat the one before them in sorted order, and the positions (a, b) of the first
    (smallest) repeated id, in input order. Pure, so the Dask path checks id ranges with the same rule."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if not len(dup):
        return 0, None
    return len(dup), (int(order[dup[0]]), int(order[dup[0] + 1]))


def duplicate_id_message(
    column: str, value, first: tuple[str, int], second: tuple[str, int], count: int
) -> str:
    """The error for a repeated id: both places (file, 0-based row) and the number of repeats."""
    return (
        f"duplicate id {column}={value!r}: {first[0]} row {first[1] + 1} and {second[0]} row {second[1] + 1} "
        f"({count} duplicate(s) in all); ids must be unique"
    )


def check_unique_ids(
    ids: np.ndarray, sources: np.ndarray, rows: np.ndarray, file_names: list[str], column: str
):
    """Raise if an id occurs twice, naming both places. `ids` need not be sorted."""
    count, first = find_duplicate_ids(ids)
    if first is not None:
        a, b = first
        raise InputError(
            duplicate_id_message(
                column,
                ids[a].item() if hasattr(ids[a], "item") else ids[a],
                (file_names[sources[a]], int(rows[a])),
                (file_names[sources[b]], int(rows[b])),
                count,
            )
        )
