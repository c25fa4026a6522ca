"""One inference-specific segmentation run, end to end (DESIGN.md, "One run, end to end").

read input -> model grid -> initial segmentation (snapshot 0) -> alignment rounds and fine-tuning
(a snapshot after each moving-average update) -> final labelmap, probabilities and report.
Cancelling keeps the current moving average as a partial result. `refine_with_fallback` runs it with
the out-of-memory fall-back (lighter settings, then the CPU).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, body, changes, model_package, package_checks, protocol, uncertainty
from .alignment import AlignedAtlas
from .device import Attempt, memory_fallback_attempts, with_memory_fallback
from .edits import CaseTraining, UserEdits, trust
from .errors import Cancelled, OutOfMemoryError
from .events import EventWriter, RunClock
from .input_checks import check_model_grid, read_input
from .io import last_line, write_image_atomic, write_text_atomic
from .networks import KIND_MONAI, PreparedCase, predict_probabilities
from .networks.monai_net import build_monai_network
from .output_folder import OutputFolder
from .placement import label_dtype
from .postprocess import labelmap_on_grid
from .refinement import RefineObserver, RefineSettings, refine
from .reporting import tell
from .timing import StageTimer

# An alignment round costs about as much time as this many fine-tuning steps on a CPU; only used
# to spread the progress bar and the time-left estimate over the run.
ALIGN_ROUND_UNITS = 40
# How running out of main memory reads in a RuntimeError: torch's and ITK's allocators ("can't allocate",
# "Failed to allocate"), and oneDNN, whose convolution says only this when its workspace cannot be allocated.
MEMORY_MARKERS = ("alloc", "could not create a primitive")


class CancelToken:
    """Set by SIGTERM/SIGINT (once `install_signal_handlers` ran) or by a file named `cancel` in the
    output folder."""

    def __init__(self, output_dir: Path):
        self.cancel_file = Path(output_dir) / protocol.CANCEL_FILE
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


def settings_record(settings: RefineSettings, **extra) -> dict:
    """settings.json content: every refinement setting, `extra` entries and the library versions."""
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
    network's preprocessing does and a (z, y, x) labelmap in the smallest integer type for its values
    (placement.label_dtype: at clinical sizes each byte per voxel is 12 MB per case), at the model
    spacing. Read one case at a time, so that the files' own arrays never pile up."""
    kind = package.network_kind
    images, labels = [], []
    for case in package.atlas_cases:
        image, case_labels = case.read()
        images.append(kind.normalize(sitk.GetArrayFromImage(image)))
        values = sitk.GetArrayFromImage(case_labels)
        labels.append(values.astype(label_dtype(int(values.max(initial=0)) + 1), copy=False))
    return images, labels


@dataclass
class RunCase:
    """The case of a run: the package, the user's image (HU, input grid) and the image prepared for the
    package's network (`prepared.model_image` on the model grid, `prepared.tensor` (1, 1, z, y, x))."""

    package: model_package.ModelPackage
    input_image: sitk.Image
    prepared: PreparedCase

    @property
    def target(self) -> torch.Tensor:
        """The network input (1, 1, z, y, x), normalized as the network's preprocessing does."""
        return self.prepared.tensor

    @property
    def patch(self) -> tuple[int, int, int]:
        """The network's patch (z, y, x voxels)."""
        return self.package.network_kind.patch_zyx

    def predict(self, network: torch.nn.Module, device: torch.device, box=None) -> torch.Tensor:
        """The network's probabilities (1, C, z, y, x) of this case, as its own predictor computes them;
        with `box` (body.body_box) only inside it, background elsewhere."""
        if box is None:
            return predict_probabilities(self.package.network_kind, network, self.target, device)
        return body.predict_in_box(lambda crop: predict_probabilities(self.package.network_kind, network, crop, device),
                                   self.target, box)


