"""Inference-specific refinement: fine-tune the network on atlas cases aligned to this case.

One copy of the network is fine-tuned through 1 to 3 rounds; each round first aligns the atlas to
the current mask, then continues fine-tuning that copy on the aligned cases. Every `update_every`
steps the network re-predicts the case and the mask becomes the moving average
P = m P + (1 - m) P_t of those predictions (Chen et al., Med Phys 2025), which smooths out the
step-to-step noise of fine-tuning and drives the next round. With `stop_when_converged` set, the
run ends (remaining steps and rounds skipped) at the first update that changes the labels of less than
that fraction of the mask.

Tensors are (batch, channel, z, y, x) on the model grid, images normalized to [0, 1].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import protocol
from .alignment import AlignedAtlas, AlignmentSettings, align_atlas
from .device import network_to
from .losses import segmentation_loss
from .optimisation import PatchSampler, PatchSettings, train_step


@dataclass
class RefineSettings:
    """Settings of one refinement run (recorded in settings.json of the output folder)."""

    steps: int = protocol.DEFAULT_STEPS
    rounds: int = protocol.DEFAULT_ROUNDS
    update_every: int = protocol.DEFAULT_UPDATE_EVERY
    momentum: float = protocol.DEFAULT_MOMENTUM
    moving_average: bool = True
    learning_rate: float = 6e-4  # with protocol.DEFAULT_STEPS: half the steps at twice the rate
    loss: str = protocol.DEFAULT_LOSS
    stop_when_converged: float = protocol.DEFAULT_STOP_WHEN_CONVERGED
    match_intensity: bool = True
    patches: PatchSettings = field(default_factory=PatchSettings)
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)

    def lighter(self) -> RefineSettings:
        """A copy that needs less memory: one atlas case aligned and one patch trained at a time."""
        settings = copy.deepcopy(self)
        settings.alignment.batch_size = 1
        settings.patches.batch_size = 1
        return settings


def label_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of the voxels labelled (foreground) in either labelmap (z, y, x) whose label differs
    between them; 0 when neither labels any voxel."""
    labelled = (before > 0) | (after > 0)
    count = int(labelled.sum())
    return float((before != after)[labelled].sum()) / count if count else 0.0


class MovingAverage:
    """P = m P + (1 - m) P_t over predictions (1, C, z, y, x); with `enabled` False it keeps
    only the latest prediction (the ablation "last iterate"). `changes` holds the label_change of
    every update."""

    def __init__(self, initial: torch.Tensor, momentum: float, enabled: bool = True):
        self.value = initial.clone()
        self.momentum = momentum if enabled else 0.0
        self.updates = 0
        self.changes: list[float] = []

    def update(self, prediction: torch.Tensor) -> None:
        # In place, keeping only the previous labels: at clinical sizes one probability volume is a GiB
        # or more (e.g. 21 classes x 256 x 256 x 192 float32), and temporaries would double the peak.
        previous_labels = self.value[0].argmax(0)
        self.value.mul_(self.momentum).add_(prediction, alpha=1 - self.momentum)
        self.updates += 1
        self.changes.append(label_change(previous_labels, self.value[0].argmax(0)))

    def converged(self, threshold: float) -> bool:
        """The last update changed the labels of less than `threshold` of the mask (never for 0)."""
        return threshold > 0 and bool(self.changes) and self.changes[-1] < threshold


class RefineObserver:
    """What `refine` tells its caller while it works; every method does nothing unless overridden.

    Any method may raise (e.g. errors.Cancelled) to stop the refinement there."""

    def stage(self, stage: str, round_index: int) -> None:
        """A round's alignment (protocol.STAGE_ALIGN) or fine-tuning (protocol.STAGE_REFINE) starts."""

    def align_iteration(self, done: int, total: int) -> None:
        """Before each alignment iteration of the round: `done` of `total`, counted from 1."""

    def aligned(self, atlas: AlignedAtlas, round_index: int) -> None:
        """The atlas of this round is aligned (atlas.dice, atlas.folding tell how well)."""

    def before_step(self, step: int) -> None:
        """Before fine-tuning step `step` (counted from 1 over all rounds), e.g. to stop on a cancel request."""

    def step(self, step: int, loss: float) -> None:
        """A fine-tuning step (counted from 1 over all rounds) is done, with its loss."""

    def predicted(self, step: int, prediction: torch.Tensor) -> None:
        """The network's prediction (1, C, z, y, x) after `step`, before it enters the moving average."""

    def updated(self, step: int, probabilities: torch.Tensor, updates: int, change: float) -> None:
        """The moving average (1, C, z, y, x) was updated after `step`; `updates` so far; `change`: the
        fraction of the mask whose label this update changed (label_change of the masks, argmax over C)."""

    def converged(self, step: int) -> None:
        """The refinement stops after `step`, before its planned steps: the average has converged."""


@dataclass
class RefineResult:
    """The final moving-average probabilities (1, C, z, y, x), how many updates made them, the
    fine-tuned copy of the network and the step after which it stopped early (None: all steps ran)."""

    probabilities: torch.Tensor
    updates: int
    network: torch.nn.Module
    converged_at: int | None


