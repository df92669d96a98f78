"""TOPCAT's engine, STILTS (Debian's `stilts` package), against the service: tapquery sync and async, and
taplint over the whole service with 0 errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from astropy.table import Table

pytestmark = pytest.mark.skipif(
    shutil.which("stilts") is None,
    reason="STILTS is not installed: scripts/test installs Debian's stilts package (as root)",
)


def _stilts(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["stilts", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sync", ["true", "false"])
def test_stilts_tapquery(served, tmp_path, sync):
    out = tmp_path / "out.csv"
    adql = "SELECT TOP 25 source_id, ra, dec FROM demo_survey.source ORDER BY source_id"
    run = _stilts(
        "tapquery", f"tapurl={served.tap}", f"adql={adql}", f"sync={sync}", f"out={out}", "ofmt=csv"
    )
    assert run.returncode == 0, run.stderr
    table = Table.read(out, format="ascii.csv")
    assert len(table) == 25 and list(table["source_id"]) == sorted(table["source_id"])


def test_stilts_upload_crossmatch(served, tmp_path):
    """TOPCAT's upload path: a local table sent inline, cross-matched in the service."""
    local = tmp_path / "mine.csv"
    local.write_text("name,ra,dec\na,266.4168,-29.0078\nb,80.8942,-69.7561\n")
    out = tmp_path / "matched.csv"
    adql = (
        "SELECT u.name, COUNT(*) AS n FROM TAP_UPLOAD.up1 AS u JOIN demo_survey.source AS t "
        "ON 1 = CONTAINS(POINT('ICRS', t.ra, t.dec), CIRCLE('ICRS', u.ra, u.dec, 0.5)) GROUP BY u.name"
    )
    run = _stilts(
        "tapquery",
        f"tapurl={served.tap}",
        f"adql={adql}",
        "nupload=1",
        f"upload1={local}",
        "ufmt1=csv",
        "ucmd1=",
        f"out={out}",
        "ofmt=csv",
        "sync=true",
    )
    assert run.returncode == 0, run.stderr
    table = Table.read(out, format="ascii.csv")
    assert len(table) >= 1 and all(n > 0 for n in table["n"])


def test_taplint_reports_no_errors(served, tmp_path):
    # every stage but LOC: ObsLocTAP (observation planning tables) is not something a catalog DAC serves,
    # and taplint reports its absence as a stage failure
    run = _stilts("taplint", f"tapurl={served.tap}", "stages=-LOC", "maxrepeat=30", timeout=600)
    report = run.stdout + run.stderr
    (tmp_path / "taplint.txt").write_text(report)
    totals = re.search(r"Totals: Errors: (\d+); Warnings: (\d+)", report)
    assert totals, report[-3000:]
    errors = [line for line in report.splitlines() if line.startswith("E-")]
    assert int(totals.group(1)) == 0, "\n".join(errors)
    failures = re.search(r"Failures: (\d+)", report)
    assert failures is None or int(failures.group(1)) == 0, report[-3000:]
