"""`isseg demo`: inference-specific learning on a built-in phantom, with a report.

A phantom CT unlike the demo model's training data (late arterial instead of portal venous
phase, more noise, larger anatomical variation, shifted field of view: `phantom.shifted_spec`)
is segmented with the demo model and refined exactly as `isseg refine` does. Because the truth
is known, the report shows what the refinement changed: per-organ Dice of the initial and the
refined mask, a figure with their outlines, and the seconds each stage took.

Files in the output folder:
    ct.nrrd, truth.nrrd            the generated case (HU) and its true labels
    initial.nrrd, refined.nrrd     the demo model's first mask and the refined mask
    figure.png                     axial and coronal slices with initial, refined and true outlines
    dice_table.md, dice_table.csv  Dice per organ before and after
    report.json                    Dice, seconds per stage, the case and every setting
    refine/                        the output of the refinement run (snapshots, report, settings)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import phantom, protocol
from .errors import DiskError
from .events import EventWriter
from .pipeline import RunResult, refine_with_fallback, settings_record
from .refinement import RefineSettings
from .timing import StageTimer
from .io import write_text_atomic
from .metrics import dice_per_label
from .reporting import format_number, markdown_table, rounded_or_none, tell, write_csv

# Soft-tissue window (level 40 HU, width 400 HU) for showing CT slices.
DISPLAY_WINDOW_HU = (-160.0, 240.0)
VIEWS = ("axial", "coronal")
ORGANS = [label["name"] for label in phantom.LABELS]
MEAN = "mean"  # the mean over organs, next to the organs in tables


def run_demo(output: Path, model_path: Path, settings: RefineSettings, events: EventWriter, device: torch.device,
             seed: int, largest_component: bool = True) -> dict:
    """Generate the demo case for `seed`, refine it with the package at `model_path` (the demo model) and
    write the report files into `output`; returns report.json's content."""
    timer = StageTimer()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiskError(f"Cannot create the output folder '{output}' ({error.strerror}). Choose another --output.") from None
    timer.start("generate_case")
    events.emit(protocol.EVENT_STAGE, stage="generate", seed=seed)
    spec = phantom.shifted_spec(seed)
    case = phantom.generate(spec)
    ct_path, _ = phantom.write_case(case, output)
    timer.stop()
    result = refine_with_fallback(ct_path, model_path, output / "refine", settings, events, device, seed, largest_component)
    refine_report = json.loads(result.report.read_text(encoding="utf-8"))
    timer.seconds.update(refine_report["seconds"])

    timer.start("report")
    dice, table, figure_path = _compare_with_truth(case, result, output)
    timer.stop()
    seconds = {**timer.seconds, "total": sum(timer.seconds.values())}
    report = {
        "partial": result.partial,
        "case": {"generator": "isseg.phantom.shifted_spec", "spec": dataclasses.asdict(spec)},
        "dice": {organ: {method: rounded_or_none(dice[method][organ]) for method in dice} for organ in ORGANS},
        "mean_dice": {method: rounded_or_none(dice[method][MEAN]) for method in dice},
        "seconds": {stage: round(value, 2) for stage, value in seconds.items()},
        "settings": settings_record(settings, seed=seed, device=refine_report["device"], model="demo",
                                    largest_component=largest_component),
        "files": {"ct": "ct.nrrd", "truth": "truth.nrrd", "initial": "initial.nrrd", "refined": "refined.nrrd",
                  "figure": figure_path.name, "dice_table": ["dice_table.md", "dice_table.csv"], "refine_run": "refine/"},
    }
    report_path = write_text_atomic(json.dumps(report, indent=1), output / protocol.REPORT_FILE)
    events.emit("report", report=str(report_path), figure=str(figure_path), mean_dice=report["mean_dice"],
                partial=result.partial)
    tell(events, summary_text(output, spec, table, seconds, result.partial))
    return report


