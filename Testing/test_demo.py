"""`isseg demo` end to end as a subprocess, with fewer steps than the default so that it takes about
a minute: the shifted phantom, the refinement with the demo model and the report."""

from __future__ import annotations

import csv
import json

import SimpleITK as sitk

from engine_support import run_worker
from isseg import phantom

ORGANS = [label["name"] for label in phantom.LABELS]


def test_demo_writes_labelmaps_report_figure_and_dice_table(demo_package, tmp_path):
    output = tmp_path / "demo"
    result, events = run_worker("demo", "--output", str(output), "--steps", "10", "--update-every", "5",
                                "--rounds", "1", "--align-iterations", "10", "--seed", "5", "--progress", "json")
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert report["partial"] is False
    assert set(report["dice"]) == set(ORGANS)
    for organ in ORGANS:
        assert all(0 <= report["dice"][organ][mask] <= 1 for mask in ("initial", "refined")), organ
    assert set(report["mean_dice"]) == {"initial", "refined"}
    assert {"generate_case", "initial", "align", "refine", "finalize", "report", "total"} <= set(report["seconds"])
    assert report["case"]["spec"]["phase"] == "arterial" and report["case"]["spec"]["seed"] == 5
    assert report["settings"]["seed"] == 5 and report["settings"]["refine"]["steps"] == 10

    truth = sitk.ReadImage(str(output / "truth.nrrd"))
    for name in ("ct", "initial", "refined"):
        assert sitk.ReadImage(str(output / f"{name}.nrrd")).GetSize() == truth.GetSize(), name
    assert (output / "refine" / "snapshot_0000.nrrd").is_file()
    figure = (output / "figure.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and len(figure) > 20_000

    table = (output / "dice_table.md").read_text(encoding="utf-8")
    assert all(f"| {organ} |" in table for organ in [*ORGANS, "mean"])
    with open(output / "dice_table.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["organ"] for row in rows] == [*ORGANS, "mean"]
    assert float(rows[0]["initial Dice"]) == report["dice"][ORGANS[0]]["initial"]

    assert [event["event"] for event in events][-2:] == ["done", "report"]
    assert "Demo finished." in result.stderr and "| liver |" in result.stderr
