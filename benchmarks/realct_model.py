"""Measurements of the real-anatomy model (scripts/train_realct_model.py) for BENCHMARKS.md.

    python benchmarks/realct_model.py real --model NAME=PACKAGE ... [--data-dir ../shared/data] [--results DIR]
    python benchmarks/realct_model.py anatomy --model NAME=PACKAGE ... [--cases 10] [--results DIR]
    python benchmarks/realct_model.py atlas --model NAME=PACKAGE [--draws population:6:0 ...] [--results DIR]

`real`: every real CT beside the project that has a reference for an organ the models know (the
20-slice upper-abdomen DICOM with TotalSegmentator labels; the chest crop with an aorta mask; the
other chest crop has only a heart, which no model here segments): `isseg refine` with its defaults
for the MODEL:CASE pairs of --refine, the first mask alone for the others; Dice per organ, a table (real_ct.md, real_ct.csv) and a
figure of the first named model's masks (real_ct_masks.png).

`anatomy`: the first masks of each model (no refinement) on anatomy it may not have seen: shifted
procedural phantoms (isseg.phantom.shifted_spec, seeds 2000...), synthetic CT of the ICRP adult male
(held-out seeds), the same cases cut to a 40 mm slab through the spleen (a short scan like the real CT), and
the same body with its organs resized and moved (anatomy_variation); Dice on the organs every kind of case
has (anatomy.md, anatomy.csv).

`atlas`: how much refinement on the 20-slice abdominal CT depends on the atlas: the first model's weights
with atlases drawn as VARIATION:CASES:SEED (train_realct_model.atlas_cases; VARIATION of
ATLAS_ORGAN_VARIATIONS: the ICRP man's own organs, the population's ranges, the training range), each
refined with `isseg refine` defaults; Dice per organ and draw (atlas_draws.md, atlas_draws.csv).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))
sys.path.insert(0, str(BENCHMARKS_DIR.parent / "scripts"))

import anatomy_variation as variation  # noqa: E402
import real_anatomy_jobs as jobs  # noqa: E402
import real_anatomy_reports as reports  # noqa: E402
from real_anatomy_plans import TOTALSEG_NAME  # noqa: E402
import synthetic_ct as sct  # noqa: E402
import train_realct_model as recipe  # noqa: E402
from isseg import model_package, phantom, protocol  # noqa: E402
from isseg.commands.options import resolve_model  # noqa: E402
from isseg.io import read_image, resample_to  # noqa: E402
from isseg.metrics import dice_per_label  # noqa: E402
from isseg.networks import predict_probabilities  # noqa: E402
from isseg.postprocess import labelmap_on_grid  # noqa: E402
from isseg.reporting import format_number  # noqa: E402

#: Organs of the procedural phantoms, which the ICRP cases have too (values of isseg.phantom).
SHARED_ORGANS = dict(enumerate(phantom.ORGAN_NAMES, start=1))
ANATOMY_TEST_SEED = 9  # ICRP test cases: rng [9, index], apart from the recipe's training seeds [0, ...]
SLAB_MM = 40.0  # the axial extent of the real 20-slice abdominal CT beside the project
SPLEEN = next(value for value, name in recipe.LABELS.items() if name == "spleen")
#: Organ variation of the atlas bodies by name (`atlas` draws).
ATLAS_ORGAN_VARIATIONS = {"none": None, "population": variation.ABDOMEN_ORGAN_VARIATION,
                          "training": variation.TRAINING_ORGAN_VARIATION}
DEFAULT_ATLAS_DRAWS = [f"{kind}:6:{seed}" for kind in ("none", "population") for seed in (0, 1, 2)] + \
    ["population:10:0", "population:10:1", "training:6:0"]


def real_cases(data_dir: Path) -> list[dict]:
    """The real CTs with a reference: input path, reference image, {reference value: organ name}."""
    real = data_dir / "real_ct"
    classes = json.loads((real / "totalsegmentator_total_classes.json").read_text(encoding="utf-8"))
    abdomen_ids = {int(i): name for i, name in classes.items() if name in TOTALSEG_NAME.values()}
    return [
        {"case": "abdomen_dicom", "input": real / "totalseg_dicom_abdomen" / "dicom",
         "reference": real / "totalseg_dicom_abdomen" / "labels_totalsegmentator.nii.gz", "organs": abdomen_ids},
        {"case": "chest_b", "input": real / "totalseg_chest" / "chest_b_ct.nii.gz",
         "reference": real / "totalseg_chest" / "chest_b_aorta.nii.gz", "organs": {1: "aorta"}},
    ]


def reference_on(image: sitk.Image, path: Path) -> np.ndarray:
    reference = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(sitk.Resample(reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt16))


def organ_rows(model: str, case: dict, variant: str, prediction: np.ndarray, reference: np.ndarray,
               names: dict[int, str], voxel_ml: float) -> list[dict]:
    """Per organ the model and the reference share: Dice and volumes (Dice NaN where the reference lacks it)."""
    by_totalseg_name = {TOTALSEG_NAME.get(name, name): value for value, name in names.items()}
    rows = []
    for reference_id, reference_name in case["organs"].items():
        value = by_totalseg_name.get(reference_name)
        if value is None:
            continue
        predicted, truth = prediction == value, reference == reference_id
        rows.append({"model": model, "case": case["case"], "variant": variant, "organ": names[value],
                     "dice": reports.dice(predicted, truth) if truth.any() else float("nan"),
                     "predicted_ml": round(float(predicted.sum()) * voxel_ml, 1),
                     "reference_ml": round(float(truth.sum()) * voxel_ml, 1)})
    return rows


def package_with_atlas(package: Path, draw: str, data_dir: Path, folder: Path) -> Path:
    """A copy of `package` (model.json, weights) in `folder` whose atlas is drawn as VARIATION:CASES:SEED;
    an existing one is reused."""
    if (folder / protocol.ATLAS_MANIFEST).is_file():
        return folder
    kind, count, seed = draw.split(":")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (protocol.MODEL_FILE, protocol.WEIGHTS_FILE):
        shutil.copy2(package / name, folder / name)
    spacing = json.loads((package / protocol.MODEL_FILE).read_text(encoding="utf-8"))["input"]["spacing"]
    cases, _ = recipe.atlas_cases(data_dir, tuple(spacing), int(count), int(seed), ATLAS_ORGAN_VARIATIONS[kind])
    model_package.write_atlas(folder / "atlas", cases)
    return folder


def run_atlas(args) -> None:
    model, package = args.model[0]
    case = real_cases(args.data_dir)[0]
    image = read_image(case["input"])
    reference = reference_on(image, case["reference"])
    names = {label["value"]: label["name"] for label in model_package.load(package, check_atlas=False).labels}
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    rows = []
    for draw in args.draws:
        name = f"{model}_atlas_{draw.replace(':', '_')}"
        folder = package_with_atlas(Path(package), draw, args.data_dir, args.work / name / "package")
        for variant, mask in refined_masks(args, name, str(folder), case).items():
            rows.extend(organ_rows(draw, case, variant, mask, reference, names, voxel_ml))
    args.results.mkdir(parents=True, exist_ok=True)
    reports.write_csv(rows, args.results / "atlas_draws.csv")
    (args.results / "atlas_draws.md").write_text(atlas_markdown(rows), encoding="utf-8")
    print((args.results / "atlas_draws.md").read_text(encoding="utf-8"))


def atlas_markdown(rows: list[dict]) -> str:
    organs = [o for o in dict.fromkeys(r["organ"] for r in rows)
              if any(r["organ"] == o and not np.isnan(r["dice"]) for r in rows)]
    cell = {(r["model"], r["variant"], r["organ"]): f"{format_number(r['dice'])} ({r['predicted_ml']:.0f} ml)"
            for r in rows}
    draws = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| atlas (organ variation:cases:seed) | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs),
             "| first mask (any atlas) | " + " | ".join(cell[(draws[0], "initial", o)] for o in organs) + " |"]
    lines += [f"| {draw}, after ISL | " + " | ".join(cell[(draw, "refined", o)] for o in organs) + " |"
              for draw in draws]
    return "\n".join(lines) + "\n\nDice (predicted volume) on the 20-slice abdominal CT against TotalSegmentator's labels.\n"


def run_real(args) -> None:
    rows, figure_inputs = [], []
    for model_index, (model, package) in enumerate(args.model):
        names = {label["value"]: label["name"] for label in model_package.load(package, check_atlas=False).labels}
        for case in real_cases(args.data_dir):
            image = read_image(case["input"])
            reference = reference_on(image, case["reference"])
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
            if (model, case["case"]) in args.refine:
                masks = refined_masks(args, model, package, case)
            else:
                loaded = model_package.load(package, check_atlas=False)
                masks = {"initial": first_mask(loaded, loaded.build_network(), image)}
            for variant, mask in masks.items():
                rows.extend(organ_rows(model, case, variant, mask, reference, names, voxel_ml))
            if model_index == 0 and "refined" in masks and case["case"] == "abdomen_dicom":
                figure_inputs = [image, masks, reference, names, case]
    args.results.mkdir(parents=True, exist_ok=True)
    reports.write_csv(rows, args.results / "real_ct.csv")
    (args.results / "real_ct.md").write_text(real_markdown(rows), encoding="utf-8")
    if figure_inputs:
        mask_figure(*figure_inputs, args.results / "real_ct_masks.png", title=args.model[0][0])
    print((args.results / "real_ct.md").read_text(encoding="utf-8"))


def refined_masks(args, model: str, package: str, case: dict) -> dict[str, np.ndarray]:
    """First and refined masks of `isseg refine` (defaults) on a real case; a finished run is reused."""
    output = args.work / model / case["case"]
    if not (output / "labelmap.nrrd").is_file():
        jobs.run_logged(jobs.isseg_command("refine", "--input", case["input"], "--model", package, "--output", output,
                                           "--progress", "json", "--seed", str(args.seed), "--device", args.device),
                        args.work / f"{model}_{case['case']}.log")
    return {variant: sitk.GetArrayFromImage(sitk.ReadImage(str(output / file)))
            for variant, file in (("initial", "snapshot_0000.nrrd"), ("refined", "labelmap.nrrd"))}


def real_markdown(rows: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| case | organ | reference ml | " + " | ".join(f"{m} initial | {m} refined" for m in models) + " |",
             "|---|---|---|" + "---|---|" * len(models)]
    keys = list(dict.fromkeys((r["case"], r["organ"]) for r in rows))
    by_key = {(r["model"], r["case"], r["organ"], r["variant"]): r for r in rows}
    for case, organ in keys:
        cells, reference_ml = [], None
        for model in models:
            for variant in ("initial", "refined"):
                row = by_key.get((model, case, organ, variant))
                if row is None:
                    cells.append("-")
                    continue
                reference_ml = row["reference_ml"]
                cells.append(f"{format_number(row['dice'])} ({row['predicted_ml']:.0f} ml)")
        lines.append(f"| {case} | {organ} | {reference_ml:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nDice (predicted volume). '-': the model has no such label, or that run was not made; n/a: the " \
                              "reference has none of the organ on these slices (the volume is then false positive).\n"


def mask_figure(image: sitk.Image, masks: dict, reference: np.ndarray, names: dict, case: dict, path: Path,
                title: str) -> Path:
    """Three axial slices of the real CT: reference contours, the first mask, the refined mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct = sitk.GetArrayFromImage(image)
    by_name = {TOTALSEG_NAME.get(n, n): v for v, n in names.items()}
    reference_as_model = np.zeros_like(masks["initial"])
    for reference_id, name in case["organs"].items():
        if name in by_name:
            reference_as_model[reference == reference_id] = by_name[name]
    slices = [int(ct.shape[0] * f) for f in (0.2, 0.5, 0.8)]
    panels = (("reference (TotalSegmentator)", reference_as_model), (f"{title}: first mask", masks["initial"]),
              (f"{title}: after ISL", masks["refined"]))
    figure, axes = plt.subplots(len(slices), 3, figsize=(12, 4 * len(slices)))
    colours = plt.get_cmap("tab10")
    for row, z in enumerate(slices):
        for column, (label, mask) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(ct[z], cmap="gray", vmin=-200, vmax=300)
            for value, name in names.items():
                if (mask[z] == value).any():
                    axis.contour(mask[z] == value, levels=[0.5], colors=[colours(value % 10)], linewidths=1.2)
            axis.set_title(f"{label}, slice {z}", fontsize=9)
            axis.axis("off")
    handles = [plt.Line2D([], [], color=colours(v % 10), label=n) for v, n in names.items()]
    figure.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=9)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def anatomy_test_cases(data_dir: Path, count: int) -> list[tuple[str, str, sitk.Image, sitk.Image]]:
    """(kind, id, image HU, labels with SHARED_ORGANS values) of the four test sets: shifted phantoms, the
    ICRP body as it is, its 40 mm slabs through the spleen, and the ICRP body with its organs resized and
    moved within population ranges (anatomy_variation: patient-to-patient anatomy the models never saw)."""
    cases = []
    for seed in range(2000, 2000 + count):
        case = phantom.generate(phantom.shifted_spec(seed))
        cases.append(("phantoms (shifted)", f"phantom_{seed}", case.image, case.labels))
    trunk = recipe.icrp_trunk(data_dir / "icrp110", (4.0, 4.0, 4.0))
    tissue_hu = sct.icrp_tissue_hu(data_dir / "icrp110")
    for index in range(count):
        image, labels = icrp_test_case(trunk, tissue_hu, index)
        cases.append(("ICRP adult male", f"icrp_test_{index:02d}", image, labels))
        cases.append(("ICRP, 40 mm slab", f"icrp_slab_{index:02d}", *spleen_slab(image, labels)))
    for index in range(count):
        changes = variation.draw_organ_changes(np.random.default_rng([ANATOMY_TEST_SEED, 100 + index]))
        varied, _ = variation.vary_anatomy(trunk, variation.icrp_abdomen_organs(), changes)
        cases.append(("ICRP, organs varied", f"icrp_varied_{index:02d}", *icrp_test_case(varied, tissue_hu, index)))
    return cases


