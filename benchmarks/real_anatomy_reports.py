"""Tables of the real-anatomy benchmarks (benchmarks/real_anatomy.py): human inter-observer agreement,
per-organ summaries of `isseg evaluate`'s metrics.csv, the real-CT comparison, speed and memory, and
the index of the results folder.

Inputs are rows (dicts) and arrays already computed; outputs are Markdown and CSV files. Numbers are
formatted by the engine's isseg.reporting (a dash where there is no value).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from isseg.reporting import format_mean_sd, format_number, markdown_table, write_csv as write_rows
from real_anatomy_jobs import say
from real_anatomy_plans import (ABDOMEN_SMALL_ORGANS, ABDOMEN_TRAIN, HEADNECK_TEST, HEADNECK_TRAIN,
                                SMALL_ORGAN_ML, TOTALSEG_NAME, VARIANTS, Scale, abdomen_test_distribution)

STAGES = ("initial", "align", "refine", "finalize")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty (organ outside the scanned range)."""
    from isseg.metrics import binary_dice  # here, not at the top: `prepare` and the plans stay torch-free
    return binary_dice(a, b)


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def write_csv(rows: Sequence[Mapping], path: Path) -> Path:
    """Dict rows as CSV through the engine's writer (NaN and None: empty cells); floats to 4 digits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    return write_rows(path, fields, [[round(value, 4) if isinstance(value, float) else value
                                      for value in (row.get(field, "") for field in fields)] for row in rows])


def mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def cell_number(value) -> float:
    """A number of a row read from CSV (text) or made here; NaN for an empty or 'n/a' cell."""
    return math.nan if value in (None, "", "n/a") else float(value)


# --------------------------------------------------------------------------
# Human inter-observer agreement
# --------------------------------------------------------------------------


def interobserver_rows(scan: str, first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray],
                       voxel_ml: float) -> list[dict]:
    """One row per organ of one scan: Dice between two annotators' masks on the same grid and
    each mask's volume in ml. first/second: organ name -> binary array (same shape)."""
    rows = []
    for organ in first:
        a, b = np.asarray(first[organ]) > 0, np.asarray(second[organ]) > 0
        if a.shape != b.shape:
            raise ValueError(f"{scan} {organ}: masks of shape {a.shape} and {b.shape} are not on one grid")
        rows.append({"scan": scan, "organ": organ, "dice": dice(a, b),
                     "volume_first_ml": round(float(a.sum()) * voxel_ml, 3),
                     "volume_second_ml": round(float(b.sum()) * voxel_ml, 3)})
    return rows


def summarise_interobserver(rows: Sequence[Mapping], small_ml: float = SMALL_ORGAN_ML) -> list[dict]:
    """Per organ: n scans with the organ, mean/std/min Dice, median volume; small flag.

    Scans where both masks are empty are left out; organs keep their first-seen order. Rows may come
    from a CSV (cell_number)."""
    organs = list(dict.fromkeys(row["organ"] for row in rows))
    summary = []
    for organ in organs:
        scores = [cell_number(r["dice"]) for r in rows if r["organ"] == organ]
        scores = [score for score in scores if not math.isnan(score)]
        volumes = [cell_number(r["volume_first_ml"]) for r in rows if r["organ"] == organ]
        volumes = [volume for volume in volumes if volume > 0]
        median_ml = float(np.median(volumes)) if volumes else math.nan
        summary.append({
            "organ": organ, "n": len(scores), "dice_mean": mean_or_nan(scores),
            "dice_std": float(np.std(scores)) if scores else math.nan,
            "dice_min": float(np.min(scores)) if scores else math.nan,
            "median_volume_ml": median_ml, "small": bool(volumes) and median_ml < small_ml,
        })
    return summary


def interobserver_markdown(summary: Sequence[Mapping], first: str = "oncologist",
                           second: str = "radiographer") -> str:
    rows = [[row["organ"], row["n"], f"{format_number(row['dice_mean'])} ± {format_number(row['dice_std'])}",
             format_number(row["dice_min"]), format_number(row["median_volume_ml"], 2), "yes" if row["small"] else ""]
            for row in summary]
    table = markdown_table(["organ", "scans", f"Dice {first} vs {second} (mean ± std)", "min", "median volume (ml)",
                            "small"], rows)
    large = [r["dice_mean"] for r in summary if not r["small"] and not math.isnan(r["dice_mean"])]
    small = [r["dice_mean"] for r in summary if r["small"] and not math.isnan(r["dice_mean"])]
    return (table + f"\nMean over organs of at least {SMALL_ORGAN_ML:g} ml: {format_number(mean_or_nan(large))}; "
            f"over the small ones: {format_number(mean_or_nan(small))}.\n")


