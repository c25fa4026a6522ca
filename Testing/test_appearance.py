"""Appearance randomisation (isseg.appearance) and `isseg train --randomize-appearance`: one seed gives one
appearance, labels are never touched, intensities stay in plausible CT ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_support import train_tiny_model
from isseg import model_package, phantom
from isseg.appearance import (PHASE_ENHANCEMENT_HU, AppearanceRandomizer, AppearanceSettings, RandThickSlices,
                              phase_offsets_hu, random_tissue_values)
from isseg.preprocess import image_tensor
from isseg.protocol import EXIT_DONE

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


def test_intensities_stay_in_the_window_and_organs_move_by_at_most_the_documented_hu(patches):
    images, labels = patches
    settings = AppearanceSettings()
    randomizer = AppearanceRandomizer(NAMES, WINDOW, settings)
    largest_phase_offset = max(abs(offset) for phase in PHASE_ENHANCEMENT_HU
                               for offset in phase_offsets_hu(NAMES, phase).values())
    hu = WINDOW[1] - WINDOW[0]
    for seed in range(4):
        result_hu = WINDOW[0] + hu * randomizer(images, labels, np.random.default_rng(seed))
        assert WINDOW[0] <= float(result_hu.min()) and float(result_hu.max()) <= WINDOW[1]
        offsets_hu = randomizer.label_offsets(labels[0], np.random.default_rng(seed)) * hu
        assert float(offsets_hu[labels[0] == 0].abs().max()) == 0.0  # background keeps its intensity
        assert float(offsets_hu.abs().max()) <= largest_phase_offset + 3 * settings.label_hu_std + 1e-3
        assert float(offsets_hu.abs().max()) > 0.0


def test_thick_slices_average_along_z_only_and_follow_the_seed():
    z, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    along_x = (x >= 8).float()[:, None, :].expand(16, 8, 16)[None]  # an edge across x: constant along z
    along_z = (z >= 8).float()[:, None, :].expand(16, 8, 16)[None]  # an edge across z
    thick = RandThickSlices(prob=1.0, thickness_voxels=(2.5, 2.5))
    assert torch.allclose(thick(along_x), along_x)
    blurred = thick(along_z)
    assert blurred.shape == along_z.shape
    assert 0.05 < float(blurred[0, 7].mean()) < 0.95 and float(blurred[0, 0].mean()) == 0.0
    assert torch.equal(blurred[..., 0], blurred[..., -1])  # no change across x
    assert torch.equal(RandThickSlices(prob=0.0, thickness_voxels=(2.5, 2.5))(along_z), along_z)

    def draws(seed):
        random_thick = RandThickSlices(prob=0.5, thickness_voxels=(1.0, 2.5)).set_random_state(seed=seed)
        return [random_thick(along_z) for _ in range(6)]
    first, again, other = draws(3), draws(3), draws(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


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


def test_isseg_train_with_randomize_appearance_randomises_every_step_and_records_it(tmp_path, monkeypatch):
    calls = []
    randomize = AppearanceRandomizer.__call__

    def counted(self, images, labels, rng):
        labels_before = labels.clone()
        result = randomize(self, images, labels, rng)
        calls.append(torch.equal(labels, labels_before) and not torch.equal(result, images))
        return result

    monkeypatch.setattr(AppearanceRandomizer, "__call__", counted)
    assert train_tiny_model(tmp_path, "--randomize-appearance") == EXIT_DONE
    assert calls == [True, True]  # one randomised batch per step, its labels untouched
    config = model_package.load(tmp_path / "package").config
    assert config["training"]["settings"]["randomize_appearance"] is True
    curves = config["training"]["curves"]
    assert curves["step"] == [2] and len(curves["seconds_per_step"]) == 1 and curves["seconds_per_step"][0] > 0
