"""Time and peak memory of each refinement stage as the case, the atlas and the label count grow.

    python benchmarks/benchmark_scaling.py [--device cpu|cuda] [--grid cpu|full] [--output DIR]
    python benchmarks/benchmark_scaling.py --only 192x256x256,16,20 --align-iterations 2 --steps 2
    python benchmarks/benchmark_scaling.py --whole 192x256x256,16,20 --align-iterations 2 --steps 4

Stages, each on generated data (no external data is read): `align` (one first alignment round of
`--align-iterations` per pyramid level, the engine's align_atlas), `fine-tune` (the patch sampler with
its class indices and `--steps` steps of the demo model's UNet with one output per label) and
`predict` (one sliding-window re-prediction inside the body box and one moving-average update).
The grid varies one factor at a time around a base point: case size (voxels z x y x x), atlas cases,
labels. Each point runs in its own process, so a stage's peak resident memory (sampled every 20 ms;
on CUDA also the peak of allocated GPU memory) is not hidden by an earlier point. Prints the table and,
per factor, the fitted growth exponent k of time ~ factor^k and memory increase ~ factor^k (log-log
least squares over that factor's points); writes scaling.csv and scaling.png into --output.

`--whole` instead runs one complete `isseg refine` (the real worker, in its own process) on such a
generated case with a package of that many labels (the demo UNet, untrained, at the case's spacing,
so the model grid is the case grid) and that many atlas cases, and prints the worker's peak resident
memory (the kernel's maximum RSS of the child) and its stage seconds from report.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_timing import resident_bytes  # noqa: E402

STAGES = ("align", "fine-tune", "predict")
BASE = ((96, 96, 96), 8, 6)
GRIDS = {
    # one factor at a time around BASE; "cpu" is what a shared 2-core CPU finishes in about 20 minutes
    "cpu": {"size": [(64, 64, 64), (96, 96, 96), (96, 128, 128), (144, 192, 192)], "atlas": [4, 8, 16],
            "labels": [6, 20, 50]},
    "full": {"size": [(64, 64, 64), (96, 96, 96), (96, 128, 128), (144, 192, 192), (192, 256, 256)],
             "atlas": [4, 8, 16, 32], "labels": [6, 20, 50, 100]},
}


def synthetic_labels(shape, labels: int, rng: np.random.Generator) -> np.ndarray:
    """(z, y, x) uint8: an ellipsoidal body split into `labels` organs (nearest of random seed points,
    computed at 1/4 resolution), background around it."""
    from scipy.spatial import cKDTree

    coarse = [max(1, s // 4) for s in shape]
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, c) for c in coarse], indexing="ij"), axis=-1)
    radius = np.sqrt((grid ** 2).sum(-1))
    seeds = rng.uniform(-0.6, 0.6, size=(labels, 3))
    nearest = cKDTree(seeds).query(grid.reshape(-1, 3))[1].reshape(coarse)
    result = np.where(radius < 0.75 + rng.uniform(-0.05, 0.05), nearest + 1, 0).astype(np.uint8)
    for axis, size in enumerate(shape):
        result = np.repeat(result, -(-size // coarse[axis]), axis=axis).take(range(size), axis=axis)
    return result


def synthetic_image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Normalized intensities: 0 in the air, a random value per organ plus noise inside the body."""
    values = np.concatenate([[0.0], rng.uniform(0.3, 0.8, int(labels.max()))]).astype(np.float32)
    image = values[labels] + (labels > 0) * rng.normal(0, 0.02, labels.shape).astype(np.float32)
    return image.astype(np.float32)


class PeakSampler:
    """Peak resident memory per stage, sampled every 20 ms in a thread; GPU peaks read per stage."""

    def __init__(self, device):
        self.device, self.stage, self.peaks, self.gpu = device, "setup", {}, {}
        self.baseline = resident_bytes()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), resident_bytes())
            time.sleep(0.02)

    def enter(self, stage: str) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gpu[self.stage] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), resident_bytes())
        self.stage = stage


