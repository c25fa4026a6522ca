"""Build the real-anatomy abdomen model from ../shared/data into the user's cache (offline, seeded).

    python scripts/train_realct_model.py [--data-dir ../shared/data] [--output DIR] [--steps 3000] [--device auto]
    python scripts/train_realct_model.py --rethreshold PACKAGE [--data-dir ../shared/data]
    python scripts/train_realct_model.py --reatlas PACKAGE [--data-dir ../shared/data] [--atlas-cases 6]
                                         [--[no-]atlas-organ-variation] [--[no-]atlas-phantoms]

The model the Slicer user should try on a real CT (Slicer's "CTA abdomen (Panoramix)", "CTLiver"):
a UNet trained on the anatomy of a real body, the ICRP Publication 110 adult male (a label map drawn
on one man's CT), plus the engine's procedural phantoms, with an appearance so varied that a real
scanner's image is one more variant (the SynthSeg idea):

- anatomy: each organ resized and moved over a range wider than the population's (`--organ-variation`,
  benchmarks/anatomy_variation.py), random affine (rotation, anisotropic scale: body habitus) and elastic
  deformation of the trunk, and fields of view anywhere from the lower chest to the pelvis;
- appearance when synthesising (benchmarks/synthetic_ct.py: HU from density and composition): a
  random contrast phase with random strength, a random HU offset per tissue, gas in the stomach,
  random noise and scanner blur;
- appearance per training patch: `isseg train --randomize-appearance` (isseg.appearance);
- short scans: a share of the patches cut to a random axial slab padded as the sliding window pads a CT
  thinner than the patch (`isseg train --short-scans`, isseg.short_scans), as the 20-slice real CT is.

`--rethreshold PACKAGE` chooses a build's per-label thresholds again, with today's rule
(isseg.model_training.choose_thresholds), on its own validation cases (regenerated from the recipe's seeds),
without training: what a new build of the same recipe would choose.

`--reatlas PACKAGE` writes a build's atlas again with this recipe's atlas settings, without training.

The atlas for inference-specific learning is 6 ICRP cases of the upper abdomen (portal venous phase)
at the model spacing, written into the package, each body with its organs resized and moved within the
population's ranges (`--atlas-organ-variation`): refinement learns from the atlas aligned to the case, and
an atlas of one body's organs taught every patient that body's spleen (BENCHMARKS.md section 7). With
them, the demo model's 8 procedural phantoms on the model grid (`--atlas-phantoms`): the model is trained
on both kinds of anatomy, and an atlas of ICRP bodies alone left a phantom's ellipsoid organs nothing like
them to learn from (BENCHMARKS.md section 7). Weights trained on the ICRP data are not shipped (its
terms allow research use with citation, not clearly redistribution): this script rebuilds them, and
the built-in phantom demo model stays the default. The package is written to
<cache>/models/realct-abdomen-<version> ($ISSEG_CACHE or ~/.cache/isseg); select it with
`isseg refine --model <that folder>` or in Slicer with "Add model package...".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import anatomy_variation as av  # noqa: E402  (organs resized and moved)
import synthetic_ct as sct  # noqa: E402  (the ICRP phantom and CT synthesis of the benchmarks)
from isseg import demo_model, model_package, packaging, phantom, protocol  # noqa: E402
from isseg.appearance import random_tissue_values  # noqa: E402
from isseg.events import EventWriter  # noqa: E402
from isseg.io import write_text_atomic  # noqa: E402
from isseg.model_training import TrainSettings, rechoose_thresholds, train_package  # noqa: E402
from isseg.networks import kind_for  # noqa: E402

VERSION = "2.3"
#: The model's labels; values 1..6 are those of the procedural phantoms (isseg.phantom.ORGAN_NAMES).
LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "aorta", 6: "gallbladder",
          7: "stomach", 8: "pancreas"}
ICRP_TO_LABEL = {95: 1, 127: 2, 89: 3, 90: 3, 91: 3, 92: 4, 93: 4, 94: 4, sct.ICRP_AORTA_ID: 5, 70: 6, 71: 6,
                 72: 7, 73: 7, 113: 8}
ICRP_STOMACH_CONTENTS = 73
PHASE_NAMES = {"native": "native", "arterial": "arterial", "portal_venous": "portal"}
#: Seeds of the training phantoms: apart from the demo's training phantoms (1000...) and the shifted test
#: phantoms of the benchmarks (2000...), whose anatomy a shared seed would repeat.
PHANTOM_SEED_START = 5000
TRUNK_BELOW_KIDNEYS_MM = 220.0  # kidney lower poles to below the femoral heads
TRUNK_ABOVE_LIVER_MM = 110.0  # liver dome to the middle of the heart
LICENSE = ("Not for redistribution: trained on the ICRP Publication 110 adult male phantom (research use with "
           "citation of ICRP Publication 110). Rebuild it with scripts/train_realct_model.py.")
CITATION = ("ICRP, 2009. Adult Reference Computational Phantoms. ICRP Publication 110. Ann. ICRP 39 (2); "
            "Chen et al., Inference-specific learning for improved medical image segmentation, Med Phys 2025, "
            "doi:10.1002/mp.17883")


#: Measured with the recipe of "recipe" (BENCHMARKS.md section 7): Dice against TotalSegmentator's labels on
#: the real 20-slice abdominal CT beside the project (and the mean over organs on the 10 shifted phantoms of
#: benchmarks/evaluate_phantoms.sh), first mask -> after `isseg refine` (defaults). A model
#: built with other settings gets these figures in its card only as those of that other recipe.
MEASURED_ACCURACY = {"source": "BENCHMARKS.md section 7, model 2.3 (benchmarks/realct_model.py)",
                     "code": "trained 2026-12-07 with the engine of fb78efa and this recipe; thresholds chosen with the "
                             "rule of 1467b3e (--rethreshold: what a build at 1467b3e chooses); atlas written by "
                             "--reatlas of d96d894 (--atlas-phantoms); real CTs and phantoms segmented "
                             "and refined with the engine of 341e2e1 (a CT finer than the model grid smoothed first)",
                     "recipe": {"seed": 0, "steps": 3000, "spacing_mm": [3.0, 3.0, 3.0], "patch": [80, 80, 40],
                                "icrp_cases": 30, "phantom_cases": 8, "short_scans": 0.25,
                                "organ_variation": True, "atlas_organ_variation": True, "atlas_phantoms": True},
                     "real_abdominal_ct_dice": {"liver": [0.851, 0.905], "aorta": [0.818, 0.813],
                                                "stomach": [0.416, 0.325], "spleen": [0.649, 0.773]},
                     "real_chest_ct_aorta_dice": [0.221, 0.155],
                     "synthetic_first_mask_dice": {"icrp_body": 0.873, "icrp_body_40mm_slab": 0.578,
                                                   "icrp_body_organs_varied": 0.845, "shifted_phantoms": 0.685},
                     "shifted_phantoms_dice_10_cases": [0.690, 0.757]}


@dataclass(frozen=True)
class IcrpVariation:
    """Anatomy and acquisition of one ICRP training case (degrees, mm, HU; fractions of the trunk)."""

    rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_mm: float = 20.0
    fov_length_mm: tuple[float, float] = (120.0, 320.0)
    fov_inplane_fraction: float = 0.8
    tissue_hu_std: float = 30.0
    enhancement_scale: tuple[float, float] = (0.5, 1.5)
    stomach_gas_probability: float = 0.5
    noise_hu: tuple[float, float] = (5.0, 45.0)
    psf_fwhm_mm: tuple[float, float] = (0.8, 3.0)


ATLAS_VARIATION = IcrpVariation(rotation_deg=3.0, scale_range=(0.95, 1.05), elastic_mm=10.0, tissue_hu_std=0.0,
                                enhancement_scale=(1.0, 1.0), stomach_gas_probability=0.0, noise_hu=(15.0, 15.0),
                                psf_fwhm_mm=(1.2, 1.2))


def icrp_trunk(icrp_dir: Path, spacing_mm) -> sitk.Image:
    """The ICRP organ-ID map from below the femoral heads to the heart, cropped to the body, at spacing_mm."""
    whole = sct.load_icrp_phantom(icrp_dir)
    ids = sitk.GetArrayViewFromImage(whole)
    kidney_z = np.argwhere(np.isin(ids, sct.ICRP_KIDNEY_IDS).any(axis=(1, 2)))[:, 0]
    liver_z = np.argwhere((ids == sct.ICRP_LIVER_ID).any(axis=(1, 2)))[:, 0]
    step = sct.ICRP_SPACING_MM[2]
    low = max(0, int(kidney_z.min() - TRUNK_BELOW_KIDNEYS_MM / step))
    high = min(ids.shape[0], int(liver_z.max() + TRUNK_ABOVE_LIVER_MM / step) + 1)
    return sct.resample_labels(sct.crop_to_foreground(whole[:, :, low:high], margin_mm=8.0), spacing_mm)


def random_affine(reference: sitk.Image, rng: np.random.Generator, variation: IcrpVariation) -> sitk.AffineTransform:
    """Rotation about each axis (uniform within +-rotation_deg) and scale per axis, about the image centre."""
    angles = np.deg2rad(rng.uniform(-variation.rotation_deg, variation.rotation_deg, 3))
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    matrix = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(*variation.scale_range, 3))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix.ravel()))
    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
    affine.SetCenter(centre)
    return affine


def field_of_view(tissues: sitk.Image, rng: np.random.Generator, variation: IcrpVariation) -> sitk.Image:
    """A random axial range (length uniform in fov_length_mm, anywhere in the trunk) and in-plane crop."""
    size, spacing = tissues.GetSize(), tissues.GetSpacing()
    length = int(min(size[2], round(rng.uniform(*variation.fov_length_mm) / spacing[2])))
    index, extent = [], []
    for axis, keep in enumerate((None, None, length)):
        if keep is None:
            keep = int(round(size[axis] * rng.uniform(variation.fov_inplane_fraction, 1.0)))
        index.append(int(rng.integers(0, size[axis] - keep + 1)))
        extent.append(keep)
    return sitk.RegionOfInterest(tissues, extent, index)


def stomach_gas(tissues: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Tissue map with the anterior part of the stomach contents turned into gas (ID 0, air) above a
    random fill level: a real stomach often holds air, which lies anterior in a supine patient."""
    ids = sitk.GetArrayFromImage(tissues)
    contents = np.argwhere(ids == ICRP_STOMACH_CONTENTS)
    if len(contents):
        level = np.quantile(contents[:, 1], rng.uniform(0.2, 0.8))
        gas = (ids == ICRP_STOMACH_CONTENTS) & (np.arange(ids.shape[1])[None, :, None] < level)
        ids[gas] = 0
    out = sitk.GetImageFromArray(ids)
    out.CopyInformation(tissues)
    return out


