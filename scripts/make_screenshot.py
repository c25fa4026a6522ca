"""Make the Extension Index screenshot, Resources/Screenshots/live_mask_phantom.png: real output of the project.

The demo phantom (the generated abdominal CT of `isseg phantom` and `isseg demo`) is refined by the real worker
(`isseg refine --model demo`, the process the Slicer panel starts), for a short run; the last live mask it
published (the moving average of the fine-tuned network's predictions, as the panel shows it while the run goes)
is drawn filled over the CT in an axial and a coronal slice, in the colours of the demo model's labels.

    PYTHONPATH=InferenceSpecificSeg python scripts/make_screenshot.py [--steps 40] [--output PNG]

Takes a few minutes on a CPU. The picture is generated data (no shared or patient data in it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "InferenceSpecificSeg"))

from isseg import demo, demo_model, phantom  # noqa: E402

DEFAULT_OUTPUT = ROOT / "Resources" / "Screenshots" / "live_mask_phantom.png"


def refine_phantom(folder: Path, steps: int) -> tuple[Path, Path, int]:
    """Write the demo phantom into `folder` and refine it with the demo model in a worker process;
    returns the CT path, the last snapshot's path and its fine-tuning step."""
    ct_path, _ = phantom.write_case(phantom.generate(phantom.shifted_spec(0)), folder)
    command = [sys.executable, "-m", "isseg.cli", "refine", "--input", str(ct_path), "--model", "demo",
               "--output", str(folder / "run"), "--steps", str(steps), "--update-every", str(max(1, steps // 4)),
               "--rounds", "1", "--device", "cpu", "--progress", "json"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "InferenceSpecificSeg")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    snapshots = [event for event in events if event["event"] == "snapshot"]
    if result.returncode != 0 or not snapshots:
        sys.exit(f"the refinement failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return ct_path, Path(snapshots[-1]["path"]), int(snapshots[-1]["step"])


def draw(ct_path: Path, mask_path: Path, step: int, labels: list[dict], output: Path) -> None:
    """Axial and coronal slice of the CT (soft-tissue window) with the mask's organs filled and outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image = sitk.ReadImage(str(ct_path))
    ct, mask = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
    indices, limits = demo.representative_slices(mask), demo.body_limits(ct, image)
    view_limits = {"axial": (limits["x"], limits["y"][::-1]), "coronal": (limits["x"], limits["z"])}
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.6), facecolor="black")
    for ax, view in zip(axes, demo.VIEWS):
        extent, origin = demo.view_extent(image, view), "upper" if view == "axial" else "lower"
        ax.imshow(demo.view_slice(ct, view, indices[view]), cmap="gray", vmin=demo.DISPLAY_WINDOW_HU[0],
                  vmax=demo.DISPLAY_WINDOW_HU[1], extent=extent, origin=origin, interpolation="bilinear")
        shown = demo.view_slice(mask, view, indices[view])
        overlay = np.zeros(shown.shape + (4,))
        for label in labels:
            overlay[shown == label["value"]] = (*label["color"], 0.45)
            if (shown == label["value"]).any():
                ax.contour((shown == label["value"]).astype(float), levels=[0.5], colors=[label["color"]],
                           linewidths=1.4, extent=extent, origin=origin)
        ax.imshow(overlay, extent=extent, origin=origin, interpolation="nearest")
        ax.set_xlim(*view_limits[view][0])
        ax.set_ylim(*view_limits[view][1])
        ax.set_axis_off()
        ax.set_title(f"{view} slice {indices[view]}", color="white", fontsize=11)
    figure.suptitle(f"InferenceSpecificSeg: the live moving-average mask after {step} fine-tuning steps\n"
                    "(demo model on its generated abdominal phantom)", color="white", fontsize=13)
    handles = [Patch(color=label["color"], label=label["name"].replace("_", " ")) for label in labels]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=10, labelcolor="white")
    figure.tight_layout(rect=(0, 0.06, 1, 0.93))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100, facecolor="black")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps of the run (default %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the PNG to write")
    args = parser.parse_args()
    labels = demo_model.shipped_config()["labels"]
    with tempfile.TemporaryDirectory(prefix="isseg-screenshot-") as folder:
        ct_path, mask_path, step = refine_phantom(Path(folder), args.steps)
        draw(ct_path, mask_path, step, labels, args.output)
    print(f"wrote {args.output} (live mask after {step} steps)")


if __name__ == "__main__":
    main()
