"""Between the user's image and the network: model grid, intensity window, tensors.

Tensors are (batch, channel, z, y, x), the order of SimpleITK arrays; spacing and patch sizes
in model.json are (x, y, z), the order of SimpleITK sizes.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import ScaleIntensityRange

from .io import model_grid, resample_to

AIR_HU = -1024.0


def to_model_grid(image: sitk.Image, spacing_mm, orientation: str) -> sitk.Image:
    """Resample a CT image (HU) onto the model's spacing and orientation; outside the scan is air."""
    return resample_to(image, model_grid(image, spacing_mm, orientation), is_label=False, default_value=AIR_HU)


def normalize(hu: np.ndarray | torch.Tensor, window: tuple[float, float]):
    """Map HU linearly so that window[0] -> 0 and window[1] -> 1, clipping outside (MONAI ScaleIntensityRange)."""
    scale = ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)
    return scale(hu)


def image_tensor(image: sitk.Image, window: tuple[float, float]) -> torch.Tensor:
    """(1, 1, z, y, x) float32 tensor of the normalized image."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return torch.as_tensor(np.asarray(normalize(array, window)), dtype=torch.float32)[None, None]


def zyx(size_xyz) -> tuple[int, int, int]:
    """Reverse an (x, y, z) size to the (z, y, x) order of tensors."""
    return tuple(int(s) for s in size_xyz)[::-1]
