"""Real-anatomy benchmarks: head and neck, abdomen, a real CT, speed and memory.

Real anatomy, synthetic intensities (benchmarks/synthetic_ct.py): the organ masks of 21 head-and-neck
planning CTs (Nikolov et al. 2021) and the ICRP 110 adult male phantom are turned into CT images; a
model is trained with `isseg train` on cases drawn from a *training* distribution and evaluated with
`isseg evaluate` (every method: initial, registration only, the ISL variants) on cases drawn from a shifted
*test* distribution. The abdomen model also segments a real upper-abdomen CT (labels: TotalSegmentator
predictions). Two steps, because the reference data and the GPU are on different machines:

    # 1. on any machine that sees ../shared/data (CPU work, a few minutes): tissue maps, the split,
    #    the real CT and the human inter-observer table, into a small bundle (~5 MB)
    python3 benchmarks/real_anatomy.py prepare --bundle BUNDLE
    # 2. on the GPU machine (one command; resumable: run it again to finish what a time limit cut)
    python3 benchmarks/real_anatomy.py run --bundle BUNDLE --device cuda --work WORK --results RESULTS

`all` does both in one go where the data and the device are on one machine; `--scale cpu` runs the
abdomen at 5 mm on a 2-core CPU in about half an hour (`--parts abdomen realct speed`); `--quick` is a tiny
end-to-end smoke run for a CPU. Everything generated goes to --work (default
~/.cache/isseg-benchmarks/real-anatomy-<scale>, outside the repository); only small tables and
figures go to --results (default benchmarks/results/; with --quick, WORK/results outside the repository).
Every random choice is seeded (--seed); every command run is printed first.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
ENGINE_DIR = REPO_ROOT / "InferenceSpecificSeg"
for _path in (BENCHMARKS_DIR, ENGINE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import synthetic_ct as sct  # noqa: E402  (SimpleITK, numpy, scipy only: no torch)

DEFAULT_DATA_DIR = sct.DEFAULT_DATA_DIR
DEFAULT_CACHE_DIR = sct.DEFAULT_CACHE_DIR
DEFAULT_RESULTS_DIR = BENCHMARKS_DIR / "results"

#: Methods of `isseg evaluate` (its names), in the order of the tables: two baselines it always runs, then
#: the inference-specific learning variants asked for with --variants.
VARIANTS = ("initial", "registration", "isl_mask", "isl_intensity", "isl_mask_last_iterate",
            "isl_mask_region_loss")
ISL_VARIANTS = VARIANTS[2:]

#: Organs of the abdomen label set that are small or hard; reported in a section of their own.
ABDOMEN_SMALL_ORGANS = ("gallbladder", "pancreas", "adrenal_left", "adrenal_right")
#: A head-and-neck organ whose median (oncologist) volume is below this is flagged as small.
SMALL_ORGAN_ML = 1.0

#: Abdomen label name (synthetic_ct.ICRP_ABDOMEN_LABELS) -> TotalSegmentator "total" task class name.
TOTALSEG_NAME = {
    "liver": "liver", "spleen": "spleen", "kidney_left": "kidney_left", "kidney_right": "kidney_right",
    "pancreas": "pancreas", "gallbladder": "gallbladder", "stomach": "stomach",
    "adrenal_left": "adrenal_gland_left", "adrenal_right": "adrenal_gland_right", "aorta": "aorta",
}


# --------------------------------------------------------------------------
# Sizes and distributions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """Acquisition and anatomy variation of a set of synthetic cases."""

    phases: tuple[str, ...]
    noise_hu: tuple[float, float]
    psf_mm: tuple[float, float]
    max_deform_mm: float
    fov_min_fraction: tuple[float, float, float]


# Training: one contrast phase, moderate noise, mild deformation, mild crops. Test: the other phase,
# more noise, a softer PSF, stronger deformation and tighter fields of view.
HEADNECK_TRAIN = Distribution(("native",), (10.0, 25.0), (1.0, 1.3), 8.0, (0.85, 0.85, 0.85))
HEADNECK_TEST = Distribution(("venous",), (30.0, 45.0), (1.3, 1.8), 12.0, (0.7, 0.7, 0.75))
ABDOMEN_TRAIN = Distribution(("portal_venous",), (10.0, 25.0), (1.0, 1.3), 15.0, (0.8, 0.8, 0.85))
ABDOMEN_TEST = Distribution(("arterial",), (30.0, 45.0), (1.3, 1.8), 25.0, (0.65, 0.65, 0.7))


@dataclass(frozen=True)
class Scale:
    """How big a benchmark run is. Spacings are (x, y, z) mm; patch sizes (x, y, z) voxels."""

    name: str
    headneck_synth_spacing: tuple[float, float, float]
    headneck_model_spacing: tuple[float, float, float]
    headneck_cases_per_train_scan: int
    headneck_max_train_scans: int | None  # None: every training patient's scans
    headneck_max_test_scans: int | None
    abdomen_spacing: tuple[float, float, float]
    abdomen_train_cases: int
    abdomen_test_cases: int
    headneck_train_steps: int
    abdomen_train_steps: int
    headneck_patch: tuple[int, int, int]
    abdomen_patch: tuple[int, int, int]
    train_channels: tuple[int, ...]
    evaluate_every: int
    refine_options: tuple[str, ...]  # passed to `isseg evaluate` and used for the timed runs
    speed_repeats: int
    time_budget_min: float | None  # test cases, the real CT and timed runs that would not fit are skipped


#: The bundle's head-and-neck tissue maps are made at this spacing (the synthetic_ct default).
BUNDLE_HEADNECK_SPACING = (2.0, 2.0, 2.5)

SCALES = {
    # Sized for ~8 minutes on one H100 with 16 CPU cores (the time budget stops it at 8.5). Measured in a
    # rehearsal on an H100 (both chains at once, head and neck then at 2 x 2 x 2.5 mm): synthesis of 43
    # cases 12 s; abdomen training (2500 steps) 85 s, one abdomen test case (4 ISL runs of ~11 s,
    # registration, scoring) ~48 s; head-and-neck training 172 s, one test case ~160 s (ISL runs of
    # ~30 s). Hence the head and neck at 3 mm here (about 2.7 times fewer voxels) and 1500 abdomen steps
    # (validation Dice 0.964 at 1500, 0.967 at 2500); the small organs are flagged in the tables.
    "full": Scale("full", headneck_synth_spacing=(3.0, 3.0, 3.0), headneck_model_spacing=(3.0, 3.0, 3.0),
                  headneck_cases_per_train_scan=1, headneck_max_train_scans=None, headneck_max_test_scans=None,
                  abdomen_spacing=(4.0, 4.0, 4.0), abdomen_train_cases=16, abdomen_test_cases=6,
                  headneck_train_steps=2500, abdomen_train_steps=1500,
                  headneck_patch=(64, 64, 48), abdomen_patch=(96, 64, 48),
                  train_channels=(16, 32, 64, 128), evaluate_every=250, refine_options=(), speed_repeats=3,
                  time_budget_min=8.5),
    # The abdomen on a 2-core CPU in about an hour (`--scale cpu --parts abdomen realct speed`): a coarser
    # grid (5 mm), smaller patches and 8 atlas cases, so that training takes 4 minutes and one ISL run
    # about a minute; the adrenals are a few voxels at 5 mm. Head and neck at 4 mm is sized alike but
    # does not fit the same hour.
    "cpu": Scale("cpu", headneck_synth_spacing=(4.0, 4.0, 4.0), headneck_model_spacing=(4.0, 4.0, 4.0),
                 headneck_cases_per_train_scan=1, headneck_max_train_scans=8, headneck_max_test_scans=None,
                 abdomen_spacing=(5.0, 5.0, 5.0), abdomen_train_cases=8, abdomen_test_cases=10,
                 headneck_train_steps=1500, abdomen_train_steps=1500,
                 headneck_patch=(48, 48, 48), abdomen_patch=(64, 48, 32),
                 train_channels=(16, 32, 64, 128), evaluate_every=200, refine_options=(), speed_repeats=3,
                 time_budget_min=60.0),
    # A smoke run of the whole flow on a CPU in a few minutes; its numbers mean nothing.
    "quick": Scale("quick", headneck_synth_spacing=(5.0, 5.0, 5.0), headneck_model_spacing=(5.0, 5.0, 5.0),
                   headneck_cases_per_train_scan=1, headneck_max_train_scans=3, headneck_max_test_scans=2,
                   abdomen_spacing=(6.0, 6.0, 6.0), abdomen_train_cases=4, abdomen_test_cases=2,
                   headneck_train_steps=6, abdomen_train_steps=6,
                   headneck_patch=(32, 32, 32), abdomen_patch=(32, 32, 32),
                   train_channels=(8, 16, 32),
                   evaluate_every=3,
                   refine_options=("--steps", "4", "--update-every", "2", "--rounds", "1",
                                   "--align-iterations", "4"),
                   speed_repeats=1, time_budget_min=None),
}

#: Seconds kept free at the end of the time budget for the timed runs and the tables.
FINAL_RESERVE_S = 75.0
#: Rough seconds of the real-CT check, for the time budget (an H100 with 16 cores).
REAL_CT_ESTIMATE_S = 60.0


# --------------------------------------------------------------------------
# Pure helpers (unit-tested in Testing/test_real_anatomy.py)
# --------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty (organ outside the scanned range)."""
    from isseg.metrics import binary_dice  # here, not at the top: `prepare` and the plans stay torch-free
    return binary_dice(a, b)


