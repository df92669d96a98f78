"""The `dac` command: lake administration, releases, ingest, the demo.

Every command takes `--lake URL` (else the configured lake, see `dac config show`). Errors an operator can
fix are printed as one line `error: ...` with exit status 1, not a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from dac_lake.cli_common import LakeOpt, _fail, _lake
from dac_lake.settings import load_settings
from ingest.alerts.cli import alerts_app, ingest_alerts

app = typer.Typer(help="dac-lake: a Data Access Centre on a HATS lake", no_args_is_help=True)
config_app = typer.Typer(help="Settings", no_args_is_help=True)
lake_app = typer.Typer(help="The lake itself", no_args_is_help=True)
release_app = typer.Typer(help="Releases of catalogs", no_args_is_help=True)
ingest_app = typer.Typer(help="Load data into the lake", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(lake_app, name="lake")
app.add_typer(release_app, name="release")
app.add_typer(ingest_app, name="ingest")
app.add_typer(alerts_app, name="alerts")
ingest_app.command("alerts")(ingest_alerts)

log = logging.getLogger("dac")


def _setup_logging(verbose: bool = False) -> None:
    # our own loggers at INFO; libraries (hats logs its validation steps on the root logger) at WARNING
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for ours in ("dac", "dac_lake", "ingest", "api"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _known_errors() -> tuple[type[BaseException], ...]:
    from dac_lake.catalog_def import DefinitionError
    from dac_lake.lake import LakeError
    from dac_lake.storage import StorageError
    from ingest.readers import InputError

    return (LakeError, InputError, DefinitionError, StorageError, ValueError, FileNotFoundError)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    _setup_logging(verbose)


# ---------------------------------------------------------------------- config
@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (secrets masked) and where they came from."""
    typer.echo(json.dumps(load_settings().masked(), indent=2))


# ---------------------------------------------------------------------- lake
@lake_app.command("init")
def lake_init(lake: LakeOpt = None) -> None:
    """Create the lake (bucket or folder, and lake.json). Safe to run twice."""
    try:
        the_lake = _lake(lake)
        created = the_lake.init()
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{'created' if created else 'already a lake:'} {the_lake.storage.url}")


@lake_app.command("gc")
def lake_gc(
    lake: LakeOpt = None,
    grace: Annotated[
        float, typer.Option(help="seconds without heartbeat before a remote ingest is dead")
    ] = 3600,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would be removed")] = False,
) -> None:
    """Remove incomplete, unreferenced release prefixes left by crashed ingests."""
    try:
        the_lake = _lake(lake)
        the_lake.check()
        removed = the_lake.gc(grace_seconds=grace, dry_run=dry_run)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        typer.echo(f"{verb} {item}")
    typer.echo(f"{verb} {len(removed)} incomplete release(s)")


# ---------------------------------------------------------------------- releases
@release_app.command("list")
def release_list(catalog: Annotated[str | None, typer.Argument()] = None, lake: LakeOpt = None) -> None:
    """List catalogs and their releases; `*` marks the current (published) one."""
    try:
        the_lake = _lake(lake)
        the_lake.check()
        infos = the_lake.list_releases(catalog)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    if not infos:
        typer.echo("no releases")
        return
    typer.echo(f"  {'catalog':<20} {'release':<16} {'state':<11} {'rows':>14}  created")
    for info in infos:
        rows = info.manifest.get("rows")
        rows_text = f"{rows:,}" if rows is not None else "-"
        created = info.manifest.get("created_at") or info.marker.get("started_at", "-")
        mark = "*" if info.current else " "
        typer.echo(
            f"{mark} {info.catalog:<20} {info.release:<16} {info.state:<11} {rows_text:>14}  {created}"
        )


