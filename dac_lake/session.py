"""The Python entry point for notebook users and admins: `dac_lake.connect(lake_url)`.

This first cut answers cone searches (with HEALPix pruning: only the partition files a cone touches are
read, and `_healpix_29` ranges let DuckDB skip row groups inside them), row counts from the release
manifest (no scan), and trusted SQL over the published catalogs. ADQL comes with the query engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa

from dac_lake import layout
from dac_lake.coverage import cone_ranges29, partitions_touching
from dac_lake.duckdb_io import new_connection
from dac_lake.lake import Lake, LakeError
from dac_lake.layout import pixel_file
from dac_lake.storage import LakeStorage

log = logging.getLogger(__name__)


@dataclass
class QueryStats:
    """What the last query read: the figures `EXPLAIN`-style introspection reports."""

    files: int = 0
    total_files: int = 0
    ranges: int = 0
    detail: dict = field(default_factory=dict)


class Session:
    """A read session on one lake; catalogs resolve through their published release pointers."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self.con = new_connection(lake.storage)
        self.last = QueryStats()

    # ------------------------------------------------------------------ catalogs
    def tables(self) -> list[str]:
        """Published catalogs."""
        return [c for c in self.lake.catalogs() if self.lake.current_release(c)]

    def manifest(self, catalog: str, release: str | None = None) -> dict:
        release = release or self.lake.current_release(catalog)
        if release is None:
            raise LakeError(
                f"no published catalog {catalog!r}; published: {', '.join(self.tables()) or 'none'}"
            )
        return _read_manifest(self.lake.storage, catalog, release)

    def files(self, catalog: str, partitions: list | None = None, release: str | None = None) -> list[str]:
        manifest = self.manifest(catalog, release)
        base = f"{layout.release_prefix(catalog, manifest['release'])}/{manifest['catalog_path']}/dataset"
        parts = manifest["partitions"] if partitions is None else partitions
        return [self.lake.storage.url_of(f"{base}/{pixel_file(o, p)}") for o, p, _ in parts]

    def count(self, catalog: str, release: str | None = None) -> int:
        """Row count from the manifest's per-partition counts: never a scan."""
        return int(self.manifest(catalog, release)["rows"])

    # ------------------------------------------------------------------ queries
    def cone(
        self,
        catalog: str,
        ra: float,
        dec: float,
        radius_deg: float,
        columns: list[str] | None = None,
        release: str | None = None,
    ) -> pa.Table:
        """Rows within `radius_deg` of (ra, dec), exactly, with the angular distance in `dist_deg`."""
        manifest = self.manifest(catalog, release)
        ra_col, dec_col = manifest["ra_column"], manifest["dec_column"]
        ranges = cone_ranges29(float(ra), float(dec), float(radius_deg))
        touched = partitions_touching(manifest["partitions"], ranges)
        self.last = QueryStats(len(touched), len(manifest["partitions"]), len(ranges))
        if not touched:
            return pa.table({})
        files = self.files(catalog, touched, manifest["release"])
        cols = "*" if not columns else ", ".join(_quote_ident(c) for c in columns)
        distance = _distance_sql(ra_col, dec_col)
        range_sql = " OR ".join(
            f"(_healpix_29 >= $lo{i} AND _healpix_29 < $hi{i})" for i in range(len(ranges))
        )
        sql = (
            f"SELECT {cols}, {distance} AS dist_deg FROM read_parquet($files) "
            f"WHERE ({range_sql}) AND {distance} <= $radius ORDER BY dist_deg"
        )
        params: dict = {"ra0": float(ra), "dec0": float(dec), "radius": float(radius_deg), "files": files}
        for i, (lo, hi) in enumerate(ranges.tolist()):
            params[f"lo{i}"], params[f"hi{i}"] = lo, hi
        return self.con.execute(sql, params).fetch_arrow_table()

    def sql(self, text: str) -> pa.Table:
        """Trusted DuckDB SQL (admins, notebooks) with each published catalog as a view of its name."""
        for catalog in self.tables():
            files = self.files(catalog)
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            self.con.execute(
                f"CREATE OR REPLACE VIEW {_quote_ident(catalog)} AS SELECT * FROM read_parquet([{listing}])"
            )
        return self.con.execute(text).fetch_arrow_table()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _distance_sql(ra_col: str, dec_col: str) -> str:
    """Great-circle distance in degrees to ($ra0, $dec0), by the haversine formula: accurate from
    milli-arcseconds to 180 degrees, unlike the arccos of a dot product."""
    ra, dec = _quote_ident(ra_col), _quote_ident(dec_col)
    return (
        f"degrees(2 * asin(sqrt(least(1.0, pow(sin(radians({dec} - $dec0) / 2), 2) + "
        f"cos(radians({dec})) * cos(radians($dec0)) * pow(sin(radians({ra} - $ra0) / 2), 2)))))"
    )


def _read_manifest(storage: LakeStorage, catalog: str, release: str) -> dict:
    return json.loads(
        storage.read_text(f"{layout.release_prefix(catalog, release)}/{layout.RELEASE_MANIFEST}")
    )


def connect(lake_url: str | None = None) -> Session:
    """Open a read session on the lake at `lake_url` (default: the configured lake)."""
    lake = Lake(LakeStorage(lake_url))
    lake.check()
    return Session(lake)
