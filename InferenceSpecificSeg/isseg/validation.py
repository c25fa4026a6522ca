"""Checks of what a run gets from outside, before any work starts (docs/worker-protocol.md, "Limits").

- Command-line values: argparse types that refuse out-of-range values, and a parser whose every
  error is exit 2 with an `error` event (kind `usage`), like every other failure of the worker.
- The input CT: non-finite voxels (a few are replaced by air with a `warning`, many refuse the image),
  the field of view on the model's grid, and the memory its model grid needs.
- The memory this machine has available (main memory; the GPU has its own fall-backs).

Argument checks import only the standard library, so `isseg --help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .events import EventWriter
from .protocol import EXIT_USAGE

MAX_NON_FINITE_FRACTION = 0.01  # more NaN/inf voxels than this: the image is damaged, not padded
# Per axis on the model grid, and at every level of the alignment's pyramid (alignment.working_levels
# pools a thin axis less): MONAI's bending energy takes second differences, 3 voxels along each axis.
MIN_GRID_VOXELS = 3
AIR_HU = -1024.0
# Whole-volume prediction keeps the moving average, one prediction and its logits, float32 per class.
GRID_BYTES_PER_CLASS_VOXEL = 3 * 4


class WorkerArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are protocol events: an `error` event of kind `usage` on stdout
    (a line of text in a terminal), the usage on stderr, exit code 2. Subcommand parsers inherit it."""

    def error(self, message: str):
        EventWriter(mode=_progress_mode(sys.argv[1:])).emit("error", kind="usage", message=f"{self.prog}: {message}. See `{self.prog} --help`.")
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _progress_mode(argv: list[str]) -> str:
    """The --progress value in `argv` (the arguments could not be parsed as a whole), else auto."""
    for index, argument in enumerate(argv):
        if argument.startswith("--progress="):
            return argument.split("=", 1)[1] if argument.endswith(("=json", "=bar")) else "auto"
        if argument == "--progress" and index + 1 < len(argv) and argv[index + 1] in ("json", "bar"):
            return argv[index + 1]
    return "auto"


def _whole_number(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is too small: {what}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    return _whole_number(text, 1, "give at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    return _whole_number(text, 0, "give 0 or more")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be above 0")
    return value


def momentum(text: str) -> float:
    """argparse type: the moving-average factor, at least 0 and below 1 (1 would never update)."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be at least 0 and below 1 (e.g. 0.8)")
    return value


def fraction(text: str) -> float:
    """argparse type: a fraction from 0 to 1 (e.g. of a mask's voxels)."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be from 0 to 1 (e.g. 0.01)")
    return value


def user_path(text: str) -> Path:
    """argparse type: a path with `~` expanded (also when the shell did not, e.g. when quoted)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(os.path.expanduser(text))


def model_reference(text: str) -> str:
    """argparse type for --model: `demo`, or a package path with `~` expanded."""
    return text if text == "demo" else str(user_path(text))


def available_memory_bytes() -> int | None:
    """Main memory available to a new allocation without swapping (Linux MemAvailable; elsewhere the
    free physical pages), None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(size: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.0f} KiB"