def write_interobserver_results(rows: list[dict], results: Path, test_scans: Sequence[str]) -> None:
    summary = summarise_interobserver(rows)
    write_csv(summary, results / "headneck_interobserver.csv")
    text = ("# Head and neck: human inter-observer agreement\n\n"
            f"Dice between the oncologist's and the radiographer's contours of the same scan, on the "
            f"scans' own grids (about 1 x 1 x 2.5 mm, nothing resampled), over the {len(test_scans)} test "
            f"scans ({', '.join(test_scans)}). Scans where neither drew the organ (outside the scanned "
            f"range) are left out. 'small': median oncologist volume below {SMALL_ORGAN_ML:g} ml; such "
            "organs are a few voxels at the model spacing and their Dice is noisy.\n\n"
            + interobserver_markdown(summary))
    (results / "headneck_interobserver.md").write_text(text, encoding="utf-8")
    say(f"wrote {results / 'headneck_interobserver.md'}")


# --------------------------------------------------------------------------
# Per-organ summaries of `isseg evaluate`
# --------------------------------------------------------------------------


def organ_variant_table(rows: Sequence[Mapping], metric: str = "dice") -> dict[str, dict[str, list[float]]]:
    """organ -> method -> values of `metric` over the cases, from the rows of `isseg evaluate`'s
    metrics.csv (case, method, organ, dice, hd95_mm, status, error). Rows without an organ or value
    (failed runs, organs in neither mask) are skipped."""
    table: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        value = cell_number(row.get(metric))
        if row.get("organ") and not math.isnan(value):
            table.setdefault(row["organ"], {}).setdefault(row["method"], []).append(value)
    return table


def variant_order(table: Mapping[str, Mapping[str, list]]) -> list[str]:
    present = list(dict.fromkeys(v for per_organ in table.values() for v in per_organ))
    return [v for v in VARIANTS if v in present] + [v for v in present if v not in VARIANTS]


def organ_table_markdown(table: Mapping[str, Mapping[str, list[float]]], organs: Sequence[str],
                         digits: int = 3) -> str:
    """Mean ± std (population) per organ (rows) and variant (columns), plus the mean over the listed organs."""
    variants = variant_order(table)
    rows, means = [], {v: [] for v in variants}
    for organ in (o for o in organs if o in table):
        cells = []
        for v in variants:
            values = table[organ].get(v, [])
            if values:
                means[v].append(float(np.mean(values)))
            cells.append(format_mean_sd(values, digits, ddof=0))
        rows.append([organ, *cells])
    rows.append(["**mean of organs**", *(f"**{format_number(np.mean(means[v]), digits)}**" if means[v]
                                         else format_number(None) for v in variants)])
    return markdown_table(["organ", *variants], rows)


def small_organs(dataset: str, organs: Sequence[str], interobserver: Sequence[Mapping] | None) -> list[str]:
    """The organs reported apart: the abdomen's small or hard ones, the head-and-neck organs whose
    median oncologist volume is small."""
    if dataset == "abdomen":
        return [o for o in organs if o in ABDOMEN_SMALL_ORGANS]
    small = {r["organ"] for r in (interobserver or []) if r["small"]}
    return [o for o in organs if o in small]


def human_agreement_section(organs: Sequence[str], dice_table: Mapping, interobserver: Sequence[Mapping]) -> list[str]:
    by_organ = {r["organ"]: r for r in interobserver}
    rows = [[organ, format_number(by_organ[organ]["dice_mean"]),
             *(format_number(mean_or_nan(dice_table[organ].get(v, []))) for v in ("initial", "isl_mask"))]
            for organ in organs if organ in by_organ]
    return ["\n## Against human agreement (oncologist vs radiographer, same test patients)\n",
            markdown_table(["organ", "human inter-observer Dice", "initial", "isl_mask"], rows),
            "\nThe models are trained and scored on oncologist contours; the inter-observer Dice is "
            "on the native ~1 x 1 x 2.5 mm grid, the models' on the synthetic test grid.\n"]