def match_atlas_intensities(images: torch.Tensor, labels: torch.Tensor, target_image: torch.Tensor,
                            target_probabilities: torch.Tensor, confidence: float = 0.9,
                            min_voxels: int = 20) -> torch.Tensor:
    """Map each organ's intensities in the aligned atlas images onto those of the same organ in the
    case, so the training set looks like the case in contrast too (e.g. another contrast phase).

    images (N, 1, ...) and labels (N, 1, ...) of the aligned atlas; target_image (1, 1, ...);
    target_probabilities (1, C, ...). For every organ c the case statistics come from voxels where
    P_c >= `confidence`; atlas voxels of label c get (x - mean_a) / std_a * std_t + mean_t.
    Organs with fewer than `min_voxels` confident voxels, and the background, are left unchanged.
    The images are changed in place and returned: at clinical sizes a copy of the atlas images is most
    of a GiB, and a round's aligned images serve only its own patches.
    """
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
            images[n, 0][region] = (values - values.mean()) / values.std().clamp(min=1e-4) * target_std + target_mean
    return images


def steps_per_round(settings: RefineSettings) -> list[int]:
    """The fine-tuning steps of each round: `settings.steps` spread as evenly as possible."""
    return np.diff(np.linspace(0, settings.steps, settings.rounds + 1).round().astype(int)).tolist()


def _round_sampler(aligned: AlignedAtlas, target_image: torch.Tensor, average: torch.Tensor, patch_zyx,
                   settings: RefineSettings, rng: np.random.Generator, device: torch.device) -> PatchSampler:
    """The patches of one round: the aligned atlas (intensities matched to the case in place unless
    switched off) with its class indices, on the device."""
    if settings.match_intensity:
        match_atlas_intensities(aligned.images, aligned.labels, target_image, average)
    return PatchSampler(aligned.images, aligned.labels, patch_zyx, settings.patches, rng, device)


def _update_average(average: MovingAverage, prediction: torch.Tensor, step: int, observer: RefineObserver) -> None:
    """Hand the prediction (1, C, z, y, x) to the observer and into the average. A function of its own so
    that the prediction (a GiB at clinical sizes) is gone when it returns, not alive in the loop's
    variable while the next one is made."""
    observer.predicted(step, prediction)
    average.update(prediction)


def refine(network: torch.nn.Module, target_image: torch.Tensor, initial_probabilities: torch.Tensor,
           atlas_images: list[np.ndarray], atlas_labels: list[np.ndarray], patch_zyx, settings: RefineSettings,
           device: torch.device, predict: Callable[[torch.nn.Module], torch.Tensor], rng: np.random.Generator,
           observer: RefineObserver | None = None, *, case_training=None,
           keep_trusted: Callable[[torch.Tensor], None] | None = None) -> RefineResult:
    """Run the alignment rounds and fine-tuning, starting from the initial probabilities.

    network: the pretrained network (left unchanged: a copy is fine-tuned). target_image (1, 1, z, y, x);
    initial_probabilities (1, C, z, y, x); atlas images (normalized) and labels: per case (z, y, x)
    arrays at the model spacing; patch_zyx: the network's patch (voxels); `predict(network)` gives the
    network's probabilities (1, C, z, y, x) of the target, as its own predictor computes them
    (isseg.networks.predict_probabilities). `observer` hears of every
    stage, iteration, step and update and may raise to stop.
    `case_training` (edits.CaseTraining, with --edited-region) adds a step on the case itself, on the
    slices the user reviewed, after every step on the atlas; `keep_trusted(probabilities)` (e.g. edits.trust)
    changes the average in place after every update, before it is published and drives the next round.
    """
    observer = observer or RefineObserver()
    tuned = network_to(copy.deepcopy(network), device)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=settings.learning_rate)
    loss_function = segmentation_loss(settings.loss)
    average = MovingAverage(initial_probabilities, settings.momentum, settings.moving_average)
    step = 0
    transforms = None  # a later round refines the previous round's transforms (warm start)
    for round_index, round_steps in enumerate(steps_per_round(settings), start=1):
        observer.stage(protocol.STAGE_ALIGN, round_index)
        aligned = align_atlas(atlas_images, atlas_labels, target_image, average.value, settings.alignment, device,
                              observer.align_iteration, start=transforms)
        transforms = aligned.transforms
        observer.aligned(aligned, round_index)
        observer.stage(protocol.STAGE_REFINE, round_index)
        sampler = _round_sampler(aligned, target_image, average.value, patch_zyx, settings, rng, device)
        for _ in range(round_steps):
            observer.before_step(step + 1)
            loss = train_step(tuned, optimizer, loss_function, sampler, device)
            if case_training is not None:
                case_training.step(tuned, optimizer, device)
            step += 1
            observer.step(step, loss)
            if step % settings.update_every == 0 or step == settings.steps:
                _update_average(average, predict(tuned), step, observer)
                if keep_trusted is not None:
                    keep_trusted(average.value)
                observer.updated(step, average.value, average.updates, average.changes[-1])
                if average.converged(settings.stop_when_converged) and step < settings.steps:
                    observer.converged(step)
                    return RefineResult(average.value, average.updates, tuned, step)
    return RefineResult(average.value, average.updates, tuned, None)
