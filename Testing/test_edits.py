"""Refining from the user's edits (isseg.edits, `refine --initial-mask --edited-region`), the uncertainty map
and the per-organ change table, on phantoms with the demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_support import run_worker
from isseg import changes, edits, metrics, model_package, phantom, uncertainty
from isseg.alignment import AlignmentSettings, align_atlas
from isseg.io import resample_to
from isseg.networks import predict_probabilities
from isseg.pipeline import atlas_arrays
from isseg.protocol import EXIT_BAD_INPUT, EXIT_DONE, EXIT_USAGE, UNCERTAINTY_FILE

ORGANS = [label["value"] for label in phantom.LABELS]
QUICK = ["--rounds", "1", "--steps", "6", "--update-every", "2", "--align-iterations", "10", "--device", "cpu"]
pytestmark = [pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp:UserWarning"),
              pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A shifted phantom, its truth, and the user's correction of the gallbladder on 3 axial slices of a
    rough mask (the truth with the gallbladder removed): files initial_mask.nrrd and edited_region.nrrd."""
    folder = tmp_path_factory.mktemp("edits")
    generated = phantom.generate(phantom.shifted_spec(2003))
    sitk.WriteImage(generated.image, str(folder / "image.nrrd"))
    truth = sitk.GetArrayFromImage(generated.labels)
    rough = truth.copy()
    rough[rough == 6] = 0
    edited = rough.copy()
    slices = np.flatnonzero((truth == 6).any(axis=(1, 2)))[[0, 2, 4]]
    edited[slices] = truth[slices]
    region = (edited != rough).astype(np.uint8)
    assert region.sum() > 20
    for name, array in (("initial_mask.nrrd", edited), ("edited_region.nrrd", region)):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(generated.image)
        sitk.WriteImage(image, str(folder / name))
    return {"folder": folder, "image": generated.image, "truth": truth, "edited": edited, "region": region > 0}


def test_a_perfect_initial_mask_aligns_the_atlas_better_than_the_network_mask(case, demo_package):
    package = model_package.load(demo_package)
    kind = package.network_kind
    prepared = kind.prepare(case["image"])
    network_mask = predict_probabilities(kind, package.build_network(), prepared.tensor, torch.device("cpu"))
    perfect = edits.UserEdits(case["truth"], np.zeros(case["truth"].shape, bool)).probabilities(
        case["image"], prepared.model_image, package.num_classes)
    truth = sitk.GetArrayFromImage(resample_to(_on(case["truth"], case["image"]), prepared.model_image, is_label=True))
    images, labels = atlas_arrays(package)
    settings = AlignmentSettings(iterations=30)

    def dice_to_truth(target):
        aligned = align_atlas(images[:3], labels[:3], prepared.tensor, target, settings, torch.device("cpu"))
        return np.mean([np.nanmean(metrics.dice_per_label(aligned.labels[i, 0].numpy(), truth, ORGANS))
                        for i in range(len(aligned.labels))])

    assert dice_to_truth(perfect) > dice_to_truth(network_mask) + 0.02


def _on(array, reference):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def test_refine_from_edits_keeps_every_edited_voxel_and_reports_changes(case, tmp_path):
    folder = case["folder"]
    result, events = run_worker("refine", "--input", str(folder / "image.nrrd"), "--model", "demo", "--output",
                                str(tmp_path), "--initial-mask", str(folder / "initial_mask.nrrd"),
                                "--edited-region", str(folder / "edited_region.nrrd"), *QUICK, timeout=300)
    assert result.returncode == EXIT_DONE, result.stderr[-2000:]
    region, edited = case["region"], case["edited"]
    snapshots = [e["path"] for e in events if e["event"] == "snapshot"]
    for path in [*snapshots, str(tmp_path / "labelmap.nrrd")]:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(path))
        np.testing.assert_array_equal(labels[region], edited[region], err_msg=f"edited voxels changed in {path}")
    first = sitk.GetArrayFromImage(sitk.ReadImage(snapshots[0]))
    assert np.mean(first == edited) > 0.98, "snapshot 0 is the user's mask"

    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["from_edits"] is True
    organs = {row["name"]: row for row in report["organs"]}
    assert set(organs) == {label["name"] for label in phantom.LABELS}
    assert all(0 <= row["dice"] <= 1 and row["volume_refined_ml"] > 0 for row in organs.values())
    change_event = next(e for e in events if e["event"] == "organ_changes")
    assert change_event["organs"] == report["organs"]
    assert "What changed, per organ" in result.stderr and "gallbladder" in result.stderr
    assert [e["event"] for e in events][-1] == "done", "the change event comes before done"

    map_image = sitk.ReadImage(str(tmp_path / UNCERTAINTY_FILE))
    assert map_image.GetSize() == case["image"].GetSize()
    values = sitk.GetArrayFromImage(map_image)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0


