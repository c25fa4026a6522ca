"""Seconds per stage of a run (recorded in report.json and the demo report)."""

from __future__ import annotations

import time


class StageTimer:
    """Adds up wall-clock seconds per stage name; one stage runs at a time and starting one ends the
    one before. A stage entered twice (e.g. `align` in each round) gets the sum of its spells."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stage: str | None = None
        self._started = 0.0

    def start(self, stage: str) -> None:
        self.stop()
        self._stage, self._started = stage, time.monotonic()

    def stop(self) -> None:
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.monotonic() - self._started
            self._stage = None

    def rounded(self, digits: int = 2) -> dict[str, float]:
        return {stage: round(value, digits) for stage, value in self.seconds.items()}
