"""Runs the alert ingest of a replay folder into a lake, optionally killing itself with SIGKILL at one of
the pipeline's commit points on a given batch (the crash tests' subject: a real process dying mid-way).

    python tests/alert_ingest_driver.py LAKE STREAM FOLDER DEAD_LETTERS MAX_ALERTS [STAGE BATCH]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dac_lake.alerts_broker import AlertBroker
from dac_lake.lake import Lake
from dac_lake.storage import LakeStorage
from ingest.alerts.pipeline import AlertIngest


def main() -> None:
    lake_url, stream, folder, dead, max_alerts = sys.argv[1:6]
    stage, at_batch = (sys.argv[6], int(sys.argv[7])) if len(sys.argv) > 7 else (None, 0)
    seen = {"n": 0}

    def crash(name: str) -> None:
        if name == "before_commit":
            seen["n"] += 1
        if name == stage and seen["n"] == at_batch:
            print(f"killing myself at {name} of batch {at_batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    lake = Lake(LakeStorage(lake_url))
    pipeline = AlertIngest(
        lake, stream, dead_letter_dir=dead, order=3, broker=AlertBroker(lake, stream), crash_hook=crash
    )
    report = pipeline.run(pipeline.file_source([folder]), max_alerts=int(max_alerts))
    print("\n".join(report.lines()), flush=True)


if __name__ == "__main__":
    main()