def _compare_with_truth(case: phantom.Phantom, result: RunResult, output: Path) -> tuple[dict, str, Path]:
    """Copy the initial and refined masks next to the case, score them against the truth and draw them;
    returns the Dice per method and organ, the Markdown table and the figure's path."""
    mask_paths = {"initial": shutil.copyfile(output / "refine" / "snapshot_0000.nrrd", output / "initial.nrrd"),
                  "refined": shutil.copyfile(result.labelmap, output / "refined.nrrd")}
    masks = {method: sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for method, path in mask_paths.items()}
    truth = sitk.GetArrayFromImage(case.labels)
    dice = dice_by_organ(masks, truth)
    table = write_dice_tables(dice, output)
    figure_path = contour_figure(sitk.GetArrayFromImage(case.image), truth, masks,
                                 {method: scores[MEAN] for method, scores in dice.items()},
                                 case.image, phantom.LABELS, output / "figure.png")
    return dice, table, figure_path


def dice_by_organ(masks: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Per mask name, the Dice of each organ against the truth and their mean (key MEAN); all (z, y, x)
    labelmaps in the values of phantom.LABELS on one grid. NaN for an organ in neither map."""
    values = [label["value"] for label in phantom.LABELS]
    dice = {}
    for method, mask in masks.items():
        scores = dict(zip(ORGANS, dice_per_label(mask, truth, values)))
        dice[method] = {**scores, MEAN: float(np.nanmean(list(scores.values())))}
    return dice


def write_dice_tables(dice: dict[str, dict[str, float]], output: Path) -> str:
    """Write dice_table.md and dice_table.csv (organ, initial, refined, change); returns the Markdown."""
    header = ["organ", "initial Dice", "refined Dice", "change"]
    rows = [(organ, dice["initial"][organ], dice["refined"][organ]) for organ in [*ORGANS, MEAN]]
    table = markdown_table(header, [[organ, format_number(before), format_number(after),
                                     format_number(after - before, signed=True)] for organ, before, after in rows])
    write_text_atomic(table, output / "dice_table.md")
    write_csv(output / "dice_table.csv", header, [[organ, rounded_or_none(before), rounded_or_none(after),
                                                   rounded_or_none(after - before)] for organ, before, after in rows])
    return table


def summary_text(output: Path, spec: phantom.PhantomSpec, table: str, seconds: dict, partial: bool) -> str:
    """What the person who ran the demo reads at the end: the Dice table, the time, where the files are."""
    stages = ", ".join(f"{name.replace('_', ' ')} {value:.0f} s" for name, value in seconds.items() if name != "total")
    trained = phantom.training_spec(spec.seed)
    heading = "Demo stopped early: the table shows the partial result." if partial else "Demo finished."
    return f"""
{heading}
Case: a phantom unlike the demo model's training data (seed {spec.seed}): {spec.phase} contrast phase instead of
{trained.phase}, noise {spec.noise_hu:.0f} HU instead of {trained.noise_hu:.0f}, {spec.anatomy_jitter / trained.anatomy_jitter:.1f} times the anatomical variation, field of
view shifted by ({", ".join(f"{v:.0f}" for v in spec.fov_shift_mm)}) mm.

Dice against the true organs, before and after inference-specific learning:

{table}
Time: {seconds['total']:.0f} s in all ({stages}).

Files in {output}/:
  figure.png                     axial and coronal slices: initial and refined outlines, truth dashed
  report.json                    Dice, seconds per stage, every setting
  dice_table.md, dice_table.csv  the table above
  ct.nrrd, truth.nrrd            the case and its true labels
  initial.nrrd, refined.nrrd     the model's first mask and the refined one
To look at it in 3D Slicer, load ct.nrrd, then refined.nrrd as a segmentation.
"""


def representative_slices(truth: np.ndarray) -> dict[str, int]:
    """Index of the axial (z) and coronal (y) slice that show the most organs, ties broken by their area.

    truth: (z, y, x) labelmap."""
    organs = [value for value in np.unique(truth) if value != 0]
    indices = {}
    for view, other_axes in (("axial", (1, 2)), ("coronal", (0, 2))):
        organs_shown = sum((truth == value).any(axis=other_axes).astype(int) for value in organs)
        area = (truth > 0).sum(axis=other_axes)
        indices[view] = int(np.argmax(organs_shown * truth.size + area))
    return indices


def view_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Axial (volume[z]) or coronal (volume[:, y]) slice of a (z, y, x) volume."""
    return volume[index] if view == "axial" else volume[:, index]


def view_extent(image: sitk.Image, view: str) -> list[float]:
    """imshow extent (left, right, bottom, top) in mm of an axial (x, y) or coronal (x, z) slice."""
    size, spacing = image.GetSize(), image.GetSpacing()
    width = size[0] * spacing[0]
    return [0, width, size[1] * spacing[1], 0] if view == "axial" else [0, width, 0, size[2] * spacing[2]]


def body_limits(ct: np.ndarray, image: sitk.Image, margin_mm: float = 10.0) -> dict[str, tuple[float, float]]:
    """Shown range (mm, in the coordinates of `view_extent`) along x, y and z: the body (above -500 HU) plus a
    margin, so that a shifted field of view does not leave half of each panel black."""
    body = ct > -500
    limits = {}
    for name, axis, other_axes in (("x", 2, (0, 1)), ("y", 1, (0, 2)), ("z", 0, (1, 2))):
        spacing, size = image.GetSpacing()[2 - axis], ct.shape[axis]
        inside = np.flatnonzero(body.any(axis=other_axes))
        first, last = (inside[0], inside[-1] + 1) if len(inside) else (0, size)
        limits[name] = (max(0.0, first * spacing - margin_mm), min(size * spacing, last * spacing + margin_mm))
    return limits


def contour_figure(ct: np.ndarray, truth: np.ndarray, masks: dict[str, np.ndarray], mean_dice: dict[str, float],
                   image: sitk.Image, labels: list[dict], path: Path) -> Path:
    """PNG with one column per mask (initial, refined) and one row per view (axial, coronal): the CT in
    a soft-tissue window, the mask outlined in the organ colors and the truth dashed in white.

    ct (HU), truth and masks: (z, y, x) on the grid of `image` (an LPS image: patient left appears on
    the right of the axial slice, anterior and superior up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    indices = representative_slices(truth)
    limits = body_limits(ct, image)
    # (horizontal, vertical) limits of each view; the axial vertical axis points down (anterior up).
    view_limits = {"axial": (limits["x"], limits["y"][::-1]), "coronal": (limits["x"], limits["z"])}
    width = limits["x"][1] - limits["x"][0]
    heights = [abs(vertical[1] - vertical[0]) for _, vertical in view_limits.values()]
    figure, axes = plt.subplots(2, len(masks), figsize=(5 * len(masks), 5 * sum(heights) / width + 1.3),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for column, (method, mask) in enumerate(masks.items()):
        for row, view in enumerate(VIEWS):
            ax, extent, index = axes[row, column], view_extent(image, view), indices[view]
            origin = "upper" if view == "axial" else "lower"
            ax.imshow(view_slice(ct, view, index), cmap="gray", vmin=DISPLAY_WINDOW_HU[0], vmax=DISPLAY_WINDOW_HU[1],
                      extent=extent, origin=origin, interpolation="bilinear")
            for label in labels:
                for labelmap, color, style, line_width in ((truth, "white", "dashed", 1.0),
                                                           (mask, label["color"], "solid", 1.6)):
                    region = (view_slice(labelmap, view, index) == label["value"]).astype(float)
                    if region.any():
                        ax.contour(region, levels=[0.5], colors=[color], linestyles=style, linewidths=line_width,
                                   extent=extent, origin=origin)
            ax.set_xlim(*view_limits[view][0])
            ax.set_ylim(*view_limits[view][1])
            ax.set_axis_off()
            if row == 0:
                ax.set_title(f"{method} mask (mean Dice {mean_dice[method]:.3f})", fontsize=12)
            ax.text(0.01, 0.99, f"{view} slice {index}", transform=ax.transAxes, color="white", fontsize=9,
                    va="top", ha="left")
    handles = [Line2D([], [], color=label["color"], linewidth=2.5, label=label["name"].replace("_", " "))
               for label in labels]
    handles.append(Line2D([], [], color="0.5", linestyle="dashed", linewidth=1.0, label="truth (white, dashed)"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
