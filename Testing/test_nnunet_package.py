"""nnU-Net v2 networks in model packages (isseg.networks.nnunet, isseg.packaging), against nnU-Net itself.

The trained-model folder is made by nnU-Net's own code (nnunet_model_builder.py: fingerprint, planner,
preprocessing, nnUNetTrainer's network and checkpoint), once per session; its weights are nnU-Net's
random He initialisation, which is enough to compare predictors voxel by voxel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_support import run_worker
from isseg import metrics, model_package, packaging, phantom
from isseg.errors import BadInputError, BadModelError
from isseg.networks import predict_probabilities

BUILDER = Path(__file__).with_name("nnunet_model_builder.py")
SIZE, SPACING = (48, 48, 32), 8.0


@pytest.fixture(scope="session")
def nnunet_folder(tmp_path_factory) -> Path:
    """TRAINER__PLANS__3d_fullres folder with plans.json, dataset.json, fold_all/checkpoint_final.pth."""
    work = tmp_path_factory.mktemp("nnunet")
    result = subprocess.run([sys.executable, str(BUILDER), str(work)], capture_output=True, text=True,
                            encoding="utf-8", timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def nnunet_package(nnunet_folder, labelled_atlas, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("packages") / "nnunet"
    packaging.build_package(packaging.read_network(nnunet_folder, "all", None), labelled_atlas, output)
    return output


@pytest.fixture(scope="session")
def inference_case() -> phantom.Phantom:
    """A CT unlike the atlas, at a spacing the plans do not have (so nnU-Net resamples it)."""
    return phantom.generate(phantom.shifted_spec(5, size=(60, 56, 40), spacing=(6.5, 6.0, 7.0)))


def nnunet_predictor_probabilities(folder: Path, image: sitk.Image) -> np.ndarray:
    """nnUNetPredictor's probabilities (C, z, y, x) on the image's grid, read as SimpleITKIO reads it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), ("all",))
    array = sitk.GetArrayFromImage(image)[None].astype(np.float32)
    _, probabilities = predictor.predict_single_npy_array(array, {"spacing": list(image.GetSpacing())[::-1]},
                                                          None, None, True)
    return probabilities


def test_package_records_the_network_and_its_preprocessing(nnunet_package, nnunet_folder):
    config = json.loads((nnunet_package / "model.json").read_text(encoding="utf-8"))
    plans = json.loads((nnunet_folder / "plans.json").read_text(encoding="utf-8"))
    network = config["network"]
    assert network["kind"] == "nnunet_v2" and network["plans"] == plans and network["configuration"] == "3d_fullres"
    assert network["trainer"] == "nnUNetTrainer" and network["fold"] == "all"
    assert network["mirroring_axes"] == [0, 1, 2] and network["tile_step_size"] == 0.5 and network["use_gaussian"]
    assert config["input"]["spacing"] == [8.0, 8.0, 8.0] and config["input"]["normalization"] == "CTNormalization"
    assert [label["name"] for label in config["labels"]] == list(phantom.ORGAN_NAMES)
    assert network["output_classes"] == [[0], [1], [2], [3], [4], [5], [6]]
    assert "nnU-Net" in config["citation"] and config["license"].startswith("CC0")
    assert config["training"]["atlas_cases"] == 2 and config["training"]["unmapped_network_labels"] == []
    assert not list(nnunet_package.rglob("*.pth")), "a package holds safetensors only"


def test_initial_probabilities_equal_nnunet_predictor(nnunet_package, nnunet_folder, inference_case):
    package = model_package.load(nnunet_package)
    kind = package.network_kind
    prepared = kind.prepare(inference_case.image)
    probabilities = predict_probabilities(kind, package.build_network(), prepared.tensor, torch.device("cpu"))
    ours = kind.probabilities_on_input(probabilities[0].numpy(), prepared, inference_case.image)
    reference = nnunet_predictor_probabilities(nnunet_folder, inference_case.image)
    assert ours.shape == reference.shape == (7, *inference_case.image.GetSize()[::-1])
    difference = np.abs(ours - reference)
    assert difference.max() <= 1e-2, difference.max()
    # Where the argmax differs, the two best classes are within float16 rounding of each other (nnU-Net
    # accumulates logits in half precision; isseg passes them back through log-probabilities).
    differs = ours.argmax(0) != reference.argmax(0)
    top_two = np.sort(reference, axis=0)[-2:]
    assert differs.mean() < 1e-3
    assert np.all(top_two[1][differs] - top_two[0][differs] <= 2 * difference.max() + 1e-6)


