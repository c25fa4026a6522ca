"""One inference-specific segmentation run, end to end (DESIGN.md, "One run, end to end").

read input -> model grid -> initial segmentation (snapshot 0) -> alignment rounds and fine-tuning
(a snapshot after each moving-average update) -> final labelmap, probabilities and report.
Cancelling keeps the current moving average as a partial result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, model_package
from .errors import BadInputError, Cancelled, DiskError
from .events import EventWriter, RunClock
from .io import read_image, write_image_atomic, write_text_atomic
from .networks import predict_probabilities
from .postprocess import labelmap_on_grid
from .refinement import MovingAverage, RefineSettings, refine

# An alignment round costs about as much time as this many fine-tuning steps on a CPU; only used
# to spread the progress bar and the time-left estimate over the run.
ALIGN_ROUND_UNITS = 40


class CancelToken:
    """Set by SIGTERM/SIGINT or by a file named `cancel` in the output folder."""

    def __init__(self, output_dir: Path):
        self.cancel_file = output_dir / "cancel"
        self.requested = False

    def install_signal_handlers(self) -> None:
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, self._on_signal)

    def _on_signal(self, signal_number, frame) -> None:
        self.requested = True

    def check(self) -> None:
        if self.requested or self.cancel_file.exists():
            self.requested = True
            raise Cancelled()


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when a GPU is usable, else the CPU.

    ISSEG_CUDA_MEMORY_FRACTION (0 to 1) caps the share of GPU memory this process may take, e.g. to
    leave room for Slicer's rendering on the same GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for, but no CUDA GPU is usable here. Use --device auto or cpu.")
    device = torch.device(name)
    if device.type == "cuda" and os.environ.get("ISSEG_CUDA_MEMORY_FRACTION"):
        torch.cuda.set_per_process_memory_fraction(float(os.environ["ISSEG_CUDA_MEMORY_FRACTION"]))
    return device


def settings_record(settings: RefineSettings, **extra) -> dict:
    return {
        "refine": dataclasses.asdict(settings),
        **extra,
        "versions": {"isseg": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
                     "numpy": np.__version__, "python": platform.python_version()},
    }


def segments_record(labels: list[dict]) -> dict:
    """segments.json content: each label's value, name, color and terminology."""
    keys = ("value", "name", "color", "terminology")
    return {"segments": [{k: label[k] for k in keys if k in label} for label in labels]}


def atlas_arrays(package: model_package.ModelPackage) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The package's atlas as arrays for alignment: per case a (z, y, x) float32 image normalized as the
    network's preprocessing does and a (z, y, x) int64 labelmap, at the model spacing."""
    atlas = [case.read() for case in package.atlas_cases]
    kind = package.network_kind
    images = [kind.normalize(sitk.GetArrayFromImage(image)) for image, _ in atlas]
    labels = [sitk.GetArrayFromImage(labels).astype(np.int64) for _, labels in atlas]
    return images, labels


