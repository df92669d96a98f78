"""Broker features of the alert lake: watchlists, watchmaps and filters (Lasair's model).

Matching is checked against brute force (astropy separations, mocpy's contains_lonlat) with hypothesis;
filters run on synthetic batches through the real query engine on a real lake (local and Ceph RGW),
including a cross-match with a catalog ingested into that lake.
"""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from astropy import units as u
from astropy.coordinates import Latitude, Longitude, SkyCoord, search_around_sky
from astropy.table import Table
from cdshealpix.nested import healpix_to_lonlat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mocpy import MOC

from dac_lake.adql import AdqlError
from dac_lake.alerts_broker import AlertBroker, Caller, ConflictError, FilterError, NotAllowed, NotFound
from dac_lake.alerts_broker.store import BrokerStore
from dac_lake.alerts_broker.watchlists import (
    SOURCES_SCHEMA,
    WatchlistError,
    WatchlistIndex,
    order_for_radius,
    parse_sources,
)
from dac_lake.alerts_broker.watchmaps import WatchmapError, WatchmapIndex, moc_to_fits, parse_moc
from dac_lake.catalog_def import load_definition
from ingest.release import IngestOptions, ingest_release
from tests.conftest import make_catalog, write_parts

BANDS = "ugrizy"
ALICE = Caller("alice", frozenset({"public"}))
BOB = Caller("bob", frozenset({"public"}))

# --------------------------------------------------------------------------- batch tables (the contract)


def make_objects(ra, dec, seed: int = 0, batch: int = 1, prefix: str = "ZTF") -> pa.Table:
    """An objects table as the alert ingest hands it over (one row per object updated by the batch)."""
    rng = np.random.default_rng(seed)
    n = len(ra)
    cols = {
        "object_id": pa.array([f"{prefix}{seed:02d}{i:06d}" for i in range(n)], pa.string()),
        "ra": pa.array(np.asarray(ra, np.float64)),
        "dec": pa.array(np.asarray(dec, np.float64)),
        "first_mjd": pa.array(60000 + rng.uniform(0, 10, n)),
        "last_mjd": pa.array(60010 + rng.uniform(0, 10, n)),
        "n_detections": pa.array(rng.integers(1, 30, n).astype(np.int32)),
    }
    for b in BANDS:
        mag = rng.uniform(15, 22, n).astype(np.float32)
        missing = rng.random(n) < 0.3
        cols[f"mag_{b}_latest"] = pa.array(mag, mask=missing)
        cols[f"mjd_{b}_latest"] = pa.array(60010 + rng.uniform(0, 10, n), mask=missing)
        cols[f"rate_{b}"] = pa.array(rng.normal(0, 0.2, n).astype(np.float32), mask=missing)
    cols["n_bands"] = pa.array(rng.integers(1, 6, n).astype(np.int32))
    cols["last_alert_id"] = pa.array(np.arange(n, dtype=np.int64) + 10**6 * (seed + 1))
    cols["updated_batch"] = pa.array(np.full(n, batch, np.int64))
    return pa.table(cols)


def make_detections(objects: pa.Table, per_object: int = 3, seed: int = 0) -> pa.Table:
    """Detections of the batch's objects: the new one (is_history false) and some history."""
    rng = np.random.default_rng(seed + 100)
    n = objects.num_rows * per_object
    obj = np.repeat(np.arange(objects.num_rows), per_object)
    ra = objects.column("ra").to_numpy()[obj] + rng.normal(0, 1e-5, n)
    dec = np.clip(objects.column("dec").to_numpy()[obj] + rng.normal(0, 1e-5, n), -90, 90)
    return pa.table(
        {
            "detection_id": pa.array(np.arange(n, dtype=np.int64) + 5 * 10**7 * (seed + 1)),
            "object_id": objects.column("object_id").take(pa.array(obj)),
            "alert_id": pa.array(np.arange(n, dtype=np.int64) + 10**6 * (seed + 1)),
            "ra": pa.array(ra % 360),
            "dec": pa.array(dec),
            "mjd": pa.array(60000 + rng.uniform(0, 20, n)),
            "band": pa.array(rng.choice(list(BANDS), n)),
            "mag": pa.array(rng.uniform(15, 22, n).astype(np.float32)),
            "mag_err": pa.array(rng.uniform(0.01, 0.2, n).astype(np.float32)),
            "flux": pa.array(rng.normal(1000, 100, n).astype(np.float32)),
            "flux_err": pa.array(rng.uniform(5, 50, n).astype(np.float32)),
            "is_positive": pa.array(rng.random(n) < 0.8),
            "reliability": pa.array(rng.random(n).astype(np.float32)),
            "is_history": pa.array(np.tile(np.arange(per_object) > 0, objects.num_rows)),
            "survey": pa.array(["ztf"] * n),
            "schema_version": pa.array(["4.02"] * n),
        }
    )


def sources_table(names, ra, dec, radius) -> pa.Table:
    return pa.table(
        {
            "name": list(names),
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
            "radius_arcsec": radius,
        },
        schema=SOURCES_SCHEMA,
    )


