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
#: Full width at half maximum of a Gaussian, in units of its standard deviation.
FWHM_PER_SD = 2.0 * np.sqrt(2.0 * np.log(2.0))


def to_model_grid(image: sitk.Image, spacing_mm, orientation: str) -> sitk.Image:
    """Resample a CT image (HU) onto the model's spacing (x, y, z mm) and orientation; outside the scan is
    air. Along the axes where the CT is finer than the model it is first smoothed (antialiasing_sigmas_mm):
    the model learnt from images whose voxels average the tissue they cover, as a CT reconstructed at the
    model's spacing does, and linear interpolation alone would point-sample a fine CT's noise and texture
    (on a real 1 mm abdominal CT at 3 mm that halved the spleen the model found)."""
    grid = model_grid(image, spacing_mm, orientation)
    sigmas = antialiasing_sigmas_mm(image, grid)
    if any(sigma > 0 for sigma in sigmas):
        smoothing = sitk.DiscreteGaussianImageFilter()
        smoothing.SetVariance([sigma ** 2 for sigma in sigmas])
        smoothing.SetUseImageSpacing(True)
        smoothing.SetMaximumKernelWidth(128)
        image = smoothing.Execute(sitk.Cast(image, sitk.sitkFloat32))
    return resample_to(image, grid, is_label=False, default_value=AIR_HU)


def antialiasing_sigmas_mm(image: sitk.Image, grid: sitk.Image) -> list[float]:
    """Per axis of `image` (x, y, z): the SD (mm) of the Gaussian that widens its voxel to the voxel of `grid`
    (the model grid) along that axis (FWHM sqrt(grid spacing^2 - image spacing^2)); 0 where the image is as
    coarse or coarser."""
    grid_direction = np.array(grid.GetDirection()).reshape(3, 3)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    sigmas = []
    for axis, spacing in enumerate(image.GetSpacing()):
        grid_axis = int(np.argmax(np.abs(grid_direction.T @ direction[:, axis])))
        sigmas.append(float(np.sqrt(max(grid.GetSpacing()[grid_axis] ** 2 - spacing ** 2, 0.0)) / FWHM_PER_SD))
    return sigmas


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
