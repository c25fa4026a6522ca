"""Overlap and distance between labelmaps, per label (MONAI metrics).

Inputs are (z, y, x) integer labelmaps on one grid (numpy arrays, or torch tensors for Dice); distances are in mm when `spacing_zyx` (mm)
is given, else in voxels. A label absent from both maps has no score (NaN).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def _mask(labelmap: np.ndarray | torch.Tensor, value: int) -> torch.Tensor:
    """(1, 1, z, y, x) float mask of `value`; a tensor stays on its device."""
    inside = labelmap == value if isinstance(labelmap, torch.Tensor) else torch.as_tensor(np.asarray(labelmap) == value)
    return inside[None, None].float()


def _one_hot_pair(prediction: np.ndarray, truth: np.ndarray, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _mask(prediction, value), _mask(truth, value)


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, values: Iterable[int]) -> list[float]:
    """Dice of each label value; NaN where neither map has the label."""
    scores = []
    for value in values:
        p, t = _one_hot_pair(prediction, truth, value)
        if p.sum() == 0 and t.sum() == 0:
            scores.append(float("nan"))
        else:
            scores.append(float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0]))
    return scores


def mean_dice(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, values: Iterable[int]) -> float:
    """Mean Dice over the label `values` present in either map; 1.0 when none is (nothing disagrees)."""
    scores = [score for score in dice_per_label(prediction, truth, values) if not math.isnan(score)]
    return float(np.mean(scores)) if scores else 1.0


def binary_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (same shape, nonzero = inside); NaN when both are empty."""
    return dice_per_label(np.asarray(a) != 0, np.asarray(b) != 0, [True])[0]


def hd95_per_label(prediction: np.ndarray, truth: np.ndarray, values: Iterable[int],
                   spacing_zyx: Sequence[float] | None = None) -> list[float]:
    """95th-percentile symmetric Hausdorff distance of each label; NaN where either map lacks it."""
    return hausdorff_per_label(prediction, truth, values, spacing_zyx, percentile=95)


def hausdorff_per_label(prediction: np.ndarray, truth: np.ndarray, values: Iterable[int],
                        spacing_zyx: Sequence[float] | None = None, percentile: float | None = None) -> list[float]:
    """Symmetric Hausdorff distance of each label (the largest surface distance, or its `percentile`);
    NaN where either map lacks the label."""
    scores = []
    for value in values:
        p, t = _one_hot_pair(prediction, truth, value)
        if p.sum() == 0 or t.sum() == 0:
            scores.append(float("nan"))
            continue
        distance = compute_hausdorff_distance(p, t, include_background=True, percentile=percentile,
                                              spacing=list(spacing_zyx) if spacing_zyx is not None else None)
        scores.append(float(distance[0, 0]))
    return scores
