"""Dice and Hausdorff distance per label (isseg.metrics), on small labelmaps built here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from isseg.metrics import binary_dice, dice_per_label, mean_dice


def test_binary_dice_counts_overlap_and_is_nan_when_both_are_empty():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), bool)
    assert math.isnan(binary_dice(a, b))
    a[0, 0, :2] = 3  # any nonzero value is inside
    assert binary_dice(a, b) == 0.0
    b[0, 0, 1:3] = True
    assert binary_dice(a, b) == pytest.approx(2 * 1 / 4)
    assert binary_dice(a, a) == 1.0


def prediction_and_truth() -> tuple[np.ndarray, np.ndarray]:
    """Label 1: 6 true voxels, 5 predicted; label 2: 12 true, 13 predicted; label 3 in neither."""
    truth = np.zeros((2, 3, 4), np.uint8)
    truth[0, :, :2] = 1
    truth[1] = 2
    prediction = truth.copy()
    prediction[0, 0, 0] = 2
    return prediction, truth


def test_dice_per_label_scores_each_value_and_nan_for_a_label_in_neither_map():
    prediction, truth = prediction_and_truth()
    scores = dice_per_label(prediction, truth, [1, 2, 3])
    assert scores[0] == pytest.approx(2 * 5 / 11)
    assert scores[1] == pytest.approx(2 * 12 / 25)
    assert math.isnan(scores[2])


def test_mean_dice_averages_the_labels_present_in_either_map_also_for_tensors():
    prediction, truth = prediction_and_truth()
    expected = (2 * 5 / 11 + 2 * 12 / 25) / 2  # label 3 is in neither map: left out
    assert mean_dice(prediction, truth, [1, 2, 3]) == pytest.approx(expected)
    assert mean_dice(torch.from_numpy(prediction), torch.from_numpy(truth), range(1, 4)) == pytest.approx(expected)
    assert mean_dice(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), [1, 2]) == 1.0
