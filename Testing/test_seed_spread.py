"""Tests of benchmarks/seed_spread.py's tables, on metrics.csv files written here (no engine runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_spread  # noqa: E402


def write_metrics(folder: Path, rows: list[tuple[str, str, str, float]]) -> None:
    folder.mkdir(parents=True)
    lines = ["case,method,organ,dice,hd95_mm,status,error"]
    lines += [f"{case},{method},{organ},{dice},3.0,ok," for case, method, organ, dice in rows]
    lines.append("c1,initial,liver,0.5,3.0,ok,")  # other methods are not part of the spread
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_spread_over_seeds_per_organ_and_the_paired_test(tmp_path):
    moving = {0: (0.90, 0.80), 1: (0.91, 0.82), 2: (0.92, 0.81)}
    last = {0: (0.86, 0.70), 1: (0.92, 0.80), 2: (0.89, 0.75)}
    for seed in range(3):
        write_metrics(tmp_path / f"seed_{seed}", [
            ("c1", "isl_mask", "liver", moving[seed][0]), ("c1", "isl_mask", "spleen", moving[seed][1]),
            ("c1", "isl_mask_last_iterate", "liver", last[seed][0]),
            ("c1", "isl_mask_last_iterate", "spleen", last[seed][1])])
    table = seed_spread.dice_by_seed(tmp_path, [0, 1, 2])
    assert table[("isl_mask", "c1", "liver")] == [0.90, 0.91, 0.92]
    assert ("initial", "c1", "liver") not in table
    rows, paired = seed_spread.spread_rows(table)
    assert paired["isl_mask"] == pytest.approx([np.std([0.90, 0.91, 0.92], ddof=1), np.std([0.80, 0.82, 0.81], ddof=1)])
    assert rows[0][0] == "liver" and rows[0][1] == "0.0100" and rows[0][2] == "0.910"
    text = seed_spread.report(tmp_path, [0, 1, 2], ["python", "benchmarks/seed_spread.py"])
    assert "1 cases, seeds [0, 1, 2]" in text and "over 2 (case, organ) pairs" in text
    assert "| **all organs** | 0.0100 |" in text


def test_pairs_hold_the_sd_of_each_case_and_organ_for_pooling(tmp_path):
    for seed, (moving, last) in enumerate([(0.90, 0.86), (0.92, 0.92), (0.91, 0.89)]):
        write_metrics(tmp_path / f"seed_{seed}", [
            ("c1", "isl_mask", "liver", moving), ("c1", "isl_mask_last_iterate", "liver", last),
            ("c2", "isl_mask", "liver", moving - 0.1)])
    rows = seed_spread.pair_rows(seed_spread.dice_by_seed(tmp_path, [0, 1, 2]))
    assert [row[:2] for row in rows] == [["c1", "liver"], ["c2", "liver"]]
    assert rows[0][2:] == pytest.approx([np.std([0.90, 0.92, 0.91], ddof=1), np.std([0.86, 0.92, 0.89], ddof=1)])
    assert rows[1][2] == pytest.approx(0.01) and rows[1][3] is None  # the last iterate never scored c2