def brute_watchlist_pairs(lists, objects: pa.Table) -> dict[tuple[str, str, str], float]:
    """(watchlist, source, object) -> separation, by astropy: every pair within the list's largest radius
    (search_around_sky computes `SkyCoord.separation`), then each source's own radius."""
    out = {}
    obj = SkyCoord(objects["ra"].to_numpy(), objects["dec"].to_numpy(), unit="deg")
    ids = objects["object_id"].to_pylist()
    for wl_id, _, _, table in lists:
        src = SkyCoord(table["ra"].to_numpy(), table["dec"].to_numpy(), unit="deg")
        radius = table["radius_arcsec"].to_numpy()
        i, j, sep, _ = search_around_sky(obj, src, radius.max() * 1.01 * u.arcsec)
        names = table["name"].to_pylist()
        for a, b, s in zip(i, j, sep.arcsec, strict=True):
            if s <= radius[b]:
                out[(wl_id, names[b], ids[a])] = float(s)
    return out


def positions(ids, ra, dec) -> pa.Table:
    return pa.table({"object_id": pa.array(ids, pa.string()), "ra": ra, "dec": dec})


def got_watchlist_pairs(hits: pa.Table) -> dict[tuple[str, str, str], float]:
    return {
        (w, s, o): d
        for w, s, o, d in zip(
            hits["watchlist_id"].to_pylist(),
            hits["source_name"].to_pylist(),
            hits["object_id"].to_pylist(),
            hits["separation_arcsec"].to_pylist(),
            strict=True,
        )
    }


# --------------------------------------------------------------------------- watchlists: matching

# positions where HEALPix is awkward: the poles, RA 0/360, the polar-cap boundary, base-cell corners
SPECIAL = [
    (0.0, 90.0),
    (180.0, -90.0),
    (0.0, 0.0),
    (359.9999999, 0.0),
    (45.0, 41.8103149),
    (90.0, 0.0),
    (315.0, -41.8103149),
    (0.0, 89.99),
    (359.99, -89.95),
    (135.0, 0.0),
]


@st.composite
def sky_position(draw):
    kind = draw(st.sampled_from(["uniform", "pole", "ra0", "special"]))
    if kind == "special":
        ra, dec = draw(st.sampled_from(SPECIAL))
        ra += draw(st.floats(-0.01, 0.01))
        dec += draw(st.floats(-0.01, 0.01))
        return ra % 360, float(np.clip(dec, -90, 90))
    if kind == "pole":
        return draw(st.floats(0, 360, exclude_max=True)), draw(st.sampled_from([-1, 1])) * draw(
            st.floats(89.0, 90.0)
        )
    if kind == "ra0":
        return draw(st.floats(-0.05, 0.05)) % 360, draw(st.floats(-89, 89))
    return draw(st.floats(0, 360, exclude_max=True)), draw(st.floats(-90, 90))


@st.composite
def watchlist_case(draw):
    n_lists = draw(st.integers(1, 4))
    lists, all_sources = [], []
    for w in range(n_lists):
        n = draw(st.integers(1, 12))
        pos = [draw(sky_position()) for _ in range(n)]
        radius = [10 ** draw(st.floats(-0.5, np.log10(3600))) for _ in range(n)]
        table = sources_table(
            [f"s{w}-{i}" for i in range(n)], [p[0] for p in pos], [p[1] for p in pos], radius
        )
        lists.append((f"wl-{w:016x}", f"owner{w % 2}", f"content{w}", table))
        all_sources += list(zip([p[0] for p in pos], [p[1] for p in pos], radius, strict=True))
    # objects: near a source (inside, on the edge, just outside) or anywhere
    objects = []
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.booleans()):
            ra, dec, radius = all_sources[draw(st.integers(0, len(all_sources) - 1))]
            frac = draw(st.sampled_from([0.0, 0.5, 0.999, 1.0, 1.001, 1.5, 2.0]))
            pa_deg = draw(st.floats(0, 360))
            c = SkyCoord(ra, dec, unit="deg").directional_offset_by(pa_deg * u.deg, frac * radius * u.arcsec)
            if np.isfinite(c.ra.deg) and np.isfinite(c.dec.deg):
                objects.append((float(c.ra.deg) % 360, float(np.clip(c.dec.deg, -90, 90))))
                continue
        objects.append(draw(sky_position()))
    return lists, objects


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(watchlist_case())
def test_watchlist_hits_equal_astropy_brute_force(case):
    lists, positions = case
    index = WatchlistIndex()
    index.add(lists[:2])  # two segments: the join must span them
    index.add(lists[2:])
    objects = make_objects([p[0] for p in positions], [p[1] for p in positions])
    hits = index.match_table(objects)
    want = brute_watchlist_pairs(lists, objects)
    got = got_watchlist_pairs(hits)
    assert got.keys() == want.keys()
    for key, sep in want.items():
        assert got[key] == sep  # the same arithmetic as SkyCoord.separation
    assert hits["detection_id"].null_count == hits.num_rows
    # alert ids and mjd are the object's latest
    by_obj = dict(zip(objects["object_id"].to_pylist(), objects["last_alert_id"].to_pylist(), strict=True))
    assert all(
        by_obj[o] == a
        for o, a in zip(hits["object_id"].to_pylist(), hits["alert_id"].to_pylist(), strict=True)
    )


