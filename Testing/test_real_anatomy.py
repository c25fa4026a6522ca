"""Tests of the real-anatomy benchmarks (benchmarks/real_anatomy*.py) without their data: plans,
tables, the job runner and the evaluation loop, on small masks, rows and folders built here (the
reference data in ../shared is not needed; the engine subprocesses are replaced where named).
"""

from __future__ import annotations

import json
import math
import sys
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_anatomy  # noqa: E402
import real_anatomy_jobs as jobs  # noqa: E402
import real_anatomy_plans as plans  # noqa: E402
import real_anatomy_reports as reports  # noqa: E402
import real_anatomy_steps as steps  # noqa: E402


def test_dice_of_masks():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert math.isnan(reports.dice(a, b))  # neither drew it: no score
    a[0, 0, :2] = True
    assert reports.dice(a, b) == 0.0
    b[0, 0, 1:3] = True
    assert reports.dice(a, b) == pytest.approx(2 * 1 / 4)
    assert reports.dice(a, a) == 1.0


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
    rows = reports.interobserver_rows("scanA", {"Brain": brain_first, "Lens-Lt": lens, "Cochlea-Lt": empty},
                                 {"Brain": brain_second, "Lens-Lt": lens, "Cochlea-Lt": empty}, voxel_ml)
    by_organ = {r["organ"]: r for r in rows}
    assert by_organ["Brain"]["dice"] == pytest.approx(0.9)
    assert by_organ["Brain"]["volume_first_ml"] == pytest.approx(600 * voxel_ml)
    assert by_organ["Lens-Lt"]["dice"] == 1.0
    assert math.isnan(by_organ["Cochlea-Lt"]["dice"])

    rows += reports.interobserver_rows("scanB", {"Brain": brain_first, "Lens-Lt": lens, "Cochlea-Lt": empty},
                                  {"Brain": brain_first, "Lens-Lt": empty, "Cochlea-Lt": empty}, voxel_ml)
    summary = {s["organ"]: s for s in reports.summarise_interobserver(rows, small_ml=1.0)}
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

    text = reports.interobserver_markdown(list(summary.values()))
    assert "| Brain | 2 | 0.950 ± 0.050 |" in text
    assert "| Cochlea-Lt | 0 | – ± – |" in text
    assert "yes" in text.splitlines()[3]  # the lens row


def test_interobserver_rows_refuse_masks_on_different_grids():
    with pytest.raises(ValueError, match="not on one grid"):
        reports.interobserver_rows("s", {"Brain": np.zeros((2, 2, 2))}, {"Brain": np.zeros((2, 2, 3))}, 1.0)


TOTALSEG_CLASSES = {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "4": "gallbladder", "5": "liver",
                    "6": "stomach", "7": "pancreas", "8": "adrenal_gland_right", "9": "adrenal_gland_left",
                    "52": "aorta", "63": "inferior_vena_cava"}


def test_totalseg_mapping_of_the_abdomen_labels():
    names = plans.abdomen_label_names()
    mapping = reports.totalseg_mapping(names, TOTALSEG_CLASSES)
    by_name = {names[value]: class_id for value, class_id in mapping.items()}
    assert by_name == {"liver": 5, "spleen": 1, "kidney_left": 3, "kidney_right": 2, "pancreas": 7,
                       "gallbladder": 4, "stomach": 6, "adrenal_left": 9, "adrenal_right": 8, "aorta": 52}
    # An organ the reference does not know is left out, and so is the background.
    assert reports.totalseg_mapping({0: "background", 1: "liver", 2: "brain"}, TOTALSEG_CLASSES) == {1: 5}


def test_compare_to_reference():
    prediction = np.zeros((2, 4, 4), np.uint8)
    reference = np.zeros((2, 4, 4), np.uint16)
    prediction[0, :2, :2] = 1  # liver, 4 voxels
    reference[0, :2, :] = 5  # liver in TotalSegmentator IDs, 8 voxels
    prediction[1, 0, 0] = 2  # spleen predicted where the reference has none
    rows = reports.compare_to_reference(prediction, reference, {1: 5, 2: 1}, {1: "liver", 2: "spleen"}, voxel_ml=0.5)
    liver, spleen = rows
    assert liver["dice"] == pytest.approx(2 * 4 / 12)
    assert (liver["predicted_ml"], liver["reference_ml"]) == (2.0, 4.0)
    assert math.isnan(spleen["dice"]) and spleen["predicted_ml"] == 0.5