def interobserver_rows(scan: str, first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray],
                       voxel_ml: float) -> list[dict]:
    """One row per organ of one scan: Dice between two annotators' masks on the same grid and
    each mask's volume in ml. first/second: organ name -> binary array (same shape)."""
    rows = []
    for organ in first:
        a, b = np.asarray(first[organ]) > 0, np.asarray(second[organ]) > 0
        if a.shape != b.shape:
            raise ValueError(f"{scan} {organ}: masks of shape {a.shape} and {b.shape} are not on one grid")
        rows.append({"scan": scan, "organ": organ, "dice": dice(a, b),
                     "volume_first_ml": round(float(a.sum()) * voxel_ml, 3),
                     "volume_second_ml": round(float(b.sum()) * voxel_ml, 3)})
    return rows


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summarise_interobserver(rows: Sequence[Mapping], small_ml: float = SMALL_ORGAN_ML) -> list[dict]:
    """Per organ: n scans with the organ, mean/std/min Dice, median volume; small flag.

    Scans where both masks are empty are left out; organs keep their first-seen order."""
    organs = list(dict.fromkeys(row["organ"] for row in rows))
    summary = []
    for organ in organs:
        scores = [float(r["dice"]) for r in rows if r["organ"] == organ and not math.isnan(float(r["dice"]))]
        volumes = [float(r["volume_first_ml"]) for r in rows
                   if r["organ"] == organ and float(r["volume_first_ml"]) > 0]
        median_ml = float(np.median(volumes)) if volumes else float("nan")
        summary.append({
            "organ": organ, "n": len(scores),
            "dice_mean": float(np.mean(scores)) if scores else float("nan"),
            "dice_std": float(np.std(scores)) if scores else float("nan"),
            "dice_min": float(np.min(scores)) if scores else float("nan"),
            "median_volume_ml": median_ml,
            "small": bool(volumes) and median_ml < small_ml,
        })
    return summary


def interobserver_markdown(summary: Sequence[Mapping], first: str = "oncologist",
                           second: str = "radiographer") -> str:
    lines = [f"| organ | scans | Dice {first} vs {second} (mean ± std) | min | median volume (ml) | small |",
             "|---|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['organ']} | {row['n']} | {_fmt(row['dice_mean'])} ± {_fmt(row['dice_std'])} | "
                     f"{_fmt(row['dice_min'])} | {_fmt(row['median_volume_ml'], 2)} | "
                     f"{'yes' if row['small'] else ''} |")
    large = [r["dice_mean"] for r in summary if not r["small"] and not math.isnan(r["dice_mean"])]
    small = [r["dice_mean"] for r in summary if r["small"] and not math.isnan(r["dice_mean"])]
    lines.append("")
    lines.append(f"Mean over organs of at least {SMALL_ORGAN_ML:g} ml: {_fmt(float(np.mean(large)) if large else float('nan'))}; "
                 f"over the small ones: {_fmt(float(np.mean(small)) if small else float('nan'))}.")
    return "\n".join(lines) + "\n"


def totalseg_mapping(model_labels: Mapping[int, str], totalseg_classes: Mapping[str, str]) -> dict[int, int]:
    """Model label value -> TotalSegmentator class ID, for the organs both know.

    model_labels: value -> name (abdomen names as in synthetic_ct); totalseg_classes: the
    totalsegmentator_total_classes.json mapping (ID as a string -> class name)."""
    by_name = {name: int(class_id) for class_id, name in totalseg_classes.items()}
    mapping = {}
    for value, name in model_labels.items():
        target = TOTALSEG_NAME.get(name)
        if target in by_name:
            mapping[int(value)] = by_name[target]
    return mapping


def compare_to_reference(prediction: np.ndarray, reference: np.ndarray, mapping: Mapping[int, int],
                         names: Mapping[int, str], voxel_ml: float) -> list[dict]:
    """Per mapped organ: Dice of prediction==value against reference==mapped ID (same grid), both volumes.

    An organ absent from the reference gets Dice NaN (its predicted volume shows false positives)."""
    rows = []
    for value, reference_id in mapping.items():
        predicted, truth = prediction == value, reference == reference_id
        rows.append({"organ": names[value], "reference_id": reference_id,
                     "dice": dice(predicted, truth) if truth.any() else float("nan"),
                     "predicted_ml": round(float(predicted.sum()) * voxel_ml, 2),
                     "reference_ml": round(float(truth.sum()) * voxel_ml, 2)})
    return rows


def stage_ratios(seconds: Mapping[str, float], plain_inference_s: float) -> dict[str, float]:
    """Each stage's seconds, and the total, as multiples of plain inference."""
    total = float(sum(seconds.values()))
    ratios = {stage: float(value) / plain_inference_s for stage, value in seconds.items()}
    ratios["total"] = total / plain_inference_s
    return ratios


def headneck_case_plan(train_scans: Sequence[str], test_scans: Sequence[str], scale: Scale,
                       seed: int) -> dict[str, list[dict]]:
    """Which synthetic case comes from which scan with which seed, for both splits."""
    train_scans = list(train_scans)[:scale.headneck_max_train_scans]
    test_scans = list(test_scans)[:scale.headneck_max_test_scans]
    train = [{"case_id": f"hn_train_{scan}_{k}", "source": scan, "seed": [seed, 1, i, k]}
             for i, scan in enumerate(train_scans) for k in range(scale.headneck_cases_per_train_scan)]
    test = [{"case_id": f"hn_test_{scan}", "source": scan, "seed": [seed, 2, i]}
            for i, scan in enumerate(test_scans)]
    return {"train": train, "test": test}


