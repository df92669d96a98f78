"""What every `dac` command group shares: the `--lake` option, opening the lake, failing with a message.

Its own module so that command groups living elsewhere (`ingest/alerts/cli.py`) use the same pieces as
`dac_lake/cli.py` without importing it (which imports them)."""

from __future__ import annotations

from typing import Annotated

import typer

from dac_lake.settings import load_settings

LakeOpt = Annotated[str | None, typer.Option("--lake", help="lake URL: s3://bucket[/prefix] or a local path")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _lake(url: str | None):
    from dac_lake.lake import Lake
    from dac_lake.storage import LakeStorage

    return Lake(LakeStorage(url, load_settings()))