def run_point(shape, atlas: int, labels: int, args, warm_up: bool = True) -> dict:
    """One point, in this process: the seconds and peak memory of each stage. `warm_up` first runs
    every stage once on a tiny case, so that one-off costs (lazy imports, kernel set-up) are not timed."""
    import torch

    if warm_up:
        tiny = argparse.Namespace(device=args.device, align_iterations=1, steps=1)
        run_point((16, 16, 16), 1, 2, tiny, warm_up=False)

    from isseg.alignment import AlignmentSettings, align_atlas
    from isseg.body import body_box, predict_in_box
    from isseg.inference import predict_probabilities
    from isseg.networks.monai_net import build_monai_network
    from isseg.optimisation import PatchSampler, PatchSettings, train_step
    from isseg.losses import segmentation_loss
    from isseg.refinement import MovingAverage

    device = torch.device(args.device)
    torch.manual_seed(0)
    monitor = PeakSampler(device)
    rng = np.random.default_rng(0)
    target_labels = synthetic_labels(shape, labels, rng)
    target = torch.as_tensor(synthetic_image(target_labels, rng))[None, None]
    probabilities = torch.nn.functional.one_hot(torch.as_tensor(target_labels).long(), labels + 1).movedim(-1, 0)[None].float()
    atlas_labels = [synthetic_labels(shape, labels, np.random.default_rng([0, case])) for case in range(atlas)]
    atlas_images = [synthetic_image(label, rng) for label in atlas_labels]
    network = build_monai_network({"name": "UNet", "args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": labels + 1, "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2], "num_res_units": 1, "norm": "INSTANCE"}}).to(device)
    patch = (48, 64, 64)
    seconds = {}
    started = time.monotonic()
    monitor.enter("align")
    aligned = align_atlas(atlas_images, atlas_labels, target, probabilities,
                          AlignmentSettings(iterations=args.align_iterations), device)
    del atlas_images, atlas_labels
    monitor.enter("fine-tune")
    seconds["align"] = time.monotonic() - started
    started = time.monotonic()
    sampler = PatchSampler(aligned.images, aligned.labels, patch, PatchSettings(), rng, device)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
    loss_function = segmentation_loss("dicece")
    for _ in range(args.steps):
        train_step(network, optimizer, loss_function, sampler, device)
    del sampler, aligned
    monitor.enter("predict")
    seconds["fine-tune"] = time.monotonic() - started
    started = time.monotonic()
    average = MovingAverage(probabilities, 0.8)
    box = body_box(target, patch)
    average.update(predict_in_box(lambda crop: predict_probabilities(network, crop, patch, device), target, box))
    monitor.enter("done")
    seconds["predict"] = time.monotonic() - started
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "atlas": atlas, "labels": labels,
            "seconds": seconds, "peak_rss": {s: monitor.peaks[s] for s in STAGES}, "baseline_rss": monitor.baseline,
            "peak_gpu": {s: monitor.gpu.get(s) for s in STAGES}}


def grid_points(grid: dict) -> list[tuple]:
    """The points of `grid`: every value of one factor with the other two at BASE, without repeats."""
    shape, atlas, labels = BASE
    points = [(s, atlas, labels) for s in grid["size"]] + [(shape, a, labels) for a in grid["atlas"]]
    points += [(shape, atlas, n) for n in grid["labels"]]
    return list(dict.fromkeys(points))


def parse_point(text: str) -> tuple:
    size, atlas, labels = text.split(",")
    return tuple(int(v) for v in size.split("x")), int(atlas), int(labels)


def measure(point: tuple, args) -> dict | None:
    """Run one point in a child process; None (and a note) when it failed or ran out of time."""
    shape, atlas, labels = point
    command = [sys.executable, __file__, "--child", f"{'x'.join(map(str, shape))},{atlas},{labels}",
               "--device", args.device, "--align-iterations", str(args.align_iterations), "--steps", str(args.steps)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=args.point_timeout)
    except subprocess.TimeoutExpired:
        print(f"skipped {point}: over {args.point_timeout} s", flush=True)
        return None
    if child.returncode != 0:
        print(f"failed {point}: {child.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(child.stdout.strip().splitlines()[-1])


def exponents(rows: list[dict], factor: str, key: str) -> dict:
    """Per stage, the slope of log(value) against log(factor) over the rows where only `factor` varies."""
    fitted = {}
    for stage in STAGES:
        x = [row[factor] for row in rows]
        y = [row["seconds"][stage] if key == "seconds" else row["peak_rss"][stage] - row["baseline_rss"] for row in rows]
        usable = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
        if len(set(a for a, _ in usable)) >= 2:
            fitted[stage] = float(np.polyfit(np.log([a for a, _ in usable]), np.log([b for _, b in usable]), 1)[0])
    return fitted


def series(rows: list[dict]) -> dict[str, list[dict]]:
    shape, atlas, labels = BASE
    return {"voxels": [r for r in rows if r["atlas"] == atlas and r["labels"] == labels],
            "atlas": [r for r in rows if tuple(r["shape"]) == shape and r["labels"] == labels],
            "labels": [r for r in rows if tuple(r["shape"]) == shape and r["atlas"] == atlas]}


def report(rows: list[dict], output: Path) -> None:
    """Print the table and the fitted exponents; write scaling.csv and scaling.png."""
    header = ["shape", "atlas", "labels"] + [f"{s} s" for s in STAGES] + [f"{s} MiB" for s in STAGES]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    table = []
    for row in rows:
        values = ["x".join(map(str, row["shape"])), row["atlas"], row["labels"]]
        values += [f"{row['seconds'][s]:.1f}" for s in STAGES] + [f"{row['peak_rss'][s] / 2**20:.0f}" for s in STAGES]
        table.append(values)
        print("| " + " | ".join(map(str, values)) + " |")
    for factor, part in series(rows).items():
        for key in ("seconds", "memory"):
            fitted = exponents(part, factor, key)
            print(f"growth exponent of {key} (increase over the process baseline) with {factor}: "
                  + ", ".join(f"{s} {k:.2f}" for s, k in fitted.items()))
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "scaling.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([header] + table)
    plot(rows, output / "scaling.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for column, (factor, part) in enumerate(series(rows).items()):
        part = sorted(part, key=lambda r: r[factor])
        for stage in STAGES:
            x = [r[factor] for r in part]
            axes[0, column].loglog(x, [r["seconds"][stage] for r in part], "o-", label=stage)
            axes[1, column].loglog(x, [r["peak_rss"][stage] / 2**20 for r in part], "o-", label=stage)
        axes[0, column].set_title(f"time vs {factor}")
        axes[1, column].set_title(f"peak RSS (MiB) vs {factor}")
        axes[1, column].set_xlabel(factor)
    axes[0, 0].set_ylabel("seconds")
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"plot: {path}")


SPACING_MM = 1.5  # of the generated whole-refine case and its package: the model grid is the case grid
HU_WINDOW = (-200.0, 300.0)


def _as_ct(normalized: np.ndarray):
    """A SimpleITK image in HU of a normalized (z, y, x) image (0: air, -1000 HU; inside the body the
    window HU_WINDOW), SPACING_MM spacing."""
    import SimpleITK as sitk

    hounsfield = np.where(normalized == 0, -1000.0, HU_WINDOW[0] + normalized * (HU_WINDOW[1] - HU_WINDOW[0]))
    image = sitk.GetImageFromArray(hounsfield.astype(np.int16))
    image.SetSpacing((SPACING_MM,) * 3)
    return image


def _labelmap(labels: np.ndarray):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing((SPACING_MM,) * 3)
    return image


def write_whole_case(shape, atlas: int, labels: int, folder: Path) -> tuple[Path, Path]:
    """The case (case.nrrd) and a package (package/) with `labels` organs and `atlas` atlas cases."""
    import SimpleITK as sitk
    from isseg import model_package
    from isseg.demo_model import shipped_config
    from isseg.networks.monai_net import build_monai_network

    rng = np.random.default_rng(0)
    case_path = folder / "case.nrrd"
    sitk.WriteImage(_as_ct(synthetic_image(synthetic_labels(shape, labels, rng), rng)), str(case_path))
    config = shipped_config()
    config["network"]["args"]["out_channels"] = labels + 1
    config["input"].update(spacing=[SPACING_MM] * 3, intensity={"a_min": HU_WINDOW[0], "a_max": HU_WINDOW[1]})
    config["labels"] = [{"value": value, "name": f"organ {value}", "color": [0.5, 0.5, 0.5]}
                        for value in range(1, labels + 1)]
    config.pop("demo_atlas", None)
    network = build_monai_network(config["network"])
    cases = []
    for index in range(atlas):
        case_labels = synthetic_labels(shape, labels, np.random.default_rng([0, index]))
        cases.append((f"case_{index:02d}", _as_ct(synthetic_image(case_labels, rng)), _labelmap(case_labels)))
    return case_path, model_package.save(folder / "package", config, network, cases)


def _stage_peaks(child: subprocess.Popen) -> tuple[dict[str, int], list[str]]:
    """Peak resident bytes of `child` per worker stage (its `stage` events on stdout), sampled every
    50 ms until it exits; and its stdout lines."""
    stage, peaks, lines = ["start"], {}, []

    def follow() -> None:
        for line in child.stdout:
            lines.append(line)
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "stage":
                stage[0] = event["stage"]

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    while child.poll() is None:
        try:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), resident_bytes(child.pid))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break
        time.sleep(0.05)
    child.wait()
    reader.join()
    return peaks, lines


