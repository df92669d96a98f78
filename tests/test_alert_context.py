"""Context catalogs of alert objects (dac_lake.alerts.context): definitions, the cross-match against an
astropy brute force, the Sherlock-style classification, storage per order-3 pixel, read-back, the live
fallback, and (with --bench) the timing of a 10k-object batch against a 1M-row context catalog.

    python -m tests.test_alert_context --bench [ROWS] [OBJECTS]   # default 1,000,000 and 10,000
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from astropy import units as u
from astropy.coordinates import SkyCoord, search_around_sky

from dac_lake.alerts.context import (
    CONTEXT_SCHEMA,
    NUCLEAR_ARCSEC,
    STAR_ARCSEC,
    ContextMatcher,
    classify,
    compact_context,
    context_file,
    context_of,
    live_context,
    pixels_of,
)
from dac_lake.catalog_def import CatalogDef, DefinitionError, load_definition
from dac_lake.engine import QueryEngine
from dac_lake.lake import Lake
from dac_lake.settings import load_settings
from dac_lake.storage import LakeStorage
from ingest.release import IngestOptions, ingest_release

STREAM = "ztf"

GALAXY_DEFINITION = {
    "name": "ctx_galaxies",
    "table": "main",
    "title": "Synthetic host galaxies (tests)",
    "description": "Galaxies, with a few stars and QSOs, for context matching tests",
    "groups": ["public"],
    "ra_column": "ra",
    "dec_column": "dec",
    "id_column": "gal_id",
    "context": True,
    "context_radius_arcsec": 30,
    "context_fields": ["z_phot", "r_mag", "morphology"],
    "context_type_column": "kind",
    "columns": [
        {"name": "gal_id", "datatype": "int64", "ucd": "meta.id;meta.main", "nullable": False},
        {"name": "ra", "datatype": "float64", "unit": "deg", "ucd": "pos.eq.ra;meta.main"},
        {"name": "dec", "datatype": "float64", "unit": "deg", "ucd": "pos.eq.dec;meta.main"},
        {"name": "z_phot", "datatype": "float32", "description": "photometric redshift"},
        {"name": "r_mag", "datatype": "float32", "unit": "mag"},
        {"name": "morphology", "datatype": "string"},
        {"name": "kind", "datatype": "string", "description": "galaxy, star or qso"},
    ],
}

STAR_DEFINITION = {
    "name": "ctx_stars",
    "table": "main",
    "title": "Synthetic stars (tests)",
    "description": "A Gaia-like star catalog: every row a star",
    "groups": ["public"],
    "ra_column": "ra",
    "dec_column": "dec",
    "id_column": "star_id",
    "context": True,
    "context_radius_arcsec": 5,
    "context_fields": ["g_mag"],
    "context_default_type": "star",
    "columns": [
        {"name": "star_id", "datatype": "string", "ucd": "meta.id;meta.main", "nullable": False},
        {"name": "ra", "datatype": "float64", "unit": "deg", "ucd": "pos.eq.ra;meta.main"},
        {"name": "dec", "datatype": "float64", "unit": "deg", "ucd": "pos.eq.dec;meta.main"},
        {"name": "g_mag", "datatype": "float32", "unit": "mag"},
    ],
}

#: where the synthetic sky is: two fields (one straddling RA 0, and one near an order-3 pixel corner)
FIELDS = ((0.5, -20.0), (45.0, 41.81))


# ---------------------------------------------------------------------------------------------- builders
def _disc(rng: np.random.Generator, n: int, ra0: float, dec0: float, radius: float):
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    th = rng.uniform(0, 2 * np.pi, n)
    dec = np.clip(dec0 + r * np.sin(th), -89.9, 89.9)
    ra = (ra0 + r * np.cos(th) / np.cos(np.radians(dec))) % 360.0
    return ra, dec


def make_galaxies(n: int, seed: int = 1, fields=FIELDS, radius: float = 1.0, sky_fraction: float = 0.0):
    """Galaxies (85%), stars (10%) and QSOs (5%) in discs around `fields`; `sky_fraction` of them
    spread over the whole sky instead."""
    rng = np.random.default_rng(seed)
    n_sky = int(n * sky_fraction)
    per = (n - n_sky) // len(fields)
    ras, decs = [], []
    for ra0, dec0 in fields:
        ra, dec = _disc(rng, per, ra0, dec0, radius)
        ras.append(ra)
        decs.append(dec)
    rest = n - per * len(fields)
    ras.append(rng.uniform(0, 360, rest))
    decs.append(np.degrees(np.arcsin(rng.uniform(-1, 1, rest))))
    ra, dec = np.concatenate(ras), np.concatenate(decs)
    kind = rng.choice(np.array(["galaxy", "star", "QSO"]), n, p=[0.85, 0.10, 0.05])
    z = rng.gamma(2.0, 0.15, n).astype(np.float32)
    z[rng.uniform(size=n) < 0.05] = np.nan
    return pa.table(
        {
            "gal_id": pa.array(np.arange(n, dtype=np.int64) * 3 + 10**12),
            "ra": ra,
            "dec": dec,
            "z_phot": z,
            "r_mag": rng.normal(21, 1.2, n).astype(np.float32),
            "morphology": pa.array(rng.choice(np.array(["E", "S0", "Sa", "Sb", "Irr"]), n), pa.string()),
            "kind": pa.array(kind, pa.string()),
        }
    )


def make_stars(n: int, seed: int = 2, fields=FIELDS, radius: float = 1.0):
    rng = np.random.default_rng(seed)
    per = n // len(fields)
    parts = [_disc(rng, per, ra0, dec0, radius) for ra0, dec0 in fields]
    ra = np.concatenate([p[0] for p in parts])
    dec = np.concatenate([p[1] for p in parts])
    return pa.table(
        {
            "star_id": pa.array([f"G{i:09d}" for i in range(len(ra))], pa.string()),
            "ra": ra,
            "dec": dec,
            "g_mag": rng.normal(17, 2, len(ra)).astype(np.float32),
        }
    )


def offset(ra: np.ndarray, dec: np.ndarray, arcsec: np.ndarray, rng: np.random.Generator):
    """Positions `arcsec` away from (ra, dec) in random directions."""
    c = SkyCoord(ra, dec, unit="deg").directional_offset_by(
        rng.uniform(0, 360, len(ra)) * u.deg, np.asarray(arcsec) * u.arcsec
    )
    return c.ra.deg, c.dec.deg


def ingest_definition(lake: Lake, definition: dict, table: pa.Table, folder: Path, **options) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{definition['name']}.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    data = folder / f"{definition['name']}.parquet"
    pq.write_table(table, data)
    opts = IngestOptions(
        max_rows_per_partition=options.get("max_rows", 20_000),
        highest_order=options.get("highest_order", 9),
        margin_arcsec=10,
        validate_with_lsdb=False,
        threads=2,
    )
    ingest_release(lake, definition["name"], "v1", [str(data)], load_definition(path), opts)


def new_lake(url: str) -> Lake:
    lake = Lake(LakeStorage(url, load_settings()))
    lake.init()
    return lake


def make_objects(galaxies: pa.Table, stars: pa.Table, n_random: int, seed: int = 3) -> tuple[pa.Table, dict]:
    """Alert objects: planted ones whose classification is known, plus `n_random` anywhere in the
    fields (their expected context comes from the brute force)."""
    rng = np.random.default_rng(seed)
    kind = np.array(galaxies.column("kind").to_pylist())
    gra, gdec = galaxies.column("ra").to_numpy(), galaxies.column("dec").to_numpy()
    gal = np.flatnonzero(kind == "galaxy")
    planted: dict[str, str] = {}
    ras, decs, ids = [], [], []

    def plant(idx, src_ra, src_dec, arcsec, label, prefix):
        ra, dec = offset(src_ra[idx], src_dec[idx], np.full(len(idx), arcsec), rng)
        for j in range(len(idx)):
            oid = f"{prefix}{j:04d}"
            ids.append(oid)
            planted[oid] = label
        ras.append(ra)
        decs.append(dec)

    sra, sdec = stars.column("ra").to_numpy(), stars.column("dec").to_numpy()
    plant(rng.choice(len(sra), 5, replace=False), sra, sdec, 0.3, "variable star", "VS")
    plant(rng.choice(gal, 5, replace=False), gra, gdec, 0.4, "nuclear", "NU")
    # far from everything: outside the fields
    ra_far, dec_far = _disc(rng, 5, 180.0, -5.0, 1.0)
    ras.append(ra_far)
    decs.append(dec_far)
    for j in range(5):
        ids.append(f"OR{j:04d}")
        planted[f"OR{j:04d}"] = "orphan"
    rra, rdec = [], []
    for ra0, dec0 in FIELDS:
        a, b = _disc(rng, n_random // len(FIELDS), ra0, dec0, 1.0)
        rra.append(a)
        rdec.append(b)
    ras += rra
    decs += rdec
    n_rand = sum(len(a) for a in rra)
    ids += [f"ZTF{j:08d}" for j in range(n_rand)]
    objects = pa.table(
        {
            "object_id": pa.array(ids, pa.string()),
            "ra": np.concatenate(ras),
            "dec": np.concatenate(decs),
            "n_detections": pa.array(np.ones(len(ids), np.int32)),  # an objects-table column: ignored
        }
    )
    return objects, planted


# ---------------------------------------------------------------------------------------------- reference
def brute_force(objects: pa.Table, catalogs: list[tuple[dict, pa.Table]], k: int = 3) -> dict:
    """{object_id: (classification, [(catalog, source_id, rank, separation_arcsec, type, fields)])} with
    astropy and plain Python: the rules of the module docstring, written out once more."""
    obj = SkyCoord(objects.column("ra").to_numpy(), objects.column("dec").to_numpy(), unit="deg")
    ids = objects.column("object_id").to_pylist()
    out = {oid: [] for oid in ids}
    for definition, table in catalogs:
        cat = SkyCoord(table.column("ra").to_numpy(), table.column("dec").to_numpy(), unit="deg")
        radius = definition["context_radius_arcsec"]
        i, j, sep, _ = search_around_sky(obj, cat, radius * u.arcsec)
        rows = table.to_pylist()
        per: dict[int, list] = {}
        for a, b, s in zip(i, j, sep.arcsec, strict=True):
            per.setdefault(int(a), []).append((float(s), int(b)))
        for a, found in per.items():
            for rank, (s, b) in enumerate(sorted(found)[:k], start=1):
                row = rows[b]
                if definition.get("context_type_column"):
                    t = row[definition["context_type_column"]].lower()
                else:
                    t = definition["context_default_type"]
                fields = {f: row[f] for f in definition["context_fields"]}
                fields = {f: (None if isinstance(v, float) and v != v else v) for f, v in fields.items()}
                out[ids[a]].append(
                    (definition["name"], str(row[definition["id_column"]]), rank, s, t, fields)
                )
    result = {}
    for oid, matches in out.items():
        label = "orphan"
        if any(t == "star" and s <= STAR_ARCSEC for _, _, _, s, t, _ in matches):
            label = "variable star"
        elif any(t == "qso" and s <= NUCLEAR_ARCSEC for _, _, _, s, t, _ in matches):
            label = "AGN"
        elif any(t == "galaxy" and s <= NUCLEAR_ARCSEC for _, _, _, s, t, _ in matches):
            label = "nuclear"
        elif any(t == "galaxy" for *_, t, _ in matches):
            label = "host-associated"
        elif matches:
            label = "unclear"
        result[oid] = (label, matches)
    return result


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def context_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    lake = new_lake(str(root / "lake"))
    galaxies = make_galaxies(40_000)
    stars = make_stars(8_000)
    ingest_definition(lake, GALAXY_DEFINITION, galaxies, root / "input")
    ingest_definition(lake, STAR_DEFINITION, stars, root / "input")
    objects, planted = make_objects(galaxies, stars, n_random=400)
    expected = brute_force(objects, [(GALAXY_DEFINITION, galaxies), (STAR_DEFINITION, stars)])
    return lake, objects, planted, expected


# ---------------------------------------------------------------------------------------------- tests
def test_definition_context_fields_are_validated():
    good = CatalogDef.from_dict(GALAXY_DEFINITION)
    assert good.context and good.context_radius_arcsec == 30.0
    assert good.context_fields == ("z_phot", "r_mag", "morphology") and good.context_type_column == "kind"
    stored = json.loads(good.to_json())  # the form stored with a release (what the matcher reads)
    assert stored["context"] is True and stored["context_fields"] == ["z_phot", "r_mag", "morphology"]
    again = CatalogDef.from_dict(stored)
    assert [getattr(again, k) for k in ("context", "context_radius_arcsec", "context_fields")] == [
        True,
        30.0,
        ("z_phot", "r_mag", "morphology"),
    ]
    plain = CatalogDef.from_dict({k: v for k, v in GALAXY_DEFINITION.items() if not k.startswith("context")})
    assert not plain.context and plain.context_fields == ()
    assert not CatalogDef.from_dict(json.loads(plain.to_json())).context  # stored with every default
    bad = {
        "context_radius_arcsec": (-1, "context_radius_arcsec"),
        "context_fields": (["z_phot", "nope"], "'nope'"),
        "context_type_column": ("r_mag_missing", "context_type_column"),
        "context_default_type": ("planet", "star, galaxy, qso, unknown"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(DefinitionError, match=message):
            CatalogDef.from_dict({**GALAXY_DEFINITION, key: value})
    with pytest.raises(DefinitionError, match="need context: true"):
        CatalogDef.from_dict({**GALAXY_DEFINITION, "context": False})
    with pytest.raises(DefinitionError, match="true or false"):
        CatalogDef.from_dict({**GALAXY_DEFINITION, "context": "yes"})
    with pytest.raises(DefinitionError, match="int64"):
        CatalogDef.from_dict({**GALAXY_DEFINITION, "context_type_column": "gal_id"})
    with pytest.raises(DefinitionError, match="twice"):
        CatalogDef.from_dict({**GALAXY_DEFINITION, "context_fields": ["r_mag", "r_mag"]})


def test_match_equals_brute_force_and_classifies(context_lake):
    lake, objects, planted, expected = context_lake
    matcher = ContextMatcher(lake, STREAM)
    assert [c.catalog for c in matcher.catalogs()] == ["ctx_galaxies", "ctx_stars"]
    table = matcher.match(objects)
    assert table.schema == CONTEXT_SCHEMA
    got: dict[str, tuple[str, list]] = {}
    for row in table.to_pylist():
        label, matches = got.setdefault(row["object_id"], (row["classification"], []))
        assert row["classification"] == label  # one classification per object
        if row["catalog"] is None:
            assert row["rank"] == 0 and row["separation_arcsec"] is None
            continue
        matches.append(
            (row["catalog"], row["source_id"], row["rank"], row["separation_arcsec"], row["source_type"],
             json.loads(row["fields"]))
        )  # fmt: skip
    assert set(got) == set(objects.column("object_id").to_pylist())
    n_matches = 0
    for oid, (label, want) in expected.items():
        have_label, have = got[oid]
        assert have_label == label, oid
        assert len(have) == len(want), oid
        key = lambda m: (m[0], m[2])  # noqa: E731
        for h, w in zip(sorted(have, key=key), sorted(want, key=key), strict=True):
            assert h[:3] == w[:3] and h[4] == w[4], (oid, h, w)
            assert abs(h[3] - w[3]) < 1e-6
            assert h[5] == pytest.approx(w[5], nan_ok=True)
        n_matches += len(have)
    # grouped by object, nearest first within each object
    rows = table.to_pylist()
    for a, b in itertools.pairwise(rows):
        if a["object_id"] == b["object_id"]:
            assert b["separation_arcsec"] is not None and a["separation_arcsec"] <= b["separation_arcsec"]
    assert len({r["object_id"] for r in rows}) == len(list(itertools.groupby(r["object_id"] for r in rows)))
    for oid, label in planted.items():
        assert got[oid][0] == label, oid
    labels = {label for label, _ in got.values()}
    assert {"variable star", "nuclear", "orphan", "host-associated"} <= labels
    assert n_matches > 300  # the fields are dense enough that most random objects have matches
    assert matcher.timings["total"] > 0 and "ctx_galaxies" in matcher.timings


def test_match_of_nothing_and_of_a_lake_without_context_catalogs(context_lake, tmp_path):
    lake, objects, _, _ = context_lake
    empty = ContextMatcher(lake, STREAM).match(objects.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema == CONTEXT_SCHEMA
    bare = new_lake(str(tmp_path / "bare"))
    table = ContextMatcher(bare, STREAM).match(objects.slice(0, 7))
    assert table.column("classification").to_pylist() == ["orphan"] * 7
    assert table.column("catalog").null_count == 7


def test_store_and_read_back_per_pixel_idempotent_newest_wins(context_lake, tmp_path):
    lake, objects, planted, _ = context_lake
    storage = LakeStorage(str(tmp_path / "store-lake"), load_settings())
    matcher = ContextMatcher(lake, STREAM)
    table = matcher.match(objects)
    paths = [p for p in _store(storage, 41, table)]
    pixels = set(pixels_of(objects.column("ra").to_numpy(), objects.column("dec").to_numpy()).tolist())
    assert {int(p.split("/")[-2]) for p in paths} == pixels and len(pixels) >= 3
    assert all(p == context_file(STREAM, int(p.split("/")[-2]), 41) for p in paths)
    rows = table.to_pylist()
    by_object: dict[str, list] = {}
    for r in rows:
        by_object.setdefault(r["object_id"], []).append(r)
    ra = dict(zip(objects.column("object_id").to_pylist(), objects.column("ra").to_pylist(), strict=True))
    dec = dict(zip(objects.column("object_id").to_pylist(), objects.column("dec").to_pylist(), strict=True))
    for oid in list(planted)[:15] + list(by_object)[-20:]:
        back = context_of(storage, STREAM, oid, ra[oid], dec[oid])
        want = by_object[oid]
        assert len(back) == len(want)
        assert [b["source_id"] for b in back] == [w["source_id"] for w in want]
        assert all(b["seq"] == 41 and b["classification"] == want[0]["classification"] for b in back)
        assert all(isinstance(b["fields"], dict) for b in back)
    assert context_of(storage, STREAM, "NOSUCHOBJECT", ra["VS0000"], dec["VS0000"]) == []
    # orphans: one row, no catalog
    orphan = context_of(storage, STREAM, "OR0000", ra["OR0000"], dec["OR0000"])
    assert len(orphan) == 1 and orphan[0]["catalog"] is None and orphan[0]["classification"] == "orphan"
    # the same seq again: the same files, no duplicated rows
    assert _store(storage, 41, table) == paths
    assert len(context_of(storage, STREAM, "VS0000", ra["VS0000"], dec["VS0000"])) == len(by_object["VS0000"])
    # a newer batch that matched the object again (here: with one row only) wins
    again = table.filter(pa.compute.equal(table.column("object_id"), "VS0000")).slice(0, 1)
    _store(storage, 57, again)
    newest = context_of(storage, STREAM, "VS0000", ra["VS0000"], dec["VS0000"])
    assert len(newest) == 1 and newest[0]["seq"] == 57
    with pytest.raises(ValueError):
        _store(storage, -1, table)


def test_compaction_keeps_every_answer(context_lake, tmp_path):
    lake, objects, _, _ = context_lake
    storage = LakeStorage(str(tmp_path / "compact-lake"), load_settings())
    table = ContextMatcher(lake, STREAM).match(objects)
    ids = objects.column("object_id").to_pylist()
    batches = [ids[i::20] for i in range(20)]  # 20 batches, each with objects all over the fields
    for seq, chunk in enumerate(batches, start=1):
        _store(storage, seq, table.filter(pa.compute.is_in(table.column("object_id"), pa.array(chunk))))
    redo = table.filter(pa.compute.equal(table.column("object_id"), ids[0])).slice(0, 1)
    _store(storage, 30, redo)  # ids[0] matched again later: its newest rows are this one
    pos = {r["object_id"]: (r["ra"], r["dec"]) for r in objects.to_pylist()}
    sample = ids[:12] + ids[-12:]
    before = {oid: context_of(storage, STREAM, oid, *pos[oid]) for oid in sample}
    assert len(before[ids[0]]) == 1 and before[ids[0]][0]["seq"] == 30
    prefix = f"alerts/{STREAM}/context"
    pixels = storage.list_dir(prefix)
    files = {p: storage.list_dir(f"{prefix}/{p}") for p in pixels}
    merged = compact_context(storage, STREAM, min_files=4)
    assert merged and all(files[str(p)] and n == len(files[str(p)]) for p, n in merged.items())
    for p in pixels:
        now = storage.list_dir(f"{prefix}/{p}")
        if int(p) in merged:
            assert len(now) == 1 and now[0].startswith("compact-")
        else:
            assert now == files[p]
    after = {oid: context_of(storage, STREAM, oid, *pos[oid]) for oid in sample}
    assert after == before
    # a reader listing a merged file and the compacted copy (a compaction in progress) sees rows once
    again = table.filter(pa.compute.is_in(table.column("object_id"), pa.array(batches[3])))
    _store(storage, 4, again)
    assert any(len(storage.list_dir(f"{prefix}/{p}")) == 2 for p in merged)
    assert {oid: context_of(storage, STREAM, oid, *pos[oid]) for oid in sample} == before


def _store(storage: LakeStorage, seq: int, table: pa.Table) -> list[str]:
    from dac_lake.alerts.context import store_context

    return store_context(storage, STREAM, seq, table)


def test_live_fallback_gives_the_stored_answer(context_lake):
    lake, objects, planted, _ = context_lake
    matcher = ContextMatcher(lake, STREAM)
    pick = [i for i, oid in enumerate(objects.column("object_id").to_pylist()) if oid in planted][:12]
    sub = objects.take(pa.array(pick))
    stored = matcher.match(sub).to_pylist()
    engine = QueryEngine(lake, frozenset())
    for row in sub.to_pylist():
        live = live_context(engine, row["object_id"], row["ra"], row["dec"])
        want = [r for r in stored if r["object_id"] == row["object_id"]]
        assert [(r["catalog"], r["source_id"], r["rank"]) for r in live] == [
            (r["catalog"], r["source_id"], r["rank"]) for r in want
        ]
        assert live[0]["classification"] == planted[row["object_id"]]
        assert classify(live) == planted[row["object_id"]]


def test_classify_rules_in_order():
    def m(kind, sep):
        return {"catalog": "c", "source_type": kind, "separation_arcsec": sep}

    assert classify([]) == "orphan"
    assert classify([{"catalog": None, "separation_arcsec": None}]) == "orphan"
    assert classify([m("galaxy", 0.5), m("star", 0.9)]) == "variable star"
    assert classify([m("galaxy", 0.5), m("star", 1.5)]) == "nuclear"
    assert classify([m("qso", 0.2), m("galaxy", 0.1)]) == "AGN"
    assert classify([m("galaxy", 12.0), m("unknown", 0.1)]) == "host-associated"
    assert classify([m("star", 3.0), m("unknown", 9.0)]) == "unclear"


# ---------------------------------------------------------------------------------------------- bench
def bench(rows: int = 1_000_000, n_objects: int = 10_000) -> None:
    """A 10k-object batch (in 10 fields of 1.5 deg, as an alert batch is) against a `rows`-row context
    catalog concentrated in those fields plus an all-sky part (so the matches are dense: ~1 per object)."""
    fields = tuple((36.0 * i + 5.0, -60.0 + 11.0 * i) for i in range(10))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lake = new_lake(str(root / "lake"))
        t = time.perf_counter()
        galaxies = make_galaxies(rows, fields=fields, radius=1.6, sky_fraction=0.3)
        ingest_definition(
            lake, GALAXY_DEFINITION, galaxies, root / "input", max_rows=100_000, highest_order=8
        )
        print(f"catalog: {rows:,} rows ingested in {time.perf_counter() - t:.1f} s")
        rng = np.random.default_rng(9)
        ras, decs = zip(*(_disc(rng, n_objects // len(fields), a, d, 1.5) for a, d in fields), strict=True)
        objects = pa.table(
            {
                "object_id": pa.array([f"ZTF{i:09d}" for i in range(n_objects)], pa.string()),
                "ra": np.concatenate(ras),
                "dec": np.concatenate(decs),
            }
        )
        matcher = ContextMatcher(lake, STREAM)
        for attempt in range(3):
            t = time.perf_counter()
            table = matcher.match(objects)
            t_match = time.perf_counter() - t
            t = time.perf_counter()
            paths = matcher.store(attempt + 1, table)
            t_store = time.perf_counter() - t
            print(
                f"run {attempt + 1}: match {t_match:.3f} s ({matcher.timings}), {table.num_rows:,} rows "
                f"({table.column('catalog').null_count:,} orphans); store {t_store:.3f} s, {len(paths)} files"
            )
        oid, ra, dec = "ZTF000000123", float(objects["ra"][123].as_py()), float(objects["dec"][123].as_py())
        t = time.perf_counter()
        for _ in range(20):
            context_of(lake.storage, STREAM, oid, ra, dec)
        print(f"context_of: {(time.perf_counter() - t) / 20 * 1000:.1f} ms per object (3 batch files)")
        for seq in range(10, 210):  # 200 more batches of 50 objects each, in every pixel
            matcher.store(seq, table.slice(seq * 50 % table.num_rows, 50))
        folder = f"alerts/{STREAM}/context/{int(pixels_of(np.array([ra]), np.array([dec]))[0])}"
        n_files = len(lake.storage.list_dir(folder))
        t = time.perf_counter()
        for _ in range(5):
            context_of(lake.storage, STREAM, oid, ra, dec)
        print(f"context_of: {(time.perf_counter() - t) / 5 * 1000:.1f} ms per object ({n_files} files)")
        t = time.perf_counter()
        merged = compact_context(lake.storage, STREAM)
        print(f"compact_context: {len(merged)} pixels in {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        for _ in range(20):
            context_of(lake.storage, STREAM, oid, ra, dec)
        print(f"context_of: {(time.perf_counter() - t) / 20 * 1000:.1f} ms per object (compacted)")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        args = [int(a) for a in sys.argv[1:] if a.isdigit()]
        bench(*args)
