"""From averaged probabilities to the final labelmap."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def probabilities_to_labels(probabilities: np.ndarray, labels: list[dict]) -> np.ndarray:
    """Labelmap (z, y, x) uint8 from class probabilities (C, z, y, x), C = background + labels.

    Default is the argmax. A label with a `threshold` in model.json (chosen on validation data)
    is assigned where its probability reaches the threshold and it is the most probable of the
    labels that do, so a tuned threshold can grow or shrink one organ without touching the others.
    """
    result = np.argmax(probabilities, axis=0).astype(np.uint8)
    thresholds = {label["value"]: label["threshold"] for label in labels if label.get("threshold") is not None}
    if thresholds:
        scores = np.full(probabilities.shape[1:], -1.0, dtype=np.float32)
        chosen = np.zeros(probabilities.shape[1:], dtype=np.uint8)
        for value, threshold in thresholds.items():
            above = (probabilities[value] >= threshold) & (probabilities[value] > scores)
            chosen[above] = value
            scores[above] = probabilities[value][above]
        thresholded = np.isin(result, list(thresholds))
        result[thresholded] = 0
        result[chosen > 0] = chosen[chosen > 0]
    return result


def keep_largest_component(labelmap: np.ndarray, labels: list[dict]) -> np.ndarray:
    """For each label marked `single_component` (an organ known to be one piece), keep only its
    largest 26-connected component; the removed voxels become background."""
    # What MONAI's KeepLargestConnectedComponent(independent=True, connectivity=3) does, but that needs
    # scikit-image, which is not among our dependencies; scipy ships with Slicer (test_postprocess compares).
    result = labelmap.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for label in labels:
        if not label.get("single_component"):
            continue
        components, count = ndimage.label(result == label["value"], structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            result[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return result


def resample_probabilities(probabilities: np.ndarray, model_grid: sitk.Image, target_grid: sitk.Image) -> np.ndarray:
    """Class probabilities (C, z, y, x) on `model_grid` -> (C, z', y', x') float32 on `target_grid`, each
    channel resampled linearly (outside the model grid: background 1, other classes 0), each written
    straight into the result: a list of channels and its stack were two copies, 2 GiB at clinical sizes."""
    result = np.empty((len(probabilities), *target_grid.GetSize()[::-1]), dtype=np.float32)
    for index, channel in enumerate(probabilities):
        moving = sitk.GetImageFromArray(channel.astype(np.float32, copy=False))
        moving.CopyInformation(model_grid)
        resampled = sitk.Resample(moving, target_grid, sitk.Transform(), sitk.sitkLinear,
                                  1.0 if index == 0 else 0.0, sitk.sitkFloat32)
        result[index] = sitk.GetArrayViewFromImage(resampled)
    return result


def labelmap_on_grid(probabilities: np.ndarray, grid: sitk.Image, labels: list[dict],
                     largest_component: bool) -> sitk.Image:
    """The final uint8 labelmap on `grid` from class probabilities (C, z, y, x) on that grid."""
    labelmap = probabilities_to_labels(probabilities, labels)
    if largest_component:
        labelmap = keep_largest_component(labelmap, labels)
    result = sitk.GetImageFromArray(labelmap)
    result.CopyInformation(grid)
    return result


def labels_on_grid(probabilities: np.ndarray, model_grid: sitk.Image, target_grid: sitk.Image,
                   labels: list[dict], largest_component: bool) -> sitk.Image:
    """The final uint8 labelmap on `target_grid` (the user's input grid).

    probabilities: (C, z, y, x) on `model_grid`. Each class probability is resampled linearly
    onto the target grid before the labels are chosen, so the mask is as smooth as the input
    resolution allows rather than blocky at the model's spacing.
    """
    return labelmap_on_grid(resample_probabilities(probabilities, model_grid, target_grid), target_grid, labels,
                            largest_component)
