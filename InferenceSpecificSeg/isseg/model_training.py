"""Training a network from scratch into a model package (the engine of `isseg train`), from labelled
cases in the Medical Segmentation Decathlon layout (isseg.datasets):

    DATASET/dataset.json   {"labels": {"0": "background", "1": "liver", ...}, "training": [{"image": ..., "label": ...}]}
    DATASET/imagesTr/*.nii.gz, DATASET/labelsTr/*.nii.gz

Cases are resampled to the model spacing, split into training and validation cases, and a MONAI
UNet is trained on random patches. The package gets the weights, model.json (labels with names,
colors and terminology codes), the training cases as its atlas, per-label thresholds chosen on the
validation cases and the training curves. A checkpoint after every evaluation makes the command
resumable: run it again with the same output folder to continue. `rechoose_thresholds` (`isseg train
--thresholds-only`) chooses a built package's thresholds again on its validation cases, without training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import model_package, protocol
from .appearance import AppearanceRandomizer
from .short_scans import ShortScanCutter
from .datasets import read_labelled_case, read_msd_dataset
from .device import network_to, resolve_device
from .errors import BadInputError, BadModelError
from .events import EventWriter, RunClock
from .inference import predict_probabilities
from .io import resample_to, write_text_atomic
from .losses import segmentation_loss
from .metrics import binary_dice, dice_per_label
from .networks.monai_net import build_monai_network
from .optimisation import PatchSampler, PatchSettings, train_step
from .preprocess import image_tensor, to_model_grid, zyx
from .terminology import describe_label

THRESHOLD_CANDIDATES = np.round(np.arange(0.05, 0.96, 0.05), 2)
THRESHOLD_MIN_GAIN = 0.01


@dataclass
class TrainSettings:
    """What `isseg train` does (recorded in model.json under "training")."""

    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    orientation: str = "LPS"
    intensity_window: tuple[float, float] = (-200.0, 300.0)
    patch_size: tuple[int, int, int] = (64, 64, 48)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 1500
    learning_rate: float = 1e-3
    loss: str = protocol.DEFAULT_LOSS
    validation_fraction: float = 0.2
    evaluate_every: int = 100
    seed: int = 0
    randomize_appearance: bool = False
    short_scan_probability: float = 0.0
    patches: PatchSettings = field(default_factory=lambda: PatchSettings(intensity_scale=0.05, intensity_shift=0.02))


@dataclass
class LabelledCase:
    case_id: str
    image: sitk.Image
    labels: sitk.Image


def load_case(case_id: str, image_path: Path, label_path: Path, names: dict[int, str], settings: TrainSettings) -> LabelledCase:
    """Read one case, check it (datasets.read_labelled_case), and resample it to the model grid."""
    image, labels = read_labelled_case(image_path, label_path, names)
    model_image = to_model_grid(image, settings.spacing, settings.orientation)
    model_labels = resample_to(sitk.Cast(labels, sitk.sitkUInt8), model_image, is_label=True)
    return LabelledCase(case_id, model_image, model_labels)


def split_cases(case_ids: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation cases; at least one validation case when there are 3 or more."""
    order = np.random.default_rng(seed).permutation(len(case_ids))
    count = int(round(fraction * len(case_ids))) if len(case_ids) >= 3 else 0
    count = max(count, 1) if len(case_ids) >= 3 and fraction > 0 else count
    return sorted(order[count:].tolist()), sorted(order[:count].tolist())


def _stack(cases: list[LabelledCase], window) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    images = [image_tensor(c.image, window)[0] for c in cases]
    labels = [torch.as_tensor(sitk.GetArrayFromImage(c.labels).astype(np.int64))[None] for c in cases]
    return images, labels


