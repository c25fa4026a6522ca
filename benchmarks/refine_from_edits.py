"""Refine from edits on shifted phantoms (BENCHMARKS.md, "Refine from edits"), and the uncertainty map's
error-detection AUC.

    python benchmarks/refine_from_edits.py [--work DIR] [--cases N] [--device cpu] [isseg refine options...]

For each phantom `shifted_spec(2000 + i)` (those of benchmarks/evaluate_phantoms.sh): plain ISL with the
demo model; a simulated user corrects the organ with the lowest Dice on 3 axial slices (at 25, 50 and 75 %
of its true extent: the truth is copied into those slices for that organ), and runs `isseg refine
--initial-mask --edited-region` with the same settings; as a control, the same run again from the plain
result without edits (`--initial-mask` = the plain labelmap, no region), and from the edited mask without
the region (`--initial-mask` only: no training on the case, edits not enforced). Prints and writes DIR/summary.md: Dice per organ
after both runs with paired Wilcoxon p-values, the corrected organ's Dice on the slices NOT edited, and the
AUC of both uncertainty measures as detectors of the plain run's wrong voxels: the plain run writes the
disagreement map (`--uncertainty disagreement`, which changes only what uncertainty.nrrd shows, not the
mask), and the entropy (the default map) is computed from its probabilities.nrrd. Runs are seeded; a
rerun skips runs already finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from isseg import phantom
from isseg.evaluate import paired_wilcoxon
from isseg.metrics import dice_per_label
from isseg.reporting import format_mean_sd, format_number, markdown_table
from isseg.uncertainty import error_detection_auc, normalized_entropy

ORGANS = dict(enumerate(phantom.ORGAN_NAMES, start=1))
EDITED_FRACTIONS = (0.25, 0.5, 0.75)


def refine(image: Path, output: Path, options: list[str], *extra: str) -> np.ndarray:
    """Run `isseg refine` (unless output/report.json exists) and return the final labelmap (z, y, x)."""
    if not (output / "report.json").exists():
        command = [sys.executable, "-m", "isseg.cli", "refine", "--input", str(image), "--model", "demo",
                   "--output", str(output), "--progress", "json", *options, *extra]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output / "labelmap.nrrd")))


def simulate_correction(labels: np.ndarray, truth: np.ndarray, organ: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The user's edited mask, the edited region (uint8 0/1) and the edited axial slices (z indices): in each
    slice the organ is set to the truth (missed voxels become the organ, wrong ones the true label)."""
    slices_with_organ = np.flatnonzero((truth == organ).any(axis=(1, 2)))
    low, high = slices_with_organ.min(), slices_with_organ.max()
    slices = sorted({int(round(low + f * (high - low))) for f in EDITED_FRACTIONS})
    edited = labels.copy()
    for z in slices:
        plane, true_plane = edited[z], truth[z]
        plane[true_plane == organ] = organ
        wrong = (plane == organ) & (true_plane != organ)
        plane[wrong] = true_plane[wrong]
    return edited, (edited != labels).astype(np.uint8), slices


def entropy_on_input(output: Path, reference: sitk.Image) -> np.ndarray:
    """Normalized entropy of probabilities.nrrd (model grid, uint8 per class) on the input grid."""
    probabilities = sitk.ReadImage(str(output / "probabilities.nrrd"))
    entropy = normalized_entropy(np.moveaxis(sitk.GetArrayFromImage(probabilities), -1, 0) / 255.0)
    image = sitk.GetImageFromArray(entropy)
    image.CopyInformation(probabilities)
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0))


