"""Benchmark: which way should DuckDB read the lake's Parquet files from the Ceph RGW S3 store?

The lake serves HATS catalogs (HEALPix-partitioned Parquet, rows sorted by ``_healpix_29``) through
DuckDB. DuckDB can reach S3 in three ways, and they differ in speed *and* in whether a narrow
``_healpix_29`` predicate still skips row groups (a cone search on a big catalog is only cheap if it
does):

* ``httpfs``  -- DuckDB's own C++ S3 client (extension installed offline from the PyPI wheel);
* ``fsspec``  -- an ``s3fs.S3FileSystem`` registered with ``con.register_filesystem``, so every read
  goes through Python;
* ``arrow-ds`` -- a ``pyarrow.dataset`` on ``pyarrow.fs.S3FileSystem`` scanned by DuckDB's Arrow
  scan, which pushes projections and filters down into pyarrow.

The script builds a HATS-like catalog (``dataset/Norder=K/Dir=D/Npix=N.parquet``), uploads it to a
fresh bucket, and times four workloads per path (small cone, filtered aggregate, 3-column full read,
``count(*)``), interleaving paths and runs because the benchmark machine is small and shared. It
also counts GET requests and bytes per query in the radosgw request log, which is the only
measurement that sees all three clients alike, to tell whether row-group pruning survives each path.
A local copy of the same files is measured as a reference. Besides the three paths as-is, it times
the settings that turned out to matter: DuckDB threads, a reused connection with httpfs's caches,
s3fs with a pre-listed directory cache, and a reused pyarrow dataset (see ``--paths``).

Run it against the Ceph started by ``shared/ceph/ceph-s3-up.sh`` (its exported variables are read)::

    eval "$(shared/ceph/ceph-s3-up.sh start /tmp/ceph-bench 7490)"
    python bench/storage/duckdb_read_paths.py [--rows N] [--runs N]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import astropy.units as u
import boto3
import cdshealpix.nested as chp
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import s3fs
from hats.pixel_math.spatial_index import compute_spatial_index

SPATIAL_ORDER = 29
# A southern "survey footprint": at order 3 it gives 208 files (~9.6k rows each at 2M rows), i.e. the
# 100-200 files of the lake's small catalogs, some of them partial (edge) pixels as in real HATS.
FOOTPRINT_DEC_MAX = -35.0
# The narrow W1 predicate covers one cell of this order (~0.9 deg): ~200 rows, one row group.
NARROW_ORDER = 6
MAG_CUT = 21.5


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class S3Config:
    """Connection settings taken from the variables that ``ceph-s3-up.sh start`` exports."""

    endpoint_url: str
    host: str
    use_ssl: bool
    key: str
    secret: str
    region: str
    rgw_log: Path | None


def s3_config_from_env() -> S3Config:
    """Read the S3 settings; exit with a clear message when the lake endpoint is not configured.

    pyarrow ignores ``AWS_ENDPOINT_URL`` and DuckDB wants a bare ``host:port``, so both forms are
    derived here once instead of trusting each client's own environment lookup.
    """
    url = os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        sys.exit(
            "error: AWS_ENDPOINT_URL is not set. Start the test Ceph first, e.g.\n"
            '  eval "$(shared/ceph/ceph-s3-up.sh start /tmp/ceph-bench 7490)"\n'
            "or export AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for another S3."
        )
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        sys.exit("error: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set as well.")
    parsed = urlparse(url)
    log_dir = os.environ.get("CEPH_S3_DIR")
    log = Path(log_dir) / "log" / "client.rgw.log" if log_dir else None
    return S3Config(
        endpoint_url=url,
        host=os.environ.get("S3_ENDPOINT") or parsed.netloc,
        use_ssl=parsed.scheme == "https",
        key=key,
        secret=secret,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        rgw_log=log if log and log.exists() else None,
    )


def httpfs_extension_file() -> str:
    """Path of the signed httpfs binary shipped by the ``duckdb-extension-httpfs`` wheel.

    The lake machines cannot reach extensions.duckdb.org, so ``INSTALL httpfs`` by name fails; the
    wheel's file must be installed (or loaded) by path, and its version must match DuckDB's.
    """
    spec = importlib.util.find_spec("duckdb_extension_httpfs")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the duckdb-extension-httpfs package is not installed (pip install it).")
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / "extensions" / f"v{duckdb.__version__}" / "httpfs.duckdb_extension"
    if not path.exists():
        sys.exit(f"error: {path} missing: duckdb-extension-httpfs must match duckdb {duckdb.__version__}.")
    return str(path)


# -------------------------------------------------------------------------------------------- catalog
@dataclass
class Catalog:
    """The generated catalog: relative keys, its schema and the facts the checks need."""

    root: Path
    keys: list[str]
    pixel_rows: dict[int, int]
    schema: pa.Schema
    rows: int
    row_group_size: int
    order: int
    nbytes: int

    def key_of(self, pix: int) -> str:
        """The HATS key of one pixel's file, e.g. ``dataset/Norder=3/Dir=0/Npix=12.parquet``."""
        return f"dataset/Norder={self.order}/Dir={pix // 10_000 * 10_000}/Npix={pix}.parquet"