def abdomen_case_plan(scale: Scale, seed: int) -> dict[str, list[dict]]:
    return {"train": [{"case_id": f"abd_train_{i:03d}", "source": "icrp_am", "seed": [seed, 3, i]}
                      for i in range(scale.abdomen_train_cases)],
            "test": [{"case_id": f"abd_test_{i:03d}", "source": "icrp_am", "seed": [seed, 4, i]}
                     for i in range(scale.abdomen_test_cases)]}


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def write_csv(rows: Sequence[Mapping], path: Path) -> Path:
    """Dict rows as CSV through the engine's writer (isseg.reporting, torch-free); floats to 4 digits."""
    from isseg.reporting import write_csv as write_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    return write_rows(path, fields, [[_fmt(value, 4) if isinstance(value, float) else value
                                      for value in (row.get(field, "") for field in fields)] for row in rows])


# --------------------------------------------------------------------------
# Logging and subprocesses
# --------------------------------------------------------------------------

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", flush=True)


#: CPU threads per engine subprocess (OMP_NUM_THREADS) when chains run at once; None: torch's default.
SUBPROCESS_THREADS: int | None = None


def engine_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if SUBPROCESS_THREADS and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(SUBPROCESS_THREADS)
    return env


def run_logged(command: Sequence[str], log_path: Path, echo: Iterable[str] = ()) -> None:
    """Run a command (printed first), its stdout and stderr into log_path; lines of stdout holding any
    of the `echo` strings are printed too. Raises on a non-zero exit, with the log's tail."""
    command = [str(c) for c in command]
    say("$ " + shlex.join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo = tuple(echo)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=engine_env(), cwd=REPO_ROOT, encoding="utf-8")
        for line in process.stdout:
            log.write(line)
            if any(key in line for key in echo):
                print("    " + line.rstrip()[:300], flush=True)
        code = process.wait()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-30:]
        raise RuntimeError(f"command failed with exit code {code} (log {log_path}):\n" + "\n".join(tail))


def outside_repository_or_ignored(path: Path) -> bool:
    """True when path is outside the repository, or inside it but git-ignored (e.g. runs/: a folder
    to carry to another machine). Where git cannot tell (no git, or a copy of the tree without .git)
    the path is allowed."""
    path = Path(path).expanduser().resolve()
    if not path.is_relative_to(REPO_ROOT):
        return True
    try:
        return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT,
                              capture_output=True).returncode != 1  # 1: not ignored
    except OSError:
        return True


def python_command(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def isseg_command(*args) -> list[str]:
    return python_command("-m", "isseg.cli", *args)


class Steps:
    """Done-markers in the work folder, so that an interrupted run resumes where it stopped."""

    def __init__(self, work: Path, force: bool):
        self.dir = work / "done"
        self.force = force
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> bool:
        if not self.force and (self.dir / name).exists():
            say(f"{name}: done before, skipped (delete {self.dir / name} or use --force to redo)")
            return True
        return False

    def mark(self, name: str, seconds: float) -> None:
        (self.dir / name).write_text(f"{seconds:.1f}\n", encoding="utf-8")

    def seconds(self) -> dict[str, float]:
        """Seconds of every step done so far (also those of an earlier, interrupted run)."""
        marks = sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime)
        return {p.name: float(p.read_text(encoding="utf-8")) for p in marks if not self.force}


# --------------------------------------------------------------------------
# prepare: the bundle
# --------------------------------------------------------------------------


def _headneck_tissue_job(job: tuple[str, str, str, tuple]) -> str:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    scans_dir, scan, out_path, spacing = job
    tissues = sct.headneck_scan_tissues(Path(scans_dir) / scan, spacing)
    sitk.WriteImage(tissues, out_path, useCompression=True)
    return scan


def _interobserver_job(job: tuple[str, str, str]) -> list[dict]:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    first_dir, second_dir, scan = job
    first, second, voxel_ml = {}, {}, None
    for organ in sct.HEADNECK_ORGANS:
        a = sct._read_headneck_mask(Path(first_dir) / scan, organ)
        b = sct._read_headneck_mask(Path(second_dir) / scan, organ)
        same_grid = (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
                     and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
                     and np.allclose(a.GetDirection(), b.GetDirection()))
        if not same_grid:
            raise ValueError(f"{scan} {organ}: the two annotators' masks are not on one grid")
        first[organ] = sitk.GetArrayFromImage(a)
        second[organ] = sitk.GetArrayFromImage(b)
        voxel_ml = float(np.prod(a.GetSpacing())) / 1000.0
    return interobserver_rows(scan, first, second, voxel_ml)


def _pool(jobs: int):
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(max(1, jobs))


def prepare(args) -> Path:
    """Write the bundle: head-and-neck tissue maps and split, ICRP files, the real CT and its
    labels, and the human inter-observer table (also written to the results folder)."""
    data_dir, bundle = args.data_dir.expanduser().resolve(), args.bundle.expanduser().resolve()
    if not outside_repository_or_ignored(bundle):
        raise SystemExit(f"error: --bundle {bundle} is inside the repository and not git-ignored; "
                         "use a folder outside it, or an ignored one such as runs/")
    manifest_path = bundle / "manifest.json"
    if manifest_path.exists() and not args.force:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("seed") == args.seed:
            say(f"bundle {bundle} exists (seed {args.seed}); reusing it (--force to rebuild)")
            return bundle
    started = time.monotonic()
    bundle.mkdir(parents=True, exist_ok=True)
    say(f"prepare: data {data_dir} -> bundle {bundle}")

    scans_dir = data_dir / "headneck_contours" / "oncologist"
    second_dir = data_dir / "headneck_contours" / "radiographer"
    scans = sorted(p.name for p in scans_dir.iterdir() if p.is_dir())
    train_scans, test_scans = sct.headneck_patient_split(scans, seed=args.seed)
    say(f"head and neck: {len(scans)} scans, split by patient (seed {args.seed}): "
        f"{len(train_scans)} training scans, {len(test_scans)} test scans {test_scans}")

    tissue_dir = bundle / "headneck_tissues"
    tissue_dir.mkdir(exist_ok=True)
    jobs = [(str(scans_dir), scan, str(tissue_dir / f"{scan}.nii.gz"), BUNDLE_HEADNECK_SPACING)
            for scan in scans if args.force or not (tissue_dir / f"{scan}.nii.gz").exists()]
    interobserver_jobs = [(str(scans_dir), str(second_dir), scan) for scan in test_scans]
    with _pool(args.jobs) as pool:
        pending_rows = pool.map_async(_interobserver_job, interobserver_jobs)
        for scan in pool.imap_unordered(_headneck_tissue_job, jobs):
            say(f"  tissue map {scan}")
        rows = [row for part in pending_rows.get() for row in part]

    results = args.results.expanduser()
    write_csv(rows, bundle / "headneck_interobserver.csv")
    write_interobserver_results(rows, results, test_scans)

    shutil.copytree(data_dir / "icrp110", bundle / "icrp110", dirs_exist_ok=True)
    real = bundle / "real_ct"
    real.mkdir(exist_ok=True)
    shutil.copytree(data_dir / "real_ct" / "totalseg_dicom_abdomen" / "dicom", real / "dicom", dirs_exist_ok=True)
    shutil.copy2(data_dir / "real_ct" / "totalseg_dicom_abdomen" / "labels_totalsegmentator.nii.gz", real)
    shutil.copy2(data_dir / "real_ct" / "totalsegmentator_total_classes.json", real)

    manifest = {"seed": args.seed, "headneck_tissue_spacing": list(BUNDLE_HEADNECK_SPACING),
                "headneck_train_scans": train_scans, "headneck_test_scans": test_scans,
                "sources": {"headneck": "Nikolov et al. 2021, google-deepmind/tcia-ct-scan-dataset (CC BY 4.0)",
                            "icrp": "ICRP Publication 110 adult male phantom",
                            "real_ct": "wasserth/TotalSegmentator test files (Apache-2.0); labels are "
                                       "TotalSegmentator predictions"},
                "data_dir": str(data_dir)}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    say(f"prepare done in {time.monotonic() - started:.0f} s: bundle {bundle} ({size / 2**20:.1f} MiB)")
    return bundle


