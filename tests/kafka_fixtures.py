"""A real Kafka-protocol broker on 127.0.0.1 for the tests (Tansu, started by scripts/kafka.sh), or the one
named by DAC_TEST_KAFKA_BOOTSTRAP; the tests that need it skip, saying why, when neither can be had."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.service_fixtures import free_port

REPO = Path(__file__).resolve().parent.parent

#: consumer settings that make a killed group member's partitions move on in seconds, not minutes
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "max.poll.interval.ms": 20000}


@pytest.fixture(scope="session")
def kafka():
    if os.environ.get("DAC_TEST_KAFKA_BOOTSTRAP"):
        yield os.environ["DAC_TEST_KAFKA_BOOTSTRAP"]
        return
    folder = Path(tempfile.mkdtemp(prefix="dac-kafka-")) / "broker"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [str(REPO / "scripts" / "kafka.sh"), "start", str(folder), str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if proc.returncode != 0:
        pytest.skip(f"no Kafka-protocol broker: scripts/kafka.sh start failed: {proc.stderr.strip()}")
    bootstrap = next(line.split("=", 1)[1] for line in proc.stdout.splitlines() if "KAFKA_BOOTSTRAP=" in line)
    try:
        yield bootstrap
    finally:
        subprocess.run(
            [str(REPO / "scripts" / "kafka.sh"), "stop", str(folder)], capture_output=True, timeout=60
        )
