"""Inference-specific deformation of the atlas cases onto the case being segmented.

Every atlas case is placed on the target grid (the shift of best label overlap with the current
mask, isseg.placement), then aligned by one transform x -> A(x + u(x)): an affine A and a dense
displacement field u, optimised together per case with Adam (instance optimisation), all cases of a batch at
once, over one coarse-to-fine pyramid (`AlignmentSettings.levels`). The objective:

- mode `mask` (default): soft Dice between the warped atlas labels and the current inference
  mask (the moving-average probabilities), over the labels present in that mask only:
  mask-based weak supervision, robust to contrast shifts;
- mode `intensity`: local normalized cross-correlation (LNCC) of the images;
- mode `both`: the sum of the two;
always with MONAI's bending energy penalty on u.

Memory: the optimisation works on downsampled copies (one channel per present label), never on a
full-resolution one-hot volume; the pyramid is made coarser when batch x labels x voxels would pass
`AlignmentSettings.max_elements`, and finer where an axis would be pooled below MIN_GRID_VOXELS (a
thin partial scan). The final warp runs case by case and label by label, so the peak
grows with cases x voxels, not with cases x labels x voxels.

A later round starts from the transforms of the previous one (`AlignedAtlas.transforms`) and only
refines them at the finest level.

Tensors are (batch, channel, z, y, x) on the model grid; intensities are normalized to [0, 1];
displacements are in voxels of the target grid; affine matrices act on grid_sample's normalized
(x, y, z) coordinates (align_corners=True).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss, LocalNormalizedCrossCorrelationLoss

from .metrics import mean_dice
from .placement import initial_placement, overlap_shifts
from .protocol import ALIGN_MODES, DEFAULT_ALIGN_MODE
from .validation import MIN_GRID_VOXELS



@dataclass
class AlignmentSettings:
    mode: str = DEFAULT_ALIGN_MODE
    levels: tuple[int, ...] = (4, 2)
    iterations: int = 40
    warm_iterations: int = 20
    affine_learning_rate: float = 0.01
    deformable_learning_rate: float = 0.2
    bending_weight: float = 2.0
    lncc_kernel: int = 5
    batch_size: int = 8
    max_elements: int = 2**25

    def schedule(self, warm: bool) -> list[int]:
        """Iterations per pyramid level: `iterations` at every level in a first round; a warm-started
        round only refines at the finest level."""
        if warm:
            return [0] * (len(self.levels) - 1) + [self.warm_iterations]
        return [self.iterations] * len(self.levels)


@dataclass
class AtlasTransforms:
    """Per atlas case: shifts (N, 3) integer voxels of the initial placement; theta (N, 3, 4) affine;
    ddf (N, 3, z', y', x') the displacement field on the finest working grid, in target voxels."""

    shifts: np.ndarray
    theta: torch.Tensor
    ddf: torch.Tensor


@dataclass
class AlignedAtlas:
    """Atlas cases on the target grid. images: (N, 1, z, y, x) in [0, 1]; labels: (N, 1, z, y, x)
    class indices (uint8, int16 beyond 255 classes); dice: (N,) mean Dice of the warped labels against
    the current mask over the labels present in either; folding: (N,) fraction of voxels whose
    Jacobian determinant of the whole transform is <= 0; transforms: what the next round starts from."""

    images: torch.Tensor
    labels: torch.Tensor
    dice: np.ndarray
    folding: np.ndarray
    transforms: AtlasTransforms


# z slices per slab of folding_fraction: the Jacobian (9 values per voxel, with temporaries) of a
# clinical-size field at once would take several GiB; slabs of 16 slices keep it to a few hundred MiB.
FOLDING_SLAB = 16


def folding_fraction(ddf: torch.Tensor, slab: int = FOLDING_SLAB) -> torch.Tensor:
    """Fraction of voxels with non-positive Jacobian determinant of x -> x + ddf(x), per case.

    ddf: (N, 3, z, y, x) in voxels, channel i along spatial axis i. Returns (N,). Computed `slab` z
    slices at a time, each with one neighbouring slice either side, so the central differences (one-sided
    at the volume's faces) are those of the whole field."""
    depth, folded = ddf.shape[2], ddf.new_zeros(ddf.shape[0])
    for first in range(0, depth, slab):
        low, high = max(first - 1, 0), min(first + slab + 1, depth)
        gradients = torch.stack(torch.gradient(ddf[:, :, low:high], dim=(2, 3, 4)), dim=2)  # (N, 3, 3, slab + 2, y, x)
        kept = gradients[:, :, :, first - low:first - low + min(slab, depth - first)]
        jacobian = kept + torch.eye(3, device=ddf.device)[None, :, :, None, None, None]
        folded += (torch.linalg.det(jacobian.permute(0, 3, 4, 5, 1, 2)) <= 0).flatten(1).sum(dim=1)
    return folded / ddf[0, 0].numel()


def identity_grid(n: int, shape, device: torch.device) -> torch.Tensor:
    """grid_sample grid (n, z, y, x, 3) of the identity on a grid of `shape`."""
    return F.affine_grid(torch.eye(3, 4, device=device).expand(n, 3, 4), [n, 1, *shape], align_corners=True)


def _voxels_to_normalized(full_shape, device: torch.device) -> torch.Tensor:
    return torch.tensor([2.0 / max(s - 1, 1) for s in full_shape], device=device).view(1, 3, 1, 1, 1)


def sampling_grid(theta: torch.Tensor, ddf: torch.Tensor, identity: torch.Tensor, full_shape) -> torch.Tensor:
    """grid_sample grid (N, z, y, x, 3) for x -> A(x + u(x)) on the grid of `identity` (from
    `identity_grid`), which covers the target grid `full_shape`; u = `ddf` (N, 3, ...) in target
    voxels, upsampled to that grid; theta (N, 3, 4)."""
    u = F.interpolate(ddf, size=identity.shape[1:4], mode="trilinear", align_corners=True)
    points = identity + (u * _voxels_to_normalized(full_shape, ddf.device)).movedim(1, -1).flip(-1)
    return torch.einsum("n...j,nij->n...i", points, theta[:, :, :3]) + theta[:, None, None, None, :, 3]


def _warp(volume: torch.Tensor, grid: torch.Tensor, padding: str = "border") -> torch.Tensor:
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def _downsample(volume: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(volume, factor, ceil_mode=True) if factor > 1 else volume


def _label_channels(labels: torch.Tensor, values: list[int], factor: int) -> torch.Tensor:
    """(N, len(values), ...) fraction of each downsampled voxel covered by each label, built one case
    and one label at a time (no full-resolution one-hot volume)."""
    return torch.stack([torch.cat([_downsample((case == value).float()[None], factor) for value in values], dim=1)[0]
                        for case in labels])


def working_levels(levels: tuple[int, ...], shape, channels: int, batch: int, max_elements: int) -> list[int]:
    """The pyramid, doubled in every factor until batch x channels x voxels of the finest level fits,
    then each factor lowered until every axis keeps MIN_GRID_VOXELS (a thin partial scan is pooled
    less; one factor for all axes keeps the bending penalty's scaling per level)."""
    factors = list(levels)
    while batch * channels * np.prod([-(-s // factors[-1]) for s in shape]) > max_elements and min(
            -(-s // factors[-1]) for s in shape) > 8:
        factors = [2 * f for f in factors]
    return [_keeping_min_voxels(factor, min(shape)) for factor in factors]


def _keeping_min_voxels(factor: int, extent: int) -> int:
    """The largest factor up to `factor` that pools `extent` voxels into at least MIN_GRID_VOXELS (1 at least)."""
    while factor > 1 and -(-extent // factor) < MIN_GRID_VOXELS:
        factor -= 1
    return factor


class _AlignmentObjective:
    """Per-case similarity of warped atlas channels [image?, present labels...] to the target's."""

    def __init__(self, mode: str, lncc_kernel: int):
        if mode not in ALIGN_MODES:
            raise ValueError(f"Unknown alignment mode '{mode}'; choose one of {', '.join(ALIGN_MODES)}.")
        self.use_mask = mode in ("mask", "both")
        self.use_intensity = mode in ("intensity", "both")
        self.dice = DiceLoss(include_background=True, reduction="none")
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=lncc_kernel, reduction="none")

    def stack(self, image: torch.Tensor, labels: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The channels the objective looks at: only these are warped during optimisation. `labels()` makes
        the label channels, only in a mode that uses them."""
        return torch.cat(([image] if self.use_intensity else []) + ([labels()] if self.use_mask else []), dim=1)

    def __call__(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-case loss (N,) of warped channels (N, K, ...) against target channels (1, K, ...)."""
        target = target.expand(warped.shape[0], *target.shape[1:])
        loss = warped.new_zeros(warped.shape[0])
        if self.use_intensity:
            loss = loss + self.lncc(warped[:, :1], target[:, :1]).flatten(1).mean(1)
        if self.use_mask and warped.shape[1] > int(self.use_intensity):
            start = int(self.use_intensity)
            loss = loss + self.dice(warped[:, start:], target[:, start:]).flatten(1).mean(1)
        return loss


def _optimise(images: torch.Tensor, labels: torch.Tensor, target_image: torch.Tensor, target_probabilities: torch.Tensor,
              present: list[int], theta: torch.Tensor, ddf: torch.Tensor | None, settings: AlignmentSettings,
              schedule: list[int], on_iteration: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise theta (N, 3, 4) and the field over the pyramid; `ddf` None starts from zero.

    images (N, 1, z, y, x), labels (N, 1, z, y, x) placed on the target grid; target_image (1, 1, ...),
    target_probabilities (1, C, ...); `present`: the label values the Dice looks at. Returns theta and
    the field on the finest working grid."""
    objective = _AlignmentObjective(settings.mode, settings.lncc_kernel)
    bending = BendingEnergyLoss(reduction="none")
    full_shape = images.shape[2:]
    levels = working_levels(settings.levels, full_shape, len(present) + 1, len(images), settings.max_elements)
    for factor, iterations in zip(levels, schedule):
        if iterations == 0:  # skipped levels leave the field as it is (a warm start keeps its detail)
            continue
        shape = [-(-s // factor) for s in full_shape]
        ddf = (torch.zeros(len(images), 3, *shape, device=images.device) if ddf is None else
               F.interpolate(ddf.detach(), size=shape, mode="trilinear", align_corners=True)).requires_grad_()
        moving = objective.stack(_downsample(images, factor), lambda: _label_channels(labels, present, factor))
        target = objective.stack(_downsample(target_image, factor), lambda: torch.cat(
            [_downsample(target_probabilities[:, value:value + 1], factor) for value in present], dim=1))
        identity = identity_grid(len(images), shape, images.device)
        theta = theta.detach().clone().requires_grad_()
        optimizer = torch.optim.Adam([{"params": [theta], "lr": settings.affine_learning_rate},
                                      {"params": [ddf], "lr": settings.deformable_learning_rate}])
        # The field is in target voxels but differentiated per working voxel: scale the penalty so
        # that the same physical bending costs the same at every level (the weight is set at factor 2).
        bending_weight = settings.bending_weight * (2 / factor) ** 4
        for _ in range(iterations):
            on_iteration()
            optimizer.zero_grad()
            warped = _warp(moving, sampling_grid(theta, ddf, identity, full_shape))
            loss = objective(warped, target) + bending_weight * bending(ddf).flatten(1).mean(1)
            loss.sum().backward()
            optimizer.step()
    if ddf is None:
        ddf = torch.zeros(len(images), 3, *[-(-s // levels[-1]) for s in full_shape], device=images.device)
    return theta.detach(), ddf.detach()


def _warp_case(image: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor, ddf: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Warp one case (1, 1, z, y, x) on the full grid: image bilinear, labels by the largest
    bilinearly warped indicator, one label at a time. Returns image, labels, folding fraction."""
    full_shape = image.shape[2:]
    identity = identity_grid(1, full_shape, image.device)
    grid = sampling_grid(theta, ddf, identity, full_shape)
    warped_image = _warp(image, grid)
    best = torch.full_like(warped_image, -1.0)
    warped_labels = torch.zeros_like(labels)
    for value in torch.unique(labels).tolist():
        indicator = _warp((labels == value).float(), grid)
        better = indicator > best
        best = torch.where(better, indicator, best)
        warped_labels[better] = value
    displacement = (grid - identity).flip(-1).movedim(-1, 1) / _voxels_to_normalized(full_shape, image.device)
    return warped_image, warped_labels, float(folding_fraction(displacement)[0])


def _without_a_mask_to_follow(settings: AlignmentSettings) -> AlignmentSettings:
    """The settings for a mask without organs (e.g. a few slices where the network found none), which
    pulls nothing: `both` aligns by the images alone, `mask` keeps the placement (no iterations)."""
    if settings.mode == "both":
        return replace(settings, mode="intensity")
    return settings if settings.mode == "intensity" else replace(settings, iterations=0, warm_iterations=0)


def align_atlas(atlas_images: list[np.ndarray], atlas_labels: list[np.ndarray], target_image: torch.Tensor,
                target_probabilities: torch.Tensor, settings: AlignmentSettings, device: torch.device,
                on_iteration: Callable[[int, int], None] = lambda done, total: None,
                start: AtlasTransforms | None = None) -> AlignedAtlas:
    """Align every atlas case to the target, `settings.batch_size` cases at a time.

    atlas_images / atlas_labels: per case (z, y, x) arrays at the model spacing, images in [0, 1].
    target_image (1, 1, z, y, x) [0, 1]; target_probabilities (1, C, z, y, x), the current mask.
    `start`: the transforms of a previous round to refine (warm start). `on_iteration(done, total)`
    counts optimisation iterations over all batches (it may raise to cancel). Returns the aligned
    cases on the CPU.
    """
    num_classes = target_probabilities.shape[1]
    target_labels = target_probabilities[0].argmax(0)
    present = [value for value in torch.unique(target_labels).tolist() if value > 0]
    settings = _without_a_mask_to_follow(settings) if not present else settings
    shifts = start.shifts if start is not None else overlap_shifts(atlas_labels, target_labels.numpy(), present, device)
    images, labels = initial_placement(atlas_images, atlas_labels, tuple(target_labels.shape), shifts)
    target_image, target_probabilities = target_image.to(device), target_probabilities.to(device)
    target_labels = target_labels.to(device)
    schedule = settings.schedule(warm=start is not None)
    starts = range(0, len(images), settings.batch_size)
    counter = iter(range(1, len(starts) * sum(schedule) + 1))
    total = len(starts) * sum(schedule)
    dice, folding, thetas, ddfs = [], [], [], []
    for first in starts:
        part = slice(first, first + settings.batch_size)
        batch_images, batch_labels = images[part].to(device), labels[part].to(device)
        theta = (start.theta[part].to(device) if start is not None
                 else torch.eye(3, 4, device=device).repeat(len(batch_images), 1, 1))
        ddf = start.ddf[part].to(device) if start is not None else None
        theta, ddf = _optimise(batch_images, batch_labels, target_image, target_probabilities, present, theta, ddf,
                               settings, schedule, lambda: on_iteration(next(counter), total))
        with torch.no_grad():
            for case in range(len(batch_images)):
                image, label, fold = _warp_case(batch_images[case:case + 1], batch_labels[case:case + 1],
                                                theta[case:case + 1], ddf[case:case + 1])
                # The warped case replaces its placement, which nothing needs any more: one copy of the atlas.
                images[first + case].copy_(image[0])
                labels[first + case].copy_(label[0])
                dice.append(mean_dice(label[0, 0], target_labels, range(1, num_classes)))
                folding.append(fold)
        thetas.append(theta.cpu())
        ddfs.append(ddf.cpu())
    return AlignedAtlas(images=images, labels=labels, dice=np.array(dice), folding=np.array(folding),
                        transforms=AtlasTransforms(shifts, torch.cat(thetas), torch.cat(ddfs)))