def test_model_grid_is_the_preprocessed_array(nnunet_package, inference_case):
    """The model grid's geometry puts nnU-Net's preprocessed voxels where they lie in the patient."""
    kind = model_package.load(nnunet_package).network_kind
    prepared = kind.prepare(inference_case.image)
    assert sitk.GetArrayViewFromImage(prepared.model_image).shape == tuple(prepared.tensor.shape[2:])
    assert np.allclose(prepared.model_image.GetSpacing(), (8.0, 8.0, 8.0), atol=0.3)
    labels = metrics_labels_on_model_grid(inference_case, prepared.model_image)
    assert (labels == 1).sum() * 8.0 ** 3 == pytest.approx((sitk.GetArrayViewFromImage(inference_case.labels) == 1).sum()
                                                        * 6.5 * 6.0 * 7.0, rel=0.1)


def metrics_labels_on_model_grid(case: phantom.Phantom, grid: sitk.Image) -> np.ndarray:
    from isseg.label_resampling import resample_labels_onto

    return sitk.GetArrayFromImage(resample_labels_onto(case.labels, grid))


def test_refine_with_an_nnunet_package(nnunet_package, inference_case, tmp_path):
    input_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(inference_case.image, str(input_path))
    result, events = run_worker("refine", "--input", str(input_path), "--model", str(nnunet_package), "--output",
                                str(tmp_path / "out"), "--progress", "json", "--device", "cpu", "--rounds", "1",
                                "--steps", "6", "--update-every", "3", "--align-iterations", "10", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["index"] for e in events if e["event"] == "snapshot"] == [0, 1, 2]
    assert events[-1]["event"] == "done"
    truth = sitk.GetArrayFromImage(inference_case.labels)
    organs = list(range(1, 7))
    initial = np.nanmean(metrics.dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "snapshot_0000.nrrd"))), truth, organs))
    final = np.nanmean(metrics.dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(events[-1]["labelmap"])), truth, organs))
    print(f"nnU-Net package (random He-initialised network), mean Dice: initial {initial:.3f} -> refined {final:.3f}")
    assert final != initial