def test_stage_ratios():
    ratios = reports.stage_ratios({"initial": 2.0, "align": 6.0, "refine": 12.0}, plain_inference_s=2.0)
    assert ratios == {"initial": 1.0, "align": 3.0, "refine": 6.0, "total": 10.0}


def test_case_plans_keep_patients_apart_and_are_seeded():
    train, test = ["p1", "p2a", "p2b"], ["p3"]
    scale = plans.SCALES["full"]
    plan = plans.headneck_case_plan(train, test, scale, seed=7)
    assert [c["source"] for c in plan["train"]] == train
    assert [c["source"] for c in plan["test"]] == test
    seeds = [tuple(c["seed"]) for c in plan["train"] + plan["test"]]
    assert len(set(seeds)) == len(seeds) and all(s[0] == 7 for s in seeds)
    limited = replace(scale, headneck_max_train_scans=3, headneck_max_test_scans=1)
    plan = plans.headneck_case_plan(["a", "b", "c", "d"], ["e", "f"], limited, seed=0)
    assert [c["source"] for c in plan["train"]] == ["a", "b", "c"] and len(plan["test"]) == 1

    abdomen = plans.abdomen_case_plan(scale, seed=1)
    assert len(abdomen["train"]) == scale.abdomen_train_cases
    assert len(abdomen["test"]) == scale.abdomen_test_cases
    assert not {tuple(c["seed"]) for c in abdomen["train"]} & {tuple(c["seed"]) for c in abdomen["test"]}


def test_organ_variant_table_of_evaluate_metrics():
    # As in `isseg evaluate`'s metrics.csv: a failed run is one row without organ and values.
    header = ["case", "method", "organ", "dice", "hd95_mm", "status", "error"]
    long_rows = [dict(zip(header, row)) for row in [
        ["c1", "initial", "liver", "0.8", "5", "ok", ""],
        ["c1", "isl_mask", "liver", "0.9", "3", "ok", ""],
        ["c2", "initial", "liver", "0.6", "", "ok", ""],
        ["c2", "isl_mask", "liver", "nan", "4", "ok", ""],
        ["c2", "isl_intensity", "", "", "", "failed", "out of memory"],
    ]]
    table = reports.organ_variant_table(long_rows, "dice")
    assert table == {"liver": {"initial": [0.8, 0.6], "isl_mask": [0.9]}}
    assert reports.organ_variant_table(long_rows, "hd95_mm") == {"liver": {"initial": [5.0], "isl_mask": [3.0, 4.0]}}

    text = reports.organ_table_markdown(table, ["liver", "spleen"])
    assert text.splitlines()[0] == "| organ | initial | isl_mask |"
    assert "| liver | 0.700 ± 0.100 | 0.900 |" in text
    assert "spleen" not in text


def test_write_csv_formats_floats(tmp_path):
    path = reports.write_csv([{"organ": "a", "dice": 0.123456}, {"organ": "b", "dice": float("nan")}], tmp_path / "t.csv")
    rows = reports.read_csv_rows(path)
    assert rows == [{"organ": "a", "dice": "0.1235"}, {"organ": "b", "dice": ""}]