def make_catalog(root: Path, rows: int, order: int, row_group_size: int | None, seed: int) -> Catalog:
    """Write a HATS-like catalog of random sky positions under ``root``.

    Rows are sorted by ``_healpix_29`` (as hats-import does), so each row group covers a narrow
    ``_healpix_29`` interval and its min/max statistics are what makes a cone search prunable.
    By default the row-group size is a fifth of the mean file, so every file has several row groups
    at any ``--rows`` (with 2M rows and ~180 files, 20k-row groups would mean one group per file).
    """
    rng = np.random.default_rng(seed)
    sin_max = math.sin(math.radians(FOOTPRINT_DEC_MAX))
    ra = rng.uniform(0.0, 360.0, rows)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, sin_max, rows)))
    hp29 = np.asarray(compute_spatial_index(ra, dec), dtype=np.int64)
    order_idx = np.argsort(hp29, kind="stable")
    mag_r = rng.normal(21.0, 1.5, rows).astype(np.float32)
    table = pa.table(
        {
            "_healpix_29": hp29,
            "object_id": rng.permutation(rows).astype(np.int64) + 1_000_000_000,
            "ra": ra,
            "dec": dec,
            "mag_g": (mag_r + rng.normal(0.6, 0.3, rows)).astype(np.float32),
            "mag_r": mag_r,
            "mag_i": (mag_r - rng.normal(0.3, 0.2, rows)).astype(np.float32),
            "mag_z": (mag_r - rng.normal(0.5, 0.3, rows)).astype(np.float32),
            "mag_err": rng.gamma(2.0, 0.02, rows).astype(np.float32),
            "flags": rng.integers(0, 1 << 12, rows).astype(np.int32),
        }
    ).take(pa.array(order_idx))
    hp_sorted = hp29[order_idx]
    pix = hp_sorted >> (2 * (SPATIAL_ORDER - order))
    uniq, starts, counts = np.unique(pix, return_index=True, return_counts=True)
    rg = row_group_size or max(500, int(round(rows / len(uniq) / 5, -2)))
    cat = Catalog(root, [], {}, table.schema, rows, rg, order, 0)
    for p, s, c in zip(uniq.tolist(), starts.tolist(), counts.tolist(), strict=True):
        key = cat.key_of(p)
        dest = root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(s, c), dest, row_group_size=rg)
        cat.keys.append(key)
        cat.pixel_rows[p] = c
        cat.nbytes += dest.stat().st_size
    return cat


def upload(cfg: S3Config, cat: Catalog, bucket: str, prefix: str) -> float:
    """Create ``bucket`` and upload every file with 8 threads; return the seconds it took."""
    s3 = boto3.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        aws_access_key_id=cfg.key,
        aws_secret_access_key=cfg.secret,
        region_name=cfg.region,
    )
    s3.create_bucket(Bucket=bucket)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.upload_file(str(cat.root / k), bucket, f"{prefix}/{k}"), cat.keys))
    return time.perf_counter() - t0


def delete_bucket(cfg: S3Config, bucket: str) -> None:
    """Remove every object and then the bucket, so repeated runs do not fill the memstore OSD."""
    s3 = boto3.resource(
        "s3",
        endpoint_url=cfg.endpoint_url,
        aws_access_key_id=cfg.key,
        aws_secret_access_key=cfg.secret,
        region_name=cfg.region,
    )
    b = s3.Bucket(bucket)
    b.objects.all().delete()
    b.delete()


# ----------------------------------------------------------------------------------------------- cone
@dataclass(frozen=True)
class Cone:
    """The W1 query: the files a small cone touches and a narrow ``_healpix_29`` interval."""

    keys: list[str]
    lo: int
    hi: int
    ra: float
    dec: float
    radius_deg: float


