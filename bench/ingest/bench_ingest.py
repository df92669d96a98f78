"""Benchmark: `dac ingest release` against hats-import, on the same input, threshold and cores.

dac-lake replaces hats-import's dask pipeline with one in-process pass (read, compute `_healpix_29`,
sort once, write every partition as a slice). Whether that is worth having depends on it being clearly
faster than the reference tool while writing the *same* partitioning, so this script measures both in one
run and refuses to report a speed-up for output that differs:

1. the synthetic ``demo_survey`` input (``ingest.demo``) is generated once and cached;
2. each of ``--runs`` rounds ingests it with dac-lake (``ingest_release``, ``threads=--workers``, in a fresh
   Python process per ingest, as the CLI runs) and with hats-import (``--workers`` single-threaded dask
   workers, so both get the same number of cores), alternating which tool goes first because the
   benchmark machine is small and shared; every ingest writes to a fresh directory;
3. after every round, the pixels and per-pixel row counts of both outputs (read from the Parquet footers
   of ``dataset/Norder=*/Dir=*/Npix=*.parquet``) must be identical and sum to the input's row count,
   for the catalog and, with ``--with-margin``, for the 10 arcsec margin cache; any difference aborts;
4. a table gives median / min wall seconds, rows/s, CPU seconds and peak RSS per tool and the dac-lake /
   hats-import throughput ratio. Each tool is reported twice: the work alone (``ingest_release`` call;
   ``pipeline_with_client`` calls) and including its start-up (a Python process with its imports; the
   dask ``Client`` and its workers), which a user pays on every import.

Like with like: "catalog" is hats-import's catalog pipeline against dac-lake with ``margin_arcsec=0``;
"catalog+margin" adds hats-import's margin pipeline (same Client) against dac-lake with a 10 arcsec margin.
dac-lake always also writes an index catalog on the id column and runs hats' strict validation and a
publish; hats-import does neither here (its index pipeline refuses this dask version), so every dac-lake
figure includes extra work and the ratio is conservative. Both tools write with hats' Parquet settings at
one zstd level (``--compression-level``, default hats' 15): that encoding is the largest single cost of
both, and dac-lake's own default level (9) differs from hats-import's, which would measure the level
rather than the partitioner.

Run (from the repository root)::

    /work/venv/bin/python bench/ingest/bench_ingest.py --rows 10000000 --runs 3 --with-margin [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: the ingest package lives at the repo root
    sys.path.insert(0, str(REPO))

from dac_lake import layout  # noqa: E402
from dac_lake.catalog_def import load_definition  # noqa: E402
from dac_lake.lake import Lake  # noqa: E402
from dac_lake.storage import LakeStorage  # noqa: E402
from ingest.demo import generate_demo_catalogs  # noqa: E402
from ingest.release import IngestOptions, ingest_release  # noqa: E402

CATALOG = "demo_survey"
RELEASE = "r1"
HIGHEST_ORDER = 10
MARGIN_ARCSEC = 10.0
#: hats' (and so hats-import's) zstd level; dac-lake may default to another one
HATS_COMPRESSION_LEVEL = 15
PIXEL_FILE = re.compile(r"Norder=(\d+)/Dir=\d+/Npix=(\d+)\.parquet$")

T = TypeVar("T")
PixelCounts = dict[tuple[int, int], int]


class BenchError(RuntimeError):
    """The two tools disagree, or the input is not what was asked for: no timing is worth reporting."""


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------


class PeakRss:
    """Samples the summed RSS of this process and all its descendants (dask workers are children), so the
    memory figure covers both tools alike; the peak, not the end value, is what decides whether an ingest
    fits on a machine."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-rss")

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._sample())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def cpu_seconds_tree() -> float:
    """User + system CPU seconds of this process and its live descendants (dask workers, a dac-lake child):
    on a shared, overloaded machine CPU time moves far less with the neighbours' load than wall time."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = child.cpu_times()
            total += ct.user + ct.system
    return total


@dataclass
class StageClock:
    """Records dac-lake's progress callbacks with timestamps, to split an ingest's wall time into its stages
    without a profiler (the expensive work runs in pool threads, which a plain cProfile would not see)."""

    t0: float = field(default_factory=time.perf_counter)
    events: list[tuple[float, str, int, int]] = field(default_factory=list)

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.events.append((time.perf_counter() - self.t0, stage, done, total))

    def segments(self, end: float) -> list[tuple[str, float]]:
        """(label, seconds) covering [0, end]: a stage from its first to its last callback, the gaps
        between stages labelled by their neighbours (e.g. the healpix/sort work between read and sort)."""
        spans: list[tuple[str, float, float]] = []
        for t, stage, _, _ in self.events:
            if spans and spans[-1][0] == stage:
                spans[-1] = (stage, spans[-1][1], t)
            else:
                spans.append((stage, t, t))
        out: list[tuple[str, float]] = []
        prev_label, prev_end = "start", 0.0
        for stage, first, last in spans:
            if first - prev_end > 1e-3:
                out.append((f"[{prev_label} -> {stage}]", first - prev_end))
            out.append((stage, last - first))
            prev_label, prev_end = stage, last
        out.append((f"[{prev_label} -> end]", max(0.0, end - prev_end)))
        return out


@dataclass
class Measurement:
    """One timed ingest."""

    label: str  # row of the result table
    config: str  # "catalog" or "catalog+margin"
    run: int
    seconds: float
    cpu: float
    peak_rss: int
    stages: list[tuple[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------------------


def prepare_input(data_dir: Path, rows: int, seed: int, n_files: int) -> list[Path]:
    """Generate the demo input once: generation of 10M rows takes longer than one ingest, and re-using
    the exact same files across runs and tools is what makes the timings comparable."""
    marker = data_dir / "bench_input.json"
    want = {"rows": rows, "seed": seed, "files": n_files}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        paths = sorted((data_dir / CATALOG).glob("part-*.parquet"))
        if sum(pq.read_metadata(p).num_rows for p in paths) == rows:
            print(f"input: re-using {len(paths)} file(s) under {data_dir / CATALOG}")
            return paths
    print(f"input: generating {rows:,} rows (seed {seed}, {n_files} files) under {data_dir} ...", flush=True)
    t = time.perf_counter()
    written = generate_demo_catalogs(data_dir, n_rows=rows, seed=seed, n_files=n_files)
    marker.write_text(json.dumps(want))
    print(f"input: generated in {time.perf_counter() - t:.1f} s")
    return sorted(written[CATALOG])


# ---------------------------------------------------------------------------------------------------------
# the two tools
# ---------------------------------------------------------------------------------------------------------


def run_dac_lake(
    out: Path, inputs: list[Path], threshold: int, threads: int, margin: float, level: int | None = None
) -> tuple[float, float, Path, StageClock]:
    """The whole `ingest_release` call (read, check, partition, write catalog/margin/index, strict hats
    validation, publish) as the CLI runs it, minus lsdb's extra validation (hats' strict one stays).
    `level` is the zstd level (None: dac-lake's default). Returns wall seconds, CPU seconds of this
    process, the release directory and the stage clock."""
    lake = Lake(LakeStorage(str(out / "lake")))
    lake.init()
    options = IngestOptions(
        max_rows_per_partition=threshold,
        highest_order=HIGHEST_ORDER,
        margin_arcsec=margin,
        threads=threads,
        validate_with_lsdb=False,
    )
    if level is not None:
        if "compression_level" not in {f.name for f in fields(IngestOptions)}:
            raise BenchError(
                "this dac-lake has no IngestOptions.compression_level: pass --compression-level -1"
            )
        options.compression_level = level  # type: ignore[attr-defined]
    definition = load_definition(CATALOG)
    clock = StageClock()
    cpu0 = time.process_time()
    t = time.perf_counter()
    clock.t0 = t
    ingest_release(lake, CATALOG, RELEASE, [str(p) for p in inputs], definition, options, progress=clock)
    seconds = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    return seconds, cpu, out / "lake" / layout.release_prefix(CATALOG, RELEASE), clock


def dac_lake_child(spec_json: str) -> None:
    """Entry point of the child process (hidden `--dac-child`): one ingest, results as JSON on stdout.

    Every `dac ingest release` starts in a fresh process, with a cold allocator and no imports done; an
    ingest that re-used the memory arena of a previous one in the same process could be flattered (in a
    first version of this script, ingests in one process looked order-dependent), so each dac-lake
    ingest gets its own interpreter here."""
    spec = json.loads(spec_json)
    seconds, cpu, _, clock = run_dac_lake(
        Path(spec["out"]),
        [Path(p) for p in spec["inputs"]],
        spec["threshold"],
        spec["threads"],
        spec["margin"],
        spec.get("level"),
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    doc = {
        "seconds": seconds,
        "cpu": cpu,
        "process_cpu": usage.ru_utime + usage.ru_stime,
        "stages": clock.segments(seconds),
    }
    print(json.dumps(doc), flush=True)


@dataclass
class DacTimes:
    """dac-lake's wall/CPU seconds: the `ingest_release` call alone, and the whole process (interpreter
    start, imports, ingest, exit) as a CLI user experiences it."""

    seconds: float
    cpu: float
    process_seconds: float
    process_cpu: float
    stages: list[tuple[str, float]]


def run_dac_lake_process(
    out: Path, inputs: list[Path], threshold: int, threads: int, margin: float, level: int | None
) -> DacTimes:
    """One dac-lake ingest in a fresh Python process (see `dac_lake_child`)."""
    spec = {
        "out": str(out),
        "inputs": [str(p) for p in inputs],
        "threshold": threshold,
        "threads": threads,
        "margin": margin,
        "level": level,
    }
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--dac-child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    process_seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise BenchError(f"dac-lake ingest failed (exit {proc.returncode}); its stderr is above")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return DacTimes(
        doc["seconds"],
        doc["cpu"],
        process_seconds,
        doc["process_cpu"],
        [(name, secs) for name, secs in doc["stages"]],
    )


@dataclass
class HatsTimes:
    """hats-import's wall times, split so that both "pipeline only" and "with Client start" can be told."""

    client_start: float
    catalog: float
    margin: float | None
    client_close: float
    client_start_cpu: float
    catalog_cpu: float
    margin_cpu: float | None


