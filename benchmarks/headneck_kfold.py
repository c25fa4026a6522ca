"""Head and neck, k-fold by patient: every one of the 21 scans is a test case once.

The bundle of `real_anatomy.py prepare` holds a tissue map per scan (organ masks of Nikolov et al. 2021
plus generated skull, spine and body). Every scan gives one case of the training distribution and one of
the test distribution (real_anatomy_plans: native against venous phase, more noise, a softer PSF, stronger
deformation, tighter fields of view). The scans are dealt into folds by patient (both scans of 0522c0727
in one fold); per fold, `isseg train` learns a model from the training cases of the other folds, and
`isseg evaluate` runs every method on the test case of each scan of the fold. The tables then pool the
scans of all folds, so that the Wilcoxon tests are paired over every scan.

    python3 benchmarks/real_anatomy.py prepare --bundle BUNDLE     # once, where ../shared/data is
    python3 benchmarks/headneck_kfold.py --bundle BUNDLE --work WORK --device cpu --time-budget-min 100

Organs: those of at least 1 ml median volume (13 of 21). The lenses, cochleae, optic nerves and lacrimal
glands are 0.07 to 0.9 ml: 1 to 14 voxels at 4 mm, which no model at this grid finds (Dice 0 before and
after, BENCHMARKS.md section 5); they stay in the images as tissue and are left out of the labels.

The folds run at once (--jobs, one CPU thread each where there are fewer cores than folds); in each fold
the primary variants run on every scan first, then the secondary variants as far as the time budget
allows. Every step is marked done in WORK/done, so a second run resumes. Results (small tables, a box
plot) go to --results; everything else to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
ENGINE_DIR = BENCHMARKS_DIR.parent / "InferenceSpecificSeg"
for _path in (BENCHMARKS_DIR, ENGINE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import synthetic_ct as sct  # noqa: E402
from headneck_kfold_reports import write_kfold_results  # noqa: E402
from real_anatomy_jobs import (Budget, Steps, isseg_command, outside_repository_or_ignored, process_pool,  # noqa: E402
                               run_chains, run_logged, say)
from real_anatomy_plans import HEADNECK_KFOLD_ORGANS, HEADNECK_TEST, HEADNECK_TRAIN  # noqa: E402
from real_anatomy_steps import subset_dataset, synthesise  # noqa: E402

PRIMARY_VARIANTS = ("isl_mask",)
SECONDARY_VARIANTS = ("isl_mask_last_iterate", "isl_intensity", "isl_mask_region_loss")


@dataclass(frozen=True)
class KFoldPlan:
    """The folds (sorted scan names), the organs and the sizes of one run."""

    folds: list[list[str]]
    organs: tuple[str, ...]
    spacing_mm: float
    patch: tuple[int, int, int]
    channels: tuple[int, ...]
    train_steps: int
    evaluate_every: int
    seed: int

    @property
    def scans(self) -> list[str]:
        return sorted(scan for fold in self.folds for scan in fold)

    def training_scans(self, fold: int) -> list[str]:
        return sorted(scan for k, scans in enumerate(self.folds) if k != fold for scan in scans)


def case_jobs(plan: KFoldPlan, bundle: Path, work: Path) -> dict[str, list[dict]]:
    """Synthesis jobs (real_anatomy_steps._synth_job): per scan one case of each distribution, seeded by
    the scan's place in the sorted list, so that a scan's cases are the same in every fold."""
    distributions = {"train": (HEADNECK_TRAIN, 1), "test": (HEADNECK_TEST, 2)}
    return {split: [{"case_id": f"hn_{split}_{scan}", "source": scan, "seed": [plan.seed, stream, index],
                     "dataset": "headneck", "tissues": str(bundle / "headneck_tissues" / f"{scan}.nii.gz"),
                     "spacing": [plan.spacing_mm] * 3, "distribution": asdict(distribution),
                     "organs": list(plan.organs), "out": str(work / "data" / f"headneck_{split}")}
                    for index, scan in enumerate(plan.scans)]
            for split, (distribution, stream) in distributions.items()}


@dataclass
class KFoldRun:
    """What the steps of one run share."""

    plan: KFoldPlan
    work: Path
    device: str
    steps: Steps
    budget: Budget
    threads: int | None
    refine_options: tuple[str, ...]
    secondary: tuple[str, ...]


def train_fold(run: KFoldRun, fold: int) -> Path:
    """`isseg train` on the training cases of the other folds' scans into WORK/models/fold_<k>."""
    plan, package = run.plan, run.work / "models" / f"fold_{fold}"
    cases = subset_dataset(run.work / "data" / "headneck_train" / "dataset.json",
                           [f"hn_train_{scan}" for scan in plan.training_scans(fold)],
                           run.work / "data" / f"fold_{fold}_train")
    command = isseg_command(
        "train", "--dataset", cases, "--output", package, "--name", f"head and neck, fold {fold} of {len(plan.folds)}",
        "--spacing", *[plan.spacing_mm] * 3, "--patch", *plan.patch, "--channels", *plan.channels,
        "--steps", plan.train_steps, "--evaluate-every", plan.evaluate_every, "--device", run.device,
        "--seed", plan.seed, "--progress", "json")
    run_logged(command, run.work / "logs" / f"train_fold_{fold}.log", echo=('"validate"', '"error"'),
               threads=run.threads)
    return package


