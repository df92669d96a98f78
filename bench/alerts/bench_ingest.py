# ruff: noqa: E501 - long report lines are kept whole for readability
"""End-to-end alert ingest: Avro packets -> committed lake snapshots, with filters and watchlists on.

Issue 5, point 9: sustain at least 5,000 alerts/s (20x Rubin's design peak of ~10,000 alerts per 30-40 s
visit) on 2 cores, with end-to-end latency from packet to queryable under 10 s. What runs is the real
pipeline (`ingest.alerts.pipeline.AlertIngest`: decode, dead letters, normalise, de-duplicate against the
lake, write HATS files, commit the snapshot, then the broker: watchlists, watchmaps, filters), on a fresh
local lake per run.

Packets are Rubin alerts (schema 11.1, Confluent-framed, as on Rubin's Kafka) made by
`ingest.alerts.generate` and held in memory, handed over in batches as a Kafka consumer would (so the
figures are of dac-lake, not of a broker or of a disk). Two sky layouts:

- `fields`: objects in telescope fields visited in turn: a batch is one or two visits (a survey's stream);
- `allsky`: every batch scattered over the whole sky (the worst case for a HEALPix-partitioned writer).

Measured per layout, each `--repeats` times (median):

1. **peer**: fastavro decoding the same packets to dicts (`schemaless_reader`), the standard way to read
   alerts in Python, nothing else: the ratio says how the whole pipeline compares with merely reading;
2. **ingest**: the pipeline, broker off;
3. **ingest + broker**: with `--watchlists` x `--sources` watchlist sources, `--watchmaps` MOCs and
   `--filters` filters (the broker benchmark's filter set) stored in the lake; the slow-down is 3 / 2;
4. **paced**: packets arrive at `--rate` alerts/s for `--paced-seconds` (a feeder thread, batches of at
   most `--batch` alerts or `--max-wait` s): latency = first packet of a batch arriving -> its snapshot
   committed (queryable), p50/p95/max over batches. If the pipeline cannot keep up, latency grows and the
   run says so.

    python bench/alerts/bench_ingest.py [--objects 6000 --nights 6 --fields 24 --repeats 3 ...]
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.alerts.bench_watchlists import FILTERS
from dac_lake.alerts_broker import AlertBroker, Caller
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from ingest.alerts.generate import build_alerts, confluent_payload
from ingest.alerts.packets import KafkaPosition, Packet
from ingest.alerts.pipeline import AlertIngest
from ingest.alerts.sources import Batch

CACHE = Path(__file__).resolve().parents[2] / ".dac" / "bench-alerts"


def payloads(objects: int, nights: int, fields: int, seed: int) -> tuple[list[bytes], dict]:
    """Confluent-framed Rubin packets (cached on disk: generating is slower than ingesting)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"rubin-{objects}-{nights}-{fields}-{seed}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        blob, offsets = data["blob"].tobytes(), data["offsets"]
        return [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)], json.loads(
            str(data["info"])
        )
    t = time.perf_counter()
    info, records = build_alerts("rubin", objects, nights, seed=seed, fields=fields, cutout_pixels=16)
    out = [confluent_payload(r, info) for r in records]
    offsets = np.cumsum([0] + [len(p) for p in out])
    meta = {"version": info.version, "generated_s": round(time.perf_counter() - t, 1)}
    np.savez(path, blob=np.frombuffer(b"".join(out), np.uint8), offsets=offsets, info=json.dumps(meta))
    return out, meta


def batches_of(raw: list[bytes], size: int) -> list[Batch]:
    out = []
    for start in range(0, len(raw), size):
        b = Batch(
            [
                Packet(KafkaPosition("bench", 0, i), _raw=raw[i])
                for i in range(start, min(start + size, len(raw)))
            ]
        )
        out.append(b)
    return out


def peer_fastavro(raw: list[bytes]) -> float:
    """Seconds for fastavro to decode every packet to a dict (schema parsed once)."""
    import fastavro

    from ingest.alerts.packets import registry

    schemas = {}
    t = time.perf_counter()
    for p in raw:
        sid = int.from_bytes(p[1:5], "big")
        schema = schemas.get(sid)
        if schema is None:
            schema = schemas[sid] = fastavro.parse_schema(registry().by_id(sid).schema)
        fastavro.schemaless_reader(io.BytesIO(p[5:]), schema, None)
    return time.perf_counter() - t