@release_app.command("show")
def release_show(
    catalog: str, release: Annotated[str | None, typer.Argument()] = None, lake: LakeOpt = None
) -> None:
    """Show a release (default: the current one): manifest, state and publication history."""
    try:
        the_lake = _lake(lake)
        the_lake.check()
        release = release or the_lake.current_release(catalog)
        if release is None:
            raise _fail(f"catalog {catalog!r} has no published release")
        info = the_lake.release_info(catalog, release)
        pointer = the_lake.current_pointer(catalog)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    manifest = dict(info.manifest)
    partitions = manifest.pop("partitions", [])
    manifest.pop("margin_partitions", None)
    out = {
        "catalog": catalog,
        "release": release,
        "state": info.state,
        "current": info.current,
        "url": the_lake.storage.url_of(f"catalogs/{catalog}/releases/{release}"),
        "pointer": pointer.__dict__ if pointer else None,
        "partitions": len(partitions),
        "manifest": manifest,
    }
    if info.marker:
        out["incomplete_marker"] = info.marker
    typer.echo(json.dumps(out, indent=2))


@release_app.command("publish")
def release_publish(catalog: str, release: str, lake: LakeOpt = None) -> None:
    """Make RELEASE the current release of CATALOG (also how to roll back)."""
    try:
        pointer = _lake(lake).publish(catalog, release)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{catalog}: current release is now {release} (pointer #{pointer.seq}, was {pointer.previous})"
    )


@release_app.command("drop")
def release_drop(
    catalog: str,
    release: str,
    lake: LakeOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> None:
    """Delete a release that is not current."""
    if not yes:
        typer.confirm(f"delete {catalog}/{release} for good?", abort=True)
    try:
        _lake(lake).drop(catalog, release)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"dropped {catalog}/{release}")


# ---------------------------------------------------------------------- ingest
@ingest_app.command("release")
def ingest_release_cmd(
    catalog: str,
    release: str,
    inputs: Annotated[list[str], typer.Argument(help="files, folders or globs (local or s3://)")],
    lake: LakeOpt = None,
    definition: Annotated[
        str | None, typer.Option(help="catalog definition YAML (default catalogs/<CATALOG>.yaml)")
    ] = None,
    ra_column: Annotated[str | None, typer.Option(help="RA column (default: from the definition)")] = None,
    dec_column: Annotated[str | None, typer.Option(help="Dec column (default: from the definition)")] = None,
    id_column: Annotated[
        str | None, typer.Option(help="unique id column (default: from the definition)")
    ] = None,
    max_rows_per_partition: Annotated[int, typer.Option(help="partition threshold (rows)")] = 1_000_000,
    highest_order: Annotated[int, typer.Option(help="finest HEALPix order for partitions")] = 10,
    margin_arcsec: Annotated[float, typer.Option(help="margin cache width (0: none)")] = 10.0,
    skip_bad_rows: Annotated[
        bool, typer.Option(help="leave out rows with NaN/out-of-range positions and report them")
    ] = False,
    publish: Annotated[bool, typer.Option(help="publish the release when it validates")] = True,
    threads: Annotated[int | None, typer.Option(help="worker threads (default: all cores)")] = None,
    compression_level: Annotated[int, typer.Option(help="zstd level of the Parquet files (hats: 15)")] = 9,
    progress: Annotated[bool, typer.Option(help="progress bars on a terminal")] = True,
    dask: Annotated[
        str | None,
        typer.Option(
            "--dask",
            help="tcp://HOST:PORT of a Dask scheduler: read, partition and write on its workers "
            "(default: [ingest] dask in the config, or DAC_INGEST_DASK; 'local': this process)",
        ),
    ] = None,
) -> None:
    """Ingest INPUTS as RELEASE of CATALOG: write HATS (catalog, margin, index), validate, publish."""
    from dac_lake.catalog_def import load_definition
    from dac_lake.settings import section_setting
    from ingest.progress import StageBars
    from ingest.release import IngestOptions, ingest_release

    bars = StageBars(progress)
    dask_address = dask or section_setting(load_settings(), "ingest", "dask")
    if dask_address == "local":
        dask_address = None
    try:
        the_lake = _lake(lake)
        options = IngestOptions(
            ra_column=ra_column,
            dec_column=dec_column,
            id_column=id_column,
            max_rows_per_partition=max_rows_per_partition,
            highest_order=highest_order,
            margin_arcsec=margin_arcsec,
            skip_bad_rows=skip_bad_rows,
            publish=publish,
            compression_level=compression_level,
            dask_address=dask_address,
        )
        if threads:
            options.threads = threads
        summary = ingest_release(
            the_lake, catalog, release, inputs, load_definition(definition or catalog), options, progress=bars
        )
    except _known_errors() as exc:
        bars.close()
        raise _fail(str(exc)) from None
    except Exception as exc:
        bars.close()
        # the cluster gave up (a worker died too often, a task was lost): one line, like other failures;
        # the release prefix has already been removed and the previous release is still current
        if dask_address and type(exc).__module__.startswith("distributed"):
            raise _fail(
                f"the Dask cluster {dask_address} failed the ingest: {type(exc).__name__}: {exc}"
            ) from None
        raise
    bars.close()
    for line in summary.lines():
        typer.echo(line)