class Run:
    """State of one run: where results go and what has been published so far."""

    def __init__(self, input_path, model, output_dir, settings: RefineSettings, events: EventWriter,
                 device: torch.device, seed: int, largest_component: bool = True):
        self.input_path, self.model_ref = input_path, model
        self.output_dir = Path(output_dir)
        self.settings, self.events, self.device, self.seed = settings, events, device, seed
        self.largest_component = largest_component
        self.cancel = CancelToken(self.output_dir)
        self.snapshot_index = 0
        self.seconds: dict[str, float] = {}
        self.alignment_quality: list[dict] = []
        self.average: MovingAverage | None = None

    def prepare_output(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / ".write-test"
            probe.write_text("ok", encoding="utf-8")
            probe.unlink()
        except OSError as error:
            raise DiskError(f"Cannot write to the output folder '{self.output_dir}' ({error.strerror}). "
                            "Choose a folder you can write to, with free space.") from None
        if self.cancel.cancel_file.exists():
            self.cancel.cancel_file.unlink()

    def execute(self) -> dict:
        """Run everything; returns the `done` (or `cancelled`) event fields."""
        self.prepare_output()
        start = time.monotonic()
        self.events.emit("stage", stage="initial")
        self.package = model_package.load(self.model_ref)
        network = self.package.build_network().to(self.device)
        self.input_image = read_image(self.input_path)
        labels = self.package.labels
        write_text_atomic(json.dumps(segments_record(labels), indent=1), self.output_dir / "segments.json")
        write_text_atomic(json.dumps(settings_record(
            self.settings, seed=self.seed, device=str(self.device), input=str(self.input_path),
            model={"path": str(self.package.root), "name": self.package.config["name"],
                   "version": self.package.config.get("version")}), indent=1), self.output_dir / "settings.json")

        kind = self.package.network_kind
        self.prepared = kind.prepare(self.input_image)
        self.model_image, target = self.prepared.model_image, self.prepared.tensor
        patch = kind.patch_zyx
        initial = predict_probabilities(kind, network, target, self.device)
        self.average = MovingAverage(initial, self.settings.momentum, self.settings.moving_average)
        self.initial_probabilities = initial
        self.publish_snapshot(step=0)
        self.seconds["initial"] = time.monotonic() - start
        try:
            self.cancel.check()
            self.run_refinement(network, target, patch)
        except Cancelled:
            return self.finish(partial=True)
        return self.finish(partial=False)

    def run_refinement(self, network, target, patch) -> None:
        settings = self.settings
        atlas_images, atlas_labels = atlas_arrays(self.package)
        clock = RunClock(settings.rounds * ALIGN_ROUND_UNITS + settings.steps)
        total_units = clock.total_units
        stage_started = {"t": time.monotonic(), "stage": None}

        def on_stage(stage, **info):
            self._close_stage(stage_started)
            stage_started.update(t=time.monotonic(), stage=stage)
            self.events.emit("stage", stage=stage, **info)

        def on_align_iteration(done, total):
            self.cancel.check()
            clock.advance(ALIGN_ROUND_UNITS / total)
            if done % 10 == 0 or done == total:
                self.events.emit("progress", stage="align", step=done, total=total, loss=None,
                                 eta_s=clock.seconds_left(), done_fraction=clock.done_units / total_units)

        def on_aligned(aligned, round_index):
            self.alignment_quality.append({
                "round": round_index, "dice_to_mask": [round(float(d), 4) for d in aligned.dice],
                "folding_fraction": [float(f) for f in aligned.folding]})

        def on_step(step, loss):
            clock.advance(1)
            self.events.emit("progress", stage="refine", step=step, total=settings.steps, loss=round(loss, 5),
                             eta_s=clock.seconds_left(), done_fraction=clock.done_units / total_units)

        def on_update(step, average):
            self.publish_snapshot(step=step)

        seed_generator = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        def predict(tuned):
            return predict_probabilities(self.package.network_kind, tuned, target, self.device)

        try:
            refine(network, target, self.average, atlas_images, atlas_labels, patch, settings, self.device, predict,
                   seed_generator, check_cancel=self.cancel.check, on_stage=on_stage,
                   on_align_iteration=on_align_iteration, on_aligned=on_aligned, on_step=on_step, on_update=on_update)
        finally:
            self._close_stage(stage_started)

    def _close_stage(self, stage_started: dict) -> None:
        if stage_started["stage"]:
            name = stage_started["stage"]
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - stage_started["t"]
            stage_started["stage"] = None

    def labelmap_on_input_grid(self) -> sitk.Image:
        probabilities = self.package.network_kind.probabilities_on_input(
            self.average.value[0].numpy(), self.prepared, self.input_image)
        return labelmap_on_grid(probabilities, self.input_image, self.package.labels, self.largest_component)

    def publish_snapshot(self, step: int) -> None:
        path = self.output_dir / f"snapshot_{self.snapshot_index:04d}.nrrd"
        write_image_atomic(self.labelmap_on_input_grid(), path)
        self.events.emit("snapshot", index=self.snapshot_index, path=str(path), step=step)
        self.snapshot_index += 1

    def finish(self, partial: bool) -> dict:
        """Write the final (or partial) labelmap, probabilities and report."""
        start = time.monotonic()
        self.events.emit("stage", stage="finalize", partial=partial)
        labelmap_path = write_image_atomic(self.labelmap_on_input_grid(), self.output_dir / "labelmap.nrrd")
        probabilities = np.round(self.average.value[0].numpy() * 255).astype(np.uint8)
        probability_image = sitk.GetImageFromArray(np.moveaxis(probabilities, 0, -1), isVector=True)
        probability_image.CopyInformation(self.model_image)
        probabilities_path = write_image_atomic(probability_image, self.output_dir / "probabilities.nrrd")
        self.seconds["finalize"] = time.monotonic() - start
        report = {
            "partial": partial,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "snapshots": self.snapshot_index,
            "moving_average_updates": self.average.updates,
            "alignment": self.alignment_quality,
            "labels": [label["name"] for label in self.package.labels],
            "device": str(self.device),
        }
        report_path = write_text_atomic(json.dumps(report, indent=1), self.output_dir / "report.json")
        fields = {"labelmap": str(labelmap_path), "probabilities": str(probabilities_path),
                  "report": str(report_path), "partial": partial}
        self.events.emit("cancelled" if partial else "done", **fields)
        return fields

