"""`dac ingest alerts STREAM` and `dac alerts compact|gc|status`: the operator's side of the alert broker.

Kept out of `dac_lake/cli.py` so the core CLI does not import the alert stack (numba, confluent-kafka)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from dac_lake.cli_common import LakeOpt, _fail, _lake

log = logging.getLogger("dac.alerts")

alerts_app = typer.Typer(help="Alert streams: status, compaction, garbage collection", no_args_is_help=True)

class KafkaMatchProducer:
    """`on_match` hook: produce a filter's matches to its Kafka topic, one JSON message per row keyed by
    object_id (Lasair's filter streams). Delivery is flushed per batch; a failure is reported by the broker
    in the filter's run, and the matches stay stored in the lake either way."""

    def __init__(self, bootstrap: str, config: dict[str, Any] | None = None):
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **(config or {})})

    def __call__(self, flt: Any, table: Any) -> None:
        topic = getattr(flt, "kafka_topic", None)
        if not topic:
            return
        errors: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        for row in table.to_pylist():
            key = row.get("object_id")
            self.producer.produce(
                topic,
                json.dumps(row, default=str).encode(),
                key=None if key is None else str(key).encode(),
                on_delivery=delivered,
            )
            self.producer.poll(0)
        left = self.producer.flush(30)
        if left or errors:
            raise RuntimeError(f"{left} messages not delivered to {topic}; errors: {errors[:3]}")