# ---------------------------------------------------------------------- service
@app.command("serve")
def serve(
    lake: LakeOpt = None,
    host: Annotated[
        str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    job_dir: Annotated[str | None, typer.Option(help="async job database and results")] = None,
) -> None:
    """Serve the lake over IVOA TAP 1.1 / ADQL, VOSI and Simple Cone Search (FastAPI under uvicorn)."""
    import os

    import uvicorn

    # the app factory runs in each worker process: hand it the choices through the environment
    if lake:
        os.environ["DAC_LAKE_URL"] = lake
    if job_dir:
        os.environ["DAC_SERVICE_JOB_DIR"] = job_dir
    settings = load_settings()
    try:
        from api.app import create_app

        if workers == 1:
            application = create_app(settings)  # fail here, with a clear message, on a bad lake or config
        else:
            from dac_lake.lake import Lake
            from dac_lake.storage import LakeStorage

            Lake(LakeStorage(settings.lake_url, settings)).check()
            application = "api.app:create_app"
    except (*_known_errors(), ValueError) as exc:
        raise _fail(str(exc)) from None
    base = f"http://{host}:{port}"
    typer.echo(f"TAP service for lake {settings.lake_url}: {base}/tap", err=True)
    own_metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # several worker processes must share their Prometheus counters (prometheus_client's multiprocess
        # mode), or each /metrics scrape would see one worker's share; systemd units set their own
        import tempfile

        own_metrics_dir = tempfile.mkdtemp(prefix="dac-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    try:
        _run_uvicorn(uvicorn, application, host, port, workers)
    finally:
        if own_metrics_dir:
            import shutil

            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _run_uvicorn(uvicorn, application, host: str, port: int, workers: int) -> None:
    uvicorn.run(
        application,
        host=host,
        port=port,
        workers=workers,
        factory=workers > 1,
        log_level="info",
        timeout_graceful_shutdown=5,
        # a worker imports the whole stack (DuckDB, pyarrow, astropy) before it can answer uvicorn's
        # health ping: on a loaded machine that takes longer than the default 5 s, and uvicorn would kill
        # and restart its workers in a loop
        timeout_worker_healthcheck=60,
    )


auth_app = typer.Typer(help="Access tokens for the service", no_args_is_help=True)
app.add_typer(auth_app, name="auth")


@auth_app.command("new-token")
def auth_new_token(
    user: str,
    group: Annotated[list[str] | None, typer.Option("--group", "-g", help="a group (repeat)")] = None,
) -> None:
    """Make a random API token for USER: prints the token once (give it to the user) and the line to add
    to the service configuration (only the token's SHA-256 is stored)."""
    from api.auth import new_token

    token = new_token(user, group or [])
    typer.echo(f"token (give it to {user}; it is not stored anywhere): {token.token}")
    typer.echo("add to the configuration (or the DAC_AUTH_TOKENS_FILE):")
    typer.echo(token.config_entry)


# ---------------------------------------------------------------------- demo
@app.command("demo")
def demo(
    lake: Annotated[str, typer.Option(help="where to put the demo lake")] = "./lake",
    rows: Annotated[int, typer.Option(help="rows of the main demo catalog")] = 1_000_000,
    data_dir: Annotated[Path, typer.Option(help="where the generated input files go")] = Path("./demo-data"),
) -> None:
    """Generate the sample survey, ingest it into a local lake and show a first query."""
    from ingest.demo_run import run_demo

    try:
        run_demo(lake, rows, data_dir)
    except _known_errors() as exc:
        raise _fail(str(exc)) from None


if __name__ == "__main__":  # pragma: no cover
    app()