def run_case(seed: int, work: Path, options: list[str]) -> dict:
    case = phantom.generate(phantom.shifted_spec(seed))
    folder = work / f"phantom_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "image.nrrd"
    sitk.WriteImage(case.image, str(image_path))
    truth = sitk.GetArrayFromImage(case.labels).astype(np.int64)
    plain = refine(image_path, folder / "plain", options, "--uncertainty", "disagreement")
    plain_dice = dice_per_label(plain, truth, ORGANS)
    worst = 1 + int(np.nanargmin(plain_dice))
    edited, region, slices = simulate_correction(plain, truth, worst)
    for name, array in (("initial_mask.nrrd", edited), ("edited_region.nrrd", region)):
        labelmap = sitk.GetImageFromArray(array.astype(np.uint8))
        labelmap.CopyInformation(case.image)
        sitk.WriteImage(labelmap, str(folder / name), True)
    edits = refine(image_path, folder / "edits", options, "--initial-mask", str(folder / "initial_mask.nrrd"),
                   "--edited-region", str(folder / "edited_region.nrrd"))
    again = refine(image_path, folder / "again", options, "--initial-mask", str(folder / "plain" / "labelmap.nrrd"))
    mask_only = refine(image_path, folder / "mask_only", options, "--initial-mask", str(folder / "initial_mask.nrrd"))
    kept = np.array_equal(edits[region > 0], edited[region > 0])
    not_edited = np.ones(truth.shape[0], dtype=bool)
    not_edited[slices] = False
    disagreement = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "plain" / "uncertainty.nrrd")))
    entropy = entropy_on_input(folder / "plain", case.image)
    return {
        "case": f"phantom_{seed}", "worst": ORGANS[worst], "edited_slices": slices, "edited_voxels": int(region.sum()),
        "edits_kept": bool(kept), "plain": plain_dice, "edits": dice_per_label(edits, truth, ORGANS),
        "plain_not_edited": dice_per_label(plain[not_edited], truth[not_edited], [worst])[0],
        "edits_not_edited": dice_per_label(edits[not_edited], truth[not_edited], [worst])[0],
        "again": dice_per_label(again, truth, ORGANS),
        "again_not_edited": dice_per_label(again[not_edited], truth[not_edited], [worst])[0],
        "mask_only": dice_per_label(mask_only, truth, ORGANS),
        "mask_only_not_edited": dice_per_label(mask_only[not_edited], truth[not_edited], [worst])[0],
        "auc_entropy": [error_detection_auc(entropy, plain, truth, v) for v in ORGANS],
        "auc_disagreement": [error_detection_auc(disagreement, plain, truth, v) for v in ORGANS],
    }


def summary(results: list[dict]) -> str:
    def mean_sd(values):
        return format_mean_sd(values, ddof=0)

    names = list(ORGANS.values())
    rows = []
    runs = (("plain", "plain ISL"), ("edits", "refine from edits"), ("again", "again from the ISL result, no edits"),
            ("mask_only", "from the edited mask, no region"))
    for key, title in runs:
        rows.append([title] + [mean_sd([r[key][i] for r in results]) for i in range(len(names))])
    for key, title in (("plain", "p edits vs plain (Wilcoxon, paired)"), ("again", "p edits vs again (Wilcoxon, paired)")):
        rows.append([title] + [format_number(paired_wilcoxon([r["edits"][i] for r in results], [r[key][i] for r in results]))
                               for i in range(len(names))])
    text = markdown_table(["Dice", *names], rows)
    corrected = {key: [r[f"{key}_not_edited"] for r in results] for key, _ in runs}
    others = {key: [np.nanmean([d for d, n in zip(r[key], names) if n != r["worst"]]) for r in results] for key, _ in runs}
    text += "\n" + markdown_table(["", *[title for _, title in runs], "p edits vs plain", "p edits vs again"], [
        [label, *[mean_sd(values[key]) for key, _ in runs],
         format_number(paired_wilcoxon(values["edits"], values["plain"])),
         format_number(paired_wilcoxon(values["edits"], values["again"]))]
        for label, values in (("corrected organ, slices not edited", corrected), ("other organs (mean per case)", others))])
    text += "\n" + markdown_table(["case", "corrected organ", "edited slices", "edited voxels", "edits kept",
                                   "Dice not edited: plain -> edits"],
                                  [[r["case"], r["worst"], r["edited_slices"], r["edited_voxels"], r["edits_kept"],
                                    f"{r['plain_not_edited']:.3f} -> {r['edits_not_edited']:.3f}"] for r in results])
    text += "\n" + markdown_table(["error-detection AUC (plain ISL)", *names], [
        [measure] + [mean_sd([r[f"auc_{measure}"][i] for r in results]) for i in range(len(names))]
        for measure in ("entropy", "disagreement")])
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/isseg-edits-benchmark"))
    parser.add_argument("--cases", type=int, default=10)
    args, options = parser.parse_known_args()
    results = []
    for seed in range(2000, 2000 + args.cases):
        results.append(run_case(seed, args.work, options))
        print(json.dumps(results[-1]), flush=True)
    text = summary(results)
    (args.work / "summary.md").write_text(text, encoding="utf-8")
    (args.work / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