def choose_thresholds(probabilities: list[np.ndarray], truths: list[np.ndarray], num_labels: int) -> list[dict]:
    """Per label, on the validation cases (probabilities: per case (C, z, y, x); truths: per case (z, y, x)):
    the mean Dice at every THRESHOLD_CANDIDATES threshold (`dice_per_threshold`, None where no case has the
    label), at 0.5, and the `threshold` to use, or None for the argmax.

    The threshold is the one nearest 0.5 among those within THRESHOLD_MIN_GAIN of the best mean Dice, and it is
    kept only where it beats 0.5 by at least THRESHOLD_MIN_GAIN. On a flat curve the best threshold is the noise
    of a few cases, and the farther it is from 0.5 the more a shifted case (another scanner, a real CT for a
    model trained on synthetic ones) loses by it (Bice et al. 2021: 0.05 off costs a median 11.8 % Dice)."""
    half = int(np.argmin(np.abs(THRESHOLD_CANDIDATES - 0.5)))
    choices = []
    for value in range(1, num_labels + 1):
        scores = np.array([np.nanmean(dices) if not np.all(np.isnan(dices)) else np.nan for dices in (
            [binary_dice(p[value] >= threshold, t == value) for p, t in zip(probabilities, truths)]
            for threshold in THRESHOLD_CANDIDATES)])
        choice = {"value": value, "threshold": None, "dice_at_threshold": None, "dice_at_0.5": float(scores[half]),
                  "dice_per_threshold": [None if np.isnan(score) else round(float(score), 4) for score in scores]}
        if not np.all(np.isnan(scores)):
            near_best = np.flatnonzero(scores >= np.nanmax(scores) - THRESHOLD_MIN_GAIN)
            nearest = int(near_best[np.argmin(np.abs(THRESHOLD_CANDIDATES[near_best] - 0.5))])
            choice["dice_at_threshold"] = float(scores[nearest])
            if scores[nearest] >= np.nan_to_num(scores[half]) + THRESHOLD_MIN_GAIN:
                choice["threshold"] = float(THRESHOLD_CANDIDATES[nearest])
        choices.append(choice)
    return choices


def train_package(dataset: Path, output: Path, settings: TrainSettings, events: EventWriter, device_name: str = "auto",
                  name: str | None = None, description: str = "") -> Path:
    """Train a network on the dataset and write a complete model package to `output`."""
    device = resolve_device(device_name)
    cases, names, labels = _load_dataset(dataset, settings, events)
    train_index, validation_index = split_cases([c.case_id for c in cases], settings.validation_fraction, settings.seed)
    validation = [cases[i] for i in validation_index]
    output.mkdir(parents=True, exist_ok=True)
    training = _Training.start(settings, len(labels), device, output / "checkpoint.pt", events)
    started = time.monotonic()
    _train(training, [cases[i] for i in train_index], validation, names, settings, device, events)
    thresholds = validation_thresholds(training.network, validation, labels, settings, device, events)
    config = {
        "name": name or f"{Path(dataset).name} model",
        "version": "1.0",
        "description": description or f"UNet trained with isseg train on {len(train_index)} cases of {dataset}.",
        "license": "Same as the training data",
        "citation": "Chen et al., Inference-specific learning for improved medical image segmentation, Med Phys 2025, doi:10.1002/mp.17883",
        "network": training.network_config,
        "input": {"spacing": list(settings.spacing), "orientation": settings.orientation,
                  "intensity": {"a_min": settings.intensity_window[0], "a_max": settings.intensity_window[1]}},
        "patch_size": list(settings.patch_size),
        "labels": labels,
        "thresholds_on_validation": thresholds,
        "training": {"settings": _plain_settings(settings), "train_cases": [cases[i].case_id for i in train_index],
                     "validation_cases": [c.case_id for c in validation], "curves": training.curves,
                     "seconds": round(time.monotonic() - started, 1), "device": str(device)},
    }
    atlas = [(cases[i].case_id, cases[i].image, cases[i].labels) for i in train_index]
    model_package.save(output, config, training.network.cpu(), atlas)
    training.checkpoint_path.unlink(missing_ok=True)
    curve = training.curves["validation_dice"]
    events.emit("done", package=str(output), validation_dice=curve[-1] if curve else None)
    return output


