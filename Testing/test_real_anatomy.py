"""Tests of the pure helpers of benchmarks/real_anatomy.py.

Small masks and tables built here; the reference data in ../shared is not needed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_anatomy as ra  # noqa: E402


def test_dice_of_masks():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert math.isnan(ra.dice(a, b))  # neither drew it: no score
    a[0, 0, :2] = True
    assert ra.dice(a, b) == 0.0
    b[0, 0, 1:3] = True
    assert ra.dice(a, b) == pytest.approx(2 * 1 / 4)
    assert ra.dice(a, a) == 1.0


def test_interobserver_rows_and_summary_flag_small_organs():
    shape = (10, 20, 20)
    brain_first = np.zeros(shape, np.uint8)
    brain_first[2:8, 5:15, 5:15] = 1
    brain_second = np.zeros(shape, np.uint8)
    brain_second[2:8, 5:15, 6:16] = 1  # shifted by one voxel: Dice 0.9
    lens = np.zeros(shape, np.uint8)
    lens[5, 10, 10] = 1
    empty = np.zeros(shape, np.uint8)
    voxel_ml = 0.1  # 100 mm^3 voxels
    rows = ra.interobserver_rows("scanA", {"Brain": brain_first, "Lens-Lt": lens, "Cochlea-Lt": empty},
                                 {"Brain": brain_second, "Lens-Lt": lens, "Cochlea-Lt": empty}, voxel_ml)
    by_organ = {r["organ"]: r for r in rows}
    assert by_organ["Brain"]["dice"] == pytest.approx(0.9)
    assert by_organ["Brain"]["volume_first_ml"] == pytest.approx(600 * voxel_ml)
    assert by_organ["Lens-Lt"]["dice"] == 1.0
    assert math.isnan(by_organ["Cochlea-Lt"]["dice"])

    rows += ra.interobserver_rows("scanB", {"Brain": brain_first, "Lens-Lt": lens, "Cochlea-Lt": empty},
                                  {"Brain": brain_first, "Lens-Lt": empty, "Cochlea-Lt": empty}, voxel_ml)
    summary = {s["organ"]: s for s in ra.summarise_interobserver(rows, small_ml=1.0)}
    assert list(summary) == ["Brain", "Lens-Lt", "Cochlea-Lt"]
    assert summary["Brain"]["n"] == 2
    assert summary["Brain"]["dice_mean"] == pytest.approx(0.95)
    assert summary["Brain"]["dice_std"] == pytest.approx(0.05)
    assert not summary["Brain"]["small"]
    assert summary["Lens-Lt"]["dice_mean"] == pytest.approx(0.5)
    assert summary["Lens-Lt"]["dice_min"] == 0.0
    assert summary["Lens-Lt"]["small"]  # 0.1 ml
    assert summary["Cochlea-Lt"]["n"] == 0 and math.isnan(summary["Cochlea-Lt"]["dice_mean"])
    assert not summary["Cochlea-Lt"]["small"]  # never drawn: unknown size, not flagged

    text = ra.interobserver_markdown(list(summary.values()))
    assert "| Brain | 2 | 0.950 ± 0.050 |" in text
    assert "| Cochlea-Lt | 0 | n/a ± n/a |" in text
    assert "yes" in text.splitlines()[3]  # the lens row


def test_interobserver_rows_refuse_masks_on_different_grids():
    with pytest.raises(ValueError, match="not on one grid"):
        ra.interobserver_rows("s", {"Brain": np.zeros((2, 2, 2))}, {"Brain": np.zeros((2, 2, 3))}, 1.0)


TOTALSEG_CLASSES = {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "4": "gallbladder", "5": "liver",
                    "6": "stomach", "7": "pancreas", "8": "adrenal_gland_right", "9": "adrenal_gland_left",
                    "52": "aorta", "63": "inferior_vena_cava"}


def test_totalseg_mapping_of_the_abdomen_labels():
    names = ra.abdomen_label_names()
    mapping = ra.totalseg_mapping(names, TOTALSEG_CLASSES)
    by_name = {names[value]: class_id for value, class_id in mapping.items()}
    assert by_name == {"liver": 5, "spleen": 1, "kidney_left": 3, "kidney_right": 2, "pancreas": 7,
                       "gallbladder": 4, "stomach": 6, "adrenal_left": 9, "adrenal_right": 8, "aorta": 52}
    # An organ the reference does not know is left out, and so is the background.
    assert ra.totalseg_mapping({0: "background", 1: "liver", 2: "brain"}, TOTALSEG_CLASSES) == {1: 5}


def test_compare_to_reference():
    prediction = np.zeros((2, 4, 4), np.uint8)
    reference = np.zeros((2, 4, 4), np.uint16)
    prediction[0, :2, :2] = 1  # liver, 4 voxels
    reference[0, :2, :] = 5  # liver in TotalSegmentator IDs, 8 voxels
    prediction[1, 0, 0] = 2  # spleen predicted where the reference has none
    rows = ra.compare_to_reference(prediction, reference, {1: 5, 2: 1}, {1: "liver", 2: "spleen"}, voxel_ml=0.5)
    liver, spleen = rows
    assert liver["dice"] == pytest.approx(2 * 4 / 12)
    assert (liver["predicted_ml"], liver["reference_ml"]) == (2.0, 4.0)
    assert math.isnan(spleen["dice"]) and spleen["predicted_ml"] == 0.5


def test_stage_ratios():
    ratios = ra.stage_ratios({"initial": 2.0, "align": 6.0, "refine": 12.0}, plain_inference_s=2.0)
    assert ratios == {"initial": 1.0, "align": 3.0, "refine": 6.0, "total": 10.0}


def test_case_plans_keep_patients_apart_and_are_seeded():
    train, test = ["p1", "p2a", "p2b"], ["p3"]
    scale = ra.SCALES["full"]
    plan = ra.headneck_case_plan(train, test, scale, seed=7)
    assert [c["source"] for c in plan["train"]] == train
    assert [c["source"] for c in plan["test"]] == test
    seeds = [tuple(c["seed"]) for c in plan["train"] + plan["test"]]
    assert len(set(seeds)) == len(seeds) and all(s[0] == 7 for s in seeds)
    limited = ra.replace(scale, headneck_max_train_scans=3, headneck_max_test_scans=1)
    plan = ra.headneck_case_plan(["a", "b", "c", "d"], ["e", "f"], limited, seed=0)
    assert [c["source"] for c in plan["train"]] == ["a", "b", "c"] and len(plan["test"]) == 1

    abdomen = ra.abdomen_case_plan(scale, seed=1)
    assert len(abdomen["train"]) == scale.abdomen_train_cases
    assert len(abdomen["test"]) == scale.abdomen_test_cases
    assert not {tuple(c["seed"]) for c in abdomen["train"]} & {tuple(c["seed"]) for c in abdomen["test"]}


def test_organ_variant_table_long_and_wide_formats():
    # As in `isseg evaluate`'s metrics.csv: a failed run is one row without organ and values.
    header = ["case", "method", "organ", "dice", "hd95_mm", "status", "error"]
    long_rows = [dict(zip(header, row)) for row in [
        ["c1", "initial", "liver", "0.8", "5", "ok", ""],
        ["c1", "isl_mask", "liver", "0.9", "3", "ok", ""],
        ["c2", "initial", "liver", "0.6", "", "ok", ""],
        ["c2", "isl_mask", "liver", "nan", "4", "ok", ""],
        ["c2", "isl_intensity", "", "", "", "failed", "out of memory"],
    ]]
    table = ra.organ_variant_table(long_rows, "dice")
    assert table == {"liver": {"initial": [0.8, 0.6], "isl_mask": [0.9]}}
    assert ra.organ_variant_table(long_rows, "hd95_mm") == {"liver": {"initial": [5.0], "isl_mask": [3.0, 4.0]}}

    wide_rows = [{"case": "c1", "organ": "liver", "dice_initial": "0.8", "dice_isl_mask": "0.9"}]
    assert ra.organ_variant_table(wide_rows, "dice") == {"liver": {"initial": [0.8], "isl_mask": [0.9]}}

    text = ra.organ_table_markdown(table, ["liver", "spleen"])
    assert text.splitlines()[0] == "| organ | initial | isl_mask |"
    assert "| liver | 0.700 ± 0.100 | 0.900 ± 0.000 |" in text
    assert "spleen" not in text


def test_write_csv_formats_floats(tmp_path):
    path = ra.write_csv([{"organ": "a", "dice": 0.123456}, {"organ": "b", "dice": float("nan")}], tmp_path / "t.csv")
    rows = ra.read_csv_rows(path)
    assert rows == [{"organ": "a", "dice": "0.1235"}, {"organ": "b", "dice": "n/a"}]


def test_outside_repository_or_ignored(tmp_path):
    assert ra.outside_repository_or_ignored(tmp_path)
    if not (ra.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: git cannot tell what is ignored")
    assert not ra.outside_repository_or_ignored(ra.REPO_ROOT / "benchmarks" / "results")


def test_single_case_dataset_points_at_the_original_files(tmp_path):
    source = tmp_path / "set"
    (source / "imagesTr").mkdir(parents=True)
    dataset = {"labels": {"0": "background", "1": "liver"}, "training": [
        {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
        {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}], "synthesis": {"a": {}, "b": {}}}
    (source / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    out = ra.single_case_dataset(source / "dataset.json", 1, tmp_path / "one")
    written = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert written["labels"] == dataset["labels"]
    assert written["training"] == [{"image": str(source.resolve() / "imagesTr" / "b.nii.gz"),
                                    "label": str(source.resolve() / "labelsTr" / "b.nii.gz")}]


def test_budget():
    assert ra.Budget(None).allows(1e9)
    budget = ra.Budget(1.0)
    budget.end = ra.time.monotonic() + 100.0
    assert budget.allows(50.0, reserve_s=40.0)
    assert not budget.allows(50.0, reserve_s=60.0)


def test_merge_evaluations_of_single_cases(tmp_path):
    pytest.importorskip("isseg.evaluate")
    header = "case,method,organ,dice,hd95_mm,status,error\n"
    dirs = []
    for case, (initial, isl) in {"c1": (0.80, 0.90), "c2": (0.70, 0.85), "c3": (0.75, 0.74)}.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "metrics.csv").write_text(
            header + f"{case},initial,liver,{initial},5.0,ok,\n{case},initial,spleen,,,ok,\n"
            f"{case},isl_mask,liver,{isl},3.0,ok,\n{case},isl_mask,spleen,,,ok,\n", encoding="utf-8")
        dirs.append(folder)
    (tmp_path / "c3" / "metrics.csv").write_text(
        (tmp_path / "c3" / "metrics.csv").read_text(encoding="utf-8") + "c3,isl_intensity,,,,failed,out of memory\n",
        encoding="utf-8")
    ra.merge_evaluations(dirs, tmp_path / "merged", "Test", planned=4)
    rows = ra.read_csv_rows(tmp_path / "merged" / "metrics.csv")
    assert len(rows) == 13 and rows[0]["case"] == "c1" and rows[-1]["status"] == "failed"
    summary = (tmp_path / "merged" / "summary.md").read_text(encoding="utf-8")
    assert "Wilcoxon" in summary and "3 of the 4 test cases" in summary
    assert "out of memory" in summary
    assert (tmp_path / "merged" / "dice_boxplot.png").stat().st_size > 0
    table = ra.organ_variant_table(rows, "dice")
    assert table["liver"]["isl_mask"] == [0.9, 0.85, 0.74] and "spleen" not in table
