"""Today's atlas alignment against ConvexAdam with segmentation features, on the same phantom cases.

    PYTHONPATH=InferenceSpecificSeg:/tmp/cadam python benchmarks/compare_alignment.py [--cases 3] [--grid-sp 2] [--disp-hw 4]

ConvexAdam (Siebert, Hansen, Heinrich; PyPI `convexAdam`, Apache-2.0) is not a dependency of the project:
install it apart (`pip install --no-deps --target /tmp/cadam convexAdam`) and put it on PYTHONPATH for
this script only. Its segmentation-feature variant (convexAdam.convex_adam_nnUNet.convex_adam, the one
that registers label maps) is written for CUDA and float16; on the CPU this script runs it unchanged with
`.cuda()` made a no-op and float16 replaced by float32 (the CPU lacks half kernels), patched here only.

For each phantom `shifted_spec(2000 + i)`, the demo model's initial mask is the fixed image (what the
first alignment round sees) and each of the 8 demo atlas cases, placed by the same shift (isseg.placement),
the moving one. Printed per method: mean Dice of the warped atlas labels to the mask (labels present in
the mask) and to the phantom truth, folding (% of voxels with a non-positive Jacobian determinant),
seconds for the 8 atlas cases and peak resident memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_scaling import PeakSampler  # noqa: E402

from isseg import model_package, phantom  # noqa: E402
from isseg.alignment import AlignmentSettings, align_atlas, folding_fraction  # noqa: E402
from isseg.placement import initial_placement, overlap_shifts  # noqa: E402
from isseg.demo_model import demo_package_path  # noqa: E402
from isseg.metrics import dice_per_label  # noqa: E402
from isseg.networks import predict_probabilities  # noqa: E402
from isseg.pipeline import atlas_arrays  # noqa: E402
from isseg.io import resample_to  # noqa: E402


def run_on_cpu_as_written() -> None:
    """Let convexAdam's CUDA-only segmentation variant run on the CPU: .cuda() returns the tensor or module
    itself, synchronize does nothing, half precision becomes float32."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.half = lambda self, *args, **kwargs: self.float()


def convex_adam_labels(fixed: np.ndarray, moving: np.ndarray, args, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """ConvexAdam on two (z, y, x) label maps; returns the warped moving labels and the field (3, z, y, x)."""
    import nibabel as nib
    from convexAdam.apply_convex import apply_convex
    from convexAdam.convex_adam_nnUNet import convex_adam

    nib.save(nib.Nifti1Image(fixed.astype(np.float32), np.eye(4)), work / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(moving.astype(np.float32), np.eye(4)), work / "moving.nii.gz")
    convex_adam(str(work / "fixed.nii.gz"), str(work / "moving.nii.gz"), lambda_weight=args.lambda_weight,
                grid_sp=args.grid_sp, disp_hw=args.disp_hw, selected_niter=args.niter, selected_smooth=0,
                grid_sp_adam=2, ic=True, result_path=str(work))
    field = nib.load(work / "disp.nii.gz").get_fdata().astype(np.float32)
    values = np.unique(moving)
    indicators = np.stack([apply_convex(field, (moving == v).astype(np.float32)) for v in values])
    return values[indicators.argmax(0)], np.moveaxis(field, -1, 0)


def mean_dice(labels: np.ndarray, reference: np.ndarray) -> float:
    present = [int(v) for v in np.unique(reference) if v > 0]
    return float(np.nanmean(dice_per_label(labels, reference, present)))


def case_inputs(seed: int, package):
    """The mask (z, y, x) the first round aligns to, the truth on the model grid and the target tensor."""
    case = phantom.generate(phantom.shifted_spec(seed))
    kind = package.network_kind
    prepared = kind.prepare(case.image)
    network = package.build_network()
    probabilities = predict_probabilities(kind, network, prepared.tensor, torch.device("cpu"))
    truth = sitk.GetArrayFromImage(resample_to(case.labels, prepared.model_image, is_label=True))
    return probabilities, truth, prepared.tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--grid-sp", type=int, default=2, help="ConvexAdam's control grid spacing (voxels)")
    parser.add_argument("--disp-hw", type=int, default=4, help="ConvexAdam's search radius (control-grid voxels)")
    parser.add_argument("--niter", type=int, default=80, help="ConvexAdam's Adam iterations")
    parser.add_argument("--lambda-weight", type=float, default=1.25)
    args = parser.parse_args()
    run_on_cpu_as_written()
    torch.manual_seed(0)
    package = model_package.load(demo_package_path())
    atlas_images, atlas_labels = atlas_arrays(package)
    results = {"isseg": [], "convexAdam": []}
    for seed in range(2000, 2000 + args.cases):
        probabilities, truth, target = case_inputs(seed, package)
        mask = probabilities[0].argmax(0).numpy()
        monitor = PeakSampler(torch.device("cpu"))
        monitor.enter("isseg")
        started = time.monotonic()
        aligned = align_atlas(atlas_images, atlas_labels, target, probabilities, AlignmentSettings(), torch.device("cpu"))
        seconds = time.monotonic() - started
        warped = aligned.labels[:, 0].numpy()
        monitor.enter("convexAdam")
        results["isseg"].append(([mean_dice(w, mask) for w in warped], [mean_dice(w, truth) for w in warped],
                                 list(aligned.folding), seconds))
        shifts = overlap_shifts(atlas_labels, mask, [int(v) for v in np.unique(mask) if v > 0])
        _, placed = initial_placement(atlas_images, atlas_labels, mask.shape, shifts)
        started = time.monotonic()
        rows = ([], [], [])
        with tempfile.TemporaryDirectory() as work:
            for moving in placed[:, 0].numpy():
                labels, field = convex_adam_labels(mask, moving, args, Path(work))
                rows[0].append(mean_dice(labels, mask))
                rows[1].append(mean_dice(labels, truth))
                rows[2].append(float(folding_fraction(torch.as_tensor(field)[None])[0]))
        monitor.enter("done")
        results["convexAdam"].append((*rows, time.monotonic() - started))
        peaks = {name: monitor.peaks[name] / 2**20 for name in results}
        for name, per_case in results.items():
            dice_mask, dice_truth, folding, secs = per_case[-1]
            print(f"phantom {seed} {name:<10}: Dice to mask {np.mean(dice_mask):.3f}, to truth {np.mean(dice_truth):.3f}, "
                  f"folding {100 * np.mean(folding):.3f} %, {secs:.1f} s for 8 atlas cases, peak RSS {peaks[name]:.0f} MiB",
                  flush=True)
    print("\n| method | Dice to mask | Dice to truth | folding % | seconds (8 atlas cases) |\n|---|---|---|---|---|")
    for name, per_case in results.items():
        columns = [np.mean([np.mean(c[i]) for c in per_case]) for i in range(3)] + [np.mean([c[3] for c in per_case])]
        print(f"| {name} | {columns[0]:.3f} | {columns[1]:.3f} | {100 * columns[2]:.3f} | {columns[3]:.1f} |")


if __name__ == "__main__":
    main()