def write_interobserver_results(rows: list[dict], results: Path, test_scans: Sequence[str]) -> None:
    summary = summarise_interobserver(rows)
    write_csv(summary, results / "headneck_interobserver.csv")
    text = ("# Head and neck: human inter-observer agreement\n\n"
            f"Dice between the oncologist's and the radiographer's contours of the same scan, on the "
            f"scans' own grids (about 1 x 1 x 2.5 mm, nothing resampled), over the {len(test_scans)} test "
            f"scans ({', '.join(test_scans)}). Scans where neither drew the organ (outside the scanned "
            f"range) are left out. 'small': median oncologist volume below {SMALL_ORGAN_ML:g} ml; such "
            "organs are a few voxels at the model spacing and their Dice is noisy.\n\n"
            + interobserver_markdown(summary))
    (results / "headneck_interobserver.md").write_text(text, encoding="utf-8")
    say(f"wrote {results / 'headneck_interobserver.md'}")


# --------------------------------------------------------------------------
# run: synthesis
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
        tissue_hu, phases, target = (sct.HEADNECK_TISSUE_HU, sct.HEADNECK_ENHANCEMENT_HU,
                                     {v: v for v in sct.HEADNECK_LABEL.values()})
    else:
        tissue_hu = {int(k): v for k, v in json.loads(Path(job["tissue_hu"]).read_text(encoding="utf-8")).items()}
        phases = sct.ICRP_ENHANCEMENT_HU
        target = {i: value for value, (_, ids) in sct.ICRP_ABDOMEN_LABELS.items() for i in ids}
    image, labels = sct.make_case(tissues, tissue_hu, phases, target, settings, rng)
    entry = sct.write_msd_case(Path(job["out"]), job["case_id"], image, labels)
    return {"entry": entry, "case_id": job["case_id"],
            "synthesis": {"source": job["source"], "seed": job["seed"], **asdict(settings),
                          "size": list(image.GetSize()), "spacing": list(image.GetSpacing())}}


def synthesise(jobs: list[dict], out: Path, name: str, description: str, label_names: Mapping[int, str],
               pool) -> Path:
    if out.exists():
        shutil.rmtree(out)
    results = sorted(pool.map(_synth_job, jobs), key=lambda r: r["case_id"])
    path = sct.write_msd_dataset_json(out, name, description, label_names, [r["entry"] for r in results],
                                      synthesis={r["case_id"]: r["synthesis"] for r in results})
    sizes = [r["synthesis"]["size"] for r in results]
    say(f"  {name}: {len(results)} cases in {out} (sizes {sizes[0]} .. {sizes[-1]})")
    return path


def headneck_label_names() -> dict[int, str]:
    return {0: "background", **{value: name for name, value in sct.HEADNECK_LABEL.items()}}


def abdomen_label_names() -> dict[int, str]:
    return {0: "background", **{value: name for value, (name, _) in sct.ICRP_ABDOMEN_LABELS.items()}}


