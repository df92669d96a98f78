"""Ingest writes standard HATS that hats and lsdb open unchanged, locally and on the real Ceph RGW."""

from __future__ import annotations

import hats
import lsdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from dac_lake import layout
from dac_lake.catalog_def import load_definition
from dac_lake.healpix import SPATIAL_INDEX_COLUMN, healpix29, pixel_range29
from dac_lake.layout import pixel_file
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts

N = 30_000
THRESHOLD = 4_000


@pytest.fixture
def ingested(lake, definition_file, tmp_path):
    table = make_catalog(N)
    inputs = write_parts(table, tmp_path / "in", parts=3)
    summary = ingest_release(
        lake,
        "testcat",
        "dr1",
        inputs,
        load_definition(definition_file),
        IngestOptions(max_rows_per_partition=THRESHOLD, highest_order=7, margin_arcsec=60.0),
    )
    return lake, table, summary


def test_release_is_standard_hats(ingested):
    lake, _, summary = ingested
    assert summary.published and summary.rows == N
    root = lake.storage.upath(layout.release_prefix("testcat", "dr1"))
    collection = hats.read_hats(root)
    main = collection.main_catalog
    assert main.catalog_info.total_rows == N
    assert collection.collection_properties.default_margin == "testcat_1arcmin"
    assert collection.collection_properties.all_indexes == {"object_id": "testcat_object_id_index"}
    from hats.io.validation import is_valid_catalog

    assert is_valid_catalog(root / "testcat", strict=True)
    assert is_valid_catalog(root / "testcat_1arcmin", strict=True)
    # partitions respect the threshold, and a clump forces several orders
    assert all(n <= THRESHOLD for _, _, n in summary_partitions(lake))
    assert len(summary.orders) >= 2


def summary_partitions(lake):
    import json

    manifest = json.loads(
        lake.storage.read_text(f"{layout.release_prefix('testcat', 'dr1')}/_dac_release.json")
    )
    return manifest["partitions"]


def test_files_sorted_and_rows_in_their_pixel(ingested):
    lake, table, _ = ingested
    seen_ids = []
    for order, pixel, rows in summary_partitions(lake):
        rel = f"{layout.release_prefix('testcat', 'dr1')}/testcat/dataset/{pixel_file(order, pixel)}"
        part = pq.read_table(lake.storage.path(rel), filesystem=lake.storage.pa_fs)
        assert part.num_rows == rows
        assert part.column_names[0] == SPATIAL_INDEX_COLUMN
        hp = part.column(SPATIAL_INDEX_COLUMN).to_numpy()
        assert np.all(np.diff(hp) >= 0), "rows must be sorted by _healpix_29"
        lo, hi = pixel_range29(order, pixel)
        assert hp.min() >= lo and hp.max() < hi
        np.testing.assert_array_equal(hp, healpix29(part["ra"].to_numpy(), part["dec"].to_numpy()))
        seen_ids.append(part["object_id"].to_numpy())
    ids = np.concatenate(seen_ids)
    assert sorted(ids) == sorted(table["object_id"].to_numpy())


def test_lsdb_opens_release_and_margin_and_index(ingested):
    lake, table, _ = ingested
    root = lake.storage.upath(layout.release_prefix("testcat", "dr1"))
    cat = lsdb.open_catalog(root)
    assert cat.margin is not None
    frame = cat.compute()
    assert len(frame) == N
    some_id = int(table["object_id"][123].as_py())
    found = cat.id_search({"object_id": some_id}).compute()
    assert list(found["object_id"]) == [some_id]
    # cone search through lsdb agrees with astropy on the raw table
    ra0, dec0, radius = 45.0, -30.0, 1.5
    got = set(cat.cone_search(ra0, dec0, radius * 3600).compute()["object_id"])
    coords = SkyCoord(table["ra"].to_numpy(), table["dec"].to_numpy(), unit="deg")
    sep = coords.separation(SkyCoord(ra0, dec0, unit="deg")).deg
    want = set(table["object_id"].to_numpy()[sep <= radius])
    assert got == want and len(want) > 100