def icrp_case(trunk: sitk.Image, tissue_hu: dict, rng: np.random.Generator, variation: IcrpVariation,
              phase: str, atlas: bool = False) -> tuple[sitk.Image, sitk.Image, dict]:
    """One ICRP case: deformed anatomy, field of view, synthetic CT. Returns (image HU, labels, record).
    An atlas case keeps the upper abdomen (the slab of sct.icrp_abdomen_tissues) instead of a random range."""
    transform = sitk.CompositeTransform([random_affine(trunk, rng, variation),
                                         sct.random_elastic_transform(trunk, rng, variation.elastic_mm)])
    tissues = sct.warp(trunk, transform, is_label=True)
    tissues = upper_abdomen(tissues) if atlas else field_of_view(tissues, rng, variation)
    labels = sct.relabel(tissues, ICRP_TO_LABEL)
    gas = rng.random() < variation.stomach_gas_probability
    if gas:
        tissues = stomach_gas(tissues, rng)
    strength = rng.uniform(*variation.enhancement_scale)
    enhancement = {i: strength * v for i, v in sct.ICRP_ENHANCEMENT_HU[phase].items()}
    noise, psf = rng.uniform(*variation.noise_hu), rng.uniform(*variation.psf_fwhm_mm)
    image = sct.synthesize_ct(tissues, random_tissue_values(tissue_hu, rng, variation.tissue_hu_std), rng,
                              enhancement_hu=enhancement, psf_fwhm_mm=psf, noise_hu=noise)
    record = {"phase": phase, "enhancement_scale": round(strength, 3), "stomach_gas": bool(gas),
              "noise_hu": round(noise, 1), "psf_fwhm_mm": round(psf, 2), "size": list(image.GetSize())}
    return image, labels, record


