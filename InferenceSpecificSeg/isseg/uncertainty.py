"""Where the refined mask is unsure: a voxel map for the reviewer, and how well it flags wrong voxels.

Two measures, both in [0, 1] per voxel on the model grid:

- `entropy`: the entropy of the averaged class probabilities, divided by log(C) (C = background +
  labels), so 1 means every class equally likely;
- `disagreement`: the share of the last predictions of the fine-tuning (the ones the moving average
  was updated with) whose label differs from the final label: 0 where they all agree with it.

The default was chosen by the area under the error-detection curve on phantoms (BENCHMARKS.md,
"Refine from edits"): `error_detection_auc` is that area for one organ.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.stats import rankdata

from .protocol import DEFAULT_UNCERTAINTY, UNCERTAINTY_MEASURES, UNCERTAIN_LEVEL  # noqa: F401 (re-exported)

# How many of the latest predictions `disagreement` compares with the final label.
RECENT_PREDICTIONS = 4


class RecentLabels:
    """The labels (argmax) of the latest RECENT_PREDICTIONS predictions the moving average was updated
    with, as (z, y, x) uint8 arrays on the model grid, for the disagreement measure."""

    def __init__(self):
        self.labels: list[np.ndarray] = []

    def add(self, prediction: torch.Tensor) -> None:
        """Keep the labels of a prediction (1, C, z, y, x), dropping the oldest beyond RECENT_PREDICTIONS."""
        self.labels = (self.labels + [prediction[0].argmax(0).numpy().astype(np.uint8)])[-RECENT_PREDICTIONS:]


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """(z, y, x) float32 entropy of class probabilities (C, z, y, x), divided by log(C)."""
    p = np.clip(probabilities.astype(np.float32), 1e-7, 1.0)
    p = p / p.sum(axis=0, keepdims=True)
    return (-(p * np.log(p)).sum(axis=0) / np.log(p.shape[0])).astype(np.float32)


def disagreement(recent_labels: list[np.ndarray], final_labels: np.ndarray) -> np.ndarray:
    """(z, y, x) float32 share of the labelmaps `recent_labels` that differ from `final_labels`;
    zero everywhere when there are none (no fine-tuning happened)."""
    if not recent_labels:
        return np.zeros(final_labels.shape, dtype=np.float32)
    return np.mean([labels != final_labels for labels in recent_labels], axis=0).astype(np.float32)


def uncertainty_map(measure: str, probabilities: torch.Tensor, recent: RecentLabels) -> np.ndarray:
    """The chosen measure (`entropy` or `disagreement`) of a run's averaged probabilities (1, C, z, y, x)
    and its recent predictions, (z, y, x) on the model grid."""
    probabilities = probabilities[0].numpy()
    if measure == "entropy":
        return normalized_entropy(probabilities)
    if measure == "disagreement":
        return disagreement(recent.labels, probabilities.argmax(0))
    raise ValueError(f"Unknown uncertainty measure '{measure}'; choose one of {', '.join(UNCERTAINTY_MEASURES)}.")


def on_input_grid(uncertainty: np.ndarray, model_image: sitk.Image, input_image: sitk.Image) -> sitk.Image:
    """The (z, y, x) map on the model grid resampled linearly onto the input grid, float32 in [0, 1]."""
    image = sitk.GetImageFromArray(uncertainty.astype(np.float32))
    image.CopyInformation(model_image)
    return sitk.Resample(image, input_image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def organ_neighbourhood(prediction: np.ndarray, truth: np.ndarray, value: int, margin: int = 2) -> np.ndarray:
    """Voxels where either map has the organ, grown by `margin` voxels: where its errors can be."""
    either = (prediction == value) | (truth == value)
    return ndimage.binary_dilation(either, iterations=margin) if margin else either


def error_detection_auc(uncertainty: np.ndarray, prediction: np.ndarray, truth: np.ndarray, value: int) -> float:
    """Area under the ROC curve of `uncertainty` as a detector of the voxels where the prediction is
    wrong about organ `value` ((prediction == value) != (truth == value)), over the organ's
    neighbourhood. 1 = every wrong voxel is more uncertain than every right one, 0.5 = chance; NaN
    when the neighbourhood has no wrong or no right voxel. All arrays (z, y, x) on one grid."""
    region = organ_neighbourhood(prediction, truth, value)
    wrong = ((prediction == value) != (truth == value))[region]
    scores = uncertainty[region].astype(np.float64)
    wrong_count, right_count = int(wrong.sum()), int((~wrong).sum())
    if wrong_count == 0 or right_count == 0:
        return float("nan")
    ranks = rankdata(scores)  # ties get their mean rank: the Mann-Whitney U statistic
    u = ranks[wrong].sum() - wrong_count * (wrong_count + 1) / 2
    return float(u / (wrong_count * right_count))


def uncertain_share(uncertainty: np.ndarray, labelmap: np.ndarray, value: int, level: float = UNCERTAIN_LEVEL) -> float:
    """Share of the organ's voxels in `labelmap` whose uncertainty is at least `level`; NaN if the organ is absent."""
    organ = labelmap == value
    count = int(organ.sum())
    return float((uncertainty[organ] >= level).sum() / count) if count else float("nan")
