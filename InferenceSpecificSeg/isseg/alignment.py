"""Inference-specific deformation of the atlas cases onto the case being segmented.

Every atlas case is placed on the target grid (centroid of its organs on the centroid of the
current mask), then aligned by an affine transform and a dense displacement field, both
optimised per case with Adam (instance optimisation) and all cases of a batch at once:

- mode `mask` (default): soft Dice between the warped atlas labels and the current inference
  mask (the moving-average probabilities): mask-based weak supervision, robust to contrast shifts;
- mode `intensity`: local normalized cross-correlation (LNCC) of the images;
- mode `both`: the sum of the two;
always with MONAI's bending energy penalty on the displacement field, which lives at half
resolution and is upsampled to the target grid.

Tensors are (batch, channel, z, y, x) on the model grid; intensities are normalized to [0, 1];
displacements are in voxels of the target grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp

ALIGN_MODES = ("mask", "intensity", "both")


@dataclass
class AlignmentSettings:
    mode: str = "mask"
    affine_iterations: int = 50
    deformable_iterations: int = 80
    affine_learning_rate: float = 0.01
    deformable_learning_rate: float = 0.2
    bending_weight: float = 2.0
    lncc_kernel: int = 5
    batch_size: int = 8


@dataclass
class AlignedAtlas:
    """Atlas cases on the target grid. images: (N, 1, z, y, x) in [0, 1]; labels: (N, 1, z, y, x) int64;
    dice: (N,) mean foreground Dice against the current mask; folding: (N,) fraction of voxels
    whose Jacobian determinant is <= 0."""

    images: torch.Tensor
    labels: torch.Tensor
    dice: np.ndarray
    folding: np.ndarray


def place_on_grid(array: np.ndarray, shape: tuple[int, ...], shift: np.ndarray, fill: float) -> np.ndarray:
    """Copy `array` into a new array of `shape` so that voxel i lands on voxel i + shift (integers,
    z y x); voxels not covered get `fill`."""
    result = np.full(shape, fill, dtype=array.dtype)
    source, target = [], []
    for size_in, size_out, offset in zip(array.shape, shape, shift):
        start_out = max(0, offset)
        start_in = max(0, -offset)
        length = min(size_in - start_in, size_out - start_out)
        if length <= 0:
            return result
        source.append(slice(start_in, start_in + length))
        target.append(slice(start_out, start_out + length))
    result[tuple(target)] = array[tuple(source)]
    return result


def foreground_centroid(mask: np.ndarray) -> np.ndarray:
    """Centre (z, y, x voxels) of the non-zero voxels, or of the volume if there are none."""
    points = np.argwhere(mask)
    return points.mean(axis=0) if len(points) else (np.array(mask.shape) - 1) / 2


def initial_placement(atlas_images: list[np.ndarray], atlas_labels: list[np.ndarray], target_mask: np.ndarray,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put atlas cases (each (z, y, x), any size, already at the model spacing) on the target grid by
    matching organ centroids. Returns images (N, 1, z, y, x) float32 and labels (N, 1, z, y, x) int64."""
    target_centre = foreground_centroid(target_mask)
    images, labels = [], []
    for image, label in zip(atlas_images, atlas_labels):
        shift = np.round(target_centre - foreground_centroid(label > 0)).astype(int)
        images.append(place_on_grid(image, target_mask.shape, shift, 0.0))
        labels.append(place_on_grid(label, target_mask.shape, shift, 0))
    return torch.as_tensor(np.stack(images))[:, None].float(), torch.as_tensor(np.stack(labels))[:, None].long()


def folding_fraction(ddf: torch.Tensor) -> torch.Tensor:
    """Fraction of voxels with non-positive Jacobian determinant of x -> x + ddf(x), per case.

    ddf: (N, 3, z, y, x) in voxels, channel i along spatial axis i. Returns (N,)."""
    gradients = torch.stack(torch.gradient(ddf, dim=(2, 3, 4)), dim=2)  # (N, 3, 3, z, y, x)
    jacobian = gradients + torch.eye(3, device=ddf.device)[None, :, :, None, None, None]
    determinant = torch.linalg.det(jacobian.permute(0, 3, 4, 5, 1, 2))
    return (determinant <= 0).float().flatten(1).mean(dim=1)


