"""`isseg evaluate`: inference-specific learning against its baselines, per case and organ.

For every labelled case of a folder in the Medical Segmentation Decathlon layout (dataset.json
whose "training" entries name an image and a label file each, e.g. in imagesTr/ and labelsTr/
or imagesTs/ and labelsTs/), these methods segment the image:

    initial                 the model's own segmentation (snapshot 0 of the first run)
    registration            per-voxel majority vote of the atlas labels aligned to the initial mask
    isl_mask                inference-specific learning: mask-driven alignment, moving average, Dice + CE
    isl_intensity           the same with alignment by image similarity (LNCC) instead of the mask
    isl_mask_last_iterate   the same with the last prediction instead of the moving average
    isl_mask_region_loss    the same with the adaptive region-specific Tversky + CE loss

(--variants picks the isl_ ones), and each is compared with the truth by Dice and HD95 (mm).
Organs are matched between the dataset and the model by name.

Files in the output folder:
    metrics.csv        per case, method and organ: Dice and HD95; a failed run as a row with its error
    summary.md         mean and SD per organ and method, Wilcoxon p-values against the initial model,
                       the failed runs
    dice_boxplot.png   Dice per method, one panel per organ and one for the mean over organs
    settings.json      every setting, the seed and the library versions
    cases/CASE/METHOD/ each run's own output (labelmap, snapshots, report, settings)
    cases/CASE/case.json  the case's scores and errors, written after its runs

An output folder that holds an earlier evaluation (its settings.json) is refused unless --resume or
--overwrite is given. --resume finishes it with the same settings: a case whose results are complete
(case.json scores every method, and each run's report.json says "partial": false) is read back, not
recomputed; the other cases are run again. --overwrite starts over.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import model_package, protocol
from .alignment import align_atlas
from .datasets import read_labelled_case, read_msd_dataset
from .errors import BadInputError, DiskError, IssegError, OutputFolderError
from .events import EventWriter, RunClock
from .io import labelmap_like, resample_to, write_image_atomic, write_text_atomic
from .metrics import dice_per_label, hd95_per_label
from .pipeline import RunResult, atlas_arrays, refine_with_fallback, settings_record
from .refinement import RefineSettings
from .reporting import format_mean_sd, format_number, markdown_table, rounded_or_none, tell, write_csv

log = logging.getLogger("isseg")


@dataclass(frozen=True)
class Variant:
    """One configuration of inference-specific learning; the other settings come from the command line."""

    name: str
    align_mode: str
    moving_average: bool
    loss: str
    description: str

    def settings(self, base: RefineSettings) -> RefineSettings:
        settings = copy.deepcopy(base)
        settings.alignment.mode = self.align_mode
        settings.moving_average = self.moving_average
        settings.loss = self.loss
        return settings


VARIANTS = {variant.name: variant for variant in (
    Variant("isl_mask", "mask", True, "dicece", "mask-driven alignment, moving average, Dice + cross-entropy"),
    Variant("isl_intensity", "intensity", True, "dicece", "alignment by image similarity (LNCC) instead of the mask"),
    Variant("isl_mask_last_iterate", "mask", False, "dicece", "the last prediction instead of the moving average"),
    Variant("isl_mask_region_loss", "mask", True, "region_tversky", "adaptive region-specific Tversky + CE loss"),
)}
BASELINES = ("initial", "registration")
BASELINE_DESCRIPTIONS = {
    "initial": "the model's own segmentation, before any refinement",
    "registration": "majority vote of the atlas labels aligned to the initial mask, no fine-tuning",
}
REFERENCE_METHOD = "initial"
MEAN = "mean"  # the per-case mean over organs, shown next to the organs
CASE_RECORD = "case.json"  # cases/CASE/case.json: the case's scores and errors (what --resume reads back)


@dataclass
class CaseResult:
    """One case: per method, Dice and HD95 (mm) per organ name, or the error that stopped the method."""

    case_id: str
    scores: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def dice(self, method: str, organ: str) -> float:
        """Dice of an organ, or with organ MEAN the mean over organs; NaN when the method has no score."""
        organ_scores = self.scores.get(method)
        if organ_scores is None:
            return math.nan
        if organ == MEAN:
            values = [dice for dice, _ in organ_scores.values() if not math.isnan(dice)]
            return float(np.mean(values)) if values else math.nan
        return organ_scores[organ][0]


class TaggedEvents:
    """Passes a run's events on to an EventWriter with fixed extra fields (the case and method of the run).
    In a terminal the runs' snapshot and done events are left out: with dozens of runs they would bury
    the progress bars."""

    def __init__(self, events: EventWriter, **tags):
        self.events, self.tags = events, tags
        # reporting.tell reads these to choose where a message goes
        self.mode, self.stream = events.mode, events.stream

    def emit(self, event: str, **fields) -> None:
        if event in ("snapshot", "done") and self.events.mode == "bar":
            return
        self.events.emit(event, **self.tags, **fields)


def score(prediction: np.ndarray, truth: np.ndarray, organs: dict[int, str],
          spacing_zyx) -> dict[str, tuple[float, float]]:
    """Dice and HD95 (mm) per organ name of a (z, y, x) labelmap against the truth on the same grid.

    organs: label value -> name. NaN where the organ is in neither map (Dice) or not in both (HD95)."""
    values = list(organs)
    dice = dice_per_label(prediction, truth, values)
    hd95 = hd95_per_label(prediction, truth, values, spacing_zyx)
    return {organs[value]: (d, h) for value, d, h in zip(values, dice, hd95)}


def paired_wilcoxon(values, baseline) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired values against a baseline.

    Pairs with a NaN are dropped; zero differences are dropped too (scipy's default), and for small
    samples without ties scipy uses the exact distribution. 1.0 when every difference is zero (no
    evidence of a difference), NaN when no pair is left."""
    from scipy.stats import wilcoxon

    values, baseline = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    paired = ~(np.isnan(values) | np.isnan(baseline))
    differences = values[paired] - baseline[paired]
    if len(differences) == 0:
        return math.nan
    if not np.any(differences):
        return 1.0
    return float(wilcoxon(differences).pvalue)