def ingest_alerts(
    stream: Annotated[str, typer.Argument(help="stream name (the TAP schema of its tables), e.g. ztf")],
    files: Annotated[
        list[str] | None, typer.Argument(help="Avro files or folders to replay (instead of --kafka)")
    ] = None,
    lake: LakeOpt = None,
    kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap servers host:port")] = None,
    topic: Annotated[list[str] | None, typer.Option(help="Kafka topic (repeat for several)")] = None,
    group: Annotated[str, typer.Option(help="Kafka consumer group")] = "dac-lake",
    kafka_config: Annotated[
        list[str] | None, typer.Option(help="extra consumer setting KEY=VALUE (repeat)")
    ] = None,
    idle_exit: Annotated[
        float | None, typer.Option(help="Kafka: stop after this many seconds without a message")
    ] = None,
    order: Annotated[int, typer.Option(help="HEALPix order of the stream's partitions (new streams)")] = 3,
    groups: Annotated[
        list[str] | None, typer.Option("--group-access", help="groups that may read the stream (new streams)")
    ] = None,
    max_alerts: Annotated[int, typer.Option(help="alerts per micro-batch (at most)")] = 5000,
    max_wait: Annotated[float, typer.Option(help="seconds to wait to fill a batch (latency bound)")] = 1.0,
    dead_letter: Annotated[
        str | None, typer.Option(help="folder for refused packets (default: ./dead-letters/STREAM)")
    ] = None,
    broker: Annotated[bool, typer.Option(help="run watchlists, watchmaps and filters on each batch")] = True,
    context: Annotated[bool, typer.Option(help="cross-match new objects with context catalogs")] = True,
    produce: Annotated[
        str | None, typer.Option(help="Kafka bootstrap to produce filter matches to their topics")
    ] = None,
    report: Annotated[str | None, typer.Option(help="write the run's figures as JSON to this file")] = None,
    progress: Annotated[bool, typer.Option(help="a progress bar on a terminal")] = True,
) -> None:
    """Ingest alert packets (Kafka or Avro files) into STREAM: commit micro-batches, run the broker."""
    from dac_lake.alerts import AlertLakeError
    from dac_lake.lake import LakeError
    from dac_lake.storage import StorageError
    from ingest.alerts.pipeline import AlertIngest, kafka_start_offsets

    if bool(files) == bool(kafka):
        raise _fail("give either FILES to replay or --kafka with --topic")
    if kafka and not topic:
        raise _fail("--kafka needs at least one --topic")
    try:
        the_lake = _lake(lake)
        the_lake.check()
        on_match = KafkaMatchProducer(produce) if produce else None
        the_broker = None
        if broker:
            from dac_lake.alerts_broker import AlertBroker

            the_broker = AlertBroker(the_lake, stream, on_match=on_match)
        matcher = _context_matcher(the_lake, stream) if context else None
        pipeline = AlertIngest(
            the_lake,
            stream,
            dead_letter_dir=dead_letter or Path("dead-letters") / stream,
            order=order,
            groups=groups,
            broker=the_broker,
            context=matcher,
        )
        pipeline.warm_up()
        if kafka:
            from ingest.alerts.sources import KafkaSource

            extra = dict(kv.split("=", 1) for kv in kafka_config or [])
            source = KafkaSource(
                kafka,
                topic or [],
                group,
                start_from=kafka_start_offsets(pipeline.writer.source_position()),
                config=extra,
            )
            batches = source.batches(max_alerts=max_alerts, max_wait_s=max_wait, stop_after_idle_s=idle_exit)
        else:
            source = pipeline.file_source(files or [])
            batches = source.batches(max_alerts=max_alerts, max_wait_s=max_wait)
    except (LakeError, StorageError, AlertLakeError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bar = _bar(progress)

    def on_batch(outcome: Any) -> None:
        c = outcome.commit
        if bar is not None:
            bar.update(outcome.packets)
        log.info(
            "batch #%s: %d packets, %d dead, %s new detections, %d new objects, latency %.2f s%s",
            c.seq if c else "-", outcome.packets, outcome.dead, c.rows_new.get("detections", 0) if c else 0,
            c.objects_new if c else 0, outcome.latency_s, " (already committed)" if c and c.skipped else "",
        )  # fmt: skip

    def until_stopped():
        for batch in batches:
            yield batch
            if stop.is_set():
                return

    try:
        with source:
            result = pipeline.run(source, batches=until_stopped(), on_batch=on_batch)
    except (LakeError, StorageError, AlertLakeError) as exc:
        raise _fail(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    for line in result.lines():
        typer.echo(line)
    if report:
        Path(report).write_text(json.dumps(result.as_dict(), indent=1))


def _bar(enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc="alerts", unit=" alerts", dynamic_ncols=True)


def _context_matcher(lake: Any, stream: str) -> Any:
    """The context matcher if the lake has context catalogs (else None: nothing to match)."""
    try:
        from dac_lake.alerts.context import ContextMatcher
    except ImportError:  # pragma: no cover - older installs
        return None
    matcher = ContextMatcher(lake, stream)
    if not matcher.catalogs():
        log.info("no context catalogs in the lake: new objects are not context-matched")
        return None
    return matcher


@alerts_app.command("status")
def alerts_status(stream: str, lake: LakeOpt = None) -> None:
    """The stream's newest snapshot: rows and files per table, resume position, broker progress."""
    from dac_lake.alerts import layout as alayout
    from dac_lake.alerts.writer import AlertLake
    from ingest.alerts.pipeline import PROGRESS_FILE

    the_lake = _lake(lake)
    writer = AlertLake(the_lake.storage, stream)
    if not the_lake.storage.exists(alayout.stream_file(stream)):
        raise _fail(f"no alert stream {stream!r} in {the_lake.storage.url}")
    snap = writer.snapshot()
    typer.echo(
        f"stream {stream}: snapshot #{snap.seq} ({snap.operation}, {snap.created_at}), order {snap.order}"
    )
    for table in alayout.TABLES:
        state = snap.table(table)
        orders = state.orders()
        mixed = f"  orders {orders[0]}-{orders[-1]}" if len(orders) > 1 else ""
        typer.echo(
            f"  {table:13s} {state.rows:>12,} rows  {state.n_files:>7,} files  {len(state.pixels):>6,} "
            f"partitions{mixed}"
        )
    typer.echo(f"  resume from: {json.dumps(snap.source_position)}")
    try:
        progress = json.loads(the_lake.storage.read_text(f"{alayout.stream_prefix(stream)}/{PROGRESS_FILE}"))
        typer.echo(f"  broker done up to snapshot #{progress['seq']} ({progress['time']})")
    except FileNotFoundError:
        typer.echo("  broker: no batch processed yet")


@alerts_app.command("compact")
def alerts_compact(
    stream: str,
    lake: LakeOpt = None,
    min_files: Annotated[int, typer.Option(help="compact a partition holding at least this many files")] = 8,
    crowded_rows: Annotated[
        int, typer.Option(help="split a partition holding more rows than this into its 4 children")
    ] = 1_000_000,
    split: Annotated[bool, typer.Option(help="split crowded partitions (else only report them)")] = True,
    max_order: Annotated[int, typer.Option(help="the finest HEALPix order a split may reach")] = 10,
) -> None:
    """Merge each partition's small batch files into one and split crowded partitions into finer ones
    (readers keep reading; one snapshot)."""
    from dac_lake.alerts.writer import AlertLake

    storage = _lake(lake).storage
    try:
        r = AlertLake(storage, stream).compact(
            min_files=min_files, crowded_rows=crowded_rows, split=split, max_order=max_order
        )
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    if r.seq is None:
        typer.echo(f"{stream}: no table needs compacting")
    else:
        typer.echo(
            f"{stream}: snapshot #{r.seq}: {r.files_before} files -> {r.files_after} ({r.rows:,} rows, "
            f"partitions merged per table {r.pixels}, {len(r.splits)} split) in {r.seconds:.1f} s"
        )
    for sp in r.splits:
        typer.echo(f"  split: {sp.line()}")
    for table, (order, pixel), rows in r.crowded:
        typer.echo(f"  crowded: {table} partition {order}/{pixel} holds {rows:,} rows (not split)")
    from dac_lake.alerts.context import compact_context

    merged = compact_context(storage, stream)
    if merged:
        typer.echo(f"  context: merged the files of {len(merged)} pixels")


@alerts_app.command("gc")
def alerts_gc(
    stream: str,
    lake: LakeOpt = None,
    grace: Annotated[
        float, typer.Option(help="seconds an unreferenced file is kept (running readers)")
    ] = 3600,
    keep_snapshots: Annotated[int, typer.Option(help="newest snapshots kept")] = 10,
    dry_run: Annotated[bool, typer.Option(help="only list what would go")] = False,
) -> None:
    """Delete files no kept snapshot references, and old snapshots."""
    from dac_lake.alerts.writer import AlertLake

    try:
        r = AlertLake(_lake(lake).storage, stream).gc(grace, keep_snapshots, dry_run)
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{stream}: {verb} {len(r.removed_files)} files and {len(r.removed_snapshots)} snapshots; "
               f"kept snapshots {r.kept_snapshots[:5]}{' ...' if len(r.kept_snapshots) > 5 else ''}"
    )  # fmt: skip
