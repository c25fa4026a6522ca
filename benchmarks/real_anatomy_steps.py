"""The steps of `real_anatomy.py run` (benchmarks/real_anatomy.py), each on a RunContext: synthesis of
the training and test cases from the bundle, `isseg train`, `isseg evaluate --resume` case by case
within the time budget, the real-CT check and the timed in-process runs.

Files in WORK: data/<dataset>_<split>/ (MSD folders), models/<dataset>/ (packages), evaluate/<dataset>/
(an `isseg evaluate` folder), real_ct/, speed/<dataset>/ (timed runs), timings/<name>.json (one per
timed run), logs/, done/ (the step markers of real_anatomy_jobs.Steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import anatomy_variation
import synthetic_ct as sct
from real_anatomy_jobs import Budget, Steps, isseg_command, process_pool, run_logged, say
from real_anatomy_plans import (ABDOMEN_TRAIN, HEADNECK_TEST, HEADNECK_TRAIN, ISL_VARIANTS, Distribution, Scale,
                                abdomen_case_plan, abdomen_label_names, abdomen_test_distribution, headneck_case_plan,
                                headneck_label_names, headneck_target)
from real_anatomy_reports import compare_to_reference, real_ct_markdown, totalseg_mapping, write_csv

DATASETS = ("headneck", "abdomen")
HEADNECK_DISTRIBUTIONS = {"train": HEADNECK_TRAIN, "test": HEADNECK_TEST}


@dataclass
class RunContext:
    """What every step of one `run` reads: the command line, the scale, the folders, the bundle's
    manifest, the parts asked for, the step markers, the time budget (and the seconds kept for the
    timed runs at its end), and the CPU threads of each engine subprocess while the data-set chains
    run at once (None: torch's default)."""

    args: argparse.Namespace
    scale: Scale
    bundle: Path
    work: Path
    results: Path
    manifest: dict
    parts: set[str]
    steps: Steps
    budget: Budget
    reserve_s: float
    threads: int | None

    def save_timing(self, name: str, timing: dict) -> None:
        (self.work / "timings").mkdir(exist_ok=True)
        (self.work / "timings" / f"{name}.json").write_text(json.dumps(timing, indent=1), encoding="utf-8")

    def timings(self) -> dict[str, dict]:
        return {path.stem: json.loads(path.read_text(encoding="utf-8"))
                for path in sorted((self.work / "timings").glob("*.json"))}


# --------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------


def _synth_job(job: dict) -> dict:
    """Synthesise one case (in a worker process) and write it into its MSD folder."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    tissues = sitk.ReadImage(job["tissues"])
    if job["spacing"] is not None and not np.allclose(tissues.GetSpacing(), job["spacing"]):
        tissues = sct.resample_labels(tissues, job["spacing"])
    distribution = Distribution(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in job["distribution"].items()})
    rng = np.random.default_rng(job["seed"])
    settings = sct.draw_case_settings(rng, distribution.phases, distribution.noise_hu, distribution.psf_mm,
                                      distribution.max_deform_mm, distribution.fov_min_fraction)
    if job["dataset"] == "headneck":
        tissue_hu, phases = sct.HEADNECK_TISSUE_HU, sct.HEADNECK_ENHANCEMENT_HU
        target = headneck_target(job.get("organs") or sct.HEADNECK_ORGANS)
    else:
        tissue_hu = {int(k): v for k, v in json.loads(Path(job["tissue_hu"]).read_text(encoding="utf-8")).items()}
        phases = sct.ICRP_ENHANCEMENT_HU
        target = {i: value for value, (_, ids) in sct.ICRP_ABDOMEN_LABELS.items() for i in ids}
    anatomy = {}
    if distribution.organ_variation:
        tissues, anatomy = _varied_anatomy(tissues, rng)
    image, labels = sct.make_case(tissues, tissue_hu, phases, target, settings, rng)
    entry = sct.write_msd_case(Path(job["out"]), job["case_id"], image, labels)
    return {"entry": entry, "case_id": job["case_id"],
            "synthesis": {"source": job["source"], "seed": job["seed"], **asdict(settings), **anatomy,
                          "size": list(image.GetSize()), "spacing": list(image.GetSpacing())}}


def _varied_anatomy(tissues, rng: np.random.Generator):
    """The abdomen tissue map with its organs resized and moved (anatomy_variation), and the record of
    what was drawn and what it did (anatomy_variation.measured_changes, the folded fraction)."""
    organs = anatomy_variation.icrp_abdomen_organs()
    changes = anatomy_variation.draw_organ_changes(rng)
    varied, folded = anatomy_variation.vary_anatomy(tissues, organs, changes)
    return varied, {"organ_variation": anatomy_variation.measured_changes(tissues, varied, organs, changes),
                    "folded_fraction": folded}


def synthesise(jobs: list[dict], out: Path, dataset: str, split: str, pool) -> Path:
    """The cases of one split in the pool's processes, and their dataset.json."""
    if out.exists():
        shutil.rmtree(out)
    results = sorted(pool.map(_synth_job, jobs), key=lambda r: r["case_id"])
    names = headneck_label_names(jobs[0].get("organs")) if dataset == "headneck" else abdomen_label_names()
    description = sct._HEADNECK_DESCRIPTION if dataset == "headneck" else sct._ICRP_DESCRIPTION
    path = sct.write_msd_dataset_json(out, f"{dataset}-{split}", f"{description}; {split} distribution", names,
                                      [r["entry"] for r in results],
                                      synthesis={r["case_id"]: r["synthesis"] for r in results})
    sizes = [r["synthesis"]["size"] for r in results]
    say(f"  {dataset}-{split}: {len(results)} cases in {out} (sizes {sizes[0]} .. {sizes[-1]})")
    return path


def headneck_jobs(ctx: RunContext) -> dict[tuple[str, str], list[dict]]:
    plan = headneck_case_plan(ctx.manifest["headneck_train_scans"], ctx.manifest["headneck_test_scans"], ctx.scale,
                              ctx.args.seed)
    (ctx.work / "headneck_plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
    return {("headneck", split): [
        {**case, "dataset": "headneck", "tissues": str(ctx.bundle / "headneck_tissues" / f"{case['source']}.nii.gz"),
         "spacing": list(ctx.scale.headneck_synth_spacing), "distribution": asdict(HEADNECK_DISTRIBUTIONS[split]),
         "out": str(ctx.work / "data" / f"headneck_{split}")} for case in plan[split]] for split in ("train", "test")}


def abdomen_jobs(ctx: RunContext) -> dict[tuple[str, str], list[dict]]:
    """The ICRP abdomen tissue map at the scale's spacing and its HU (written once for all jobs), and the jobs."""
    import SimpleITK as sitk

    tissues_path, hu_path = ctx.work / "data" / "icrp_abdomen_tissues.nii.gz", ctx.work / "data" / "icrp_tissue_hu.json"
    tissues_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sct.icrp_abdomen_tissues(ctx.bundle / "icrp110", ctx.scale.abdomen_spacing), str(tissues_path),
                    useCompression=True)
    hu = sct.icrp_tissue_hu(ctx.bundle / "icrp110")
    hu_path.write_text(json.dumps({str(k): v for k, v in hu.items()}), encoding="utf-8")
    plan = abdomen_case_plan(ctx.scale, ctx.args.seed)
    (ctx.work / "abdomen_plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
    distributions = {"train": ABDOMEN_TRAIN, "test": abdomen_test_distribution(ctx.args.abdomen_anatomy)}
    return {("abdomen", split): [
        {**case, "dataset": "abdomen", "tissues": str(tissues_path), "tissue_hu": str(hu_path), "spacing": None,
         "distribution": asdict(distributions[split]), "out": str(ctx.work / "data" / f"abdomen_{split}")}
        for case in plan[split]] for split in ("train", "test")}


def synthesise_all(ctx: RunContext, datasets: list[str]) -> None:
    """Training and test cases of the data sets, into WORK/data/<dataset>_<split>/."""
    jobs = {**(headneck_jobs(ctx) if "headneck" in datasets else {}),
            **(abdomen_jobs(ctx) if "abdomen" in datasets else {})}
    with process_pool(ctx.args.jobs) as pool:
        for (dataset, split), split_jobs in jobs.items():
            synthesise(split_jobs, ctx.work / "data" / f"{dataset}_{split}", dataset, split, pool)


# --------------------------------------------------------------------------
# Train, evaluate
# --------------------------------------------------------------------------


def train(ctx: RunContext, dataset: str) -> Path:
    """`isseg train` on WORK/data/<dataset>_train into WORK/models/<dataset> (resumes its checkpoint)."""
    package, scale = ctx.work / "models" / dataset, ctx.scale
    if package.exists() and not (package / "checkpoint.pt").exists():
        shutil.rmtree(package)  # a finished package from an earlier run: train afresh
    command = isseg_command(
        "train", "--dataset", ctx.work / "data" / f"{dataset}_train", "--output", package,
        "--name", f"real-anatomy {dataset} ({scale.name})", "--spacing", *scale.model_spacing(dataset),
        "--patch", *scale.patch(dataset), "--channels", *scale.train_channels, "--steps", scale.train_steps(dataset),
        "--evaluate-every", scale.evaluate_every, "--device", ctx.args.device, "--seed", ctx.args.seed,
        "--progress", "json")
    run_logged(command, ctx.work / "logs" / f"train_{dataset}.log", echo=('"validate"', '"done"', '"error"'),
               threads=ctx.threads)
    return package


def subset_dataset(dataset_json: Path, case_ids: Sequence[str], out: Path) -> Path:
    """An MSD folder (dataset.json only, absolute paths) holding the named cases of another, in order."""
    dataset = json.loads(dataset_json.read_text(encoding="utf-8"))
    by_id = {Path(entry["image"]).name.split(".")[0]: entry for entry in dataset["training"]}
    missing = [case for case in case_ids if case not in by_id]
    if missing:
        raise KeyError(f"{dataset_json} has no case {missing}")
    entries = [{key: str((dataset_json.parent / by_id[case][key]).resolve()) for key in ("image", "label")}
               for case in case_ids]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps({**dataset, "training": entries, "numTraining": len(entries),
                                                  "synthesis": {}}, indent=1), encoding="utf-8")
    return out


def first_cases_dataset(dataset_json: Path, count: int, out: Path) -> Path:
    """subset_dataset of the first `count` cases of another."""
    entries = json.loads(dataset_json.read_text(encoding="utf-8"))["training"][:count]
    return subset_dataset(dataset_json, [Path(entry["image"]).name.split(".")[0] for entry in entries], out)


def evaluate_first_cases(ctx: RunContext, dataset: str, count: int, resume: bool) -> float:
    """`isseg evaluate` (every method) of the first `count` test cases into WORK/evaluate/<dataset>:
    with `resume` the cases done before are read back, else it starts over. Returns its seconds."""
    cases = first_cases_dataset(ctx.work / "data" / f"{dataset}_test" / "dataset.json", count,
                                ctx.work / "data" / f"{dataset}_test_evaluated")
    command = isseg_command(
        "evaluate", "--cases", cases, "--model", ctx.work / "models" / dataset, "--output",
        ctx.work / "evaluate" / dataset, "--resume" if resume else "--overwrite", "--variants", *ISL_VARIANTS,
        "--device", ctx.args.device, "--seed", ctx.args.seed, "--progress", "json", *ctx.scale.refine_options)
    return run_logged(command, ctx.work / "logs" / f"evaluate_{dataset}_{count}.log",
                      echo=('"stage": "evaluate"', '"event": "error"'), threads=ctx.threads)


def evaluate(ctx: RunContext, dataset: str) -> tuple[int, int]:
    """The test cases evaluated one more per call of `isseg evaluate --resume`, so that the time budget can
    stop between cases; each call writes the tables of all cases so far. Returns (evaluated, planned)."""
    entries = json.loads((ctx.work / "data" / f"{dataset}_test" / "dataset.json").read_text(encoding="utf-8"))
    markers = [f"evaluated_{dataset}_{Path(entry['image']).name.split('.')[0]}" for entry in entries["training"]]
    evaluated = 0
    while evaluated < len(markers) and ctx.steps.marked(markers[evaluated]):
        evaluated += 1
    durations = []
    if evaluated and not (ctx.work / "evaluate" / dataset / "metrics.csv").exists():
        durations.append(evaluate_first_cases(ctx, dataset, evaluated, resume=True))  # its tables were lost
    while evaluated < len(markers):
        if evaluated and not ctx.budget.allows(max(durations, default=0.0), ctx.reserve_s):
            say(f"  {dataset}: time budget reached, {len(markers) - evaluated} test case(s) not evaluated")
            break
        durations.append(evaluate_first_cases(ctx, dataset, evaluated + 1, resume=evaluated > 0 or not ctx.steps.force))
        ctx.steps.mark(markers[evaluated], durations[-1])
        evaluated += 1
        say(f"  {dataset}: {durations[-1]:.0f} s ({evaluated} of {len(markers)} test cases)")
    return evaluated, len(markers)


# --------------------------------------------------------------------------
# Timed in-process runs (real CT, speed and memory)
# --------------------------------------------------------------------------


def refine_settings(scale: Scale):
    """RefineSettings for the timed runs: the defaults of `isseg refine` with the scale's options."""
    from isseg.cli import build_parser
    from isseg.commands.options import refine_settings_from

    parsed = build_parser().parse_args(["refine", "--input", "x", "--model", "x", "--output", "x",
                                        *scale.refine_options])
    return refine_settings_from(parsed)


def timed_run(case_path: Path, package: Path, output: Path, scale: Scale, device_name: str, seed: int,
              repeats: int) -> dict:
    """One `isseg refine` run in this process (pipeline.Run) with its seconds per stage (report.json) and
    the peak memory per stage (run_timing.StageMonitor), and plain inference timed alone (median of `repeats`)."""
    import time
    import warnings

    from isseg import model_package
    from isseg.device import resolve_device
    from isseg.io import read_image
    from isseg.pipeline import Run
    from run_timing import StageMonitor, plain_inference_seconds

    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    device = resolve_device(device_name)
    loaded = model_package.load(package)
    image = read_image(case_path)
    inference_s = plain_inference_seconds(package, image, device, repeats)
    if output.exists():
        shutil.rmtree(output)
    monitor = StageMonitor(device)
    say(f"  timed isseg refine of {case_path.name} (pipeline.Run in this process) -> {output}")
    start = time.monotonic()
    result = Run(case_path, package, output, refine_settings(scale), monitor, device, seed).execute()
    total = time.monotonic() - start
    return {"case": case_path.name, "input_size": list(image.GetSize()),
            "model_grid_size": list(loaded.network_kind.prepare(image).model_image.GetSize()),
            "atlas_cases": len(loaded.atlas_cases), "device": str(device), "plain_inference_s": inference_s,
            "total_s": total, "seconds": json.loads(result.report.read_text(encoding="utf-8"))["seconds"],
            "peak_rss_mib": {k: v / 2**20 for k, v in monitor.peak_rss.items()},
            "peak_gpu_mib": {k: v / 2**20 for k, v in monitor.peak_gpu.items()},
            "output": str(output)}


def real_ct_rows(real: Path, package: Path, output: Path) -> tuple[list[dict], sitk.Image]:
    """Per organ the abdomen model and TotalSegmentator share: Dice and volumes of the initial mask
    (snapshot 0) and the ISL result of the run in `output`, on the real CT's grid. Returns the rows
    (compare_to_reference, tagged with `variant`) and the real CT image."""
    import SimpleITK as sitk

    from isseg import model_package
    from isseg.io import read_image

    image = read_image(real / "dicom")
    reference = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(real / "labels_totalsegmentator.nii.gz")),
                                                     image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                     sitk.sitkUInt16))
    classes = json.loads((real / "totalsegmentator_total_classes.json").read_text(encoding="utf-8"))
    names = {label["value"]: label["name"] for label in model_package.load(package, check_atlas=False).labels}
    mapping = totalseg_mapping(names, classes)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    rows = []
    for variant, file in (("initial", "snapshot_0000.nrrd"), ("isl_mask", "labelmap.nrrd")):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output / file)))
        rows += [{"variant": variant, **row} for row in compare_to_reference(prediction, reference, mapping, names,
                                                                               voxel_ml)]
    return rows, image


