"""`dac demo`: the sample survey, generated, ingested into a local lake and queried once.

Idempotent: a second run finds the published releases and only repeats the query.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dac_lake.catalog_def import load_definition
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from ingest.demo import generate_demo_catalogs
from ingest.progress import StageBars
from ingest.release import IngestOptions, ingest_release

DEMO_CATALOGS = ("demo_survey", "demo_xmatch")
DEMO_RELEASE = "dr1"


def run_demo(lake_url: str, rows: int, data_dir: Path) -> None:
    lake = Lake(LakeStorage(lake_url))
    lake.init()
    todo = [c for c in DEMO_CATALOGS if lake.current_release(c) is None]
    if todo:
        typer.echo(
            f"generating the sample survey ({rows:,} sources + {rows // 3:,} in the overlap catalog) ..."
        )
        t0 = time.perf_counter()
        files = generate_demo_catalogs(data_dir, n_rows=rows)
        typer.echo(f"  written to {data_dir} in {time.perf_counter() - t0:.1f} s")
        for catalog in todo:
            typer.echo(f"ingesting {catalog} into {lake.storage.url} ...")
            bars = StageBars(True)
            summary = ingest_release(
                lake,
                catalog,
                DEMO_RELEASE,
                [str(p) for p in files[catalog]],
                load_definition(catalog),
                IngestOptions(max_rows_per_partition=max(10_000, rows // 40)),
                progress=bars,
            )
            bars.close()
            for line in summary.lines():
                typer.echo(line)
    else:
        typer.echo(f"the demo lake {lake.storage.url} already holds {', '.join(DEMO_CATALOGS)}")

    import dac_lake

    session = dac_lake.connect(lake.storage.url)
    result = session.cone("demo_survey", 266.4, -29.0, 0.05, columns=["source_id", "ra", "dec", "r_mag"])
    typer.echo(
        f"\ncone search around the Galactic centre (r = 3 arcmin): {result.num_rows} sources, "
        f"{session.last.files} of {session.last.total_files} partition files read"
    )
    typer.echo(result.slice(0, 5).to_pandas().to_string(index=False))
    matches = session.adql(
        "SELECT COUNT(*) AS pairs FROM demo_survey.source AS o JOIN demo_xmatch.source AS x "
        "ON 1 = CONTAINS(POINT(o.ra, o.dec), CIRCLE(x.ra, x.dec, 1.0/3600)) "
        "WHERE 1 = CONTAINS(POINT(o.ra, o.dec), CIRCLE(266.4, -29.0, 1.0))"
    )
    typer.echo(
        f"cross-match within 1 arcsec, 1 deg around it (ADQL): {matches['pairs'][0].as_py()} pairs, "
        f"{session.last.files} partition files read"
    )
    abs_lake = lake.storage.url
    typer.echo(
        f"""
What next:
  .venv/bin/dac release list --lake {abs_lake}
  .venv/bin/python -c "import dac_lake; s = dac_lake.connect('{abs_lake}'); \\
print(s.adql('SELECT TOP 10 source_id, ra, dec, r_mag FROM demo_survey.source ORDER BY r_mag').to_pandas())"
  .venv/bin/python -c "import lsdb; \\
print(lsdb.open_catalog('{abs_lake}/catalogs/demo_survey/releases/dr1').head())"
"""
    )
