"""`isseg phantom` as a subprocess: the demo's generated CT, its true organs and their descriptions, as the
Slicer panel's "Load demo phantom" reads them."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from engine_support import run_worker
from isseg import demo_model, phantom


def test_phantom_writes_the_demo_case_with_the_demo_models_labels(tmp_path):
    output = tmp_path / "phantom"
    result, events = run_worker("phantom", "--output", str(output), "--seed", "3", "--progress", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    done = events[-1]
    assert done["event"] == "done"
    assert done == {"event": "done", "ct": str(output / "ct.nrrd"), "truth": str(output / "truth.nrrd"),
                    "segments": str(output / "segments.json")}

    expected = phantom.generate(phantom.shifted_spec(3))  # the case `isseg demo --seed 3` refines
    ct, truth = sitk.ReadImage(done["ct"]), sitk.ReadImage(done["truth"])
    assert ct.GetPixelID() == sitk.sitkInt16 and truth.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(sitk.Cast(expected.image, sitk.sitkInt16)))
    assert np.array_equal(sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(expected.labels))
    assert ct.GetSpacing() == truth.GetSpacing() == expected.image.GetSpacing()
    assert ct.GetOrigin() == truth.GetOrigin() == expected.image.GetOrigin()

    segments = json.loads((output / "segments.json").read_text(encoding="utf-8"))["segments"]
    demoLabels = demo_model.shipped_config()["labels"]
    assert [(s["value"], s["name"], s["color"]) for s in segments] == [(l["value"], l["name"], l["color"]) for l in demoLabels]
    assert set(np.unique(sitk.GetArrayFromImage(truth))) == {0} | {s["value"] for s in segments}

    from InferenceSpecificSegLib.protocol import readSegmentsFile  # what the panel reads

    assert [segment.name for segment in readSegmentsFile(output / "segments.json")] == [s["name"] for s in segments]
