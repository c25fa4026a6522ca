"""Progress events of the worker protocol (docs/worker-protocol.md).

Events are JSON objects, one per line on stdout, flushed at once so that the Slicer logic sees
them live. In a terminal the same events are shown as a one-line progress bar instead.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO


class EventWriter:
    """Writes protocol events; `mode` is `json` (for programs) or `bar` (for people in a terminal)."""

    def __init__(self, stream: IO[str] | None = None, mode: str = "auto"):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "json"
        self.mode = mode
        self.started = time.monotonic()

    def emit(self, event: str, **fields) -> None:
        record = {"event": event, **{k: _plain(v) for k, v in fields.items()}}
        if self.mode == "json":
            self.stream.write(json.dumps(record) + "\n")
        else:
            self.stream.write(_human(record))
        self.stream.flush()


def _plain(value):
    """JSON-safe value: numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _human(record: dict) -> str:
    event = record["event"]
    if event == "progress":
        fraction = record["step"] / max(1, record["total"])
        bar = "#" * int(30 * fraction)
        loss = f" loss {record['loss']:.3f}" if record.get("loss") is not None else ""
        eta = f" {record['eta_s']:.0f} s left" if record.get("eta_s") is not None else ""
        return f"\r{record['stage']:>9} [{bar:<30}] {record['step']}/{record['total']}{loss}{eta}   "
    if event == "stage":
        return f"\n{record['stage']}...\n"
    details = ", ".join(f"{k}: {v}" for k, v in record.items() if k != "event")
    return f"\n{event}: {details}\n"


class RunClock:
    """Estimates the seconds left from the fraction of the planned work that is done.

    Work is counted in units the caller chooses (e.g. fine-tuning steps, with an alignment round
    weighed as a number of steps); the rate is measured since the first unit was finished so that
    start-up costs do not distort it.
    """

    def __init__(self, total_units: float):
        self.total_units = total_units
        self.done_units = 0.0
        self.first_time: float | None = None
        self.first_units = 0.0

    def advance(self, units: float) -> None:
        self.done_units = min(self.total_units, self.done_units + units)
        if self.first_time is None:
            self.first_time, self.first_units = time.monotonic(), self.done_units

    def seconds_left(self) -> float | None:
        if self.first_time is None or self.done_units <= self.first_units:
            return None
        rate = (time.monotonic() - self.first_time) / (self.done_units - self.first_units)
        return rate * (self.total_units - self.done_units)