def run_hats_import(
    out: Path,
    inputs: list[Path],
    threshold: int,
    workers: int,
    with_margin: bool,
    memory_limit: str,
    level: int | None = None,
) -> HatsTimes:
    """hats-import's catalog pipeline (and margin pipeline) on one fresh local dask cluster of `workers`
    single-threaded workers: the same core count as dac-lake's thread pool. `level` overrides hats' zstd
    level (None: hats' default)."""
    from dask.distributed import Client
    from hats_import.catalog.arguments import ImportArguments
    from hats_import.margin_cache.margin_cache_arguments import MarginCacheArguments
    from hats_import.pipeline import pipeline_with_client

    write_kwargs = {"compression_level": level} if level is not None else None
    args = ImportArguments(
        output_artifact_name=CATALOG,
        output_path=str(out),
        input_file_list=[str(p) for p in inputs],
        file_reader="parquet",
        ra_column="ra",
        dec_column="dec",
        pixel_threshold=threshold,
        highest_healpix_order=HIGHEST_ORDER,
        progress_bar=False,
        resume=False,
        tmp_dir=str(out / "tmp"),
        dask_tmp=str(out / "dask_tmp"),
        write_table_kwargs=write_kwargs,
    )
    cpu0 = cpu_seconds_tree()
    t = time.perf_counter()
    client = Client(
        n_workers=workers,
        threads_per_worker=1,
        memory_limit=memory_limit,
        local_directory=str(out / "dask_tmp"),
    )
    client_start = time.perf_counter() - t
    cpu1 = cpu_seconds_tree()  # workers are alive until close: their CPU is read before it
    try:
        t = time.perf_counter()
        pipeline_with_client(args, client)
        catalog = time.perf_counter() - t
        cpu2 = cpu_seconds_tree()
        margin = margin_cpu = None
        if with_margin:
            margin_args = MarginCacheArguments(
                input_catalog_path=str(out / CATALOG),
                output_path=str(out),
                output_artifact_name=layout.margin_name(CATALOG, MARGIN_ARCSEC),
                margin_threshold=MARGIN_ARCSEC,
                progress_bar=False,
                resume=False,
                tmp_dir=str(out / "tmp"),
                dask_tmp=str(out / "dask_tmp"),
                write_table_kwargs=write_kwargs,
            )
            t = time.perf_counter()
            pipeline_with_client(margin_args, client)
            margin = time.perf_counter() - t
            margin_cpu = cpu_seconds_tree() - cpu2
    finally:
        t = time.perf_counter()
        client.close()  # also shuts down the LocalCluster the Client started
        client_close = time.perf_counter() - t
    return HatsTimes(client_start, catalog, margin, client_close, cpu1 - cpu0, cpu2 - cpu1, margin_cpu)