@pytest.mark.parametrize("problem", ["grid", "values", "region_values"])
def test_bad_user_labelmaps_are_refused_with_exit_code_3(case, tmp_path, problem):
    folder = case["folder"]
    mask, region = folder / "initial_mask.nrrd", folder / "edited_region.nrrd"
    bad = tmp_path / "bad.nrrd"
    if problem == "grid":
        sitk.WriteImage(sitk.Image([10, 10, 10], sitk.sitkUInt8), str(bad))
        mask = bad
    else:
        array = case["edited"].copy() if problem == "values" else case["region"].astype(np.uint8)
        array[0, 0, 0] = 42
        sitk.WriteImage(_on(array, case["image"]), str(bad))
        mask, region = (bad, region) if problem == "values" else (mask, bad)
    result, events = run_worker("refine", "--input", str(folder / "image.nrrd"), "--model", "demo", "--output",
                                str(tmp_path / "out"), "--initial-mask", str(mask), "--edited-region", str(region),
                                *QUICK, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT
    message = next(e for e in events if e["event"] == "error")["message"]
    assert ("not on the grid of --input" if problem == "grid" else "42") in message


def test_an_edited_region_needs_its_mask(case, tmp_path):
    folder = case["folder"]
    result, _ = run_worker("refine", "--input", str(folder / "image.nrrd"), "--model", "demo", "--output",
                           str(tmp_path), "--edited-region", str(folder / "edited_region.nrrd"), timeout=60)
    assert result.returncode == EXIT_USAGE and "--initial-mask" in result.stderr


def test_error_detection_auc_ranks_wrong_voxels_by_uncertainty():
    truth = np.zeros((4, 8, 8), dtype=np.uint8)
    truth[1:3, 2:6, 2:6] = 1
    prediction = truth.copy()
    prediction[1:3, 2:6, 5] = 0  # one wrong column
    wrong = (prediction == 1) != (truth == 1)
    assert uncertainty.error_detection_auc(wrong.astype(np.float32), prediction, truth, 1) == 1.0
    assert uncertainty.error_detection_auc((~wrong).astype(np.float32), prediction, truth, 1) == 0.0
    assert uncertainty.error_detection_auc(np.zeros(truth.shape), prediction, truth, 1) == 0.5
    recent = [prediction, truth, truth, truth]
    assert np.isclose(uncertainty.disagreement(recent, truth)[wrong], 0.25).all()


def test_change_table_marks_the_organ_that_changed_most():
    initial = np.zeros((6, 10, 10), dtype=np.uint8)
    initial[1:5, 1:4, 1:4], initial[1:5, 5:9, 5:9] = 1, 2
    refined = initial.copy()
    refined[1:5, 5:9, 5:7] = 0
    rows = changes.organ_changes(initial, refined, np.zeros(initial.shape, np.float32),
                                 [{"value": 1, "name": "a"}, {"value": 2, "name": "b"}], (2.0, 1.0, 1.0))
    assert rows[0]["dice"] == 1.0 and rows[0]["review"] == []
    assert rows[1]["dice"] == pytest.approx(2 * 32 / (64 + 32), abs=1e-3) and rows[1]["review"] == [changes.CHANGED]
    assert rows[1]["volume_initial_ml"] == pytest.approx(64 * 2 / 1000, abs=0.01)
    assert "b" in changes.format_table(rows)


class _InputRecorder(torch.nn.Module):
    """A one-layer network with two classes that records the type of every input it is given."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Conv3d(1, 2, 1)
        self.seen: list[type] = []

    def forward(self, image):
        self.seen.append(type(image))
        return self.layer(image)


def test_case_training_feeds_the_network_plain_tensors():
    # MONAI's RandWeightedCrop returns MetaTensors; through the network each of them costs
    # MetaTensor.__torch_function__ on every operation (as found for the atlas patches, issue 13).
    image, user, reference = _one_slice_correction()
    training = edits.CaseTraining.from_edits(user, reference, reference, torch.as_tensor(image)[None, None],
                                             (4, 4, 4), seed=0)
    network = _InputRecorder()
    training.step(network, torch.optim.SGD(network.parameters(), lr=0.1), torch.device("cpu"))
    assert network.seen == [torch.Tensor]


def test_atlas_labels_are_read_in_a_small_integer_type(demo_package):
    # int64 atlas labels took 8 bytes per voxel and case for the whole run (1.6 GB for 16 cases of 256 x 256 x 192)
    _, labels = atlas_arrays(model_package.load(demo_package))
    assert {label.dtype for label in labels} == {np.dtype(np.uint8)}


def _one_slice_correction():
    """A (6, 12, 12) case: organ 1 (intensity 0.8) in a background of 0.5; the user painted the organ on
    slice 2 of a mask that had missed it (the edited voxels are all organ, the rest of the slice unchanged)."""
    image = np.full((6, 12, 12), 0.5, dtype=np.float32)
    image[:, 3:7, 3:7] = 0.8
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[2, 3:7, 3:7] = 1
    reference = sitk.GetImageFromArray(image)
    return image, edits.UserEdits(labels, labels > 0), reference


def test_a_corrected_organ_is_reviewed_on_its_whole_slice():
    _, user, _ = _one_slice_correction()
    reviewed = edits.reviewed_slices(user.labels, user.region)
    assert list(reviewed) == [1]
    assert reviewed[1][2].all() and not reviewed[1][[0, 1, 3, 4, 5]].any()


def test_case_training_learns_the_rest_of_the_edited_slice_is_not_the_organ():
    # Trained on the edited voxels alone (all organ), the network learnt to call everything the organ:
    # the corrected organ grew on the slices not edited (BENCHMARKS.md section 9, before the rework).
    image, user, reference = _one_slice_correction()
    training = edits.CaseTraining.from_edits(user, reference, reference, torch.as_tensor(image)[None, None],
                                             (4, 8, 8), seed=0)
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    for _ in range(150):
        training.step(network, optimizer, torch.device("cpu"))
    with torch.no_grad():
        labels = network(torch.as_tensor(image)[None, None])[0].argmax(0).numpy()
    assert (labels[image > 0.7] == 1).all() and (labels[image < 0.7] == 0).all()
