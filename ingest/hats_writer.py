"""Writing a sorted Arrow table as a HATS collection: catalog, margin cache, index catalog, metadata.

The input is one table already sorted by `_healpix_29` (see `ingest.release`). Because nested HEALPix
pixels are contiguous `_healpix_29` ranges, each partition and each margin is a slice found by binary
search; partitions are written in parallel threads (pyarrow releases the GIL while encoding and uploading).
The output is what hats-import writes (HATS 1.0 names, `_healpix_29` first, files sorted by it, hats'
own Parquet encodings), so `hats.read_hats` and `lsdb.open_catalog` open it with no dac-lake code.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hats.catalog import PartitionInfo, TableProperties
from hats.catalog.dataset.collection_properties import CollectionProperties
from hats.io import skymap as hats_skymap
from hats.io.file_io import get_parquet_write_table_kwargs
from hats.pixel_math import HealpixPixel

from dac_lake import healpix, layout
from dac_lake.layout import pixel_file
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)

#: rows per Parquet row group. A small cone reads whole row groups (files are sorted by `_healpix_29`, so
#: it touches one or two), and full scans pay per row group. Measured on the 10M-row bench survey
#: (1M-row partitions, 18 columns), 100k / 20k / 10k / 5k rows per group: a 5" `Session.cone` 22 / 10 /
#: 4.9 / 2.6 ms (then 3.1 ms at 10k once the read path was tuned), a filtered full-table aggregate in
#: DuckDB 0.60 / 0.58 / 0.73 / 1.09 s, files 635 / 683 / 688 / 690 MB. 10k keeps cones well under
#: PostgreSQL + Q3C's ~7 ms for +20% on full scans and +8% in size.
ROW_GROUP_ROWS = 10_000
INDEX_FILE_ROWS = 5_000_000
#: zstd level: hats' default is 15, which writes ~7x slower than 9 for files ~4% smaller (measured on the
#: demo survey: 250k rows, 2.10 s / 15.9 MB at 15 against 0.31 s / 16.5 MB at 9; reads equally fast)
DEFAULT_COMPRESSION_LEVEL = 9
SKYMAP_MAX_ORDER = 8


@dataclass
class WrittenCatalog:
    """What was written for one HATS catalog of the collection."""

    name: str
    rows: int = 0
    bytes: int = 0
    partitions: list[tuple[int, int, int]] = field(default_factory=list)  # (order, pixel, rows)


def data_bytes(md: pq.FileMetaData) -> int:
    """Uncompressed column bytes of a written file (the `hats_estsize` measure)."""
    return sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))


# ---------------------------------------------------------------------- per-file steps (pure, shared)
# The local writer (thread pool) and the Dask path (`ingest.dask_release`, one task per file) both call
# these, so a partition file is made by the same code whichever machine writes it.


def write_parquet(storage: LakeStorage, rel: str, table: pa.Table, write_kwargs: dict) -> pq.FileMetaData:
    """Write `table` to `rel` (relative to the lake root); return the file's metadata for `_metadata`."""
    collector: list[pq.FileMetaData] = []
    storage.make_dirs(rel.rsplit("/", 1)[0])
    pq.write_table(
        table, storage.path(rel), filesystem=storage.pa_fs, metadata_collector=collector, **write_kwargs
    )
    return collector[0]


def partition_write_kwargs(
    schema: pa.Schema, compression_level: int, sort_column: str = healpix.SPATIAL_INDEX_COLUMN
) -> dict:
    """hats' Parquet encodings, 10k-row groups, files declared sorted by `sort_column`."""
    sorting = pq.SortingColumn.from_ordering(schema, [(sort_column, "ascending")])
    return get_parquet_write_table_kwargs(
        schema,
        write_table_kwargs={
            "sorting_columns": sorting,
            "row_group_size": ROW_GROUP_ROWS,
            "compression_level": compression_level,
        },
    )


def index_write_kwargs(schema: pa.Schema, id_column: str, compression_level: int) -> dict:
    sorting = pq.SortingColumn.from_ordering(schema, [(id_column, "ascending")])
    return get_parquet_write_table_kwargs(
        schema,
        write_table_kwargs={
            "sorting_columns": sorting,
            "data_page_size": 16 * 1024,
            "row_group_size": 100_000,
            "compression_level": compression_level,
        },
    )


def partition_slice(table: pa.Table, hp29: np.ndarray, order: int, pixel: int) -> pa.Table:
    """The rows of partition (order, pixel) of a table sorted by `_healpix_29` (`hp29` is its column)."""
    lo, hi = healpix.pixel_range29(order, pixel)
    start, stop = np.searchsorted(hp29, [lo, hi])
    return table.slice(start, stop - start)