def write_dataset_summary(dataset: str, evaluate_dir: Path, results: Path, scale: Scale,
                          interobserver: list[dict] | None, planned: int) -> None:
    """results/<dataset>_summary.md (+ the evaluate CSV, summary and box plot copied to results/);
    `planned`: the test cases the plan has (some may not have fitted the time budget)."""
    rows = read_csv_rows(evaluate_dir / "metrics.csv")
    dice_table, hd_table = organ_variant_table(rows, "dice"), organ_variant_table(rows, "hd95_mm")
    failed = sorted({(r["case"], r["method"]) for r in rows if r["status"] == "failed"})
    organs = list(dice_table)
    small = small_organs(dataset, organs, interobserver)
    results.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "summary.md", "dice_boxplot.png"):
        shutil.copyfile(evaluate_dir / name, results / f"{dataset}_evaluate_{name}")
    n_cases = len({r["case"] for r in rows})
    parts = [f"# {dataset}: {scale.name} scale\n",
             f"{n_cases} test cases" + (f" of the {planned} planned (the others did not fit the time budget)"
                                        if n_cases < planned else "")
             + f"; per-case, per-organ results in `{dataset}_evaluate_metrics.csv`, "
             f"the `isseg evaluate` summary (with Wilcoxon p-values against `initial`) and box plot beside it. "
             f"With {n_cases} paired cases the smallest possible two-sided Wilcoxon signed-rank p-value is "
             f"{2 / 2 ** n_cases:.3g}, so per-organ p-values cannot fall below that however large the effect.\n"]
    if failed:
        parts.append(f"**{len(failed)} runs failed** (see the evaluate summary): "
                     + ", ".join(f"{c}/{m}" for c, m in failed) + "\n")
    parts += ["## Dice, organs of usual size\n", organ_table_markdown(dice_table, [o for o in organs if o not in small])]
    if small:
        title = ("small or hard organs (gallbladder, pancreas, adrenals)" if dataset == "abdomen"
                 else f"small organs (median volume below {SMALL_ORGAN_ML:g} ml: few voxels at the model spacing)")
        parts += [f"\n## Dice, {title}\n", organ_table_markdown(dice_table, small)]
    if hd_table:
        parts += ["\n## HD95 (mm), all organs\n", organ_table_markdown(hd_table, organs, digits=1)]
    if interobserver:
        parts += human_agreement_section(organs, dice_table, interobserver)
    (results / f"{dataset}_summary.md").write_text("\n".join(parts), encoding="utf-8")
    say(f"wrote {results / f'{dataset}_summary.md'}")


# --------------------------------------------------------------------------
# The real CT against TotalSegmentator
# --------------------------------------------------------------------------


def totalseg_mapping(model_labels: Mapping[int, str], totalseg_classes: Mapping[str, str]) -> dict[int, int]:
    """Model label value -> TotalSegmentator class ID, for the organs both know.

    model_labels: value -> name (abdomen names as in synthetic_ct); totalseg_classes: the
    totalsegmentator_total_classes.json mapping (ID as a string -> class name)."""
    by_name = {name: int(class_id) for class_id, name in totalseg_classes.items()}
    mapping = {}
    for value, name in model_labels.items():
        target = TOTALSEG_NAME.get(name)
        if target in by_name:
            mapping[int(value)] = by_name[target]
    return mapping


def compare_to_reference(prediction: np.ndarray, reference: np.ndarray, mapping: Mapping[int, int],
                         names: Mapping[int, str], voxel_ml: float) -> list[dict]:
    """Per mapped organ: Dice of prediction==value against reference==mapped ID (same grid), both volumes.

    An organ absent from the reference gets Dice NaN (its predicted volume shows false positives)."""
    rows = []
    for value, reference_id in mapping.items():
        predicted, truth = prediction == value, reference == reference_id
        rows.append({"organ": names[value], "reference_id": reference_id,
                     "dice": dice(predicted, truth) if truth.any() else float("nan"),
                     "predicted_ml": round(float(predicted.sum()) * voxel_ml, 2),
                     "reference_ml": round(float(truth.sum()) * voxel_ml, 2)})
    return rows


