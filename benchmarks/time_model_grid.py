"""What smoothing a fine CT before resampling it onto the model grid costs (isseg.preprocess.to_model_grid).

    PYTHONPATH=InferenceSpecificSeg python benchmarks/time_model_grid.py [--size 512 512 300]
        [--spacing 0.8 0.8 1.5] [--model-spacing 3 3 3] [--repeats 3]

A generated int16 CT (soft tissue with noise, seeded; the time depends on the sizes, not on the values) of
`--size` voxels (x, y, z) at `--spacing` mm is put on a `--model-spacing` grid twice: by linear
resampling alone (the engine before the smoothing) and by to_model_grid (smoothing, then the same
resampling). Prints the best of `--repeats` seconds of each, their ratio, the noise SD (HU) each leaves,
and the peak resident memory (MiB) before and after the smoothed run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "InferenceSpecificSeg"))
from isseg import io, preprocess  # noqa: E402

NOISE_SD_HU = 20.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_seconds(run, repeats: int) -> tuple[float, sitk.Image]:
    """The shortest of `repeats` timed calls of `run`, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def noise_sd(image: sitk.Image) -> float:
    """SD (HU) of the central quarter of the grid, away from the air padding at the borders."""
    array = sitk.GetArrayViewFromImage(image)
    z, y, x = (n // 4 for n in array.shape)
    return float(np.std(array[z:-z, y:-y, x:-x]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5))
    parser.add_argument("--model-spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    array = np.random.default_rng(0).normal(40.0, NOISE_SD_HU, tuple(args.size)[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(args.spacing))
    del array
    grid = io.model_grid(image, args.model_spacing, "LPS")
    plain_s, plain = best_seconds(lambda: io.resample_to(image, io.model_grid(image, args.model_spacing, "LPS"),
                                                         is_label=False, default_value=preprocess.AIR_HU),
                                  args.repeats)
    before_mib = peak_rss_mib()
    smoothed_s, smoothed = best_seconds(lambda: preprocess.to_model_grid(image, args.model_spacing, "LPS"),
                                        args.repeats)
    print(f"CT {args.size} voxels at {args.spacing} mm -> {args.model_spacing} mm "
          f"(sigmas {[round(s, 2) for s in preprocess.antialiasing_sigmas_mm(image, grid)]} mm)")
    print(f"resampling alone: {plain_s:.2f} s, noise SD {noise_sd(plain):.1f} HU (input {NOISE_SD_HU:.0f})")
    print(f"smoothing + resampling: {smoothed_s:.2f} s ({smoothed_s / plain_s:.1f} x), noise SD {noise_sd(smoothed):.1f} HU")
    print(f"peak RSS: {before_mib:.0f} MiB before the smoothed runs, {peak_rss_mib():.0f} MiB after")


if __name__ == "__main__":
    main()
