"""Benchmark: the broker's cost per alert batch - watchlists, watchmaps, filters - against the commit.

Issue 5 asks that thousands of watchlists of 100k sources each slow the alert ingest by at most 2x. The
ingest commits a micro-batch of ~10,000 alerts (a Rubin visit) in about `--commit-seconds` (2 s unless
measured); the broker then matches the batch's objects against every watchlist and watchmap and runs
every filter. So for each configuration (watchlists x sources each) this script:

1. generates the watchlists (positions uniform over the sky; radii as users set them: 80% 2", 15% 1-10",
   5% 10-60"), builds the index (`WatchlistIndex.add`: one sorted array of HEALPix keys) and reports build
   time, index size and the process's peak memory; configurations that cannot fit in the memory available
   now are skipped with the figure they would need;
2. makes `--batches` batches of `--batch-size` objects, each in one field of view (`--field-deg` wide, at a
   random place) with `--hit-fraction` of the objects placed within 1.2 radii of a random watchlist source,
   and times `match_table` (the whole HEALPix join and exact distance test, hits table included);
3. checks the hits of 3 watchlists against astropy (`search_around_sky`) on the first batch;
4. times what an edit costs while the index is big: adding one more watchlist (a new segment), matching
   with two segments, and a full merge (what compaction does after many edits);
5. matches the same batches against `--watchmaps` MOCs (cones and polygons, depth 10) and runs
   `--filters` filters (a mix of object cuts, detection aggregates and watchlist joins) through the real
   query engine on a local lake;
6. prints per configuration the time per batch of each part and the ingest slow-down factor
   (commit + broker) / commit, which must stay <= 2.

Run from the repository root::

    /work/venv/bin/python bench/alerts/bench_watchlists.py                       # default configurations
    /work/venv/bin/python bench/alerts/bench_watchlists.py --configs 1000x100000 --batches 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dac_lake.alerts_broker.filters import FilterRunner, FilterService
from dac_lake.alerts_broker.store import BrokerStore, Caller
from dac_lake.alerts_broker.watchlists import SOURCES_SCHEMA, WatchlistIndex, _Segment
from dac_lake.alerts_broker.watchmaps import WatchmapIndex

BANDS = "ugrizy"
#: bytes per source at the peak of an index build (inputs, the sorted copy, sort indices, temporaries),
#: measured with --configs 100x100000 on this machine (~130); used to skip what cannot fit
PEAK_BYTES_PER_SOURCE = 140
#: extra bytes per source a full merge needs next to the index (the concatenated copy and its sort)
MERGE_BYTES_PER_SOURCE = 60


def meminfo(key: str) -> float:
    """A /proc/meminfo figure in GB."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def proc_status(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in GB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM so each configuration reports its own peak (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def random_sky(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))


def make_watchlist(rng, w: int, n: int) -> pa.Table:
    ra, dec = random_sky(rng, n)
    kind = rng.random(n)
    radius = np.where(kind < 0.8, 2.0, np.where(kind < 0.95, rng.uniform(1, 10, n), rng.uniform(10, 60, n)))
    names = pc.binary_join_element_wise(f"w{w}_", pc.cast(pa.array(np.arange(n)), pa.string()), "")
    return pa.table({"name": names, "ra": ra, "dec": dec, "radius_arcsec": radius}, schema=SOURCES_SCHEMA)