@dataclass
class RunResult:
    """What a run produced: the files (labelmap and probabilities, report.json), whether it was cancelled
    (a partial result), the initial probabilities (1, C, z, y, x) on the model grid and the prepared case."""

    labelmap: Path
    probabilities: Path
    report: Path
    partial: bool
    initial_probabilities: torch.Tensor
    case: RunCase

    def event_fields(self) -> dict:
        """The fields of the `done` (or `cancelled`) event."""
        return {"labelmap": str(self.labelmap), "probabilities": str(self.probabilities),
                "report": str(self.report), "partial": self.partial}


class _RunProgress(RefineObserver):
    """Turns what `refine` reports into protocol events, stage times, snapshots and cancel checks."""

    def __init__(self, run: Run, case: RunCase, timer: StageTimer):
        self.run, self.case, self.timer = run, case, timer
        self.clock = RunClock(run.settings.rounds * ALIGN_ROUND_UNITS + run.settings.steps)
        self.alignment_quality: list[dict] = []
        self.probabilities: torch.Tensor | None = None
        self.updates = 0
        self.recent = uncertainty.RecentLabels()
        self.changes: list[float] = []
        self.converged_at: int | None = None

    def _progress(self, stage: str, step: int, total: int, loss: float | None) -> None:
        self.run.events.emit(protocol.EVENT_PROGRESS, stage=stage, step=step, total=total, loss=loss,
                             eta_s=self.clock.seconds_left(), done_fraction=self.clock.done_units / self.clock.total_units)

    def stage(self, stage: str, round_index: int) -> None:
        self.run.stage = stage
        self.timer.start(stage)
        self.run.events.emit(protocol.EVENT_STAGE, stage=stage, round=round_index)

    def align_iteration(self, done: int, total: int) -> None:
        self.run.cancel.check()
        self.clock.advance(ALIGN_ROUND_UNITS / total)
        if done % 10 == 0 or done == total:
            self._progress(protocol.STAGE_ALIGN, done, total, None)

    def aligned(self, atlas: AlignedAtlas, round_index: int) -> None:
        self.alignment_quality.append({
            "round": round_index, "dice_to_mask": [round(float(d), 4) for d in atlas.dice],
            "folding_fraction": [float(f) for f in atlas.folding]})

    def before_step(self, step: int) -> None:
        self.run.cancel.check()

    def step(self, step: int, loss: float) -> None:
        self.clock.advance(1)
        self._progress(protocol.STAGE_REFINE, step, self.run.settings.steps, round(loss, 5))

    def predicted(self, step: int, prediction: torch.Tensor) -> None:
        self.recent.add(prediction)

    def updated(self, step: int, probabilities: torch.Tensor, updates: int, change: float) -> None:
        self.probabilities, self.updates = probabilities, updates
        self.changes.append(round(change, 5))
        self.run.publish_snapshot(self.case, probabilities, step)

    def converged(self, step: int) -> None:
        self.converged_at = step

    def stopping_record(self) -> dict:
        """report.json's `early_stopping`: the threshold, each update's mask change, where it stopped."""
        return {"threshold": self.run.settings.stop_when_converged, "mask_change_per_update": self.changes,
                "stopped_after_step": self.converged_at, "steps_planned": self.run.settings.steps}