def organ_correspondence(dataset_names: dict[int, str], package: model_package.ModelPackage,
                         dataset_path: Path) -> tuple[dict[int, str], np.ndarray]:
    """Organs evaluated (model value -> name: those the dataset names too) and a lookup table that turns
    dataset label values into model label values (0 for labels the model does not know)."""
    model_values = {label["name"]: label["value"] for label in package.labels}
    organs = {model_values[name]: name for name in dataset_names.values() if name in model_values}
    if not organs:
        raise BadInputError(f"None of the labels in {dataset_path / 'dataset.json'} ({sorted(dataset_names.values())}) "
                            f"is a label of the model ({sorted(model_values)}). Name the labels as the model does.")
    lookup = np.zeros(max(dataset_names) + 1, dtype=np.uint8)
    for value, name in dataset_names.items():
        lookup[value] = model_values.get(name, 0)
    return dict(sorted(organs.items())), lookup


def read_truth(image_path: Path, label_path: Path, names: dict[int, str],
               lookup: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """The true labelmap (z, y, x) in model label values and the voxel spacing (mm, z y x).

    names: the dataset's label names; lookup: dataset label value -> model label value. Raises
    BadInputError when the image or labels cannot be read or do not fit (datasets.read_labelled_case)."""
    image, labels = read_labelled_case(image_path, label_path, names)
    return lookup[sitk.GetArrayFromImage(labels).astype(np.int64)], image.GetSpacing()[::-1]


def registration_baseline(run: RunResult, settings: RefineSettings, device: torch.device) -> sitk.Image:
    """Registration only, no fine-tuning: the atlas labels aligned (mask-driven) to the run's initial mask,
    combined by a per-voxel majority vote (ties go to the lower label value, so background wins them),
    on the run's input grid."""
    case = run.case
    atlas_images, atlas_labels = atlas_arrays(case.package)
    aligned = align_atlas(atlas_images, atlas_labels, case.target, run.initial_probabilities, settings.alignment, device)
    votes = torch.stack([(aligned.labels[:, 0] == value).sum(0) for value in range(case.package.num_classes)])
    majority = votes.argmax(0).numpy().astype(np.uint8)
    return resample_to(labelmap_like(majority, case.prepared.model_image), case.input_image, is_label=True)


def _error_text(error: Exception) -> str:
    if isinstance(error, IssegError):
        return str(error)
    log.exception("Run failed")
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate_dataset` compares, and how: the model package, the variants, the base settings,
    the device, the seed and whether the largest component of each single-piece organ is kept."""

    model: Path
    variants: tuple[Variant, ...]
    base: RefineSettings
    device: torch.device
    seed: int
    largest_component: bool

    @property
    def methods(self) -> list[str]:
        return [*BASELINES, *(variant.name for variant in self.variants)]


@dataclass(frozen=True)
class Case:
    """One labelled case of the data set and what is needed to score it against the model's labels:
    the dataset's label names, the lookup from dataset to model label values and the organs scored
    (model value -> name)."""

    case_id: str
    image_path: Path
    label_path: Path
    names: dict[int, str]
    lookup: np.ndarray
    organs: dict[int, str]


def evaluate_case(case: Case, evaluation: Evaluation, output: Path, events: EventWriter,
                  overwrite: bool = False) -> CaseResult:
    """Run every method on one case and score it. Errors are recorded in the result, never raised:
    a case that cannot be read fails every method, a run that fails fails its own method, and the
    baselines come from the first run that completed (they fail too if none did). `overwrite`: the runs
    replace what earlier runs left in their folders."""
    result = CaseResult(case.case_id)
    try:
        truth, spacing = read_truth(case.image_path, case.label_path, case.names, case.lookup)
    except IssegError as error:
        result.errors = {method: str(error) for method in evaluation.methods}
        return result

    def add_score(method: str, compute_labelmap) -> None:
        try:
            labelmap = sitk.GetArrayFromImage(compute_labelmap())
            result.scores[method] = score(labelmap, truth, case.organs, spacing)
        except Exception as error:  # reported in the outputs, and the evaluation goes on
            result.errors[method] = _error_text(error)

    for variant in evaluation.variants:
        runs = []
        add_score(variant.name, lambda: sitk.ReadImage(str(_variant_run(case, variant, evaluation, output, events, runs,
                                                                         overwrite))))
        if REFERENCE_METHOD not in result.scores and runs:
            add_score(REFERENCE_METHOD, lambda: sitk.ReadImage(str(output / variant.name / "snapshot_0000.nrrd")))
            events.emit(protocol.EVENT_STAGE, stage=protocol.STAGE_ALIGN, case=case.case_id, method="registration", round=1)
            add_score("registration", lambda: registration_run(runs[0], evaluation, output / "registration"))
    for method in BASELINES:
        if method not in result.scores and method not in result.errors:
            first_error = next(iter(result.errors.values()), "unknown error")
            result.errors[method] = f"no run of this case completed ({first_error})"
    return result


def _variant_run(case: Case, variant: Variant, evaluation: Evaluation, output: Path, events: EventWriter,
                 runs: list[RunResult], overwrite: bool) -> Path:
    """Run one variant on the case (with the out-of-memory fall-back); appends its result to `runs` and
    returns the path of its labelmap."""
    run = refine_with_fallback(case.image_path, evaluation.model, output / variant.name, variant.settings(evaluation.base),
                               TaggedEvents(events, case=case.case_id, method=variant.name), evaluation.device,
                               evaluation.seed, evaluation.largest_component, overwrite=overwrite)
    runs.append(run)
    return run.labelmap


def registration_run(run: RunResult, evaluation: Evaluation, output: Path) -> sitk.Image:
    """The registration baseline for the case of `run`, written with its settings record to `output`."""
    settings = copy.deepcopy(evaluation.base)
    settings.alignment.mode = "mask"
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(settings_record(settings, method="registration", seed=evaluation.seed,
                                                 device=str(evaluation.device)), indent=1),
                      output / protocol.SETTINGS_FILE)
    labelmap = registration_baseline(run, settings, evaluation.device)
    write_image_atomic(labelmap, output / protocol.LABELMAP_FILE)
    return labelmap


def write_case_record(result: CaseResult, folder: Path) -> Path:
    """cases/CASE/case.json: per method, Dice and HD95 (mm) per organ (null for NaN), and the errors."""
    scores = {method: {organ: [rounded_or_none(dice, 12), rounded_or_none(hd95, 12)]
                       for organ, (dice, hd95) in organ_scores.items()}
              for method, organ_scores in result.scores.items()}
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(json.dumps({"case": result.case_id, "scores": scores, "errors": result.errors}, indent=1),
                             folder / CASE_RECORD)


def read_case_record(folder: Path, case_id: str) -> CaseResult | None:
    """cases/CASE/case.json of `folder` (the case's folder) as a CaseResult, when it is readable, is
    the named case's and records no error. None otherwise."""
    try:
        record = json.loads((folder / CASE_RECORD).read_text(encoding="utf-8"))
        scores = {method: {organ: tuple(math.nan if value is None else float(value) for value in pair)
                           for organ, pair in organ_scores.items()}
                  for method, organ_scores in record["scores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if record.get("case") != case_id or record.get("errors"):
        return None
    return CaseResult(case_id, scores)


def read_complete_case(folder: Path, case_id: str, evaluation: Evaluation) -> CaseResult | None:
    """The case's result from an earlier run of the same evaluation, when it is complete: case.json scores
    every method (a failed method is run again) and every variant's run folder holds a complete result
    (protocol.result_is_complete). None otherwise."""
    result = read_case_record(folder, case_id)
    if result is None or set(result.scores) != set(evaluation.methods):
        return None
    if not all(protocol.result_is_complete(folder / variant.name) for variant in evaluation.variants):
        return None
    return result


def metrics_rows(results: list[CaseResult], methods: list[str], organs: list[str]) -> list[list]:
    """Rows of metrics.csv: case, method, organ, Dice, HD95 (mm), status, error."""
    rows = []
    for result in results:
        for method in methods:
            if method in result.errors:
                rows.append([result.case_id, method, "", None, None, "failed", result.errors[method]])
                continue
            for organ in organs:
                dice, hd95 = result.scores[method][organ]
                rows.append([result.case_id, method, organ, round(dice, 4) if not math.isnan(dice) else None,
                             round(hd95, 2) if not math.isnan(hd95) else None, "ok", ""])
    return rows


def failure_rows(results: list[CaseResult], methods: list[str]) -> list[list[str]]:
    """Rows (case, methods, error) of the failed runs; the methods that failed with one error share a row
    (a case that could not be read fails them all)."""
    failures = []
    for result in results:
        methods_by_error: dict[str, list[str]] = {}
        for method in methods:
            if method in result.errors:
                methods_by_error.setdefault(result.errors[method], []).append(method)
        failures += [[result.case_id, ", ".join(failed), error.replace("|", "/").replace("\n", " ")]
                     for error, failed in methods_by_error.items()]
    return failures


def summary_markdown(results: list[CaseResult], methods: list[str], organs: list[str], title: str) -> str:
    """summary.md: Dice and HD95 as mean ± SD over cases per organ and method, Wilcoxon p-values of each
    method against the initial model (paired over the cases both have), and the failed runs."""
    columns = [*organs, MEAN]

    def succeeded(method: str) -> list[CaseResult]:
        return [r for r in results if method in r.scores]

    def hd95(result: CaseResult, method: str, organ: str) -> float:
        if organ != MEAN:
            return result.scores[method][organ][1]
        values = [h for _, h in result.scores[method].values() if not math.isnan(h)]
        return float(np.mean(values)) if values else math.nan

    dice_rows = [[method, len(succeeded(method)), *(format_mean_sd([r.dice(method, o) for r in succeeded(method)], 3)
                                                   for o in columns)] for method in methods]
    hd95_rows = [[method, len(succeeded(method)), *(format_mean_sd([hd95(r, method, o) for r in succeeded(method)], 1)
                                                   for o in columns)] for method in methods]
    p_rows = [[method, *(format_number(paired_wilcoxon([r.dice(method, o) for r in results],
                                                        [r.dice(REFERENCE_METHOD, o) for r in results]), 4)
                         for o in columns)] for method in methods if method != REFERENCE_METHOD]
    failures = failure_rows(results, methods)
    header = ["method", "cases", *(c.replace("_", " ") for c in columns)]
    descriptions = {**BASELINE_DESCRIPTIONS, **{name: variant.description for name, variant in VARIANTS.items()}}
    method_list = "\n".join(f"- {method}: {descriptions[method]}" for method in methods)
    text = f"""# {title}

{len(results)} cases; per-case values in metrics.csv, settings in settings.json. Methods:

{method_list}

"mean" is the mean over organs within a case; values are mean ± SD over the cases where the method ran.

## Dice

{markdown_table(header, dice_rows)}
## HD95 (mm)

{markdown_table(header, hd95_rows)}
## Wilcoxon signed-rank p-values against the initial model

Two-sided, paired over cases, on Dice (the mean over organs, and per organ).

{markdown_table(["method", *header[2:]], p_rows)}
## Failed runs

"""
    text += markdown_table(["case", "methods", "error"], failures) if failures else "None.\n"
    return text


def dice_boxplot(results: list[CaseResult], methods: list[str], organs: list[str], path: Path) -> Path:
    """PNG: one panel per organ and one for the mean over organs, a box of Dice over cases per method,
    with the cases as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*organs, MEAN]
    panel_columns = min(4, len(columns))
    panel_rows = math.ceil(len(columns) / panel_columns)
    figure, axes = plt.subplots(panel_rows, panel_columns, figsize=(3.6 * panel_columns, 3.6 * panel_rows + 0.6),
                                squeeze=False)
    colors = plt.get_cmap("tab10").colors
    jitter = np.random.default_rng(0)
    for panel, (ax, organ) in enumerate(zip(axes.flat, columns)):
        data = [[d for d in (r.dice(m, organ) for r in results) if not math.isnan(d)] for m in methods]
        positions = np.arange(1, len(methods) + 1)
        boxes = ax.boxplot([values or [math.nan] for values in data], positions=positions, widths=0.6,
                           patch_artist=True, showfliers=False, medianprops={"color": "black"})
        for box, color in zip(boxes["boxes"], colors):
            box.set_facecolor((*color, 0.35))
        for position, values, color in zip(positions, data, colors):
            ax.scatter(position + jitter.uniform(-0.15, 0.15, len(values)), values, s=12, color=color, zorder=3)
        ax.set_title(organ.replace("_", " ") if organ != MEAN else "mean over organs", fontsize=11)
        ax.set_xticks(positions, [m.replace("_", " ") for m in methods], rotation=40, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if panel % panel_columns == 0:
            ax.set_ylabel("Dice")
    for ax in list(axes.flat)[len(columns):]:
        ax.set_axis_off()
    failed = sum(len(r.errors) for r in results)
    figure.suptitle(f"Dice per method, {len(results)} cases" + (f" ({failed} failed runs left out)" if failed else ""),
                    fontsize=13)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def evaluate_dataset(cases_folder: Path, evaluation: Evaluation, output: Path, events: EventWriter,
                     resume: bool = False, overwrite: bool = False) -> dict:
    """Evaluate every case of an MSD folder and write metrics.csv, summary.md, dice_boxplot.png and
    settings.json to `output`; returns the `done` event fields. An earlier evaluation in `output` is
    refused (OutputFolderError), unless `resume` (its complete cases are read back, see the module
    docstring) or `overwrite` (everything is computed again)."""
    entries, dataset_names = read_msd_dataset(cases_folder)
    package = model_package.load(evaluation.model)
    organ_values, lookup = organ_correspondence(dataset_names, package, cases_folder)
    methods = evaluation.methods
    record = settings_record(
        evaluation.base, seed=evaluation.seed, device=str(evaluation.device), cases=str(cases_folder), methods=methods,
        variants={v.name: {"align_mode": v.align_mode, "moving_average": v.moving_average, "loss": v.loss}
                  for v in evaluation.variants},
        model={"path": str(package.root), "name": package.config["name"], "version": package.config.get("version")},
        largest_component=evaluation.largest_component)
    prepare_output(output, record, resume, overwrite)

    clock = RunClock(len(entries))
    results = []
    for index, (case_id, image_path, label_path) in enumerate(entries, start=1):
        case = Case(case_id, image_path, label_path, dataset_names, lookup, organ_values)
        result = _case_result(case, evaluation, output / "cases" / case_id, events, (index, len(entries)), resume,
                              replace=resume or overwrite)
        results.append(result)
        clock.advance(1)
        events.emit(protocol.EVENT_PROGRESS, stage="evaluate", step=index, total=len(entries), loss=None,
                    eta_s=clock.seconds_left(), case=case_id, failed=sorted(result.errors),
                    mean_dice={method: rounded_or_none(result.dice(method, MEAN)) for method in methods})
    return write_evaluation(results, methods, list(organ_values.values()),
                            f"Evaluation of {package.config['name']} on {cases_folder.name}", output, events)


def _case_result(case: Case, evaluation: Evaluation, folder: Path, events: EventWriter, position: tuple[int, int],
                 resume: bool, replace: bool) -> CaseResult:
    """The case read back (with `resume`, when complete) or evaluated and recorded; announces which.
    position: (index from 1, number of cases); `replace`: the runs replace what earlier ones left."""
    index, total = position
    result = read_complete_case(folder, case.case_id, evaluation) if resume else None
    if events.mode == "bar":
        tell(events, f"\nCase {index} of {total}: {case.case_id}" + (" (complete before: read back)" if result else ""))
    else:
        events.emit("case", case=case.case_id, index=index, total=total, read_back=result is not None)
    if result is None:
        result = evaluate_case(case, evaluation, folder, events, overwrite=replace)
        write_case_record(result, folder)
    return result


def prepare_output(output: Path, record: dict, resume: bool, overwrite: bool) -> None:
    """Create the output folder and write settings.json (`record`). An earlier evaluation there (its
    settings.json) is refused unless `resume` with the same settings (library versions aside) or
    `overwrite`, which removes the earlier case records first."""
    settings_path = output / protocol.SETTINGS_FILE
    if settings_path.exists() and not overwrite:
        if not resume:
            raise OutputFolderError(
                f"The output folder '{output}' holds an earlier evaluation ({protocol.SETTINGS_FILE}). Pass --resume "
                "to finish it (complete cases are read back), --overwrite to start over, or choose another --output.")
        differing = _differing_settings(settings_path, record)
        if differing:
            raise OutputFolderError(
                f"The earlier evaluation in '{output}' has other settings ({', '.join(differing)}); --resume needs the "
                "same --cases, --model, --variants and options. Pass those, or --overwrite to start over.")
    try:
        output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for case_record in (output / "cases").glob(f"*/{CASE_RECORD}"):
                case_record.unlink()
        write_text_atomic(json.dumps(record, indent=1), settings_path)
    except OSError as error:
        raise DiskError(f"Cannot write to the output folder '{output}' ({error.strerror}). Choose another --output.") from None


def _differing_settings(path: Path, record: dict) -> list[str]:
    """Top-level keys of settings.json at `path` that differ from `record` (the library versions aside)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        return [f"{protocol.SETTINGS_FILE} unreadable"]
    current = json.loads(json.dumps(record))  # tuples become lists, as in the file
    keys = (set(earlier) | set(current)) - {"versions"}
    return sorted(key for key in keys if earlier.get(key) != current.get(key))


def write_evaluation(results: list[CaseResult], methods: list[str], organs: list[str], title: str, output: Path,
                     events: EventWriter) -> dict:
    """Write metrics.csv, summary.md and dice_boxplot.png, announce them and return the `done` event fields."""
    metrics_path = write_csv(output / "metrics.csv", ["case", "method", "organ", "dice", "hd95_mm", "status", "error"],
                             metrics_rows(results, methods, organs))
    summary = summary_markdown(results, methods, organs, title)
    summary_path = write_text_atomic(summary, output / "summary.md")
    plot_path = dice_boxplot(results, methods, organs, output / "dice_boxplot.png")
    fields = {"metrics": str(metrics_path), "summary": str(summary_path), "plot": str(plot_path),
              "failed_runs": sum(len(r.errors) for r in results)}
    events.emit(protocol.EVENT_DONE, **fields)
    tell(events, f"\n{summary}\nFiles in {output}/: summary.md, metrics.csv, dice_boxplot.png, settings.json, cases/\n")
    return fields
