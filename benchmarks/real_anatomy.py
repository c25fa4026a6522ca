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
end-to-end smoke run for a CPU. `--abdomen-anatomy varied` makes the abdomen test cases differ from the
training body in anatomy too (organ sizes and positions, benchmarks/anatomy_variation.py), not only in
acquisition and elastic deformation. Everything generated goes to --work (default
~/.cache/isseg-benchmarks/real-anatomy-<scale>, outside the repository); only small tables and
figures go to --results (default benchmarks/results/; with --quick, WORK/results outside the repository).
Every random choice is seeded (--seed); every command run is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
ENGINE_DIR = BENCHMARKS_DIR.parent / "InferenceSpecificSeg"
for _path in (BENCHMARKS_DIR, ENGINE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import synthetic_ct as sct  # noqa: E402  (SimpleITK, numpy, scipy only: no torch)
from real_anatomy_jobs import (STARTED, Budget, Steps, outside_repository_or_ignored, run_chains,  # noqa: E402
                               say)
from real_anatomy_plans import FINAL_RESERVE_S, REAL_CT_ESTIMATE_S, sized_scale  # noqa: E402
from real_anatomy_prepare import prepare  # noqa: E402
from real_anatomy_reports import speed_tables, write_dataset_summary, write_index  # noqa: E402
from real_anatomy_steps import (DATASETS, RunContext, evaluate, read_interobserver, real_ct_check,  # noqa: E402
                                speed_run, stage_timings, subprocess_threads, synthesise_all, train)

DEFAULT_DATA_DIR = sct.DEFAULT_DATA_DIR
DEFAULT_CACHE_DIR = sct.DEFAULT_CACHE_DIR
DEFAULT_RESULTS_DIR = BENCHMARKS_DIR / "results"


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_context(args) -> RunContext:
    """The RunContext the command line asks for; exits with code 2 where --work or --bundle is inside
    the repository (and not git-ignored) or the bundle is missing."""
    scale = sized_scale("quick" if args.quick else args.scale, headneck_train_steps=args.train_steps,
                        abdomen_train_steps=args.train_steps, time_budget_min=args.time_budget_min,
                        abdomen_test_cases=args.abdomen_test_cases, abdomen_train_cases=args.abdomen_train_cases,
                        headneck_max_test_scans=args.headneck_test_scans,
                        headneck_max_train_scans=args.headneck_train_scans)
    bundle = args.bundle.expanduser().resolve()
    work = (args.work or DEFAULT_CACHE_DIR / f"real-anatomy-{scale.name}").expanduser().resolve()
    for path, what in ((work, "--work"), (bundle, "--bundle")):
        if not outside_repository_or_ignored(path):
            usage_error(f"{what} {path} is inside the repository and not git-ignored; generated data belongs "
                        "outside it, or in an ignored folder such as runs/")
    if not (bundle / "manifest.json").exists():
        usage_error(f"no bundle at {bundle}; run `prepare` first (it needs ../shared/data)")
    parts = set(args.parts)
    datasets = chain_datasets(parts)
    work.mkdir(parents=True, exist_ok=True)
    return RunContext(args=args, scale=scale, bundle=bundle, work=work, results=args.results.expanduser().resolve(),
                      manifest=json.loads((bundle / "manifest.json").read_text(encoding="utf-8")), parts=parts,
                      steps=Steps(work, args.force), budget=Budget(scale.time_budget_min),
                      reserve_s=FINAL_RESERVE_S if "speed" in parts and scale.time_budget_min else 0.0,
                      threads=subprocess_threads(len(datasets)) if not args.sequential else None)


def chain_datasets(parts: set[str]) -> list[str]:
    """The data sets to synthesise and train: those asked for, and the abdomen for the real CT and speed."""
    return [d for d in DATASETS if d in parts or (d == "abdomen" and {"realct", "speed"} & parts)]


def chain(ctx: RunContext, interobserver: list[dict] | None, dataset: str) -> dict[str, float]:
    """One data set: train, evaluate and summarise (when asked for), and for the abdomen the real-CT
    check. The heavy work runs in subprocesses that leave most of the GPU and CPU idle, so by default
    the chains of both data sets run at once. Returns the seconds of this run's evaluation."""
    ctx.steps.run(f"train_{dataset}", train, ctx, dataset)
    seconds = {}
    if dataset in ctx.parts:
        started = time.monotonic()
        evaluated, planned = evaluate(ctx, dataset)
        seconds[f"evaluate_{dataset} (this run)"] = round(time.monotonic() - started, 1)
        write_dataset_summary(dataset, ctx.work / "evaluate" / dataset, ctx.results, ctx.scale,
                              interobserver if dataset == "headneck" else None, planned)
    if dataset == "abdomen" and "realct" in ctx.parts:
        if ctx.steps.marked("real_ct") or not ctx.budget.allows(REAL_CT_ESTIMATE_S, ctx.reserve_s):
            say("real_ct: done before or would not fit the time budget; skipped")
        else:
            timing = ctx.steps.run("real_ct", real_ct_check, ctx)
            ctx.save_timing("real_ct", {**timing, "concurrent": ctx.threads is not None})
    return seconds


def measure_speed(ctx: RunContext, failed: Sequence[str]) -> None:
    """The timed runs of each trained data set (within the budget), then results/speed.md."""
    for dataset in ("abdomen", "headneck"):
        if dataset in failed or not (ctx.work / "models" / dataset / "model.json").exists():
            continue
        if ctx.steps.marked(f"speed_{dataset}") or not ctx.budget.allows(FINAL_RESERVE_S / 3):
            say(f"speed_{dataset}: done before or would not fit the time budget; skipped")
            continue
        ctx.save_timing(dataset, ctx.steps.run(f"speed_{dataset}", speed_run, ctx, dataset))
    speed_tables(list(stage_timings(ctx).values()),
                 {d: ctx.work / "evaluate" / d for d in DATASETS if (ctx.work / "evaluate" / d).exists()}, ctx.results)


def run(args) -> int:
    ctx = run_context(args)
    ctx.results.mkdir(parents=True, exist_ok=True)
    datasets = chain_datasets(ctx.parts)
    say(f"run: scale {ctx.scale.name}, device {args.device}, seed {args.seed}, parts {sorted(ctx.parts)}")
    say(f"bundle {ctx.bundle}; work {ctx.work}; results {ctx.results}")
    (ctx.work / "settings.json").write_text(json.dumps({"scale": asdict(ctx.scale), "args": {
        k: str(v) for k, v in vars(args).items() if k != "handler"}}, indent=1), encoding="utf-8")
    if datasets:
        ctx.steps.run(f"synthesise_{'_'.join(sorted(datasets))}", synthesise_all, ctx, datasets)
    if ctx.scale.time_budget_min:
        say(f"time budget {ctx.scale.time_budget_min:g} min: test cases, the real-CT check and the timed runs that "
            f"would not fit are skipped ({ctx.reserve_s:.0f} s kept for the timed runs at the end)")
    seconds, failures = run_chains(datasets, partial(chain, ctx, read_interobserver(ctx.bundle)),
                                   parallel=ctx.threads is not None)
    if "speed" in ctx.parts:
        measure_speed(ctx, list(failures))
    write_index(ctx.results, ctx.scale, args, {**ctx.steps.seconds(), **{k: v for s in seconds.values()
                                                                          for k, v in s.items()}}, ctx.manifest)
    if failures:
        say(f"FAILED: {', '.join(failures)} (logs in {ctx.work / 'logs'}); other results in {ctx.results}")
        return 1
    say(f"all done in {time.monotonic() - STARTED:.0f} s; results in {ctx.results}, everything else in {ctx.work}")
    return 0


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
    parser.add_argument("--abdomen-anatomy", choices=("elastic", "varied"), default="elastic",
                        help="abdomen test cases: elastic variants of the training anatomy (default), or with "
                             "organ sizes and positions varied as between patients (benchmarks/anatomy_variation.py)")
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