class Run:
    """One run: segment `input_path` with the package at `model_path` and refine the result, writing
    into `output_dir`. Events go to `events`; `cancel` (by default one for `output_dir`) stops it;
    `first_snapshot` numbers the first snapshot (a retry after running out of memory continues the
    numbering); `overwrite` lets it remove an earlier run's results from `output_dir`, `allow_slice_gaps`
    lets it read a DICOM series with missing slices. With `initial_mask` (and `edited_region`, both
    labelmap files on the input grid) the run starts from the user's edits (isseg.edits).
    `uncertainty_measure` names what uncertainty.nrrd shows. `execute()` does the work once and returns
    a RunResult."""

    def __init__(self, input_path, model_path, output_dir, settings: RefineSettings, events: EventWriter,
                 device: torch.device, seed: int, largest_component: bool = True, cancel: CancelToken | None = None,
                 first_snapshot: int = 0, overwrite: bool = False, allow_slice_gaps: bool = False, *,
                 initial_mask=None, edited_region=None, uncertainty_measure: str = protocol.DEFAULT_UNCERTAINTY):
        self.input_path, self.model_path = Path(input_path), Path(model_path)
        self.output_dir = Path(output_dir)
        self.overwrite, self.allow_slice_gaps = overwrite, allow_slice_gaps
        self.stage = protocol.STAGE_INITIAL  # where the run is, for messages such as running out of memory
        self.claimed_folder = False  # set once the output folder passed its checks and is this run's
        self.settings, self.events, self.device, self.seed = settings, events, device, seed
        self.largest_component = largest_component
        self.cancel = cancel or CancelToken(self.output_dir)
        self._snapshots = first_snapshot
        self.initial_mask, self.edited_region = initial_mask, edited_region
        self.uncertainty_measure = uncertainty_measure
        self.edits: UserEdits | None = None

    @property
    def snapshots_published(self) -> int:
        """The number of the next snapshot: snapshots published by this run and the attempts before it."""
        return self._snapshots

    def execute(self) -> RunResult:
        """Run everything: the initial segmentation, the refinement and the final (or partial) result. The
        input and the package are checked before the output folder is claimed (created, locked, an earlier
        run's results dealt with; a stale cancel file removed). Running out of main memory raises
        OutOfMemoryError naming the stage."""
        timer = StageTimer()
        timer.start(protocol.STAGE_INITIAL)
        self.events.emit(protocol.EVENT_STAGE, stage=protocol.STAGE_INITIAL)
        try:
            package, input_image, network = self._load_and_check()
            with OutputFolder(self.output_dir, self.overwrite):
                self.claimed_folder = True
                return self._execute_in_folder(package, input_image, network, timer)
        except torch.cuda.OutOfMemoryError:
            raise  # the GPU fall-back deals with it
        except (MemoryError, RuntimeError) as error:
            text = str(error).lower()
            if not isinstance(error, MemoryError) and not any(marker in text for marker in MEMORY_MARKERS):
                raise
            raise OutOfMemoryError(
                f"Out of main memory during the {self.stage} stage ({last_line(error)[:200]}). "
                "Close other programs, crop the CT to the region of interest, or use a machine with more memory."
            ) from None

    def _load_and_check(self) -> tuple[model_package.ModelPackage, sitk.Image, torch.nn.Module]:
        """Read and check the input and the package before anything is written (docs/worker-protocol.md,
        "Limits"); returns the package, the input image and the network on the run's device."""
        input_image = read_input(self.input_path, self.events, self.allow_slice_gaps)
        package = model_package.load(self.model_path)
        check_model_grid(input_image, package.spacing, package.orientation, package.num_classes)
        network_config = package.config["network"]
        if network_config.get("kind", KIND_MONAI) == KIND_MONAI:
            package_checks.check_footprint(lambda: build_monai_network(network_config),
                                           package.network_kind.patch_zyx, self.settings.patches.batch_size,
                                           network_config.get("args", {}).get("in_channels", 1),
                                           package.root / protocol.MODEL_FILE)
        return package, input_image, package.build_network().to(self.device)

    def _execute_in_folder(self, package: model_package.ModelPackage, input_image: sitk.Image,
                           network: torch.nn.Module, timer: StageTimer) -> RunResult:
        case = self._prepare_case(package, input_image)
        initial = self._initial_probabilities(case, network)
        initial_labels = sitk.GetArrayFromImage(self.publish_snapshot(case, initial, step=0))
        progress = _RunProgress(self, case, timer)
        progress.probabilities = initial
        try:
            self.cancel.check()
            self._refine(case, network, initial, progress)
        except Cancelled:
            return self._finish(case, initial, initial_labels, progress, timer, partial=True)
        return self._finish(case, initial, initial_labels, progress, timer, partial=False)

    def _initial_probabilities(self, case: RunCase, network: torch.nn.Module) -> torch.Tensor:
        """(1, C, z, y, x) on the model grid: the user's mask with --initial-mask, else the network's."""
        if self.initial_mask is None:
            return case.predict(network, self.device)
        values = [label["value"] for label in case.package.labels]
        self.edits = UserEdits.read(self.initial_mask, self.edited_region, case.input_image, values)
        return self.edits.probabilities(case.input_image, case.prepared.model_image, case.package.num_classes)

    def _prepare_case(self, package: model_package.ModelPackage, input_image: sitk.Image) -> RunCase:
        """Record segments.json and settings.json and put the image on the model grid."""
        write_text_atomic(json.dumps(segments_record(package.labels), indent=1), self.output_dir / protocol.SEGMENTS_FILE)
        write_text_atomic(json.dumps(settings_record(
            self.settings, seed=self.seed, device=str(self.device), input=str(self.input_path),
            model={"path": str(package.root), "name": package.config["name"], "version": package.config.get("version")},
            largest_component=self.largest_component, uncertainty=self.uncertainty_measure,
            edits={"initial_mask": _path_text(self.initial_mask), "edited_region": _path_text(self.edited_region)}),
            indent=1), self.output_dir / protocol.SETTINGS_FILE)
        return RunCase(package, input_image, package.network_kind.prepare(input_image))

    def _refine(self, case: RunCase, network: torch.nn.Module, initial: torch.Tensor,
                progress: _RunProgress) -> None:
        atlas_images, atlas_labels = atlas_arrays(case.package)
        case_training, keep_trusted = None, None
        if self.edits is not None:
            model_image = case.prepared.model_image
            case_training = CaseTraining.from_edits(self.edits, case.input_image, model_image, case.target,
                                                    case.patch, self.seed)
            weight = self.edits.trusted_weight(case.input_image, model_image)
            keep_trusted = lambda probabilities: trust(probabilities, initial, weight)  # noqa: E731
        torch.manual_seed(self.seed)
        box = body.body_box(case.target, case.patch)  # re-predictions skip the air around the body
        refine(network, case.target, initial, atlas_images, atlas_labels, case.patch, self.settings, self.device,
               lambda tuned: case.predict(tuned, self.device, box), np.random.default_rng(self.seed), progress,
               case_training=case_training, keep_trusted=keep_trusted)

    def _labelmap(self, case: RunCase, probabilities: torch.Tensor) -> sitk.Image:
        on_input = case.package.network_kind.probabilities_on_input(probabilities[0].numpy(), case.prepared,
                                                                    case.input_image)
        labelmap = labelmap_on_grid(on_input, case.input_image, case.package.labels, self.largest_component)
        return self.edits.keep_edits(labelmap) if self.edits is not None else labelmap

    def publish_snapshot(self, case: RunCase, probabilities: torch.Tensor, step: int) -> sitk.Image:
        """Write the mask of `probabilities` (1, C, z, y, x) as the next snapshot, announce it and return it."""
        path = self.output_dir / protocol.SNAPSHOT_PATTERN.format(index=self._snapshots)
        labelmap = self._labelmap(case, probabilities)
        write_image_atomic(labelmap, path)
        self.events.emit(protocol.EVENT_SNAPSHOT, index=self._snapshots, path=str(path), step=step)
        self._snapshots += 1
        return labelmap

    def _write_uncertainty_and_changes(self, case: RunCase, progress: _RunProgress, initial_labels: np.ndarray,
                                       refined: np.ndarray) -> list[dict]:
        """Write uncertainty.nrrd (input grid) and return the per-organ change rows, also emitted as an
        event and printed as a table (on stderr when stdout carries the JSON events)."""
        measure = uncertainty.uncertainty_map(self.uncertainty_measure, progress.probabilities, progress.recent)
        uncertainty_image = uncertainty.on_input_grid(measure, case.prepared.model_image, case.input_image)
        write_image_atomic(uncertainty_image, self.output_dir / protocol.UNCERTAINTY_FILE)
        organs = changes.organ_changes(initial_labels, refined, sitk.GetArrayFromImage(uncertainty_image),
                                       case.package.labels, case.input_image.GetSpacing()[::-1])
        self.events.emit(protocol.EVENT_ORGAN_CHANGES, organs=organs)
        tell(self.events, "What changed, per organ (initial -> refined):\n" + changes.format_table(organs))
        return organs

    def _finish(self, case: RunCase, initial: torch.Tensor, initial_labels: np.ndarray, progress: _RunProgress,
                timer: StageTimer, partial: bool) -> RunResult:
        """Write the final (or partial) labelmap, uncertainty map, probabilities and, last, report.json."""
        self.stage = protocol.STAGE_FINALIZE
        timer.start(protocol.STAGE_FINALIZE)
        self.events.emit(protocol.EVENT_STAGE, stage=protocol.STAGE_FINALIZE, partial=partial)
        labelmap = self._labelmap(case, progress.probabilities)
        labelmap_path = write_image_atomic(labelmap, self.output_dir / protocol.LABELMAP_FILE)
        organs = self._write_uncertainty_and_changes(case, progress, initial_labels, sitk.GetArrayFromImage(labelmap))
        probabilities = np.round(progress.probabilities[0].numpy() * 255).astype(np.uint8)
        probability_image = sitk.GetImageFromArray(np.moveaxis(probabilities, 0, -1), isVector=True)
        probability_image.CopyInformation(case.prepared.model_image)
        probabilities_path = write_image_atomic(probability_image, self.output_dir / protocol.PROBABILITIES_FILE)
        timer.stop()
        report = {
            "partial": partial,
            "seconds": timer.rounded(),
            "snapshots": self._snapshots,
            "moving_average_updates": progress.updates,
            "early_stopping": progress.stopping_record(),
            "alignment": progress.alignment_quality,
            "labels": [label["name"] for label in case.package.labels],
            "device": str(self.device),
            "uncertainty": {"measure": self.uncertainty_measure, "uncertain_level": protocol.UNCERTAIN_LEVEL},
            "organs": organs,
            "from_edits": self.edits is not None,
        }
        report_path = write_text_atomic(json.dumps(report, indent=1), self.output_dir / protocol.REPORT_FILE)
        result = RunResult(labelmap_path, probabilities_path, report_path, partial, initial, case)
        self.events.emit(protocol.EVENT_CANCELLED if partial else protocol.EVENT_DONE, **result.event_fields())
        return result