def test_refuses_a_checkpoint_that_would_run_code(nnunet_folder, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "model"
    shutil.copytree(nnunet_folder, folder)
    torch.save({"network_weights": {}, "trainer_name": Payload()}, folder / "fold_all" / "checkpoint_final.pth")
    with pytest.raises(BadModelError, match="would run code"):
        packaging.read_network(folder, "all", None)
    assert not marker.exists()


def test_refuses_a_checkpoint_that_does_not_match_the_plans(nnunet_folder, labelled_atlas, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(nnunet_folder, folder)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    with pytest.raises(BadModelError, match="do not fit"):
        packaging.build_package(packaging.read_network(folder, "all", None), labelled_atlas, tmp_path / "package")
    assert not (tmp_path / "package").exists()


def test_refuses_atlas_labels_that_map_to_nothing(nnunet_folder, labelled_atlas, tmp_path):
    atlas = tmp_path / "atlas"
    shutil.copytree(labelled_atlas, atlas)
    description = json.loads((atlas / "dataset.json").read_text(encoding="utf-8"))
    description["labels"]["6"] = "pancreas"
    (atlas / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    source = packaging.read_network(nnunet_folder, "all", None)
    with pytest.raises(BadInputError, match="6 \\(pancreas\\) match no label of the network"):
        packaging.build_package(source, atlas, tmp_path / "package")
    summary = packaging.build_package(source, atlas, tmp_path / "package", mapping_spec="pancreas=gallbladder")
    assert summary["labels"][-1] == "gallbladder"


def test_refuses_unknown_network_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadModelError, match="not an nnU-Net v2 trained-model folder"):
        packaging.read_network(tmp_path / "empty")


def test_the_orientation_the_network_was_trained_in_is_reproduced(nnunet_folder, labelled_atlas, inference_case,
                                                                  tmp_path):
    """--orientation RAS (TotalSegmentator's way): an LPS CT is given to nnU-Net in RAS voxel order and
    the result comes back in the CT's own voxel order."""
    packaging.build_package(packaging.read_network(nnunet_folder, "all", None, "ras"), labelled_atlas, tmp_path / "p")
    package = model_package.load(tmp_path / "p")
    kind = package.network_kind
    prepared = kind.prepare(inference_case.image)
    probabilities = predict_probabilities(kind, package.build_network(), prepared.tensor, torch.device("cpu"))
    ours = kind.probabilities_on_input(probabilities[0].numpy(), prepared, inference_case.image)
    in_ras = sitk.DICOMOrient(inference_case.image, "RAS")
    channels = []
    for channel in nnunet_predictor_probabilities(nnunet_folder, in_ras):
        image = sitk.GetImageFromArray(channel)
        image.CopyInformation(in_ras)
        channels.append(sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")))
    assert np.abs(ours - np.stack(channels)).max() <= 1e-2
    with pytest.raises(BadModelError, match="not an orientation code"):
        packaging.read_network(nnunet_folder, "all", None, "RAP")


def test_refine_without_the_extra_says_which_to_install(nnunet_package, inference_case, tmp_path):
    """A worker whose Python lacks nnunetv2 stops with exit code 4 and names the extra to install."""
    blocker = tmp_path / "site" / "nnunetv2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named nnunetv2 (simulated)')\n", encoding="utf-8")
    input_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(inference_case.image, str(input_path))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "isseg.cli", "refine", "--input", str(input_path), "--model",
                             str(nnunet_package), "--output", str(tmp_path / "out"), "--progress", "json"],
                            capture_output=True, text=True, encoding="utf-8", env=environment, timeout=300)
    errors = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"event": "error"')]
    assert result.returncode == 4 and errors and errors[0]["kind"] == "bad_model"
    assert "optional extra 'nnunet'" in errors[0]["message"] and "pip install" in errors[0]["message"]


def test_fine_tuning_sees_the_full_resolution_head(nnunet_package, nnunet_folder):
    """The checkpoint was saved from nnUNetTrainer's deep-supervision network; the package's network is
    the same weights without deep supervision: one full-resolution output, the one the loss sees."""
    from isseg.networks.nnunet import read_checkpoint

    checkpoint = read_checkpoint(nnunet_folder / "fold_all" / "checkpoint_final.pth")
    package = model_package.load(nnunet_package)
    network = package.build_network()
    patch = package.network_kind.patch_zyx
    output = network(torch.zeros(1, 1, *patch))
    assert isinstance(output, torch.Tensor) and output.shape == (1, 7, *patch)
    state = network.network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["network_weights"].items())


def test_the_trained_model_folder_is_found_from_its_dataset_folder(nnunet_folder):
    """TotalSegmentator's layout: DATASET/TRAINER__PLANS__CONFIGURATION/fold_N; the only fold is found."""
    source = packaging.read_network(nnunet_folder.parent, None, "3d_fullres")
    assert source.network["fold"] == "all" and source.network["configuration"] == "3d_fullres"
    assert source.labels == {label["value"]: label["name"] for label in phantom.LABELS}
    with pytest.raises(BadModelError, match="trainer folders found: none"):
        packaging.read_network(nnunet_folder.parent, None, "2d")
    with pytest.raises(BadModelError, match="choose a fold that was trained"):
        packaging.read_network(nnunet_folder, "3", None)