def evaluate_scan(run: KFoldRun, fold: int, scan: str, group: str, variants: Sequence[str]) -> float:
    """`isseg evaluate` of the scan's test case with the fold's model into WORK/evaluate/<group>/<scan>."""
    cases = subset_dataset(run.work / "data" / "headneck_test" / "dataset.json", [f"hn_test_{scan}"],
                           run.work / "data" / f"test_{scan}")
    command = isseg_command(
        "evaluate", "--cases", cases, "--model", run.work / "models" / f"fold_{fold}",
        "--output", run.work / "evaluate" / group / scan, "--resume", "--variants", *variants,
        "--device", run.device, "--seed", run.plan.seed, "--progress", "json", *run.refine_options)
    return run_logged(command, run.work / "logs" / f"evaluate_{group}_{scan}.log", echo=('"event": "error"',),
                      threads=run.threads)


def fold_chain(run: KFoldRun, fold: int) -> int:
    """Train the fold's model, then evaluate its scans: the primary variants on every scan, then the
    secondary ones while the time budget allows (no new evaluation starts when the longest one so far
    would not fit). Returns the evaluations made or found done."""
    run.steps.run(f"train_fold_{fold}", train_fold, run, fold)
    groups = [("primary", PRIMARY_VARIANTS)] + ([("secondary", run.secondary)] if run.secondary else [])
    done, longest = 0, {}
    for group, variants in groups:
        for scan in run.plan.folds[fold]:
            marker = f"evaluate_{group}_{scan}"
            if not run.steps.marked(marker):
                if not run.budget.allows(longest.get(group, 0.0)):
                    say(f"fold {fold}: time budget reached before {group} {scan}")
                    return done
                seconds = evaluate_scan(run, fold, scan, group, variants)
                run.steps.mark(marker, seconds)
                longest[group] = max(longest.get(group, 0.0), seconds)
                say(f"fold {fold}: {group} {scan} in {seconds:.0f} s")
            done += 1
    return done


def interobserver_all_scans(data_dir: Path, scans: Sequence[str], jobs: int) -> list[dict]:
    """Inter-observer rows (oncologist against radiographer) of every scan, on the scans' own grids."""
    from real_anatomy_prepare import _interobserver_job

    contours = data_dir / "headneck_contours"
    with process_pool(jobs) as pool:
        parts = pool.map(_interobserver_job, [(str(contours / "oncologist"), str(contours / "radiographer"), scan)
                                              for scan in scans])
    return [row for part in parts for row in part]


def make_plan(args, manifest: dict) -> KFoldPlan:
    scans = sorted(manifest["headneck_train_scans"] + manifest["headneck_test_scans"])
    return KFoldPlan(folds=sct.headneck_patient_folds(scans, args.folds, args.seed), organs=HEADNECK_KFOLD_ORGANS,
                     spacing_mm=args.spacing, patch=tuple(args.patch), channels=tuple(args.channels),
                     train_steps=args.train_steps, evaluate_every=args.evaluate_every, seed=args.seed)