def test_watchlist_index_order_tiers_are_safe():
    # the tier rule: radius <= half the mean cell size of its order (safe), on the even-order grid, and
    # never more than one grid step coarser than needed
    radius = np.array([0.3, 1.0, 2.0, 10.0, 60.0, 600.0, 3600.0])
    order = order_for_radius(radius)
    mean_size_arcsec = np.degrees(np.sqrt(np.pi / 3) / 2.0**order) * 3600
    assert np.all(radius <= 0.5 * mean_size_arcsec)
    assert np.all(order % 2 == 0)
    finer = order < 20
    assert np.all(radius[finer] > 0.5 * mean_size_arcsec[finer] / 8)
    assert list(order) == sorted(order, reverse=True) and order[-1] == 4


def test_watchlist_matching_at_scale_with_updates_equals_brute_force():
    """Many sources, one big-radius outlier, detections mode; then pause, edit, delete, and compaction."""
    rng = np.random.default_rng(42)
    lists = []
    for w in range(8):
        n = 3000
        ra, dec = rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
        radius = rng.uniform(1, 30, n)
        if w == 3:
            radius[0] = 3600.0  # one 1-degree source must not coarsen everybody's grid
        lists.append(
            (
                f"wl-{w:016x}",
                "alice" if w % 2 else "bob",
                f"v1-{w}",
                sources_table([f"w{w}s{i}" for i in range(n)], ra, dec, radius),
            )
        )
    index = WatchlistIndex()
    index.add(lists)
    all_src = pa.concat_tables([t for *_, t in lists])
    pick = rng.integers(0, all_src.num_rows, 4000)
    near = SkyCoord(all_src["ra"].to_numpy()[pick], all_src["dec"].to_numpy()[pick], unit="deg")
    near = near.directional_offset_by(
        rng.uniform(0, 360, 4000) * u.deg,
        rng.uniform(0, 1.2, 4000) * all_src["radius_arcsec"].to_numpy()[pick] * u.arcsec,
    )
    objects = make_objects(near.ra.deg, near.dec.deg, seed=3)
    detections = make_detections(objects, per_object=2, seed=3)

    def check(current):
        want = brute_watchlist_pairs(current, objects)
        got = got_watchlist_pairs(index.match_table(objects))
        assert got.keys() == want.keys() and len(want) > 100
        # detections: each detection (new or history) is matched at its own position
        det_hits = index.match_table(detections, on="detections")
        det_ids = detections["detection_id"].cast(pa.string())
        want_det = brute_watchlist_pairs(current, positions(det_ids, detections["ra"], detections["dec"]))
        got_det = {
            (w, s, str(d))
            for w, s, d in zip(
                det_hits["watchlist_id"].to_pylist(),
                det_hits["source_name"].to_pylist(),
                det_hits["detection_id"].to_pylist(),
                strict=True,
            )
        }
        assert got_det == set(want_det)

    check(lists)
    assert len(index.segments) == 1
    # pause one, resume it: a mask flip
    index.set_active(lists[1][0], False)
    check([x for x in lists if x[0] != lists[1][0]])
    index.set_active(lists[1][0], True)
    check(lists)
    # an edit replaces a watchlist's sources (a new small segment), a delete masks it
    edited = (lists[2][0], "bob", "v2-2", lists[2][3].slice(0, 100))
    index.add([edited])
    index.remove([lists[5][0]])
    current = [edited if x[0] == edited[0] else x for x in lists if x[0] != lists[5][0]]
    check(current)
    # owners: only alice's watchlists
    got = got_watchlist_pairs(index.match_table(objects, owners=["alice"]))
    want = brute_watchlist_pairs([x for x in current if x[1] == "alice"], objects)
    assert got.keys() == want.keys()
    # many small changes merge segments instead of piling up, and removed rows are dropped
    for k in range(10):
        index.add([(f"wl-{100 + k:016x}", "carol", "c", lists[0][3].slice(k * 10, 10))])
    assert len(index.segments) <= 6
    index.remove([x[0] for x in current[:6]])
    assert sum(s.rows for s in index.segments) < 4 * 3000
    current = current[6:] + [
        (f"wl-{100 + k:016x}", "carol", "c", lists[0][3].slice(k * 10, 10)) for k in range(10)
    ]
    want = brute_watchlist_pairs(current, objects)
    assert got_watchlist_pairs(index.match_table(objects)).keys() == want.keys()


# --------------------------------------------------------------------------- watchlists: uploads