def make_batch(
    rng, size: int, field_deg: float, hit_fraction: float, sample: pa.Table, batch: int
) -> pa.Table:
    """Objects of one field of view, some of them next to watchlist sources (anywhere on the sky)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    n_hit = int(size * hit_fraction)
    n_field = size - n_hit
    centre = SkyCoord(*random_sky(rng, 1), unit="deg")
    field = centre.directional_offset_by(
        rng.uniform(0, 360, n_field) * u.deg,
        np.degrees(np.arccos(1 - rng.random(n_field) * (1 - np.cos(np.radians(field_deg / 2))))) * u.deg,
    )
    pick = rng.integers(0, sample.num_rows, n_hit)
    src = SkyCoord(sample["ra"].to_numpy()[pick], sample["dec"].to_numpy()[pick], unit="deg")
    near = src.directional_offset_by(
        rng.uniform(0, 360, n_hit) * u.deg,
        rng.uniform(0, 1.2, n_hit) * sample["radius_arcsec"].to_numpy()[pick] * u.arcsec,
    )
    ra = np.concatenate([field.ra.deg.ravel(), near.ra.deg])
    dec = np.concatenate([field.dec.deg.ravel(), near.dec.deg])
    cols = {
        "object_id": pc.binary_join_element_wise(
            f"b{batch}_", pc.cast(pa.array(np.arange(size)), pa.string()), ""
        ),
        "ra": ra,
        "dec": dec,
        "first_mjd": 60000 + rng.uniform(0, 10, size),
        "last_mjd": 60010 + rng.uniform(0, 10, size),
        "n_detections": rng.integers(1, 300, size).astype(np.int32),
    }
    for b in BANDS:
        cols[f"mag_{b}_latest"] = rng.uniform(15, 24, size).astype(np.float32)
        cols[f"mjd_{b}_latest"] = 60010 + rng.uniform(0, 10, size)
        cols[f"rate_{b}"] = rng.normal(0, 0.2, size).astype(np.float32)
    cols["n_bands"] = rng.integers(1, 6, size).astype(np.int32)
    cols["last_alert_id"] = np.arange(size, dtype=np.int64) + batch * 10**7
    cols["updated_batch"] = np.full(size, batch, np.int64)
    return pa.table(cols)


def make_detections(rng, objects: pa.Table, per_object: int) -> pa.Table:
    n = objects.num_rows * per_object
    obj = np.repeat(np.arange(objects.num_rows), per_object)
    return pa.table(
        {
            "detection_id": np.arange(n, dtype=np.int64),
            "object_id": objects["object_id"].take(pa.array(obj)),
            "alert_id": np.arange(n, dtype=np.int64),
            "ra": objects["ra"].to_numpy()[obj],
            "dec": objects["dec"].to_numpy()[obj],
            "mjd": 60000 + rng.uniform(0, 365, n),
            "band": pa.array(rng.choice(list(BANDS), n)),
            "mag": rng.uniform(15, 24, n).astype(np.float32),
            "mag_err": rng.uniform(0.01, 0.3, n).astype(np.float32),
            "flux": rng.normal(1000, 300, n).astype(np.float32),
            "flux_err": rng.uniform(5, 50, n).astype(np.float32),
            "is_positive": rng.random(n) < 0.8,
            "reliability": rng.random(n).astype(np.float32),
            "is_history": np.tile(np.arange(per_object) > 0, objects.num_rows),
            "survey": pa.array(["lsst"] * n),
            "schema_version": pa.array(["7.0"] * n),
        }
    )


def verify(lists_sample, batch: pa.Table, hits: pa.Table) -> int:
    """Hits of a few watchlists == astropy's pairs within each source's radius; returns pairs checked."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    obj = SkyCoord(batch["ra"].to_numpy(), batch["dec"].to_numpy(), unit="deg")
    ids = batch["object_id"].to_pylist()
    checked = 0
    for wl_id, table in lists_sample:
        src = SkyCoord(table["ra"].to_numpy(), table["dec"].to_numpy(), unit="deg")
        radius = table["radius_arcsec"].to_numpy()
        i, j, sep, _ = search_around_sky(obj, src, radius.max() * 1.01 * u.arcsec)
        names = table["name"].to_pylist()
        want = {(names[b], ids[a]) for a, b, s in zip(i, j, sep.arcsec, strict=True) if s <= radius[b]}
        mine = hits.filter(pc.equal(hits["watchlist_id"], wl_id))
        got = set(zip(mine["source_name"].to_pylist(), mine["object_id"].to_pylist(), strict=True))
        if got != want:
            raise SystemExit(f"MISMATCH in {wl_id}: {len(got - want)} extra, {len(want - got)} missing hits")
        checked += len(want)
    return checked


FILTERS = [
    "SELECT object_id, mag_r_latest, rate_r FROM batch.objects WHERE rate_r < -0.5 AND n_detections > 3",
    "SELECT object_id FROM batch.objects WHERE mag_g_latest - mag_r_latest < -0.3 AND mag_g_latest < 19",
    "SELECT object_id, COUNT(*) AS n, MIN(mag) AS peak FROM batch.detections WHERE band = 'g' "
    "GROUP BY object_id HAVING COUNT(*) >= 3 AND MIN(mag) < 17",
    "SELECT h.watchlist_id, h.source_name, o.object_id, o.mag_r_latest FROM batch.watchlist_hits AS h "
    "JOIN batch.objects AS o ON o.object_id = h.object_id",
    "SELECT object_id, reliability FROM batch.detections WHERE is_history = 0 AND reliability > 0.95",
]


