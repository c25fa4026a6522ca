"""Packaging building blocks: label mapping, atlas folders, per-label soft resampling, the optional extras."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_support import oblique_direction
from isseg import packaging
from isseg.errors import BadInputError
from isseg.label_resampling import resample_labels, resample_labels_onto
from isseg.networks import EXTRAS, OutputClasses
from isseg.networks.base import softmax_in_place

NETWORK = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver"}


def test_labels_map_by_name_and_unmapped_network_labels_are_reported():
    mapping, unmapped = packaging.map_labels(NETWORK, {0: "background", 1: "Liver", 2: "Kidney right"}, {0, 1, 2})
    assert mapping == {1: 5, 2: 2} and unmapped == [1, 3, 4]
    labels, groups, lookup = packaging.package_labels(NETWORK, mapping, unmapped)
    assert [(l["value"], l["name"], l["network_value"]) for l in labels] == [(1, "kidney_right", 2), (2, "liver", 5)]
    assert groups == [[0, 1, 3, 4], [2], [5]] and lookup == {1: 2, 2: 1}


def test_labels_map_by_value_and_explicitly():
    assert packaging.map_labels(NETWORK, None, {0, 1, 5}) == ({1: 1, 5: 5}, [2, 3, 4])
    mapping, _ = packaging.map_labels(NETWORK, {1: "leber"}, {0, 1}, "leber=liver")
    assert mapping == {1: 5}
    assert packaging.map_labels(NETWORK, None, {0, 7}, "7=4")[0] == {7: 4}


@pytest.mark.parametrize("names, values, spec, message", [
    ({1: "pancreas"}, {0, 1}, None, "1 \\(pancreas\\) match no label"),
    (None, {0, 9}, None, "9 \\(unnamed\\) match no label"),
    ({1: "liver", 2: "leber"}, {0, 1, 2}, "leber=liver", "would merge"),
    ({1: "liver"}, {0, 1}, "liver=stomach", "does not exist"),
    ({1: "liver"}, {0, 1}, "liver", "ATLAS=NETWORK"),
])
def test_labels_that_cannot_be_mapped_are_refused(names, values, spec, message):
    with pytest.raises(BadInputError, match=message):
        packaging.map_labels(NETWORK, names, values, spec)


def test_output_classes_sum_the_network_probabilities_of_each_group():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    logits = torch.randn(2, 5, 3, 3, 3)
    grouped = OutputClasses(Fixed(), [[0, 2, 3], [1], [4]])
    expected = torch.softmax(logits, 1)
    expected = torch.stack([expected[:, [0, 2, 3]].sum(1), expected[:, 1], expected[:, 4]], 1)
    assert torch.allclose(torch.softmax(grouped(logits), 1), expected, atol=1e-6)


def _image(array, spacing, direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction:
        image.SetDirection(direction)
    return image


def test_atlas_folder_of_file_pairs(tmp_path):
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[2:4, 2:6, 2:6] = 3
    for case in ("a", "b"):
        sitk.WriteImage(_image(np.full((6, 8, 8), -1000, np.int16), (1, 1, 1)), str(tmp_path / f"{case}_image.nii.gz"))
        sitk.WriteImage(_image(labels, (1, 1, 1)), str(tmp_path / f"{case}_label.nii.gz"))
    (tmp_path / "labels.json").write_text(json.dumps({"3": "liver"}), encoding="utf-8")
    cases, names = packaging.read_atlas_folder(tmp_path)
    assert [c[0] for c in cases] == ["a", "b"] and names == {3: "liver"}
    (tmp_path / "b_label.nii.gz").unlink()
    with pytest.raises(BadInputError, match="has no labelmap 'b_label.nii.gz'"):
        packaging.read_atlas_folder(tmp_path)


def test_resample_labels_keeps_volume_and_tiny_labels():
    ids = np.zeros((20, 40, 40), dtype=np.uint8)
    ids[4:16, 10:30, 8:32] = 1
    ids[10, 5, 5] = 2  # one 1 mm voxel: smaller than an output voxel
    labels = _image(ids, (1.0, 1.0, 1.0))
    resampled = resample_labels(labels, (2.0, 2.0, 2.0))
    assert resampled.GetSize() == (20, 20, 10)
    out = sitk.GetArrayFromImage(resampled)
    assert (out == 1).sum() * 8 == pytest.approx((ids == 1).sum(), rel=0.1)
    assert (out == 2).sum() == 1
    corner = np.array(labels.GetOrigin()) - 0.5  # same physical box: outer voxel faces coincide
    assert np.allclose(np.array(resampled.GetOrigin()) - 1.0, corner)


def test_resample_onto_an_oblique_grid_keeps_volumes_and_every_label():
    ids = np.zeros((40, 40, 40), dtype=np.uint8)
    ids[8:32, 10:30, 8:32] = 1
    ids[18:21, 5:8, 18:21] = 2  # 2.25 mm: smaller than one output voxel
    labels = _image(ids, (0.75, 0.75, 0.75))
    reference = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    reference.SetSpacing((3.0, 3.0, 3.0))
    reference.SetDirection(oblique_direction(15.0, 5.0))
    reference.SetOrigin(tuple(np.array(labels.TransformContinuousIndexToPhysicalPoint((19.5,) * 3))
                              - np.array(reference.TransformContinuousIndexToPhysicalPoint((4.5,) * 3))))
    soft = sitk.GetArrayFromImage(resample_labels_onto(labels, reference))
    assert (soft == 1).sum() * 27 == pytest.approx((ids == 1).sum() * 0.75 ** 3, rel=0.1)
    assert (soft == 2).sum() >= 1


def test_extras_in_pyproject_are_the_ones_the_error_messages_name():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {re.split(r"[<>=\[ ]", r)[0].lower() for r in requirements}

    for extra, packages in EXTRAS.items():
        assert names(extras[extra]) == set(packages)
        assert set(packages) <= names(extras["test"]), "CI must install what these tests import"
    assert all(re.search(r">=.*,<", r) for extra in EXTRAS for r in extras[extra]), "floor and ceiling versions"


def test_an_isseg_package_with_a_new_atlas_that_lacks_one_organ(demo_package, labelled_atlas, tmp_path):
    """The demo package as network, re-packaged with other cases that do not contour the gallbladder:
    the gallbladder is reported and joins the background; the other organs keep their channels."""
    import shutil

    from isseg import model_package
    from isseg.networks import predict_probabilities
    from isseg.phantom import generate, training_spec

    atlas = tmp_path / "atlas"
    shutil.copytree(labelled_atlas, atlas)
    description = json.loads((atlas / "dataset.json").read_text(encoding="utf-8"))
    del description["labels"]["6"]
    (atlas / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    for path in (atlas / "labelsTr").iterdir():
        labels = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.ChangeLabel(labels, changeMap={6: 0}), str(path))
    summary = packaging.build_package(packaging.read_network(demo_package), atlas, tmp_path / "package")
    assert summary["unmapped_network_labels"] == ["gallbladder"] and summary["network_kind"] == "monai"
    package = model_package.load(tmp_path / "package")
    assert package.config["network"]["output_classes"] == [[0, 6], [1], [2], [3], [4], [5]]
    image = generate(training_spec(3, size=(48, 48, 32), spacing=(8.0, 8.0, 8.0))).image
    prepared = package.network_kind.prepare(image)
    probabilities = predict_probabilities(package.network_kind, package.build_network(), prepared.tensor,
                                          torch.device("cpu"))
    assert probabilities.shape[1] == 6 and torch.allclose(probabilities.sum(1), torch.ones(1), atol=1e-5)


def test_an_atlas_case_is_put_on_the_model_grid_as_the_network_prepares_a_ct(demo_package, tmp_path):
    """A MONAI-kind package smooths a CT finer than its grid before resampling (preprocess.to_model_grid):
    its atlas images, which fine-tuning learns from, must look the same, not point-sampled."""
    from isseg import model_package, preprocess

    array = np.random.default_rng(0).normal(40.0, 20.0, (40, 48, 48)).round().astype(np.int16)
    array[:, :, :8] = -1000
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 2.0))
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / "case_image.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "case_label.nii.gz"))
    kind = model_package.load(demo_package).network_kind

    _, atlas_image, _ = packaging.atlas_case(kind, "case", tmp_path / "case_image.nii.gz",
                                             tmp_path / "case_label.nii.gz", {})

    expected = preprocess.to_model_grid(image, kind.config["input"]["spacing"], kind.config["input"]["orientation"])
    np.testing.assert_allclose(sitk.GetArrayFromImage(atlas_image), sitk.GetArrayFromImage(expected), atol=1e-3)


def test_package_command(demo_package, labelled_atlas, tmp_path):
    """`isseg package` as a subprocess: events, the package, and a refused mapping with exit code 3."""
    from engine_support import run_worker

    result, events = run_worker("package", "--network", str(demo_package), "--atlas", str(labelled_atlas),
                                "--output", str(tmp_path / "package"), "--progress", "json", "--name", "mine",
                                "--license", "CC0", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["read_network", "atlas"]
    done = events[-1]
    assert done["event"] == "done" and done["atlas_cases"] == 2 and done["network_kind"] == "monai"
    config = json.loads((tmp_path / "package" / "model.json").read_text(encoding="utf-8"))
    assert config["name"] == "mine" and config["license"] == "CC0"
    result, events = run_worker("package", "--network", str(demo_package), "--atlas", str(labelled_atlas),
                                "--output", str(tmp_path / "refused"), "--progress", "json", "--labels", "1=stomach")
    assert result.returncode == 3 and events[-1]["event"] == "error" and "does not exist" in events[-1]["message"]
    assert not (tmp_path / "refused").exists()


def test_packaging_never_replaces_a_folder(demo_package, labelled_atlas, tmp_path):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "precious.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(BadInputError, match="already exists"):
        packaging.build_package(packaging.read_network(demo_package), labelled_atlas, tmp_path / "existing")
    assert (tmp_path / "existing" / "precious.txt").read_text(encoding="utf-8") == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_softmax_in_place_equals_torch_softmax_and_keeps_no_second_volume():
    logits = torch.randn(1, 5, 4, 6, 7, generator=torch.Generator().manual_seed(0)) * 20
    expected = torch.softmax(logits, 1)
    result = softmax_in_place(logits)
    assert result.data_ptr() == logits.data_ptr()  # a clinical-size second volume is a GiB
    assert torch.allclose(result, expected, atol=1e-6)


def test_an_isseg_package_keeps_its_label_thresholds_with_a_new_atlas(demo_package, labelled_atlas, tmp_path):
    """The per-label thresholds of an isseg package (chosen on its validation data) belong to its network:
    re-packaged with another atlas, the same organs keep them, or the same CT would get another mask."""
    import shutil

    from isseg import model_package

    source = tmp_path / "tuned"
    shutil.copytree(demo_package, source)
    config = json.loads((source / "model.json").read_text(encoding="utf-8"))
    for label in config["labels"]:
        label["threshold"] = {"spleen": 0.8, "aorta": 0.35}.get(label["name"], label.get("threshold"))
    thresholds = {label["name"]: label["threshold"] for label in config["labels"] if label["threshold"] is not None}
    assert len(thresholds) >= 2
    (source / "model.json").write_text(json.dumps(config), encoding="utf-8")

    packaging.build_package(packaging.read_network(source), labelled_atlas, tmp_path / "package")

    labels = model_package.load(tmp_path / "package").labels
    assert {label["name"]: label.get("threshold") for label in labels if label.get("threshold") is not None} \
        == thresholds