def margin_slice(table: pa.Table, hp29: np.ndarray, ranges: np.ndarray) -> pa.Table | None:
    """The rows of a sorted table inside the margin `ranges` (from `healpix.margin_ranges29`), or None."""
    if len(ranges) == 0:
        return None
    starts = np.searchsorted(hp29, ranges[:, 0])
    stops = np.searchsorted(hp29, ranges[:, 1])
    keep = stops > starts
    if not keep.any():
        return None
    # ranges are sorted and disjoint, so concatenating the slices keeps the `_healpix_29` order
    pieces = [table.slice(a, b - a) for a, b in zip(starts[keep], stops[keep], strict=True)]
    return pa.concat_tables(pieces).combine_chunks()


def index_table(ids: pa.Array, orders: np.ndarray, pixels: np.ndarray, id_column: str) -> pa.Table:
    """(id, Norder, Npix) sorted by id, as hats' IndexCatalog reads it."""
    table = pa.table(
        {
            id_column: ids,
            "Norder": pa.array(np.asarray(orders).astype(np.uint8)),
            "Npix": pa.array(np.asarray(pixels).astype(np.uint64)),
        }
    )
    order = np.argsort(table.column(id_column).to_numpy(zero_copy_only=False), kind="stable")
    return table.take(order)


def index_file_rel(n: int) -> str:
    """Index file `n` (relative to the index's dataset/); file n holds sorted rows [n*5M, (n+1)*5M)."""
    return f"index/part.{n}.parquet"