def test_outside_repository_or_ignored(tmp_path):
    assert jobs.outside_repository_or_ignored(tmp_path)
    if not (jobs.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: git cannot tell what is ignored")
    assert not jobs.outside_repository_or_ignored(jobs.REPO_ROOT / "benchmarks" / "results")


def test_first_cases_dataset_points_at_the_original_files(tmp_path):
    source = tmp_path / "set"
    (source / "imagesTr").mkdir(parents=True)
    dataset = {"labels": {"0": "background", "1": "liver"}, "training": [
        {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
        {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}], "synthesis": {"a": {}, "b": {}}}
    (source / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    out = steps.first_cases_dataset(source / "dataset.json", 1, tmp_path / "first")
    written = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert written["labels"] == dataset["labels"] and written["numTraining"] == 1
    assert written["training"] == [{"image": str(source.resolve() / "imagesTr" / "a.nii.gz"),
                                    "label": str(source.resolve() / "labelsTr" / "a.nii.gz")}]
    assert len(json.loads((steps.first_cases_dataset(source / "dataset.json", 2, out) / "dataset.json")
                          .read_text(encoding="utf-8"))["training"]) == 2


def test_budget():
    assert jobs.Budget(None).allows(1e9)
    budget = jobs.Budget(1.0)
    budget.end = time.monotonic() + 100.0
    assert budget.allows(50.0, reserve_s=40.0)
    assert not budget.allows(50.0, reserve_s=60.0)


def test_steps_run_marks_and_skips(tmp_path, capsys):
    calls = []
    runner = jobs.Steps(tmp_path, force=False)
    assert runner.run("train_x", lambda value: calls.append(value) or value * 2, 21) == 42
    assert runner.marked("train_x") and runner.run("train_x", calls.append, 0) is None
    assert calls == [21] and list(runner.seconds()) == ["train_x"]
    forced = jobs.Steps(tmp_path, force=True)
    assert not forced.marked("train_x") and forced.seconds() == {}


def test_run_chains_runs_every_chain_and_reports_the_failed_one():
    def chain(name: str) -> str:
        if name == "headneck":
            raise RuntimeError("training diverged")
        time.sleep(0.05)
        return name.upper()

    for parallel in (True, False):
        values, failures = jobs.run_chains(["headneck", "abdomen"], chain, parallel=parallel)
        assert values == {"abdomen": "ABDOMEN"}
        assert failures == {"headneck": "RuntimeError: training diverged"}


def test_chain_datasets_and_threads():
    assert real_anatomy.chain_datasets({"headneck"}) == ["headneck"]
    assert real_anatomy.chain_datasets({"realct"}) == ["abdomen"]  # the real CT needs the abdomen model
    assert real_anatomy.chain_datasets({"headneck", "speed"}) == ["headneck", "abdomen"]
    assert steps.subprocess_threads(1) is None and steps.subprocess_threads(2) >= 1


def run_context(tmp_path, force=False, budget_minutes=None, cases=3) -> steps.RunContext:
    test_set = tmp_path / "work" / "data" / "abdomen_test"
    test_set.mkdir(parents=True)
    (test_set / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": [
        {"image": f"./imagesTr/abd_test_{i:03d}.nii.gz", "label": f"./labelsTr/abd_test_{i:03d}.nii.gz"}
        for i in range(cases)]}), encoding="utf-8")
    args = Namespace(force=force, device="cpu", seed=0, jobs=1, abdomen_anatomy="elastic")
    return steps.RunContext(args=args, scale=plans.SCALES["quick"], bundle=tmp_path / "bundle", work=tmp_path / "work",
                            results=tmp_path / "results", manifest={}, parts={"abdomen"},
                            steps=jobs.Steps(tmp_path / "work", force), budget=jobs.Budget(budget_minutes),
                            reserve_s=0.0, threads=None)


@pytest.fixture
def evaluate_calls(monkeypatch):
    """Replaces the `isseg evaluate` subprocess: records (cases, resume) and writes its metrics.csv."""
    calls = []

    def fake(ctx, dataset, count, resume):
        calls.append((count, resume))
        folder = ctx.work / "evaluate" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.csv").write_text(f"{count} cases\n", encoding="utf-8")
        return 100.0

    monkeypatch.setattr(steps, "evaluate_first_cases", fake)
    return calls


def test_evaluation_adds_one_case_per_resumed_call_and_resumes_after_an_interruption(tmp_path, evaluate_calls):
    ctx = run_context(tmp_path)
    assert steps.evaluate(ctx, "abdomen") == (3, 3)
    assert evaluate_calls == [(1, True), (2, True), (3, True)]
    evaluate_calls.clear()
    assert steps.evaluate(ctx, "abdomen") == (3, 3) and evaluate_calls == []  # all done before
    (ctx.steps.dir / "evaluated_abdomen_abd_test_002").unlink()  # interrupted in the last case
    assert steps.evaluate(ctx, "abdomen") == (3, 3) and evaluate_calls == [(3, True)]
    evaluate_calls.clear()
    (ctx.work / "evaluate" / "abdomen" / "metrics.csv").unlink()  # the tables lost: written again
    assert steps.evaluate(ctx, "abdomen") == (3, 3) and evaluate_calls == [(3, True)]


def test_evaluation_stops_at_the_budget_and_starts_over_with_force(tmp_path, evaluate_calls):
    ctx = run_context(tmp_path / "budget", budget_minutes=1.0)
    ctx.budget.end = time.monotonic() + 50.0  # less than the 100 s one case took
    assert steps.evaluate(ctx, "abdomen") == (1, 3) and evaluate_calls == [(1, True)]
    evaluate_calls.clear()
    forced = run_context(tmp_path / "force", force=True, cases=2)
    assert steps.evaluate(forced, "abdomen") == (2, 2)
    assert evaluate_calls == [(1, False), (2, True)]  # --overwrite first, then --resume