def test_watchlist_upload_csv_and_votable_and_errors_name_the_rows():
    good = parse_sources("Name,RAJ2000,DEJ2000,Radius\nM31,10.6847,41.2690,5\nSN 2023ixf,210.9107,54.3117,\n")
    assert good["name"].to_pylist() == ["M31", "SN 2023ixf"]
    assert good["radius_arcsec"].to_pylist() == [5.0, 2.0]  # empty radius: the default
    no_radius = parse_sources("id,ra,dec\n1,-10.0,0\n2,359.5,-89.9\n", default_radius_arcsec=3)
    assert no_radius["ra"].to_pylist() == [350.0, 359.5] and no_radius["radius_arcsec"].to_pylist() == [3, 3]

    t = Table({"name": ["a", "b"], "ra": [1.0, 2.0], "dec": [3.0, 4.0], "radius_arcsec": [1.5, 2.5]})
    buf = io.BytesIO()
    t.write(buf, format="votable")
    vot = parse_sources(buf.getvalue())
    assert vot["name"].to_pylist() == ["a", "b"] and vot["radius_arcsec"].to_pylist() == [1.5, 2.5]

    bad = "name,ra,dec,radius\nok,1,2,3\nB,abc,95,4\n,1,2,-3\nfar,1,2,7200\n"
    with pytest.raises(WatchlistError) as err:
        parse_sources(bad)
    msg = str(err.value)
    assert "row 2 ('B')" in msg and "ra 'abc' is not a number" in msg and "dec 95 is outside" in msg
    assert "row 3" in msg and "name is empty" in msg and "radius -3 arcsec" in msg
    assert "row 4 ('far')" in msg and "radius 7200" in msg and "row 1" not in msg
    with pytest.raises(WatchlistError, match="no ra column"):
        parse_sources("name,x,dec\na,1,2\n")
    with pytest.raises(WatchlistError, match="no rows"):
        parse_sources("name,ra,dec\n")
    with pytest.raises(WatchlistError, match="at most 2"):
        parse_sources("name,ra,dec\na,1,1\nb,2,2\nc,3,3\n", max_sources=2)
    with pytest.raises(WatchlistError, match="cannot read the upload as votable"):
        parse_sources(b"<?xml version='1.0'?><VOTABLE><nonsense")


# --------------------------------------------------------------------------- watchmaps


@st.composite
def moc_case(draw):
    mocs = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cone", "polygon", "ascii", "ring"]))
        depth = draw(st.integers(3, 16))
        ra, dec = draw(sky_position())
        if kind == "cone":
            radius = draw(st.floats(0.01, 20))
            moc = MOC.from_cone(
                lon=Longitude(ra * u.deg), lat=Latitude(dec * u.deg), radius=radius * u.deg, max_depth=depth
            )
        elif kind == "ring":
            moc = MOC.from_ring(
                lon=Longitude(ra * u.deg),
                lat=Latitude(dec * u.deg),
                internal_radius=1 * u.deg,
                external_radius=draw(st.floats(1.5, 10)) * u.deg,
                max_depth=depth,
            )
        elif kind == "polygon":
            size = draw(st.floats(0.1, 10))
            dec0 = float(np.clip(dec, -80, 80))
            moc = MOC.from_polygon(
                lon=Longitude([ra, ra + size, ra + size, ra] * u.deg),
                lat=Latitude([dec0, dec0, dec0 + size / 2, dec0 + size / 2] * u.deg),
                max_depth=depth,
            )
        else:
            order = draw(st.integers(0, 6))
            cells = draw(st.lists(st.integers(0, 12 * 4**order - 1), min_size=1, max_size=20))
            moc = MOC.from_string(f"{order}/" + " ".join(map(str, sorted(set(cells)))))
        if not moc.empty():
            mocs.append(moc)
    assume_nonempty = mocs or [MOC.from_string("0/4")]
    points = [draw(sky_position()) for _ in range(draw(st.integers(1, 40)))]
    return assume_nonempty, points


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moc_case())
def test_watchmap_hits_equal_mocpy_contains(case):
    mocs, points = case
    rng = np.random.default_rng(len(points))
    # points inside each MOC too (centres of some of its cells), not only random ones
    for moc in mocs:
        uniq = np.sort(moc.uniq_hpx.astype(np.int64))[::7][:6]
        for q in uniq.tolist():
            d = int(np.floor(np.log2(q) / 2)) - 1
            lon, lat = healpix_to_lonlat(np.array([q - 4 * 4**d]), d)
            points.append((float(lon.deg[0]) + rng.normal(0, 1e-4), float(lat.deg[0])))
    ra = np.array([p[0] for p in points]) % 360
    dec = np.clip([p[1] for p in points], -90, 90)
    index = WatchmapIndex()
    index.add([(f"wm-{i:016x}", "o", "c", m) for i, m in enumerate(mocs)])
    hits = index.match_table(make_objects(ra, dec))
    ids = make_objects(ra, dec)["object_id"].to_pylist()
    got = set(zip(hits["watchmap_id"].to_pylist(), hits["object_id"].to_pylist(), strict=True))
    want = set()
    for i, moc in enumerate(mocs):
        inside = moc.contains_lonlat(Longitude(ra * u.deg), Latitude(dec * u.deg))
        want |= {(f"wm-{i:016x}", ids[j]) for j in np.flatnonzero(inside)}
    assert got == want