def upper_abdomen(tissues: sitk.Image) -> sitk.Image:
    """Axial range from 40 mm below the kidneys to 24 mm above the liver, as a typical abdominal CT."""
    ids = sitk.GetArrayViewFromImage(tissues)
    organs = np.argwhere(np.isin(ids, [i for i in ICRP_TO_LABEL if i != sct.ICRP_AORTA_ID]).any(axis=(1, 2)))[:, 0]
    step = tissues.GetSpacing()[2]
    low, high = max(0, int(organs.min() - 40.0 / step)), min(ids.shape[0], int(organs.max() + 24.0 / step) + 1)
    return tissues[:, :, low:high]


def phantom_spec(seed: int, rng: np.random.Generator) -> phantom.PhantomSpec:
    """A procedural phantom of any phase, noise and wider anatomical and intensity variation."""
    phase = str(rng.choice(list(phantom.PHASE_HU)))
    return phantom.PhantomSpec(seed=seed, phase=phase, noise_hu=float(rng.uniform(10, 40)), contrast_jitter_hu=25.0,
                               anatomy_jitter=1.3, deformation_mm=8.0,
                               fov_shift_mm=tuple(float(v) for v in rng.uniform(-20, 20, 3)))


def varied_organs(trunk: sitk.Image, rng: np.random.Generator, variation=av.TRAINING_ORGAN_VARIATION,
                  ) -> tuple[sitk.Image, dict]:
    """The trunk with its organs resized and moved over `variation` (anatomy_variation.OrganVariation per
    organ; by default the training range); and the record of what was drawn."""
    changes = av.draw_organ_changes(rng, variation)
    body, folded = av.vary_anatomy(trunk, av.icrp_abdomen_organs(), changes)
    return body, {"organ_volume_factors": {name: round(change.scale ** 3, 2) for name, change in changes.items()},
                  "organ_shifts_mm": {name: [round(v, 1) for v in change.shift_mm] for name, change in changes.items()},
                  "folded_fraction": round(folded, 5)}