def icrp_test_case(body: sitk.Image, tissue_hu: dict, index: int) -> tuple[sitk.Image, sitk.Image]:
    """(image HU, labels) of held-out test case `index` made from an ICRP tissue map: the upper abdomen, mild
    deformation, the phases in turn (seed [ANATOMY_TEST_SEED, index])."""
    rng = np.random.default_rng([ANATOMY_TEST_SEED, index])
    phase = list(sct.ICRP_ENHANCEMENT_HU)[index % len(sct.ICRP_ENHANCEMENT_HU)]
    image, labels, _ = recipe.icrp_case(body, tissue_hu, rng, recipe.ATLAS_VARIATION, phase, atlas=True)
    return image, labels


def spleen_slab(image: sitk.Image, labels: sitk.Image, length_mm: float = SLAB_MM) -> tuple[sitk.Image, sitk.Image]:
    """The axial slab of `length_mm` centred on the spleen: a short scan like the 20-slice real CT."""
    spleen_z = np.argwhere((sitk.GetArrayViewFromImage(labels) == SPLEEN).any(axis=(1, 2)))[:, 0]
    size = list(image.GetSize())
    depth = max(1, int(round(length_mm / image.GetSpacing()[2])))
    start = int(np.clip((spleen_z.min() + spleen_z.max()) // 2 - depth // 2, 0, size[2] - depth))
    return tuple(sitk.RegionOfInterest(volume, [size[0], size[1], depth], [0, 0, start]) for volume in (image, labels))


def first_mask(package: model_package.ModelPackage, network, image: sitk.Image) -> np.ndarray:
    """The model's first mask on the image's grid, as `isseg refine` publishes it (the network kind's own
    preparation and prediction, largest components)."""
    kind = package.network_kind
    prepared = kind.prepare(image)
    probabilities = predict_probabilities(kind, network, prepared.tensor, network_device(network))[0].numpy()
    on_input = kind.probabilities_on_input(probabilities, prepared, image)
    return sitk.GetArrayFromImage(labelmap_on_grid(on_input, image, package.labels, True))


def network_device(network):
    return next(network.parameters()).device


def run_anatomy(args) -> None:
    cases = anatomy_test_cases(args.data_dir, args.cases)
    rows = []
    for model, path in args.model:
        package = model_package.load(path, check_atlas=False)
        network = package.build_network()
        value_of = {label["name"]: label["value"] for label in package.labels}
        for kind, case_id, image, labels in cases:
            prediction = first_mask(package, network, image)
            truth = sitk.GetArrayFromImage(resample_to(labels, image, is_label=True))
            for value, organ in SHARED_ORGANS.items():
                predicted = (prediction == value_of[organ]).astype(np.uint8)
                dice = dice_per_label(predicted, (truth == value).astype(np.uint8), [1])[0]
                rows.append({"model": model, "test": kind, "case": case_id, "organ": organ, "dice": dice})
        print(f"{model}: done", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    reports.write_csv(rows, args.results / "anatomy.csv")
    (args.results / "anatomy.md").write_text(anatomy_markdown(rows), encoding="utf-8")
    print((args.results / "anatomy.md").read_text(encoding="utf-8"))


def anatomy_markdown(rows: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    tests = list(dict.fromkeys(r["test"] for r in rows))
    lines = ["| model | " + " | ".join(f"Dice on {t}" for t in tests) + " |", "|---|" + "---|" * len(tests)]
    for model in models:
        cells = []
        for test in tests:
            values = [r["dice"] for r in rows if r["model"] == model and r["test"] == test]
            cells.append(format_number(float(np.nanmean(values))))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("\nMean over cases and the organs " + ", ".join(SHARED_ORGANS.values()) + " (first masks, no ISL).")
    for model in models:
        for test in tests:
            per_organ = {o: float(np.nanmean([r["dice"] for r in rows if r["model"] == model and r["test"] == test
                                              and r["organ"] == o])) for o in SHARED_ORGANS.values()}
            lines.append(f"- {model} on {test}: " + ", ".join(f"{o} {format_number(d)}" for o, d in per_organ.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("real", "anatomy", "atlas"))
    parser.add_argument("--model", nargs="+", required=True, type=lambda text: tuple(text.split("=", 1)),
                        help="NAME=PACKAGE (a package folder, or 'demo'); the first one is drawn in the figure")
    parser.add_argument("--data-dir", type=Path, default=sct.DEFAULT_DATA_DIR)
    parser.add_argument("--work", type=Path, default=Path("/tmp/isseg-realct-benchmark"))
    parser.add_argument("--results", type=Path, default=BENCHMARKS_DIR / "results" / "realct")
    parser.add_argument("--refine", nargs="*", default=None, type=lambda text: tuple(text.split(":", 1)),
                        help="real: MODEL:CASE pairs refined with ISL (default every pair; the others get the "
                             "first mask only), cases abdomen_dicom and chest_b")
    parser.add_argument("--cases", type=int, default=10, help="anatomy: test cases of each kind")
    parser.add_argument("--draws", nargs="+", default=DEFAULT_ATLAS_DRAWS,
                        help="atlas: VARIATION:CASES:SEED per atlas, VARIATION one of " + ", ".join(ATLAS_ORGAN_VARIATIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.model = [(name, str(resolve_model(package))) for name, package in args.model]
    if args.refine is None:
        args.refine = [(name, case) for name, _ in args.model for case in ("abdomen_dicom", "chest_b")]
    {"real": run_real, "anatomy": run_anatomy, "atlas": run_atlas}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
