"""A real Dask cluster for the tests: `dask scheduler` and `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


class Cluster:
    """A scheduler and worker processes started by the test, and a client to watch them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        port = self.address.rsplit(":", 1)[1]
        cmd = [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"]
        self.scheduler = self._spawn("scheduler", cmd)
        self.client = None

    def _spawn(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=_env(**env), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    @property
    def pause_file(self) -> Path:
        return self.tmp / "pause"

    def add_worker(self, name: str, threads: int = 1, memory: str = "1GB") -> subprocess.Popen:
        """A worker (under its nanny, which replaces it if it dies) with the DAC_INGEST_PAUSE_AT test hook
        on partition writes: while `pause_file` exists the hook does nothing; `arm_pause` removes it, and
        the first worker to start a partition write then parks in it, its pid in the file."""
        cmd = [str(DASK), "worker", self.address, "--nworkers", "1", "--nthreads", str(threads)]
        cmd += ["--memory-limit", memory, "--no-dashboard", "--name", name]
        env = {"DAC_INGEST_PAUSE_AT": "dask-partition", "DAC_INGEST_PAUSE_FILE": str(self.pause_file)}
        return self._spawn(name, cmd, **env)

    def arm_pause(self) -> None:
        self.pause_file.unlink()

    def paused_worker_pid(self, outcome: dict, timeout: float = 90) -> int:
        """Wait until a worker parks in a partition write; its pid."""
        deadline = time.time() + timeout
        while True:
            try:
                pid, stage = self.pause_file.read_text().split()
                if stage == "dask-partition":
                    return int(pid)
            except (FileNotFoundError, ValueError):
                pass
            if not outcome["thread"].is_alive():
                pytest.fail(f"the ingest ended before a worker paused: {outcome}")
            if time.time() > deadline:
                pytest.fail("no worker reached a partition write")
            time.sleep(0.05)

    def connect(self, workers: int, modules: tuple[str, ...] = ("ingest.dask_release",)) -> None:
        from distributed import Client

        deadline = time.time() + 60
        while self.client is None:
            try:
                self.client = Client(self.address, timeout=5, set_as_default=False)
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        self.client.wait_for_workers(workers, timeout=60)
        self.client.get_task_stream()  # installs the scheduler's task-stream recorder
        # a long-lived cluster has imported dac-lake once (the scheduler unpickles task graphs, the workers
        # the tasks): do it here, so the timings printed by the tests are those of an ingest, not of imports
        for module in modules:
            self.client.run(importlib.import_module, module)
            self.client.run_on_scheduler(importlib.import_module, module)

    def worker_addresses(self) -> dict[str, str]:
        """worker name -> address"""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {w["name"]: addr for addr, w in info.items()}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        # workers first (each nanny stops its worker while the scheduler is still there), then the scheduler
        for group in (self.procs[1:], self.procs[:1]):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