def bench_filters(args, batches, detections, hits) -> float:
    """Seconds per batch to run `--filters` filters (cycling through FILTERS) through the engine."""
    from dac_lake.lake import Lake
    from dac_lake.storage import LakeStorage

    if args.filters <= 0:
        return 0.0
    with tempfile.TemporaryDirectory(prefix="bench_broker_") as tmp:
        lake = Lake(LakeStorage(tmp))
        lake.init()
        store = BrokerStore(lake.storage, "bench")
        service = FilterService(lake, store)
        owners = [Caller(f"user{k}") for k in range(10)]
        for k in range(args.filters):
            service.create(owners[k % 10], f"filter {k}", FILTERS[k % len(FILTERS)])
        runner = FilterRunner(service)
        runner.run(0, batches[0], detections[0], hits[0])  # warm-up (translations cached from here on)
        times = []
        for b, (objects, det, h) in enumerate(zip(batches, detections, hits, strict=True)):
            t0 = time.perf_counter()
            runs = runner.run(b + 1, objects, det, h)
            times.append(time.perf_counter() - t0)
            failed = [r for r in runs if r.error]
            if failed:
                raise SystemExit(f"filter failed: {failed[0]}")
        return statistics.median(times)


def bench_watchmaps(args, batches) -> tuple[float, float, int]:
    from astropy import units as u
    from mocpy import MOC

    if args.watchmaps <= 0:
        return 0.0, 0.0, 0
    rng = np.random.default_rng(args.seed + 7)
    t0 = time.perf_counter()
    mocs = []
    for k in range(args.watchmaps):
        ra, dec = random_sky(rng, 1)
        if k % 4:
            moc = MOC.from_cone(
                lon=ra[0] * u.deg, lat=dec[0] * u.deg, radius=rng.uniform(0.5, 5) * u.deg, max_depth=10
            )
        else:
            size = rng.uniform(1, 10)
            d0 = float(np.clip(dec[0], -80, 75))
            moc = MOC.from_polygon(
                lon=[ra[0], ra[0] + size, ra[0] + size, ra[0]] * u.deg,
                lat=[d0, d0, d0 + size / 2, d0 + size / 2] * u.deg,
                max_depth=10,
            )
        mocs.append((f"wm-{k:016x}", f"user{k % 10}", "v1", moc))
    made = time.perf_counter() - t0
    index = WatchmapIndex()
    t0 = time.perf_counter()
    index.add(mocs)
    build = time.perf_counter() - t0
    times = []
    for objects in batches:
        t0 = time.perf_counter()
        index.match_table(objects)
        times.append(time.perf_counter() - t0)
    print(
        f"  watchmaps: {args.watchmaps} MOCs ({index.cells:,} cells; made in {made:.1f} s, index built in "
        f"{build:.2f} s); match {statistics.median(times) * 1000:.1f} ms/batch"
    )
    return statistics.median(times), build, index.cells