def refine_with_fallback(input_path, model_path, output_dir, settings: RefineSettings, events: EventWriter,
                         device: torch.device, seed: int, largest_component: bool = True,
                         cancel: CancelToken | None = None,
                         attempts: list[Attempt] | None = None, overwrite: bool = False,
                         allow_slice_gaps: bool = False, **edit_options) -> RunResult:
    """A Run that, on GPU out-of-memory, starts over with lighter settings, then on the CPU (by default
    the attempts of `device.memory_fallback_attempts`), after a `warning` event that says why. Snapshot
    numbering continues over the attempts. Raises errors.OutOfMemoryError when every attempt failed.
    `overwrite` and `allow_slice_gaps` as for Run; `edit_options` (initial_mask, edited_region,
    uncertainty_measure) go to every Run."""
    cancel = cancel or CancelToken(Path(output_dir))
    published, claimed = 0, False

    def attempt(try_: Attempt) -> RunResult:
        nonlocal published, claimed
        # A retry replaces what an earlier attempt of this same run wrote into the folder it had claimed.
        run = Run(input_path, model_path, output_dir, settings.lighter() if try_.lighter else settings, events,
                  try_.device, seed, largest_component, cancel, first_snapshot=published,
                  overwrite=overwrite or claimed, allow_slice_gaps=allow_slice_gaps, **edit_options)
        try:
            return run.execute()
        finally:
            published, claimed = run.snapshots_published, claimed or run.claimed_folder

    return with_memory_fallback(attempt, attempts or memory_fallback_attempts(device),
                                lambda message: events.emit(protocol.EVENT_WARNING, message=message))


def _path_text(path) -> str | None:
    return None if path is None else str(path)
