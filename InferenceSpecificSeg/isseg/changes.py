"""What the refinement changed, per organ, for the reviewer (report.json "organs", the `organ_changes`
event and the table `isseg refine` prints at the end).

Per organ: volume of the initial mask (snapshot 0: the network's mask, or the user's with
--initial-mask) and of the refined mask (ml), Dice between them, the largest surface distance
between them (mm), the share of the refined organ's voxels that are uncertain, and the reasons to
review it. Inputs are (z, y, x) labelmaps and the uncertainty map, all on the input grid.
"""

from __future__ import annotations

import numpy as np

from .metrics import dice_per_label, hausdorff_per_label
from .reporting import format_number, rounded_or_none
from .uncertainty import uncertain_share

# An organ is marked for review when its Dice between initial and refined is below this, or when
# more than this share of it is uncertain; the one that changed most and the one that is most
# uncertain are marked as well.
REVIEW_DICE = 0.9
REVIEW_UNCERTAIN_SHARE = 0.25
CHANGED = "changed"
UNCERTAIN = "uncertain"


def organ_changes(initial: np.ndarray, refined: np.ndarray, uncertainty: np.ndarray, labels: list[dict],
                  spacing_zyx) -> list[dict]:
    """One row per label: value, name, volume_initial_ml, volume_refined_ml, dice, max_surface_distance_mm,
    uncertain_share, review (a list of CHANGED / UNCERTAIN). Missing scores are None (JSON-safe)."""
    values = [label["value"] for label in labels]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    dice = dice_per_label(refined, initial, values)
    distance = hausdorff_per_label(refined, initial, values, spacing_zyx)
    rows = [{
        "value": value, "name": label["name"],
        "volume_initial_ml": round(float((initial == value).sum()) * voxel_ml, 2),
        "volume_refined_ml": round(float((refined == value).sum()) * voxel_ml, 2),
        "dice": rounded_or_none(d), "max_surface_distance_mm": rounded_or_none(h, 2),
        "uncertain_share": rounded_or_none(uncertain_share(uncertainty, refined, value)),
        "review": [],
    } for value, label, d, h in zip(values, labels, dice, distance)]
    mark_for_review(rows)
    return rows


def mark_for_review(rows: list[dict]) -> None:
    """Fill each row's `review` in place (see REVIEW_DICE and REVIEW_UNCERTAIN_SHARE)."""
    scored = [row for row in rows if row["dice"] is not None]
    most_changed = min(scored, key=lambda row: row["dice"], default=None)
    uncertain = [row for row in rows if row["uncertain_share"] is not None]
    most_uncertain = max(uncertain, key=lambda row: row["uncertain_share"], default=None)
    for row in rows:
        if row["dice"] is not None and (row["dice"] < REVIEW_DICE or (row is most_changed and row["dice"] < 1)):
            row["review"].append(CHANGED)
        share = row["uncertain_share"]
        if share is not None and (share > REVIEW_UNCERTAIN_SHARE or (row is most_uncertain and share > 0)):
            row["review"].append(UNCERTAIN)


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table for a terminal or a log."""
    header = ("organ", "initial ml", "refined ml", "Dice", "max dist mm", "uncertain", "review")
    lines = [[row["name"], format_number(row["volume_initial_ml"], 1), format_number(row["volume_refined_ml"], 1),
              format_number(row["dice"]), format_number(row["max_surface_distance_mm"], 1),
              "–" if row["uncertain_share"] is None else f"{100 * row['uncertain_share']:.1f}%",
              ", ".join(row["review"]) or "–"] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    text = [" ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]]
    return "\n".join(text) + "\n"
