"""Tables of the k-fold head-and-neck benchmark (benchmarks/headneck_kfold.py), pooled over the folds.

Reads WORK/evaluate/<group>/<scan>/cases/<case>/case.json (the records `isseg evaluate` writes) and
WORK/models/fold_<k>/model.json; writes into RESULTS: evaluate/ (metrics.csv, summary.md with the
Wilcoxon tests paired over every scan, dice_boxplot.png: isseg.evaluate's own writers), models.md (the
fold models: training time, validation Dice per organ) and headneck_kfold.md (the tables of BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from real_anatomy_jobs import say
from real_anatomy_reports import organ_table_markdown, organ_variant_table, read_csv_rows, summarise_interobserver

#: Worse than the initial model by more than this (Dice points) counts against an organ (the issue's limit).
WORSE_POINTS = 1.0
#: The gain the issue asks of ISL (mask + moving average) over the initial model, in Dice points.
TARGET_GAIN_POINTS = 1.5
TARGET_P = 0.01


def pooled_case_results(work: Path, scans: Sequence[str]) -> list:
    """One isseg.evaluate.CaseResult per scan whose primary evaluation is complete: its methods, plus the
    secondary variants where that evaluation is complete too (its baselines repeat the primary ones)."""
    from isseg.evaluate import BASELINES, CaseResult, read_case_record

    results = []
    for scan in scans:
        case_id = f"hn_test_{scan}"
        primary = read_case_record(work / "evaluate" / "primary" / scan / "cases" / case_id, case_id)
        if primary is None:
            continue
        secondary = read_case_record(work / "evaluate" / "secondary" / scan / "cases" / case_id, case_id)
        extra = {m: s for m, s in (secondary.scores if secondary else {}).items() if m not in BASELINES}
        results.append(CaseResult(case_id, {**extra, **primary.scores}))
    return results


def complete_methods(results: Sequence) -> list[str]:
    """The methods every pooled case has, in the order of the benchmark's tables."""
    from real_anatomy_plans import VARIANTS

    return [m for m in VARIANTS if results and all(m in r.scores for r in results)]


def write_pooled_evaluation(results: Sequence, methods: list[str], organs: list[str], out: Path) -> Path:
    """metrics.csv, summary.md and dice_boxplot.png of the pooled cases, by isseg.evaluate's writers."""
    from isseg.evaluate import dice_boxplot, metrics_rows, summary_markdown
    from isseg.reporting import write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", ["case", "method", "organ", "dice", "hd95_mm", "status", "error"],
              metrics_rows(list(results), methods, organs))
    (out / "summary.md").write_text(summary_markdown(list(results), methods, organs,
                                                     "Head and neck, k-fold by patient"), encoding="utf-8")
    dice_boxplot(list(results), methods, organs, out / "dice_boxplot.png")
    return out / "metrics.csv"


def organ_changes(results: Sequence, organs: Sequence[str], method: str = "isl_mask") -> list[dict]:
    """Per organ: the mean Dice change of `method` from the initial model in points (paired over the
    scans that have the organ), its Wilcoxon p and the scans."""
    from isseg.evaluate import paired_wilcoxon

    rows = []
    for organ in organs:
        after = np.array([r.dice(method, organ) for r in results])
        before = np.array([r.dice("initial", organ) for r in results])
        paired = ~(np.isnan(after) | np.isnan(before))
        change = 100.0 * float(np.mean(after[paired] - before[paired])) if paired.any() else math.nan
        rows.append({"organ": organ, "scans": int(paired.sum()), "change_points": change,
                     "p": paired_wilcoxon(after, before)})
    return rows


def fold_models(work: Path, folds: Sequence[Sequence[str]], organs: Sequence[str]) -> list[dict]:
    """Per fold: scans, training seconds and seconds per step, and validation Dice (at the argmax) per organ."""
    rows = []
    for fold, test_scans in enumerate(folds):
        path = work / "models" / f"fold_{fold}" / "model.json"
        if not path.exists():
            continue
        model = json.loads(path.read_text(encoding="utf-8"))
        names = {label["value"]: label["name"] for label in model["labels"]}
        per_organ = {names[t["value"]]: t["dice_at_0.5"] for t in model["thresholds_on_validation"]}
        curves, training = model["training"]["curves"], model["training"]
        rows.append({"fold": fold, "test_scans": list(test_scans), "train_cases": len(training["train_cases"]),
                     "validation_cases": len(training["validation_cases"]), "seconds": training["seconds"],
                     "seconds_per_step": float(np.median(curves["seconds_per_step"])) if curves["seconds_per_step"]
                     else math.nan, "curve": list(zip(curves["step"], curves["validation_dice"])),
                     "validation_dice": {o: math.nan if per_organ.get(o) is None else per_organ[o]
                                         for o in organs}})
    return rows


def mean_of_numbers(values) -> float:
    """The mean of the values that are numbers (not None, not NaN); NaN when there are none."""
    numbers = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(numbers)) if numbers else math.nan


def models_markdown(models: Sequence[Mapping], organs: Sequence[str]) -> str:
    """The fold models: one row per fold, then validation Dice per organ (rows) and fold (columns)."""
    from isseg.reporting import format_number, markdown_table

    rows = [[m["fold"], ", ".join(m["test_scans"]), f"{m['train_cases']} / {m['validation_cases']}",
             f"{m['seconds'] / 60:.1f}", format_number(m["seconds_per_step"], 2),
             format_number(mean_of_numbers(m["validation_dice"].values())),
             " ".join(f"{step}:{dice:.2f}" for step, dice in m["curve"] if dice is not None)] for m in models]
    text = markdown_table(["fold", "test scans", "train / validation cases", "training min", "s per step",
                           "validation Dice (mean of organs)", "validation curve (step:Dice)"], rows)
    per_organ = [[organ, *(format_number(m["validation_dice"][organ]) for m in models)] for organ in organs]
    return text + "\n" + markdown_table(["validation Dice", *(f"fold {m['fold']}" for m in models)], per_organ)