# ---------------------------------------------------------------------------------------------------------
# equivalence
# ---------------------------------------------------------------------------------------------------------


def pixel_counts(catalog_dir: Path) -> PixelCounts:
    """{(order, pixel): rows} from the Parquet footers of a HATS catalog's partition files; cross-checked
    against its partition_info.csv so that a stray or missing file is caught too."""
    counts: PixelCounts = {}
    for path in sorted((catalog_dir / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet")):
        m = PIXEL_FILE.search(path.as_posix())
        if m is None:
            raise BenchError(f"unexpected partition file name {path}")
        key = (int(m.group(1)), int(m.group(2)))
        counts[key] = counts.get(key, 0) + pq.read_metadata(path).num_rows
    info = catalog_dir / "partition_info.csv"
    if info.is_file():
        listed = {
            (int(order), int(pixel))
            for order, pixel in (line.split(",")[:2] for line in info.read_text().split()[1:] if line)
        }
        if listed != set(counts):
            raise BenchError(
                f"{catalog_dir}: partition_info.csv lists {len(listed)} pixels, the dataset holds "
                f"{len(counts)} files ({len(listed ^ set(counts))} differ)"
            )
    if not counts:
        raise BenchError(f"{catalog_dir}: no partition files")
    return counts


def dataset_mb(catalog_dir: Path) -> float:
    """Size of a catalog's partition files: shows at a glance whether both tools compressed alike."""
    files = (catalog_dir / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet")
    return sum(p.stat().st_size for p in files) / 1e6


def compare(what: str, dac: PixelCounts, hats: PixelCounts, expected_rows: int | None) -> str:
    """Raise unless both tools wrote the same pixels with the same row counts (and the expected total)."""
    problems = []
    only_dac, only_hats = sorted(set(dac) - set(hats)), sorted(set(hats) - set(dac))
    if only_dac:
        problems.append(f"{len(only_dac)} pixel(s) only in dac-lake, e.g. {only_dac[:5]}")
    if only_hats:
        problems.append(f"{len(only_hats)} pixel(s) only in hats-import, e.g. {only_hats[:5]}")
    differ = [(k, dac[k], hats[k]) for k in sorted(set(dac) & set(hats)) if dac[k] != hats[k]]
    if differ:
        problems.append(f"{len(differ)} pixel(s) with other row counts (pixel, dac, hats): {differ[:5]}")
    total_dac, total_hats = sum(dac.values()), sum(hats.values())
    if total_dac != total_hats:
        problems.append(f"total rows dac-lake {total_dac:,} != hats-import {total_hats:,}")
    if expected_rows is not None and total_dac != expected_rows:
        problems.append(f"total rows {total_dac:,} != input rows {expected_rows:,}")
    if problems:
        raise BenchError(f"{what}: the outputs differ:\n  " + "\n  ".join(problems))
    orders = sorted({o for o, _ in dac})
    return f"{what}: identical, {len(dac)} pixels (orders {orders}), {total_dac:,} rows"


# ---------------------------------------------------------------------------------------------------------
# profiling
# ---------------------------------------------------------------------------------------------------------


def profile_all_threads(fn: Callable[[], T]) -> tuple[T, pstats.Stats, pstats.Stats]:
    """Run `fn` under cProfile in the calling thread *and* in every thread it starts (dac-lake does its
    reading and writing in a thread pool, which a plain cProfile never sees). Returns fn's result, the
    merged statistics of all threads (CPU-like: parallel threads add up) and the calling thread's alone."""
    worker_profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def first_call(frame: Any, event: str, arg: Any) -> None:
        prof = cProfile.Profile()
        with lock:
            worker_profiles.append(prof)
        prof.enable()  # replaces this hook for the new thread

    main = cProfile.Profile()
    threading.setprofile(first_call)
    try:
        main.enable()
        try:
            result = fn()
        finally:
            main.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    main_stats = pstats.Stats(main)
    merged = pstats.Stats(main)
    for prof in worker_profiles:
        with contextlib.suppress(TypeError):  # a thread that never made a profiled call has no stats
            merged.add(prof)
    return result, merged, main_stats


def print_stats(title: str, stats: pstats.Stats, sort: str, limit: int) -> None:
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(limit)
    body = buf.getvalue()
    start = body.find("   ncalls")
    print(f"\n--- {title} (top {limit} by {sort}) ---")
    print(body[start:] if start >= 0 else body)


# ---------------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def scratch(path: Path, keep: bool) -> Iterator[Path]:
    """A fresh output directory per ingest, removed after the checks (a 10M-row catalog is ~1 GB)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def fmt_rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:>12,.0f}" if seconds > 0 else f"{'-':>12}"


LABELS = {
    "dac": "dac-lake ingest_release call",
    "dac+proc": "dac-lake incl. process start/imports",
    "hats": "hats-import pipeline only",
    "hats+client": "hats-import incl. Client start",
}


def summarize(results: list[Measurement], rows: int, with_margin: bool, workers: int) -> None:
    """The result table, then the throughput ratios (from median times, so one noisy run cannot skew
    them)."""
    configs = ["catalog", "catalog+margin"] if with_margin else ["catalog"]
    med_s: dict[tuple[str, str], float] = {}
    med_cpu: dict[tuple[str, str], float] = {}
    print(
        f"\n=== results: {rows:,} input rows; {workers} cores per tool (dac-lake threads={workers}; "
        f"hats-import {workers} dask workers x 1 thread) ==="
    )
    head = (
        f"{'config':<15} {'tool':<37} {'runs':>4} {'median s':>9} {'min s':>8} {'rows/s':>12} "
        f"{'CPU s':>7} {'peak RSS':>9}"
    )
    print(head)
    print("-" * len(head))
    for config in configs:
        for key, label in LABELS.items():
            ms = [m for m in results if m.config == config and m.label == key]
            if not ms:
                continue
            secs = [m.seconds for m in ms]
            med_s[(config, key)] = statistics.median(secs)
            med_cpu[(config, key)] = statistics.median(m.cpu for m in ms)
            peak = max(m.peak_rss for m in ms) / 2**30
            print(
                f"{config:<15} {label:<37} {len(ms):>4} {med_s[(config, key)]:>9.1f} {min(secs):>8.1f} "
                f"{fmt_rate(rows, med_s[(config, key)])} {med_cpu[(config, key)]:>7.1f} {peak:>7.1f}GB"
            )
    print("\nratio dac-lake rows/s / hats-import rows/s (median runs; > 1 means dac-lake is faster):")
    for config in configs:
        wall = med_s[(config, "hats")] / med_s[(config, "dac")]
        wall_all = med_s[(config, "hats+client")] / med_s[(config, "dac+proc")]
        cpu = med_cpu[(config, "hats")] / med_cpu[(config, "dac")]
        cpu_all = med_cpu[(config, "hats+client")] / med_cpu[(config, "dac+proc")]
        print(
            f"  {config:<15} wall: {wall:5.2f}x call vs pipeline, {wall_all:5.2f}x incl. start-up   "
            f"CPU: {cpu:5.2f}x, {cpu_all:5.2f}x"
        )
    print(
        "(rows/s = input rows / median wall s; CPU s = user+system of the process tree, the less\n"
        " load-sensitive figure on a shared machine; peak RSS sums this process and its children)"
    )


def print_stage_medians(results: list[Measurement]) -> None:
    """Median wall seconds per dac-lake stage: where an ingest's time goes, without a profiler."""
    for config in ("catalog", "catalog+margin"):
        ms = [m for m in results if m.label == "dac" and m.config == config and m.stages]
        if not ms:
            continue
        print(f"\ndac-lake stages, {config} (median wall s over {len(ms)} run(s)):")
        by_name: dict[str, list[float]] = {}  # insertion order = stage order, from the fullest run first
        for m in sorted(ms, key=lambda m: -len(m.stages)):
            for name, secs in m.stages:
                by_name.setdefault(name, []).append(secs)
        for name, vals in by_name.items():
            vals += [0.0] * (len(ms) - len(vals))  # a gap too short to record in some runs
            print(f"  {name:<34} {statistics.median(vals):7.2f}")


class Bench:
    """One benchmark session: the inputs, where outputs go, and every measurement so far."""

    def __init__(self, args: argparse.Namespace, inputs: list[Path], work: Path):
        self.args = args
        self.inputs = inputs
        self.work = work
        self.results: list[Measurement] = []
        #: one zstd level for both tools (like with like), or None: each tool's own default
        self.level: int | None = None if args.compression_level < 0 else args.compression_level

    def dac_round(self, run: int, config: str, margin: float) -> tuple[PixelCounts, PixelCounts | None]:
        """One timed dac-lake ingest (own process); returns (catalog, margin) pixel counts of its output."""
        a = self.args
        load = os.getloadavg()[0]
        with scratch(self.work / f"run{run}" / f"dac_{config}", a.keep) as out:
            with PeakRss() as rss:
                t = run_dac_lake_process(out, self.inputs, a.threshold, a.workers, margin, self.level)
            add = self.results.append
            add(Measurement("dac", config, run, t.seconds, t.cpu, rss.peak, t.stages))
            add(Measurement("dac+proc", config, run, t.process_seconds, t.process_cpu, rss.peak))
            release_dir = out / "lake" / layout.release_prefix(CATALOG, RELEASE)
            print(
                f"  run {run} dac-lake {config:<15} {t.seconds:7.1f} s ({t.process_seconds:.1f} s with "
                f"process start), CPU {t.cpu:.1f} s; catalog {dataset_mb(release_dir / CATALOG):.0f} MB; "
                f"load avg {load:.1f}",
                flush=True,
            )
            cat = pixel_counts(release_dir / CATALOG)
            marg = pixel_counts(release_dir / layout.margin_name(CATALOG, margin)) if margin else None
            return cat, marg

    def hats_round(self, run: int) -> tuple[PixelCounts, PixelCounts | None]:
        """One timed hats-import session (Client, catalog pipeline, margin pipeline); returns pixel counts."""
        a = self.args
        load = os.getloadavg()[0]
        with scratch(self.work / f"run{run}" / "hats", a.keep) as out:
            with PeakRss() as rss:
                t = run_hats_import(
                    out, self.inputs, a.threshold, a.workers, a.with_margin, a.memory_limit, self.level
                )
            add = self.results.append
            add(Measurement("hats", "catalog", run, t.catalog, t.catalog_cpu, rss.peak))
            add(
                Measurement(
                    "hats+client",
                    "catalog",
                    run,
                    t.client_start + t.catalog,
                    t.client_start_cpu + t.catalog_cpu,
                    rss.peak,
                )
            )
            line = f"  run {run} hats-import: Client start {t.client_start:.1f} s, catalog {t.catalog:.1f} s"
            cpu_line = f"CPU {t.client_start_cpu:.1f} + {t.catalog_cpu:.1f}"
            if t.margin is not None and t.margin_cpu is not None:
                both, both_cpu = t.catalog + t.margin, t.catalog_cpu + t.margin_cpu
                add(Measurement("hats", "catalog+margin", run, both, both_cpu, rss.peak))
                add(
                    Measurement(
                        "hats+client",
                        "catalog+margin",
                        run,
                        t.client_start + both,
                        t.client_start_cpu + both_cpu,
                        rss.peak,
                    )
                )
                line += f", margin {t.margin:.1f} s"
                cpu_line += f" + {t.margin_cpu:.1f}"
            print(
                f"{line}; {cpu_line} s (Client close {t.client_close:.1f} s, not counted); "
                f"catalog {dataset_mb(out / CATALOG):.0f} MB; load avg {load:.1f}",
                flush=True,
            )
            margin_dir = out / layout.margin_name(CATALOG, MARGIN_ARCSEC)
            return pixel_counts(out / CATALOG), pixel_counts(margin_dir) if a.with_margin else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="input rows (default 1e7)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds per tool (default 3)")
    parser.add_argument("--threshold", type=int, default=1_000_000, help="max rows per partition")
    parser.add_argument(
        "--workers", type=int, default=2, help="cores per tool: dac-lake threads / dask workers"
    )
    parser.add_argument("--with-margin", action="store_true", help="also time catalog + 10 arcsec margin")
    parser.add_argument("--data-dir", type=Path, help="input cache (default: a directory under $TMPDIR)")
    parser.add_argument("--work-dir", type=Path, help="where outputs go (default: a fresh temp dir)")
    parser.add_argument("--files", type=int, default=8, help="input Parquet files (default 8)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--memory-limit", default="8GB", help="per dask worker (default 8GB)")
    parser.add_argument(
        "--compression-level",
        type=int,
        default=HATS_COMPRESSION_LEVEL,
        help=f"zstd level for BOTH tools (default: hats' {HATS_COMPRESSION_LEVEL}); -1: each tool's default",
    )
    parser.add_argument("--keep", action="store_true", help="keep every output directory")
    parser.add_argument(
        "--profile", action="store_true", help="afterwards, one extra dac-lake ingest under cProfile"
    )
    parser.add_argument("--dac-child", metavar="JSON", help=argparse.SUPPRESS)  # see dac_lake_child
    args = parser.parse_args(argv)
    if args.dac_child:
        dac_lake_child(args.dac_child)
        return 0

    logging.basicConfig(level=logging.WARNING)
    # dask's INFO chatter (scheduler, nannies) would bury the results; workers inherit the environment
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    warnings.filterwarnings("ignore", module="distributed")
    warnings.filterwarnings("ignore", message="Computing partitions from catalog parquet files")
    data_dir = args.data_dir or Path(tempfile.gettempdir()) / f"dac_bench_ingest_{args.rows}_{args.seed}"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dac_bench_ingest_work_"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_input(data_dir, args.rows, args.seed, args.files)
    in_bytes = sum(p.stat().st_size for p in inputs)
    print(
        f"input: {args.rows:,} rows, {len(inputs)} files, {in_bytes / 1e6:,.0f} MB; threshold "
        f"{args.threshold:,}; highest order {HIGHEST_ORDER}; cores per tool {args.workers} "
        f"(os.cpu_count()={os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}); zstd level "
        + (f"{args.compression_level} for both" if args.compression_level >= 0 else "each tool's default")
    )
    configs = [("catalog", 0.0)] + ([("catalog+margin", MARGIN_ARCSEC)] if args.with_margin else [])
    bench = Bench(args, inputs, work)
    checks: set[str] = set()
    for run in range(args.runs):
        # alternate which tool goes first: on a shared machine, neither should always get the quiet slot
        if run % 2 == 0:
            dac = {config: bench.dac_round(run, config, margin) for config, margin in configs}
            hats = bench.hats_round(run)
        else:
            hats = bench.hats_round(run)
            dac = {config: bench.dac_round(run, config, margin) for config, margin in configs}
        # every round, both tools' outputs must agree
        for config, (cat, marg) in dac.items():
            checks.add(compare(f"catalog ({config} run)", cat, hats[0], args.rows))
            if marg is not None and hats[1] is not None:
                checks.add(compare(f"margin cache ({MARGIN_ARCSEC:g} arcsec)", marg, hats[1], None))
    results = bench.results
    print("\nequivalence (checked every run):")
    for line in sorted(checks):
        print(f"  {line}")

    summarize(results, args.rows, args.with_margin, args.workers)
    print_stage_medians(results)
    kept = "" if args.keep else " (removed)"
    print(f"\nload avg now {os.getloadavg()[0]:.2f}; outputs under {work}{kept}")

    if args.profile:
        config, margin = configs[-1]
        print(
            f"\nprofiling one dac-lake ingest ({config}, threads={args.workers}, in this process) ...",
            flush=True,
        )
        with scratch(work / "profile", args.keep) as out:
            (seconds, _, _, clock), merged, main_stats = profile_all_threads(
                lambda: run_dac_lake(out, inputs, args.threshold, args.workers, margin, bench.level)
            )
        print(f"profiled ingest: {seconds:.1f} s wall (profiling overhead included); stages:")
        for name, secs in clock.segments(seconds):
            print(f"  {name:<34} {secs:7.2f}")
        print_stats("calling thread, cumulative", main_stats, "cumulative", 30)
        print_stats("all threads merged, own time (lock acquire = idle pool threads)", merged, "tottime", 30)
        print_stats("all threads merged, cumulative", merged, "cumulative", 40)
    if not args.keep and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        sys.exit(1)