def real_ct_markdown(rows: Sequence[Mapping], size: Sequence[int], spacing: Sequence[float], model_slices: int,
                     scale: Scale) -> str:
    """real_ct.md from the rows of compare_to_reference tagged with `variant` (initial, isl_mask);
    size and spacing (x, y, z) of the real CT, model_slices: its slices on the model grid."""
    by_key = {(r["variant"], r["organ"]): r for r in rows}
    organs = list(dict.fromkeys(r["organ"] for r in rows))
    table = [[organ, f"{by_key[('initial', organ)]['reference_ml']:.1f}",
              *(format_number(by_key[(v, organ)]["dice"]) for v in ("initial", "isl_mask")),
              *(f"{by_key[(v, organ)]['predicted_ml']:.1f}" for v in ("initial", "isl_mask"))] for organ in organs]
    present = [o for o in organs if by_key[("initial", o)]["reference_ml"] > 0]
    lines = ["# Real CT check: abdomen model vs TotalSegmentator labels\n",
             f"Real upper-abdomen CT (TotalSegmentator test files), {size[0]} x {size[1]} x {size[2]} voxels of "
             f"{spacing[0]:.3f} x {spacing[1]:.3f} x {spacing[2]:.1f} mm: only {size[2]} slices "
             f"({size[2] * spacing[2]:.0f} mm), so every organ is cut by the field of view and the model (trained on "
             f"synthetic ICRP-phantom CT at {scale.abdomen_spacing[2]:g} mm) sees {model_slices} slices. The "
             "reference is itself a model's prediction (TotalSegmentator), not a manual contour. Read this as a "
             "check that the pipeline runs on real DICOM and which way ISL moves, not as accuracy.\n",
             markdown_table(["organ", "reference volume (ml)", "Dice initial", "Dice ISL (mask, moving average)",
                             "predicted ml initial", "predicted ml ISL"], table)]
    for variant in ("initial", "isl_mask"):
        lines.append(f"Mean Dice of {variant} over the {len(present)} organs in the reference: "
                     f"{format_number(mean_or_nan([by_key[(variant, o)]['dice'] for o in present]))}\n")
    absent = [o for o in organs if o not in present]
    if absent:
        lines.append(f"Not in the reference on these slices (Dice undefined; predicted volume = false "
                     f"positives): {', '.join(absent)}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------


def stage_ratios(seconds: Mapping[str, float], plain_inference_s: float) -> dict[str, float]:
    """Each stage's seconds, and the total, as multiples of plain inference."""
    total = float(sum(seconds.values()))
    ratios = {stage: float(value) / plain_inference_s for stage, value in seconds.items()}
    ratios["total"] = total / plain_inference_s
    return ratios


def speed_row(timing: Mapping) -> dict:
    """One row of speed.csv from a timed run (real_anatomy_steps.timed_run)."""
    seconds = timing["seconds"]
    dataset = timing["dataset"] + (" (measured while the head-and-neck evaluation ran)"
                                   if timing.get("concurrent") else "")
    return {"dataset": dataset, "case": timing["case"], "input_size": "x".join(map(str, timing["input_size"])),
            "model_grid_size": "x".join(map(str, timing["model_grid_size"])), "atlas_cases": timing["atlas_cases"],
            "device": timing["device"], "plain_inference_s": timing["plain_inference_s"], "total_s": timing["total_s"],
            **{f"{stage}_s": seconds.get(stage, 0.0) for stage in STAGES},
            "total_over_plain": stage_ratios(seconds, timing["plain_inference_s"])["total"],
            "peak_rss_mib": max(timing["peak_rss_mib"].values(), default=math.nan),
            "peak_gpu_mib": max(timing["peak_gpu_mib"].values(), default=math.nan)}


def speed_cells(row: Mapping, ratios: Mapping[str, float]) -> list:
    stages = [f"{row[f'{stage}_s']:.1f} ({ratios.get(stage, 0.0):.0f}x)" for stage in STAGES]
    return [row["dataset"], row["input_size"], row["model_grid_size"], row["atlas_cases"], row["device"],
            f"{row['plain_inference_s']:.2f}", *stages, f"{row['total_s']:.1f}", f"{ratios['total']:.0f}x",
            f"{row['peak_rss_mib']:.0f}", format_number(row["peak_gpu_mib"], 0)]


def evaluate_stage_rows(evaluate_dirs: Mapping[str, Path]) -> list[list]:
    """Mean seconds per stage over every run `isseg evaluate` made (their report.json), per data set
    and method: data set, method, runs, seconds per stage, total."""
    rows = []
    for dataset, directory in evaluate_dirs.items():
        per_method: dict[str, dict[str, list[float]]] = {}
        for report in directory.glob("cases/*/*/report.json"):  # cases/CASE/METHOD/report.json
            seconds = json.loads(report.read_text(encoding="utf-8"))["seconds"]
            for stage, value in seconds.items():
                per_method.setdefault(report.parent.name, {}).setdefault(stage, []).append(float(value))
        for method, stages in sorted(per_method.items()):
            rows.append([dataset, method, max(len(v) for v in stages.values()),
                         ", ".join(f"{stage} {np.mean(v):.1f}" for stage, v in stages.items()),
                         f"{sum(np.mean(v) for v in stages.values()):.1f}"])
    return rows


def speed_tables(timings: list[dict], evaluate_dirs: Mapping[str, Path], results: Path) -> None:
    """results/speed.md and .csv: seconds per stage and peak memory, as ratios to plain inference."""
    rows = [speed_row(timing) for timing in timings]
    table = [speed_cells(row, stage_ratios(timing["seconds"], timing["plain_inference_s"]))
             for row, timing in zip(rows, timings)]
    lines = ["# Speed and memory of `isseg refine`\n",
             "One timed run per data set (pipeline.Run in the benchmark's process, default refine settings of "
             "the scale), peak resident memory of the process and peak allocated GPU memory per stage; plain "
             "inference = resampling to the model grid + sliding-window prediction with the network already "
             "loaded (median of repeats). Ratios are to plain inference.\n",
             markdown_table(["data set", "input voxels", "model grid", "atlas cases", "device", "plain inference (s)",
                             *STAGES, "total (s)", "total / plain", "peak RSS (MiB)", "peak GPU (MiB)"], table)
             if rows else "No timed runs were made (skipped for the time budget, or the models are missing).\n"]
    stage_rows = evaluate_stage_rows(evaluate_dirs)
    if stage_rows:
        lines += ["## Mean seconds per stage over the `isseg evaluate` runs (report.json)\n",
                  markdown_table(["data set", "variant", "runs", "seconds per stage", "total (s)"], stage_rows)]
    write_csv(rows, results / "speed.csv")
    (results / "speed.md").write_text("\n".join(lines), encoding="utf-8")
    say(f"wrote {results / 'speed.md'}")


# --------------------------------------------------------------------------
# The results folder's README
# --------------------------------------------------------------------------


def device_name(requested: str) -> str:
    """The device as asked for, with the GPU's name where a CUDA GPU is used."""
    try:
        import torch
    except ImportError:
        return requested
    if torch.cuda.is_available() and requested != "cpu":
        return f"{requested} ({torch.cuda.get_device_name(0)})"
    return requested


ABDOMEN_ANATOMY_WORDS = {"elastic": "elastic variants of one anatomy",
                         "varied": "organ sizes and positions varied as between patients, then elastic variants"}


def write_index(results: Path, scale: Scale, args, stage_seconds: Mapping[str, float], manifest: Mapping) -> None:
    lines = [f"# Real-anatomy benchmarks ({scale.name} scale)\n",
             f"Made by `{shlex.join(['python3', 'benchmarks/real_anatomy.py', *sys.argv[1:]])}` on "
             f"{platform.node() or 'unknown host'} ({os.cpu_count()} CPU cores, device {device_name(args.device)}), "
             f"seed {args.seed}.\n",
             markdown_table(["step", "seconds"], list(stage_seconds.items())),
             "Files: " + ", ".join(f"`{path.name}`" for path in sorted(results.glob("*.md")) if path.name != "README.md")
             + " (`*_summary.md`: per-organ Dice and HD95 of every variant), and the CSV/PNG beside them.\n",
             "## Data\n",
             f"- Head and neck: {len(manifest['headneck_train_scans'])} training scans / "
             f"{len(manifest['headneck_test_scans'])} test scans, split by patient "
             f"(test: {', '.join(manifest['headneck_test_scans'])}); at most "
             f"{scale.headneck_max_train_scans or 'all'} / {scale.headneck_max_test_scans or 'all'} used, "
             f"{scale.headneck_cases_per_train_scan} case(s) per training scan, synthesised at "
             f"{scale.headneck_synth_spacing} mm, model at {scale.headneck_model_spacing} mm. "
             f"Training distribution {asdict(HEADNECK_TRAIN)}; test {asdict(HEADNECK_TEST)}.",
             f"- Abdomen: ICRP 110 adult male, {scale.abdomen_train_cases} training and {scale.abdomen_test_cases} "
             f"test cases ({ABDOMEN_ANATOMY_WORDS[args.abdomen_anatomy]}), {scale.abdomen_spacing} mm. Training "
             f"distribution {asdict(ABDOMEN_TRAIN)}; test {asdict(abdomen_test_distribution(args.abdomen_anatomy))}.",
             f"- Training: `isseg train` {scale.headneck_train_steps} steps, patch {scale.headneck_patch} (head "
             f"and neck), {scale.abdomen_train_steps} steps, patch {scale.abdomen_patch} (abdomen), channels "
             f"{scale.train_channels}. Refinement options: `{' '.join(scale.refine_options) or 'defaults'}`."]
    (results / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
