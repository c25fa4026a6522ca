"""Inference-specific refinement: fine-tune the network on atlas cases aligned to this case.

Each of 1 to 3 rounds aligns the atlas to the current mask, then fine-tunes a copy of the
network on the aligned cases. Every `update_every` steps the network re-predicts the case and the
mask becomes the moving average P = m P + (1 - m) P_t of those predictions (Chen et al., Med Phys
2025), which smooths out the step-to-step noise of fine-tuning and drives the next round.

Tensors are (batch, channel, z, y, x) on the model grid, images normalized to [0, 1].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .alignment import AlignedAtlas, AlignmentSettings, align_atlas
from .losses import segmentation_loss
from .training import StepSettings, train_step


@dataclass
class RefineSettings:
    """Settings of one refinement run (recorded in settings.json of the output folder)."""

    steps: int = 160
    rounds: int = 2
    update_every: int = 20
    momentum: float = 0.8
    moving_average: bool = True
    learning_rate: float = 3e-4
    loss: str = "dicece"
    match_intensity: bool = True
    step: StepSettings = field(default_factory=StepSettings)
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)


class MovingAverage:
    """P = m P + (1 - m) P_t over predictions (1, C, z, y, x); with `enabled` False it keeps
    only the latest prediction (the ablation "last iterate")."""

    def __init__(self, initial: torch.Tensor, momentum: float, enabled: bool = True):
        self.value = initial.clone()
        self.momentum = momentum if enabled else 0.0
        self.updates = 0

    def update(self, prediction: torch.Tensor) -> torch.Tensor:
        self.value = self.momentum * self.value + (1 - self.momentum) * prediction
        self.updates += 1
        return self.value


def match_atlas_intensities(images: torch.Tensor, labels: torch.Tensor, target_image: torch.Tensor,
                            target_probabilities: torch.Tensor, confidence: float = 0.9,
                            min_voxels: int = 20) -> torch.Tensor:
    """Map each organ's intensities in the aligned atlas images onto those of the same organ in the
    case, so the training set looks like the case in contrast too (e.g. another contrast phase).

    images (N, 1, ...) and labels (N, 1, ...) of the aligned atlas; target_image (1, 1, ...);
    target_probabilities (1, C, ...). For every organ c the case statistics come from voxels where
    P_c >= `confidence`; atlas voxels of label c get (x - mean_a) / std_a * std_t + mean_t.
    Organs with fewer than `min_voxels` confident voxels, and the background, are left unchanged.
    """
    result = images.clone()
    target_values = target_image[0, 0]
    for c in range(1, target_probabilities.shape[1]):
        confident = target_probabilities[0, c] >= confidence
        if int(confident.sum()) < min_voxels:
            continue
        target_mean, target_std = target_values[confident].mean(), target_values[confident].std()
        for n in range(images.shape[0]):
            region = labels[n, 0] == c
            if int(region.sum()) < min_voxels:
                continue
            values = images[n, 0][region]
            result[n, 0][region] = (values - values.mean()) / values.std().clamp(min=1e-4) * target_std + target_mean
    return result


Callback = Callable[..., None]


def refine(network: torch.nn.Module, target_image: torch.Tensor, average: MovingAverage,
           atlas_images: list[np.ndarray], atlas_labels: list[np.ndarray], patch_zyx, settings: RefineSettings,
           device: torch.device, predict: Callable[[torch.nn.Module], torch.Tensor], rng: np.random.Generator, *,
           check_cancel: Callable[[], None] = lambda: None,
           on_stage: Callback = lambda stage, **info: None,
           on_align_iteration: Callback = lambda done, total: None,
           on_aligned: Callback = lambda aligned, round_index: None,
           on_step: Callback = lambda step, loss: None,
           on_update: Callback = lambda step, average: None) -> torch.nn.Module:
    """Run the alignment rounds and fine-tuning; the moving average is updated in place in `average`.

    `check_cancel` is called before every step (it raises to stop), `on_align_iteration` before every
    alignment iteration (it should call check_cancel too).

    network: the pretrained network (left unchanged: a copy is fine-tuned). target_image (1, 1, z, y, x);
    `predict(network)` gives the network's probabilities (1, C, z, y, x) of the target, as its own
    predictor computes them (isseg.networks.predict_probabilities);
    atlas images (normalized) and labels: per case (z, y, x) arrays at the model spacing.
    Returns the fine-tuned copy.
    """
    tuned = copy.deepcopy(network).to(device)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=settings.learning_rate)
    loss_function = segmentation_loss(settings.loss)
    steps_per_round = np.diff(np.linspace(0, settings.steps, settings.rounds + 1).round().astype(int))
    step = 0
    transforms = None  # a later round refines the previous round's transforms (warm start)
    for round_index, round_steps in enumerate(steps_per_round, start=1):
        on_stage("align", round=round_index)
        aligned: AlignedAtlas = align_atlas(atlas_images, atlas_labels, target_image, average.value,
                                            settings.alignment, device, on_align_iteration, start=transforms)
        transforms = aligned.transforms
        on_aligned(aligned, round_index)
        training_images = aligned.images
        if settings.match_intensity:
            training_images = match_atlas_intensities(aligned.images, aligned.labels, target_image, average.value)
        on_stage("refine", round=round_index)
        for _ in range(int(round_steps)):
            check_cancel()
            loss = train_step(tuned, optimizer, loss_function, training_images, aligned.labels, patch_zyx, rng,
                              settings.step, device)
            step += 1
            on_step(step, loss)
            if step % settings.update_every == 0 or step == settings.steps:
                prediction = predict(tuned)
                average.update(prediction)
                on_update(step, average.value)
    return tuned
