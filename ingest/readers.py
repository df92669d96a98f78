"""Reading survey input files (Parquet, CSV, FITS tables, VOTable), local or on S3, into Arrow tables.

Every error names the file: an operator loading forty files must know which one is broken.
"""

from __future__ import annotations

import glob as globlib
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".xml": "votable",
    ".vot": "votable",
    ".votable": "votable",
}


class InputError(ValueError):
    """Input data that cannot be ingested; the message names the file, row or column."""


@dataclass(frozen=True)
class InputFile:
    """One input: a local path or an s3:// URL, and its format."""

    location: str
    format: str

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")


def detect_format(name: str) -> str:
    lower = name.lower()
    for compressed in (".gz", ".bz2", ".zst"):
        if lower.endswith(compressed):
            lower = lower[: -len(compressed)]
    suffix = Path(lower).suffix
    if suffix not in FORMATS:
        raise InputError(
            f"{name}: unknown input format {suffix!r}; use Parquet (.parquet), CSV (.csv/.tsv), "
            "FITS (.fits) or VOTable (.xml/.vot)"
        )
    return FORMATS[suffix]


def expand_inputs(patterns: Iterable[str], storage: LakeStorage | None = None) -> list[InputFile]:
    """Expand globs (local or s3://) into a sorted, de-duplicated list of input files."""
    files: list[str] = []
    for pattern in patterns:
        if pattern.startswith("s3://"):
            if storage is None:
                raise InputError(f"{pattern}: S3 inputs need S3 settings")
            fs = storage.fsspec
            matches = fs.glob(pattern[5:]) if any(c in pattern for c in "*?[") else [pattern[5:]]
            matches = [m for m in matches if fs.isfile(m)]
            if not matches:
                raise InputError(f"{pattern}: no such input file")
            files.extend("s3://" + m for m in matches if fs.isfile(m))
        else:
            path = Path(pattern).expanduser()
            if any(c in pattern for c in "*?["):
                matches = sorted(globlib.glob(str(path), recursive=True))
                if not matches:
                    raise InputError(f"{pattern}: the pattern matches no file")
                files.extend(m for m in matches if Path(m).is_file())
            elif path.is_dir():
                files.extend(
                    str(p) for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")
                )
            elif path.is_file():
                files.append(str(path))
            else:
                raise InputError(f"{pattern}: no such input file")
    seen: dict[str, None] = dict.fromkeys(files)
    if not seen:
        raise InputError("no input files given")
    return [InputFile(f, detect_format(f)) for f in seen]


def _open_bytes(inp: InputFile, storage: LakeStorage | None) -> bytes:
    if inp.is_s3:
        assert storage is not None
        with storage.fsspec.open(inp.location[5:], "rb", compression="infer") as fh:
            return fh.read()
    import fsspec

    with fsspec.open(inp.location, "rb", compression="infer") as fh:
        return fh.read()


def read_input(
    inp: InputFile,
    storage: LakeStorage | None = None,
    column_types: dict[str, pa.DataType] | None = None,
) -> pa.Table:
    """Read one input file into an Arrow table. CSV columns are parsed with the definition's types, so a
    malformed value is reported with its row and column by the CSV parser itself."""
    try:
        if inp.format == "parquet":
            if inp.is_s3:
                assert storage is not None
                return pq.read_table(inp.location[5:], filesystem=storage.pa_fs)
            return pq.read_table(inp.location)
        data = _open_bytes(inp, storage)
        if inp.format in {"csv", "tsv"}:
            parse = pacsv.ParseOptions(delimiter="\t" if inp.format == "tsv" else ",")
            convert = pacsv.ConvertOptions(
                column_types=column_types or {},
                strings_can_be_null=True,
                null_values=["", "NULL", "null", "NaN", "nan", "--"],
            )
            try:
                return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
            except pa.ArrowInvalid as exc:
                raise InputError(f"{inp.location}: {_locate_csv_error(data, parse, convert, exc)}") from None
        if inp.format == "fits":
            return _astropy_to_arrow(_read_astropy(data, "fits"))
        if inp.format == "votable":
            return _astropy_to_arrow(_read_astropy(data, "votable"))
    except InputError:
        raise
    except pa.ArrowInvalid as exc:
        raise InputError(f"{inp.location}: {exc}") from None
    except Exception as exc:
        raise InputError(
            f"{inp.location}: cannot read as {inp.format}: {type(exc).__name__}: {exc}"
        ) from None
    raise InputError(f"{inp.location}: unsupported format {inp.format}")


def _locate_csv_error(data: bytes, parse, convert, exc: Exception) -> str:
    """pyarrow names the CSV column of a conversion error but not the row: find the first bad row by
    reading that column as text and converting it value by value."""
    import re

    match = re.search(r"column #(\d+)", str(exc))
    if not match:
        return str(exc)
    index = int(match.group(1))
    import csv

    header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    name = next(csv.reader([header], delimiter=parse.delimiter))[index].strip()
    target = (convert.column_types or {}).get(name)
    raw = (
        pacsv.read_csv(
            io.BytesIO(data),
            parse_options=parse,
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string()}, include_columns=[name]),
        )
        .column(name)
        .to_pylist()
    )
    for row, value in enumerate(raw):
        if value is None or value in convert.null_values:
            continue
        try:
            pa.array([value]).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return f"row {row + 1} (line {row + 2}), column {name!r}: {value!r} is not a valid {target}"
    return f"column {name!r}: {exc}"


def _read_astropy(data: bytes, fmt: str):
    from astropy.table import Table

    return Table.read(io.BytesIO(data), format=fmt)


def _astropy_to_arrow(table) -> pa.Table:
    """astropy Table -> Arrow: native byte order, masked values as nulls, bytes as strings."""
    arrays = {}
    for name in table.colnames:
        col = table[name]
        values = np.asarray(col)
        mask = np.asarray(col.mask) if hasattr(col, "mask") and col.mask is not None else None
        if values.dtype.kind == "S":
            values = np.char.decode(values, "utf-8")
        if values.dtype.kind in "biuf" and values.dtype.byteorder not in ("=", "|"):
            values = values.astype(values.dtype.newbyteorder("="))
        if values.ndim > 1:
            raise InputError(
                f"column {name!r} is an array column (shape {values.shape[1:]}); not supported yet"
            )
        arrays[name] = pa.array(values, mask=mask if mask is not None and mask.any() else None)
    return pa.table(arrays)