def prepare_run(args) -> KFoldRun:
    """The plan and the run's folders; exits with code 2 on a missing bundle or a --work inside the repository."""
    bundle, work = args.bundle.expanduser().resolve(), args.work.expanduser().resolve()
    if not (bundle / "manifest.json").exists():
        raise SystemExit(f"error: no bundle at {bundle}; run `python3 benchmarks/real_anatomy.py prepare` first")
    if not outside_repository_or_ignored(work):
        raise SystemExit(f"error: --work {work} is inside the repository and not git-ignored")
    plan = make_plan(args, json.loads((bundle / "manifest.json").read_text(encoding="utf-8")))
    work.mkdir(parents=True, exist_ok=True)
    recorded = work / "plan.json"
    if recorded.exists() and json.loads(recorded.read_text(encoding="utf-8")) != json.loads(json.dumps(asdict(plan))):
        raise SystemExit(f"error: {work} holds a run with another plan ({recorded}); use another --work")
    recorded.write_text(json.dumps(asdict(plan), indent=1), encoding="utf-8")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    return KFoldRun(plan=plan, work=work, device=args.device, steps=Steps(work, force=False),
                    budget=Budget(args.time_budget_min), threads=threads,
                    refine_options=tuple(shlex.split(args.refine_options)), secondary=tuple(args.secondary_variants))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = ["python3", "benchmarks/headneck_kfold.py", *(argv if argv is not None else sys.argv[1:])]
    say("$ " + shlex.join(command))
    run = prepare_run(args)
    say(f"{len(run.plan.folds)} folds: " + "; ".join(", ".join(fold) for fold in run.plan.folds))
    jobs = case_jobs(run.plan, args.bundle.expanduser().resolve(), run.work)
    with process_pool(args.jobs) as pool:
        for split, split_jobs in jobs.items():
            if not run.steps.marked(f"synthesise_{split}"):
                started = time.monotonic()
                synthesise(split_jobs, run.work / "data" / f"headneck_{split}", "headneck", split, pool)
                run.steps.mark(f"synthesise_{split}", time.monotonic() - started)
    _, failures = run_chains([str(k) for k in range(len(run.plan.folds))],
                             lambda fold: fold_chain(run, int(fold)), parallel=args.jobs > 1)
    interobserver = (interobserver_all_scans(args.data_dir, run.plan.scans, args.jobs)
                     if (args.data_dir / "headneck_contours").exists() else None)
    write_kfold_results(run.work, args.results.expanduser().resolve(), run.plan, interobserver,
                        command=command, step_seconds=run.steps.seconds())
    if failures:
        say(f"FAILED folds: {failures} (logs in {run.work / 'logs'})")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=sct.DEFAULT_CACHE_DIR / "real-anatomy-bundle")
    parser.add_argument("--data-dir", type=Path, default=sct.DEFAULT_DATA_DIR,
                        help="for the inter-observer table of every scan (default %(default)s; skipped if absent)")
    parser.add_argument("--work", type=Path, default=sct.DEFAULT_CACHE_DIR / "headneck-kfold")
    parser.add_argument("--results", type=Path, default=BENCHMARKS_DIR / "results" / "headneck_kfold")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=4.0, help="isotropic grid of cases and models, mm")
    parser.add_argument("--patch", type=int, nargs=3, default=(48, 48, 48))
    parser.add_argument("--channels", type=int, nargs="+", default=(16, 32, 64, 128))
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--evaluate-every", type=int, default=250)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--jobs", type=int, default=3, help="folds run at once (default %(default)s)")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="no evaluation starts that would not end within this many minutes of the start")
    parser.add_argument("--secondary-variants", nargs="*", default=SECONDARY_VARIANTS,
                        help="variants run after the primary ones, while the budget allows")
    parser.add_argument("--refine-options", default="",
                        help="more `isseg evaluate` options, one string (e.g. '--steps 4 --rounds 1' for a smoke run)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
