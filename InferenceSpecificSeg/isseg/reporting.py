"""Tables and messages for people, shared by `isseg demo` and `isseg evaluate`."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Sequence

from .events import EventWriter
from .io import write_text_atomic


def is_missing(value) -> bool:
    """True for None and NaN: a score that does not exist (e.g. an organ absent from both masks)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def rounded_or_none(value: float | None, digits: int = 4) -> float | None:
    """`value` rounded for JSON, None where there is no value (JSON has no NaN)."""
    return None if is_missing(value) else round(float(value), digits)


def format_number(value: float | None, digits: int = 3, signed: bool = False) -> str:
    """`value` rounded for a table (with its sign when `signed`); a dash where there is no value."""
    if is_missing(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_mean_sd(values, digits: int = 3, ddof: int = 1) -> str:
    """"mean ± SD" of the values that are not missing (SD with `ddof` delta degrees of freedom: 1 for the
    sample SD, 0 for the population SD); the value alone when there is one, a dash when there is none."""
    present = [float(value) for value in values if not is_missing(value)]
    present = [value for value in present if not math.isnan(value)]  # NaN of numpy's own float types too
    if len(present) < 2:
        return format_number(present[0] if present else None, digits)
    mean = sum(present) / len(present)
    sd = math.sqrt(sum((value - mean) ** 2 for value in present) / (len(present) - ddof))
    return f"{format_number(mean, digits)} ± {format_number(sd, digits)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured Markdown table; cells are used as they are (format numbers beforehand)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write rows as CSV (through a temporary file and a rename); NaN and None become empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if is_missing(cell) else cell for cell in row])
    return write_text_atomic(buffer.getvalue(), path)


def tell(events: EventWriter, text: str) -> None:
    """Show a message to the person running the command: on stdout next to the progress bar, or on
    stderr when stdout carries JSON events for a program (so it stays one JSON object per line)."""
    stream = events.stream if events.mode == "bar" else sys.stderr
    stream.write(text.rstrip("\n") + "\n")
    stream.flush()