def verdict(change: Mapping) -> str:
    if math.isnan(change["change_points"]):
        return ""
    if change["change_points"] < -WORSE_POINTS:
        return f"**worse by more than {WORSE_POINTS:g} point**"
    return "better" if change["change_points"] > 0 else "worse (within 1 point)" if change["change_points"] < 0 else ""


def change_markdown(changes: Sequence[Mapping], dice_table: Mapping, interobserver: Sequence[Mapping] | None) -> str:
    """Per organ: human inter-observer Dice, initial and ISL (mask + moving average), the change and its p."""
    from isseg.reporting import format_number, markdown_table

    human = {r["organ"]: r["dice_mean"] for r in interobserver or []}
    rows = [[c["organ"], c["scans"], format_number(human.get(c["organ"])),
             format_number(np.mean(dice_table[c["organ"]]["initial"])),
             format_number(np.mean(dice_table[c["organ"]]["isl_mask"])), format_number(c["change_points"], 1, signed=True),
             format_number(c["p"], 4), verdict(c)] for c in changes if c["organ"] in dice_table]
    return markdown_table(["organ", "scans", "human inter-observer Dice", "initial", "ISL mask + moving average",
                           "change (points)", "Wilcoxon p", ""], rows)


def headline(results: Sequence, methods: Sequence[str], changes: Sequence[Mapping]) -> str:
    """Mean over organs per method, the gain of ISL over the initial model and the targets, in words."""
    from isseg.evaluate import MEAN, paired_wilcoxon
    from isseg.reporting import format_number

    means = {m: [r.dice(m, MEAN) for r in results] for m in methods}
    gain = 100.0 * float(np.mean(np.array(means["isl_mask"]) - np.array(means["initial"])))
    p = paired_wilcoxon(means["isl_mask"], means["initial"])
    worse = [c["organ"] for c in changes if c["change_points"] < -WORSE_POINTS]
    better = [c["organ"] for c in changes if c["change_points"] > 0]
    met = gain >= TARGET_GAIN_POINTS and p < TARGET_P and not worse
    return (f"Mean Dice over the organs, mean over {len(results)} scans: "
            + ", ".join(f"{m} {format_number(np.mean(v))}" for m, v in means.items())
            + f". ISL (mask + moving average) against the initial model: {gain:+.1f} points, Wilcoxon p = "
            f"{format_number(p, 4)} over the scans; {len(better)} of {len(changes)} organs better, "
            f"{len(worse)} worse by more than {WORSE_POINTS:g} point ({', '.join(worse) or 'none'}). Target "
            f"(at least +{TARGET_GAIN_POINTS:g} points with p < {TARGET_P:g}, no organ worse by more than "
            f"{WORSE_POINTS:g} point): **{'met' if met else 'missed'}**.")


def write_kfold_results(work: Path, results_dir: Path, plan, interobserver_rows: Sequence[Mapping] | None,
                        command: Sequence[str], step_seconds: Mapping[str, float]) -> Path | None:
    """Everything in RESULTS (module docstring); None when no scan is evaluated yet."""
    results = pooled_case_results(work, plan.scans)
    if not results:
        say("no scan evaluated yet: no tables written")
        return None
    methods, organs = complete_methods(results), list(plan.organs)
    rows = read_csv_rows(write_pooled_evaluation(results, methods, organs, results_dir / "evaluate"))
    dice_table, hd_table = organ_variant_table(rows, "dice"), organ_variant_table(rows, "hd95_mm")
    interobserver = summarise_interobserver(interobserver_rows) if interobserver_rows else None
    changes = organ_changes(results, organs)
    models = fold_models(work, plan.folds, organs)
    (results_dir / "models.md").write_text("# Fold models\n\n" + models_markdown(models, organs), encoding="utf-8")
    partial = sorted({m for r in results for m in r.scores} - set(methods))
    parts = [
        "# Head and neck, k-fold by patient\n",
        f"Made by `{shlex.join(command)}`. {len(plan.folds)} folds by patient over {len(plan.scans)} scans; "
        f"{len(results)} scans evaluated; grid {plan.spacing_mm:g} mm, {plan.train_steps} training steps, seed "
        f"{plan.seed}. Organs: {', '.join(plan.organs)}.\n",
        headline(results, methods, changes) + "\n",
        "## Per organ: ISL (mask + moving average) against the initial model and human agreement\n",
        change_markdown(changes, dice_table, interobserver),
        "\n## Dice, every method (mean ± SD over scans)\n", organ_table_markdown(dice_table, organs),
        "\n## HD95 (mm)\n", organ_table_markdown(hd_table, organs, digits=1),
        "\n## Fold models\n", models_markdown(models, organs),
        "\n## Steps and seconds\n", "\n".join(f"- {name}: {seconds:.0f} s" for name, seconds in step_seconds.items()),
    ]
    if partial:
        parts.insert(3, f"Run on some scans only (the time budget stopped them), so left out of the tables: "
                        f"{', '.join(f'{m} ({sum(m in r.scores for r in results)} scans)' for m in partial)}.\n")
    path = results_dir / "headneck_kfold.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    say(f"wrote {path}")
    return path
