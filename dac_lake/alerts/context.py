"""Context of alert objects (Lasair's Sherlock, simplified): the nearest sources of the lake's context
catalogs around each new object, and a classification from them, matched once and stored in the lake.

Which catalogs: those whose definition says `context: true` (catalogs/README.md). Each gives its own match
radius (`context_radius_arcsec`, default 30"), the columns to record (`context_fields`, e.g. a host
galaxy's redshift and magnitude) and what kind of source a row is (`context_type_column`, or one
`context_default_type` for the whole catalog).

Why match at ingest and store, rather than cone-search at page time: an object page then costs one read of
one small file, whatever the number of context catalogs; and a batch of new objects is one cross-match
query per catalog (an in-memory table joined on HEALPix cells by the query engine, `dac_lake.xmatch`), not
a cone search per object. The ingest calls, after each committed batch and only for objects first seen in
it:

    matcher = ContextMatcher(lake, "ztf")          # long-lived: keeps the engine and its caches
    matcher.store(seq, matcher.match(new_objects)) # new_objects: object_id, ra, dec (the objects table rows)

**The table `match` returns** (`CONTEXT_SCHEMA`), ordered by object then separation: one row per match,
at most `k` (3) per object and catalog, nearest first (`rank` 1..k within its catalog), plus, for an object
with no match in any catalog, one row with `catalog` null and `rank` 0, so that "matched, nothing there" is
distinguishable from "never matched". Columns: object_id, object_ra, object_dec, classification (the
object's, repeated on each of its rows), catalog (the catalog's name), source_id (the catalog's id as text:
ids are int64 in one catalog and strings in another), ra, dec (the source's), separation_arcsec, rank,
source_type (star, galaxy, qso or unknown), fields (the recorded `context_fields` as a JSON object text:
typed columns would differ per catalog; `null` for NaN).

**Classification** (first rule that applies; `STAR_ARCSEC` = `NUCLEAR_ARCSEC` = 1"):

1. `variable star`: a star within 1";
2. `AGN`: a QSO/AGN within 1";
3. `nuclear`: a galaxy within 1" (at its core: a nuclear transient, a TDE, an AGN flare);
4. `host-associated`: a galaxy within its catalog's radius (a supernova candidate in its host);
5. `unclear`: sources within the radius, none of the above (unknown types, or stars/QSOs beyond 1");
6. `orphan`: no source of any context catalog within its radius.

**Storage**: `alerts/<stream>/context/<pixel>/batch-<seq>.parquet`, `<pixel>` the order-3 HEALPix pixel
(nested, ~7.3 deg) of the object's position: an object's context is read from its pixel folder only. A file
holds the rows of one committed batch (snapshot `seq`) in that pixel, sorted by object_id, plus a `seq`
column; rewriting the same seq replaces the file (idempotent: a re-run of the broker after a crash writes
the same file again). If an object was matched in several batches, the newest seq wins.
`compact_context` merges a pixel's many batch files into one `compact-<seq>.parquet` (run it periodically).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dac_lake.adql.model import ColumnMeta, TableMeta
from dac_lake.alerts import layout as alayout
from dac_lake.catalog_def import DEFAULT_CONTEXT_RADIUS_ARCSEC
from dac_lake.coverage import cone_ranges29
from dac_lake.healpix import SPATIAL_INDEX_ORDER, healpix29
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

CONTEXT_DIR = "context"
#: HEALPix order of the folders the context rows are stored in (~7.3 deg pixels, 768 over the sky)
PIXEL_ORDER = 3
#: matches kept per object and catalog
K_NEAREST = 3
#: a star (QSO) closer than this is the object itself: a variable star (an AGN)
STAR_ARCSEC = 1.0
#: a galaxy closer than this hosts the object at its core
NUCLEAR_ARCSEC = 1.0
#: stellarity (a float type column, e.g. SExtractor's class_star): >= this a star, <= 1 - this a galaxy
STELLARITY_CUT = 0.8
#: the radius of the page-time fallback in every positional catalog when no catalog is marked `context`
FALLBACK_RADIUS_ARCSEC = 10.0
#: around a position, the order-3 pixels within this distance are read (an object's mean position moves
#: by far less between its first batch and a page view)
LOOKUP_ARCSEC = 5.0

CLASSES = ("variable star", "AGN", "nuclear", "host-associated", "unclear", "orphan")
UPLOAD = "TAP_UPLOAD"
_UPLOAD_NAME = "context_objects"

CONTEXT_SCHEMA = pa.schema(
    [
        pa.field("object_id", pa.string(), nullable=False),
        pa.field("object_ra", pa.float64()),
        pa.field("object_dec", pa.float64()),
        pa.field("classification", pa.string()),
        pa.field("catalog", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("separation_arcsec", pa.float64()),
        pa.field("rank", pa.int16()),
        pa.field("source_type", pa.string()),
        pa.field("fields", pa.string()),
    ]
)
STORED_SCHEMA = CONTEXT_SCHEMA.append(pa.field("seq", pa.int64()))
#: the columns of a match (the rest are the object's)
_MATCH_COLUMNS = ("catalog", "source_id", "ra", "dec", "separation_arcsec", "rank", "source_type", "fields")


# ---------------------------------------------------------------------------------------------- catalogs
@dataclass(frozen=True)
class ContextCatalog:
    """One context catalog, from the definition stored with its current release."""

    catalog: str
    table: str  # ADQL table name (without the schema)
    id_column: str
    ra_column: str
    dec_column: str
    radius_arcsec: float
    fields: tuple[str, ...] = ()
    type_column: str = ""
    type_datatype: str = ""
    default_type: str = ""

    @property
    def qualified(self) -> str:
        return f"{_ident(self.catalog)}.{_ident(self.table)}"

    @classmethod
    def from_lake_table(cls, lt: Any, fallback: bool = False) -> ContextCatalog | None:
        """The context settings of a LakeTable (a current release), None if it is not a context catalog.
        `fallback`: any catalog with positions, at FALLBACK_RADIUS_ARCSEC (pages, when none is marked)."""
        d = lt.definition
        if lt.meta.schema != lt.catalog or not lt.meta.ra_column or not lt.meta.dec_column:
            return None
        if "dataset_prefix" in lt.manifest:  # an alert stream's table
            return None
        opts = {**(d.get("extra") or {}), **{k: v for k, v in d.items() if k.startswith("context")}}
        if not opts.get("context") and not fallback:
            return None
        marked = bool(opts.get("context"))
        types = {c["name"]: c["datatype"] for c in d.get("columns", [])}
        type_column = str(opts.get("context_type_column") or "") if marked else ""
        radius = opts.get("context_radius_arcsec") or DEFAULT_CONTEXT_RADIUS_ARCSEC
        return cls(
            catalog=lt.catalog,
            table=lt.meta.name,
            id_column=str(d.get("id_column") or lt.meta.ra_column),
            ra_column=lt.meta.ra_column,
            dec_column=lt.meta.dec_column,
            radius_arcsec=float(radius) if marked else FALLBACK_RADIUS_ARCSEC,
            fields=tuple(f for f in (opts.get("context_fields") or ()) if f in types) if marked else (),
            type_column=type_column if type_column in types else "",
            type_datatype=types.get(type_column, ""),
            default_type=str(opts.get("context_default_type") or "") if marked else "",
        )


def context_catalogs(registry: Any, fallback: bool = False) -> list[ContextCatalog]:
    """The context catalogs a registry (a caller's view of the lake) shows; with `fallback`, every
    positional release catalog when none is marked `context: true`."""
    tables = registry.lake_tables()
    found = [c for c in (ContextCatalog.from_lake_table(t) for t in tables) if c is not None]
    if not found and fallback:
        found = [c for c in (ContextCatalog.from_lake_table(t, True) for t in tables) if c is not None]
    return sorted(found, key=lambda c: c.catalog)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------- types
_STAR = {"star", "s", "*", "stellar", "point", "psf"}
_GALAXY = {"galaxy", "g", "gal", "extended", "ext"}
_QSO = {"qso", "agn", "quasar", "q", "blazar", "seyfert"}


def _kind_of_text(value: str | None, default: str) -> str:
    if value is None:
        return default
    v = value.strip().lower()
    if v in _STAR:
        return "star"
    if v in _GALAXY:
        return "galaxy"
    if v in _QSO:
        return "qso"
    if "qso" in v or "agn" in v or "quasar" in v:
        return "qso"
    if "gal" in v:
        return "galaxy"
    if "star" in v:
        return "star"
    return default


def source_types(column: pa.ChunkedArray | pa.Array, datatype: str, default: str) -> pa.Array:
    """What kind of source each row is: star, galaxy, qso or unknown, from the catalog's type column
    (text: star/galaxy/qso and common spellings; bool: true = extended = galaxy; float: stellarity, star
    at >= STELLARITY_CUT, galaxy at <= 1 - STELLARITY_CUT) or its default type."""
    default = default or "unknown"
    n = len(column)
    if datatype == "bool":
        flags = column.to_numpy(zero_copy_only=False)
        valid = ~pc.is_null(column).to_numpy(zero_copy_only=False)
        out = np.where(flags.astype(bool), "galaxy", "star").astype(object)
        out[~valid] = default
        return pa.array(out, pa.string())
    if datatype.startswith("float"):
        x = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        out = np.full(n, default, dtype=object)
        out[x >= STELLARITY_CUT] = "star"
        out[x <= 1 - STELLARITY_CUT] = "galaxy"
        return pa.array(out, pa.string())
    values = pc.cast(column, pa.string())
    encoded = (values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values).dictionary_encode()
    kinds = pa.array([_kind_of_text(v, default) for v in encoded.dictionary.to_pylist()], pa.string())
    taken = kinds.take(encoded.indices)
    return pc.fill_null(taken, default)


# ---------------------------------------------------------------------------------------------- classify
def classify_arrays(
    obj: np.ndarray, n_objects: int, kind: np.ndarray, sep: np.ndarray, within: np.ndarray | None = None
) -> np.ndarray:
    """The classification of objects 0..n_objects-1 from their matches (object index, source type,
    separation in arcsec; `within`: the match is inside its catalog's radius, default all): see the
    module docstring for the rules. Vectorised: a 10k-object batch is a few numpy passes."""
    obj = np.asarray(obj, dtype=np.int64)
    sep = np.asarray(sep, dtype=np.float64)
    kind = np.asarray(kind, dtype=object)
    if within is None:
        within = np.ones(len(obj), bool)

    def has(mask: np.ndarray) -> np.ndarray:
        out = np.zeros(n_objects, bool)
        out[obj[mask & within]] = True
        return out

    star, qso, gal = kind == "star", kind == "qso", kind == "galaxy"
    rules = [
        ("variable star", has(star & (sep <= STAR_ARCSEC))),
        ("AGN", has(qso & (sep <= NUCLEAR_ARCSEC))),
        ("nuclear", has(gal & (sep <= NUCLEAR_ARCSEC))),
        ("host-associated", has(gal)),
        ("unclear", has(np.ones(len(obj), bool))),
    ]
    out = np.full(n_objects, "orphan", dtype=object)
    for label, mask in reversed(rules):  # the first rule that applies wins: apply the last first
        out[mask] = label
    return out


def classify(matches: Iterable[dict[str, Any]]) -> str:
    """The classification of one object from its match rows (dicts with source_type and
    separation_arcsec; rows without a catalog are ignored). Used when a page hides rows of catalogs the
    caller may not read: the classification then only uses what the caller sees."""
    rows = [m for m in matches if m.get("catalog") is not None]
    if not rows:
        return "orphan"
    kinds = np.array([m.get("source_type") or "unknown" for m in rows], dtype=object)
    seps = np.array([float(m["separation_arcsec"]) for m in rows])
    return str(classify_arrays(np.zeros(len(rows), np.int64), 1, kinds, seps)[0])


# ---------------------------------------------------------------------------------------------- matching
def _json_texts(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each value of a column as JSON text ("null" for null and NaN), vectorised: numbers and booleans are
    cast by Arrow, other values are encoded once per distinct value. (json.dumps per row took 0.4 s for a
    10k-object batch's ~20k matches: longer than the cross-match itself.)"""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = arr.type
    if pa.types.is_floating(kind):
        finite = pc.fill_null(pc.is_finite(arr), False)
        return pc.if_else(finite, pc.cast(arr, pa.string()), pa.scalar("null", pa.string()))
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return pc.fill_null(pc.cast(arr, pa.string()), "null")
    if pa.types.is_dictionary(kind):
        arr = arr.dictionary_decode()
    try:
        encoded = pc.dictionary_encode(arr)
    except pa.ArrowNotImplementedError:  # a type Arrow cannot hash: one value at a time
        return pa.array([json.dumps(v, default=str) for v in arr.to_pylist()], pa.string())
    texts = pa.array([json.dumps(v, default=str) for v in encoded.dictionary.to_pylist()], pa.string())
    return pc.fill_null(texts.take(encoded.indices), "null")


def _fields_json(table: pa.Table, names: tuple[str, ...]) -> pa.Array:
    """The `fields` column: a JSON object of the recorded columns per row."""
    if not names:
        return pa.array(["{}"] * table.num_rows, pa.string())
    parts: list[Any] = []
    for i, name in enumerate(names):
        parts.append(("{" if i == 0 else ", ") + json.dumps(name) + ": ")
        parts.append(_json_texts(table.column(name)))
    parts.append("}")
    return pc.binary_join_element_wise(*parts, "")


def _nearest_k(obj: np.ndarray, sep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, ranks 1..k) of each object's k nearest rows, grouped by object, nearest first."""
    order = np.lexsort((sep, obj))
    grouped = obj[order]
    if len(grouped) == 0:
        return order, np.empty(0, np.int16)
    starts = np.r_[0, np.flatnonzero(grouped[1:] != grouped[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)])) + 1
    keep = rank <= k
    return order[keep], rank[keep].astype(np.int16)


def _match_rows(
    cat: ContextCatalog, found: pa.Table, obj: np.ndarray, sep_arcsec: np.ndarray, k: int
) -> tuple[np.ndarray, pa.Table]:
    """The k nearest of the pairs (`found`: the catalog's columns; object index and separation per row) as
    CONTEXT_SCHEMA columns without the object's own (filled in by the caller)."""
    keep, rank = _nearest_k(obj, sep_arcsec, k)
    picked = found.take(pa.array(keep, pa.int64()))
    kinds = (
        source_types(picked.column(cat.type_column), cat.type_datatype, cat.default_type)
        if cat.type_column
        else pa.array([cat.default_type or "unknown"] * len(keep), pa.string())
    )
    rows = pa.table(
        {
            "catalog": pa.array([cat.catalog] * len(keep), pa.string()),
            "source_id": pc.cast(picked.column(cat.id_column), pa.string()),
            "ra": pc.cast(picked.column(cat.ra_column), pa.float64()),
            "dec": pc.cast(picked.column(cat.dec_column), pa.float64()),
            "separation_arcsec": pa.array(sep_arcsec[keep], pa.float64()),
            "rank": pa.array(rank, pa.int16()),
            "source_type": kinds,
            "fields": _fields_json(picked, cat.fields),
        }
    )
    return obj[keep], rows


def assemble(
    object_ids: pa.Array, ra: np.ndarray, dec: np.ndarray, parts: list[tuple[np.ndarray, pa.Table]]
) -> pa.Table:
    """CONTEXT_SCHEMA rows from each catalog's matches (object index, rows): classified, one orphan row per
    object without matches, ordered by object then separation."""
    n = len(object_ids)
    obj = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
    matches = (
        pa.concat_tables([p[1] for p in parts])
        if parts
        else pa.table({f.name: pa.array([], f.type) for f in CONTEXT_SCHEMA if f.name in _MATCH_COLUMNS})
    )
    sep = matches.column("separation_arcsec").to_numpy(zero_copy_only=False)
    kinds = np.asarray(matches.column("source_type").to_pylist(), dtype=object)
    labels = classify_arrays(obj, n, kinds, sep)
    lonely = np.setdiff1d(np.arange(n), obj)
    all_obj = np.concatenate([obj, lonely]).astype(np.int64)
    filler = {
        "catalog": pa.nulls(len(lonely), pa.string()),
        "source_id": pa.nulls(len(lonely), pa.string()),
        "ra": pa.nulls(len(lonely), pa.float64()),
        "dec": pa.nulls(len(lonely), pa.float64()),
        "separation_arcsec": pa.nulls(len(lonely), pa.float64()),
        "rank": pa.array(np.zeros(len(lonely), np.int16)),
        "source_type": pa.nulls(len(lonely), pa.string()),
        "fields": pa.nulls(len(lonely), pa.string()),
    }
    rows = pa.concat_tables([matches.select(list(filler)), pa.table(filler)])
    order = np.lexsort((np.nan_to_num(rows.column("separation_arcsec").to_numpy(zero_copy_only=False),
                                      nan=np.inf), all_obj))  # fmt: skip
    idx = pa.array(all_obj[order], pa.int64())
    rows = rows.take(pa.array(order, pa.int64()))
    out = {
        "object_id": pc.cast(object_ids, pa.string()).take(idx),
        "object_ra": pa.array(ra, pa.float64()).take(idx),
        "object_dec": pa.array(dec, pa.float64()).take(idx),
        "classification": pa.array(labels, pa.string()).take(idx),
    }
    out.update({name: rows.column(name) for name in filler})
    return pa.table(out, schema=CONTEXT_SCHEMA)


class ContextMatcher:
    """Cross-matches alert objects with the lake's context catalogs and stores the result (module
    docstring). Long-lived: one per ingest, it keeps a query engine (trusted: it sees every catalog; pages
    filter the stored rows by the reader's rights) whose footer caches make the next batch faster."""

    def __init__(self, lake: Lake, stream: str, *, engine: Any = None, k: int = K_NEAREST):
        from dac_lake.engine import QueryEngine

        self.lake = lake
        self.stream = alayout.check_stream_name(stream)
        self.engine = engine or QueryEngine(lake, frozenset({"*"}))
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        self.k = k
        #: seconds of the last `match`, per catalog and in all (the ingest logs them)
        self.timings: dict[str, float] = {}

    def catalogs(self) -> list[ContextCatalog]:
        return context_catalogs(self.engine.registry)

    def match(self, objects: pa.Table) -> pa.Table:
        """The context rows (CONTEXT_SCHEMA) of `objects` (columns object_id, ra, dec; more are ignored):
        one cross-match query per context catalog, the object table uploaded to the engine as an in-memory
        table and joined through HEALPix cells; then the k nearest per object and catalog, in numpy."""
        t0 = time.perf_counter()
        self.timings = {}
        ids = objects.column("object_id").combine_chunks() if objects.num_rows else pa.array([], pa.string())
        ra = np.asarray(objects.column("ra").to_numpy(zero_copy_only=False), dtype=np.float64)
        dec = np.asarray(objects.column("dec").to_numpy(zero_copy_only=False), dtype=np.float64)
        parts: list[tuple[np.ndarray, pa.Table]] = []
        if objects.num_rows:
            upload = _upload(ra, dec)
            for cat in self.catalogs():
                t = time.perf_counter()
                found = self.engine.adql(_crossmatch_adql(cat), memory_tables=[upload]).table
                obj = found.column("ctx_object_idx").to_numpy(zero_copy_only=False).astype(np.int64)
                sep = found.column("ctx_separation_deg").to_numpy(zero_copy_only=False) * 3600.0
                parts.append(_match_rows(cat, found, obj, sep, self.k))
                self.timings[cat.catalog] = round(time.perf_counter() - t, 4)
        table = assemble(ids, ra, dec, parts)
        self.timings["total"] = round(time.perf_counter() - t0, 4)
        log.info(
            "%s: context of %d objects: %d matches in %s (%.3f s)",
            self.stream, objects.num_rows, int(pc.sum(pc.is_valid(table.column("catalog"))).as_py() or 0),
            ", ".join(c for c in self.timings if c != "total") or "no context catalog", self.timings["total"],
        )  # fmt: skip
        return table

    def store(self, seq: int, table: pa.Table) -> list[str]:
        """Write `table` (from `match`) as the context of snapshot `seq`: one file per order-3 pixel of
        the objects' positions. Rewriting the same seq replaces its files. Returns the lake paths."""
        return store_context(self.lake.storage, self.stream, seq, table)


def _upload(ra: np.ndarray, dec: np.ndarray) -> Any:
    from dac_lake.engine import MemoryTable

    meta = TableMeta(
        schema=UPLOAD,
        name=_UPLOAD_NAME,
        columns=(
            ColumnMeta("idx", "int64"),
            ColumnMeta("ra", "float64", "deg", "pos.eq.ra;meta.main"),
            ColumnMeta("dec", "float64", "deg", "pos.eq.dec;meta.main"),
        ),
        ra_column="ra",
        dec_column="dec",
    )
    table = pa.table({"idx": np.arange(len(ra), dtype=np.int64), "ra": ra, "dec": dec})
    return MemoryTable(meta, table)


def _crossmatch_adql(cat: ContextCatalog) -> str:
    cols = [cat.id_column, cat.ra_column, cat.dec_column, *cat.fields]
    if cat.type_column:
        cols.append(cat.type_column)
    select = ", ".join(f"c.{_ident(c)}" for c in dict.fromkeys(cols))
    source = f"POINT('ICRS', c.{_ident(cat.ra_column)}, c.{_ident(cat.dec_column)})"
    dist = f"DISTANCE(POINT('ICRS', u.ra, u.dec), {source})"
    return (
        f"SELECT u.idx AS ctx_object_idx, {dist} AS ctx_separation_deg, {select} "
        f"FROM {UPLOAD}.{_UPLOAD_NAME} AS u JOIN {cat.qualified} AS c "
        f"ON {dist} < {cat.radius_arcsec / 3600.0!r}"
    )


# ---------------------------------------------------------------------------------------------- storage
def context_prefix(stream: str) -> str:
    return f"{alayout.stream_prefix(stream)}/{CONTEXT_DIR}"


def context_file(stream: str, pixel: int, seq: int) -> str:
    return f"{context_prefix(stream)}/{int(pixel)}/batch-{int(seq):06d}.parquet"


def pixels_of(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """The order-3 pixel of each position (the folder its context is stored in)."""
    return healpix29(np.asarray(ra, np.float64) % 360.0, np.asarray(dec, np.float64)) >> (
        2 * (SPATIAL_INDEX_ORDER - PIXEL_ORDER)
    )


def store_context(storage: LakeStorage, stream: str, seq: int, table: pa.Table) -> list[str]:
    """See `ContextMatcher.store`."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, not {seq}")
    if table.num_rows == 0:
        return []
    table = table.select(CONTEXT_SCHEMA.names).cast(CONTEXT_SCHEMA)
    pixels = pixels_of(
        table.column("object_ra").to_numpy(zero_copy_only=False),
        table.column("object_dec").to_numpy(zero_copy_only=False),
    )
    table = table.append_column(STORED_SCHEMA.field("seq"), pa.array(np.full(table.num_rows, seq, np.int64)))
    written = []
    for pixel in np.unique(pixels):
        part = table.filter(pa.array(pixels == pixel)).sort_by([("object_id", "ascending")])
        sink = io.BytesIO()
        pq.write_table(part, sink, compression="zstd", row_group_size=20_000)
        path = context_file(stream, int(pixel), seq)
        storage.write_bytes(path, sink.getvalue())
        written.append(path)
    return written


def lookup_pixels(ra: float, dec: float, radius_arcsec: float = LOOKUP_ARCSEC) -> list[int]:
    """The order-3 pixels within `radius_arcsec` of (ra, dec): almost always one."""
    ranges = cone_ranges29(float(ra) % 360.0, float(dec), radius_arcsec / 3600.0)
    shift = 2 * (SPATIAL_INDEX_ORDER - PIXEL_ORDER)
    out: set[int] = set()
    for lo, hi in ranges:
        out.update(range(int(lo) >> shift, ((int(hi) - 1) >> shift) + 1))
    return sorted(out)


def _data_files(storage: LakeStorage, folder: str) -> list[str]:
    return [
        n for n in storage.list_dir(folder) if n.endswith(".parquet") and n.startswith(("batch-", "compact-"))
    ]


def _read(storage: LakeStorage, rel: str, object_id: str | None = None) -> pa.Table | None:
    """A context file (only `object_id`'s rows: the files are sorted by object, so the row-group
    statistics skip the rest); None if it vanished (a compaction removed it after our listing)."""
    try:
        part = pq.read_table(
            storage.path(rel),
            filesystem=storage.pa_fs,
            filters=None if object_id is None else pc.field("object_id") == object_id,
        )
    except FileNotFoundError:
        return None
    except OSError as exc:  # S3: a missing key is not always a FileNotFoundError
        if "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
            return None
        raise
    return part.select(STORED_SCHEMA.names).cast(STORED_SCHEMA)


def _newest(rows: pa.Table) -> pa.Table:
    """Each object's rows of its newest seq, once (a file and its compacted copy may both be listed)."""
    if rows.num_rows == 0:
        return rows
    order = np.lexsort(
        (
            rows.column("rank").to_numpy(zero_copy_only=False),
            np.asarray(rows.column("catalog").fill_null("").to_pylist(), dtype=object).astype(str),
            -rows.column("seq").to_numpy(zero_copy_only=False),
            np.asarray(rows.column("object_id").to_pylist(), dtype=object).astype(str),
        )
    )
    rows = rows.take(pa.array(order, pa.int64()))
    oid = np.asarray(rows.column("object_id").to_pylist(), dtype=object)
    seq = rows.column("seq").to_numpy(zero_copy_only=False)
    cat = np.asarray(rows.column("catalog").fill_null("").to_pylist(), dtype=object)
    rank = rows.column("rank").to_numpy(zero_copy_only=False)
    first_of_object = np.r_[True, oid[1:] != oid[:-1]]
    newest_seq = np.maximum.accumulate(np.where(first_of_object, np.arange(len(oid)), 0))
    keep = seq == seq[newest_seq]
    duplicate = np.r_[False, (oid[1:] == oid[:-1]) & (seq[1:] == seq[:-1]) & (cat[1:] == cat[:-1])
                      & (rank[1:] == rank[:-1])]  # fmt: skip
    return rows.filter(pa.array(keep & ~duplicate))


def context_of(storage: LakeStorage, stream: str, object_id: str, ra: float, dec: float) -> list[dict]:
    """The stored context rows of one object (dicts of CONTEXT_SCHEMA plus `seq`, with `fields` parsed),
    ordered by separation; the rows of the newest batch that matched it. [] if it was never matched; an
    object matched with nothing around it has one row with `catalog` None and its classification."""
    found: list[pa.Table] = []
    for pixel in lookup_pixels(ra, dec):
        folder = f"{context_prefix(stream)}/{pixel}"
        for name in _data_files(storage, folder):
            part = _read(storage, f"{folder}/{name}", object_id)
            if part is not None and part.num_rows:
                found.append(part)
    if not found:
        return []
    out = []
    for row in _newest(pa.concat_tables(found)).to_pylist():
        row["fields"] = json.loads(row["fields"]) if row.get("fields") else {}
        out.append(row)
    out.sort(
        key=lambda r: (r["separation_arcsec"] is None, r["separation_arcsec"] or 0.0, r["catalog"] or "")
    )
    return out


def compact_context(storage: LakeStorage, stream: str, min_files: int = 16) -> dict[int, int]:
    """Merge the files of each pixel folder holding at least `min_files` into one
    `compact-<newest seq>.parquet` (each object's newest rows only, sorted by object), then remove the
    merged files. Returns {pixel: files merged}.

    Why: the ingest adds a file per batch to every pixel the batch touches, and `context_of` opens each
    file of the object's pixel (~3 ms each): run this periodically (next to the alert lake's compaction).
    Safe next to a running ingest and readers: files written after the listing are left alone; a reader
    that lists both a merged file and the compacted one sees the same rows twice and keeps them once."""
    merged: dict[int, int] = {}
    prefix = context_prefix(stream)
    for name in storage.list_dir(prefix):
        if not name.isdigit():
            continue
        folder = f"{prefix}/{name}"
        files = _data_files(storage, folder)
        if len(files) < max(2, min_files):
            continue
        parts = [t for t in (_read(storage, f"{folder}/{f}") for f in files) if t is not None]
        if not parts:
            continue
        rows = _newest(pa.concat_tables(parts))
        newest = int(pc.max(rows.column("seq")).as_py())
        sink = io.BytesIO()
        pq.write_table(rows, sink, compression="zstd", row_group_size=20_000)
        target = f"compact-{newest:06d}.parquet"
        storage.write_bytes(f"{folder}/{target}", sink.getvalue())
        for f in files:
            if f != target:
                storage.delete_file(f"{folder}/{f}")
        merged[int(name)] = len(files)
    return merged


# ---------------------------------------------------------------------------------------------- live
def live_context(engine: Any, object_id: str, ra: float, dec: float, k: int = K_NEAREST) -> list[dict]:
    """The context of one position computed now, with `engine`'s rights (an object page's fallback for
    objects never matched): a cone search per context catalog (every positional catalog within
    FALLBACK_RADIUS_ARCSEC if none is marked). Rows as `context_of` returns them, seq None."""
    parts = []
    for cat in context_catalogs(engine.registry, fallback=True):
        cols = list(dict.fromkeys([cat.id_column, cat.ra_column, cat.dec_column, *cat.fields]
                                  + ([cat.type_column] if cat.type_column else [])))  # fmt: skip
        found = engine.cone(
            f"{cat.catalog}.{cat.table}", ra, dec, cat.radius_arcsec / 3600.0, columns=cols
        ).table
        sep = found.column("dist_deg").to_numpy(zero_copy_only=False) * 3600.0
        parts.append(_match_rows(cat, found, np.zeros(found.num_rows, np.int64), sep, k))
    table = assemble(pa.array([object_id], pa.string()), np.array([ra]), np.array([dec]), parts)
    out = []
    for row in table.to_pylist():
        row["fields"] = json.loads(row["fields"]) if row.get("fields") else {}
        row["seq"] = None
        out.append(row)
    return out
