"""Time and peak memory of `isseg refine` with an nnU-Net v2 3d_fullres network at demo scale.

    python benchmarks/benchmark_nnunet_refine.py [--work DIR] [--device cpu|cuda] [--steps 20] [--update-every 10]

The network is what nnU-Net's own planner gives for the demo's phantoms (96 x 96 x 64 voxels at 4 mm):
its 3d_fullres plans with nnU-Net's default features per stage (32 ... 320), built by nnU-Net's trainer
(Testing/nnunet_model_builder.py; He-initialised weights: speed and memory do not depend on them). It is
packaged with `isseg package` together with 8 phantom atlas cases, then `isseg refine` runs on a shifted
phantom as a subprocess. Prints plain inference time (nnU-Net's predictor: sliding window with step 0.5,
Gaussian weighting and test-time mirroring over 3 axes; run_timing.plain_inference_seconds), refine wall time per stage (report.json) and the
worker's peak resident memory. No external data is read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "InferenceSpecificSeg"))

from isseg import model_package, packaging, phantom  # noqa: E402
from run_timing import plain_inference_seconds  # noqa: E402


def build_nnunet_folder(work: Path) -> Path:
    command = [sys.executable, str(REPO / "Testing" / "nnunet_model_builder.py"), str(work / "nnunet"),
               "--features", "--size", "96", "96", "64", "--spacing", "4"]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--align-iterations", type=int, default=100)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="isseg-nnunet-bench-"))
    folder = build_nnunet_folder(work)
    atlas = phantom.write_msd_dataset(work / "atlas", [phantom.training_spec(seed) for seed in range(8)])
    package_path = work / "package"
    packaging.build_package(packaging.read_network(folder, "all", None), atlas, package_path)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]
    network = model_package.load(package_path, check_atlas=False).build_network()
    case = phantom.generate(phantom.shifted_spec(100))
    case_path = work / "case.nrrd"
    sitk.WriteImage(case.image, str(case_path))
    device = torch.device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""))
    print(f"network: nnU-Net 3d_fullres {plans['architecture']['network_class_name'].rsplit('.', 1)[-1]}, features "
          f"{plans['architecture']['arch_kwargs']['features_per_stage']}, patch {plans['patch_size']}, "
          f"{sum(p.numel() for p in network.parameters()) / 1e6:.1f} M parameters")
    inference_s = plain_inference_seconds(package_path, case.image, device)
    print(f"case: {case.image.GetSize()} voxels, 8 atlas cases; plain inference {inference_s:.1f} s")
    output = work / "refined"
    command = [sys.executable, "-m", "isseg.cli", "refine", "--input", str(case_path), "--model", str(package_path),
               "--output", str(output), "--progress", "json", "--device", args.device, "--rounds", "1",
               "--steps", str(args.steps), "--update-every", str(args.update_every),
               "--align-iterations", str(args.align_iterations)]
    start = time.monotonic()
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(REPO / "InferenceSpecificSeg")))
    _, status, usage = os.wait4(worker.pid, 0)  # this worker's own peak memory, not the builder's
    total = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"isseg refine failed with exit code {os.waitstatus_to_exitcode(status)}")
    peak_mib = usage.ru_maxrss / 1024
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    truth = sitk.GetArrayFromImage(case.labels)
    from isseg.metrics import dice_per_label

    dice = [np.nanmean(dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(str(output / name))), truth, range(1, 7)))
            for name in ("snapshot_0000.nrrd", "labelmap.nrrd")]
    print(f"refine ({args.steps} steps, update every {args.update_every}, 1 round): {total:.0f} s wall = "
          f"{total / inference_s:.0f} x plain inference; peak RSS {peak_mib:.0f} MiB; stages {report['seconds']}; "
          f"mean Dice {dice[0]:.3f} -> {dice[1]:.3f} (random weights: not a quality figure)")
    print(json.dumps({"total_s": round(total, 1), "inference_s": round(inference_s, 2), "peak_rss_mib": round(peak_mib),
                      "stages_s": report["seconds"]}))


if __name__ == "__main__":
    main()
