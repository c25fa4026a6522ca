"""Model packages (isseg.model_package): a valid package loads; every kind of damage is refused with
a BadModelError whose message names that very problem."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import UNet

from isseg import model_package
from isseg.errors import BadModelError

TINY_NETWORK = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                         "channels": [4, 8], "strides": [2], "num_res_units": 0}}
LABELS = [
    {"value": 1, "name": "liver", "color": [0.86, 0.55, 0.42]},
    {"value": 2, "name": "spleen", "color": [0.62, 0.35, 0.71]},
]


def tiny_config(**changes) -> dict:
    config = {
        "name": "tiny test model", "version": "0.1", "description": "for tests", "license": "Apache-2.0",
        "network": json.loads(json.dumps(TINY_NETWORK)),
        "input": {"spacing": [4.0, 4.0, 4.0], "orientation": "LPS", "intensity": {"a_min": -200.0, "a_max": 300.0}},
        "patch_size": [16, 16, 16],
        "labels": json.loads(json.dumps(LABELS)),
    }
    config.update(changes)
    return config


def tiny_network(channels=(4, 8)) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=channels, strides=(2,), num_res_units=0)


def atlas_case(case_id: str, label_values=(1, 2)) -> tuple[str, sitk.Image, sitk.Image]:
    image = sitk.GetImageFromArray(np.full((8, 8, 8), -100.0, dtype=np.float32))
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    for i, value in enumerate(label_values):
        labels[2 + 2 * i: 4 + 2 * i, 2:6, 2:6] = value
    label_image = sitk.GetImageFromArray(labels)
    for item in (image, label_image):
        item.SetSpacing((4.0, 4.0, 4.0))
    return case_id, image, label_image


@pytest.fixture
def package(tmp_path) -> Path:
    """A valid tiny package folder with two atlas cases."""
    return model_package.save(tmp_path / "package", tiny_config(), tiny_network(),
                              [atlas_case("case_a"), atlas_case("case_b")])


def load_and_build(path) -> model_package.ModelPackage:
    """What the worker does first: load and validate the package, then build the network with its weights."""
    loaded = model_package.load(path)
    loaded.build_network()
    return loaded


def test_valid_package_loads_with_its_weights_and_atlas(package):
    loaded = model_package.load(package)

    assert loaded.num_classes == 3
    assert [label["name"] for label in loaded.labels] == ["liver", "spleen"]
    assert loaded.spacing == (4.0, 4.0, 4.0) and loaded.orientation == "LPS"
    assert loaded.network_kind.window == (-200.0, 300.0) and loaded.network_kind.patch_zyx == (16, 16, 16)
    assert [case.case_id for case in loaded.atlas_cases] == ["case_a", "case_b"]
    image, labels = loaded.atlas_cases[0].read()
    assert image.GetSize() == (8, 8, 8) and set(np.unique(sitk.GetArrayFromImage(labels))) == {0, 1, 2}

    network = loaded.build_network()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(network(x), tiny_network().eval()(x), msg="weights did not survive save/load")


def test_zipped_package_loads(package, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "tiny"), "zip", root_dir=package.parent, base_dir=package.name)
    loaded = load_and_build(archive)
    assert loaded.config["name"] == "tiny test model"
    assert len(loaded.atlas_cases) == 2


# Each breaker damages a valid package in one way and returns the path to give to `load`.

def missing_folder(package: Path) -> Path:
    shutil.rmtree(package)
    return package


def no_model_json(package: Path) -> Path:
    (package / "model.json").unlink()
    return package


def invalid_json(package: Path) -> Path:
    (package / "model.json").write_text('{"name": "tiny", "network": ')
    return package


def edit_config(package: Path, edit) -> Path:
    config = json.loads((package / "model.json").read_text())
    edit(config)
    (package / "model.json").write_text(json.dumps(config))
    return package


def wrong_format_version(package: Path) -> Path:
    return edit_config(package, lambda c: c.update(format_version=99))


def missing_required_entry(package: Path) -> Path:
    return edit_config(package, lambda c: c.pop("patch_size"))


def unknown_network(package: Path) -> Path:
    return edit_config(package, lambda c: c["network"].update(name="NoSuchNet"))


def wrong_network_args(package: Path) -> Path:
    return edit_config(package, lambda c: c["network"]["args"].update(colour=3))


def label_count_not_out_channels(package: Path) -> Path:
    return edit_config(package, lambda c: c["labels"].pop())


def label_values_with_gap(package: Path) -> Path:
    return edit_config(package, lambda c: c["labels"][1].update(value=3))


def missing_weights(package: Path) -> Path:
    (package / "model.safetensors").unlink()
    return package


def corrupt_weights(package: Path) -> Path:
    (package / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file " * 20)
    return package


def weights_of_another_network(package: Path) -> Path:
    from safetensors.torch import save_file

    other = tiny_network(channels=(6, 12))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(package / "model.safetensors"))
    return package


def missing_atlas_manifest(package: Path) -> Path:
    (package / "atlas" / "manifest.json").unlink()
    return package


def corrupt_atlas_manifest(package: Path) -> Path:
    (package / "atlas" / "manifest.json").write_text("{not json")
    return package


def atlas_without_cases(package: Path) -> Path:
    (package / "atlas" / "manifest.json").write_text(json.dumps({"cases": []}))
    return package


def missing_atlas_file(package: Path) -> Path:
    (package / "atlas" / "case_b_label.nrrd").unlink()
    return package


def atlas_checksum_mismatch(package: Path) -> Path:
    path = package / "atlas" / "case_a_image.nrrd"
    path.write_bytes(path.read_bytes() + b" ")
    return package


def atlas_label_not_in_model(package: Path) -> Path:
    model_package.write_atlas(package / "atlas", [atlas_case("case_a"), atlas_case("case_c", label_values=(1, 2, 3))])
    return package


def zip_with_unsafe_path(package: Path) -> Path:
    archive = package.parent / "unsafe.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in package.rglob("*"):
            if file.is_file():
                zipped.write(file, f"package/{file.relative_to(package)}")
        zipped.writestr("../escaped.txt", "outside the package")
    return archive


def not_a_zip(package: Path) -> Path:
    archive = package.parent / "model.zip"
    archive.write_text("a text file with a .zip name")
    return archive


BAD_PACKAGES = [
    (missing_folder, "does not exist"),
    (no_model_json, "has no model.json"),
    (invalid_json, "model\\.json is not valid JSON"),
    (wrong_format_version, "has format_version 99"),
    (missing_required_entry, "lacks the required entry 'patch_size'"),
    (unknown_network, "'NoSuchNet', which is not a MONAI network"),
    (wrong_network_args, "arguments that MONAI's UNet does not accept"),
    (label_count_not_out_channels, "3 output channels but 1 labels"),
    (label_values_with_gap, "label values must be 1..N without gaps"),
    (missing_weights, "weights file .* is missing"),
    (corrupt_weights, "corrupt or not in safetensors format"),
    (weights_of_another_network, "do not fit the network its description gives"),
    (missing_atlas_manifest, "atlas manifest .* is missing"),
    (corrupt_atlas_manifest, "atlas manifest .* is not valid JSON"),
    (atlas_without_cases, "lists no cases"),
    (missing_atlas_file, "Atlas file .*case_b_label.nrrd' is missing"),
    (atlas_checksum_mismatch, "does not match its checksum"),
    (atlas_label_not_in_model, "case_c' has label values \\[3\\] that model.json does not list"),
    (zip_with_unsafe_path, "unsafe path '../escaped.txt'"),
    (not_a_zip, "neither a package folder nor a .zip"),
]


def refusal_message(package: Path, breaker) -> str:
    with pytest.raises(BadModelError) as raised:
        load_and_build(breaker(package))
    return str(raised.value)


@pytest.mark.parametrize("breaker, expected", BAD_PACKAGES, ids=[b.__name__ for b, _ in BAD_PACKAGES])
def test_bad_package_is_refused_with_its_own_message(package, breaker, expected):
    message = refusal_message(package, breaker)
    assert re.search(expected, message), f"{breaker.__name__}: expected /{expected}/ in: {message}"
    # Every other kind of damage has a message that does not fit this one.
    others = [e for b, e in BAD_PACKAGES if b is not breaker and re.search(e, message)]
    assert not others, f"{breaker.__name__}: message also fits {others}: {message}"


def test_unsafe_zip_writes_nothing_outside_the_cache(package, isseg_cache):
    archive = zip_with_unsafe_path(package)
    with pytest.raises(BadModelError):
        model_package.load(archive)
    assert not (isseg_cache / "packages" / "escaped.txt").exists()
    assert not (isseg_cache / "escaped.txt").exists()
    assert not (archive.parent / "escaped.txt").exists()
