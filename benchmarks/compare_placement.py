"""Where the atlas starts: label-overlap search (isseg.placement, today) against organ centroids (before).

    PYTHONPATH=InferenceSpecificSeg python benchmarks/compare_placement.py [--cases 10] [--slab-mm 40]
    PYTHONPATH=InferenceSpecificSeg python benchmarks/compare_placement.py --time-clinical

For each shifted phantom `shifted_spec(2000 + i)` (the test cases of evaluate_phantoms.sh), the demo
model's first mask drives one first alignment round of the 8 demo atlas cases, once from each placement,
on the whole phantom and on an axial slab of it (`--slab-mm`, through the kidneys: a short scan, like
the real 20-slice CT beside the project). Printed per case and placement: the mean Dice to the phantom's
truth of the placed and of the aligned atlas labels (mean over atlas cases and the organs the truth
holds), and the seconds of the search. The centroid placement is the engine's before this change,
swapped in here for the comparison only.

`--time-clinical`: the seconds of the search alone at a clinical size, 16 atlas cases of 256 x 256 x 192
voxels with 20 labels each (seeded boxes: the time depends on the sizes, not on the shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))
sys.path.insert(0, str(BENCHMARKS_DIR.parent / "InferenceSpecificSeg"))

from compare_alignment import case_inputs, mean_dice  # noqa: E402
from isseg import alignment, model_package, placement  # noqa: E402
from isseg.demo_model import demo_package_path  # noqa: E402
from isseg.pipeline import atlas_arrays  # noqa: E402

PLACEMENTS = {"overlap": placement.overlap_shifts,
              "centroid": lambda atlas, target, present, device: placement.centroid_shifts(atlas, target > 0)}


def kidney_slab(probabilities: torch.Tensor, truth: np.ndarray, target: torch.Tensor, slices: int):
    """The inputs cut to `slices` axial slices from the lowest kidney slice of the truth up."""
    low = int(np.argwhere(np.isin(truth, (3, 4)))[:, 0].min())
    part = slice(low, low + slices)
    return probabilities[:, :, part], truth[part], target[:, :, part]


def aligned_dice(name: str, atlas, probabilities: torch.Tensor, truth: np.ndarray, target: torch.Tensor):
    """Mean Dice to the truth of the placed and of the aligned atlas labels, and the search's seconds."""
    mask = probabilities[0].argmax(0).numpy()
    present = [int(v) for v in np.unique(mask) if v > 0]
    started = time.monotonic()
    shifts = PLACEMENTS[name](atlas[1], mask, present, torch.device("cpu"))
    seconds = time.monotonic() - started
    _, placed = placement.initial_placement(*atlas, mask.shape, shifts)
    alignment.overlap_shifts = PLACEMENTS[name]
    aligned = alignment.align_atlas(*atlas, target, probabilities, alignment.AlignmentSettings(), torch.device("cpu"))
    return (np.mean([mean_dice(p, truth) for p in placed[:, 0].numpy()]),
            np.mean([mean_dice(a, truth) for a in aligned.labels[:, 0].numpy()]), seconds)


def time_clinical(cases: int = 16, labels: int = 20, shape=(192, 256, 256)) -> None:
    rng = np.random.default_rng(0)

    def boxes() -> np.ndarray:
        volume = np.zeros(shape, dtype=np.uint8)
        for value in range(1, labels + 1):
            centre = [int(rng.integers(n // 4, 3 * n // 4)) for n in shape]
            volume[tuple(slice(c - n // 12, c + n // 12) for c, n in zip(centre, shape))] = value
        return volume

    target, atlas = boxes(), [boxes() for _ in range(cases)]
    started = time.monotonic()
    placement.overlap_shifts(atlas, target, list(range(1, labels + 1)))
    print(f"overlap search, {cases} atlas cases of {shape[::-1]} voxels (x y z), {labels} labels: "
          f"{time.monotonic() - started:.1f} s on {torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--slab-mm", type=float, default=40.0)
    parser.add_argument("--time-clinical", action="store_true", help="only time the search at a clinical size")
    args = parser.parse_args()
    if args.time_clinical:
        return time_clinical()
    torch.manual_seed(0)
    package = model_package.load(demo_package_path())
    atlas = atlas_arrays(package)
    slices = int(round(args.slab_mm / package.spacing[2]))
    totals = {}
    for seed in range(2000, 2000 + args.cases):
        whole = case_inputs(seed, package)
        for scan, inputs in (("whole", whole), ("slab", kidney_slab(*whole, slices))):
            for name in PLACEMENTS:
                placed, aligned, seconds = aligned_dice(name, atlas, *inputs)
                totals.setdefault((scan, name), []).append((placed, aligned))
                print(f"phantom {seed} {scan:<5} {name:<8}: placed {placed:.3f}, aligned {aligned:.3f}, "
                      f"search {seconds:.2f} s", flush=True)
    for (scan, name), rows in totals.items():
        placed, aligned = np.mean(rows, axis=0)
        print(f"mean over {len(rows)} cases, {scan:<5} {name:<8}: placed {placed:.3f}, aligned {aligned:.3f}")


if __name__ == "__main__":
    main()