def test_watchmap_uploads_in_every_format_and_bad_ones_refused():
    moc = MOC.from_cone(lon=10 * u.deg, lat=20 * u.deg, radius=2 * u.deg, max_depth=9)
    assert parse_moc(moc_to_fits(moc)) == moc
    assert parse_moc(moc.to_string("ascii")) == moc
    assert parse_moc(moc.to_string("json")) == moc
    for bad, msg in [
        ("", "empty"),
        ("hello", "cannot read"),
        ("3/x", "cannot read"),
        (b"SIMPLE  = T", "cannot read"),
        ("[1, 2]", "cannot read"),
    ]:
        with pytest.raises(WatchmapError, match=msg):
            parse_moc(bad)
    with pytest.raises(WatchmapError, match="at most 10 are allowed"):
        import dac_lake.alerts_broker.watchmaps as wm

        old, wm.MAX_CELLS = wm.MAX_CELLS, 10
        try:
            parse_moc(moc.to_string("ascii"))
        finally:
            wm.MAX_CELLS = old


# --------------------------------------------------------------------------- the lake: store, filters


@pytest.fixture
def alert_lake(lake, definition_file, tmp_path):
    """A lake with a small catalog (testcat) to join filters with, and a private one (secretcat)."""
    import yaml

    from tests.conftest import TEST_DEFINITION

    main = make_catalog(6000, seed=21)
    opts = IngestOptions(
        max_rows_per_partition=500, highest_order=6, margin_arcsec=10, validate_with_lsdb=False
    )
    ingest_release(
        lake, "testcat", "dr1", write_parts(main, tmp_path / "a"), load_definition(definition_file), opts
    )
    path = tmp_path / "secretcat.yaml"
    path.write_text(yaml.safe_dump(dict(TEST_DEFINITION, name="secretcat", groups=["team"])))
    ingest_release(
        lake,
        "secretcat",
        "v1",
        write_parts(main.slice(0, 500), tmp_path / "b", 1),
        load_definition(path),
        opts,
    )
    return lake, main


