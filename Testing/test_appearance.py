"""Appearance randomisation (isseg.appearance) and `isseg train --randomize-appearance`: one seed gives one
appearance, labels are never touched, intensities stay in plausible CT ranges."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from isseg import cli, model_package, phantom
from isseg.appearance import (PHASE_ENHANCEMENT_HU, AppearanceRandomizer, AppearanceSettings, phase_offsets_hu,
                              random_tissue_values)
from isseg.events import EventWriter
from isseg.preprocess import image_tensor
from isseg.model_training import TrainSettings, train_package

WINDOW = (-200.0, 300.0)
NAMES = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "aorta", 6: "gallbladder"}


@pytest.fixture(scope="module")
def patches():
    """Two (1, 32, 48, 48) patches of a real phantom: normalized image and labels."""
    case = phantom.generate(phantom.training_spec(3, size=(48, 48, 32), spacing=(8.0, 8.0, 8.0)))
    import SimpleITK as sitk

    image = image_tensor(case.image, WINDOW)[0]
    labels = torch.as_tensor(sitk.GetArrayFromImage(case.labels).astype(np.int64))[None]
    return torch.stack([image, image.flip(-1)]), torch.stack([labels, labels.flip(-1)])


def test_one_seed_gives_one_appearance_and_another_seed_another(patches):
    images, labels = patches
    randomizer = AppearanceRandomizer(NAMES, WINDOW)
    first = randomizer(images, labels, np.random.default_rng(7))
    again = randomizer(images, labels, np.random.default_rng(7))
    other = randomizer(images, labels, np.random.default_rng(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert first.shape == images.shape and first.dtype == images.dtype


def test_labels_and_input_images_are_left_as_they_were(patches):
    images, labels = patches
    images_before, labels_before = images.clone(), labels.clone()
    AppearanceRandomizer(NAMES, WINDOW)(images, labels, np.random.default_rng(0))
    assert torch.equal(labels, labels_before)
    assert torch.equal(images, images_before)


def test_intensities_stay_in_the_window_and_organs_move_by_plausible_amounts(patches):
    images, labels = patches
    settings = AppearanceSettings()
    randomizer = AppearanceRandomizer(NAMES, WINDOW, settings)
    largest_enhancement = max(max(table.values(), default=0.0) for table in PHASE_ENHANCEMENT_HU.values())
    hu = WINDOW[1] - WINDOW[0]
    for seed in range(4):
        result = randomizer(images, labels, np.random.default_rng(seed))
        assert 0.0 <= float(result.min()) and float(result.max()) <= 1.0
        offsets = randomizer.label_offsets(labels[0], np.random.default_rng(seed)) * hu
        assert float(offsets[labels[0] == 0].abs().max()) == 0.0  # background keeps its intensity
        assert float(offsets.abs().max()) <= largest_enhancement + 5 * settings.label_hu_std


def test_contrast_phases_move_each_organ_the_way_iodine_does():
    arterial, native = phase_offsets_hu(NAMES, "arterial"), phase_offsets_hu(NAMES, "native")
    assert arterial[5] > 100.0  # aorta bright in the late arterial phase
    assert native[5] < -50.0 and native[1] < 0.0  # nothing enhances without contrast
    assert arterial[3] == arterial[4]  # both kidneys alike
    assert phase_offsets_hu(NAMES, "portal")[6] == 0.0  # bile does not enhance
    assert phase_offsets_hu({1: "liver"}, "portal")[1] > phase_offsets_hu({1: "liver"}, "arterial")[1]


def test_random_tissue_values_keep_air_and_follow_the_seed():
    values = {0: -1000.0, 95: 55.0, 127: 45.0}
    first = random_tissue_values(values, np.random.default_rng(1), 30.0)
    assert first == random_tissue_values(values, np.random.default_rng(1), 30.0)
    assert first[0] == -1000.0 and first[95] != 55.0
    spread = [random_tissue_values(values, np.random.default_rng(s), 30.0)[95] - 55.0 for s in range(200)]
    assert 20.0 < float(np.std(spread)) < 40.0


def test_train_with_randomize_appearance_records_it_and_builds_a_package(tmp_path):
    specs = [phantom.training_spec(seed, size=(48, 48, 32), spacing=(8.0, 8.0, 8.0)) for seed in range(3)]
    dataset = phantom.write_msd_dataset(tmp_path / "dataset", specs)
    args = cli.build_parser().parse_args(["train", "--dataset", str(dataset), "--output", str(tmp_path / "p"),
                                          "--randomize-appearance"])
    assert args.randomize_appearance
    settings = TrainSettings(spacing=(8.0, 8.0, 8.0), patch_size=(32, 32, 16), channels=(4, 8, 16), steps=3,
                             evaluate_every=3, randomize_appearance=True)
    output = train_package(dataset, tmp_path / "package", settings, EventWriter(io.StringIO(), mode="json"), "cpu")
    config = model_package.load(output).config
    assert config["training"]["settings"]["randomize_appearance"] is True
