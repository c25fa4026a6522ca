"""Tests of the k-fold head-and-neck benchmark (benchmarks/headneck_kfold.py): the folds by patient, the
organ set, the case subsets, the pooled tables, the time budget, and one whole run on a tiny bundle made
here (real `isseg train` and `isseg evaluate` subprocesses; ../shared is not needed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import headneck_kfold as kfold  # noqa: E402
import headneck_kfold_reports as kreports  # noqa: E402
import real_anatomy_jobs as jobs  # noqa: E402
import real_anatomy_plans as plans  # noqa: E402
import real_anatomy_steps as steps  # noqa: E402
import synthetic_ct as sct  # noqa: E402

SCANS = ["0522c0014", "0522c0017", "0522c0727a", "0522c0727b", "0522c0057", "TCGA-CV-5977", "TCGA-CV-5978",
         "0522c0161", "0522c0226", "0522c0251"]


def test_patient_folds_hold_every_scan_once_keep_patients_together_and_balance():
    for seed in range(10):
        folds = sct.headneck_patient_folds(SCANS, 3, seed)
        assert sorted(s for fold in folds for s in fold) == sorted(SCANS)
        together = [fold for fold in folds if "0522c0727a" in fold]
        assert len(together) == 1 and "0522c0727b" in together[0]
        sizes = sorted(len(fold) for fold in folds)
        assert sizes[-1] - sizes[0] <= 2  # one patient has two scans
    assert sct.headneck_patient_folds(SCANS, 3, 1) == sct.headneck_patient_folds(SCANS, 3, 1)
    assert any(sct.headneck_patient_folds(SCANS, 3, 1) != sct.headneck_patient_folds(SCANS, 3, s) for s in range(2, 6))
    with pytest.raises(ValueError):
        sct.headneck_patient_folds(SCANS, 1, 0)


def test_kfold_organs_leave_out_the_small_ones_and_number_the_rest_from_one():
    organs = plans.HEADNECK_KFOLD_ORGANS
    assert len(organs) == 13 and not set(organs) & set(plans.HEADNECK_SMALL_ORGANS)
    names = plans.headneck_label_names(organs)
    assert list(names) == list(range(14)) and names[1] == "Brain" and names[13] == "Submandibular-Rt"
    target = plans.headneck_target(organs)
    labels = sitk.GetImageFromArray(np.array([[[sct.HEADNECK_LABEL["Lens-Lt"], sct.HEADNECK_LABEL["Mandible"],
                                               sct.HeadNeckTissue.SKULL]]], dtype=np.uint8))
    assert sitk.GetArrayFromImage(sct.relabel(labels, target)).ravel().tolist() == [0, names_value(names, "Mandible"), 0]
    assert plans.headneck_label_names() == {0: "background", **{v: k for k, v in sct.HEADNECK_LABEL.items()}}


def names_value(names: dict[int, str], organ: str) -> int:
    return next(value for value, name in names.items() if name == organ)


def test_subset_dataset_lists_the_named_cases_in_order_with_absolute_paths(tmp_path):
    source = tmp_path / "all"
    source.mkdir()
    (source / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": [
        {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("a", "b", "c")]}), encoding="utf-8")
    out = steps.subset_dataset(source / "dataset.json", ["c", "a"], tmp_path / "subset")
    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert [e["image"] for e in dataset["training"]] == [str(source / "imagesTr" / f"{c}.nii.gz") for c in "ca"]
    assert dataset["numTraining"] == 2 and dataset["labels"] == {"0": "background"}
    with pytest.raises(KeyError):
        steps.subset_dataset(source / "dataset.json", ["d"], tmp_path / "missing")


def write_case_record(work: Path, group: str, scan: str, scores: dict, errors: dict | None = None) -> None:
    folder = work / "evaluate" / group / scan / "cases" / f"hn_test_{scan}"
    folder.mkdir(parents=True)
    (folder / "case.json").write_text(json.dumps({"case": f"hn_test_{scan}", "errors": errors or {}, "scores": {
        method: {organ: [dice, 3.0] for organ, dice in organs.items()} for method, organs in scores.items()}}), encoding="utf-8")


def plan_of(folds, organs=("Brain", "Mandible")) -> kfold.KFoldPlan:
    return kfold.KFoldPlan(folds=folds, organs=organs, spacing_mm=4.0, patch=(16, 16, 16), channels=(4, 8),
                           train_steps=4, evaluate_every=2, seed=0)


def test_pooled_tables_pair_every_scan_and_flag_an_organ_that_got_worse(tmp_path):
    work, scans = tmp_path / "work", [f"s{i}" for i in range(6)]
    for i, scan in enumerate(scans):
        write_case_record(work, "primary", scan, {"initial": {"Brain": 0.80 + 0.01 * i, "Mandible": 0.90},
                                                  "registration": {"Brain": 0.7, "Mandible": 0.8},
                                                  "isl_mask": {"Brain": 0.85 + 0.012 * i, "Mandible": 0.88}})
        if i < 5:  # the secondary variant did not finish on the last scan
            write_case_record(work, "secondary", scan, {"initial": {"Brain": 0.0, "Mandible": 0.0},
                                                        "isl_mask_last_iterate": {"Brain": 0.8, "Mandible": 0.9}})
    write_case_record(work, "primary", "failed", {"initial": {"Brain": 0.8}}, errors={"isl_mask": "out of memory"})
    plan = plan_of([scans[:3], scans[3:] + ["failed"]])
    results = kreports.pooled_case_results(work, plan.scans)
    assert [r.case_id for r in results] == [f"hn_test_{s}" for s in scans]  # the failed case is left out
    assert results[0].scores["initial"]["Brain"][0] == pytest.approx(0.80)  # the primary baselines win
    assert kreports.complete_methods(results) == ["initial", "registration", "isl_mask"]
    path = kreports.write_kfold_results(work, tmp_path / "results", plan, None, ["python3", "x.py"], {"train_fold_0": 60.0})
    text = path.read_text(encoding="utf-8")
    assert "6 scans evaluated" in text and "left out of the tables: isl_mask_last_iterate (5 scans)." in text
    assert "+1.7 points, Wilcoxon p = 0.0312 over the scans" in text  # every scan better: 2 / 2**6
    assert "1 of 2 organs better, 1 worse by more than 1 point (Mandible)" in text and "**missed**" in text
    assert "| Mandible | 6 |" in text and "**worse by more than 1 point**" in text
    summary = (tmp_path / "results" / "evaluate" / "summary.md").read_text(encoding="utf-8")
    assert "6 cases" in summary
    assert len((tmp_path / "results" / "evaluate" / "metrics.csv").read_text(encoding="utf-8").splitlines()) == 1 + 6 * 3 * 2


def test_fold_chain_runs_primary_on_every_scan_before_secondary_and_stops_at_the_budget(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kfold, "train_fold", lambda run, fold: calls.append(("train", fold)))

    def fake_evaluate(run, fold, scan, group, variants):
        calls.append((group, scan))
        return 100.0

    monkeypatch.setattr(kfold, "evaluate_scan", fake_evaluate)
    run = kfold.KFoldRun(plan=plan_of([["a", "b"], ["c"]]), work=tmp_path, device="cpu",
                         steps=jobs.Steps(tmp_path, force=False), budget=jobs.Budget(None), threads=None,
                         refine_options=(), secondary=("isl_intensity",))
    assert kfold.fold_chain(run, 0) == 4
    assert calls == [("train", 0), ("primary", "a"), ("primary", "b"), ("secondary", "a"), ("secondary", "b")]
    calls.clear()
    assert kfold.fold_chain(run, 0) == 4 and calls == []  # all marked done
    run.budget = jobs.Budget(1.0)
    run.budget.end = time.monotonic() + 50.0  # less than the 100 s an evaluation took
    (tmp_path / "done" / "evaluate_secondary_b").unlink()
    (tmp_path / "done" / "evaluate_secondary_a").unlink()
    assert kfold.fold_chain(run, 0) == 3  # the first of a group has no estimate yet; the second waits
    assert calls == [("secondary", "a")]


def tiny_bundle(folder: Path, scans: list[str]) -> Path:
    """A bundle of head-and-neck tissue maps (brain, orbits, mandible, a lens, canal; skull and body
    generated) of slightly different sizes, and its manifest."""
    (folder / "headneck_tissues").mkdir(parents=True)
    label = sct.HEADNECK_LABEL
    for i, scan in enumerate(scans):
        labels = np.zeros((40, 44, 44), dtype=np.uint8)  # (z, y, x) at 4 mm
        zz, yy, xx = np.indices(labels.shape)
        labels[((zz - 26) / (10 + i)) ** 2 + ((yy - 22) / 12) ** 2 + ((xx - 22) / 11) ** 2 <= 1] = label["Brain"]
        labels[((zz - 18) / 3) ** 2 + ((yy - 9) / 3) ** 2 + ((xx - 15) / 3) ** 2 <= 1] = label["Orbit-Rt"]
        labels[((zz - 18) / 3) ** 2 + ((yy - 9) / 3) ** 2 + ((xx - 29) / 3) ** 2 <= 1] = label["Orbit-Lt"]
        labels[18, 8, 15] = label["Lens-Rt"]
        labels[6:10, 8:14, 12:32] = label["Mandible"]
        labels[:16, 28:31, 21:24] = label["Spinal-Canal"]
        image = sitk.GetImageFromArray(labels)
        image.SetSpacing((4.0, 4.0, 4.0))
        sitk.WriteImage(sct.headneck_tissues(image), str(folder / "headneck_tissues" / f"{scan}.nii.gz"))
    (folder / "manifest.json").write_text(json.dumps({"seed": 0, "headneck_train_scans": scans[:-1],
                                                      "headneck_test_scans": scans[-1:]}), encoding="utf-8")
    return folder


def test_a_whole_run_on_a_tiny_bundle_evaluates_every_scan_once(tmp_path):
    scans = ["0001", "0002a", "0002b"]
    bundle = tiny_bundle(tmp_path / "bundle", scans)
    argv = ["--bundle", str(bundle), "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--data-dir", str(tmp_path / "no-data"), "--folds", "2", "--spacing", "8", "--patch", "16", "16", "16",
            "--channels", "4", "8", "--train-steps", "2", "--evaluate-every", "2", "--device", "cpu", "--jobs", "1",
            "--secondary-variants",
            "--refine-options", "--steps 2 --update-every 1 --rounds 1 --align-iterations 2"]
    assert kfold.main(argv) == 0
    plan = json.loads((tmp_path / "work" / "plan.json").read_text(encoding="utf-8"))
    assert sorted(s for fold in plan["folds"] for s in fold) == scans
    dataset = json.loads((tmp_path / "work" / "data" / "headneck_train" / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {str(k): v for k, v in plans.headneck_label_names(plans.HEADNECK_KFOLD_ORGANS).items()}
    for fold, test_scans in enumerate(plan["folds"]):
        trained_on = json.loads((tmp_path / "work" / "data" / f"fold_{fold}_train" / "dataset.json").read_text(encoding="utf-8"))
        sources = {Path(entry["image"]).name for entry in trained_on["training"]}
        assert sources == {f"hn_train_{s}.nii.gz" for s in scans if s not in test_scans}
    text = (tmp_path / "results" / "headneck_kfold.md").read_text(encoding="utf-8")
    assert "3 scans evaluated" in text and "| Mandible | 3 |" in text
    rows = (tmp_path / "results" / "evaluate" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert {row.split(",")[0] for row in rows[1:]} == {f"hn_test_{s}" for s in scans}
    assert all(row.split(",")[5] == "ok" for row in rows[1:])
    assert kfold.main(argv) == 0  # a second run finds every step done and writes the same tables
    assert (tmp_path / "results" / "headneck_kfold.md").read_text(encoding="utf-8").split("## Steps")[0] == text.split("## Steps")[0]