def setup_broker(lake: Lake, stream: str, args, rng) -> AlertBroker:
    """Watchlists, watchmaps and filters stored in the lake as users would create them."""
    import astropy.units as u
    from astropy.coordinates import Latitude, Longitude
    from mocpy import MOC

    broker = AlertBroker(lake, stream)
    owners = [Caller(f"user{k}") for k in range(10)]
    for w in range(args.watchlists):
        n = args.sources
        ra = rng.uniform(0, 360, n)
        dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
        radius = np.where(rng.random(n) < 0.8, 2.0, rng.uniform(1, 30, n))
        csv = "name,ra,dec,radius\n" + "\n".join(
            f"s{w}_{i},{ra[i]:.6f},{dec[i]:.6f},{radius[i]:.1f}" for i in range(n)
        )
        broker.watchlists.create(owners[w % 10], f"list {w}", csv.encode(), fmt="csv")
    for m in range(args.watchmaps):
        moc = MOC.from_cone(Longitude(rng.uniform(0, 360) * u.deg), Latitude(rng.uniform(-60, 60) * u.deg),
                            radius=rng.uniform(0.5, 5) * u.deg, max_depth=10)  # fmt: skip
        broker.watchmaps.create(
            owners[m % 10], f"map {m}", moc.to_string(format="ascii").encode(), fmt="ascii"
        )
    for k in range(args.filters):
        broker.filters.create(owners[k % 10], f"filter {k}", FILTERS[k % len(FILTERS)])
    return broker


def broker_from_template(lake: Lake, args, rng, tmp: Path) -> AlertBroker:
    """The broker definitions are made once (uploading 10M watchlist sources takes a while) in a template
    lake, and copied into each run's fresh lake."""
    import shutil

    template = tmp / "broker-template"
    if not (template / "lake.json").exists():
        t = time.perf_counter()
        tl = Lake(LakeStorage(str(template)))
        tl.init()
        setup_broker(tl, "rubin", args, rng)
        print(f"  broker definitions: {args.watchlists} watchlists x {args.sources:,} sources, "
              f"{args.watchmaps} watchmaps, {args.filters} filters, made in {time.perf_counter() - t:.0f} s")  # fmt: skip
    src = template / "alerts" / "rubin" / "broker"
    shutil.copytree(src, Path(lake.storage.path("alerts/rubin/broker")), dirs_exist_ok=True)
    return AlertBroker(lake, "rubin")


def run_once(raw, args, with_broker: bool, rng, tmp: Path, label: str) -> dict:
    root = tmp / f"{label}-{time.time_ns()}"
    lake = Lake(LakeStorage(str(root)))
    lake.init()
    broker = None
    setup_s = 0.0
    if with_broker:
        t = time.perf_counter()
        broker = broker_from_template(lake, args, rng, tmp)
        broker.refresh()  # index the watchlists before the clock starts (a running ingest has them)
        setup_s = time.perf_counter() - t
    pipeline = AlertIngest(lake, "rubin", dead_letter_dir=root / "dead", order=args.order, broker=broker)
    warm = pipeline.warm_up()
    if not hasattr(run_once, "warm"):
        run_once.warm = warm  # the first compile of the process (later pipelines reuse it)
    batches = batches_of(raw, args.batch)
    for b in batches:
        b.first_at = time.time()
    report = pipeline.run(None, batches=iter(batches))
    return {"seconds": report.seconds, "alerts": report.alerts, "rate": report.alerts_per_second,
            "warm_up_s": warm, "setup_s": setup_s, "stages": report.stage_seconds,
            "filter_matches": report.filter_matches, "watchlist_hits": report.watchlist_hits,
            "watchmap_hits": report.watchmap_hits, "filter_failures": report.filter_failures}  # fmt: skip


