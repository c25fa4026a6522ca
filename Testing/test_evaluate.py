"""`isseg evaluate`: the scores and the statistics on hand-made examples, one small run end to end
(two phantom cases, two variants, a corrupt case that must show up as failed), and --resume after a
worker killed between cases (real subprocesses)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest

from engine_support import LiveWorker
from isseg import cli, phantom
from isseg.evaluate import BASELINES, CaseResult, paired_wilcoxon, score, summary_markdown
from isseg.events import EventWriter
from isseg.reporting import format_mean_sd
from isseg.model_training import TrainSettings, train_package

PHANTOM_SIZE, PHANTOM_SPACING = (48, 48, 32), (8.0, 8.0, 8.0)
ORGANS = {1: "liver", 2: "spleen"}


def test_dice_is_one_for_identical_masks_and_zero_for_disjoint_ones():
    truth = np.zeros((6, 8, 8), dtype=np.uint8)
    truth[1:4, 1:4, 1:4] = 1
    disjoint = np.zeros_like(truth)
    disjoint[1:4, 5:8, 5:8] = 1
    spacing = (2.0, 1.0, 1.0)

    assert score(truth, truth, ORGANS, spacing)["liver"] == (1.0, 0.0)
    dice, hd95 = score(disjoint, truth, ORGANS, spacing)["liver"]
    assert dice == 0.0 and hd95 > 0
    spleen_dice, spleen_hd95 = score(truth, truth, ORGANS, spacing)["spleen"]  # in neither mask: no score
    assert math.isnan(spleen_dice) and math.isnan(spleen_hd95)


def test_wilcoxon_p_values_match_the_exact_distribution():
    baseline = [0.70, 0.72, 0.75, 0.80, 0.81, 0.90]
    # n = 6, all differences positive: W- = 0, the most extreme of 2^6 equally likely sign patterns
    # on either side, so the exact two-sided p = 2 / 64.
    improved = [b + d for b, d in zip(baseline, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06])]
    assert paired_wilcoxon(improved, baseline) == pytest.approx(2 / 64)
    # Differences ranked 1..6 with rank 4 negative: W- = 4. Sign patterns with a negative rank sum
    # <= 4: {}, {1}, {2}, {3}, {1,2}, {4}, {1,3} = 7 of 64, so two-sided p = 14 / 64.
    mixed = [b + d for b, d in zip(baseline, [0.01, 0.02, 0.03, -0.04, 0.05, 0.06])]
    assert paired_wilcoxon(mixed, baseline) == pytest.approx(14 / 64)
    # Pairs with a missing score are left out; identical methods give no evidence of a difference.
    assert paired_wilcoxon(improved + [math.nan], baseline + [0.5]) == pytest.approx(2 / 64)
    assert paired_wilcoxon(baseline, baseline) == 1.0
    assert math.isnan(paired_wilcoxon([math.nan], [0.5]))


def test_summary_reports_mean_sd_p_values_and_failures():
    results = []
    for case, gain in enumerate([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]):
        result = CaseResult(f"case{case}")
        result.scores["initial"] = {"liver": (0.8, 10.0), "spleen": (0.6, 20.0)}
        result.scores["isl_mask"] = {"liver": (0.8 + gain, 9.0), "spleen": (0.6 + gain, 18.0)}
        result.errors["registration"] = "Out of memory | retry"
        results.append(result)

    text = summary_markdown(results, ["initial", "registration", "isl_mask"], ["liver", "spleen"], "Test")
    assert "| initial | 6 | 0.800 | 0.600 | 0.700 |" in text.replace(" ± 0.000", "")
    assert "| isl_mask | 6 | 0.835 ± 0.019 | 0.635 ± 0.019 | 0.735 ± 0.019 |" in text
    assert "| isl_mask | 0.0312 | 0.0312 | 0.0312 |" in text
    assert all(f"| case{case} | registration | Out of memory / retry |" in text for case in range(6))


def test_mean_sd_leaves_out_missing_values_and_knows_both_sds():
    assert format_mean_sd([0.5, 0.7, math.nan, None]) == "0.600 ± 0.141"  # sample SD
    assert format_mean_sd([0.5, 0.7], ddof=0) == "0.600 ± 0.100"  # population SD
    assert format_mean_sd([np.float32("nan"), 0.25], digits=2) == "0.25"
    assert format_mean_sd([]) == "–"


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    """A package trained for a few steps on 3 small phantoms (2 of them become its atlas)."""
    specs = [phantom.training_spec(seed, size=PHANTOM_SIZE, spacing=PHANTOM_SPACING) for seed in range(3)]
    dataset = phantom.write_msd_dataset(tmp_path_factory.mktemp("train"), specs)
    settings = TrainSettings(spacing=PHANTOM_SPACING, patch_size=(32, 32, 16), channels=(4, 8, 16), steps=15,
                             evaluate_every=15, learning_rate=3e-3)
    return train_package(dataset, tmp_path_factory.mktemp("package") / "tiny", settings,
                         EventWriter(io.StringIO(), mode="json"), "cpu")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two shifted phantoms and a third case whose image file is corrupt."""
    specs = [phantom.shifted_spec(seed, size=PHANTOM_SIZE, spacing=PHANTOM_SPACING) for seed in (20, 21)]
    folder = phantom.write_msd_dataset(tmp_path_factory.mktemp("cases"), specs)
    (folder / "imagesTr" / "corrupt.nii.gz").write_bytes(b"not an image")
    (folder / "labelsTr" / "corrupt.nii.gz").write_bytes((folder / "labelsTr" / "phantom_020.nii.gz").read_bytes())
    description = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    description["training"].append({"image": "./imagesTr/corrupt.nii.gz", "label": "./labelsTr/corrupt.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return folder


# The smallest settings that still refine (2 steps, a moving-average update after each); both the
# end-to-end checks and the resume test use them, so one evaluation serves as the reference of both.
VARIANTS = ("isl_mask", "isl_mask_last_iterate")
OPTIONS = ("--variants", *VARIANTS, "--steps", "2", "--update-every", "1", "--rounds", "1",
           "--align-iterations", "2", "--seed", "3", "--device", "cpu", "--progress", "json")


def evaluate_arguments(cases, package, output, *extra) -> list[str]:
    return ["evaluate", "--cases", str(cases), "--model", str(package), "--output", str(output), *OPTIONS, *extra]


def evaluate_in_process(*arguments) -> tuple[int, list[dict]]:
    """`isseg evaluate` in this process (no interpreter and torch start-up); its exit code and events."""
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        code = cli.main(list(arguments))
    return code, [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def evaluation(tiny_package, cases, tmp_path_factory):
    """One uninterrupted evaluation of the three cases: its output folder and events."""
    output = tmp_path_factory.mktemp("evaluation") / "evaluation"
    code, events = evaluate_in_process(*evaluate_arguments(cases, tiny_package, output))
    assert code == 0, events[-3:]
    return output, events


def test_evaluate_end_to_end_reports_every_case_and_the_failed_one(evaluation):
    output, events = evaluation
    methods = [*BASELINES, *VARIANTS]

    with open(output / "metrics.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    for case in ("phantom_020", "phantom_021"):
        case_rows = [row for row in rows if row["case"] == case]
        assert {(row["method"], row["organ"]) for row in case_rows} == \
               {(method, label["name"]) for method in methods for label in phantom.LABELS}
        assert all(row["status"] == "ok" and 0 <= float(row["dice"]) <= 1 for row in case_rows)
    failed = [row for row in rows if row["case"] == "corrupt"]
    assert sorted(row["method"] for row in failed) == sorted(methods)
    assert all(row["status"] == "failed" and "corrupt.nii.gz" in row["error"] for row in failed)

    summary = (output / "summary.md").read_text(encoding="utf-8")
    for heading in ("## Dice", "## HD95 (mm)", "## Wilcoxon signed-rank p-values", "## Failed runs"):
        assert heading in summary
    assert all(f"| {method} | 2 |" in summary for method in methods)
    assert "| corrupt | initial, registration, isl_mask, isl_mask_last_iterate |" in summary
    assert (output / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    settings = json.loads((output / "settings.json").read_text(encoding="utf-8"))
    assert settings["seed"] == 3 and settings["methods"] == methods
    assert settings["variants"]["isl_mask_last_iterate"]["moving_average"] is False
    for method in ("registration", *VARIANTS):
        run_settings = json.loads((output / "cases" / "phantom_020" / method / "settings.json").read_text(encoding="utf-8"))
        assert run_settings["seed"] == 3
    assert (output / "cases" / "phantom_020" / "registration" / "labelmap.nrrd").is_file()

    assert events[-1]["event"] == "done" and events[-1]["failed_runs"] == len(methods)
    run_events = [event for event in events if event.get("method") == "isl_mask" and event.get("case") == "phantom_021"]
    assert run_events[0]["stage"] == "initial" and run_events[-1]["event"] == "done"


def file_times(folder) -> dict:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_resume_after_a_kill_computes_only_the_unfinished_cases(evaluation, tiny_package, cases, tmp_path):
    output = tmp_path / "interrupted"
    worker = LiveWorker(*evaluate_arguments(cases, tiny_package, output), stderr_path=tmp_path / "stderr.txt")
    for event in worker.events():
        if event["event"] == "progress" and event.get("stage") == "evaluate":
            worker.process.kill()  # after the first case; the second may have begun
            break
    worker.finish()
    assert [event["case"] for event in worker.received if event.get("stage") == "evaluate"] == ["phantom_020"]
    assert not (output / "metrics.csv").exists()
    first_case = file_times(output / "cases" / "phantom_020")

    code, events = evaluate_in_process(*evaluate_arguments(cases, tiny_package, output, "--resume"))
    assert code == 0, events[-3:]
    assert {event["case"]: event["read_back"] for event in events if event["event"] == "case"} == \
           {"phantom_020": True, "phantom_021": False, "corrupt": False}
    assert {event["case"] for event in events if event.get("method")} == {"phantom_021"}  # runs of case 2 only
    assert file_times(output / "cases" / "phantom_020") == first_case
    assert (output / "metrics.csv").read_text(encoding="utf-8") == \
           (evaluation[0] / "metrics.csv").read_text(encoding="utf-8"), "resumed, the same scores as uninterrupted"

    # A finished evaluation resumed: only the failed case runs again.
    code, events = evaluate_in_process(*evaluate_arguments(cases, tiny_package, output, "--resume"))
    assert code == 0
    assert [event["case"] for event in events if event["event"] == "case" and not event["read_back"]] == ["corrupt"]
    assert not [event for event in events if event.get("method")]


def test_an_earlier_evaluation_is_refused_without_resume_or_overwrite(tiny_package, cases, tmp_path):
    output = tmp_path / "evaluation"
    output.mkdir()
    (output / "settings.json").write_text(json.dumps({"refine": {"steps": 99}}), encoding="utf-8")
    code, events = evaluate_in_process(*evaluate_arguments(cases, tiny_package, output))
    assert code == 7 and events[-1]["kind"] == "output_folder"
    assert "--resume" in events[-1]["message"] and "--overwrite" in events[-1]["message"]
    code, events = evaluate_in_process(*evaluate_arguments(cases, tiny_package, output, "--resume"))
    assert code == 7 and "other settings" in events[-1]["message"] and "refine" in events[-1]["message"]
    assert not (output / "cases").exists()  # refused before any run
    with pytest.raises(SystemExit) as usage:
        cli.main(evaluate_arguments(cases, tiny_package, output, "--resume", "--overwrite"))
    assert usage.value.code == 2