def _unit(lon_deg: np.ndarray, lat_deg: np.ndarray) -> np.ndarray:
    lon, lat = np.radians(lon_deg), np.radians(lat_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def choose_cone(cat: Catalog, radius_deg: float = 0.5) -> Cone:
    """Place a small cone next to a corner of a typical (median-filled) pixel.

    Next to a corner the cone touches 3-4 files, as real cone searches often do, while the narrow
    predicate (the order-6 cell under the cone centre) selects rows from only one row group of one
    file: every other row group and file can be skipped from its statistics alone.
    """
    pixels = sorted(cat.pixel_rows, key=lambda p: cat.pixel_rows[p])
    pix = pixels[len(pixels) // 2]
    clon, clat = chp.healpix_to_lonlat(np.array([pix], dtype=np.uint64), cat.order)
    vlon, vlat = chp.vertices(np.array([pix], dtype=np.uint64), cat.order)
    centre = _unit(np.asarray(clon.deg), np.asarray(clat.deg))[0]
    corner = _unit(np.asarray(vlon.deg)[0, 0], np.asarray(vlat.deg)[0, 0])
    v = 0.97 * corner + 0.03 * centre
    v /= np.linalg.norm(v)
    ra = float(np.degrees(np.arctan2(v[1], v[0])) % 360.0)
    dec = float(np.degrees(np.arcsin(v[2])))
    ipix, _, _ = chp.cone_search(ra * u.deg, dec * u.deg, radius_deg * u.deg, depth=cat.order, flat=True)
    touched = sorted(int(p) for p in np.unique(ipix) if int(p) in cat.pixel_rows)
    hp = int(np.asarray(compute_spatial_index(np.array([ra]), np.array([dec])))[0])
    shift = 2 * (SPATIAL_ORDER - NARROW_ORDER)
    cell = hp >> shift
    return Cone(
        [cat.key_of(p) for p in touched], cell << shift, ((cell + 1) << shift) - 1, ra, dec, radius_deg
    )


# ------------------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    """One query shape; ``{src}`` is replaced by the path's table expression."""

    name: str
    label: str
    sql: str
    cone_only: bool  # True: read only the cone's files; False: all files


def workloads(cone: Cone) -> list[Workload]:
    """W1-W4 of the brief, plus W1 without its predicate (used only to judge pruning)."""
    return [
        Workload(
            "W1",
            "small cone, SELECT *",
            f"SELECT * FROM {{src}} WHERE _healpix_29 BETWEEN {cone.lo} AND {cone.hi}",
            True,
        ),
        Workload(
            "W2",
            "filtered count+avg",
            f"SELECT count(*) AS n, avg(mag_r) AS m FROM {{src}} WHERE mag_g > {MAG_CUT}",
            False,
        ),
        Workload("W3", "3 columns -> Arrow", "SELECT ra, dec, mag_r FROM {src}", False),
        Workload("W4", "count(*) only", "SELECT count(*) AS n FROM {src}", False),
    ]


def unfiltered_cone() -> Workload:
    """W1's files read with no predicate: the byte count that pruning must beat."""
    return Workload("W1-all", "cone files, no predicate", "SELECT * FROM {src}", True)


# ---------------------------------------------------------------------------------------- read paths
@dataclass
class Session:
    """A DuckDB connection plus whatever it needs kept alive (filesystems, registered datasets)."""

    con: duckdb.DuckDBPyConnection
    fs: Any = None
    keep: list[Any] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Close the connection; a fresh one per measurement keeps DuckDB's caches cold."""
        self.con.close()


class ReadPath:
    """One way for DuckDB to reach the files. ``open`` is setup (not timed), ``source`` is timed."""

    name: str = ""
    remote: bool = True
    warm: bool = False  # reuse one session across runs (long-lived server connection)
    family: str = ""  # the read path this variant belongs to, for the recommendation

    def open(self) -> Session:
        """Create a session (DuckDB connection and client objects) ready to query."""
        raise NotImplementedError

    def source(self, session: Session, keys: list[str]) -> str:
        """Return the SQL table expression that reads ``keys`` (may register objects: timed)."""
        raise NotImplementedError


def _q(s: str) -> str:
    """A SQL string literal (CREATE SECRET takes no bind parameters)."""
    return "'" + s.replace("'", "''") + "'"


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join(_q(s) for s in items) + "]"


class LocalDuckDB(ReadPath):
    """Reference: DuckDB's native Parquet reader on the local copy (page cache warm)."""

    remote = False
    family = "local"

    def __init__(self, root: Path) -> None:
        self.root, self.name = root, "local duckdb"

    def open(self) -> Session:
        return Session(duckdb.connect())

    def source(self, session: Session, keys: list[str]) -> str:
        return f"read_parquet({_sql_list([str(self.root / k) for k in keys])})"


class Httpfs(ReadPath):
    """DuckDB httpfs with an S3 secret; optional thread count, and the caches of a long-lived connection.

    ``cache``: ``none`` (fresh connection per query), ``validated`` (one connection; footers and data
    blocks cached, every file still re-checked with a HEAD per query) or ``all`` (also HEAD results
    cached: no request at all on a repeat, so an object overwritten in place is not noticed).
    """

    family = "httpfs"

    def __init__(
        self,
        cfg: S3Config,
        bucket: str,
        prefix: str,
        threads: int | None = None,
        cache: str = "none",
        client: str | None = None,
    ) -> None:
        self.cfg, self.bucket, self.prefix = cfg, bucket, prefix
        self.threads, self.cache, self.client = threads, cache, client
        self.warm = cache != "none"
        parts = ["httpfs"]
        if threads:
            parts.append(f"threads={threads}")
        if client:
            parts.append(client)
        if self.warm:
            parts.append(f"warm, {cache} caches")
        self.name = " ".join(parts)

    def open(self) -> Session:
        con = duckdb.connect()
        configure_httpfs(con, self.cfg, threads=self.threads, cache=self.cache)
        if self.client:
            con.execute(f"SET httpfs_client_implementation = '{self.client}'")
        return Session(con)

    def source(self, session: Session, keys: list[str]) -> str:
        return f"read_parquet({_sql_list([f's3://{self.bucket}/{self.prefix}/{k}' for k in keys])})"


def configure_httpfs(
    con: duckdb.DuckDBPyConnection, cfg: S3Config, threads: int | None = None, cache: str = "none"
) -> None:
    """The connection setup a library should use for the lake (see the recommendation printed).

    ``LOAD httpfs`` finds the copy that ``INSTALL '<wheel file>'`` put in ~/.duckdb (done once in
    ``main``); the secret carries the endpoint because RGW needs path-style URLs and plain HTTP here.
    Remote reads wait on the network, so more threads than cores can keep more requests in flight.
    The external file cache (on by default) only pays off when the same connection is reused.
    """
    con.execute("LOAD httpfs")
    con.execute(
        f"CREATE OR REPLACE SECRET lake_s3 (TYPE s3, KEY_ID {_q(cfg.key)}, SECRET {_q(cfg.secret)}, "
        f"ENDPOINT {_q(cfg.host)}, URL_STYLE 'path', USE_SSL {str(cfg.use_ssl).lower()}, "
        f"REGION {_q(cfg.region)})"
    )
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if cache in ("validated", "all"):
        con.execute("SET parquet_metadata_cache = true")
        con.execute("SET enable_external_file_cache = true")
    if cache == "all":
        con.execute("SET enable_http_metadata_cache = true")


class Fsspec(ReadPath):
    """An s3fs filesystem registered in DuckDB: every read is a Python call into s3fs.

    As-is, DuckDB's fsspec bridge asks s3fs for file info ~15 times per file and each ask is a HEAD
    request unless s3fs's directory cache knows the file. The ``listed`` variant therefore lists the
    needed directories first (inside the timed part: one LIST per HATS ``Dir=``), and ``cache_type``
    ``none`` stops s3fs's 50 MiB read-ahead from fetching whole files that pruning meant to skip.
    """

    family = "fsspec"

    def __init__(
        self, cfg: S3Config, bucket: str, prefix: str, cache_type: str = "readahead", listed: bool = False
    ) -> None:
        self.cfg, self.bucket, self.prefix, self.cache_type, self.listed = (
            cfg,
            bucket,
            prefix,
            cache_type,
            listed,
        )
        self.name = (
            "fsspec s3fs"
            + (" +ls" if listed else "")
            + ("" if cache_type == "readahead" else f" cache={cache_type}")
        )

    def open(self) -> Session:
        con = duckdb.connect()
        # Defensive: a registered fsspec filesystem already wins over the installed httpfs (the RGW log's
        # user agent shows aiobotocore even with autoload on), but it must never silently switch.
        con.execute("SET autoload_known_extensions = false")
        fs = s3fs.S3FileSystem(
            key=self.cfg.key,
            secret=self.cfg.secret,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.cfg.endpoint_url, "region_name": self.cfg.region},
            default_cache_type=self.cache_type,
        )
        fs.connect()  # create the aiobotocore client now (setup), as httpfs and pyarrow do in open()
        con.register_filesystem(fs)
        return Session(con, fs)

    def source(self, session: Session, keys: list[str]) -> str:
        if self.listed:
            for d in sorted({k.rsplit("/", 1)[0] for k in keys}):
                session.fs.ls(f"{self.bucket}/{self.prefix}/{d}", detail=False)
        return f"read_parquet({_sql_list([f's3://{self.bucket}/{self.prefix}/{k}' for k in keys])})"


class ArrowDataset(ReadPath):
    """A pyarrow dataset (S3 or local) registered in DuckDB, which pushes columns and filters into it.

    The dataset is built inside the timed part, as a server would per query; the schema is passed
    in (a HATS catalog has it in ``_common_metadata``) so pyarrow does not open a file to infer it.
    ``warm`` is the best a long-lived server could do with pyarrow: one filesystem and connection, and
    the dataset of each file list kept with its footers already parsed (``ensure_complete_metadata``);
    pyarrow has no cache for the data itself.
    """

    family = "arrow-ds"

    def __init__(
        self,
        schema: pa.Schema,
        cfg: S3Config | None = None,
        bucket: str = "",
        prefix: str = "",
        root: Path | None = None,
        warm: bool = False,
    ) -> None:
        self.schema, self.cfg, self.bucket, self.prefix, self.root = schema, cfg, bucket, prefix, root
        self.remote, self.warm = cfg is not None, warm
        self.name = ("arrow-ds s3" if self.remote else "local arrow-ds") + (
            " warm, dataset kept" if warm else ""
        )
        if not self.remote:
            self.family = "local"
        self._n = 0

    def open(self) -> Session:
        con = duckdb.connect()
        if self.cfg is None:
            return Session(con, pafs.LocalFileSystem())
        fs = pafs.S3FileSystem(
            access_key=self.cfg.key,
            secret_key=self.cfg.secret,
            region=self.cfg.region,
            endpoint_override=self.cfg.host,
            scheme="https" if self.cfg.use_ssl else "http",
        )
        return Session(con, fs)

    def source(self, session: Session, keys: list[str]) -> str:
        if self.warm and tuple(keys) in session.cache:
            return session.cache[tuple(keys)]
        if self.cfg is None:
            paths = [str(self.root / k) for k in keys]
        else:
            paths = [f"{self.bucket}/{self.prefix}/{k}" for k in keys]
        dataset = ds.dataset(paths, schema=self.schema, filesystem=session.fs, format="parquet")
        if self.warm:
            for frag in dataset.get_fragments():
                frag.ensure_complete_metadata()
        self._n += 1
        name = f"arrow_ds_{self._n}"
        session.con.register(name, dataset)
        session.keep.append(dataset)
        if self.warm:
            session.cache[tuple(keys)] = name
        return name


# ----------------------------------------------------------------------------------------- rgw log io
@dataclass
class IoStats:
    """Requests seen by radosgw for one query."""

    gets: int = 0
    heads: int = 0
    lists: int = 0
    other: int = 0
    bytes: int = 0
    agents: set[str] = field(default_factory=set)


_RGW_REQ = re.compile(r'"(?P<m>[A-Z]+) (?P<p>\S+) HTTP/[\d.]+" (?P<s>\d{3}) (?P<b>\d+) \S+ "(?P<a>[^"]*)"')


class RgwLog:
    """Counts requests per bucket from radosgw's ``client.rgw.log`` (one ``beast:`` line per request).

    Server-side counting is used because it sees httpfs, s3fs and pyarrow identically, and the
    user-agent field proves which client really served a path (e.g. that s3fs, not an autoloaded
    httpfs, handled the fsspec path).
    """

    def __init__(self, path: Path, bucket: str) -> None:
        self.path, self.bucket = path, bucket

    def mark(self) -> int:
        """Current end of the log."""
        return self.path.stat().st_size

    def since(self, offset: int) -> IoStats:
        """Requests to the bucket logged after ``offset`` (waits for the async log writer)."""
        time.sleep(0.6)
        with self.path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        st = IoStats()
        for line in text.splitlines():
            if "beast:" not in line:
                continue
            m = _RGW_REQ.search(line)
            if not m:
                continue
            obj = m["p"].split("?", 1)[0]
            if obj.rstrip("/") == f"/{self.bucket}" and m["m"] == "GET":
                st.lists += 1  # its bytes are a key listing, not Parquet: kept out of ``bytes``
                continue
            if not obj.startswith(f"/{self.bucket}/"):
                continue
            if m["m"] == "GET":
                st.gets += 1
            elif m["m"] == "HEAD":
                st.heads += 1
            else:
                st.other += 1
            st.bytes += int(m["b"])
            st.agents.add(m["a"].split(" ")[0])
        return st


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class Measurement:
    """Timings of one (path, workload) pair plus the answer, used to check the paths agree."""

    times: list[float] = field(default_factory=list)
    answer: Any = None
    rows: int = 0


def run_query(
    path: ReadPath, session: Session, w: Workload, cat: Catalog, cone: Cone
) -> tuple[float, Any, int]:
    """Time building the source and running the query to a complete Arrow table."""
    keys = cone.keys if w.cone_only else cat.keys
    t0 = time.perf_counter()
    src = path.source(session, keys)
    table = session.con.execute(w.sql.format(src=src)).to_arrow_table()
    dt = time.perf_counter() - t0
    if w.name in ("W2", "W4"):
        answer: Any = tuple(round(v, 4) if isinstance(v, float) else v for v in table.to_pylist()[0].values())
    elif w.name == "W1":
        answer = sorted(table.column("object_id").to_pylist())
    else:
        answer = table.num_rows
    return dt, answer, table.num_rows


@contextmanager
def session_for(path: ReadPath, warm_sessions: dict[str, Session]) -> Iterator[Session]:
    """A fresh session per measurement, or the path's long-lived one when it models a warm server."""
    if path.warm:
        yield warm_sessions[path.name]
        return
    s = path.open()
    try:
        yield s
    finally:
        s.close()


def measure(
    paths: list[ReadPath],
    wls: list[Workload],
    runs: int,
    cat: Catalog,
    cone: Cone,
    log: Callable[[str], None],
) -> dict[tuple[str, str], Measurement]:
    """Time every path x workload ``runs`` times, interleaved and with rotating path order.

    Interleaving spreads the other tenants' load on the 2 shared cores over all paths instead of
    penalising whichever path happened to run during a busy minute.
    """
    res = {(p.name, w.name): Measurement() for p in paths for w in wls}
    warm_sessions = {p.name: p.open() for p in paths if p.warm}
    for p in paths:
        if p.warm:
            for w in wls:  # warm-up: fill the caches, not timed
                run_query(p, warm_sessions[p.name], w, cat, cone)
    try:
        for r in range(runs):
            order = paths[r % len(paths) :] + paths[: r % len(paths)]
            for p in order:
                for w in wls:
                    with session_for(p, warm_sessions) as s:
                        dt, ans, nrows = run_query(p, s, w, cat, cone)
                    m = res[(p.name, w.name)]
                    m.times.append(dt)
                    m.answer, m.rows = ans, nrows
            log(f"  run {r + 1}/{runs} done")
    finally:
        for s in warm_sessions.values():
            s.close()
    return res


def io_profile(
    paths: list[ReadPath], wls: list[Workload], cat: Catalog, cone: Cone, rgw: RgwLog
) -> dict[tuple[str, str], IoStats]:
    """One extra, untimed execution per (S3 path, workload) with its requests counted in the RGW log."""
    out: dict[tuple[str, str], IoStats] = {}
    for p in paths:
        if not p.remote:
            continue
        warm = p.open() if p.warm else None
        try:
            for w in wls:
                if warm is not None:
                    run_query(p, warm, w, cat, cone)  # warm-up, so the counted run shows the caches
                    s = warm
                else:
                    s = p.open()
                mark = rgw.mark()
                try:
                    run_query(p, s, w, cat, cone)
                finally:
                    if warm is None:
                        s.close()
                out[(p.name, w.name)] = rgw.since(mark)
        finally:
            if warm is not None:
                warm.close()
    return out


# ------------------------------------------------------------------------------------------ reporting
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    sep = "  ".join("-" * w for w in widths)
    body = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join([line, sep, *body])


def report(
    paths: list[ReadPath],
    wls: list[Workload],
    res: dict[tuple[str, str], Measurement],
    io: dict[tuple[str, str], IoStats],
    runs: int,
) -> str:
    """Print the timing, ratio and I/O tables and return the recommendation line."""
    med = {k: statistics.median(m.times) for k, m in res.items()}
    print(
        f"\nTime per query, seconds: median (min / max) of {runs} runs; fresh connection per run "
        "unless 'warm'"
    )
    rows = []
    for p in paths:
        row = [p.name]
        for w in wls:
            m = res[(p.name, w.name)]
            row.append(f"{med[(p.name, w.name)]:.3f} ({min(m.times):.3f}/{max(m.times):.3f})")
        rows.append(row)
    print(_table(["path", *[f"{w.name} {w.label}" for w in wls]], rows))

    fastest = {w.name: min(med[(p.name, w.name)] for p in paths) for w in wls}
    s3_paths = [p for p in paths if p.remote]
    cold = [p for p in s3_paths if not p.warm] or paths
    fastest_s3 = {w.name: min(med[(p.name, w.name)] for p in cold) for w in wls}
    print(
        "\nMedian relative to the fastest path of each workload (any) | to the fastest cold S3 path "
        "(fresh connection)"
    )
    rows, geo = [], {}
    for p in paths:
        r_all = [med[(p.name, w.name)] / fastest[w.name] for w in wls]
        r_s3 = [med[(p.name, w.name)] / fastest_s3[w.name] for w in wls]
        geo[p.name] = math.exp(statistics.fmean(math.log(x) for x in r_s3))
        rows.append(
            [
                p.name,
                *[f"{a:.2f}x | {b:.2f}x" for a, b in zip(r_all, r_s3, strict=True)],
                f"{geo[p.name]:.2f}x",
            ]
        )
    print(_table(["path", *[w.name for w in wls], "geo-mean vs cold S3 best"], rows))

    pruning: dict[str, bool | None] = {}
    if io:
        print(
            "\nRequests seen by radosgw for one execution (GETs/HEADs[+LISTs], bytes sent); W1-all = cone "
            "files without predicate"
        )
        names = ["W1", "W1-all", "W2", "W3", "W4"]
        rows = []
        for p in s3_paths:
            cells = []
            for n in names:
                st = io.get((p.name, n))
                lists = f"+{st.lists}L" if st and st.lists else ""
                cells.append("-" if st is None else f"{st.gets}/{st.heads}{lists} {_fmt_bytes(st.bytes)}")
            narrow, full = io.get((p.name, "W1")), io.get((p.name, "W1-all"))
            if narrow and full and full.bytes:
                pruning[p.name] = narrow.bytes < 0.5 * full.bytes
                verdict = f"{'yes' if pruning[p.name] else 'NO'} ({narrow.bytes / full.bytes:.0%})"
            elif narrow and full:
                pruning[p.name] = None
                verdict = "n/a (cached)"
            else:
                verdict = "?"
            agents = sorted({a for n in names if (st := io.get((p.name, n))) for a in st.agents})
            rows.append([p.name, *cells, verdict, ",".join(agents)])
        print(_table(["path", *names, "row-group pruning (W1/W1-all bytes)", "user agent"], rows))
    else:
        print("\n(no radosgw log: set CEPH_S3_DIR to count requests and judge pruning)")

    return recommend(s3_paths, geo, pruning)


def recommend(s3_paths: list[ReadPath], geo: dict[str, float], pruning: dict[str, bool | None]) -> str:
    """One line: the read path (family) with the best variant, among those that keep pruning.

    Each family is judged by its best variant, cold or warm, because a server would configure it
    that way; its cold figure is printed as well, since a warm cache helps only repeated reads.
    """
    fams: dict[str, list[ReadPath]] = {}
    for p in s3_paths:
        fams.setdefault(p.family, []).append(p)
    ok = {f: all(pruning.get(p.name, True) is not False for p in ps if not p.warm) for f, ps in fams.items()}

    def summary(f: str) -> str:
        cold = min((p for p in fams[f] if not p.warm), key=lambda p: geo[p.name], default=None)
        warm = min((p for p in fams[f] if p.warm), key=lambda p: geo[p.name], default=None)
        parts = [f"cold '{cold.name}' {geo[cold.name]:.2f}x"] if cold else []
        parts += [f"reused '{warm.name}' {geo[warm.name]:.2f}x"] if warm else []
        return f"{f} ({', '.join(parts)}{'' if ok[f] else ', LOSES pruning'})"

    good = [f for f in fams if ok[f]]
    if not good:
        return "Recommendation: no S3 read path kept row-group pruning; see the tables"
    best = min(good, key=lambda f: min(geo[p.name] for p in fams[f]))
    others = "; ".join(summary(f) for f in fams if f != best)
    return (
        f"Recommendation: {summary(best)} -- keeps row-group pruning; geo-mean time vs the best cold S3 "
        f"median. Others: {others}"
    )


def check_answers(
    paths: list[ReadPath], wls: list[Workload], res: dict[tuple[str, str], Measurement]
) -> None:
    """Fail loudly if any path returned something different from the local reference."""
    ref = paths[0].name
    for w in wls:
        for p in paths[1:]:
            if res[(p.name, w.name)].answer != res[(ref, w.name)].answer:
                raise SystemExit(f"error: {p.name} {w.name} answer differs from {ref}")


# ----------------------------------------------------------------------------------------------- main
def build_paths(names: list[str], cfg: S3Config, cat: Catalog, bucket: str, prefix: str) -> list[ReadPath]:
    """Instantiate the selected read paths; the local reference always comes first."""
    registry: dict[str, Callable[[], ReadPath]] = {
        "local": lambda: LocalDuckDB(cat.root),
        "local-arrow": lambda: ArrowDataset(cat.schema, root=cat.root),
        "httpfs": lambda: Httpfs(cfg, bucket, prefix),
        "httpfs-t8": lambda: Httpfs(cfg, bucket, prefix, threads=8),
        "httpfs-t16": lambda: Httpfs(cfg, bucket, prefix, threads=16),
        "httpfs-curl": lambda: Httpfs(cfg, bucket, prefix, client="curl"),
        "httpfs-t8-curl": lambda: Httpfs(cfg, bucket, prefix, threads=8, client="curl"),
        "httpfs-warm": lambda: Httpfs(cfg, bucket, prefix, cache="validated"),
        "httpfs-warm-all": lambda: Httpfs(cfg, bucket, prefix, cache="all"),
        "fsspec": lambda: Fsspec(cfg, bucket, prefix),
        "fsspec-none": lambda: Fsspec(cfg, bucket, prefix, cache_type="none"),
        "fsspec-ls": lambda: Fsspec(cfg, bucket, prefix, cache_type="none", listed=True),
        "arrow": lambda: ArrowDataset(cat.schema, cfg, bucket, prefix),
        "arrow-warm": lambda: ArrowDataset(cat.schema, cfg, bucket, prefix, warm=True),
    }
    unknown = [n for n in names if n not in registry]
    if unknown:
        sys.exit(f"error: unknown path(s) {unknown}; choose from {sorted(registry)}")
    return [registry[n]() for n in ["local", *[n for n in names if n != "local"]]]


DEFAULT_PATHS = (
    "local,local-arrow,httpfs,httpfs-t8,httpfs-warm,httpfs-warm-all,fsspec,fsspec-ls,arrow,arrow-warm"
)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build and upload the catalog, measure, report, and always drop the bucket."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="catalog rows (default 2,000,000)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per path and workload (default 5)")
    ap.add_argument("--order", type=int, default=3, help="HEALPix order of the files (default 3)")
    ap.add_argument(
        "--row-group-size",
        type=int,
        default=None,
        help="rows per row group (default: a fifth of the mean file, so files have several)",
    )
    ap.add_argument(
        "--paths", default=DEFAULT_PATHS, help=f"comma-separated read paths (default {DEFAULT_PATHS})"
    )
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    cfg = s3_config_from_env()
    ext = httpfs_extension_file()
    # INSTALL copies the wheel's signed binary into ~/.duckdb/extensions once; later connections LOAD it.
    duckdb.connect().execute(f"INSTALL '{ext}'")
    bucket, prefix = f"dac-bench-{uuid.uuid4().hex[:10]}", "catalogs/bench_objects"
    tmp = Path(tempfile.mkdtemp(prefix="duckdb-read-paths-"))
    created = False
    try:
        t0 = time.perf_counter()
        cat = make_catalog(tmp, args.rows, args.order, args.row_group_size, args.seed)
        rg_per_file = statistics.fmean(pq.ParquetFile(tmp / k).num_row_groups for k in cat.keys)
        print(
            f"catalog: {cat.rows:,} rows, {len(cat.keys)} files at Norder={cat.order}, row groups of "
            f"{cat.row_group_size:,} rows ({rg_per_file:.1f} per file), {_fmt_bytes(cat.nbytes)} "
            f"[built in {time.perf_counter() - t0:.1f} s]"
        )
        created = True
        up = upload(cfg, cat, bucket, prefix)
        print(f"uploaded to s3://{bucket}/{prefix}/ in {up:.1f} s ({cat.nbytes / up / 2**20:.0f} MiB/s)")
        cone = choose_cone(cat)
        print(
            f"W1 cone: ra={cone.ra:.3f} dec={cone.dec:.3f} r={cone.radius_deg} deg touches {len(cone.keys)} "
            f"files; _healpix_29 BETWEEN {cone.lo} AND {cone.hi} (one order-{NARROW_ORDER} cell)"
        )
        print(
            f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}, s3fs {s3fs.__version__}, "
            f"cpus {os.cpu_count()}, endpoint {cfg.endpoint_url}"
        )

        paths = build_paths([n.strip() for n in args.paths.split(",") if n.strip()], cfg, cat, bucket, prefix)
        wls = workloads(cone)
        io: dict[tuple[str, str], IoStats] = {}
        if cfg.rgw_log:
            print("counting requests in the radosgw log ...")
            io = io_profile(paths, [*wls, unfiltered_cone()], cat, cone, RgwLog(cfg.rgw_log, bucket))
        print(f"timing {len(paths)} paths x {len(wls)} workloads x {args.runs} runs ...")
        res = measure(paths, wls, args.runs, cat, cone, lambda s: print(s, flush=True))
        check_answers(paths, wls, res)
        ref = paths[0].name
        print(
            f"all paths agree: W1 returns {res[(ref, 'W1')].rows} rows, W2 {res[(ref, 'W2')].answer}, "
            f"W3 {res[(ref, 'W3')].rows:,} rows, W4 {res[(ref, 'W4')].answer}"
        )
        print(report(paths, wls, res, io, args.runs))
    finally:
        if created:
            try:
                delete_bucket(cfg, bucket)
            except Exception as exc:  # report, but do not hide the original error
                print(f"warning: could not delete bucket {bucket}: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