def write_dataset(folder: Path, data_dir: Path, spacing, icrp_cases: int, phantom_cases: int, seed: int,
                  organ_variation: bool = False) -> dict:
    """The training cases as an MSD folder; returns the generation record per case."""
    trunk = icrp_trunk(data_dir / "icrp110", spacing)
    tissue_hu = sct.icrp_tissue_hu(data_dir / "icrp110")
    training, records = [], {}
    for index in range(icrp_cases):
        rng = np.random.default_rng([seed, index])
        phase = list(sct.ICRP_ENHANCEMENT_HU)[index % len(sct.ICRP_ENHANCEMENT_HU)]
        body, organs = varied_organs(trunk, rng) if organ_variation else (trunk, {})
        image, labels, record = icrp_case(body, tissue_hu, rng, IcrpVariation(), phase)
        case_id = f"icrp_{index:03d}"
        training.append(sct.write_msd_case(folder, case_id, image, labels))
        records[case_id] = {"source": "ICRP 110 adult male", "seed": [seed, index], **record, **organs}
    for index in range(phantom_cases):
        rng = np.random.default_rng([seed, 1000 + index])
        spec = phantom_spec(PHANTOM_SEED_START + index, rng)
        case = phantom.generate(spec)
        case_id = f"phantom_{spec.seed:03d}"
        training.append(sct.write_msd_case(folder, case_id, case.image, case.labels))
        records[case_id] = {"source": "isseg.phantom", **json.loads(json.dumps(asdict(spec)))}
    sct.write_msd_dataset_json(folder, "realct-abdomen", "ICRP 110 adult male and procedural phantoms, "
                               "randomised anatomy and appearance", {0: "background", **LABELS}, training,
                               synthesis=records)
    return records


def atlas_cases(data_dir: Path, spacing, count: int, seed: int, organ_variation=av.ABDOMEN_ORGAN_VARIATION,
                ) -> tuple[list[tuple[str, sitk.Image, sitk.Image]], dict]:
    """The atlas: [(id, image HU, labels)] of upper-abdomen ICRP cases, portal venous phase, mild deformation,
    each body's organs resized and moved over `organ_variation` (name -> anatomy_variation.OrganVariation;
    by default the population's ranges; None keeps the ICRP man's organs); and the record of each case."""
    trunk = icrp_trunk(data_dir / "icrp110", spacing)
    tissue_hu = sct.icrp_tissue_hu(data_dir / "icrp110")
    cases, records = [], {}
    for index in range(count):
        rng = np.random.default_rng([seed, 5000 + index])
        body, organs = varied_organs(trunk, rng, organ_variation) if organ_variation is not None else (trunk, {})
        image, labels, record = icrp_case(body, tissue_hu, rng, ATLAS_VARIATION, "portal_venous", atlas=True)
        case_id = f"icrp_atlas_{index:02d}"
        cases.append((case_id, image, labels))
        records[case_id] = {"source": "ICRP 110 adult male", "seed": [seed, 5000 + index], **record, **organs}
    return cases, records