def real_ct_check(ctx: RunContext) -> dict:
    """The abdomen model, initial and ISL (mask alignment, moving average), on the real CT against
    TotalSegmentator: results/real_ct.md and .csv. Returns the timing of its run."""
    real, package = ctx.bundle / "real_ct", ctx.work / "models" / "abdomen"
    timing = timed_run(real / "dicom", package, ctx.work / "real_ct" / "refine", ctx.scale, ctx.args.device,
                       ctx.args.seed, ctx.scale.speed_repeats)
    rows, image = real_ct_rows(real, package, Path(timing["output"]))
    write_csv(rows, ctx.results / "real_ct.csv")
    (ctx.results / "real_ct.md").write_text(real_ct_markdown(rows, image.GetSize(), image.GetSpacing(),
                                                             timing["model_grid_size"][2], ctx.scale), encoding="utf-8")
    say(f"wrote {ctx.results / 'real_ct.md'}")
    return {**timing, "dataset": "real CT (abdomen model)"}


def speed_run(ctx: RunContext, dataset: str) -> dict:
    """The timed run of the first synthetic test case of a data set."""
    case = sorted((ctx.work / "data" / f"{dataset}_test" / "imagesTr").glob("*.nii.gz"))[0]
    timing = timed_run(case, ctx.work / "models" / dataset, ctx.work / "speed" / dataset, ctx.scale, ctx.args.device,
                       ctx.args.seed, ctx.scale.speed_repeats)
    return {**timing, "dataset": f"{dataset} (synthetic test case)"}


def read_interobserver(bundle: Path) -> list[dict] | None:
    """The bundle's human inter-observer summary per organ, None where the bundle has none."""
    from real_anatomy_reports import read_csv_rows, summarise_interobserver

    path = bundle / "headneck_interobserver.csv"
    return summarise_interobserver(read_csv_rows(path)) if path.exists() else None


def subprocess_threads(chains: int) -> int | None:
    """CPU threads per engine subprocess when `chains` run at once (they share the cores); None for one."""
    return max(1, (os.cpu_count() or 2) // chains) if chains > 1 else None


def stage_timings(ctx: RunContext) -> Mapping[str, dict]:
    """The timed runs made so far, in the order of the speed table."""
    timings = ctx.timings()
    return {name: timings[name] for name in ("headneck", "abdomen", "real_ct") if name in timings}
