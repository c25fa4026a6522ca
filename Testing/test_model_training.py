"""Pieces of isseg.model_training on small arrays: the validation split and the per-label thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from isseg.model_training import choose_thresholds, split_cases


def test_split_cases_is_a_seeded_partition_with_at_least_one_validation_case():
    ids = [f"case{i}" for i in range(10)]
    train, validation = split_cases(ids, 0.2, seed=3)
    assert len(validation) == 2 and sorted(train + validation) == list(range(10))
    assert split_cases(ids, 0.2, seed=3) == (train, validation)
    assert {tuple(split_cases(ids, 0.2, seed=s)[1]) for s in range(5)} != {tuple(validation)}
    assert len(split_cases(ids[:3], 0.1, seed=0)[1]) == 1, "3 or more cases: at least one validation case"


@pytest.mark.parametrize("count, fraction", [(2, 0.5), (1, 0.2), (5, 0.0)])
def test_split_cases_without_validation(count, fraction):
    train, validation = split_cases([f"c{i}" for i in range(count)], fraction, seed=0)
    assert validation == [] and train == list(range(count))


def test_choose_thresholds_picks_the_dice_maximising_threshold_per_label():
    truth = np.zeros((2, 2, 4), np.uint8)
    truth[:, :, :2] = 1
    probabilities = np.zeros((3, 2, 2, 4), np.float32)
    probabilities[1][truth == 1] = 0.35  # label 1 is under-confident: 0.5 misses all of it
    probabilities[1][truth == 0] = 0.2
    probabilities[0] = 1 - probabilities[1]
    # a second case without label 1 in truth or prediction adds nothing to its mean Dice
    empty = np.zeros_like(probabilities)
    empty[0] = 1.0
    choices = choose_thresholds([probabilities, empty], [truth, np.zeros_like(truth)], num_labels=2)

    first, second = choices
    assert first["value"] == 1 and 0.2 < first["threshold"] <= 0.35
    assert first["dice_at_threshold"] == pytest.approx(1.0) and first["dice_at_0.5"] == 0.0
    assert second == {"value": 2, "threshold": None, "dice_at_threshold": None, "dice_at_0.5": second["dice_at_0.5"]}
    assert math.isnan(second["dice_at_0.5"])