def demo_phantoms_on_model_grid(config: dict) -> tuple[list[tuple[str, sitk.Image, sitk.Image]], dict]:
    """The built-in demo model's atlas (procedural phantoms, isseg.demo_model) put on the model grid of the
    package `config` as `isseg package` puts a case there; [(id, image HU, labels)] and their records. Their
    labels 1..6 are the model's (LABELS)."""
    demo_config = demo_model.shipped_config()
    kind = kind_for(config)
    cases = [packaging.case_on_model_grid(kind, case_id, image, labels)
             for case_id, image, labels in demo_model.demo_atlas_cases(demo_config)]
    records = {case_id: {"source": "isseg.phantom.training_spec (the demo model's atlas)", "seed": seed}
               for (case_id, _, _), seed in zip(cases, demo_config["demo_atlas"]["seeds"])}
    return cases, records


def model_atlas(args, config: dict) -> tuple[list[tuple[str, sitk.Image, sitk.Image]], dict]:
    """The package's atlas: args.atlas_cases ICRP bodies (atlas_cases) and, with args.atlas_phantoms, the demo
    model's phantoms; the cases and their records."""
    cases, records = atlas_cases(args.data_dir, tuple(args.spacing), args.atlas_cases, args.seed,
                                 atlas_organ_variation(args))
    if args.atlas_phantoms:
        phantoms, phantom_records = demo_phantoms_on_model_grid(config)
        cases, records = cases + phantoms, {**records, **phantom_records}
    return cases, records


def atlas_organ_variation(args):
    """The organ variation of the atlas bodies the options ask for (atlas_cases)."""
    return av.ABDOMEN_ORGAN_VARIATION if args.atlas_organ_variation else None


def recipe_of(args) -> dict:
    """The settings that decide the model (what MEASURED_ACCURACY["recipe"] records)."""
    return {"seed": args.seed, "steps": args.steps, "spacing_mm": [float(v) for v in args.spacing],
            "patch": list(args.patch), "icrp_cases": args.icrp_cases, "phantom_cases": args.phantom_cases,
            "short_scans": args.short_scans, "organ_variation": args.organ_variation,
            "atlas_organ_variation": args.atlas_organ_variation, "atlas_phantoms": args.atlas_phantoms}


def rebuild_command(args) -> str:
    """The command that rebuilds this model (the data folder is the user's own copy of ../shared/data)."""
    return ("PYTHONPATH=InferenceSpecificSeg python scripts/train_realct_model.py --data-dir DATA "
            f"--seed {args.seed} --steps {args.steps} --spacing {' '.join(f'{v:g}' for v in args.spacing)} "
            f"--patch {' '.join(map(str, args.patch))} --icrp-cases {args.icrp_cases} "
            f"--phantom-cases {args.phantom_cases} --atlas-cases {args.atlas_cases} --short-scans {args.short_scans:g} "
            + ("--organ-variation" if args.organ_variation else "--no-organ-variation")
            + (" --atlas-organ-variation" if args.atlas_organ_variation else " --no-atlas-organ-variation")
            + (" --atlas-phantoms" if args.atlas_phantoms else " --no-atlas-phantoms"))


def measured_accuracy(args) -> dict:
    """MEASURED_ACCURACY where `args` are its recipe, else a note that this recipe was not measured."""
    if MEASURED_ACCURACY["recipe"] == recipe_of(args):
        return MEASURED_ACCURACY
    return {"this_recipe": "not measured", "other_recipe": MEASURED_ACCURACY}


def atlas_description(args) -> str:
    return (f"{args.atlas_cases} ICRP upper-abdomen cases, portal venous phase, at the model spacing"
            + (", each body's organs resized and moved within the population's ranges (anatomy_variation."
               "ABDOMEN_ORGAN_VARIATION)" if args.atlas_organ_variation else "")
            + ("; and the demo model's atlas phantoms (the model's other training anatomy), put on the model "
               "grid." if args.atlas_phantoms else "."))


