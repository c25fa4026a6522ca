"""CUDA behaviour of the worker: runs only where a CUDA GPU is usable (skipped in CI)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from isseg import phantom
from isseg.metrics import dice_per_label

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUICK = ["--steps", "60", "--update-every", "20", "--align-iterations", "40"]


def refine(tmp_path, case, *extra, env=None):
    case_path = tmp_path / "case.nrrd"
    sitk.WriteImage(case.image, str(case_path))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "isseg.cli", "refine", "--input", str(case_path), "--model", "demo",
         "--output", str(output), "--progress", "json", *extra],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600, encoding="utf-8")
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, events, output


def mean_dice(path, truth):
    return float(np.nanmean(dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), truth, range(1, 7))))


def test_refine_on_cuda_improves_on_initial(tmp_path):
    case = phantom.generate(phantom.shifted_spec(100))
    result, events, output = refine(tmp_path, case, "--device", "cuda", *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert report["device"].startswith("cuda")
    truth = sitk.GetArrayFromImage(case.labels)
    assert mean_dice(output / "labelmap.nrrd", truth) > mean_dice(output / "snapshot_0000.nrrd", truth) + 0.01


def test_out_of_gpu_memory_falls_back_to_the_cpu(tmp_path):
    case = phantom.generate(phantom.shifted_spec(101))
    result, events, output = refine(tmp_path, case, "--device", "cuda", "--steps", "4", "--update-every", "2",
                                    "--align-iterations", "4", env={"ISSEG_CUDA_MEMORY_FRACTION": "0.00001"})
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("CPU" in message for message in warnings), warnings
    assert json.loads((output / "report.json").read_text(encoding="utf-8"))["device"] == "cpu"
    assert events[-1]["event"] == "done"