def synthesise_all(args, scale: Scale, bundle: Path, work: Path, manifest: dict, parts: set[str]) -> None:
    import SimpleITK as sitk

    jobs = {}
    if "headneck" in parts:
        plan = headneck_case_plan(manifest["headneck_train_scans"], manifest["headneck_test_scans"], scale,
                                  args.seed)
        (work / "headneck_plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
        for split, distribution in (("train", HEADNECK_TRAIN), ("test", HEADNECK_TEST)):
            jobs[("headneck", split)] = [
                {**case, "dataset": "headneck", "tissues": str(bundle / "headneck_tissues" / f"{case['source']}.nii.gz"),
                 "spacing": list(scale.headneck_synth_spacing), "distribution": asdict(distribution),
                 "out": str(work / "data" / f"headneck_{split}")} for case in plan[split]]
    if "abdomen" in parts:
        tissues_path = work / "data" / "icrp_abdomen_tissues.nii.gz"
        hu_path = work / "data" / "icrp_tissue_hu.json"
        tissues_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sct.icrp_abdomen_tissues(bundle / "icrp110", scale.abdomen_spacing), str(tissues_path),
                        useCompression=True)
        hu_path.write_text(json.dumps({str(k): v for k, v in sct.icrp_tissue_hu(bundle / "icrp110").items()}), encoding="utf-8")
        plan = abdomen_case_plan(scale, args.seed)
        (work / "abdomen_plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
        for split, distribution in (("train", ABDOMEN_TRAIN), ("test", ABDOMEN_TEST)):
            jobs[("abdomen", split)] = [
                {**case, "dataset": "abdomen", "tissues": str(tissues_path), "tissue_hu": str(hu_path),
                 "spacing": None, "distribution": asdict(distribution),
                 "out": str(work / "data" / f"abdomen_{split}")} for case in plan[split]]
    with _pool(args.jobs) as pool:
        for (dataset, split), dataset_jobs in jobs.items():
            names = headneck_label_names() if dataset == "headneck" else abdomen_label_names()
            description = (sct._HEADNECK_DESCRIPTION if dataset == "headneck" else sct._ICRP_DESCRIPTION)
            synthesise(dataset_jobs, work / "data" / f"{dataset}_{split}", f"{dataset}-{split}",
                       f"{description}; {split} distribution", names, pool)


# --------------------------------------------------------------------------
# run: train, evaluate
# --------------------------------------------------------------------------


def train(args, scale: Scale, dataset: str, work: Path, spacing) -> Path:
    package = work / "models" / dataset
    if package.exists() and not (package / "checkpoint.pt").exists():
        shutil.rmtree(package)  # a finished package from an earlier run: train afresh
    command = isseg_command(
        "train", "--dataset", work / "data" / f"{dataset}_train", "--output", package,
        "--name", f"real-anatomy {dataset} ({scale.name})",
        "--spacing", *spacing, "--patch", *(scale.headneck_patch if dataset == "headneck" else scale.abdomen_patch),
        "--channels", *scale.train_channels,
        "--steps", scale.headneck_train_steps if dataset == "headneck" else scale.abdomen_train_steps,
        "--evaluate-every", scale.evaluate_every,
        "--device", args.device, "--seed", args.seed, "--progress", "json")
    run_logged(command, work / "logs" / f"train_{dataset}.log", echo=('"validate"', '"done"', '"error"'))
    return package


class Budget:
    """A wall-clock budget counted from the start of the script; None: unlimited."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else _T0 + 60.0 * minutes

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        return self.left() - reserve_s >= estimate_s


def single_case_dataset(dataset_json: Path, case_index: int, out: Path) -> Path:
    """An MSD folder (dataset.json only, absolute paths) holding one case of another dataset."""
    dataset = json.loads(dataset_json.read_text(encoding="utf-8"))
    entry = dataset["training"][case_index]
    absolute = {key: str((dataset_json.parent / entry[key]).resolve()) for key in ("image", "label")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps({**dataset, "training": [absolute], "numTraining": 1,
                                                  "synthesis": {}}, indent=1), encoding="utf-8")
    return out


def evaluate(args, scale: Scale, dataset: str, work: Path, package: Path, steps: "Steps", budget: Budget,
             reserve_s: float) -> Path:
    """`isseg evaluate` (every method) on the test cases, one case per call so that the time budget can
    stop between cases; the per-case results are then merged into one metrics.csv, summary.md and box
    plot with the engine's own functions. Returns the merged folder."""
    test_json = work / "data" / f"{dataset}_test" / "dataset.json"
    entries = json.loads(test_json.read_text(encoding="utf-8"))["training"]
    output = work / "evaluate" / dataset
    durations, done, skipped = [], [], []
    for index, entry in enumerate(entries):
        case_id = Path(entry["image"]).name.split(".")[0]
        case_output = output / "per_case" / case_id
        marker = f"evaluate_{dataset}_{case_id}"
        if steps.done(marker) and (case_output / "metrics.csv").exists():
            done.append(case_output)
            continue
        estimate = max(durations, default=0.0)
        if done and not budget.allows(estimate, reserve_s):
            skipped.append(case_id)
            continue
        if case_output.exists():
            shutil.rmtree(case_output)
        cases = single_case_dataset(test_json, index, work / "data" / f"{dataset}_test_single" / case_id)
        command = isseg_command(
            "evaluate", "--cases", cases, "--model", package, "--output", case_output,
            "--variants", *ISL_VARIANTS, "--device", args.device, "--seed", args.seed, "--progress", "json",
            *scale.refine_options)
        started = time.monotonic()
        run_logged(command, work / "logs" / f"evaluate_{dataset}_{case_id}.log",
                   echo=('"stage": "evaluate"', '"event": "error"'))
        durations.append(time.monotonic() - started)
        steps.mark(marker, durations[-1])
        say(f"  {dataset} {case_id}: {durations[-1]:.0f} s ({len(done) + 1} of {len(entries)} test cases)")
        done.append(case_output)
    if skipped:
        say(f"  {dataset}: time budget reached, {len(skipped)} test case(s) not evaluated: {', '.join(skipped)}")
    merge_evaluations(done, output, f"Evaluation of the {dataset} model on {dataset}_test", len(entries))
    return output


def merge_evaluations(case_dirs: Sequence[Path], output: Path, title: str, planned: int) -> None:
    """One metrics.csv, summary.md (with Wilcoxon p-values) and dice_boxplot.png from per-case
    `isseg evaluate` folders, made with isseg.evaluate's own functions."""
    rows, header = [], None
    for case_dir in case_dirs:
        with open(case_dir / "metrics.csv", newline="", encoding="utf-8") as stream:
            reader = csv.reader(stream)
            header = next(reader)
            rows += list(reader)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "metrics.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    records = [dict(zip(header, row)) for row in rows]
    note = (f"\n{len(case_dirs)} of the {planned} test cases were evaluated (the others did not fit the time "
            "budget).\n" if len(case_dirs) < planned else "")
    try:
        from isseg.evaluate import CaseResult, dice_boxplot, summary_markdown

        def number(text: str) -> float:
            return float(text) if text not in ("", None) else math.nan

        results: dict[str, CaseResult] = {}
        for record in records:
            result = results.setdefault(record["case"], CaseResult(record["case"]))
            if record.get("status") == "failed":
                result.errors[record["method"]] = record.get("error", "failed")
            else:
                result.scores.setdefault(record["method"], {})[record["organ"]] = (
                    number(record["dice"]), number(record["hd95_mm"]))
        methods = list(dict.fromkeys(r["method"] for r in records))
        organs = list(dict.fromkeys(r["organ"] for r in records if r.get("organ")))
        (output / "summary.md").write_text(summary_markdown(list(results.values()), methods, organs, title) + note, encoding="utf-8")
        dice_boxplot(list(results.values()), methods, organs, output / "dice_boxplot.png")
    except Exception as error:  # the engine's report functions changed: keep metrics.csv, say so
        say(f"  could not make the evaluate summary and plot ({type(error).__name__}: {error}); "
            "metrics.csv is complete")
        (output / "summary.md").write_text(f"# {title}\n\nSummary not made: {error}\n{note}", encoding="utf-8")


# --------------------------------------------------------------------------
# run: summaries of the evaluation
# --------------------------------------------------------------------------


def _column(row: Mapping, *names: str):
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


def organ_variant_table(rows: Sequence[Mapping], metric: str = "dice") -> dict[str, dict[str, list[float]]]:
    """organ -> variant -> values of `metric` over the cases, from the rows of `isseg evaluate`'s metrics.csv.

    Accepts the long format (one row per case, organ and method, with a `method`/`variant` column)
    and the wide format (columns like `dice_<variant>` or `<variant>_dice`). Rows without an organ or
    value (failed runs) are skipped."""
    table: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        organ = _column(row, "organ", "label", "label_name", "structure")
        if organ is None:
            continue
        variant = _column(row, "variant", "method")
        if variant is not None:
            value = _column(row, metric, metric.upper(), metric.capitalize())
            pairs = [(variant, value)]
        else:
            pairs = []
            for key, value in row.items():
                for v in VARIANTS:
                    if key in (f"{metric}_{v}", f"{v}_{metric}"):
                        pairs.append((v, value))
        for variant, value in pairs:
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isnan(number):
                table.setdefault(str(organ), {}).setdefault(str(variant), []).append(number)
    return table


def variant_order(table: Mapping[str, Mapping[str, list]]) -> list[str]:
    present = list(dict.fromkeys(v for per_organ in table.values() for v in per_organ))
    return [v for v in VARIANTS if v in present] + [v for v in present if v not in VARIANTS]


def organ_table_markdown(table: Mapping[str, Mapping[str, list[float]]], organs: Sequence[str],
                         digits: int = 3) -> str:
    """Mean ± std per organ (rows) and variant (columns), plus the mean over the listed organs."""
    variants = variant_order(table)
    lines = ["| organ | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    means = {v: [] for v in variants}
    for organ in organs:
        if organ not in table:
            continue
        cells = []
        for v in variants:
            values = table[organ].get(v, [])
            if values:
                means[v].append(float(np.mean(values)))
                cells.append(f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}")
            else:
                cells.append("n/a")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    lines.append("| **mean of organs** | " + " | ".join(
        f"**{np.mean(means[v]):.{digits}f}**" if means[v] else "n/a" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def write_dataset_summary(dataset: str, evaluate_dir: Path, results: Path, scale: Scale,
                          interobserver: list[dict] | None) -> None:
    """results/<dataset>_summary.md (+ the evaluate CSVs and box plot copied to results/)."""
    case_csv = evaluate_dir / "metrics.csv"
    rows = read_csv_rows(case_csv)
    dice_table = organ_variant_table(rows, "dice")
    hd_table = organ_variant_table(rows, "hd95_mm")
    failed = sorted({(r["case"], r["method"]) for r in rows if r.get("status") == "failed"})
    organs = list(dice_table)
    if dataset == "abdomen":
        small = [o for o in organs if o in ABDOMEN_SMALL_ORGANS]
    else:
        small_by_interobserver = {r["organ"] for r in (interobserver or []) if r["small"]}
        small = [o for o in organs if o in small_by_interobserver]
    large = [o for o in organs if o not in small]
    results.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "summary.md", "dice_boxplot.png"):
        if (evaluate_dir / name).exists():
            shutil.copyfile(evaluate_dir / name, results / f"{dataset}_evaluate_{name}")
    n_cases = len({_column(r, "case", "case_id") for r in rows})
    parts = [f"# {dataset}: {scale.name} scale\n",
             f"{n_cases} test cases; per-case, per-organ results in `{dataset}_evaluate_{case_csv.name}`, "
             f"the `isseg evaluate` summary (with Wilcoxon p-values against `initial`) and box plot beside it. "
             f"With {n_cases} paired cases the smallest possible two-sided Wilcoxon signed-rank p-value is "
             f"{2 / 2 ** n_cases:.3g}, so per-organ p-values cannot fall below that however large the effect.\n",
             "## Dice, organs of usual size\n", organ_table_markdown(dice_table, large)]
    if failed:
        parts.insert(2, f"**{len(failed)} runs failed** (see the evaluate summary): "
                        + ", ".join(f"{c}/{m}" for c, m in failed) + "\n")
    if small:
        title = ("small or hard organs (gallbladder, pancreas, adrenals)" if dataset == "abdomen"
                 else f"small organs (median volume below {SMALL_ORGAN_ML:g} ml: few voxels at the model spacing)")
        parts += [f"\n## Dice, {title}\n", organ_table_markdown(dice_table, small)]
    if hd_table:
        parts += ["\n## HD95 (mm), all organs\n", organ_table_markdown(hd_table, organs, digits=1)]
    if interobserver:
        by_organ = {r["organ"]: r for r in interobserver}
        lines = ["| organ | human inter-observer Dice | initial | isl_mask |", "|---|---|---|---|"]
        for organ in organs:
            if organ in by_organ:
                cells = [_fmt(float(np.mean(dice_table[organ][v]))) if dice_table[organ].get(v) else "n/a"
                         for v in ("initial", "isl_mask")]
                lines.append(f"| {organ} | {_fmt(by_organ[organ]['dice_mean'])} | {cells[0]} | {cells[1]} |")
        parts += ["\n## Against human agreement (oncologist vs radiographer, same test patients)\n",
                  "\n".join(lines) + "\n",
                  "\nThe models are trained and scored on oncologist contours; the inter-observer Dice is "
                  "on the native ~1 x 1 x 2.5 mm grid, the models' on the synthetic test grid.\n"]
    (results / f"{dataset}_summary.md").write_text("\n".join(parts), encoding="utf-8")
    say(f"wrote {results / f'{dataset}_summary.md'}")


# --------------------------------------------------------------------------
# run: timed in-process runs (real CT, speed and memory)
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
    """One `isseg refine` run in this process (pipeline.Run) with per-stage time and peak memory, and
    plain inference (resample + sliding window, network loaded) timed alone, median of `repeats`."""
    import warnings

    import torch

    from benchmark_refine import StageMonitor
    from isseg import model_package
    from isseg.inference import predict_probabilities
    from isseg.io import read_image
    from isseg.device import resolve_device
    from isseg.pipeline import Run
    from isseg.preprocess import image_tensor, to_model_grid, zyx

    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    device = resolve_device(device_name)
    loaded = model_package.load(package)
    network = loaded.build_network().to(device)
    image = read_image(case_path)
    times = []
    for _ in range(repeats + 1):
        start = time.monotonic()
        model_image = to_model_grid(image, loaded.spacing, loaded.orientation)
        predict_probabilities(network, image_tensor(model_image, loaded.intensity_window), zyx(loaded.patch_size),
                              device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.monotonic() - start)
    inference_s = float(np.median(times[1:]))
    del network
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if output.exists():
        shutil.rmtree(output)
    monitor = StageMonitor(device)
    say(f"  timed isseg refine of {case_path.name} (pipeline.Run in this process) -> {output}")
    start = time.monotonic()
    Run(case_path, package, output, refine_settings(scale), monitor, device, seed).execute()
    total = time.monotonic() - start
    model_size = list(to_model_grid(image, loaded.spacing, loaded.orientation).GetSize())
    return {"case": case_path.name, "input_size": list(image.GetSize()), "model_grid_size": model_size,
            "atlas_cases": len(loaded.atlas_cases), "device": str(device), "plain_inference_s": inference_s,
            "total_s": total, "seconds": dict(monitor.seconds),
            "peak_rss_mib": {k: v / 2**20 for k, v in monitor.peak_rss.items()},
            "peak_gpu_mib": {k: v / 2**20 for k, v in monitor.peak_gpu.items()},
            "output": str(output)}


def real_ct_check(args, scale: Scale, bundle: Path, work: Path, results: Path) -> dict:
    """The abdomen model, initial and ISL (mask alignment, moving average), on the real CT vs TotalSegmentator."""
    import SimpleITK as sitk

    from isseg import model_package
    from isseg.io import read_image

    real = bundle / "real_ct"
    dicom = real / "dicom"
    package = work / "models" / "abdomen"
    timing = timed_run(dicom, package, work / "real_ct" / "refine", scale, args.device, args.seed,
                       scale.speed_repeats)
    image = read_image(dicom)
    reference = sitk.Resample(sitk.ReadImage(str(real / "labels_totalsegmentator.nii.gz")), image,
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    reference = sitk.GetArrayFromImage(reference)
    classes = json.loads((real / "totalsegmentator_total_classes.json").read_text(encoding="utf-8"))
    names = {label["value"]: label["name"] for label in model_package.load(package, check_atlas=False).labels}
    mapping = totalseg_mapping(names, classes)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    output = Path(timing["output"])
    rows = []
    for variant, file in (("initial", "snapshot_0000.nrrd"), ("isl_mask", "labelmap.nrrd")):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output / file)))
        for row in compare_to_reference(prediction, reference, mapping, names, voxel_ml):
            rows.append({"variant": variant, **row})
    write_csv(rows, results / "real_ct.csv")
    size = image.GetSize()
    lines = ["# Real CT check: abdomen model vs TotalSegmentator labels\n",
             f"Real upper-abdomen CT (TotalSegmentator test files), {size[0]} x {size[1]} x {size[2]} voxels of "
             f"{image.GetSpacing()[0]:.3f} x {image.GetSpacing()[1]:.3f} x {image.GetSpacing()[2]:.1f} mm: only "
             f"{size[2]} slices ({size[2] * image.GetSpacing()[2]:.0f} mm), so every organ is cut by the field of "
             f"view and the model (trained on synthetic ICRP-phantom CT at {scale.abdomen_spacing[2]:g} mm) sees "
             f"{timing['model_grid_size'][2]} slices. The reference is itself a model's prediction "
             "(TotalSegmentator), not a manual contour. Read this as a check that the pipeline runs on real DICOM "
             "and which way ISL moves, not as accuracy.\n",
             "| organ | reference volume (ml) | Dice initial | Dice ISL (mask, moving average) | "
             "predicted ml initial | predicted ml ISL |", "|---|---|---|---|---|---|"]
    by_key = {(r["variant"], r["organ"]): r for r in rows}
    for organ in [names[v] for v in mapping]:
        a, b = by_key[("initial", organ)], by_key[("isl_mask", organ)]
        lines.append(f"| {organ} | {a['reference_ml']:.1f} | {_fmt(a['dice'])} | {_fmt(b['dice'])} | "
                     f"{a['predicted_ml']:.1f} | {b['predicted_ml']:.1f} |")
    present = [names[v] for v in mapping if by_key[("initial", names[v])]["reference_ml"] > 0]
    for variant in ("initial", "isl_mask"):
        values = [by_key[(variant, o)]["dice"] for o in present]
        lines.append(f"\nMean Dice of {variant} over the {len(present)} organs in the reference: "
                     f"{_fmt(float(np.mean(values)) if values else float('nan'))}")
    absent = [names[v] for v in mapping if names[v] not in present]
    if absent:
        lines.append(f"\nNot in the reference on these slices (Dice undefined; predicted volume = false "
                     f"positives): {', '.join(absent)}.")
    (results / "real_ct.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    say(f"wrote {results / 'real_ct.md'}")
    timing["dataset"] = "real CT (abdomen model)"
    return timing


def speed_tables(timings: list[dict], evaluate_dirs: Mapping[str, Path], results: Path) -> None:
    """results/speed.md and .csv: seconds per stage and peak memory, as ratios to plain inference."""
    rows = []
    lines = ["# Speed and memory of `isseg refine`\n",
             "One timed run per data set (pipeline.Run in the benchmark's process, default refine settings of "
             "the scale), peak resident memory of the process and peak allocated GPU memory per stage; plain "
             "inference = resampling to the model grid + sliding-window prediction with the network already "
             "loaded (median of repeats). Ratios are to plain inference.\n",
             "| data set | input voxels | model grid | atlas cases | device | plain inference (s) | initial | "
             "align | refine | finalize | total (s) | total / plain | peak RSS (MiB) | peak GPU (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for timing in timings:
        seconds = timing["seconds"]
        ratios = stage_ratios(seconds, timing["plain_inference_s"])
        row = {"dataset": timing["dataset"], "case": timing["case"],
               "input_size": "x".join(map(str, timing["input_size"])),
               "model_grid_size": "x".join(map(str, timing["model_grid_size"])),
               "atlas_cases": timing["atlas_cases"], "device": timing["device"],
               "plain_inference_s": timing["plain_inference_s"], "total_s": timing["total_s"],
               **{f"{stage}_s": seconds.get(stage, 0.0) for stage in ("initial", "align", "refine", "finalize")},
               "total_over_plain": ratios["total"],
               "peak_rss_mib": max(timing["peak_rss_mib"].values(), default=float("nan")),
               "peak_gpu_mib": max(timing["peak_gpu_mib"].values(), default=float("nan"))}
        rows.append(row)

        def cell(stage):
            return f"{seconds.get(stage, 0.0):.1f} ({ratios.get(stage, 0.0):.0f}x)"

        if timing.get("concurrent"):
            row["dataset"] += " (measured while the head-and-neck evaluation ran)"
        lines.append(f"| {row['dataset']} | {row['input_size']} | {row['model_grid_size']} | {row['atlas_cases']} | "
                     f"{row['device']} | {row['plain_inference_s']:.2f} | {cell('initial')} | {cell('align')} | "
                     f"{cell('refine')} | {cell('finalize')} | {row['total_s']:.1f} | {ratios['total']:.0f}x | "
                     f"{row['peak_rss_mib']:.0f} | {_fmt(row['peak_gpu_mib'], 0)} |")
    # Seconds per stage over every run `isseg evaluate` made, where it kept report.json files.
    evaluate_lines = []
    for dataset, directory in evaluate_dirs.items():
        per_variant: dict[str, dict[str, list[float]]] = {}
        for report in directory.rglob("report.json"):
            try:
                seconds = json.loads(report.read_text(encoding="utf-8"))["seconds"]
            except (OSError, ValueError, KeyError):
                continue
            variant = report.parent.name  # cases/CASE/METHOD/report.json
            for stage, value in seconds.items():
                per_variant.setdefault(variant, {}).setdefault(stage, []).append(float(value))
        for variant, stages in sorted(per_variant.items()):
            n = max(len(v) for v in stages.values())
            total = sum(np.mean(v) for v in stages.values())
            evaluate_lines.append(f"| {dataset} | {variant} | {n} | " + ", ".join(
                f"{stage} {np.mean(v):.1f}" for stage, v in stages.items()) + f" | {total:.1f} |")
    if evaluate_lines:
        lines += ["\n## Mean seconds per stage over the `isseg evaluate` runs (report.json)\n",
                  "| data set | variant | runs | seconds per stage | total (s) |", "|---|---|---|---|---|",
                  *evaluate_lines]
    if not rows:
        lines.insert(3, "No timed runs were made (skipped for the time budget, or the models are missing).\n")
    write_csv(rows, results / "speed.csv")
    (results / "speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    say(f"wrote {results / 'speed.md'}")


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def run(args) -> int:
    scale = SCALES["quick" if args.quick else args.scale]
    scale = replace(scale, **{k: v for k, v in {
        "headneck_train_steps": args.train_steps, "abdomen_train_steps": args.train_steps,
        "time_budget_min": args.time_budget_min, "abdomen_test_cases": args.abdomen_test_cases,
        "abdomen_train_cases": args.abdomen_train_cases, "headneck_max_test_scans": args.headneck_test_scans,
        "headneck_max_train_scans": args.headneck_train_scans}.items() if v is not None})
    bundle = args.bundle.expanduser().resolve()
    work = (args.work or DEFAULT_CACHE_DIR / f"real-anatomy-{scale.name}").expanduser().resolve()
    results = args.results.expanduser().resolve()
    for path, what in ((work, "--work"), (bundle, "--bundle")):
        if not outside_repository_or_ignored(path):
            print(f"error: {what} {path} is inside the repository and not git-ignored; generated data "
                  "belongs outside it, or in an ignored folder such as runs/", file=sys.stderr)
            return 2
    if not (bundle / "manifest.json").exists():
        print(f"error: no bundle at {bundle}; run `prepare` first (it needs ../shared/data)", file=sys.stderr)
        return 2
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    parts = set(args.parts)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    steps = Steps(work, args.force)
    say(f"run: scale {scale.name}, device {args.device}, seed {args.seed}, parts {sorted(parts)}")
    say(f"bundle {bundle}; work {work}; results {results}")
    (work / "settings.json").write_text(json.dumps({"scale": asdict(scale), "args": {
        k: str(v) for k, v in vars(args).items() if k != "handler"}}, indent=1), encoding="utf-8")

    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.exists() else {}
    stage_seconds = steps.seconds()
    lock = threading.Lock()

    def step(name: str, function, *arguments):
        if steps.done(name):
            return None
        say(f"== {name}")
        started = time.monotonic()
        value = function(*arguments)
        seconds = time.monotonic() - started
        with lock:
            steps.mark(name, seconds)
            stage_seconds[name] = round(seconds, 1)
        say(f"== {name} done in {seconds:.0f} s")
        return value

    synth_parts = {p for p in ("headneck", "abdomen") if p in parts}
    if {"realct", "speed"} & parts:
        synth_parts.add("abdomen")
    if synth_parts:
        step(f"synthesise_{'_'.join(sorted(synth_parts))}", synthesise_all, args, scale, bundle, work, manifest,
             synth_parts)
    interobserver = None
    if (bundle / "headneck_interobserver.csv").exists():
        interobserver = summarise_interobserver(read_csv_rows(bundle / "headneck_interobserver.csv"))

    budget = Budget(scale.time_budget_min)
    reserve_s = FINAL_RESERVE_S if "speed" in parts and scale.time_budget_min else 0.0
    if scale.time_budget_min:
        say(f"time budget {scale.time_budget_min:g} min: test cases, the real-CT check and the timed runs that "
            f"would not fit are skipped ({reserve_s:.0f} s kept for the timed runs at the end)")
    chains = [d for d in ("headneck", "abdomen") if d in synth_parts]
    concurrent = not args.sequential and len(chains) > 1

    def save_timing(key: str, value: dict) -> None:
        with lock:
            timings[key] = value
            timings_path.write_text(json.dumps(timings, indent=1), encoding="utf-8")

    # One chain per data set: train, evaluate (and for the abdomen the real-CT check). The heavy work
    # runs in subprocesses that leave most of the GPU and CPU idle, so by default both chains run at
    # once; the timed runs for speed and memory come after, alone.
    def chain(dataset: str) -> None:
        spacing = scale.headneck_model_spacing if dataset == "headneck" else scale.abdomen_spacing
        step(f"train_{dataset}", train, args, scale, dataset, work, spacing)
        if dataset in parts:
            say(f"== evaluate_{dataset}")
            started = time.monotonic()
            evaluate(args, scale, dataset, work, work / "models" / dataset, steps, budget, reserve_s)
            with lock:
                stage_seconds[f"evaluate_{dataset} (this run)"] = round(time.monotonic() - started, 1)
            write_dataset_summary(dataset, work / "evaluate" / dataset, results, scale,
                                  interobserver if dataset == "headneck" else None)
        if dataset == "abdomen" and "realct" in parts:
            if budget.allows(REAL_CT_ESTIMATE_S, reserve_s) or steps.done("real_ct"):
                value = step("real_ct", real_ct_check, args, scale, bundle, work, results)
                if value:
                    value["concurrent"] = concurrent and "headneck" in chains
                    save_timing("real_ct", value)
            else:
                say("real_ct: skipped, it would not fit the time budget")

    global SUBPROCESS_THREADS
    if concurrent:
        SUBPROCESS_THREADS = max(1, (os.cpu_count() or 2) // len(chains))
    failures = run_chains(chains, chain, parallel=concurrent)
    SUBPROCESS_THREADS = None

    if "speed" in parts:
        for dataset in ("abdomen", "headneck"):
            if dataset in failures or not (work / "models" / dataset / "model.json").exists():
                continue
            case = sorted((work / "data" / f"{dataset}_test" / "imagesTr").glob("*.nii.gz"))[0]

            def measure(dataset=dataset, case=case):
                value = timed_run(case, work / "models" / dataset, work / "speed" / dataset, scale, args.device,
                                  args.seed, scale.speed_repeats)
                value["dataset"] = f"{dataset} (synthetic test case)"
                save_timing(dataset, value)

            if steps.done(f"speed_{dataset}") or budget.allows(FINAL_RESERVE_S / 3):
                step(f"speed_{dataset}", measure)
            else:
                say(f"speed_{dataset}: skipped, it would not fit the time budget")
        speed_tables([timings[k] for k in ("headneck", "abdomen", "real_ct") if k in timings],
                     {d: work / "evaluate" / d for d in ("headneck", "abdomen") if (work / "evaluate" / d).exists()},
                     results)
    write_index(results, scale, args, stage_seconds, manifest)
    if failures:
        say(f"FAILED: {', '.join(failures)} (logs in {work / 'logs'}); other results in {results}")
        return 1
    say(f"all done in {time.monotonic() - _T0:.0f} s; results in {results}, everything else in {work}")
    return 0


def run_chains(names: Sequence[str], function, parallel: bool) -> dict[str, str]:
    """Run function(name) for every name, in threads at once or one after the other.

    Returns name -> error message of the ones that raised (the others still run to the end)."""
    failures: dict[str, str] = {}

    def guarded(name: str) -> None:
        try:
            function(name)
        except Exception as error:  # reported at the end; the other chain goes on
            failures[name] = f"{type(error).__name__}: {error}"
            say(f"!! {name} failed: {failures[name]}")

    if not parallel:
        for name in names:
            guarded(name)
        return failures
    threads = [threading.Thread(target=guarded, args=(name,), name=name) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def write_index(results: Path, scale: Scale, args, stage_seconds: Mapping[str, float], manifest: Mapping) -> None:
    import platform

    device = args.device
    try:
        import torch

        if torch.cuda.is_available() and args.device != "cpu":
            device = f"{args.device} ({torch.cuda.get_device_name(0)})"
    except ImportError:
        pass
    lines = [f"# Real-anatomy benchmarks ({scale.name} scale)\n",
             f"Made by `{shlex.join(['python3', 'benchmarks/real_anatomy.py', *sys.argv[1:]])}` on "
             f"{platform.node() or 'unknown host'} ({os.cpu_count()} CPU cores, device {device}), seed {args.seed}.\n",
             "| step | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in stage_seconds.items()],
             "\nFiles: " + ", ".join(f"`{path.name}`" for path in sorted(results.glob("*.md")) if path.name != "README.md")
             + " (`*_summary.md`: per-organ Dice and HD95 of every variant), and the CSV/PNG beside them.\n",
             "## Data\n",
             f"- Head and neck: {len(manifest['headneck_train_scans'])} training scans / "
             f"{len(manifest['headneck_test_scans'])} test scans, split by patient "
             f"(test: {', '.join(manifest['headneck_test_scans'])}); at most "
             f"{scale.headneck_max_train_scans or 'all'} / {scale.headneck_max_test_scans or 'all'} used, "
             f"{scale.headneck_cases_per_train_scan} case(s) per training scan, synthesised at "
             f"{scale.headneck_synth_spacing} mm, model at {scale.headneck_model_spacing} mm. "
             f"Training distribution {asdict(HEADNECK_TRAIN)}; test {asdict(HEADNECK_TEST)}.",
             f"- Abdomen: ICRP 110 adult male, {scale.abdomen_train_cases} training and {scale.abdomen_test_cases} "
             f"test cases (elastic variants of one anatomy), {scale.abdomen_spacing} mm. Training distribution "
             f"{asdict(ABDOMEN_TRAIN)}; test {asdict(ABDOMEN_TEST)}.",
             f"- Training: `isseg train` {scale.headneck_train_steps} steps, patch {scale.headneck_patch} (head "
             f"and neck), {scale.abdomen_train_steps} steps, patch {scale.abdomen_patch} (abdomen), channels "
             f"{scale.train_channels}. Refinement options: `{' '.join(scale.refine_options) or 'defaults'}`.",
             ]
    (results / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=DEFAULT_CACHE_DIR / "real-anatomy-bundle",
                        help="prepared inputs (default %(default)s)")
    parser.add_argument("--results", type=Path, default=None,
                        help="small tables and figures (default benchmarks/results; with --quick WORK/results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of every case (default 0)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for tissue maps and case synthesis (default: all cores)")
    parser.add_argument("--force", action="store_true", help="redo steps that are already done")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (few cases, few steps, coarse grids) for a CPU")


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--scale", choices=("full", "cpu"), default="full",
                        help="full: sized for one GPU (default); cpu: the abdomen at 5 mm for a 2-core CPU")
    parser.add_argument("--work", type=Path, default=None,
                        help="generated data, models and runs (default ~/.cache/isseg-benchmarks/real-anatomy-<scale>)")
    parser.add_argument("--parts", nargs="+", choices=("headneck", "abdomen", "realct", "speed"),
                        default=("abdomen", "realct", "headneck", "speed"))
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="wall-clock budget of the whole run in minutes: test cases, the real-CT check and "
                             "timed runs that would not fit are skipped (default: 8.5 at full scale, 60 with --scale cpu, none with "
                             "--quick)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the head-and-neck and abdomen chains (train, evaluate) one after the other "
                             "instead of at once")
    size = parser.add_argument_group("size overrides (defaults from the scale)")
    size.add_argument("--train-steps", type=int)
    size.add_argument("--abdomen-train-cases", type=int)
    size.add_argument("--abdomen-test-cases", type=int)
    size.add_argument("--headneck-train-scans", type=int)
    size.add_argument("--headneck-test-scans", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="bundle the inputs from ../shared/data (CPU)")
    prepare_parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    _add_common(prepare_parser)
    run_parser = commands.add_parser("run", help="synthesise, train, evaluate, time (GPU)")
    _add_common(run_parser)
    _add_run(run_parser)
    all_parser = commands.add_parser("all", help="prepare, then run")
    all_parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    _add_common(all_parser)
    _add_run(all_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.results is None:  # a --quick run's numbers mean nothing: keep them out of the repository
        args.results = (DEFAULT_CACHE_DIR / "real-anatomy-quick" / "results" if args.quick
                        else DEFAULT_RESULTS_DIR)
        if args.quick and getattr(args, "work", None):
            args.results = args.work / "results"
    say("$ " + shlex.join(["python3", "benchmarks/real_anatomy.py", *(argv or sys.argv[1:])]))
    if args.command in ("prepare", "all"):
        prepare(args)
    if args.command in ("run", "all"):
        return run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
