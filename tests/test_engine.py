"""The query path end to end on a real lake (local and Ceph RGW): ADQL -> pruning -> sandbox -> rows."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord, search_around_sky

import dac_lake
from dac_lake.adql import AdqlError
from dac_lake.catalog_def import load_definition
from ingest.release import IngestOptions, ingest_release
from tests.conftest import TEST_DEFINITION, make_catalog, write_parts

N = 20_000


@pytest.fixture
def two_catalogs(lake, definition_file, tmp_path):
    """testcat (with a dense clump) and a private 'othercat': 40% of it, jittered by < 1 arcsec."""
    import yaml

    main = make_catalog(N, seed=3)
    opts = IngestOptions(
        max_rows_per_partition=1500, highest_order=7, margin_arcsec=10, validate_with_lsdb=False
    )
    definition = load_definition(definition_file)
    ingest_release(lake, "testcat", "dr1", write_parts(main, tmp_path / "a"), definition, opts)
    rng = np.random.default_rng(7)
    pick = rng.choice(N, N * 2 // 5, replace=False)
    sub = main.take(pick)
    coords = SkyCoord(sub["ra"].to_numpy(), sub["dec"].to_numpy(), unit="deg").directional_offset_by(
        rng.uniform(0, 360, len(pick)) * u.deg, rng.uniform(0, 1.0, len(pick)) * u.arcsec
    )
    other = sub.set_column(1, "ra", [coords.ra.deg]).set_column(2, "dec", [coords.dec.deg])
    other = other.set_column(0, "object_id", [np.arange(len(pick), dtype=np.int64) + 10**9])
    definition = dict(TEST_DEFINITION, name="othercat", groups=["team"])
    path = tmp_path / "othercat.yaml"
    path.write_text(yaml.safe_dump(definition))
    ingest_release(lake, "othercat", "v1", write_parts(other, tmp_path / "b"), load_definition(path), opts)
    return lake, main, other


def _publish_testcat(lake, definition_file, folder, release: str, rows: int, seed: int) -> None:
    """Ingest and publish another small release of testcat."""
    opts = IngestOptions(max_rows_per_partition=1500, highest_order=7, validate_with_lsdb=False)
    parts = write_parts(make_catalog(rows, seed=seed), folder)
    ingest_release(lake, "testcat", release, parts, load_definition(definition_file), opts)


def _brute_cone(table, ra, dec, radius):
    sep = SkyCoord(table["ra"].to_numpy(), table["dec"].to_numpy(), unit="deg").separation(
        SkyCoord(ra, dec, unit="deg")
    )
    return set(table["object_id"].to_numpy()[sep.deg <= radius].tolist())


@pytest.mark.parametrize(
    ("ra", "dec", "radius"),
    [
        (45.0, -30.0, 1 / 3600),
        (45.0, -30.0, 0.2),
        (0.05, 10.0, 3.0),
        (120.0, 89.5, 2.0),
        (300.0, -89.9, 5.0),
        (45.0, -30.0, 30.0),
    ],
)
def test_cone_equals_astropy_and_prunes(two_catalogs, ra, dec, radius):
    lake, main, _ = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    got = session.cone("testcat", ra, dec, radius)
    assert set(got["object_id"].to_pylist()) == _brute_cone(main, ra, dec, radius)
    if radius < 1:
        assert session.last.files <= 4 < session.last.total_files
    dist = got["dist_deg"].to_numpy()
    assert np.all(np.diff(dist) >= 0) and (len(dist) == 0 or dist.max() <= radius)


def test_adql_overflow_and_metadata(two_catalogs):
    lake, main, _ = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    table = session.adql("SELECT object_id, ra, mag FROM testcat.main WHERE mag < 19 ORDER BY mag", maxrec=10)
    assert table.num_rows == 10 and session.last_result.overflow
    assert [c.unit for c in session.last_result.columns] == ["", "deg", "mag"]
    want = np.sort(main["mag"].to_numpy()[main["mag"].to_numpy() < 19])[:10]
    np.testing.assert_allclose(table["mag"].to_numpy(), want)
    full = session.adql("SELECT COUNT(*) AS n FROM testcat.main")
    assert full["n"][0].as_py() == N and not session.last_result.overflow


def test_crossmatch_equals_search_around_sky(two_catalogs):
    lake, main, other = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    got = session.crossmatch("testcat", "othercat", 2.0)
    a = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    b = SkyCoord(other["ra"].to_numpy(), other["dec"].to_numpy(), unit="deg")
    ia, ib, _, _ = search_around_sky(a, b, 2.0 * u.arcsec)
    ids_a, ids_b = main["object_id"].to_numpy()[ia], other["object_id"].to_numpy()[ib]
    want = set(zip(ids_a.tolist(), ids_b.tolist(), strict=True))
    got_pairs = set(zip(got["object_id"].to_pylist(), got["object_id_othercat"].to_pylist(), strict=True))
    assert got_pairs == want and len(want) >= N * 2 // 5


def test_data_rights_hide_private_catalog(two_catalogs):
    lake, _, _ = two_catalogs
    anonymous = dac_lake.connect(lake.storage.url, identity=set())
    with pytest.raises(AdqlError) as err:
        anonymous.adql("SELECT COUNT(*) FROM othercat.main")
    assert "othercat" in str(err.value) and "othercat" not in str(err.value).split("did you mean")[-1]
    assert {t.schema for t in anonymous.engine.registry.tables()} == {"testcat", "testcat@dr1"}
    member = dac_lake.connect(lake.storage.url, identity={"team"})
    assert member.adql("SELECT COUNT(*) AS n FROM othercat.main")["n"][0].as_py() == N * 2 // 5


def test_specific_release_is_addressable(two_catalogs, definition_file, tmp_path):
    lake, _, _ = two_catalogs
    _publish_testcat(lake, definition_file, tmp_path / "c", "dr2", rows=500, seed=9)
    session = dac_lake.connect(lake.storage.url)
    assert session.adql("SELECT COUNT(*) AS n FROM testcat.main")["n"][0].as_py() == 500
    assert session.adql('SELECT COUNT(*) AS n FROM "testcat@dr1".main')["n"][0].as_py() == N


def test_hostile_adql_never_reaches_duckdb(two_catalogs, tmp_path):
    lake, _, _ = two_catalogs
    canary = tmp_path / "canary.csv"
    canary.write_text("secret\nTOPSECRET-CANARY\n")
    session = dac_lake.connect(lake.storage.url)
    for text in [
        f"SELECT * FROM read_csv('{canary}')",
        "SELECT 1; SELECT 2",
        f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
        f"SELECT * FROM testcat.main WHERE 1=1 UNION SELECT * FROM '{canary}'",
        "ATTACH 'x.db'",
        "SELECT ra::text FROM testcat.main",
    ]:
        with pytest.raises(AdqlError):
            session.adql(text)
    assert session.adql("SELECT COUNT(*) AS n FROM testcat.main")["n"][0].as_py() == N


def test_long_lived_session_sees_new_release(two_catalogs, definition_file, tmp_path):
    lake, _, _ = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    session.engine.registry.ttl_seconds = 0.0
    assert session.adql("SELECT COUNT(*) AS n FROM testcat.main")["n"][0].as_py() == N
    _publish_testcat(lake, definition_file, tmp_path / "d", "dr9", rows=700, seed=4)
    assert session.adql("SELECT COUNT(*) AS n FROM testcat.main")["n"][0].as_py() == 700
    lake.publish("testcat", "dr1")  # roll back
    assert session.adql("SELECT COUNT(*) AS n FROM testcat.main")["n"][0].as_py() == N


def test_restricted_session_lists_and_counts_only_its_catalogs(two_catalogs):
    from dac_lake.lake import LakeError

    lake, _, _ = two_catalogs
    anonymous = dac_lake.connect(lake.storage.url, identity=set())
    assert anonymous.tables() == ["testcat"]
    with pytest.raises(LakeError, match="no published catalog 'othercat'"):
        anonymous.count("othercat")
    with pytest.raises(LakeError, match="use adql"):
        anonymous.sql("SELECT 1")
    assert dac_lake.connect(lake.storage.url).tables() == ["othercat", "testcat"]


def test_translation_cache_is_keyed_on_visible_tables(two_catalogs, definition_file, tmp_path):
    lake, _, _ = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    session.engine.registry.ttl_seconds = 0.0
    text = "SELECT COUNT(*) AS n FROM testcat.main"
    first = session.engine._translate(text, None)
    assert session.engine._translate(text, None) is first
    assert session.engine._translate(text, 5) is not first  # MAXREC changes the SQL (LIMIT)
    _publish_testcat(lake, definition_file, tmp_path / "e", "dr5", rows=300, seed=6)
    assert session.engine._translate(text, None) is not first  # a new release: a new plan
    assert session.adql(text)["n"][0].as_py() == 300
