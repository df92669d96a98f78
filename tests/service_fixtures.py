"""A real service for the TAP tests: a small demo lake (plus a private catalog), served by `dac serve` in a
subprocess on 127.0.0.1, reached over real HTTP. Session-scoped: building the lake takes a few seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from api.auth import hash_token
from dac_lake.catalog_def import load_definition
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from ingest.demo import generate_demo_catalogs
from ingest.release import IngestOptions, ingest_release

SURVEY_ROWS = 60_000
TEAM_TOKEN = "team-token-for-tests-0123456789abcdef"
OTHER_TOKEN = "other-token-for-tests-0123456789abcdef"


@dataclass
class ServiceLake:
    url: str
    root: Path
    config: Path
    inputs: dict[str, list[str]]


@dataclass
class Served:
    base: str
    lake: ServiceLake
    process: subprocess.Popen
    job_dir: Path
    log: Path

    @property
    def tap(self) -> str:
        return f"{self.base}/tap"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_service_lake(root: Path) -> ServiceLake:
    """demo_survey (public), demo_xmatch (public) and private_cat (group 'team' only)."""
    lake_dir = root / "lake"
    lake = Lake(LakeStorage(str(lake_dir)))
    lake.init()
    files = generate_demo_catalogs(root / "input", n_rows=SURVEY_ROWS)
    opts = IngestOptions(max_rows_per_partition=4000, margin_arcsec=10, validate_with_lsdb=False)
    inputs = {}
    for catalog in ("demo_survey", "demo_xmatch"):
        inputs[catalog] = [str(p) for p in files[catalog]]
        ingest_release(lake, catalog, "dr1", inputs[catalog], load_definition(catalog), opts)
    private = load_definition("demo_xmatch").to_dict()
    private.update(private.pop("extra", None) or {})  # the YAML form keeps `table:` at the top level
    private.update(name="private_cat", groups=["team"], title="A private catalog (group team)")
    path = root / "private_cat.yaml"
    path.write_text(yaml.safe_dump(private))
    ingest_release(lake, "private_cat", "v1", inputs["demo_xmatch"], load_definition(path), opts)
    config = root / "dac.toml"
    config.write_text(
        "[auth]\nallow_anonymous = true\n"
        f'[[auth.tokens]]\nuser = "alice"\ngroups = ["team"]\ntoken_sha256 = "{hash_token(TEAM_TOKEN)}"\n'
        f'[[auth.tokens]]\nuser = "bob"\ngroups = []\ntoken_sha256 = "{hash_token(OTHER_TOKEN)}"\n'
        "[service]\nmaxrec_default = 20000\nmaxrec_max = 200000\nsync_timeout_s = 20\n"
        "upload_max_rows = 5000\nupload_max_bytes = 2000000\n"
    )
    return ServiceLake(str(lake_dir), root, config, inputs)


def launch_serve(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 60.0, cwd: Path | None = None
) -> tuple[str, subprocess.Popen]:
    """`dac serve ARGS --port FREE` in a subprocess (output to `log`), waited for until /health answers:
    (base URL, process). The one launcher of the service for every test that needs it over HTTP."""
    port = free_port()
    cmd = [sys.executable, "-m", "dac_lake.cli", "serve", *args, "--port", str(port)]
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            cmd,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dac serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base, process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"dac serve did not come up:\n{log.read_text()[-3000:]}")


def start_service(
    lake: ServiceLake, job_dir: Path, log: Path, extra_env: dict | None = None, workers: int | None = None
) -> Served:
    args = ["--lake", lake.url, "--job-dir", str(job_dir)]
    if workers is not None:
        args += ["--workers", str(workers)]
    env = {"DAC_CONFIG": str(lake.config), **(extra_env or {})}
    base, process = launch_serve(args, env, log, timeout=90 if workers else 60)
    return Served(base, lake, process, job_dir, log)


def stop_service(served: Served) -> None:
    served.process.terminate()
    try:
        served.process.wait(15)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait()


@pytest.fixture(scope="session")
def service_lake(tmp_path_factory) -> ServiceLake:
    return build_service_lake(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="session")
def served(service_lake, tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    s = start_service(service_lake, root / "jobs", root / "service.log")
    yield s
    stop_service(s)
