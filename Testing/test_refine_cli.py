"""The worker: `python -m isseg.cli refine` run as a subprocess, checked against the worker protocol
(docs/worker-protocol.md): events in order, atomic snapshots on the input grid, the refined mask
better than the initial one, cancellation with a partial result, fast and clear failures.
Also the protocol's building blocks: EventWriter and CancelToken.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_support import LiveWorker, run_worker, small_ct
from isseg import metrics, phantom
from isseg.errors import Cancelled
from isseg.events import EventWriter
from isseg.output_folder import OutputFolder
from isseg.pipeline import CancelToken, Run
from isseg.protocol import DEFAULT_STOP_WHEN_CONVERGED, result_is_complete
from isseg.refinement import RefineSettings

# Reduced settings (the defaults take several times longer); for shifted_spec(103) they raise the
# mean Dice from 0.834 to 0.862 on a CPU, in about 30 s on two idle cores.
CASE_SEED = 103
QUICK = ["--rounds", "1", "--steps", "40", "--update-every", "20", "--align-iterations", "40"]
ORGANS = [label["value"] for label in phantom.LABELS]


def refine_arguments(input_path, output, *extra, model="demo") -> list[str]:
    return ["refine", "--input", str(input_path), "--model", str(model), "--output", str(output),
            "--progress", "json", "--device", "cpu", *extra]


def mean_dice(labelmap_path, truth: np.ndarray) -> float:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labelmap_path)))
    return float(np.nanmean(metrics.dice_per_label(labels, truth, ORGANS)))


def assert_on_grid(image: sitk.Image, reference: sitk.Image, what: str) -> None:
    assert image.GetSize() == reference.GetSize(), f"{what}: size {image.GetSize()} != {reference.GetSize()}"
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-6, err_msg=f"{what}: origin")
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-9, err_msg=f"{what}: spacing")
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-9, err_msg=f"{what}: direction")


# ---------------------------------------------------------------------------------------------
# One complete run, shared by several tests.

@pytest.fixture(scope="module")
def refined(tmp_path_factory, demo_package):
    folder = tmp_path_factory.mktemp("refine")
    case = phantom.generate(phantom.shifted_spec(CASE_SEED))
    input_path = folder / "ct.nrrd"
    sitk.WriteImage(case.image, str(input_path))
    output = folder / "out"

    worker = LiveWorker(*refine_arguments(input_path, output, *QUICK), stderr_path=folder / "stderr.txt")
    seen_at_snapshot = []  # what a reader finds the moment each snapshot event arrives
    started = time.monotonic()
    for event in worker.events():
        if event["event"] == "snapshot":
            path = Path(event["path"])
            seen_at_snapshot.append({
                "index": event["index"],
                "segments_json": (output / "segments.json").is_file(),
                "labels": sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                "image": sitk.ReadImage(str(path)),
            })
    code = worker.finish()
    return {"code": code, "events": worker.received, "output": output, "case": case, "input": input_path,
            "seen_at_snapshot": seen_at_snapshot, "seconds": time.monotonic() - started, "stderr": worker.stderr()}


def test_refine_succeeds(refined):
    assert refined["code"] == 0, f"exit code {refined['code']}; stderr:\n{refined['stderr']}"
    done = refined["events"][-1]
    assert done["event"] == "done" and done["partial"] is False, refined["events"][-3:]
    for key in ("labelmap", "probabilities", "report"):
        assert Path(done[key]).is_file(), f"done names {key} {done[key]}, which does not exist"


def test_events_come_in_protocol_order(refined):
    known = ("stage", "progress", "snapshot", "done")
    tokens = []
    for event in refined["events"]:
        if event["event"] in ("stage", "progress"):
            tokens.append(f"{event['event']}:{event['stage']}")
        elif event["event"] in known:
            tokens.append(event["event"])
    sequence = " ".join(tokens)
    pattern = (r"stage:initial snapshot stage:align( progress:align)+ stage:refine"
               r"( progress:refine| snapshot)+ stage:finalize done")
    assert re.fullmatch(pattern, sequence), f"events out of order: {sequence}"

    snapshots = [e for e in refined["events"] if e["event"] == "snapshot"]
    assert [s["index"] for s in snapshots] == list(range(len(snapshots)))
    assert [s["step"] for s in snapshots] == [0, 20, 40]
    align_round = next(e for e in refined["events"] if e.get("stage") == "align" and e["event"] == "stage")
    assert align_round["round"] == 1

    for stage in ("align", "refine"):
        progress = [e for e in refined["events"] if e["event"] == "progress" and e["stage"] == stage]
        steps = [p["step"] for p in progress]
        assert steps == sorted(set(steps)) and steps[-1] == progress[-1]["total"], f"{stage} steps {steps}"
        assert all(p["eta_s"] is None or p["eta_s"] >= 0 for p in progress)
    refine_progress = [e for e in refined["events"] if e["event"] == "progress" and e["stage"] == "refine"]
    assert [p["step"] for p in refine_progress] == list(range(1, 41))
    assert all(isinstance(p["loss"], float) and np.isfinite(p["loss"]) for p in refine_progress)


def test_snapshots_are_atomic_readable_and_on_the_input_grid(refined):
    output, reference = refined["output"], refined["case"].image
    seen = refined["seen_at_snapshot"]
    assert len(seen) >= 2, "at least the initial and one refined snapshot"
    assert seen[0]["segments_json"], "segments.json must exist before the first snapshot"
    for snapshot in seen:
        assert_on_grid(snapshot["image"], reference, f"snapshot {snapshot['index']} (read when announced)")
        assert snapshot["image"].GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(snapshot["labels"])) <= {0, *ORGANS}
        assert len(set(np.unique(snapshot["labels"])) - {0}) >= 5, "most organs should be found"
        on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"snapshot_{snapshot['index']:04d}.nrrd")))
        np.testing.assert_array_equal(on_disk, snapshot["labels"], err_msg="snapshot changed after it was announced")

    leftovers = [p.name for p in output.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    expected = {"segments.json", "settings.json", "report.json", "labelmap.nrrd", "probabilities.nrrd", "uncertainty.nrrd",
                *(f"snapshot_{i:04d}.nrrd" for i in range(len(seen)))}
    assert {p.name for p in output.iterdir()} == expected

    labelmap = sitk.ReadImage(str(output / "labelmap.nrrd"))
    assert_on_grid(labelmap, reference, "labelmap.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), seen[-1]["labels"],
                                  err_msg="the final labelmap should be the last published average")


def test_segments_json_lists_the_models_labels(refined, demo_package):
    segments = json.loads((refined["output"] / "segments.json").read_text(encoding="utf-8"))["segments"]
    model_labels = json.loads((demo_package / "model.json").read_text(encoding="utf-8"))["labels"]
    assert [(s["value"], s["name"]) for s in segments] == [(m["value"], m["name"]) for m in model_labels]
    for segment, label in zip(segments, model_labels):
        assert segment["color"] == label["color"] and all(0 <= c <= 1 for c in segment["color"])
        assert segment["terminology"] == label["terminology"]
        assert segment["terminology"]["type"]["scheme"] == "SCT" and segment["terminology"]["type"]["code"]


def test_refined_mask_is_better_than_the_initial_segmentation(refined):
    truth = sitk.GetArrayFromImage(refined["case"].labels)
    initial = mean_dice(refined["output"] / "snapshot_0000.nrrd", truth)
    final = mean_dice(refined["output"] / "labelmap.nrrd", truth)
    assert final > initial + 0.01, f"mean Dice against the phantom truth: initial {initial:.4f}, refined {final:.4f}"


def test_report_has_stage_times_and_alignment_quality(refined):
    report = json.loads((refined["output"] / "report.json").read_text(encoding="utf-8"))
    assert report["partial"] is False
    for stage in ("initial", "align", "refine", "finalize"):
        assert report["seconds"][stage] > 0, f"no time recorded for {stage}: {report['seconds']}"
    assert sum(report["seconds"].values()) <= refined["seconds"] + 1
    assert report["snapshots"] == 3 and report["moving_average_updates"] == 2
    stopping = report["early_stopping"]
    assert stopping["threshold"] == DEFAULT_STOP_WHEN_CONVERGED and stopping["stopped_after_step"] is None and stopping["steps_planned"] == 40
    assert len(stopping["mask_change_per_update"]) == 2 and all(0 <= c <= 1 for c in stopping["mask_change_per_update"])
    assert [entry["round"] for entry in report["alignment"]] == [1]
    quality = report["alignment"][0]
    assert len(quality["dice_to_mask"]) == len(quality["folding_fraction"]) == 8, "one entry per demo atlas case"
    assert all(0.5 < d <= 1 for d in quality["dice_to_mask"]), quality["dice_to_mask"]
    assert all(0 <= f < 0.01 for f in quality["folding_fraction"]), quality["folding_fraction"]
    assert report["labels"] == [label["name"] for label in phantom.LABELS]


def test_settings_json_records_seed_settings_and_versions(refined):
    settings = json.loads((refined["output"] / "settings.json").read_text(encoding="utf-8"))
    assert settings["seed"] == 0
    assert settings["device"] == "cpu"
    assert settings["refine"]["steps"] == 40 and settings["refine"]["rounds"] == 1
    assert settings["refine"]["update_every"] == 20
    assert settings["refine"]["alignment"]["iterations"] == 40
    assert settings["refine"]["alignment"]["mode"] == "mask"
    for library in ("isseg", "torch", "SimpleITK", "numpy", "python"):
        assert settings["versions"][library], f"version of {library} missing"
    assert Path(settings["input"]) == refined["input"]


def test_probabilities_are_uint8_per_class_on_the_model_grid(refined):
    probabilities = sitk.ReadImage(str(refined["output"] / "probabilities.nrrd"))
    assert probabilities.GetNumberOfComponentsPerPixel() == 7, "background + 6 organs"
    assert probabilities.GetPixelID() == sitk.sitkVectorUInt8
    np.testing.assert_allclose(probabilities.GetSpacing(), (4.0, 4.0, 4.0))
    np.testing.assert_allclose(probabilities.GetDirection(), np.eye(3).ravel())
    total = sitk.GetArrayFromImage(probabilities).astype(int).sum(axis=-1)
    assert np.all(np.abs(total - 255) <= 4), f"class probabilities should sum to 255, got {total.min()}..{total.max()}"


# ---------------------------------------------------------------------------------------------
# Cancelling.

@pytest.fixture(scope="module")
def cancel_input(tmp_path_factory) -> tuple[Path, sitk.Image]:
    case = phantom.generate(phantom.shifted_spec(5))
    path = tmp_path_factory.mktemp("cancel-input") / "ct.nrrd"
    sitk.WriteImage(case.image, str(path))
    return path, case.image


def check_partial_result(code, worker, output: Path, reference: sitk.Image) -> None:
    assert code == 6, f"exit code {code}; stderr:\n{worker.stderr()}"
    last = worker.received[-1]
    assert last["event"] == "cancelled" and last["partial"] is True, worker.received[-3:]
    assert not any(e["event"] in ("done", "error") for e in worker.received)
    labelmap = sitk.ReadImage(last["labelmap"])
    assert_on_grid(labelmap, reference, "partial labelmap")
    assert len(set(np.unique(sitk.GetArrayFromImage(labelmap))) - {0}) >= 5, "the partial mask lost the organs"
    report = json.loads(Path(last["report"]).read_text(encoding="utf-8"))
    assert report["partial"] is True
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_cancel_file_after_first_snapshot_leaves_partial_result(tmp_path, demo_package, cancel_input):
    input_path, reference = cancel_input
    output = tmp_path / "out"
    worker = LiveWorker(*refine_arguments(input_path, output), stderr_path=tmp_path / "stderr.txt", timeout=300)
    for event in worker.events():
        if event["event"] == "snapshot":
            (output / "cancel").touch()
            cancelled_at = time.monotonic()
            break
    code = worker.finish()
    assert time.monotonic() - cancelled_at < 30, "the worker took too long to stop"
    check_partial_result(code, worker, output, reference)
    assert not any(e["event"] == "stage" and e["stage"] == "refine" for e in worker.received), \
        "fine-tuning should not start after cancelling"


def test_sigterm_during_alignment_leaves_partial_result(tmp_path, demo_package, cancel_input):
    input_path, reference = cancel_input
    output = tmp_path / "out"
    worker = LiveWorker(*refine_arguments(input_path, output), stderr_path=tmp_path / "stderr.txt", timeout=300)
    for event in worker.events():
        if event["event"] == "progress" and event["stage"] == "align":
            worker.process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            break
    code = worker.finish()
    assert time.monotonic() - signalled_at < 30, "the worker took too long to stop"
    check_partial_result(code, worker, output, reference)
    assert not any(e["event"] == "stage" and e["stage"] == "refine" for e in worker.received)
    # The partial result is the average at cancelling time: here still the initial segmentation.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output / "labelmap.nrrd"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(output / "snapshot_0000.nrrd"))))


# ---------------------------------------------------------------------------------------------
# A thin CT: a partial scan of a few slices on the model grid (the real abdominal CT beside the
# project is 7-10 slices at the demo's 4 mm) is refined like any other.

def test_a_ct_of_seven_slices_on_the_model_grid_is_refined(tmp_path, demo_package):
    case = phantom.generate(phantom.shifted_spec(3, size=(48, 48, 32)))  # 4 mm: the demo model's grid
    liver_slice = int(np.argwhere(sitk.GetArrayFromImage(case.labels) == 1)[:, 0].mean())
    thin = case.image[:, :, liver_slice - 3:liver_slice + 4]
    sitk.WriteImage(thin, str(tmp_path / "thin.nrrd"))
    output = tmp_path / "out"
    # One round, one step: the warm-started second round on a thin grid is test_alignment's.
    tiny = ["--rounds", "1", "--steps", "1", "--update-every", "1", "--align-iterations", "2"]
    result, events = run_worker(*refine_arguments(tmp_path / "thin.nrrd", output, *tiny), timeout=600)

    assert result.returncode == 0, f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    assert events[-1]["event"] == "done" and events[-1]["partial"] is False, events[-3:]
    assert result_is_complete(output)
    labelmap = sitk.ReadImage(str(output / "labelmap.nrrd"))
    assert_on_grid(labelmap, thin, "labelmap")
    assert 1 in np.unique(sitk.GetArrayFromImage(labelmap)), "the liver fills these slices"
    assert_on_grid(sitk.ReadImage(str(output / "uncertainty.nrrd")), thin, "uncertainty map")
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert [entry["round"] for entry in report["alignment"]] == [1]
    assert report["snapshots"] == 2 and report["moving_average_updates"] == 1
    assert {organ["name"] for organ in report["organs"]} >= {"liver"}


# ---------------------------------------------------------------------------------------------
# Fast, clear failures.

def write_2d(path: Path) -> Path:
    image = sitk.GetImageFromArray(np.linspace(-1000, 400, 32 * 32, dtype=np.float32).reshape(32, 32))
    sitk.WriteImage(image, str(path.with_suffix(".nrrd")))
    return path.with_suffix(".nrrd")


def write_4d(path: Path) -> Path:
    array = np.stack([sitk.GetArrayFromImage(small_ct(seed=s)) for s in (0, 1)])
    image = sitk.GetImageFromArray(array, isVector=False)
    target = path.parent / "ct4d.nii.gz"
    sitk.WriteImage(image, str(target))
    return target


def write_empty(path: Path) -> Path:
    image = sitk.GetImageFromArray(np.full((16, 20, 20), -1000, dtype=np.int16))
    sitk.WriteImage(image, str(path.with_suffix(".nrrd")))
    return path.with_suffix(".nrrd")


def write_unreadable(path: Path) -> Path:
    target = path.with_suffix(".nrrd")
    target.write_bytes(b"NRRD0004\nthis header is broken\n\x00\x01\x02")
    return target


def write_not_ct(path: Path) -> Path:
    array = np.random.default_rng(0).random((16, 20, 20)).astype(np.float32)  # values 0..1, e.g. a normalized MR
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path.with_suffix(".mha")))
    return path.with_suffix(".mha")


BAD_INPUTS = [
    (write_2d, "2D image"),
    (write_4d, "4D image"),
    (write_empty, "is empty"),
    (write_unreadable, "Could not read"),
    (write_not_ct, "do not look like CT Hounsfield units"),
]


def check_fast_failure(result, events, seconds, code, kind, expected) -> None:
    assert result.returncode == code, f"exit code {result.returncode}, expected {code}; stderr:\n{result.stderr[-2000:]}"
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and events[-1] is errors[0], f"expected one final error event, got {events}"
    assert errors[0]["kind"] == kind
    assert re.search(expected, errors[0]["message"]), f"message lacks /{expected}/: {errors[0]['message']}"
    assert errors[0]["message"] in result.stderr, "the message should be logged on stderr too"
    assert not any(e["event"] in ("snapshot", "progress") or e.get("stage") == "align" for e in events), \
        f"work started before the failure: {events}"
    assert seconds < 30, f"took {seconds:.1f} s to fail"


@pytest.mark.parametrize("writer, expected", BAD_INPUTS, ids=[w.__name__ for w, _ in BAD_INPUTS])
def test_bad_input_fails_fast_with_exit_code_3(tmp_path, demo_package, writer, expected):
    input_path = writer(tmp_path / "ct")
    started = time.monotonic()
    result, events = run_worker(*refine_arguments(input_path, tmp_path / "out"), timeout=120)
    check_fast_failure(result, events, time.monotonic() - started, 3, "bad_input", expected)


def test_model_with_wrong_number_of_labels_fails_fast_with_exit_code_4(tmp_path, demo_package, cancel_input):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_package, model)
    config = json.loads((model / "model.json").read_text(encoding="utf-8"))
    config["labels"].pop()
    (model / "model.json").write_text(json.dumps(config), encoding="utf-8")
    started = time.monotonic()
    result, events = run_worker(*refine_arguments(cancel_input[0], tmp_path / "out", model=model), timeout=120)
    check_fast_failure(result, events, time.monotonic() - started, 4, "bad_model",
                       "7 output channels but 5 labels")


def test_output_under_a_regular_file_fails_with_exit_code_7(tmp_path, cancel_input):
    blocker = tmp_path / "a_file"
    blocker.write_text("", encoding="utf-8")
    started = time.monotonic()
    result, events = run_worker(*refine_arguments(cancel_input[0], blocker / "out"), timeout=120)
    check_fast_failure(result, events, time.monotonic() - started, 7, "disk", "Cannot write to the output folder")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write into read-only folders, so permissions prove nothing")
def test_read_only_output_folder_fails_with_exit_code_7(tmp_path, cancel_input):
    output = tmp_path / "read_only"
    output.mkdir()
    output.chmod(0o500)
    try:
        started = time.monotonic()
        result, events = run_worker(*refine_arguments(cancel_input[0], output), timeout=120)
    finally:
        output.chmod(0o700)
    check_fast_failure(result, events, time.monotonic() - started, 7, "disk", "Cannot write to the output folder")


# ---------------------------------------------------------------------------------------------
# Building blocks of the protocol.

def test_event_writer_writes_one_flushed_json_object_per_line():
    class Stream(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    stream = Stream()
    writer = EventWriter(stream)  # auto: not a terminal, so JSON
    writer.emit("stage", stage="align", round=np.int64(2))
    writer.emit("progress", stage="refine", step=3, total=10, loss=np.float32(0.25), eta_s=float("nan"))

    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"event": "stage", "stage": "align", "round": 2},
        {"event": "progress", "stage": "refine", "step": 3, "total": 10, "loss": 0.25, "eta_s": None},
    ]
    assert stream.flushes == 2, "every event must be flushed at once"


def test_event_writer_bar_mode_is_for_people():
    stream = io.StringIO()
    EventWriter(stream, mode="bar").emit("progress", stage="refine", step=5, total=10, loss=0.5, eta_s=12.0)
    text = stream.getvalue()
    assert "5/10" in text and "loss 0.500" in text and "12 s left" in text and "{" not in text


def test_cancel_token_reacts_to_the_cancel_file(tmp_path):
    token = CancelToken(tmp_path)
    token.check()
    assert not token.requested
    (tmp_path / "cancel").touch()
    with pytest.raises(Cancelled):
        token.check()
    assert token.requested
    (tmp_path / "cancel").unlink()
    with pytest.raises(Cancelled):
        token.check()  # once requested, it stays requested


def test_stale_cancel_file_does_not_cancel_a_new_run(tmp_path):
    (tmp_path / "cancel").touch()
    run = Run(tmp_path / "ct.nrrd", tmp_path / "package", tmp_path, RefineSettings(), EventWriter(io.StringIO()),
              device=None, seed=0)
    with OutputFolder(tmp_path):
        assert not (tmp_path / "cancel").exists()
        run.cancel.check()