def run_config(args, n_lists: int, n_sources: int) -> dict | None:
    total = n_lists * n_sources
    need_gb = total * PEAK_BYTES_PER_SOURCE / 2**30
    avail = meminfo("MemAvailable")
    print(f"\n== {n_lists} watchlists x {n_sources:,} sources = {total:,} sources")
    if need_gb > 0.85 * avail:
        print(f"  SKIPPED: needs ~{need_gb:.1f} GB at the peak of the build, {avail:.1f} GB available now")
        return None
    gc.collect()
    reset_peak()
    rss0 = proc_status("VmRSS")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    lists = [
        (f"wl-{w:016x}", f"user{w % 10}", "v1", make_watchlist(rng, w, n_sources)) for w in range(n_lists)
    ]
    made = time.perf_counter() - t0
    checked_lists = (0, n_lists // 2, n_lists - 1)
    spread = range(0, n_lists, max(1, n_lists // 50))
    sample = pa.concat_tables([lists[w][3].slice(0, 200) for w in (*spread, *checked_lists, *checked_lists)])
    check = [(lists[w][0], lists[w][3]) for w in checked_lists]
    index = WatchlistIndex()
    t0 = time.perf_counter()
    index.add(lists)
    build = time.perf_counter() - t0
    del lists
    gc.collect()
    rss = proc_status("VmRSS")
    peak = proc_status("VmHWM")
    print(
        f"  generated in {made:.1f} s; index built in {build:.1f} s ({build / total * 1e9:.0f} ns/source); "
        f"index {index.nbytes / 2**30:.2f} GB ({index.nbytes / total:.0f} B/source); "
        f"RSS +{rss - rss0:.2f} GB, peak {peak:.2f} GB"
    )

    brng = np.random.default_rng(args.seed + 1)
    batches = [
        make_batch(brng, args.batch_size, args.field_deg, args.hit_fraction, sample, b)
        for b in range(args.batches)
    ]
    index.match_table(batches[0])  # warm-up: page in the index
    times, hits_all = [], []
    for objects in batches:
        t0 = time.perf_counter()
        hits = index.match_table(objects)
        times.append(time.perf_counter() - t0)
        hits_all.append(hits)
    st = index.last
    match_s = statistics.median(times)
    print(
        f"  match: median {match_s * 1000:.0f} ms/batch of {args.batch_size:,} objects "
        f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}); last batch {st.queries:,} cell "
        f"look-ups, {st.candidates:,} candidates, {st.hits:,} hits"
    )
    checked = verify(check, batches[0], hits_all[0])
    print(f"  verified against astropy: 3 watchlists, {checked} hits identical")

    # an edit while the index is big: one more watchlist, a match with two segments, a full merge
    t0 = time.perf_counter()
    index.add([("wl-ffffffffffffffff", "user0", "v1", make_watchlist(rng, 99999, n_sources))])
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.match_table(batches[0])
    match2_s = time.perf_counter() - t0
    merge_s = float("nan")
    if total * MERGE_BYTES_PER_SOURCE / 2**30 < 0.85 * meminfo("MemAvailable"):
        t0 = time.perf_counter()
        merged = _Segment.merge(index.segments, index._present)
        merge_s = time.perf_counter() - t0
        del merged
    print(
        f"  edit: add one watchlist {add_s:.2f} s; match with 2 segments {match2_s * 1000:.0f} ms; "
        f"full merge (compaction) {merge_s:.1f} s"
    )

    detections = [make_detections(brng, objects, args.history) for objects in batches]
    filters_s = bench_filters(args, batches, detections, hits_all)
    if args.filters:
        print(
            f"  filters: {args.filters} filters {filters_s * 1000:.0f} ms/batch "
            f"({filters_s / args.filters * 1000:.1f} ms each; detections {detections[0].num_rows:,}/batch)"
        )
    wm_s, _, _ = bench_watchmaps(args, batches)
    broker_s = match_s + wm_s + filters_s
    factor = (args.commit_seconds + broker_s) / args.commit_seconds
    print(
        f"  => broker {broker_s:.2f} s per {args.batch_size:,}-alert batch vs commit "
        f"{args.commit_seconds:.2f} s: "
        f"ingest slow-down x{factor:.2f} (target <= 2) {'OK' if factor <= 2 else 'OVER'}"
    )
    del index
    gc.collect()
    return {
        "config": f"{n_lists}x{n_sources}",
        "sources": total,
        "build_s": build,
        "index_gb": rss - rss0,
        "peak_gb": peak,
        "match_ms": match_s * 1000,
        "add_s": add_s,
        "merge_s": merge_s,
        "filters_ms": filters_s * 1000,
        "watchmaps_ms": wm_s * 1000,
        "factor": factor,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        default="1000x10000,100x100000,1000x100000",
        help="watchlists x sources each, comma-separated (default %(default)s)",
    )
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--field-deg", type=float, default=3.5, help="field of view of a batch (Rubin: 3.5)")
    ap.add_argument("--hit-fraction", type=float, default=0.05, help="objects placed near watchlist sources")
    ap.add_argument("--history", type=int, default=10, help="detections per object handed to filters")
    ap.add_argument(
        "--commit-seconds", type=float, default=2.0, help="time to commit one batch (issue: ~2 s)"
    )
    ap.add_argument("--watchmaps", type=int, default=1000)
    ap.add_argument("--filters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    print(
        f"machine: {os.cpu_count()} cores, {meminfo('MemTotal'):.1f} GB RAM, "
        f"{meminfo('MemAvailable'):.1f} GB available, load {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for config in args.configs.split(","):
        n_lists, n_sources = (int(x) for x in config.lower().split("x"))
        row = run_config(args, n_lists, n_sources)
        if row:
            rows.append(row)
    if rows:
        print(
            "\nconfig          sources  build s  index GB  peak GB  match ms  +1 list s  merge s  "
            "watchmaps ms  filters ms  slow-down"
        )
        for r in rows:
            print(
                f"{r['config']:<13} {r['sources']:>10,} {r['build_s']:>7.1f} {r['index_gb']:>9.2f} "
                f"{r['peak_gb']:>8.2f} {r['match_ms']:>9.0f} {r['add_s']:>10.2f} {r['merge_s']:>8.1f} "
                f"{r['watchmaps_ms']:>13.0f} {r['filters_ms']:>11.0f}  x{r['factor']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
