"""Spread of the result over seeds: ISL with and without the moving average, several seeds per case.

    python benchmarks/seed_spread.py --cases MSD_FOLDER --model MODEL --work WORK [--first 5] [--seeds 0 1 2 3 4]
        [--device cpu] [--options "--steps 80"]

Runs `isseg evaluate --variants isl_mask isl_mask_last_iterate --seed S` on the first cases of the folder
once per seed (WORK/seed_<S>/, resumable), then reports per organ the standard deviation over seeds of
each case's Dice (sample SD), its mean over the cases, for the moving average (isl_mask) and the last
iterate (isl_mask_last_iterate), with the Wilcoxon test paired over (case, organ) of the two SDs; and the
mean Dice of each. The seed changes the patch sampling, the augmentation and the order of the atlas
cases, not the case or the model. Writes WORK/seed_spread.md (printed) and WORK/seed_spread_pairs.csv
(the SD of every (case, organ) pair, both methods), so that runs on other cases can be pooled.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS_DIR))

from real_anatomy_jobs import isseg_command, run_logged, say  # noqa: E402
from real_anatomy_reports import cell_number, read_csv_rows  # noqa: E402
from real_anatomy_steps import first_cases_dataset  # noqa: E402

METHODS = {"isl_mask": "moving average", "isl_mask_last_iterate": "last iterate"}


def dice_by_seed(work: Path, seeds: list[int]) -> dict[tuple[str, str, str], list[float]]:
    """(method, case, organ) -> Dice per seed, from each seed's metrics.csv (NaN where not scored)."""
    table: dict[tuple[str, str, str], list[float]] = {}
    for index, seed in enumerate(seeds):
        for row in read_csv_rows(work / f"seed_{seed}" / "metrics.csv"):
            if row["method"] in METHODS and row["organ"]:
                values = table.setdefault((row["method"], row["case"], row["organ"]), [np.nan] * len(seeds))
                values[index] = cell_number(row["dice"])
    return table


def seed_sd(values: np.ndarray) -> float | None:
    """Sample SD over the seeds that scored (None with fewer than two)."""
    scored = values[~np.isnan(values)]
    return float(np.std(scored, ddof=1)) if scored.size >= 2 else None


def spread_rows(table: dict[tuple[str, str, str], list[float]]) -> tuple[list[list], dict]:
    """Per organ: mean over cases of the SD over seeds and the mean Dice, per method; and the paired
    (case, organ) SDs of both methods for the test."""
    from isseg.reporting import format_number

    organs = list(dict.fromkeys(organ for _, _, organ in table))
    cases = sorted({case for _, case, _ in table})
    paired = {method: [] for method in METHODS}
    rows = []
    for organ in organs:
        cells = []
        for method in METHODS:
            per_case = [np.asarray(table[(method, case, organ)]) for case in cases if (method, case, organ) in table]
            sds = [sd for sd in map(seed_sd, per_case) if sd is not None]
            paired[method] += sds
            cells += [format_number(np.mean(sds) if sds else None, 4),
                      format_number(np.nanmean(np.concatenate(per_case)) if per_case else None)]
        rows.append([organ, *cells])
    return rows, paired


def pair_rows(table: dict[tuple[str, str, str], list[float]]) -> list[list]:
    """[case, organ, SD with the moving average, SD with the last iterate] per (case, organ): the values
    the test pairs, written out so that a later run on other cases can be pooled with this one."""
    keys = sorted({(case, organ) for _, case, organ in table})
    return [[case, organ, *(seed_sd(np.asarray(table.get((method, case, organ), [np.nan]))) for method in METHODS)]
            for case, organ in keys]


def report(work: Path, seeds: list[int], command: list[str]) -> str:
    from isseg.evaluate import paired_wilcoxon
    from isseg.reporting import format_number, markdown_table

    table = dice_by_seed(work, seeds)
    rows, paired = spread_rows(table)
    moving, last = (np.array(paired[m]) for m in METHODS)
    header = ["organ", *(f"{label}: {what}" for label in METHODS.values() for what in ("SD over seeds", "mean Dice"))]
    rows.append(["**all organs**", format_number(moving.mean(), 4), "", format_number(last.mean(), 4), ""])
    cases = sorted({case for _, case, _ in table})
    return (f"# Spread over seeds\n\nMade by `{shlex.join(command)}`: {len(cases)} cases, seeds {seeds}. "
            "SD over seeds (sample SD) of each case's Dice, mean over the cases.\n\n" + markdown_table(header, rows)
            + f"\nMoving average against last iterate: mean SD {format_number(moving.mean(), 4)} against "
            f"{format_number(last.mean(), 4)} (ratio {format_number(moving.mean() / last.mean(), 2)}); Wilcoxon "
            f"paired over {len(moving)} (case, organ) pairs p = {format_number(paired_wilcoxon(moving, last), 4)}.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, required=True, help="MSD folder (dataset.json)")
    parser.add_argument("--model", required=True, help="model package folder, or 'demo'")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--first", type=int, default=5, help="cases used: the first N of dataset.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="", help="more `isseg evaluate` options, one string")
    args = parser.parse_args(argv)
    command = ["python", "benchmarks/seed_spread.py", *(argv if argv is not None else sys.argv[1:])]
    cases = first_cases_dataset(args.cases / "dataset.json", args.first, args.work / "cases")
    for seed in args.seeds:
        run_logged(isseg_command("evaluate", "--cases", cases, "--model", args.model, "--output",
                                 args.work / f"seed_{seed}", "--resume", "--variants", *METHODS, "--seed", seed,
                                 "--device", args.device, "--progress", "json", *shlex.split(args.options)),
                   args.work / "logs" / f"seed_{seed}.log", echo=('"event": "case"', '"event": "error"'))
    from isseg.reporting import write_csv

    text = report(args.work, args.seeds, command)
    (args.work / "seed_spread.md").write_text(text, encoding="utf-8")
    write_csv(args.work / "seed_spread_pairs.csv", ["case", "organ", *(f"sd_{m}" for m in METHODS)],
              pair_rows(dice_by_seed(args.work, args.seeds)))
    say(f"wrote {args.work / 'seed_spread.md'} and seed_spread_pairs.csv")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
