"""The query path end to end on a real lake (local and Ceph RGW): ADQL -> pruning -> sandbox -> rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
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


# ---------------------------------------------------------------------------------- the fast paths
CONES = [
    (45.0, -30.0, 1 / 3600),
    (45.0, -30.0, 0.05),
    (45.3, -29.2, 0.5),
    (0.01, 10.0, 3.0),  # across RA = 0
    (359.99, -5.0, 1.5),
    (120.0, 89.5, 2.0),  # around the poles
    (300.0, -89.9, 5.0),
    (45.0, -30.0, 30.0),  # many partitions
    (200.0, 60.0, 1e-4),  # no row at all
]


@pytest.mark.parametrize(("ra", "dec", "radius"), CONES)
def test_cone_fast_path_equals_the_sql_path(two_catalogs, ra, dec, radius):
    """QueryEngine.cone reads row groups directly (no SQL): same rows, order, distances, types and column
    metadata as the same cone through ADQL, and the same as astropy."""
    from dac_lake.engine import cone_adql

    lake, main, _ = two_catalogs
    engine = dac_lake.connect(lake.storage.url).engine
    lt = engine.find_table("testcat")
    for columns in (None, ["mag", "object_id", "ra"]):
        fast = engine.cone("testcat", ra, dec, radius, columns=columns)
        sql = engine.adql(cone_adql(lt, ra, dec, radius, columns, None))
        assert fast.sql == "" and fast.profile["path"].startswith("cone") and sql.sql
        assert fast.table.schema == sql.table.schema
        assert fast.columns == sql.columns
        assert fast.table["object_id"].to_pylist() == sql.table["object_id"].to_pylist()
        np.testing.assert_allclose(fast.table["dist_deg"], sql.table["dist_deg"], rtol=0, atol=1e-12)
        assert fast.table.drop_columns(["dist_deg"]).equals(sql.table.drop_columns(["dist_deg"]))
    assert set(fast.table["object_id"].to_pylist()) == _brute_cone(main, ra, dec, radius)
    assert fast.profile["rows_in_row_groups_read"] >= fast.table.num_rows
    # MAXREC: the nearest rows and the overflow flag, as through ADQL
    n = sql.table.num_rows
    for maxrec in {0, max(n - 1, 0), n}:
        fast = engine.cone("testcat", ra, dec, radius, maxrec=maxrec)
        assert fast.table.num_rows == min(n, maxrec) and fast.overflow == (n > maxrec)
        assert fast.table["object_id"].to_pylist() == sql.table["object_id"].to_pylist()[:maxrec]


def test_cone_falls_back_to_sql_when_large_or_filtered(two_catalogs, monkeypatch):
    from dac_lake import cone

    lake, main, _ = two_catalogs
    engine = dac_lake.connect(lake.storage.url).engine
    want = _brute_cone(main, 45.0, -30.0, 2.0)
    monkeypatch.setattr(cone, "MAX_FAST_ROWS", 10)
    big = engine.cone("testcat", 45.0, -30.0, 2.0)
    assert big.sql and set(big.table["object_id"].to_pylist()) == want
    monkeypatch.undo()
    filtered = engine.cone("testcat", 45.0, -30.0, 2.0, where="mag < 19")
    mags = dict(zip(main["object_id"].to_pylist(), main["mag"].to_pylist(), strict=True))
    assert filtered.sql and set(filtered.table["object_id"].to_pylist()) == {i for i in want if mags[i] < 19}
    with pytest.raises(AdqlError):
        engine.cone("testcat", 45.0, -30.0, 2.0, columns=["nope"])


@pytest.mark.parametrize("radius_arcsec", [0.3, 2.0, 60.0, 1800.0])
def test_crossmatch_neighbour_join_equals_search_around_sky(two_catalogs, radius_arcsec):
    """The HEALPix-neighbour equi-join (anchor: the smaller catalog) at radii from sub-arcsecond to half a
    degree returns astropy's pairs; the plan is recorded in the profile."""
    lake, main, other = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    got = session.crossmatch("testcat", "othercat", radius_arcsec)
    a = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    b = SkyCoord(other["ra"].to_numpy(), other["dec"].to_numpy(), unit="deg")
    ia, ib, _, _ = search_around_sky(a, b, radius_arcsec * u.arcsec)
    ids_a, ids_b = main["object_id"].to_numpy()[ia], other["object_id"].to_numpy()[ib]
    want = set(zip(ids_a.tolist(), ids_b.tolist(), strict=True))
    pairs = list(zip(got["object_id"].to_pylist(), got["object_id_othercat"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) and set(pairs) == want
    (note,) = session.last_result.profile["crossmatches"]
    assert note["anchor"] == "__dac_t1" and note["expanded"] == "__dac_t0"  # othercat has fewer rows
    assert "__dac_x0" in session.last_result.sql


def test_crossmatch_in_a_region_reads_only_the_neighbourhood(two_catalogs):
    """A cone on the small side limits the big side to the anchor cells' neighbourhood (files and row
    groups), and an outer join keeps its unmatched rows once."""
    lake, main, other = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    text = (
        "SELECT o.object_id AS o_id, t.object_id AS t_id FROM othercat.main AS o LEFT JOIN testcat.main AS t "
        "ON DISTANCE(POINT(o.ra, o.dec), POINT(t.ra, t.dec)) <= 2.0/3600 "
        "WHERE 1 = CONTAINS(POINT(o.ra, o.dec), CIRCLE(120.0, 20.0, 4.0))"
    )
    got = session.adql(text)
    result = session.last_result
    (note,) = result.profile["crossmatches"]
    assert note["expanded"] == "__dac_t1"  # the non-preserved side of the LEFT JOIN
    expanded = next(s for s in result.scans if s.relation == "__dac_t1")
    assert len(expanded.files) < expanded.total_files
    o_sky = SkyCoord(other["ra"].to_numpy(), other["dec"].to_numpy(), unit="deg")
    inside = o_sky.separation(SkyCoord(120.0, 20.0, unit="deg")).deg <= 4.0
    sub = other.filter(pa.array(inside))
    a = SkyCoord(sub["ra"].to_numpy(), sub["dec"].to_numpy(), unit="deg")
    b = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    ia, ib, _, _ = search_around_sky(a, b, 2.0 * u.arcsec)
    ids_a, ids_b = sub["object_id"].to_numpy()[ia], main["object_id"].to_numpy()[ib]
    want = set(zip(ids_a.tolist(), ids_b.tolist(), strict=True))
    rows = list(zip(got["o_id"].to_pylist(), got["t_id"].to_pylist(), strict=True))
    assert {r for r in rows if r[1] is not None} == want
    lonely = [o for o, t in rows if t is None]
    assert sorted(lonely) == sorted(set(sub["object_id"].to_pylist()) - {o for o, _ in want})
    assert len(rows) == len(want) + len(lonely)


def test_engine_serves_concurrent_threads(two_catalogs):
    """Cones (both paths), ADQL and cross-matches from eight threads on one engine give the answers they
    give one at a time."""
    import threading

    lake, _, _ = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    engine = session.engine
    jobs = [
        lambda: engine.cone("testcat", 45.0, -30.0, 0.3).table["object_id"].to_pylist(),
        lambda: engine.cone("testcat", 45.0, -30.0, 1.0, where="mag < 19").table["object_id"].to_pylist(),
        lambda: engine.adql("SELECT COUNT(*) AS n FROM othercat.main WHERE mag > 18").table.to_pylist(),
        lambda: sorted(session.crossmatch("testcat", "othercat", 1.0)["object_id"].to_pylist()),
        lambda: (
            engine.adql(
                "SELECT object_id FROM testcat.main WHERE 1 = CONTAINS(POINT(ra, dec), CIRCLE(10, 10, 5)) "
                "ORDER BY object_id"
            )
            .table["object_id"]
            .to_pylist()
        ),
    ]
    expected = [job() for job in jobs]
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(6):
                k = (worker + i) % len(jobs)
                assert jobs[k]() == expected[k], k
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]


def test_profile_says_files_and_row_groups(two_catalogs, monkeypatch):
    """Every query's explain() says which files and row groups it read: a small spatial selection is read
    with pyarrow (files, row groups, rows, bytes), a larger one by DuckDB (files per scan from its
    profiler, row groups selected by the `_healpix_29` ranges from the footers; with io_log=True, also
    every read DuckDB made)."""
    from dac_lake import engine as engine_mod
    from dac_lake.engine import QueryEngine

    lake, main, _ = two_catalogs
    small = "SELECT object_id FROM testcat.main WHERE 1 = CONTAINS(POINT(ra, dec), CIRCLE(45.0, -30.0, 0.2))"
    large = "SELECT object_id FROM testcat.main WHERE 1 = CONTAINS(POINT(ra, dec), CIRCLE(200.0, 10.0, 40.0))"
    quiet = dac_lake.connect(lake.storage.url).engine
    loud = QueryEngine(lake, frozenset({"*"}), io_log=True)
    for engine in (quiet, loud):
        result = engine.adql(small)
        assert set(result.table["object_id"].to_pylist()) == _brute_cone(main, 45.0, -30.0, 0.2)
        (scan,) = result.explain()["scans"]
        assert scan["read_by"] == "pyarrow" and 1 <= scan["pyarrow_read"]["files"] <= scan["files"]
        assert scan["pyarrow_read"]["rows"] >= result.table.num_rows and scan["pyarrow_read"]["bytes"] > 0
        (rgs,) = result.profile["row_groups"].values()
        assert rgs["selected"] == scan["pyarrow_read"]["row_groups"] <= rgs["in_files"]
        monkeypatch.setattr(engine_mod, "SMALL_SCAN_ROWS", 10)  # the test catalog is small
        result = engine.adql(large)
        monkeypatch.undo()
        assert set(result.table["object_id"].to_pylist()) == _brute_cone(main, 200.0, 10.0, 40.0)
        (scan,) = result.explain()["scans"]
        assert scan["read_by"] == "duckdb" and result.profile["files_scanned"] >= 1
        (rgs,) = result.profile["row_groups"].values()
        assert 0 < rgs["selected"] <= rgs["in_files"] and rgs["rows_selected"] >= result.table.num_rows
        assert ("io" in result.profile) == engine.io_log
        if engine.io_log:
            io = result.profile["io"]
            assert 1 <= io["files_read"] <= scan["files"] and io["bytes_read"] > 0
    full = quiet.adql("SELECT COUNT(*) AS n FROM testcat.main")
    assert full.profile["row_groups"] == {"__dac_t0": None} and full.table["n"][0].as_py() == N
    loud.close()


# ---------------------------------------------------------------------------------- outer joins, uploads
def _upload(name: str, ra, dec, tag: str = "s"):
    from dac_lake.adql.model import ColumnMeta, TableMeta
    from dac_lake.engine import MemoryTable

    meta = TableMeta(
        schema="TAP_UPLOAD",
        name=name,
        columns=(
            ColumnMeta("name", "string"),
            ColumnMeta("ra", "float64", "deg", "pos.eq.ra;meta.main"),
            ColumnMeta("dec", "float64", "deg", "pos.eq.dec;meta.main"),
        ),
        ra_column="ra",
        dec_column="dec",
    )
    names = [f"{tag}{i}" for i in range(len(ra))]
    return MemoryTable(
        meta, pa.table({"name": names, "ra": pa.array(ra, pa.float64()), "dec": pa.array(dec)})
    )


def test_preserved_side_of_an_outer_join_is_read_whole(two_catalogs):
    """A region on the optional side of a LEFT JOIN must not limit the preserved side to that region
    grown by the radius: every preserved row comes back, matched or not."""
    lake, main, other = two_catalogs
    session = dac_lake.connect(lake.storage.url)
    got = session.adql(
        "SELECT t.object_id AS t_id, o.object_id AS o_id FROM testcat.main AS t LEFT JOIN othercat.main AS o "
        "ON DISTANCE(POINT(t.ra, t.dec), POINT(o.ra, o.dec)) < 2.0/3600 "
        "AND 1 = CONTAINS(POINT(o.ra, o.dec), CIRCLE(45.0, -30.0, 1.0))"
    )
    assert sorted(set(got["t_id"].to_pylist())) == sorted(main["object_id"].to_pylist())
    o_sky = SkyCoord(other["ra"].to_numpy(), other["dec"].to_numpy(), unit="deg")
    inside = o_sky.separation(SkyCoord(45.0, -30.0, unit="deg")).deg <= 1.0
    sub = other.filter(pa.array(inside))
    a = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    b = SkyCoord(sub["ra"].to_numpy(), sub["dec"].to_numpy(), unit="deg")
    ia, ib, _, _ = search_around_sky(a, b, 2.0 * u.arcsec)
    ids_a, ids_b = main["object_id"].to_numpy()[ia], sub["object_id"].to_numpy()[ib]
    want = set(zip(ids_a.tolist(), ids_b.tolist(), strict=True))
    pairs = [(t, o) for t, o in zip(got["t_id"].to_pylist(), got["o_id"].to_pylist(), strict=True)]
    assert {p for p in pairs if p[1] is not None} == want and len(want) > 100
    assert len(pairs) == len(want) + len(main) - len({t for t, _ in want})


def test_upload_on_either_side_of_a_neighbour_join(two_catalogs):
    """An upload is the anchor of an inner join, the expanded side when the catalog is preserved (LEFT
    JOIN), and a row with no position joins nothing; each thread's upload stays its own."""
    import threading

    lake, main, _ = two_catalogs
    engine = dac_lake.connect(lake.storage.url).engine
    rng = np.random.default_rng(9)
    pick = rng.choice(N, 40, replace=False)
    sub = main.take(pick)
    ra = np.append(sub["ra"].to_numpy() + 0.2 / 3600, np.nan)
    dec = np.append(sub["dec"].to_numpy(), 10.0)
    cat = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    ids = main["object_id"].to_numpy()

    def expected(ra_, dec_, tag):
        ok = np.isfinite(ra_)
        up = SkyCoord(ra_[ok], dec_[ok], unit="deg")
        i, j, _, _ = search_around_sky(up, cat, 1.5 * u.arcsec)
        names = np.array([f"{tag}{k}" for k in range(len(ra_))])[ok]
        return {(names[a], int(ids[b])) for a, b in zip(i, j, strict=True)}

    upload = _upload("mine", ra, dec)
    inner = engine.adql(
        "SELECT u.name, t.object_id FROM TAP_UPLOAD.mine AS u JOIN testcat.main AS t "
        "ON DISTANCE(POINT(u.ra, u.dec), POINT(t.ra, t.dec)) < 1.5/3600",
        memory_tables=[upload],
    )
    want = expected(ra, dec, "s")
    assert (
        set(zip(inner.table["name"].to_pylist(), inner.table["object_id"].to_pylist(), strict=True)) == want
    )
    assert inner.profile["crossmatches"][0]["anchor"] == "__dac_t0"  # the upload: 41 rows against 20,000
    left = engine.adql(
        "SELECT t.object_id, u.name FROM testcat.main AS t LEFT JOIN TAP_UPLOAD.mine AS u "
        "ON DISTANCE(POINT(u.ra, u.dec), POINT(t.ra, t.dec)) < 1.5/3600",
        memory_tables=[upload],
    )
    assert left.profile["crossmatches"][0]["expanded"] == "__dac_t1"  # the upload, not the preserved catalog
    rows = list(zip(left.table["name"].to_pylist(), left.table["object_id"].to_pylist(), strict=True))
    assert {r for r in rows if r[0] is not None} == want and len(rows) == N + len(want) - len(
        {t for _, t in want}
    )

    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            ra_k, dec_k = ra[: 10 + k], dec[: 10 + k]
            mine = _upload("mine", ra_k, dec_k, tag=f"w{k}_")
            for _ in range(3):
                got = engine.adql(
                    "SELECT u.name, t.object_id FROM TAP_UPLOAD.mine AS u JOIN testcat.main AS t "
                    "ON DISTANCE(POINT(u.ra, u.dec), POINT(t.ra, t.dec)) < 1.5/3600",
                    memory_tables=[mine],
                )
                pairs = set(
                    zip(got.table["name"].to_pylist(), got.table["object_id"].to_pylist(), strict=True)
                )
                assert pairs == expected(ra_k, dec_k, f"w{k}_")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]