def evaluate_folder(tmp_path) -> Path:
    """An `isseg evaluate` folder of 2 abdomen cases (one failed run) as its files look."""
    folder = tmp_path / "evaluate" / "abdomen"
    folder.mkdir(parents=True)
    rows = ["case,method,organ,dice,hd95_mm,status,error"]
    for case, (initial, isl) in {"c1": (0.80, 0.90), "c2": (0.70, 0.85)}.items():
        rows += [f"{case},initial,liver,{initial},5.0,ok,", f"{case},isl_mask,liver,{isl},3.0,ok,",
                 f"{case},initial,gallbladder,0.4,9.0,ok,", f"{case},isl_mask,gallbladder,0.5,8.0,ok,"]
    rows.append("c2,isl_intensity,,,,failed,out of memory")
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "summary.md").write_text("# Evaluation\n", encoding="utf-8")
    (folder / "dice_boxplot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    report = folder / "cases" / "c1" / "isl_mask" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"partial": False, "seconds": {"initial": 1.0, "align": 2.0, "refine": 5.0}}),
                      encoding="utf-8")
    return folder


def test_dataset_summary_of_an_evaluation_that_did_not_finish(tmp_path):
    folder, results = evaluate_folder(tmp_path), tmp_path / "results"
    reports.write_dataset_summary("abdomen", folder, results, plans.SCALES["quick"], None, planned=3)
    text = (results / "abdomen_summary.md").read_text(encoding="utf-8")
    assert "2 test cases of the 3 planned" in text
    assert "**1 runs failed** (see the evaluate summary): c2/isl_intensity" in text
    usual, small = text.split("## Dice, small or hard organs")
    assert "| liver | 0.750 ± 0.050 | 0.875 ± 0.025 |" in usual and "gallbladder" not in usual.split("## Dice")[1]
    assert "| gallbladder | 0.400 ± 0.000 | 0.500 ± 0.000 |" in small
    assert (results / "abdomen_evaluate_metrics.csv").read_text(encoding="utf-8") == \
           (folder / "metrics.csv").read_text(encoding="utf-8")


def test_speed_tables_from_a_timed_run_and_the_evaluate_reports(tmp_path):
    folder = evaluate_folder(tmp_path)
    timing = {"dataset": "abdomen (synthetic test case)", "case": "c1.nii.gz", "input_size": [60, 50, 40],
              "model_grid_size": [30, 25, 20], "atlas_cases": 4, "device": "cpu", "plain_inference_s": 2.0,
              "total_s": 20.0, "seconds": {"initial": 2.0, "align": 6.0, "refine": 10.0, "finalize": 2.0},
              "peak_rss_mib": {"initial": 500.0, "refine": 800.0}, "peak_gpu_mib": {}}
    reports.speed_tables([timing], {"abdomen": folder}, tmp_path)
    text = (tmp_path / "speed.md").read_text(encoding="utf-8")
    assert ("| abdomen (synthetic test case) | 60x50x40 | 30x25x20 | 4 | cpu | 2.00 | 2.0 (1x) | 6.0 (3x) | "
            "10.0 (5x) | 2.0 (1x) | 20.0 | 10x | 800 | – |") in text
    assert "| abdomen | isl_mask | 1 | initial 1.0, align 2.0, refine 5.0 | 8.0 |" in text
    row = reports.read_csv_rows(tmp_path / "speed.csv")[0]
    assert row["total_over_plain"] == "10.0" and row["peak_gpu_mib"] == ""


def test_real_ct_markdown_names_organs_outside_the_reference():
    rows = [{"variant": variant, "organ": organ, "reference_id": 1, "dice": dice, "predicted_ml": ml,
             "reference_ml": reference}
            for variant, organ, dice, ml, reference in [("initial", "liver", 0.5, 900.0, 1000.0),
                                                        ("isl_mask", "liver", 0.9, 950.0, 1000.0),
                                                        ("initial", "spleen", math.nan, 3.0, 0.0),
                                                        ("isl_mask", "spleen", math.nan, 0.0, 0.0)]]
    text = reports.real_ct_markdown(rows, (512, 512, 20), (0.8, 0.8, 5.0), 10, plans.SCALES["quick"])
    assert "| liver | 1000.0 | 0.500 | 0.900 | 900.0 | 950.0 |" in text
    assert "Mean Dice of isl_mask over the 1 organs in the reference: 0.900" in text
    assert "false positives): spleen." in text and "20 slices (100 mm)" in text
