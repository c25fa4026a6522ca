"""Plans of the real-anatomy benchmarks (benchmarks/real_anatomy.py): sizes, distributions, cases.

What a run makes and how big: the acquisition distributions of the training and test cases, the
scales (grids, case counts, training steps, the time budget), which synthetic case comes from which
scan with which seed, the label names of both data sets. Pure data and functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import synthetic_ct as sct

#: Methods of `isseg evaluate` (its names), in the order of the tables: two baselines it always runs, then
#: the inference-specific learning variants asked for with --variants.
VARIANTS = ("initial", "registration", "isl_mask", "isl_intensity", "isl_mask_last_iterate",
            "isl_mask_region_loss")
ISL_VARIANTS = VARIANTS[2:]

#: Organs of the abdomen label set that are small or hard; reported in a section of their own.
ABDOMEN_SMALL_ORGANS = ("gallbladder", "pancreas", "adrenal_left", "adrenal_right")
#: A head-and-neck organ whose median (oncologist) volume is below this is flagged as small.
SMALL_ORGAN_ML = 1.0
#: Head-and-neck organs of median volume below SMALL_ORGAN_ML (0.07 to 0.9 ml over the test scans,
#: benchmarks/results/headneck_interobserver.md): 1 to 14 voxels at 4 mm.
HEADNECK_SMALL_ORGANS = ("Cochlea-Lt", "Cochlea-Rt", "Lacrimal-Lt", "Lacrimal-Rt", "Lens-Lt", "Lens-Rt",
                         "Optic-Nerve-Lt", "Optic-Nerve-Rt")
#: The organs of the k-fold head-and-neck benchmark (benchmarks/headneck_kfold.py): the others.
HEADNECK_KFOLD_ORGANS = tuple(o for o in sct.HEADNECK_ORGANS if o not in HEADNECK_SMALL_ORGANS)

#: Abdomen label name (synthetic_ct.ICRP_ABDOMEN_LABELS) -> TotalSegmentator "total" task class name.
TOTALSEG_NAME = {
    "liver": "liver", "spleen": "spleen", "kidney_left": "kidney_left", "kidney_right": "kidney_right",
    "pancreas": "pancreas", "gallbladder": "gallbladder", "stomach": "stomach",
    "adrenal_left": "adrenal_gland_left", "adrenal_right": "adrenal_gland_right", "aorta": "aorta",
}


@dataclass(frozen=True)
class Distribution:
    """Acquisition and anatomy variation of a set of synthetic cases."""

    phases: tuple[str, ...]
    noise_hu: tuple[float, float]
    psf_mm: tuple[float, float]
    max_deform_mm: float
    fov_min_fraction: tuple[float, float, float]
    organ_variation: bool = False  # organs resized and moved as between patients (anatomy_variation)


# Training: one contrast phase, moderate noise, mild deformation, mild crops. Test: the other phase,
# more noise, a softer PSF, stronger deformation and tighter fields of view.
HEADNECK_TRAIN = Distribution(("native",), (10.0, 25.0), (1.0, 1.3), 8.0, (0.85, 0.85, 0.85))
HEADNECK_TEST = Distribution(("venous",), (30.0, 45.0), (1.3, 1.8), 12.0, (0.7, 0.7, 0.75))
ABDOMEN_TRAIN = Distribution(("portal_venous",), (10.0, 25.0), (1.0, 1.3), 15.0, (0.8, 0.8, 0.85))
ABDOMEN_TEST = Distribution(("arterial",), (30.0, 45.0), (1.3, 1.8), 25.0, (0.65, 0.65, 0.7))
# The test distribution with patient-to-patient anatomy on top: organ sizes and positions drawn from
# population ranges (anatomy_variation.ABDOMEN_ORGAN_VARIATION) before the elastic deformation.
ABDOMEN_VARIED_TEST = replace(ABDOMEN_TEST, organ_variation=True)


def abdomen_test_distribution(anatomy: str) -> Distribution:
    """The abdomen test distribution for `--abdomen-anatomy`: `elastic` (variants of the training anatomy)
    or `varied` (organ sizes and positions varied as between patients as well)."""
    return ABDOMEN_VARIED_TEST if anatomy == "varied" else ABDOMEN_TEST


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

    def model_spacing(self, dataset: str) -> tuple[float, float, float]:
        return self.headneck_model_spacing if dataset == "headneck" else self.abdomen_spacing

    def patch(self, dataset: str) -> tuple[int, int, int]:
        return self.headneck_patch if dataset == "headneck" else self.abdomen_patch

    def train_steps(self, dataset: str) -> int:
        return self.headneck_train_steps if dataset == "headneck" else self.abdomen_train_steps


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


def sized_scale(name: str, **overrides) -> Scale:
    """SCALES[name] with the fields of `overrides` that are not None replaced."""
    return replace(SCALES[name], **{field: value for field, value in overrides.items() if value is not None})


#: Seconds kept free at the end of the time budget for the timed runs and the tables.
FINAL_RESERVE_S = 75.0
#: Rough seconds of the real-CT check, for the time budget (an H100 with 16 cores).
REAL_CT_ESTIMATE_S = 60.0


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


def headneck_label_names(organs: Sequence[str] | None = None) -> dict[int, str]:
    """Label values of a head-and-neck model: 1.. in the order of `organs` (default all 21)."""
    return {0: "background", **dict(enumerate(organs or sct.HEADNECK_ORGANS, start=1))}


def headneck_target(organs: Sequence[str]) -> dict[int, int]:
    """Tissue-map value (sct.HEADNECK_LABEL) -> label value (headneck_label_names) of each organ kept;
    the organs left out become background in the labels (their tissue stays in the image)."""
    return {sct.HEADNECK_LABEL[organ]: value for value, organ in enumerate(organs, start=1)}


def abdomen_label_names() -> dict[int, str]:
    return {0: "background", **{value: name for value, (name, _) in sct.ICRP_ABDOMEN_LABELS.items()}}
