"""benchmarks/realct_model.py, the test sets of the real-anatomy model's "anatomy" measurement, on the stand-in
ICRP body (Testing/icrp_support.py): each kind is there, the short scan is a 40 mm slab through the spleen,
and the varied body differs from the plain one in its organs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from icrp_support import write_fake_icrp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import realct_model  # noqa: E402


def test_the_anatomy_test_sets_hold_shifted_phantoms_the_body_its_slabs_and_varied_organs(tmp_path):
    write_fake_icrp(tmp_path / "icrp110")
    cases = realct_model.anatomy_test_cases(tmp_path, 1)
    by_kind = {kind: (case_id, image, labels) for kind, case_id, image, labels in cases}
    assert list(by_kind) == ["phantoms (shifted)", "ICRP adult male", "ICRP, 40 mm slab", "ICRP, organs varied"]
    _, body, body_labels = by_kind["ICRP adult male"]
    _, slab, slab_labels = by_kind["ICRP, 40 mm slab"]
    assert slab.GetSize()[2] * slab.GetSpacing()[2] == realct_model.SLAB_MM < body.GetSize()[2] * body.GetSpacing()[2]
    assert slab.GetSize()[:2] == body.GetSize()[:2] and (sitk.GetArrayViewFromImage(slab_labels) == 2).any()
    # The slab is the body's own voxels at their own place, not a resampled copy.
    index = body.TransformPhysicalPointToIndex(slab.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(slab),
                          sitk.GetArrayFromImage(body)[index[2]:index[2] + slab.GetSize()[2]])
    _, _, varied_labels = by_kind["ICRP, organs varied"]
    volumes = [np.bincount(sitk.GetArrayViewFromImage(v).ravel(), minlength=9)[1:] for v in (body_labels, varied_labels)]
    assert not np.array_equal(*volumes)  # organs resized


def test_the_anatomy_measurement_runs_the_built_in_demo_model_by_name(tmp_path):
    write_fake_icrp(tmp_path / "icrp110")
    results = tmp_path / "results"
    assert realct_model.main(["anatomy", "--model", "demo=demo", "--cases", "1", "--data-dir", str(tmp_path),
                              "--results", str(results)]) == 0
    table = (results / "anatomy.md").read_text(encoding="utf-8")
    assert table.startswith("| model | Dice on phantoms (shifted) | Dice on ICRP adult male | Dice on ICRP, 40 mm slab")
    assert "| demo | " in table


def test_an_atlas_draw_is_a_copy_of_the_weights_with_its_own_atlas_reused_when_there(tmp_path, demo_package):
    write_fake_icrp(tmp_path / "icrp110")
    plain = realct_model.package_with_atlas(demo_package, "none:1:0", tmp_path, tmp_path / "plain")
    varied = realct_model.package_with_atlas(demo_package, "population:2:0", tmp_path, tmp_path / "varied")
    for folder in (plain, varied):
        assert (folder / "model.safetensors").read_bytes() == (demo_package / "model.safetensors").read_bytes()
    manifests = [json.loads((folder / "atlas" / "manifest.json").read_text(encoding="utf-8")) for folder in (plain, varied)]
    assert [len(m["cases"]) for m in manifests] == [1, 2]
    assert manifests[0]["cases"][0]["sha256"] != manifests[1]["cases"][0]["sha256"]  # the organs were varied
    written = (varied / "atlas" / "manifest.json").stat().st_mtime_ns
    realct_model.package_with_atlas(demo_package, "population:2:0", tmp_path, varied)
    assert (varied / "atlas" / "manifest.json").stat().st_mtime_ns == written
