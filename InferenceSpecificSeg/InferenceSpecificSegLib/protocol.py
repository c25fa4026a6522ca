"""Reading what the worker publishes (docs/worker-protocol.md): stdout events, segments.json, exit codes.

Readers ignore fields and events they do not know, so the protocol can grow.
"""

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from isseg.protocol import (  # noqa: F401 (the shared contract)
    CANCEL_FILE, EXIT_CANCELLED, OPTION_EDITED_REGION, OPTION_INITIAL_MASK, REPORT_FILE, SEGMENTS_FILE, UNCERTAINTY_FILE)
from isseg.protocol import result_is_complete as resultIsComplete  # noqa: F401 (the completeness rule)

from .i18n import tr as _


class ProtocolError(Exception):
    """A file the worker published does not follow the protocol; the message says which and why."""


def parseEventLine(line: Union[str, bytes]) -> Optional[dict]:
    """One line of worker stdout -> the event it holds, or None when the line is not an event.

    Log noise, half-written JSON and JSON that is not an object with a string "event" all give None,
    so a reader never fails on what a library printed to stdout.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if isinstance(event, dict) and isinstance(event.get("event"), str):
        return event
    return None


@dataclass(frozen=True)
class SegmentDescription:
    """One label of the model: its value in the labelmaps, name, color (r, g, b in 0..1) and terminology
    ({"category": code, "type": code, "modifier": code}, each code {"scheme", "code", "meaning"})."""

    value: int
    name: str
    color: tuple
    terminology: dict = field(default_factory=dict)


def readSegmentsFile(path: Union[str, Path]) -> list:
    """segments.json -> list of SegmentDescription in file order. Raises ProtocolError when the file
    is missing, not JSON, or an entry lacks a positive integer value, a name or an r, g, b color."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["segments"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ProtocolError(_("Could not read the segment list '{path}': {error}").format(path=path, error=error)) from None
    segments = []
    for entry in entries:
        try:
            value, name, color = entry["value"], entry["name"], tuple(float(c) for c in entry["color"])
            valid = type(value) is int and 0 < value < 256 and isinstance(name, str) and name and len(color) == 3
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ProtocolError(_("The segment list '{path}' has an invalid entry: {entry}").format(path=path, entry=entry))
        segments.append(SegmentDescription(value, name, color, entry.get("terminology") or {}))
    return segments


def _formatDuration(seconds: float) -> str:
    if seconds < 60:
        return _("less than a minute")
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return _("about {minutes} min").format(minutes=minutes)
    return _("about {hours:.1f} h").format(hours=minutes / 60)


@dataclass
class RunProgress:
    """Where a run is, accumulated from `stage` and `progress` events."""

    stage: Optional[str] = None
    alignmentRound: Optional[int] = None
    step: int = 0
    total: int = 0
    etaSeconds: Optional[float] = None
    warning: Optional[str] = None

    def apply(self, event: dict) -> None:
        """Update from one event; events other than `stage`, `progress` and `warning` are ignored."""
        kind = event.get("event")
        if kind == "stage":
            self.stage = event.get("stage")
            self.alignmentRound = event.get("round")
            self.step, self.total = 0, 0
        elif kind == "progress":
            self.stage = event.get("stage", self.stage)
            self.step, self.total = _number(event.get("step"), 0), _number(event.get("total"), 0)
            eta = event.get("eta_s")
            self.etaSeconds = float(eta) if isinstance(eta, (int, float)) else None
        elif kind == "warning" and isinstance(event.get("message"), str):
            self.warning = event["message"]

    @property
    def percent(self) -> int:
        """Progress of the current stage, 0..100."""
        return int(100 * min(self.step, self.total) / self.total) if self.total > 0 else 0

    def describe(self) -> str:
        """User-visible line: stage, percent and time left, e.g. "Refining: 45%, about 3 min left"."""
        stageNames = {
            "initial": _("Initial segmentation"),
            "align": _("Aligning training cases"),
            "refine": _("Refining"),
            "finalize": _("Finishing"),
        }
        if self.stage is None:
            return _("Starting the worker...")
        text = stageNames.get(self.stage, self.stage)
        if self.stage == "align" and self.alignmentRound:
            text = _("{stage} (round {round})").format(stage=text, round=self.alignmentRound)
        if self.total > 0:
            text = _("{stage}: {percent}%").format(stage=text, percent=self.percent)
        if self.etaSeconds is not None:
            text = _("{progress}, {duration} left").format(progress=text, duration=_formatDuration(self.etaSeconds))
        if self.warning:
            text = _("{progress} ({warning})").format(progress=text, warning=self.warning)
        return text


def _number(value, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) else default


def _cell(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def describeOrganChanges(organs: list) -> str:
    """The `organ_changes` rows (docs/worker-protocol.md) as an HTML table for the panel: per organ the
    volume of the initial and of the refined mask, their Dice, the largest surface distance between them,
    the share of uncertain voxels and the reasons to review it. "" when there are no rows."""
    if not organs:
        return ""
    reasons = {"changed": _("changed"), "uncertain": _("uncertain")}
    header = [_("Organ"), _("Initial (ml)"), _("Refined (ml)"), _("Dice"), _("Max. distance (mm)"), _("Uncertain"),
              _("Review")]
    rows = []
    for organ in organs:
        share = organ.get("uncertain_share")
        review = [str(reasons.get(reason, reason)) for reason in organ.get("review") or []]
        rows.append([html.escape(str(organ.get("name", ""))), _cell(organ.get("volume_initial_ml"), 1),
                     _cell(organ.get("volume_refined_ml"), 1), _cell(organ.get("dice"), 3),
                     _cell(organ.get("max_surface_distance_mm"), 1),
                     _cell(100 * share, 1) + " %" if isinstance(share, (int, float)) else "–",
                     "<b>" + ", ".join(review) + "</b>" if review else "–"])
    lines = ["<tr>" + "".join(f"<th>{cell}</th>" for cell in header) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    return "<table>" + "".join(lines) + "</table>"