def run_whole(point: tuple, args) -> None:
    """One complete `isseg refine` of a generated case in a child process; prints its peak RSS (the
    kernel's maximum, and sampled per stage) and its seconds per stage."""
    import resource
    import tempfile

    shape, atlas, labels = point
    with tempfile.TemporaryDirectory() as work:
        case_path, package = write_whole_case(shape, atlas, labels, Path(work))
        steps = max(args.steps, 2)
        command = [sys.executable, "-m", "isseg.cli", "refine", "--input", str(case_path), "--model", str(package),
                   "--output", str(Path(work) / "out"), "--device", args.device, "--steps", str(steps),
                   "--rounds", "1", "--update-every", str(steps // 2), "--align-iterations", str(args.align_iterations),
                   "--progress", "json"]
        started = time.monotonic()
        with open(Path(work) / "stderr.txt", "w+", encoding="utf-8") as errors:  # a file: a full pipe would block
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
            peaks, lines = _stage_peaks(child)
            errors.seek(0)
            error_text = errors.read()
        wall = time.monotonic() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if child.returncode != 0:
            print("".join(lines)[-2000:], error_text[-3000:])
            raise SystemExit(f"isseg refine exited {child.returncode}")
        seconds = json.loads((Path(work) / "out" / "report.json").read_text(encoding="utf-8"))["seconds"]
    print(f"whole refine of {'x'.join(map(str, shape))} voxels, {atlas} atlas cases, {labels} labels "
          f"({steps} steps, {args.align_iterations} alignment iterations per level): worker peak RSS "
          f"{peak_kib / 2**20:.2f} GiB, wall {wall:.0f} s, stages {json.dumps(seconds)}, sampled peak GiB per stage "
          f"{json.dumps({stage: round(peak / 2**30, 2) for stage, peak in peaks.items()})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--grid", default="cpu", choices=tuple(GRIDS))
    parser.add_argument("--only", help="one point SIZE,ATLAS,LABELS (SIZE as ZxYxX) instead of the grid")
    parser.add_argument("--align-iterations", type=int, default=5, help="alignment iterations per pyramid level")
    parser.add_argument("--steps", type=int, default=5, help="fine-tuning steps")
    parser.add_argument("--point-timeout", type=float, default=900, help="seconds before a point is skipped")
    parser.add_argument("--output", type=Path, default=Path("/tmp/isseg-scaling"))
    parser.add_argument("--whole", help="one complete isseg refine at SIZE,ATLAS,LABELS instead of the stages")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.whole:
        run_whole(parse_point(args.whole), args)
        return
    if args.child:
        print(json.dumps(run_point(*parse_point(args.child), args)))
        return
    points = [parse_point(args.only)] if args.only else grid_points(GRIDS[args.grid])
    rows = []
    for point in points:
        row = measure(point, args)
        if row is not None:
            rows.append(row)
            print(json.dumps(row), flush=True)
    report(rows, args.output)


if __name__ == "__main__":
    main()
