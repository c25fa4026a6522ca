"""Optimisation steps shared by `isseg train` (training from scratch) and refinement (fine-tuning).

Training data are whole volumes on one grid: images (N, 1, z, y, x) normalized to [0, 1] and
labels (N, 1, z, y, x) class indices. A `PatchSampler` holds them on the training device with each
class's voxel indices, computed once (MONAI map_classes_to_indices); each step draws a batch of
random patches from it, most of them centred on a labelled voxel, applies light intensity
augmentation (MONAI RandScaleIntensity, RandShiftIntensity, RandGaussianNoise) and takes one
optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity
from monai.transforms.utils import map_classes_to_indices
from monai.utils import convert_to_tensor

# Indices kept per class and case (MONAI subsamples larger classes evenly): bounds the sampler's
# memory (8 bytes each) whatever the organ's size, at no visible cost to the spread of the centres.
MAX_CENTRES_PER_CLASS = 2**16


@dataclass
class PatchSettings:
    """What each optimiser step trains on: `batch_size` random patches, a `foreground_fraction` of them
    centred on a labelled voxel, with intensity augmentation (scale, shift, noise in normalized units)."""

    batch_size: int = 2
    foreground_fraction: float = 0.67
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    noise_std: float = 0.02


def _crop_start(centre: int, size: int, extent: int) -> int:
    return int(np.clip(centre - size // 2, 0, max(0, extent - size)))


def _pad_to_patch(volumes: torch.Tensor, patch_zyx, value) -> torch.Tensor:
    """Pad (N, 1, z, y, x) symmetrically to at least the patch size with `value`."""
    pad = [max(0, p - s) for p, s in zip(patch_zyx, volumes.shape[2:])]
    if not any(pad):
        return volumes
    return F.pad(volumes, [amount for p in reversed(pad) for amount in (p // 2, p - p // 2)], value=value)


def intensity_augmentation(settings: PatchSettings, seed: int) -> Compose:
    """Per patch (1, z, y, x): x (1 + a) + b + n, a ~ U(-scale, scale), b ~ U(-shift, shift), n ~ N(0, noise_std)
    per voxel, seeded. MONAI's noise std is fixed (sample_std False), as ours was."""
    augmentation = Compose([RandScaleIntensity(factors=settings.intensity_scale, prob=1.0),
                            RandShiftIntensity(offsets=settings.intensity_shift, prob=1.0),
                            RandGaussianNoise(prob=1.0, std=settings.noise_std, sample_std=False)])
    return augmentation.set_random_state(seed=seed)


class PatchSampler:
    """Random training patches of one training set, with its class indices computed once.

    images (N, 1, z, y, x) float, labels (N, 1, z, y, x) class indices (any integer type), both moved
    to `device` once (volumes smaller than the patch are padded: images with 0, the bottom of the
    window, labels with background); `rng` draws cases, classes and centres; the augmentation is
    seeded from it. `sample()` gives images (B, 1, *patch_zyx) float32 augmented and labels
    (B, 1, *patch_zyx) int64, on `device`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, patch_zyx, settings: PatchSettings,
                 rng: np.random.Generator, device: torch.device):
        self.images = _pad_to_patch(images, patch_zyx, 0.0).to(device)
        self.labels = _pad_to_patch(labels, patch_zyx, 0).to(device)
        self.patch_zyx, self.settings, self.rng = tuple(patch_zyx), settings, rng
        self.shape = tuple(self.images.shape[2:])
        num_classes = int(self.labels.max()) + 1
        # Per case, the flat voxel indices of each foreground class present in it.
        self.class_indices = [[indices for indices in map_classes_to_indices(
            case.cpu().numpy(), num_classes, max_samples_per_class=MAX_CENTRES_PER_CLASS)[1:] if len(indices)]
            for case in self.labels]
        self.augment = intensity_augmentation(settings, int(rng.integers(2**31)))

    def centre(self, case: int) -> list[int]:
        """A patch centre (z, y, x): with the foreground fraction a voxel of a class drawn first, so that
        small organs are seen as often as large ones; else (or with no labels) any voxel."""
        classes = self.class_indices[case]
        if classes and self.rng.random() < self.settings.foreground_fraction:
            indices = classes[int(self.rng.integers(len(classes)))]
            return [int(i) for i in np.unravel_index(int(indices[int(self.rng.integers(len(indices)))]), self.shape)]
        return [int(self.rng.integers(s)) for s in self.shape]

    def sample(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image_patches, label_patches = [], []
        for _ in range(batch_size or self.settings.batch_size):
            case = int(self.rng.integers(len(self.images)))
            starts = [_crop_start(c, p, s) for c, p, s in zip(self.centre(case), self.patch_zyx, self.shape)]
            window = (case, slice(None)) + tuple(slice(a, a + p) for a, p in zip(starts, self.patch_zyx))
            # Plain tensors: a MetaTensor (what MONAI's transforms return) slows every network operation.
            image_patches.append(convert_to_tensor(self.augment(self.images[window]), dtype=torch.float32,
                                                   track_meta=False))
            label_patches.append(self.labels[window].long())
        return torch.stack(image_patches), torch.stack(label_patches)


def train_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: torch.nn.Module,
               sampler: PatchSampler, device: torch.device, appearance=None, short_scans=None) -> float:
    """One optimiser step on a fresh batch of patches of `sampler` (on `device`); returns the loss value.
    `appearance`, when given, is a callable (patches, labels, rng) -> patches applied after the intensity
    augmentation (isseg.appearance.AppearanceRandomizer); `short_scans`, a callable (patches, labels, rng) ->
    (patches, labels) applied last, as the sliding window's padding comes after the scanner
    (isseg.short_scans.ShortScanCutter)."""
    network.train()
    image_patches, label_patches = sampler.sample()
    if appearance is not None:
        image_patches = appearance(image_patches, label_patches, sampler.rng)
    if short_scans is not None:
        image_patches, label_patches = short_scans(image_patches, label_patches, sampler.rng)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(image_patches)
    loss = loss_function(logits.float(), label_patches)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