def model_card(config: dict, args, records: dict, atlas_records: dict, minutes: float) -> dict:
    """What the model is, what it was trained on, what it is for and how well it did (stored in model.json)."""
    curves = config["training"]["curves"]
    return {
        "intended_use": "Trying InferenceSpecificSeg on a real abdominal CT (for example Slicer's sample CTs). "
                        "Research and demonstration only: not for patients, not for clinical use.",
        "training_data": f"{args.icrp_cases} synthetic CTs of the ICRP Publication 110 adult male (one real "
                         "body's anatomy; " + ("organs resized and moved over a range wider than the population's, "
                                                   if args.organ_variation else "") +
                         "affine and elastic deformation, fields of view from the pelvis to the "
                         f"lower chest, random phase and tissue intensities) and {args.phantom_cases} procedural "
                         "phantoms (isseg.phantom); appearance re-randomised per patch (isseg.appearance), a share of the "
                         f"patches ({args.short_scans:g}) cut to short scans (isseg.short_scans).",
        "atlas": atlas_description(args),
        "limitations": "One body's anatomy (an adult male, arms down): other bodies, women, children, pathology "
                       "and metal are unseen; labels follow the ICRP segmentation, not a clinical guideline.",
        "measured_accuracy": measured_accuracy(args),
        "validation_dice_synthetic": curves["validation_dice"][-1:],
        "recipe": {"script": "scripts/train_realct_model.py", **recipe_of(args), "atlas_cases": args.atlas_cases,
                   "rebuild_command": rebuild_command(args), "training_minutes": round(minutes, 1),
                   "seconds_per_step": round(float(np.mean(curves["seconds_per_step"])), 3),
                   "device": config["training"]["device"]},
        "cases": records,
        "atlas_cases": atlas_records,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=sct.DEFAULT_DATA_DIR, help="folder holding icrp110/")
    parser.add_argument("--output", type=Path, default=None, help="package folder (default: in the isseg cache)")
    parser.add_argument("--icrp-cases", type=int, default=30)
    parser.add_argument("--phantom-cases", type=int, default=8)
    parser.add_argument("--atlas-cases", type=int, default=6)
    parser.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0))
    parser.add_argument("--patch", type=int, nargs=3, default=(80, 80, 40))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--short-scans", type=float, default=0.25,
                        help="share of the training patches cut to a short scan (isseg.short_scans)")
    parser.add_argument("--organ-variation", action=argparse.BooleanOptionalAction, default=True,
                        help="resize and move each organ of the ICRP training bodies (anatomy_variation.py)")
    parser.add_argument("--atlas-organ-variation", action=argparse.BooleanOptionalAction, default=True,
                        help="resize and move each organ of the atlas bodies within the population's ranges")
    parser.add_argument("--atlas-phantoms", action=argparse.BooleanOptionalAction, default=True,
                        help="add the demo model's procedural phantoms to the atlas (the other anatomy trained on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rethreshold", type=Path, default=None, metavar="PACKAGE",
                        help="choose the thresholds of a built package again, with today's rule, and exit")
    parser.add_argument("--reatlas", type=Path, default=None, metavar="PACKAGE",
                        help="write a built package's atlas again with this recipe's atlas options, and exit")
    return parser.parse_args(argv)


