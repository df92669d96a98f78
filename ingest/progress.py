"""Progress bars for long CLI steps (one tqdm bar per stage), as a `progress(stage, done, total)` callback."""

from __future__ import annotations

import sys

from tqdm import tqdm

STAGE_LABELS = {
    "read": "reading inputs",
    "sort": "sorting by _healpix_29",
    "partitions": "writing partitions",
    "margin": "writing margin cache",
    "index": "writing id index",
    "validate": "validating with hats/lsdb",
}


class StageBars:
    """Callable progress reporter: opens a bar when a stage starts, closes it when it completes."""

    def __init__(self, enabled: bool = True):
        self.enabled = (enabled and sys.stderr.isatty()) or enabled == "always"
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total, desc=STAGE_LABELS.get(stage, stage), unit="", leave=True, dynamic_ncols=True
            )
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