class HatsCollectionWriter:
    """Writes one HATS collection under `storage`'s `root` (a release prefix)."""

    def __init__(
        self,
        storage: LakeStorage,
        root: str,
        catalog_name: str,
        ra_column: str,
        dec_column: str,
        id_column: str,
        threads: int = 4,
        progress: Callable[[str, int, int], None] | None = None,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    ):
        self.storage = storage
        self.root = root.strip("/")
        self.name = catalog_name
        self.ra_column = ra_column
        self.dec_column = dec_column
        self.id_column = id_column
        self.threads = max(1, threads)
        self.progress = progress or (lambda stage, done, total: None)
        self.compression_level = compression_level

    # ------------------------------------------------------------------ helpers
    def _dir(self, sub: str) -> str:
        return f"{self.root}/{sub}"

    def _write_parquet(self, table: pa.Table, rel: str, write_kwargs: dict) -> pq.FileMetaData:
        return write_parquet(self.storage, rel, table, write_kwargs)

    def _write_kwargs(self, schema: pa.Schema, sort_column: str = healpix.SPATIAL_INDEX_COLUMN) -> dict:
        return partition_write_kwargs(schema, self.compression_level, sort_column)

    def _write_dataset_metadata(
        self, catalog_dir: str, schema: pa.Schema, parts: list[tuple[str, pq.FileMetaData]]
    ):
        """`_common_metadata` (schema) and `_metadata` (every row group, file paths relative to dataset/)."""
        common = self.storage.path(f"{catalog_dir}/dataset/_common_metadata")
        pq.write_metadata(schema, common, filesystem=self.storage.pa_fs)
        collected = []
        for rel_path, md in parts:
            md.set_file_path(rel_path)
            collected.append(md)
        pq.write_metadata(
            schema,
            self.storage.path(f"{catalog_dir}/dataset/_metadata"),
            metadata_collector=collected,
            filesystem=self.storage.pa_fs,
        )

    def _spatial_properties(self, written: WrittenCatalog, pixels: list[tuple[int, int]]) -> dict:
        """The properties every spatially partitioned catalog (primary or margin) carries."""
        return {
            "total_rows": written.rows,
            "ra_column": self.ra_column,
            "dec_column": self.dec_column,
            "healpix_column": healpix.SPATIAL_INDEX_COLUMN,
            "healpix_order": healpix.SPATIAL_INDEX_ORDER,
            "npix_suffix": ".parquet",
            "hats_estsize": int(written.bytes / 1024),
            "moc_sky_fraction": round(sum(4.0**-o for o, _ in pixels) / 12.0, 6),
        }

    def _properties(self, **kwargs) -> TableProperties:
        now = dt.datetime.now(dt.UTC)
        base = {
            "hats_builder": "dac-lake",
            "hats_creation_date": now.strftime("%Y-%m-%dT%H:%M%Z"),
            "hats_release_date": "2025-08-22",
            "hats_version": "v1.0",
        }
        return TableProperties(**(kwargs | base))

    # ------------------------------------------------------------------ the catalog
    def catalog_dir(self) -> str:
        return self._dir(self.name)

    def write_catalog(
        self,
        table: pa.Table,
        plan: list[tuple[int, int, int]],
        counts: np.ndarray,
        mapping_order: int,
        max_rows: int,
        extra_properties: dict[str, str] | None = None,
    ) -> WrittenCatalog:
        """Write the primary catalog. `table` is sorted by `_healpix_29`; `plan` comes from
        `healpix.plan_partitions`; `counts` is the order-`mapping_order` histogram."""
        hp29 = table.column(healpix.SPATIAL_INDEX_COLUMN).to_numpy()
        cat_dir = self.catalog_dir()
        kwargs = self._write_kwargs(table.schema)

        def write_one(item: tuple[int, int, int]) -> tuple[pq.FileMetaData, int]:
            order, pixel, _ = item
            part = partition_slice(table, hp29, order, pixel)
            md = self._write_parquet(part, f"{cat_dir}/dataset/{pixel_file(order, pixel)}", kwargs)
            return md, part.num_rows

        parts = self._map(write_one, plan, "partitions")
        return self.finish_catalog(
            table.schema, plan, parts, table.num_rows, counts, mapping_order, max_rows, extra_properties
        )

    def finish_catalog(
        self,
        schema: pa.Schema,
        plan: list[tuple[int, int, int]],
        parts: list[tuple[pq.FileMetaData, int]],
        total_rows: int,
        counts: np.ndarray,
        mapping_order: int,
        max_rows: int,
        extra_properties: dict[str, str] | None = None,
    ) -> WrittenCatalog:
        """The catalog's metadata once every partition file is written: `parts` holds (file metadata,
        rows) for each `plan` entry, in plan order, wherever the files were written."""
        cat_dir = self.catalog_dir()
        written = WrittenCatalog(self.name)
        for (order, pixel, _), (md, nrows) in zip(plan, parts, strict=True):
            written.partitions.append((order, pixel, nrows))
            written.rows += nrows
            written.bytes += data_bytes(md)
        if written.rows != total_rows:
            raise RuntimeError(f"partitioning lost rows: {written.rows} written of {total_rows}")
        rels = [pixel_file(o, p) for o, p, _ in plan]
        self._write_dataset_metadata(
            cat_dir, schema, [(rel, md) for rel, (md, _) in zip(rels, parts, strict=True)]
        )
        pixels = [HealpixPixel(o, p) for o, p, _ in plan]
        PartitionInfo.from_healpix(pixels).write_to_file(catalog_path=self.storage.upath(cat_dir))
        skymap_order = min(mapping_order, SKYMAP_MAX_ORDER)
        skymap_counts = counts.reshape(12 * 4**skymap_order, -1).sum(axis=1)
        hats_skymap.write_skymap(skymap_counts, self.storage.upath(cat_dir))
        props = self._properties(
            catalog_name=self.name,
            catalog_type="object",
            skymap_order=skymap_order,
            hats_max_rows=max_rows,
            **self._spatial_properties(written, [(o, p) for o, p, _ in plan]),
            **(extra_properties or {}),
        )
        props.to_properties_file(self.storage.upath(cat_dir))
        return written

    # ------------------------------------------------------------------ margin
    def margin_dir(self, margin_arcsec: float) -> str:
        return self._dir(layout.margin_name(self.name, margin_arcsec))

    def write_margin(
        self, table: pa.Table, plan: list[tuple[int, int, int]], margin_arcsec: float
    ) -> WrittenCatalog:
        """The margin cache: for each partition, the rows of the neighbouring margin-order pixels."""
        highest = max(o for o, _, _ in plan)
        margin_order = healpix.margin_order_for(margin_arcsec, highest)
        hp29 = table.column(healpix.SPATIAL_INDEX_COLUMN).to_numpy()
        mdir = self.margin_dir(margin_arcsec)
        kwargs = self._write_kwargs(table.schema)

        def write_one(item: tuple[int, int, int]) -> tuple[pq.FileMetaData, int] | None:
            order, pixel, _ = item
            part = margin_slice(table, hp29, healpix.margin_ranges29(order, pixel, margin_order))
            if part is None:
                return None
            rel = pixel_file(order, pixel)
            return self._write_parquet(part, f"{mdir}/dataset/{rel}", kwargs), part.num_rows

        results = self._map(write_one, plan, "margin")
        return self.finish_margin(table.schema, plan, results, margin_arcsec)

    def finish_margin(
        self,
        schema: pa.Schema,
        plan: list[tuple[int, int, int]],
        results: list[tuple[pq.FileMetaData, int] | None],
        margin_arcsec: float,
    ) -> WrittenCatalog:
        """The margin's metadata once its files are written (`results`: per plan entry, None if the
        partition has no margin rows); an empty margin still gets one empty file, as hats needs."""
        name = layout.margin_name(self.name, margin_arcsec)
        mdir = self.margin_dir(margin_arcsec)
        written = WrittenCatalog(name)
        parts = []
        pixels = []
        for (order, pixel, _), res in zip(plan, results, strict=True):
            if res is None:
                continue
            md, nrows = res
            parts.append((pixel_file(order, pixel), md))
            pixels.append(HealpixPixel(order, pixel))
            written.partitions.append((order, pixel, nrows))
            written.rows += nrows
            written.bytes += data_bytes(md)
        if not parts:
            # hats needs at least the schema; an empty margin (a catalog of one pixel) keeps an empty file
            order, pixel, _ = plan[0]
            rel = pixel_file(order, pixel)
            empty = schema.empty_table()
            parts.append(
                (rel, self._write_parquet(empty, f"{mdir}/dataset/{rel}", self._write_kwargs(schema)))
            )
            pixels.append(HealpixPixel(order, pixel))
        self._write_dataset_metadata(mdir, schema, parts)
        PartitionInfo.from_healpix(pixels).write_to_file(catalog_path=self.storage.upath(mdir))
        self._properties(
            catalog_name=name,
            catalog_type="margin",
            primary_catalog=self.name,
            margin_threshold=float(margin_arcsec),
            **self._spatial_properties(written, [(p.order, p.pixel) for p in pixels]),
        ).to_properties_file(self.storage.upath(mdir))
        return written

    # ------------------------------------------------------------------ index
    def index_dir(self) -> str:
        return self._dir(layout.index_name(self.name, self.id_column))

    def write_index(self, ids: pa.Array, orders: np.ndarray, pixels: np.ndarray) -> WrittenCatalog:
        """An index catalog on the id column: (id, Norder, Npix) sorted by id, as hats' IndexCatalog reads
        it (row groups small, so a look-up reads a few pages)."""
        idir = self.index_dir()
        table = index_table(ids, orders, pixels, self.id_column)
        kwargs = index_write_kwargs(table.schema, self.id_column, self.compression_level)
        chunks = [
            (i, table.slice(i, INDEX_FILE_ROWS)) for i in range(0, max(table.num_rows, 1), INDEX_FILE_ROWS)
        ]

        def write_one(item):
            n, chunk = item
            rel = index_file_rel(n // INDEX_FILE_ROWS)
            return rel, self._write_parquet(chunk, f"{idir}/dataset/{rel}", kwargs)

        parts = self._map(write_one, chunks, "index")
        return self.finish_index(table.schema, parts, table.num_rows)

    def finish_index(
        self, schema: pa.Schema, parts: list[tuple[str, pq.FileMetaData]], total_rows: int
    ) -> WrittenCatalog:
        """The index's metadata once its files (`parts`: relative path, metadata) are written."""
        name = layout.index_name(self.name, self.id_column)
        idir = self.index_dir()
        self._write_dataset_metadata(idir, schema, parts)
        self._properties(
            catalog_name=name,
            catalog_type="index",
            total_rows=total_rows,
            primary_catalog=self.name,
            indexing_column=self.id_column,
            extra_columns=[],
        ).to_properties_file(self.storage.upath(idir))
        written = WrittenCatalog(name, rows=total_rows)
        written.bytes = sum(data_bytes(md) for _, md in parts)
        return written

    # ------------------------------------------------------------------ collection
    def write_collection_properties(self, margin: str | None, index: str | None) -> None:
        props = CollectionProperties(
            obs_collection=self.name,
            hats_primary_table_url=self.name,
            all_margins=[margin] if margin else None,
            default_margin=margin,
            all_indexes={self.id_column: index} if index else None,
            default_index=self.id_column if index else None,
        )
        props.to_properties_file(self.storage.upath(self.root))

    def _map(self, fn, items: list, stage: str) -> list:
        """Run `fn` over `items` on the thread pool, in order, reporting progress."""
        total = len(items)
        self.progress(stage, 0, total)
        if self.threads == 1 or total <= 1:
            out = []
            for i, item in enumerate(items):
                out.append(fn(item))
                self.progress(stage, i + 1, total)
            return out
        with ThreadPoolExecutor(self.threads) as pool:
            futures = [pool.submit(fn, item) for item in items]
            out = []
            for i, fut in enumerate(futures):
                out.append(fut.result())
                self.progress(stage, i + 1, total)
            return out
