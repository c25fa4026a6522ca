"""MONAI bundle networks in model packages (isseg.networks.bundle), against the bundle's own inference.

The bundle is written as MONAI bundles are (configs/inference.json with expressions and references,
configs/metadata.json, models/model.pt, LICENSE); its own inference is run with monai.bundle's
ConfigParser, which evaluates the config: this test trusts its own bundle, isseg never evaluates one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_support import run_worker
from isseg import metrics, model_package, packaging, phantom
from isseg.demo_model import demo_package_path
from isseg.errors import BadModelError
from isseg.networks import predict_probabilities

# The bundle's network is the built-in demo model (a MONAI UNet trained on phantoms at 4 mm on
# SimpleITK (z, y, x) LPS arrays), so the bundle feeds it MONAI (x, y, z) arrays oriented S, P, L.
DEMO = json.loads((Path(model_package.__file__).parent / "demo_model" / "model.json").read_text(encoding="utf-8"))
NETWORK_DEF = {"_target_": "UNet", **DEMO["network"]["args"]}
INFERENCE = {
    "imports": ["$import glob"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": NETWORK_DEF,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "SPL"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [4.0, 4.0, 4.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 300, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [48, 64, 64], "sw_batch_size": 2, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True}]},
}
METADATA = {"name": "Phantom abdomen bundle", "version": "0.1.0", "description": "test bundle",
            "references": ["A test bundle, 2026."],
            "network_data_format": {"outputs": {"pred": {"channel_def": {
                "0": "background", **{str(label["value"]): label["name"] for label in phantom.LABELS}}}}}}


def write_bundle(folder: Path) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1), encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=1), encoding="utf-8")
    (folder / "LICENSE").write_text("Apache License 2.0 (test bundle)\n", encoding="utf-8")
    demo = model_package.load(demo_package_path(), check_atlas=False).build_network()
    torch.save(demo.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def bundle_folder(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundle") / "phantom_bundle")


@pytest.fixture(scope="module")
def bundle_package(bundle_folder, labelled_atlas, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("packages") / "bundle"
    packaging.build_package(packaging.read_network(bundle_folder), labelled_atlas, output)
    return output


@pytest.fixture(scope="module")
def case_file(tmp_path_factory) -> tuple[Path, phantom.Phantom]:
    case = phantom.generate(phantom.shifted_spec(5, size=(60, 56, 40), spacing=(6.5, 6.0, 7.0)))
    path = tmp_path_factory.mktemp("case") / "ct.nii.gz"
    sitk.WriteImage(case.image, str(path))
    return path, case


def bundle_own_probabilities(folder: Path, image_path: Path) -> np.ndarray:
    """The bundle's own inference (monai.bundle evaluates its config), probabilities (C, z, y, x) on the input grid."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(image_path)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    data = parser.get_parsed_content("postprocessing")(data)
    return np.asarray(data["pred"], dtype=np.float32).transpose(0, 3, 2, 1)


def test_package_records_the_bundle(bundle_package):
    config = json.loads((bundle_package / "model.json").read_text(encoding="utf-8"))
    network = config["network"]
    assert network["kind"] == "monai_bundle" and network["network"]["name"] == "UNet"
    assert [t["name"] for t in network["preprocessing"]] == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert network["inferer"] == {"roi_size": [48, 64, 64], "sw_batch_size": 2, "overlap": 0.5}
    assert config["license"] == "Apache License 2.0 (test bundle)" and config["citation"] == "A test bundle, 2026."
    assert [label["name"] for label in config["labels"]] == list(phantom.ORGAN_NAMES)


def test_initial_probabilities_equal_the_bundle_inference(bundle_package, bundle_folder, case_file):
    path, _ = case_file
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    package = model_package.load(bundle_package)
    kind = package.network_kind
    prepared = kind.prepare(image)
    probabilities = predict_probabilities(kind, package.build_network(), prepared.tensor, torch.device("cpu"))
    ours = kind.probabilities_on_input(probabilities[0].numpy(), prepared, image)
    reference = bundle_own_probabilities(bundle_folder, path)
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    print(f"bundle: max probability difference {difference.max():.2e}, argmax differs in "
          f"{(ours.argmax(0) != reference.argmax(0)).mean():.2e} of the voxels")
    assert difference.max() <= 1e-2
    assert (ours.argmax(0) != reference.argmax(0)).mean() < 1e-3


def test_refine_with_a_bundle_package(bundle_package, case_file, tmp_path):
    path, case = case_file
    result, events = run_worker("refine", "--input", str(path), "--model", str(bundle_package), "--output",
                                str(tmp_path / "out"), "--progress", "json", "--device", "cpu", "--rounds", "1",
                                "--steps", "6", "--update-every", "3", "--align-iterations", "10", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["index"] for e in events if e["event"] == "snapshot"] == [0, 1, 2]
    truth = sitk.GetArrayFromImage(case.labels)
    organs = list(range(1, 7))
    initial = np.nanmean(metrics.dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "snapshot_0000.nrrd"))), truth, organs))
    final = np.nanmean(metrics.dice_per_label(sitk.GetArrayFromImage(sitk.ReadImage(events[-1]["labelmap"])), truth, organs))
    print(f"bundle package (the demo UNet as a bundle), mean Dice: initial {initial:.3f} -> refined {final:.3f}")
    assert initial > 0.5 and final != initial


def test_refuses_expressions_torchscript_and_code_pickles(tmp_path):
    folder = write_bundle(tmp_path / "expressions")
    config = json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["network_def"]["channels"] = "$[8, 16, 32]"
    (folder / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BadModelError, match="never evaluates"):
        packaging.read_network(folder)

    folder = write_bundle(tmp_path / "scripted")
    (folder / "models" / "model.pt").rename(folder / "models" / "model.ts")
    with pytest.raises(BadModelError, match="TorchScript"):
        packaging.read_network(folder)

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = write_bundle(tmp_path / "pickle")
    torch.save({"weight": Payload()}, folder / "models" / "model.pt")
    with pytest.raises(BadModelError, match="would run code"):
        packaging.read_network(folder)
    assert not marker.exists()


def test_refuses_transforms_it_cannot_reproduce(tmp_path):
    folder = write_bundle(tmp_path / "bundle")
    config = json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["preprocessing"]["transforms"].append({"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x"})
    (folder / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BadModelError, match="does not reproduce"):
        packaging.read_network(folder)
