"""Pieces of isseg.refinement on small tensors: the moving average and the atlas intensity matching."""

from __future__ import annotations

import pytest
import torch

from isseg.refinement import MovingAverage, match_atlas_intensities


def test_moving_average_blends_each_prediction_with_its_momentum():
    initial = torch.zeros(1, 2, 1, 1, 2)
    average = MovingAverage(initial, momentum=0.8)
    average.update(torch.ones(1, 2, 1, 1, 2))
    assert torch.allclose(average.value, torch.full_like(initial, 0.2))
    average.update(torch.full_like(initial, 0.5))
    assert torch.allclose(average.value, torch.full_like(initial, 0.8 * 0.2 + 0.2 * 0.5))
    assert average.updates == 2
    assert torch.count_nonzero(initial) == 0, "the initial probabilities must not be changed in place"


def test_moving_average_disabled_keeps_only_the_latest_prediction():
    average = MovingAverage(torch.zeros(1, 2, 1, 1, 1), momentum=0.8, enabled=False)
    average.update(torch.full((1, 2, 1, 1, 1), 0.3))
    latest = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1, 1)
    average.update(latest)
    assert torch.allclose(average.value, latest) and average.updates == 2


def atlas_and_case():
    """Two atlas cases whose organ 1 (one slab of 40 voxels) is darker and flatter than in the case."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 1, 4, 4, 6, dtype=torch.uint8)
    labels[:, :, :, :, :3] = 1
    labels[1, 0, 0, 0, 5] = 2  # organ 2 has one atlas voxel only: too few to match
    images = torch.full((2, 1, 4, 4, 6), 0.1)
    images[labels == 1] = 0.3 + 0.05 * torch.randn(int((labels == 1).sum()), generator=generator)
    target = torch.full((1, 1, 4, 4, 6), 0.1)
    target[0, 0, :, :, :3] = 0.6 + 0.1 * torch.randn(4, 4, 3, generator=generator)
    probabilities = torch.zeros(1, 3, 4, 4, 6)
    probabilities[0, 0, :, :, 3:] = 1.0
    probabilities[0, 1, :, :, :3] = 0.95  # confident about organ 1
    probabilities[0, 2, :, :, 5] = 0.95    # and about organ 2, but its atlas region is too small
    return images, labels, target, probabilities


def test_match_atlas_intensities_gives_each_atlas_organ_the_case_organs_mean_and_spread():
    images, labels, target, probabilities = atlas_and_case()
    before = images.clone()
    matched = match_atlas_intensities(images, labels, target, probabilities, min_voxels=20)

    confident = target[0, 0][probabilities[0, 1] >= 0.9]
    for n in range(2):
        organ = matched[n, 0][labels[n, 0] == 1]
        assert float(organ.mean()) == pytest.approx(float(confident.mean()), abs=1e-5)
        assert float(organ.std()) == pytest.approx(float(confident.std()), rel=1e-4)
    outside = labels != 1
    assert torch.equal(matched[outside], before[outside]), "background and too-small organs stay as they are"
    # In place: at clinical sizes a copy of a round's atlas images is most of a GiB.
    assert matched is images


def test_match_atlas_intensities_leaves_organs_the_case_is_unsure_about():
    images, labels, target, probabilities = atlas_and_case()
    probabilities[0, 1] = 0.6  # nowhere confident
    assert torch.equal(match_atlas_intensities(images, labels, target, probabilities), images)