def build(args, work: Path, started: float) -> Path:
    """Synthesise the cases in `work`, train, replace the atlas, write the model card; the package folder."""
    dataset, package = work / "dataset", work / "package"
    records = write_dataset(dataset, args.data_dir, tuple(args.spacing), args.icrp_cases, args.phantom_cases,
                            args.seed, args.organ_variation)
    settings = TrainSettings(spacing=tuple(args.spacing), patch_size=tuple(args.patch), steps=args.steps,
                             evaluate_every=max(1, args.steps // 4), seed=args.seed, randomize_appearance=True,
                             short_scan_probability=args.short_scans)
    train_package(dataset, package, settings, EventWriter(mode="bar"), args.device,
                  name="Abdomen, real anatomy (ICRP 110)",
                  description="Small UNet trained on the real anatomy of the ICRP adult male phantom and on "
                              "procedural phantoms, with randomised appearance. For trying InferenceSpecificSeg "
                              "on a real CT only: not for clinical use.")
    config = json.loads((package / protocol.MODEL_FILE).read_text(encoding="utf-8"))
    shutil.rmtree(package / "atlas")
    atlas, atlas_records = model_atlas(args, config)
    model_package.write_atlas(package / "atlas", atlas)
    config.update(version=VERSION, license=LICENSE, citation=CITATION,
                  model_card=model_card(config, args, records, atlas_records, (time.monotonic() - started) / 60))
    (package / protocol.MODEL_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return package


def rethreshold(package_dir: Path, args) -> list[dict]:
    """Choose the thresholds of a built package again on its validation cases, regenerated from the recipe of
    its model card (isseg.model_training.rechoose_thresholds); returns the choices."""
    built = settings_of_build(package_dir, args)
    with tempfile.TemporaryDirectory() as work:
        write_dataset(Path(work), args.data_dir, tuple(built.spacing), built.icrp_cases, built.phantom_cases,
                      built.seed, built.organ_variation)
        return rechoose_thresholds(Path(work), package_dir, EventWriter(mode="bar"), args.device)


def settings_of_build(package_dir: Path, args) -> argparse.Namespace:
    """The recipe a package was built with (its model card), with the atlas options of `args`; SystemExit,
    changing nothing, for a folder this script did not build."""
    config = json.loads((package_dir / protocol.MODEL_FILE).read_text(encoding="utf-8")) \
        if (package_dir / protocol.MODEL_FILE).is_file() else {}
    recipe = config.get("model_card", {}).get("recipe", {})
    if recipe.get("script") != "scripts/train_realct_model.py":
        raise SystemExit(f"'{package_dir}' is not a package built by scripts/train_realct_model.py (no such model "
                         "card in its model.json): nothing was changed. Give the folder the build wrote.")
    built = {key: recipe[key] for key in ("seed", "steps", "patch", "icrp_cases", "phantom_cases", "short_scans")}
    return argparse.Namespace(**{**vars(args), **built, "spacing": recipe["spacing_mm"],
                                 "organ_variation": recipe.get("organ_variation", False)})


def reatlas(package_dir: Path, args) -> list[str]:
    """Write the atlas of a built package again with the atlas options of `args` (seed and spacing of the
    build), swap it in and update the model card and version; the weights stay. Returns the case ids."""
    built = settings_of_build(package_dir, args)
    config_path = package_dir / protocol.MODEL_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    cases, records = model_atlas(built, config)
    fresh, old = package_dir / "atlas.new", package_dir / "atlas.old"
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model_package.write_atlas(fresh, cases)
    # Renames only, after the new atlas is whole: an interruption leaves the old or the new atlas complete.
    (package_dir / "atlas").rename(old)
    fresh.rename(package_dir / "atlas")
    shutil.rmtree(old)
    card = config["model_card"]
    card.update(atlas=atlas_description(built), atlas_cases=records, measured_accuracy=measured_accuracy(built))
    card["recipe"].update(recipe_of(built), atlas_cases=built.atlas_cases, rebuild_command=rebuild_command(built))
    config["version"] = VERSION
    write_text_atomic(json.dumps(config, indent=1), config_path)
    return list(records)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.atlas_cases < 1 and not args.atlas_phantoms:  # checked before hours of training, not after
        raise SystemExit("The atlas would be empty (--atlas-cases 0 and --no-atlas-phantoms): refinement learns from "
                         "the atlas. Give --atlas-cases 1 or more, or --atlas-phantoms. Nothing was changed.")
    if args.reatlas:
        print(f"Atlas of {args.reatlas} written again: {', '.join(reatlas(args.reatlas, args))}.")
        return
    if args.rethreshold:
        for choice in rethreshold(args.rethreshold, args):
            print(f"label {choice['value']}: threshold {choice['threshold']} (Dice at 0.5: {choice['dice_at_0.5']:.3f})")
        return
    output = args.output or model_package.cache_dir() / "models" / f"realct-abdomen-{VERSION}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        package = build(args, Path(work), started)
        shutil.rmtree(output, ignore_errors=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(package, output)
    print(f"\nModel package written to {output} ({(time.monotonic() - started) / 60:.1f} min).\n"
          f"Use it: isseg refine --model {output} ...; in Slicer: 'Add model package...' and pick that folder.")


if __name__ == "__main__":
    main()