def _mean_dice(warped_one_hot: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft foreground Dice per case; inputs (N, C, ...) probabilities, background channel 0 skipped."""
    dims = tuple(range(2, warped_one_hot.dim()))
    intersection = (warped_one_hot[:, 1:] * target[:, 1:]).sum(dims)
    total = warped_one_hot[:, 1:].sum(dims) + target[:, 1:].sum(dims)
    present = total > 0
    dice = (2 * intersection + 1e-5) / (total + 1e-5)
    return (dice * present).sum(1) / present.sum(1).clamp(min=1)


class _AlignmentObjective:
    """Similarity between a warped atlas and the target. Both are stacked as channels
    [image, one-hot labels...] against [image, probabilities...], so one warp moves both."""

    def __init__(self, mode: str, lncc_kernel: int):
        if mode not in ALIGN_MODES:
            raise ValueError(f"Unknown alignment mode '{mode}'; choose one of {', '.join(ALIGN_MODES)}.")
        self.use_mask = mode in ("mask", "both")
        self.use_intensity = mode in ("intensity", "both")
        self.dice = DiceLoss(include_background=False, reduction="none")
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=lncc_kernel, reduction="none")

    def channels(self, stacked: torch.Tensor) -> torch.Tensor:
        """The channels the objective looks at; warping only these saves most of the time."""
        if self.use_mask and self.use_intensity:
            return stacked
        return stacked[:, 1:] if self.use_mask else stacked[:, :1]

    def __call__(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-case loss (N,) of warped channels (N, K, ...) against target channels (1, K, ...)."""
        n = warped.shape[0]
        target = target.expand(n, *target.shape[1:])
        loss = warped.new_zeros(n)
        if self.use_intensity:
            loss = loss + self.lncc(warped[:, :1], target[:, :1]).flatten(1).mean(1)
        if self.use_mask:
            start = 1 if self.use_intensity else 0
            loss = loss + self.dice(warped[:, start:], target[:, start:]).flatten(1).mean(1)
        return loss


def _affine_warp(volume: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(volume.shape), align_corners=True)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _downsample(volume: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(volume, factor, ceil_mode=True) if factor > 1 else volume


def align_batch(atlas_images: torch.Tensor, atlas_labels: torch.Tensor, target_image: torch.Tensor,
                target_probabilities: torch.Tensor, settings: AlignmentSettings,
                on_iteration: Callable[[], None] = lambda: None) -> AlignedAtlas:
    """Align a batch of atlas cases already placed on the target grid.

    atlas_images (N, 1, z, y, x) [0, 1]; atlas_labels (N, 1, z, y, x) int64; target_image (1, 1, z, y, x);
    target_probabilities (1, C, z, y, x). All on one device. Returns the aligned cases on that device.
    `on_iteration` is called before every optimisation iteration (it may raise to cancel).
    """
    num_classes = target_probabilities.shape[1]
    objective = _AlignmentObjective(settings.mode, settings.lncc_kernel)
    one_hot = F.one_hot(atlas_labels[:, 0], num_classes).movedim(-1, 1).float()
    atlas = torch.cat([atlas_images, one_hot], dim=1)
    target = torch.cat([target_image, target_probabilities], dim=1)
    n = atlas.shape[0]
    device = atlas.device

    # Affine stage at quarter resolution: cheap, and enough to fix position, size and tilt.
    quarter_atlas = objective.channels(_downsample(atlas, 4))
    quarter_target = objective.channels(_downsample(target, 4))
    identity = torch.eye(3, 4, device=device).expand(n, 3, 4)
    theta_delta = torch.zeros(n, 3, 4, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta_delta], lr=settings.affine_learning_rate)
    for _ in range(settings.affine_iterations):
        on_iteration()
        optimizer.zero_grad()
        objective(_affine_warp(quarter_atlas, identity + theta_delta), quarter_target).sum().backward()
        optimizer.step()
    theta = (identity + theta_delta).detach()

    # Deformable stage: a displacement field (voxels of the full grid) optimised at half resolution,
    # where the similarity is measured too; only the final warp runs on the full grid.
    warp = Warp(mode="bilinear", padding_mode="border")
    bending = BendingEnergyLoss(reduction="none")
    with torch.no_grad():
        half_atlas = _affine_warp(objective.channels(_downsample(atlas, 2)), theta)
    half_target = objective.channels(_downsample(target, 2))
    coarse_ddf = torch.zeros(n, 3, *half_atlas.shape[2:], device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coarse_ddf], lr=settings.deformable_learning_rate)
    for _ in range(settings.deformable_iterations):
        on_iteration()
        optimizer.zero_grad()
        # Half-resolution voxels are twice as large, so the field in their units is halved.
        similarity = objective(warp(half_atlas, coarse_ddf / 2), half_target)
        smoothness = bending(coarse_ddf).flatten(1).mean(1)
        (similarity + settings.bending_weight * smoothness).sum().backward()
        optimizer.step()

    with torch.no_grad():
        ddf = F.interpolate(coarse_ddf, size=atlas.shape[2:], mode="trilinear", align_corners=True)
        warped = warp(_affine_warp(atlas, theta), ddf)
        warped_image = warped[:, :1]
        warped_labels = warped[:, 1:].argmax(1, keepdim=True)
        warped_hard = F.one_hot(warped_labels[:, 0], num_classes).movedim(-1, 1).float()
        target_hard = F.one_hot(target_probabilities.argmax(1), num_classes).movedim(-1, 1).float()
        dice = _mean_dice(warped_hard, target_hard.expand(n, -1, -1, -1, -1))
        folding = folding_fraction(ddf)
    return AlignedAtlas(warped_image, warped_labels, dice.cpu().numpy(), folding.cpu().numpy())