def _load_dataset(dataset: Path, settings: TrainSettings, events: EventWriter,
                  ) -> tuple[list[LabelledCase], dict[int, str], list[dict]]:
    """The cases on the model grid, the label names (value -> name) and the model.json label entries."""
    entries, names = read_msd_dataset(dataset)
    events.emit("stage", stage="load", cases=len(entries))
    cases = [load_case(case_id, image_path, label_path, names, settings) for case_id, image_path, label_path in entries]
    labels = [describe_label(value, names[value]) for value in sorted(names) if value != 0]
    if [label["value"] for label in labels] != list(range(1, len(labels) + 1)):
        raise BadInputError(f"dataset.json labels must be numbered 0..N without gaps (got {sorted(names)}).")
    return cases, names, labels


@dataclass
class _Training:
    """The network, its optimizer and schedule, the curves so far and the step to continue after
    (0 for a new run, the checkpoint's step when one is resumed)."""

    network_config: dict
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    checkpoint_path: Path
    curves: dict = field(default_factory=lambda: {"step": [], "train_loss": [], "validation_dice": [],
                                                  "seconds_per_step": []})
    start_step: int = 0

    @classmethod
    def start(cls, settings: TrainSettings, num_labels: int, device, checkpoint_path: Path,
              events: EventWriter) -> "_Training":
        """A new UNet for `num_labels` labels plus background, or the one `checkpoint_path` holds."""
        network_config = {"name": "UNet", "args": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": num_labels + 1, "channels": list(settings.channels),
            "strides": [2] * (len(settings.channels) - 1), "num_res_units": 1, "norm": "INSTANCE"}}
        network = network_to(build_monai_network(network_config), device)
        optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps,
                                                               eta_min=settings.learning_rate * 0.05)
        training = cls(network_config, network, optimizer, scheduler, np.random.default_rng(settings.seed),
                       checkpoint_path)
        torch.manual_seed(settings.seed)
        if checkpoint_path.exists():
            checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
            network.load_state_dict(checkpoint["network"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            training.curves = json.loads(checkpoint["curves"])
            training.start_step = int(checkpoint["step"])
            training.rng = np.random.default_rng([settings.seed, training.start_step])
            events.emit("stage", stage="resume", step=training.start_step)
        return training

    @property
    def num_labels(self) -> int:
        return self.network_config["args"]["out_channels"] - 1

    def save_checkpoint(self, step: int) -> None:
        torch.save({"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "curves": json.dumps(self.curves), "step": step},
                   self.checkpoint_path)


def _train(training: _Training, train_cases: list[LabelledCase], validation: list[LabelledCase],
           names: dict[int, str], settings: TrainSettings, device, events: EventWriter) -> None:
    """Fine-tune from `training.start_step` to `settings.steps`; validate and checkpoint every
    `settings.evaluate_every` steps and at the end."""
    train_images, train_labels = _stack(train_cases, settings.intensity_window)
    loss_function = segmentation_loss(settings.loss)
    patch = zyx(settings.patch_size)
    appearance = AppearanceRandomizer(names, settings.intensity_window) if settings.randomize_appearance else None
    short_scans = ShortScanCutter(settings.short_scan_probability, patch) if settings.short_scan_probability else None
    sampler = PatchSampler(_pad_to_common(train_images, 0.0), _pad_to_common(train_labels, 0), patch, settings.patches,
                           training.rng, device)
    clock = RunClock(settings.steps - training.start_step)
    events.emit("stage", stage="train")
    recent_losses, recent_seconds = [], 0.0
    for step in range(training.start_step + 1, settings.steps + 1):
        started = time.monotonic()
        loss = train_step(training.network, training.optimizer, loss_function, sampler, device, appearance, short_scans)
        training.scheduler.step()
        recent_seconds += time.monotonic() - started
        recent_losses.append(loss)
        clock.advance(1)
        events.emit("progress", stage="train", step=step, total=settings.steps, loss=round(loss, 5), eta_s=clock.seconds_left())
        if step % settings.evaluate_every == 0 or step == settings.steps:
            validation_dice = _validation_dice(training.network, validation, settings, device, training.num_labels)
            training.curves["step"].append(step)
            training.curves["train_loss"].append(float(np.mean(recent_losses)))
            training.curves["validation_dice"].append(validation_dice)
            # Training steps only (validation excluded): what a longer run of the same recipe costs per step.
            training.curves["seconds_per_step"].append(round(recent_seconds / len(recent_losses), 4))
            recent_losses, recent_seconds = [], 0.0
            events.emit("progress", stage="validate", step=step, total=settings.steps, loss=None, eta_s=clock.seconds_left(),
                        validation_dice=validation_dice)
            training.save_checkpoint(step)


def validation_thresholds(network: torch.nn.Module, validation: list[LabelledCase], labels: list[dict],
                          settings: TrainSettings, device, events: EventWriter) -> list[dict]:
    """choose_thresholds on the validation cases (on the model grid); each of `labels` (model.json entries,
    changed in place) gets the threshold chosen for it, if any. Returns the choices (thresholds_on_validation)."""
    events.emit("stage", stage="thresholds")
    probabilities, truths = [], []
    for case in validation:
        probabilities.append(predict_probabilities(network, image_tensor(case.image, settings.intensity_window),
                                                   zyx(settings.patch_size), device)[0].numpy())
        truths.append(sitk.GetArrayFromImage(case.labels))
    thresholds = choose_thresholds(probabilities, truths, len(labels)) if validation else []
    for label, choice in zip(labels, thresholds):
        label.pop("threshold", None)
        if choice["threshold"] is not None:
            label["threshold"] = choice["threshold"]
    return thresholds


def rechoose_thresholds(dataset: Path, package_dir: Path, events: EventWriter, device_name: str = "auto") -> list[dict]:
    """Choose the per-label thresholds of a package that `isseg train` built from `dataset` again, with today's
    rule (choose_thresholds), on the validation cases its model.json names; rewrites model.json (labels and
    thresholds_on_validation) and leaves the weights alone. Returns the choices."""
    model_file = Path(package_dir) / protocol.MODEL_FILE
    config = json.loads(model_file.read_text(encoding="utf-8")) if model_file.is_file() else {}
    if "validation_cases" not in config.get("training", {}):
        raise BadModelError(f"{package_dir} holds no package built by `isseg train` (no model.json with its training "
                            "record): its thresholds can only be chosen by training it (without --thresholds-only).")
    trained = config["training"]["settings"]
    settings = TrainSettings(spacing=tuple(trained["spacing"]), orientation=trained["orientation"],
                             intensity_window=tuple(trained["intensity_window"]), patch_size=tuple(trained["patch_size"]))
    entries, names = read_msd_dataset(dataset)
    paths = {case_id: (image, label) for case_id, image, label in entries}
    missing = [case_id for case_id in config["training"]["validation_cases"] if case_id not in paths]
    if missing:
        raise BadInputError(f"The dataset {dataset} lacks the validation cases this package was built with "
                            f"({', '.join(missing)}): give the dataset it was trained on.")
    validation = [load_case(case_id, *paths[case_id], names, settings) for case_id in config["training"]["validation_cases"]]
    network = model_package.load(package_dir, check_atlas=False).build_network()
    choices = validation_thresholds(network, validation, config["labels"], settings, resolve_device(device_name), events)
    config["thresholds_on_validation"] = choices
    write_text_atomic(json.dumps(config, indent=1), model_file)
    return choices


def _plain_settings(settings: TrainSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def _pad_to_common(volumes: list[torch.Tensor], fill) -> torch.Tensor:
    """Stack (1, z, y, x) volumes of different sizes into (N, 1, Z, Y, X), padding at the far end."""
    shape = np.max([v.shape[1:] for v in volumes], axis=0)
    result = torch.full((len(volumes), 1, *shape), fill, dtype=volumes[0].dtype)
    for i, volume in enumerate(volumes):
        z, y, x = volume.shape[1:]
        result[i, :, :z, :y, :x] = volume
    return result


def _validation_dice(network, validation: list[LabelledCase], settings: TrainSettings, device, num_labels: int) -> float | None:
    if not validation:
        return None
    scores = []
    for case in validation:
        image = image_tensor(case.image, settings.intensity_window)
        prediction = predict_probabilities(network, image, zyx(settings.patch_size), device)[0].argmax(0).numpy()
        scores.append(np.nanmean(dice_per_label(prediction, sitk.GetArrayFromImage(case.labels), range(1, num_labels + 1))))
    return round(float(np.nanmean(scores)), 4)