def _batch_near_catalog(main: pa.Table, seed: int, batch: int, n: int = 300):
    """Objects in a patch of sky around the catalog's clump: half within 1 arcsec of a catalog source, half
    anywhere in the patch (a filter's cross-match then reads only the partitions of the patch)."""
    rng = np.random.default_rng(seed)
    ra_c, dec_c = main["ra"].to_numpy(), main["dec"].to_numpy()
    patch = np.flatnonzero((ra_c > 30) & (ra_c < 60) & (dec_c > -40) & (dec_c < -20))
    pick = rng.choice(patch, n // 2, replace=False)
    near = SkyCoord(ra_c[pick], dec_c[pick], unit="deg").directional_offset_by(
        rng.uniform(0, 360, n // 2) * u.deg, rng.uniform(0, 1.0, n // 2) * u.arcsec
    )
    ra = np.concatenate([near.ra.deg, rng.uniform(30, 60, n - n // 2)])
    dec = np.concatenate([near.dec.deg, rng.uniform(-40, -20, n - n // 2)])
    objects = make_objects(ra, dec, seed=seed, batch=batch)
    return objects, make_detections(objects, seed=seed)


def test_store_ownership_versions_and_concurrent_edits(lake):
    store = BrokerStore(lake.storage, "ztf")
    other_process = BrokerStore(lake.storage, "ztf")  # another API process on the same lake
    rec = store.create("filters", ALICE, "bright", {"adql": "x"})
    assert rec.owner == "alice" and rec.version == 1 and rec.active and rec.id.startswith("flt-")
    assert [r.id for r in other_process.records("filters", "alice")] == [rec.id]
    assert other_process.records("filters", "bob") == []
    for call in (
        lambda: other_process.get("filters", rec.id, BOB),
        lambda: other_process.update("filters", rec.id, BOB, name="mine now"),
        lambda: other_process.delete("filters", rec.id, BOB),
    ):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(NotAllowed):
        store.create("filters", Caller(None), "anon", {})
    with pytest.raises(NotFound):
        store.get("filters", "../../lake.json", ALICE)
    # two processes edit from the same version: exactly one wins, the other is told
    v2 = store.update("filters", rec.id, ALICE, name="bright v2", expected_version=1)
    with pytest.raises(ConflictError):
        other_process.update("filters", rec.id, ALICE, name="stale", expected_version=1)
    assert other_process.get("filters", rec.id, ALICE).name == "bright v2" and v2.version == 2
    # a race at the storage level: both computed version 3 from version 2
    from dataclasses import replace

    a = replace(v2, version=3, name="a")
    b = replace(v2, version=3, name="b")
    store._write(a, {}, previous=None)
    with pytest.raises(ConflictError):
        other_process._write(b, {}, previous=None)
    assert store.get("filters", rec.id, ALICE).name == "a"
    # only the newest version stays; a delete is a tombstone that nobody can edit
    store.gc(grace_seconds=0)
    names = lake.storage.list_dir("alerts/ztf/broker/filters")
    assert [n for n in names if n.startswith(rec.id)] == [f"{rec.id}.000003.json"]
    store.delete("filters", rec.id, ALICE)
    assert other_process.records("filters") == []
    with pytest.raises(NotFound):
        other_process.update("filters", rec.id, ALICE, name="zombie")


def test_filters_watchlists_watchmaps_on_batches_through_the_engine(alert_lake, tmp_path):
    lake, main = alert_lake
    produced = []
    broker = AlertBroker(
        lake, "ztf", on_match=lambda f, t: produced.append((f.id, f.kafka_topic, t.num_rows))
    )
    objects1, detections1 = _batch_near_catalog(main, seed=1, batch=1)

    # --- definitions: alice and bob, each with a watchlist; alice with a watchmap
    src_alice = objects1.slice(0, 40)
    csv_alice = "name,ra,dec,radius\n" + "".join(
        f"a{i},{r},{d},{1.5 if i % 2 else 3600}\n"
        for i, (r, d) in enumerate(
            zip(src_alice["ra"].to_pylist(), src_alice["dec"].to_pylist(), strict=True)
        )
    )
    wl_alice = broker.watchlists.create(ALICE, "my SNe", csv_alice)
    src_bob = objects1.slice(100, 10)
    wl_bob = broker.watchlists.create(
        BOB,
        "bob's",
        "name,ra,dec\n"
        + "".join(
            f"b{i},{r},{d}\n"
            for i, (r, d) in enumerate(
                zip(src_bob["ra"].to_pylist(), src_bob["dec"].to_pylist(), strict=True)
            )
        ),
    )
    region = MOC.from_cone(lon=45 * u.deg, lat=-30 * u.deg, radius=8 * u.deg, max_depth=10)
    wm_alice = broker.watchmaps.create(ALICE, "clump", moc_to_fits(region))
    assert [r.id for r in broker.watchlists.list(BOB)] == [wl_bob.id]
    assert broker.watchlists.sources(ALICE, wl_alice.id).num_rows == 40
    with pytest.raises(NotFound):
        broker.watchlists.sources(BOB, wl_alice.id)
    with pytest.raises(NotFound):
        broker.watchmaps.moc(BOB, wm_alice.id)

    # --- filters: plain, a join to a lake catalog, the owner's watchlist and watchmap hits
    bright = broker.filters.create(
        ALICE,
        "bright g",
        "SELECT object_id, mag_g_latest\nFROM batch.objects\nWHERE mag_g_latest < 17 AND n_detections >= 5",
        kafka_topic="alice.bright",
    )
    xmatch = broker.filters.create(
        ALICE,
        "known sources",
        "SELECT o.object_id, t.object_id AS cat_id,\n"
        "       DISTANCE(POINT(o.ra, o.dec), POINT(t.ra, t.dec)) * 3600 AS sep\n"
        "FROM batch.objects AS o JOIN testcat.main AS t\n"
        "  ON DISTANCE(POINT(o.ra, o.dec), POINT(t.ra, t.dec)) < 1.5 / 3600.0",
    )
    mine = broker.filters.create(
        ALICE,
        "watchlist",
        "SELECT h.watchlist_id, h.source_name, o.object_id, o.n_detections FROM batch.watchlist_hits AS h "
        "JOIN batch.objects AS o ON o.object_id = h.object_id",
    )
    mapped = broker.filters.create(
        ALICE,
        "in region",
        "SELECT w.watchmap_id, w.object_id, COUNT(*) AS n_det FROM batch.watchmap_hits AS w "
        "JOIN batch.detections AS d ON d.object_id = w.object_id WHERE d.band = 'g' "
        "GROUP BY w.watchmap_id, w.object_id",
    )
    bobs = broker.filters.create(
        BOB, "bob watchlist", "SELECT source_name, object_id FROM batch.watchlist_hits"
    )
    assert {f.id for f in broker.filters.list(ALICE)} == {bright.id, xmatch.id, mine.id, mapped.id}
    assert [f.id for f in broker.filters.list(BOB)] == [bobs.id]

    # --- invalid filters are refused at save time with the translator's position
    with pytest.raises(AdqlError) as err:
        broker.filters.create(ALICE, "typo", "SELECT object_id\nFROM batch.objects\nWHERE mag_q_latest < 17")
    assert (err.value.line, err.value.column) == (3, 7) and "mag_q_latest" in str(err.value)
    with pytest.raises(AdqlError) as err:
        broker.filters.create(ALICE, "syntax", "SELECT object_id FROM batch.objects WHERE")
    assert err.value.line == 1 and err.value.column is not None
    with pytest.raises(AdqlError, match="secretcat"):  # a catalog alice may not read does not exist for her
        broker.filters.create(
            ALICE,
            "private",
            "SELECT o.object_id FROM batch.objects AS o JOIN secretcat.main AS s ON o.ra = s.ra",
        )
    with pytest.raises(FilterError, match="must read the batch"):
        broker.filters.create(ALICE, "static", "SELECT TOP 5 object_id FROM testcat.main")
    with pytest.raises(FilterError, match="Kafka topic"):
        broker.filters.create(
            ALICE, "bad topic", "SELECT object_id FROM batch.objects", kafka_topic="no spaces"
        )
    with pytest.raises(NotAllowed):
        broker.filters.create(Caller(None), "anon", "SELECT object_id FROM batch.objects")
    assert len(broker.filters.list(ALICE)) == 4

    # --- batch 1 through the broker
    report = broker.process_batch(1, objects1, detections1)
    runs = {r.filter_id: r for r in report.filters}
    assert set(runs) == {bright.id, xmatch.id, mine.id, mapped.id, bobs.id}
    assert not report.failed_filters, report.failed_filters

    o = objects1.to_pandas()
    want_bright = set(o.loc[(o.mag_g_latest < 17) & (o.n_detections >= 5), "object_id"])
    got = broker.filters.results(ALICE, bright.id)
    assert set(got["object_id"].to_pylist()) == want_bright and len(want_bright) > 0
    assert set(got["_batch"].to_pylist()) == {1}

    cat = SkyCoord(main["ra"].to_numpy(), main["dec"].to_numpy(), unit="deg")
    obj = SkyCoord(o.ra.to_numpy(), o.dec.to_numpy(), unit="deg")
    i, j, sep, _ = search_around_sky(obj, cat, 1.5 * u.arcsec)
    want_x = {(o.object_id[a], int(main["object_id"][int(b)].as_py())) for a, b in zip(i, j, strict=True)}
    got_x = broker.filters.results(ALICE, xmatch.id)
    assert set(zip(got_x["object_id"].to_pylist(), got_x["cat_id"].to_pylist(), strict=True)) == want_x
    assert len(want_x) >= 140
    assert np.allclose(np.sort(got_x["sep"].to_numpy()), np.sort(sep.arcsec), atol=1e-5)
    assert 0 < runs[xmatch.id].files_read < runs[xmatch.id].files_total  # pruned to the batch's partitions

    # watchlist hits: exactly the brute-force pairs, each filter sees only its owner's
    lists = [
        (wl_alice.id, "alice", "", broker.watchlists.sources(ALICE, wl_alice.id)),
        (wl_bob.id, "bob", "", broker.watchlists.sources(BOB, wl_bob.id)),
    ]
    want_pairs = brute_watchlist_pairs(lists, objects1)
    assert got_watchlist_pairs(report.watchlist_hits).keys() == want_pairs.keys()
    want_alice = {(w, s, ob) for (w, s, ob) in want_pairs if w == wl_alice.id}
    got_mine = broker.filters.results(ALICE, mine.id)
    assert (
        set(
            zip(
                got_mine["watchlist_id"].to_pylist(),
                got_mine["source_name"].to_pylist(),
                got_mine["object_id"].to_pylist(),
                strict=True,
            )
        )
        == want_alice
    )
    assert len(want_alice) > 40  # the 1-degree sources catch neighbours too
    got_bob = broker.filters.results(BOB, bobs.id)
    assert {
        (s, ob)
        for s, ob in zip(got_bob["source_name"].to_pylist(), got_bob["object_id"].to_pylist(), strict=True)
    } == {(s, ob) for (w, s, ob) in want_pairs if w == wl_bob.id}
    stored = broker.watchlists.hits(ALICE)
    assert set(stored["watchlist_id"].to_pylist()) == {wl_alice.id} and set(stored["_batch"].to_pylist()) == {
        1
    }
    assert stored.num_rows == len(want_alice)
    assert broker.watchlists.hits(BOB, wl_bob.id).num_rows == len(want_pairs) - len(want_alice)

    # watchmap hits joined with detections
    inside = region.contains_lonlat(Longitude(o.ra.to_numpy() * u.deg), Latitude(o.dec.to_numpy() * u.deg))
    d = detections1.to_pandas()
    d = d[d.band == "g"]
    want_map = {
        (wm_alice.id, ob, int(n))
        for ob, n in d.groupby("object_id").size().items()
        if ob in set(o.object_id[inside])
    }
    got_map = broker.filters.results(ALICE, mapped.id)
    assert (
        set(
            zip(
                got_map["watchmap_id"].to_pylist(),
                got_map["object_id"].to_pylist(),
                got_map["n_det"].to_pylist(),
                strict=True,
            )
        )
        == want_map
    )
    assert len(want_map) > 3
    assert set(broker.watchmaps.hits(ALICE, wm_alice.id)["object_id"].to_pylist()) == set(o.object_id[inside])

    # the Kafka hook saw the filters that matched, with their topic
    assert (bright.id, "alice.bright", len(want_bright)) in produced

    # --- pause stops a filter; edit changes what it selects; another owner cannot touch it
    broker.filters.pause(ALICE, bright.id)
    for call in (
        lambda: broker.filters.pause(BOB, bright.id),
        lambda: broker.filters.delete(BOB, xmatch.id),
        lambda: broker.filters.results(BOB, xmatch.id),
        lambda: broker.filters.update(BOB, mine.id, adql="SELECT object_id FROM batch.objects"),
    ):
        with pytest.raises(NotFound):
            call()
    edited = broker.filters.update(
        ALICE,
        mine.id,
        adql="SELECT object_id, source_name FROM batch.watchlist_hits WHERE separation_arcsec < 1",
    )
    assert edited.version == 2
    objects2, detections2 = _batch_near_catalog(main, seed=2, batch=2)
    report2 = broker.process_batch(2, objects2, detections2)
    assert bright.id not in {r.filter_id for r in report2.filters}
    assert set(broker.filters.results(ALICE, bright.id)["_batch"].to_pylist()) == {1}
    assert set(broker.filters.results(ALICE, xmatch.id)["_batch"].to_pylist()) == {1, 2}
    assert broker.filters.results(ALICE, xmatch.id, first_batch=2).num_rows == runs_rows(report2, xmatch.id)
    # results of an edited filter: old and new columns side by side, nulls where a batch had none
    history = broker.filters.results(ALICE, mine.id)
    assert {"watchlist_id", "n_detections", "source_name"} <= set(history.column_names)

    # --- results are plain Parquet: pyarrow and DuckDB read them without dac-lake
    prefix = f"alerts/ztf/filters/{xmatch.id}/results"
    files = lake.storage.list_dir(prefix)
    assert files == ["000000000001.parquet", "000000000002.parquet"]
    one = pq.read_table(lake.storage.path(f"{prefix}/{files[0]}"), filesystem=lake.storage.pa_fs)
    assert one.num_rows == runs[xmatch.id].rows
    if not lake.storage.is_s3:
        n = duckdb.sql(
            f"SELECT COUNT(*) FROM read_parquet('{broker.filters.results_url(ALICE, xmatch.id)}', "
            "union_by_name=true)"
        ).fetchone()[0]
        assert n == broker.filters.results(ALICE, xmatch.id).num_rows

    # --- resume, delete (results go too); a paused watchlist stops matching
    broker.filters.resume(ALICE, bright.id)
    broker.watchlists.pause(ALICE, wl_alice.id)
    broker.filters.delete(ALICE, xmatch.id)
    assert lake.storage.list_dir(prefix) == []
    with pytest.raises(NotFound):
        broker.filters.results(ALICE, xmatch.id)
    report3 = broker.process_batch(3, objects1, detections1)
    assert bright.id in {r.filter_id for r in report3.filters}
    assert set(report3.watchlist_hits["watchlist_id"].to_pylist()) == {wl_bob.id}
    # a second broker (another process) sees the same definitions
    other = AlertBroker(lake, "ztf")
    other.refresh()
    assert other.watchlist_index.watchlists() == [wl_bob.id]
    assert other.watchmap_index.watchmaps() == [wm_alice.id]


def runs_rows(report, filter_id: str) -> int:
    return next(r.rows for r in report.filters if r.filter_id == filter_id)


def test_a_failing_filter_does_not_stop_the_others(alert_lake):
    lake, main = alert_lake
    broker = AlertBroker(lake, "ztf", filter_timeout_s=1.0)
    ok = broker.filters.create(ALICE, "ok", "SELECT object_id FROM batch.objects WHERE n_detections > 25")
    slow = broker.filters.create(
        BOB,
        "far too slow",
        "SELECT COUNT(*) AS n FROM batch.detections AS a, batch.detections AS b, batch.detections AS c, "
        "batch.detections AS d WHERE a.mag + b.mag + c.mag + d.mag > SIN(a.ra * b.ra * c.ra * d.ra)",
    )
    # a filter whose owner lost the right to read a catalog it joins is refused when saved again
    carol = Caller("carol", frozenset({"team"}))
    private = broker.filters.create(
        carol,
        "private",
        "SELECT o.object_id FROM batch.objects AS o "
        "JOIN secretcat.main AS s ON DISTANCE(POINT(o.ra, o.dec), POINT(s.ra, s.dec)) < 0.001",
    )
    with pytest.raises(AdqlError, match="secretcat"):
        broker.filters.update(Caller("carol", frozenset()), private.id, name="renamed")
    objects, detections = _batch_near_catalog(main, seed=4, batch=7)
    report = broker.process_batch(7, objects, detections)
    runs = {r.filter_id: r for r in report.filters}
    assert runs[slow.id].error and runs[slow.id].seconds < 20
    assert runs[ok.id].error is None and runs[private.id].error is None
    want = set(objects.filter(pc.greater(objects["n_detections"], 25))["object_id"].to_pylist())
    assert set(broker.filters.results(ALICE, ok.id)["object_id"].to_pylist()) == want