def run_paced(raw, args, rng, tmp: Path) -> dict:
    """Packets arrive at `args.rate`/s; latency of each batch from its first packet's arrival to commit."""
    root = tmp / f"paced-{time.time_ns()}"
    lake = Lake(LakeStorage(str(root)))
    lake.init()
    broker = broker_from_template(lake, args, rng, tmp)
    broker.refresh()
    pipeline = AlertIngest(lake, "rubin", dead_letter_dir=root / "dead", order=args.order, broker=broker)
    pipeline.warm_up()
    n = min(len(raw), int(args.rate * args.paced_seconds))
    arrivals: queue.Queue = queue.Queue()

    def feeder() -> None:
        t0 = time.perf_counter()
        for i in range(n):
            due = t0 + i / args.rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.002, due - now))
            arrivals.put((time.time(), Packet(KafkaPosition("bench", 0, i), _raw=raw[i])))
        arrivals.put(None)

    def batches():
        done = False
        while not done:
            first = arrivals.get()
            if first is None:
                return
            batch = Batch([first[1]], first_at=first[0])
            deadline = time.monotonic() + args.max_wait
            while len(batch) < args.batch:
                try:
                    item = arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.packets.append(item[1])
            yield batch

    thread = threading.Thread(target=feeder, daemon=True)
    thread.start()
    report = pipeline.run(None, batches=batches())
    thread.join()
    lat = np.asarray(report.latencies)
    return {"alerts": report.alerts, "rate": args.rate, "batches": report.batches,
            "latency_p50": float(np.median(lat)), "latency_p95": float(np.percentile(lat, 95)),
            "latency_max": float(lat.max()), "kept_up": bool(lat[-3:].max() < 3 * np.median(lat) + 2)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=6000)
    ap.add_argument("--nights", type=int, default=6)
    ap.add_argument("--fields", type=int, default=24, help="telescope fields of the 'fields' layout")
    ap.add_argument("--layouts", default="fields:3,allsky:1",
                    help="LAYOUT:ORDER,... (fields or allsky, and the stream's HEALPix order)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=10_000, help="alerts per micro-batch (a Rubin visit)")
    ap.add_argument("--watchlists", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=10_000, help="sources per watchlist")
    ap.add_argument("--watchmaps", type=int, default=100)
    ap.add_argument("--filters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=5000.0, help="paced run: alerts per second")
    ap.add_argument("--paced-seconds", type=float, default=20.0)
    ap.add_argument("--max-wait", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench_alerts_") as tmp:
        for spec in args.layouts.split(","):
            layout, order = spec.split(":")
            args.order = int(order)
            raw, meta = payloads(
                args.objects, args.nights, args.fields if layout == "fields" else 0, args.seed
            )
            mb = sum(map(len, raw)) / 1e6
            print(f"\n== {layout}: {len(raw):,} Rubin {meta['version']} alerts ({mb:.0f} MB), batches of "
                  f"{args.batch:,}, order {args.order}", flush=True)  # fmt: skip
            peer, plain, full = [], [], []
            for r in range(args.repeats):
                peer.append(len(raw) / peer_fastavro(raw))
                plain.append(run_once(raw, args, False, rng, Path(tmp), f"{layout}-plain"))
                full.append(run_once(raw, args, True, rng, Path(tmp), f"{layout}-broker"))
                print(f"  run {r + 1}: fastavro {peer[-1]:,.0f}/s; ingest {plain[-1]['rate']:,.0f}/s; "
                      f"ingest+broker {full[-1]['rate']:,.0f}/s (filters matched {full[-1]['filter_matches']}, "
                      f"watchlist hits {full[-1]['watchlist_hits']}, watchmap hits {full[-1]['watchmap_hits']}, "
                      f"failed filters {full[-1]['filter_failures']})", flush=True)  # fmt: skip
            med = {k: statistics.median(x) for k, x in (("peer", peer), ("plain", [p["rate"] for p in plain]),
                                                        ("full", [f["rate"] for f in full]))}  # fmt: skip
            stages = {k: round(statistics.median(f["stages"].get(k, 0) for f in full), 2)
                      for k in full[0]["stages"]}  # fmt: skip
            print(
                f"  median: fastavro decode only {med['peer']:,.0f} alerts/s | ingest {med['plain']:,.0f}/s "
                f"({med['plain'] / med['peer']:.2f}x fastavro) | ingest+broker {med['full']:,.0f}/s "
                f"({med['full'] / med['peer']:.2f}x fastavro; broker slow-down x{med['plain'] / med['full']:.2f})"
            )
            print(f"  stage seconds (ingest+broker, whole run): {stages}; decoder warm-up "
                  f"{getattr(run_once, 'warm', 0.0):.1f} s (once per process); broker set-up {full[0]['setup_s']:.1f} s")  # fmt: skip
            entry = {
                "alerts": len(raw),
                "mb": mb,
                "median": med,
                "stages": stages,
                "runs": {"plain": plain, "full": full},
            }
            if layout == "fields":
                paced = run_paced(raw, args, rng, Path(tmp))
                print(f"  paced at {paced['rate']:,.0f} alerts/s for {paced['alerts']:,} alerts: latency packet -> "
                      f"queryable p50 {paced['latency_p50']:.2f} s, p95 {paced['latency_p95']:.2f} s, max "
                      f"{paced['latency_max']:.2f} s; kept up: {paced['kept_up']}")  # fmt: skip
                entry["paced"] = paced
            results[spec] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
