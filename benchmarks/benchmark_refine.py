"""Wall time and peak memory per stage of `isseg refine`, and its cost relative to plain inference.

    python benchmarks/benchmark_refine.py [--device cpu|cuda] [--seed 100] [--repeats 1]

The case is a generated phantom of 96 x 96 x 64 voxels (4 mm) from `phantom.shifted_spec`, the model
the built-in demo model with its 8 atlas cases, the settings the defaults of `isseg refine`. No
external data is read. Prints one table per run: seconds and peak memory (resident set of this
process, sampled every 20 ms; on CUDA also the peak of allocated GPU memory) per stage, the time of
plain inference (initial segmentation only, network already loaded) measured in the same process,
and the ratio of the whole refine to it. Ratios measured in one run are what to compare: absolute
times vary with the load of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from isseg import phantom
from isseg.metrics import dice_per_label
from isseg.demo_model import demo_package_path
from isseg.device import resolve_device
from isseg.pipeline import Run
from isseg.refinement import RefineSettings
from run_timing import StageMonitor, plain_inference_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = resolve_device(args.device)
    demo_package_path()  # generates the demo atlas once, outside the timed runs
    case = phantom.generate(phantom.shifted_spec(args.seed))
    truth = sitk.GetArrayFromImage(case.labels)
    with tempfile.TemporaryDirectory() as work:
        case_path = Path(work) / "case.nrrd"
        sitk.WriteImage(case.image, str(case_path))
        inference_s = plain_inference_seconds(demo_package_path(), sitk.ReadImage(str(case_path), sitk.sitkFloat32),
                                              device, repeats=3)
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        if device.type == "cuda":
            machine += f", {torch.cuda.get_device_name(0)}"
        print(f"machine: {machine}")
        print(f"case: {case.image.GetSize()} voxels, 8 atlas cases, device {device}")
        print(f"plain inference: {inference_s:.2f} s")
        for repeat in range(args.repeats):
            output = Path(work) / f"run{repeat}"
            monitor = StageMonitor(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.monotonic()
            result = Run(case_path, demo_package_path(), output, RefineSettings(), monitor, device, seed=0).execute()
            total = time.monotonic() - start
            stage_seconds = json.loads(result.report.read_text(encoding="utf-8"))["seconds"]
            initial = dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(str(output / "snapshot_0000.nrrd"))), truth, range(1, 7))
            final = dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(str(output / "labelmap.nrrd"))), truth, range(1, 7))
            print(f"\nrun {repeat + 1}: total {total:.1f} s = {total / inference_s:.0f} x plain inference; "
                  f"mean Dice {np.nanmean(initial):.3f} -> {np.nanmean(final):.3f}")
            print(f"{'stage':<10} {'seconds':>8} {'peak RSS MiB':>13}" + (f" {'peak GPU MiB':>13}" if device.type == "cuda" else ""))
            for stage, seconds in stage_seconds.items():
                row = f"{stage:<10} {seconds:>8.1f} {monitor.peak_rss.get(stage, 0) / 2**20:>13.0f}"
                if device.type == "cuda":
                    row += f" {monitor.peak_gpu.get(stage, 0) / 2**20:>13.0f}"
                print(row)
            print(json.dumps({"total_s": round(total, 2), "inference_s": round(inference_s, 3),
                              "ratio": round(total / inference_s, 1),
                              "stages_s": stage_seconds}))


if __name__ == "__main__":
    main()
