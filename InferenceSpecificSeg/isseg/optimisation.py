"""Optimisation steps shared by `isseg train` (training from scratch) and refinement (fine-tuning).

Training data are whole volumes on one grid: images (N, 1, z, y, x) normalized to [0, 1] and
labels (N, 1, z, y, x) class indices. Each step draws a batch of random patches, most of them
centred on a labelled voxel, applies light intensity augmentation and takes one optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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


def sample_patches(images: torch.Tensor, labels: torch.Tensor, patch_zyx, batch_size: int,
                   rng: np.random.Generator, foreground_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches (B, 1, *patch_zyx) of images and labels; volumes smaller than the patch are
    padded (images with 0, the bottom of the window, labels with background)."""
    shape = images.shape[2:]
    pad = [max(0, p - s) for p, s in zip(patch_zyx, shape)]
    if any(pad):
        padding = [amount for p in reversed(pad) for amount in (p // 2, p - p // 2)]
        images = F.pad(images, padding, value=0.0)
        labels = F.pad(labels, padding, value=0)
        shape = images.shape[2:]
    image_patches, label_patches = [], []
    for _ in range(batch_size):
        case = int(rng.integers(len(images)))
        if rng.random() < foreground_fraction:
            foreground = torch.nonzero(labels[case, 0])
            # Sample a class first, then a voxel of it, so that small organs are seen as often as large ones.
            values = torch.unique(labels[case, 0][foreground[:, 0], foreground[:, 1], foreground[:, 2]]) if len(foreground) else []
            if len(values):
                value = values[int(rng.integers(len(values)))]
                voxels = torch.nonzero(labels[case, 0] == value)
                centre = voxels[int(rng.integers(len(voxels)))].tolist()
            else:
                centre = [int(rng.integers(s)) for s in shape]
        else:
            centre = [int(rng.integers(s)) for s in shape]
        starts = [_crop_start(c, p, s) for c, p, s in zip(centre, patch_zyx, shape)]
        window = (case, slice(None)) + tuple(slice(a, a + p) for a, p in zip(starts, patch_zyx))
        image_patches.append(images[window])
        label_patches.append(labels[window])
    return torch.stack(image_patches), torch.stack(label_patches)


def augment_intensity(patches: torch.Tensor, rng: np.random.Generator, settings: PatchSettings) -> torch.Tensor:
    """Random contrast scale, brightness shift and Gaussian noise per patch (normalized units)."""
    batch = patches.shape[0]
    scale = torch.as_tensor(1 + rng.uniform(-settings.intensity_scale, settings.intensity_scale, batch), dtype=patches.dtype)
    shift = torch.as_tensor(rng.uniform(-settings.intensity_shift, settings.intensity_shift, batch), dtype=patches.dtype)
    noise_seed = int(rng.integers(2**31))
    noise = torch.randn(patches.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=patches.dtype)
    return patches * scale.view(-1, 1, 1, 1, 1) + shift.view(-1, 1, 1, 1, 1) + settings.noise_std * noise


def train_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: torch.nn.Module,
               images: torch.Tensor, labels: torch.Tensor, patch_zyx, rng: np.random.Generator,
               settings: PatchSettings, device: torch.device, appearance=None) -> float:
    """One optimiser step on a fresh batch of patches; returns the loss value. `appearance`, when
    given, is a callable (patches, labels, rng) -> patches applied after the intensity augmentation
    (isseg.appearance.AppearanceRandomizer)."""
    network.train()
    image_patches, label_patches = sample_patches(images, labels, patch_zyx, settings.batch_size, rng,
                                                  settings.foreground_fraction)
    label_patches = label_patches.long()  # aligned atlas labels are stored as uint8
    image_patches = augment_intensity(image_patches, rng, settings)
    if appearance is not None:
        image_patches = appearance(image_patches, label_patches, rng)
    image_patches = image_patches.to(device)
    label_patches = label_patches.to(device)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(image_patches)
    loss = loss_function(logits.float(), label_patches)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