def test_margin_holds_every_neighbour_within_threshold(ingested):
    """Every row outside a partition whose 1-arcmin circle touches it is in that partition's margin."""
    import cdshealpix
    from astropy import units as u
    from astropy.coordinates import Latitude, Longitude

    lake, table, _ = ingested
    prefix = layout.release_prefix("testcat", "dr1")
    parts = summary_partitions(lake)
    ra = table["ra"].to_numpy()
    dec = table["dec"].to_numpy()
    hp29 = healpix29(ra, dec)
    checked = 0
    for order, pixel, _ in parts[:: max(1, len(parts) // 10)]:
        rel = f"{prefix}/testcat_1arcmin/dataset/{pixel_file(order, pixel)}"
        ids = (
            set(pq.read_table(lake.storage.path(rel), filesystem=lake.storage.pa_fs)["object_id"].to_numpy())
            if lake.storage.exists(rel)
            else set()
        )
        # candidates (a superset, at an order whose pixels are wider than 1 arcmin): rows in the pixels of
        # order min(order+3, 10) just outside the partition; each one is then brute-force cone tested
        fine = min(order + 3, 10)
        edges, corners = cdshealpix.nested.external_neighbours(np.uint64(pixel), order, fine - order)
        border = np.concatenate([edges.ravel(), corners.ravel()])
        near = np.isin(hp29 >> (2 * (29 - fine)), border[border >= 0].astype(np.int64))
        for i in np.flatnonzero(near)[:1500]:
            cells = cdshealpix.nested.cone_search(
                Longitude(ra[i], u.deg), Latitude(dec[i], u.deg), 60 * u.arcsec, depth=order, flat=True
            )[0]
            touches = pixel in set(cells.tolist())
            if touches:
                assert table["object_id"][int(i)].as_py() in ids
                checked += 1
    assert checked > 10
    # and the margin holds no row of the partition itself
    for order, pixel, _ in parts[:3]:
        rel = f"{prefix}/testcat_1arcmin/dataset/{pixel_file(order, pixel)}"
        if lake.storage.exists(rel):
            hp = pq.read_table(lake.storage.path(rel), filesystem=lake.storage.pa_fs)[SPATIAL_INDEX_COLUMN]
            lo, hi = pixel_range29(order, pixel)
            assert not np.any((hp.to_numpy() >= lo) & (hp.to_numpy() < hi))


def test_column_metadata_in_parquet_and_properties(ingested):
    lake, _, _ = ingested
    prefix = layout.release_prefix("testcat", "dr1")
    schema = pq.read_schema(
        lake.storage.path(f"{prefix}/testcat/dataset/_common_metadata"), filesystem=lake.storage.pa_fs
    )
    assert schema.field("ra").metadata[b"unit"] == b"deg"
    assert schema.field("ra").metadata[b"ucd"] == b"pos.eq.ra;meta.main"
    assert b"dac_lake.catalog" in schema.metadata
    props = lake.storage.read_text(f"{prefix}/testcat/hats.properties")
    assert "hats_col_ra=ra" in props and f"hats_nrows={N}" in props
    assert "obs_title=Test catalog" in props


@pytest.mark.parametrize("fmt", ["csv", "fits", "votable"])
def test_other_input_formats_give_the_same_catalog(fmt, tmp_path, definition_file):
    from dac_lake.lake import Lake
    from dac_lake.storage import LakeStorage

    table = make_catalog(3000, seed=5)
    path = tmp_path / f"in.{ {'csv': 'csv', 'fits': 'fits', 'votable': 'xml'}[fmt] }"
    if fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        Table.from_pandas(table.to_pandas()).write(path, format="fits" if fmt == "fits" else "votable")
    lake = Lake(LakeStorage(str(tmp_path / "lake")))
    lake.init()
    summary = ingest_release(
        lake,
        "testcat",
        "dr1",
        [str(path)],
        load_definition(definition_file),
        IngestOptions(max_rows_per_partition=1000, validate_with_lsdb=False),
    )
    assert summary.rows == 3000
    got = pq.read_table(
        lake.storage.path("catalogs/testcat/releases/dr1/testcat/dataset"), partitioning=None
    ).sort_by("object_id")
    want = table.sort_by("object_id")
    np.testing.assert_array_equal(got["object_id"].to_numpy(), want["object_id"].to_numpy())
    np.testing.assert_allclose(got["ra"].to_numpy(), want["ra"].to_numpy())
    assert got["label"].to_pylist() == want["label"].to_pylist()


def test_s3_inputs_and_globs(lake, definition_file, tmp_path):
    """Inputs may be globs, and on an S3 lake they may live in the bucket too."""
    table = make_catalog(2000, seed=9)
    local = write_parts(table, tmp_path / "in", parts=2)
    if lake.storage.is_s3:
        for i, path in enumerate(local):
            with open(path, "rb") as fh:
                lake.storage.write_bytes(f"incoming/part-{i}.parquet", fh.read())
        inputs = [lake.storage.url_of("incoming/*.parquet")]
    else:
        inputs = [str(tmp_path / "in" / "*.parquet")]
    summary = ingest_release(
        lake,
        "testcat",
        "v1",
        inputs,
        load_definition(definition_file),
        IngestOptions(max_rows_per_partition=500, validate_with_lsdb=False),
    )
    assert summary.rows == 2000 and summary.input_files == 2


def test_count_without_scan_from_manifest(ingested):
    lake, _, _ = ingested
    assert sum(n for _, _, n in summary_partitions(lake)) == N
    md = pq.read_metadata(
        lake.storage.path(f"{layout.release_prefix('testcat', 'dr1')}/testcat/dataset/_metadata"),
        filesystem=lake.storage.pa_fs,
    )
    assert md.num_rows == N
    assert isinstance(md, pa._parquet.FileMetaData)