def align_atlas(atlas_images: list[np.ndarray], atlas_labels: list[np.ndarray], target_image: torch.Tensor,
                target_probabilities: torch.Tensor, settings: AlignmentSettings, device: torch.device,
                on_iteration: Callable[[int, int], None] = lambda done, total: None) -> AlignedAtlas:
    """Align every atlas case to the target, `settings.batch_size` cases at a time.

    atlas_images / atlas_labels: per case (z, y, x) arrays at the model spacing, images in [0, 1].
    target_image (1, 1, z, y, x) [0, 1]; target_probabilities (1, C, z, y, x), the current mask.
    `on_iteration(done, total)` counts optimisation iterations over all batches (it may raise to
    cancel). Returns the aligned cases on the CPU.
    """
    target_mask = target_probabilities[0].argmax(0).numpy() > 0
    images, labels = initial_placement(atlas_images, atlas_labels, target_mask)
    target_image, target_probabilities = target_image.to(device), target_probabilities.to(device)
    parts = []
    starts = range(0, len(images), settings.batch_size)
    total_iterations = len(starts) * (settings.affine_iterations + settings.deformable_iterations)
    counter = iter(range(1, total_iterations + 1))
    for start in starts:
        stop = start + settings.batch_size
        part = align_batch(images[start:stop].to(device), labels[start:stop].to(device), target_image,
                           target_probabilities, settings, lambda: on_iteration(next(counter), total_iterations))
        parts.append(part)
    return AlignedAtlas(
        images=torch.cat([p.images.cpu() for p in parts]),
        labels=torch.cat([p.labels.cpu() for p in parts]),
        dice=np.concatenate([p.dice for p in parts]),
        folding=np.concatenate([p.folding for p in parts]),
    )
