"""What a `--stop-when-converged` threshold would have cost, read from finished evaluation runs.

    python benchmarks/early_stopping.py --work /tmp/eval13/after [--method isl_mask]

`--work` is the folder of `benchmarks/evaluate_phantoms.sh --work DIR`: its cases/ (dataset.json,
imagesTr/, labelsTr/) and evaluation/cases/CASE/METHOD/, a run folder of `isseg refine` that kept every
snapshot (snapshot_0000.nrrd is the initial mask, snapshot_k the moving average after update k) and
report.json's `early_stopping.mask_change_per_update`. The runs must have been made without early
stopping, so that every update is there: `bash benchmarks/evaluate_phantoms.sh --work DIR --cases 10
--variants isl_mask --stop-when-converged 0`. For each threshold, a run would have stopped at
the first update (before the last) whose mask change is below it; the script prints the mean Dice over
organs of each snapshot against the truth and, per threshold, the mean steps run, and the mean and worst
loss of Dice against running every step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from isseg import metrics

THRESHOLDS = (0.005, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03)


def read_run(run: Path, truth: np.ndarray) -> tuple[list[float], list[float], int]:
    """Mean Dice over the truth's labels of every snapshot, the mask change of every update, the
    steps between updates."""
    report = json.loads((run / "report.json").read_text())
    stopping = report["early_stopping"]
    if stopping["threshold"] != 0 or stopping["stopped_after_step"] is not None:
        raise SystemExit(f"{run}: made with early stopping; rerun it with --stop-when-converged 0")
    labels = [int(value) for value in np.unique(truth) if value > 0]
    dice = [metrics.mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), truth, labels)
            for path in sorted(run.glob("snapshot_*.nrrd"))]
    changes = stopping["mask_change_per_update"]
    return dice, changes, stopping["steps_planned"] // len(changes)


def stopped_update(changes: list[float], threshold: float) -> int:
    """The update (counted from 1) after which a run with `threshold` ends."""
    return next((k for k, change in enumerate(changes[:-1], start=1) if change < threshold), len(changes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--method", default="isl_mask")
    args = parser.parse_args()
    runs = sorted((args.work / "evaluation" / "cases").glob(f"*/{args.method}"))
    results = []
    for run in runs:
        case = run.parent.name
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(args.work / "cases" / "labelsTr" / f"{case}.nii.gz")))
        dice, changes, every = read_run(run, truth)
        results.append((dice, changes, every))
        print(case, "Dice per snapshot", " ".join(f"{d:.3f}" for d in dice),
              "| change per update", " ".join(f"{c:.4f}" for c in changes))
    updates = len(results[0][1])
    print("mean Dice per snapshot", " ".join(f"{np.mean([r[0][k] for r in results]):.4f}" for k in range(updates + 1)))
    print("| threshold | mean steps | mean Dice loss | worst Dice loss |\n|---|---|---|---|")
    for threshold in THRESHOLDS:
        stops = [stopped_update(changes, threshold) for _, changes, _ in results]
        losses = [dice[-1] - dice[stop] for (dice, _, _), stop in zip(results, stops)]
        steps = [stop * every for (_, _, every), stop in zip(results, stops)]
        print(f"| {threshold} | {np.mean(steps):.0f} | {np.mean(losses):.4f} | {max(losses):.4f} |")


if __name__ == "__main__":
    main()
