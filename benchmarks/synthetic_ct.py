"""Synthetic CT images from real label maps, for benchmarks.

Real anatomy, synthetic intensities: each voxel of a *tissue map* (one integer
tissue ID per voxel) gets a Hounsfield value, then texture, scanner blur and
noise are added. Case-to-case variation (contrast phase, noise level, field of
view, elastic deformation of the anatomy) creates the shift between training
and inference data that inference-specific learning addresses. Every random
choice comes from a ``numpy.random.Generator``, so a seed reproduces a case
exactly.

Two sources of real anatomy (read from ``../shared/data`` beside the project,
or from a path given by the user; never copied into the repository):

* ICRP Publication 110, "Adult Reference Computational Phantoms" (2009): the
  adult male voxel phantom (140 organs and tissues with density and elemental
  composition), as redistributed in the public GitHub repository
  DOnghiaGroup/ICRP110_HumanPhantoms_GCR. Cite ICRP Publication 110.
  Used for an abdomen label set; Hounsfield values come from the composition.
* Nikolov et al., "Clinically applicable segmentation of head and neck anatomy
  for radiotherapy", J Med Internet Res 2021 (arXiv:1809.04430): manual masks
  of 21 organs at risk on 31 public head-and-neck planning CTs, public
  repository google-deepmind/tcia-ct-scan-dataset (CC BY 4.0). Only the masks
  are used; body outline, skull and vertebrae are generated around them.

Images are SimpleITK images in LPS physical space (mm); numpy arrays taken
from them are indexed (z, y, x) with x towards the patient's left, y towards
posterior and z towards superior.

Command line: ``python benchmarks/synthetic_ct.py --dataset icrp --cases 8``
writes a Medical Segmentation Decathlon style folder (imagesTr/, labelsTr/,
dataset.json) to ``~/.cache/isseg-benchmarks/`` (outside the repository).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, spatial

_ENGINE_DIR = str(Path(__file__).resolve().parent.parent / "InferenceSpecificSeg")
if _ENGINE_DIR not in sys.path:
    sys.path.insert(0, _ENGINE_DIR)
from isseg.label_resampling import resample_labels  # noqa: E402  (the engine's one implementation)
from isseg.datasets import write_msd_case, write_msd_dataset_json  # noqa: E402,F401 (real_anatomy uses them from here)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "isseg-benchmarks"

AIR_HU = -1000.0
#: Lowest value a CT scanner stores (the conventional -1024 HU floor).
CT_MIN_HU = -1024.0
CT_MAX_HU = 3071.0

# --------------------------------------------------------------------------
# Hounsfield units from density and elemental composition
# --------------------------------------------------------------------------

#: Standard atomic weights (IUPAC, g/mol) of the elements in tissue tables.
ATOMIC_WEIGHT = {
    1: 1.008, 6: 12.011, 7: 14.007, 8: 15.999, 11: 22.990, 12: 24.305,
    15: 30.974, 16: 32.06, 17: 35.45, 18: 39.948, 19: 39.098, 20: 40.078,
    26: 55.845, 53: 126.904,
}
WATER_MASS_FRACTIONS = {1: 0.111894, 8: 0.888106}

# Scanner constants of the stoichiometric model below: photoelectric and
# coherent scattering strengths relative to Compton scattering. Chosen for a
# ~120 kVp body spectrum: with them ICRP "mineral bone" (1.92 g/cm3) is about
# +1460 HU, adipose tissue about -75 HU and compressed lung about -620 HU, in
# line with clinical measurements; a real scanner would fit them to a
# calibration phantom as in Schneider et al. 1996.
K_PHOTOELECTRIC = 3e-5
K_COHERENT = 1e-3


def _relative_attenuation(density_g_cm3: float, mass_fractions: Mapping[int, float]) -> float:
    """Linear attenuation coefficient in arbitrary units (Schneider et al. 1996).

    mu = rho * N_g * (1 + k_ph * Z_tilde^3.62 + k_coh * Z_hat^1.86), with
    N_g = sum_i w_i Z_i / A_i the electrons per gram (over Avogadro's number),
    Z_tilde^3.62 = sum_i w_i Z_i^4.62 / A_i / N_g and
    Z_hat^1.86 = sum_i w_i Z_i^2.86 / A_i / N_g.
    """
    total = sum(mass_fractions.values())
    electrons = 0.0
    photoelectric = 0.0
    coherent = 0.0
    for z, fraction in mass_fractions.items():
        w_over_a = fraction / total / ATOMIC_WEIGHT[z]
        electrons += w_over_a * z
        photoelectric += w_over_a * z ** 4.62
        coherent += w_over_a * z ** 2.86
    return density_g_cm3 * (electrons + K_PHOTOELECTRIC * photoelectric + K_COHERENT * coherent)


def hounsfield_from_composition(density_g_cm3: float, mass_fractions: Mapping[int, float]) -> float:
    """CT number (HU) of a material from its mass density and composition.

    Stoichiometric calibration of Schneider, Pedroni & Lomax, "The calibration
    of CT Hounsfield units for radiotherapy treatment planning", Phys Med Biol
    41:111 (1996): attenuation = electron density times a Compton term plus
    photoelectric (~Z^4.62 per atom) and coherent (~Z^2.86) corrections;
    HU = 1000 (mu / mu_water - 1). Water gives 0 HU by construction, air
    about -999 HU, soft tissues follow electron density, and bone rises above
    its electron density through calcium and phosphorus.

    density_g_cm3: mass density in g/cm^3. mass_fractions: atomic number ->
    mass fraction (any scale, e.g. percent; normalised here).
    """
    water = _relative_attenuation(1.0, WATER_MASS_FRACTIONS)
    return 1000.0 * (_relative_attenuation(density_g_cm3, mass_fractions) / water - 1.0)


# --------------------------------------------------------------------------
# Generic image helpers
# --------------------------------------------------------------------------


def relabel(labels: sitk.Image, mapping: Mapping[int, int], default: int = 0) -> sitk.Image:
    """Map label values through a lookup table (values not in it -> default).

    labels: integer image of any shape. Returns uint8 image on the same grid.
    """
    array = sitk.GetArrayFromImage(labels)
    lut = np.full(int(array.max()) + 1, default, dtype=np.uint8)
    for source, target in mapping.items():
        if source < lut.size:
            lut[source] = target
    out = sitk.GetImageFromArray(lut[array])
    out.CopyInformation(labels)
    return out


def crop_to_foreground(image: sitk.Image, margin_mm: float, background: int = 0) -> sitk.Image:
    """Crop an image to the bounding box of its non-background voxels plus a margin.

    margin_mm: margin added on every side, in mm (clipped at the image border).
    """
    array = sitk.GetArrayViewFromImage(image)
    nonzero = np.argwhere(array != background)
    if nonzero.size == 0:
        return image
    margin = np.ceil(margin_mm / np.array(image.GetSpacing())[::-1]).astype(int)
    lower = np.maximum(nonzero.min(axis=0) - margin, 0)
    upper = np.minimum(nonzero.max(axis=0) + margin + 1, array.shape)
    x, y, z = ((int(lower[axis]), int(upper[axis])) for axis in (2, 1, 0))
    return image[x[0]:x[1], y[0]:y[1], z[0]:z[1]]


# --------------------------------------------------------------------------
# Case-to-case variation: elastic deformation and field of view
# --------------------------------------------------------------------------


def random_elastic_transform(reference: sitk.Image, rng: np.random.Generator, max_mm: float,
                             control_spacing_mm: float = 60.0) -> sitk.BSplineTransform:
    """Smooth random displacement field over the image's box, |u(x)| <= max_mm.

    Cubic B-spline with control points about control_spacing_mm apart; each
    control point's displacement is drawn uniformly in a ball of radius max_mm.
    The cubic B-spline weights are non-negative and sum to one, so every
    displacement is a convex combination of control displacements and never
    exceeds max_mm.
    """
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    mesh = [max(1, int(np.ceil(e / control_spacing_mm))) for e in extent]
    transform = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    n_points = transform.GetNumberOfParameters() // 3
    directions = rng.standard_normal((n_points, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = max_mm * rng.uniform(0.0, 1.0, n_points) ** (1.0 / 3.0)
    vectors = directions * radii[:, None]
    # ITK stores all x components, then all y, then all z.
    transform.SetParameters(tuple(vectors.T.ravel()))
    return transform


def warp(image: sitk.Image, transform: sitk.Transform, *, is_label: bool) -> sitk.Image:
    """Resample an image through a transform on its own grid.

    Labels use nearest neighbour (values stay valid labels), intensities linear
    interpolation. Points mapped outside the grid take the nearest edge voxel:
    anatomy cut by the field of view continues rather than turning into air.
    """
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, image, transform, interpolator, 0, image.GetPixelID(), True)


def elastic_deform(labels: sitk.Image, rng: np.random.Generator, max_mm: float,
                   control_spacing_mm: float = 60.0) -> sitk.Image:
    """Randomly deform a label map (nearest neighbour), moving no point by more than max_mm.

    Deform the tissue map before synthesising intensities, so image and labels
    stay consistent; to deform an existing image with the same field, use
    ``random_elastic_transform`` and ``warp`` on both.
    """
    return warp(labels, random_elastic_transform(labels, rng, max_mm, control_spacing_mm),
                is_label=True)


def crop_fov(image: sitk.Image, rng: np.random.Generator,
             min_fraction: Sequence[float] = (0.8, 0.8, 0.85)) -> sitk.Image:
    """Random field-of-view crop: keep a random box of each axis' extent.

    min_fraction: (x, y, z) smallest kept fraction of each axis; the kept
    fraction is uniform in [min_fraction, 1] and the box position uniform.
    Physical coordinates are preserved.
    """
    index, size = [], []
    for n, low in zip(image.GetSize(), min_fraction):
        keep = max(1, int(round(n * rng.uniform(low, 1.0))))
        start = int(rng.integers(0, n - keep + 1))
        index.append(start)
        size.append(keep)
    return sitk.RegionOfInterest(image, size, index)


# --------------------------------------------------------------------------
# Intensities
# --------------------------------------------------------------------------


def _unit_gaussian_field(rng: np.random.Generator, shape: Sequence[int],
                         sigma_voxels: Sequence[float]) -> np.ndarray:
    """White noise low-pass filtered with a Gaussian, rescaled to zero mean, unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_voxels,
                                    mode="wrap")
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def synthesize_ct(tissues: sitk.Image, tissue_hu: Mapping[int, float], rng: np.random.Generator, *,
                  enhancement_hu: Mapping[int, float] | None = None, texture_hu: float = 6.0,
                  texture_scale_mm: float = 8.0, psf_fwhm_mm: float = 1.2,
                  noise_hu: float = 20.0) -> sitk.Image:
    """CT-like image (HU, float32) from a tissue map.

    tissues: integer tissue IDs, shape (x, y, z) in SimpleITK order, spacing in
    mm; every ID present must be in tissue_hu (ID 0 is the air around the
    body). Steps:

    1. mean value per tissue: tissue_hu[id] + enhancement_hu.get(id, 0)
       (contrast phase offsets);
    2. texture inside the body: smooth Gaussian random field, std texture_hu,
       correlation length texture_scale_mm (organ parenchyma is not flat);
    3. blur: Gaussian scanner point spread function (FWHM psf_fwhm_mm)
       combined with the voxel's own aperture (a box one voxel wide, variance
       spacing^2 / 12), so coarse grids show partial-volume edges;
    4. noise: Gaussian, std noise_hu, slightly correlated between
       neighbouring voxels as in filtered back-projection images;
    5. clip to the scanner range [-1024, 3071] HU.

    The tissue map is only read; labels derived from it are unaffected.
    """
    ids = sitk.GetArrayFromImage(tissues)
    present = np.unique(ids)
    missing = [int(v) for v in present if int(v) not in tissue_hu]
    if missing:
        raise ValueError(f"no Hounsfield value for tissue IDs {missing}")
    enhancement_hu = enhancement_hu or {}
    lut = np.zeros(int(present.max()) + 1, dtype=np.float32)
    for value in present:
        lut[value] = tissue_hu[int(value)] + enhancement_hu.get(int(value), 0.0)
    image = lut[ids]

    spacing_zyx = np.array(tissues.GetSpacing())[::-1]
    if texture_hu > 0:
        image += (ids != 0) * (texture_hu * _unit_gaussian_field(
            rng, ids.shape, texture_scale_mm / spacing_zyx))

    psf_sigma_mm = psf_fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    blur_sigma_mm = np.sqrt(psf_sigma_mm ** 2 + spacing_zyx ** 2 / 12.0)
    image = ndimage.gaussian_filter(image, blur_sigma_mm / spacing_zyx, mode="nearest")

    if noise_hu > 0:
        image += noise_hu * _unit_gaussian_field(rng, ids.shape, (0.5, 0.5, 0.5))
    np.clip(image, CT_MIN_HU, CT_MAX_HU, out=image)

    out = sitk.GetImageFromArray(image.astype(np.float32))
    out.CopyInformation(tissues)
    return out


# --------------------------------------------------------------------------
# ICRP 110 adult male phantom: abdomen
# --------------------------------------------------------------------------

ICRP_SPACING_MM = (2.137, 2.137, 8.0)
#: The voxel array also uses ID 141, "Skin at top and bottom" (the first and
#: last slice) in ICRP Publication 110, which AM_organs.dat omits.
ICRP_END_SKIN = (141, "Skin at top and bottom", 27, 1.090)
#: Tissue ID given to the abdominal/thoracic aorta, carved out of ICRP ID 10
#: ("Blood vessels, trunk", which also holds the vena cava and other vessels).
ICRP_AORTA_ID = 142
ICRP_VESSELS_TRUNK_ID = 10
ICRP_LIVER_ID = 95
ICRP_SPLEEN_ID = 127
ICRP_BRAIN_ID = 61
ICRP_BLADDER_IDS = (137, 138)
ICRP_SPINE_IDS = tuple(range(47, 55))  # cervical..sacrum, cortical and spongiosa
ICRP_KIDNEY_IDS = (89, 90, 91, 92, 93, 94)

#: Abdomen target labels: label value -> (name, ICRP organ IDs merged into it).
ICRP_ABDOMEN_LABELS: dict[int, tuple[str, tuple[int, ...]]] = {
    1: ("liver", (95,)),
    2: ("spleen", (127,)),
    3: ("kidney_left", (89, 90, 91)),  # cortex, medulla, pelvis
    4: ("kidney_right", (92, 93, 94)),
    5: ("pancreas", (113,)),
    6: ("gallbladder", (70, 71)),  # wall, contents
    7: ("stomach", (72, 73)),  # wall, contents
    8: ("adrenal_left", (1,)),
    9: ("adrenal_right", (2,)),
    10: ("aorta", (ICRP_AORTA_ID,)),
}

# Contrast enhancement (HU added to the native value) per ICRP organ ID.
# Typical magnitudes at 120 kVp with a standard iodine dose, after Bae KT,
# "Intravenous contrast medium administration and scan timing at CT",
# Radiology 256:32-61 (2010): late arterial phase (~35 s) - aorta ~250-300 HU,
# renal cortex strongly, pancreas and spleen (heterogeneous) moderately, liver
# little; portal-venous phase (~70 s) - liver +50-60 HU, kidneys and spleen
# ~+70-130 HU, aorta ~150-180 HU. Bile, urine and bowel contents do not enhance.
_BLOOD_IDS = (9, 10, 11, 12, 88, 96, 98, ICRP_AORTA_ID)
_BOWEL_WALL_IDS = (74, 76, 78, 80, 82, 84, 86)
_MUSCLE_IDS = (5, 6, 106, 107, 108, 109, 133)
ICRP_ENHANCEMENT_HU: dict[str, dict[int, float]] = {
    "native": {},
    "arterial": {
        **{i: 150.0 for i in _BLOOD_IDS}, ICRP_AORTA_ID: 250.0, 88: 250.0,
        89: 150.0, 92: 150.0, 90: 40.0, 93: 40.0,  # renal cortex >> medulla
        127: 70.0, 113: 70.0, 95: 15.0, 1: 40.0, 2: 40.0, 72: 40.0, 70: 20.0,
        87: 60.0, 132: 60.0, **{i: 30.0 for i in _BOWEL_WALL_IDS},
        **{i: 5.0 for i in _MUSCLE_IDS},
    },
    "portal_venous": {
        **{i: 130.0 for i in _BLOOD_IDS},
        89: 130.0, 92: 130.0, 90: 130.0, 93: 130.0,
        127: 70.0, 113: 50.0, 95: 55.0, 1: 40.0, 2: 40.0, 72: 40.0, 70: 30.0,
        87: 50.0, 132: 60.0, **{i: 40.0 for i in _BOWEL_WALL_IDS},
        **{i: 10.0 for i in _MUSCLE_IDS},
    },
}


@dataclass(frozen=True)
class IcrpOrgan:
    """One row of AM_organs.dat."""

    name: str
    tissue_number: int
    density_g_cm3: float


def read_icrp_organs(path: Path) -> dict[int, IcrpOrgan]:
    """Parse AM_organs.dat: organ ID -> name, tissue (media) number, density.

    Adds ICRP_END_SKIN when the file lacks it.
    """
    row = re.compile(r"^\s*(\d+)\s+(.+?)\s+(\d+)\s+(\d+\.\d*)\s*$")
    end_skin_id, *end_skin = ICRP_END_SKIN
    organs = {end_skin_id: IcrpOrgan(*end_skin)}
    for line in Path(path).read_text(encoding="latin-1").splitlines():
        match = row.match(line)
        if match:
            organs[int(match[1])] = IcrpOrgan(match[2], int(match[3]), float(match[4]))
    return organs


def read_icrp_media(path: Path) -> dict[int, dict[int, float]]:
    """Parse AM_media.dat: tissue number -> {atomic number: mass percent}.

    The first line lists the atomic numbers of the element columns.
    """
    lines = Path(path).read_text(encoding="latin-1").splitlines()
    atomic_numbers = [int(v) for v in lines[0].split()]
    media = {}
    for line in lines[1:]:
        fields = line.split()
        if fields and fields[0].isdigit() and len(fields) > len(atomic_numbers):
            percents = [float(v) for v in fields[-len(atomic_numbers):]]
            media[int(fields[0])] = {z: p for z, p in zip(atomic_numbers, percents) if p > 0}
    return media


def icrp_tissue_hu(icrp_dir: Path) -> dict[int, float]:
    """Native Hounsfield value of every ICRP organ ID, from density and composition.

    Also ID 0 (air outside the body) and ICRP_AORTA_ID (blood, like ID 10).
    """
    icrp_dir = Path(icrp_dir)
    organs = read_icrp_organs(icrp_dir / "AM_organs.dat")
    media = read_icrp_media(icrp_dir / "AM_media.dat")
    hu = {organ_id: hounsfield_from_composition(organ.density_g_cm3, media[organ.tissue_number])
          for organ_id, organ in organs.items()}
    hu[0] = AIR_HU
    hu[ICRP_AORTA_ID] = hu[ICRP_VESSELS_TRUNK_ID]
    return hu


def _check_icrp_orientation(ids: np.ndarray) -> None:
    """Raise unless the (z, y, x) array has x -> patient left, y -> posterior, z -> superior.

    Checked against anatomy: the liver lies on the patient's right and the
    spleen on the left; the spine is posterior to the body's centre; the brain
    is above the urinary bladder.
    """
    liver_x = np.argwhere(ids == ICRP_LIVER_ID)[:, 2].mean()
    spleen_x = np.argwhere(ids == ICRP_SPLEEN_ID)[:, 2].mean()
    spine_y = np.argwhere(np.isin(ids, ICRP_SPINE_IDS))[:, 1].mean()
    body_y = np.argwhere(ids > 0)[:, 1].mean()
    brain_z = np.argwhere(ids == ICRP_BRAIN_ID)[:, 0].mean()
    bladder_z = np.argwhere(np.isin(ids, ICRP_BLADDER_IDS))[:, 0].mean()
    if not (liver_x < spleen_x and spine_y > body_y and brain_z > bladder_z):
        raise ValueError("ICRP phantom axes are not x=right->left, y=anterior->posterior, "
                         "z=feet->head; the file differs from the one this code was written for")


def _extract_aorta(ids: np.ndarray) -> np.ndarray:
    """Boolean mask of the aorta inside ICRP "Blood vessels, trunk" (ID 10).

    ids: (z, y, x) organ IDs. Seeded at the kidneys' mid level with the largest
    vessel cross-section on the patient's left of the spine and anterior to it
    (the abdominal aorta; the vena cava lies on the right), then followed slice
    by slice up and down through overlapping vessel cross-sections. Tracking
    stops where the cross-section falls below half the seed's area: at the iliac
    bifurcation below and where the arch leaves the trunk vessels above.
    """
    vessels = ids == ICRP_VESSELS_TRUNK_ID
    spine = np.isin(ids, ICRP_SPINE_IDS)
    seed_z = int(round(np.argwhere(np.isin(ids, ICRP_KIDNEY_IDS))[:, 0].mean()))
    spine_y, spine_x = np.argwhere(spine[seed_z]).mean(axis=0)
    components, count = ndimage.label(vessels[seed_z])
    candidates = []
    for index in range(1, count + 1):
        cy, cx = np.argwhere(components == index).mean(axis=0)
        if cx > spine_x and cy < spine_y:
            candidates.append(((components == index).sum(), index))
    if not candidates:
        raise ValueError("no aorta candidate at the kidneys' level")
    seed_area, seed_index = max(candidates)
    aorta = np.zeros_like(vessels)
    aorta[seed_z] = components == seed_index
    for step in (1, -1):
        previous = aorta[seed_z]
        z = seed_z + step
        while 0 <= z < ids.shape[0]:
            components, _ = ndimage.label(vessels[z])
            overlap = components[ndimage.binary_dilation(previous) & (components > 0)]
            if overlap.size == 0:
                break
            current = components == np.bincount(overlap).argmax()
            if current.sum() < 0.5 * seed_area:
                break
            aorta[z] = current
            previous = current
            z += step
    return aorta


def load_icrp_phantom(icrp_dir: Path) -> sitk.Image:
    """ICRP 110 adult male organ-ID map, whole body, on its native grid, in LPS.

    Returns a uint8 image of size (x, y, z) = (254, 127, 222), spacing
    (2.137, 2.137, 8.0) mm, identity direction: the array axes already run
    right->left, anterior->posterior and feet->head (checked against the
    anatomy at load). The aorta is relabelled ICRP_AORTA_ID.
    """
    ids = np.load(Path(icrp_dir) / "AM_organ_ids.npz")["ids"].astype(np.uint8)
    _check_icrp_orientation(ids)
    ids[_extract_aorta(ids)] = ICRP_AORTA_ID
    image = sitk.GetImageFromArray(ids)
    image.SetSpacing(ICRP_SPACING_MM)
    return image


def icrp_abdomen_tissues(icrp_dir: Path, spacing_mm: Sequence[float] = (4.0, 4.0, 4.0), *,
                         below_mm: float = 40.0, above_mm: float = 24.0) -> sitk.Image:
    """ICRP organ-ID map of the abdomen, resampled to spacing_mm, cropped to the body.

    The slab runs from below_mm under the lowest to above_mm over the highest
    solid abdominal target organ (kidney lower poles to liver dome; the aorta
    runs on into the chest), like an upper abdominal CT. Returns a uint8 image
    (x, y, z) of ICRP organ IDs (plus ICRP_AORTA_ID), 0 outside the body.
    """
    phantom = load_icrp_phantom(icrp_dir)
    ids = sitk.GetArrayViewFromImage(phantom)
    target_ids = [i for _, organ_ids in ICRP_ABDOMEN_LABELS.values() for i in organ_ids
                  if i != ICRP_AORTA_ID]
    z_slices = np.argwhere(np.isin(ids, target_ids).any(axis=(1, 2)))[:, 0]
    z_step = ICRP_SPACING_MM[2]
    low = max(0, int(z_slices.min() - np.ceil(below_mm / z_step)))
    high = min(ids.shape[0], int(z_slices.max() + np.ceil(above_mm / z_step)) + 1)
    slab = crop_to_foreground(phantom[:, :, low:high], margin_mm=8.0)
    return resample_labels(slab, spacing_mm)


def icrp_abdomen_labels(organ_ids: sitk.Image) -> tuple[sitk.Image, dict[int, str]]:
    """Abdomen target labels from an ICRP organ-ID map (same grid).

    Returns (labels uint8 with values 0..10, {value: name} including 0:
    background); every other organ is background.
    """
    mapping = {i: value for value, (_, ids) in ICRP_ABDOMEN_LABELS.items() for i in ids}
    names = {0: "background", **{value: name for value, (name, _) in ICRP_ABDOMEN_LABELS.items()}}
    return relabel(organ_ids, mapping), names


# --------------------------------------------------------------------------
# Head and neck: organ masks of Nikolov et al. plus generated anatomy
# --------------------------------------------------------------------------

#: Label values 1..21 in the order of the dataset's organ list.
HEADNECK_ORGANS = (
    "Brain", "Brainstem", "Cochlea-Lt", "Cochlea-Rt", "Lacrimal-Lt", "Lacrimal-Rt",
    "Lens-Lt", "Lens-Rt", "Lung-Lt", "Lung-Rt", "Mandible", "Optic-Nerve-Lt",
    "Optic-Nerve-Rt", "Orbit-Lt", "Orbit-Rt", "Parotid-Lt", "Parotid-Rt",
    "Spinal-Canal", "Spinal-Cord", "Submandibular-Lt", "Submandibular-Rt",
)
HEADNECK_LABEL = {name: value for value, name in enumerate(HEADNECK_ORGANS, start=1)}
# Masks overlap where one organ contains another (lens in orbit, cord in
# canal); later entries win so that the inner organ keeps its label.
_HEADNECK_PAINT_ORDER = (
    "Lung-Lt", "Lung-Rt", "Brain", "Mandible", "Parotid-Lt", "Parotid-Rt",
    "Submandibular-Lt", "Submandibular-Rt", "Spinal-Canal", "Orbit-Lt", "Orbit-Rt",
    "Brainstem", "Spinal-Cord", "Optic-Nerve-Lt", "Optic-Nerve-Rt", "Lacrimal-Lt",
    "Lacrimal-Rt", "Cochlea-Lt", "Cochlea-Rt", "Lens-Lt", "Lens-Rt",
)


class HeadNeckTissue(IntEnum):
    """Tissue IDs added around the organ masks (organs keep values 1..21)."""

    SOFT_TISSUE = 101  # muscle and other soft tissue filling the body
    FAT = 102  # subcutaneous and orbital fat
    SKULL = 103
    PETROUS_BONE = 104  # dense temporal bone around the cochleae
    VERTEBRAL_BODY = 105  # cancellous bone
    VERTEBRAL_CORTEX = 106  # rim of the body, arch and spinous process
    DISC = 107  # intervertebral disc
    CSF = 108  # cerebrospinal fluid between brain and skull
    AIRWAY = 109  # pharynx, larynx, trachea


# Native (unenhanced) CT values at 120 kVp, HU. Sources: the tissue-density
# table of Hofer, "CT Teaching Manual" (Thieme) for brain (grey ~40, white
# ~25), muscle (~45), fat (-65 to -100), lung (-850 range), compact and
# cancellous bone; the dense crystalline lens is ~100-130 HU and the vitreous
# close to water in published orbital CT measurements; parotid glands are
# fatty (about -20 to +30 HU, decreasing with age) and submandibular glands
# denser (~40-50 HU) in published salivary-gland CT densitometry. Brain is the
# grey/white average; the spinal canal mask is mostly CSF with epidural fat.
HEADNECK_TISSUE_HU: dict[int, float] = {
    0: AIR_HU,
    HEADNECK_LABEL["Brain"]: 35.0,
    HEADNECK_LABEL["Brainstem"]: 30.0,
    HEADNECK_LABEL["Cochlea-Lt"]: 20.0,  # fluid-filled labyrinth inside dense bone
    HEADNECK_LABEL["Cochlea-Rt"]: 20.0,
    HEADNECK_LABEL["Lacrimal-Lt"]: 50.0,
    HEADNECK_LABEL["Lacrimal-Rt"]: 50.0,
    HEADNECK_LABEL["Lens-Lt"]: 110.0,
    HEADNECK_LABEL["Lens-Rt"]: 110.0,
    HEADNECK_LABEL["Lung-Lt"]: -850.0,
    HEADNECK_LABEL["Lung-Rt"]: -850.0,
    HEADNECK_LABEL["Mandible"]: 800.0,  # cortical shell with marrow inside
    HEADNECK_LABEL["Optic-Nerve-Lt"]: 30.0,
    HEADNECK_LABEL["Optic-Nerve-Rt"]: 30.0,
    HEADNECK_LABEL["Orbit-Lt"]: 10.0,  # the globe: mostly vitreous
    HEADNECK_LABEL["Orbit-Rt"]: 10.0,
    HEADNECK_LABEL["Parotid-Lt"]: 10.0,
    HEADNECK_LABEL["Parotid-Rt"]: 10.0,
    HEADNECK_LABEL["Spinal-Canal"]: 10.0,
    HEADNECK_LABEL["Spinal-Cord"]: 35.0,
    HEADNECK_LABEL["Submandibular-Lt"]: 45.0,
    HEADNECK_LABEL["Submandibular-Rt"]: 45.0,
    HeadNeckTissue.SOFT_TISSUE: 45.0,
    HeadNeckTissue.FAT: -100.0,
    HeadNeckTissue.SKULL: 1000.0,
    HeadNeckTissue.PETROUS_BONE: 1300.0,
    HeadNeckTissue.VERTEBRAL_BODY: 250.0,
    HeadNeckTissue.VERTEBRAL_CORTEX: 700.0,
    HeadNeckTissue.DISC: 80.0,
    HeadNeckTissue.CSF: 8.0,
    HeadNeckTissue.AIRWAY: AIR_HU,
}

# Venous-phase enhancement (~60-90 s after injection, the usual contrast
# planning CT): glands and muscle enhance, the brain behind the blood-brain
# barrier hardly at all, fluids, fat, bone cortex and the lens not at all.
HEADNECK_ENHANCEMENT_HU: dict[str, dict[int, float]] = {
    "native": {},
    "venous": {
        HEADNECK_LABEL["Parotid-Lt"]: 30.0, HEADNECK_LABEL["Parotid-Rt"]: 30.0,
        HEADNECK_LABEL["Submandibular-Lt"]: 40.0, HEADNECK_LABEL["Submandibular-Rt"]: 40.0,
        HEADNECK_LABEL["Lacrimal-Lt"]: 40.0, HEADNECK_LABEL["Lacrimal-Rt"]: 40.0,
        HEADNECK_LABEL["Brain"]: 3.0, HEADNECK_LABEL["Brainstem"]: 3.0,
        HEADNECK_LABEL["Optic-Nerve-Lt"]: 5.0, HEADNECK_LABEL["Optic-Nerve-Rt"]: 5.0,
        HEADNECK_LABEL["Spinal-Cord"]: 3.0, HEADNECK_LABEL["Lung-Lt"]: 10.0,
        HEADNECK_LABEL["Lung-Rt"]: 10.0, HeadNeckTissue.SOFT_TISSUE: 15.0,
        HeadNeckTissue.VERTEBRAL_BODY: 20.0,
    },
}


def _read_headneck_mask(scan_dir: Path, organ: str) -> sitk.Image:
    """Read one organ mask; some scans spell names with '_' instead of '-'."""
    for name in (organ, organ.replace("-", "_")):
        path = Path(scan_dir) / f"{name}.nrrd"
        if path.exists():
            return sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    raise FileNotFoundError(f"{organ}.nrrd not found in {scan_dir}")


def headneck_labels(scan_dir: Path, spacing_mm: Sequence[float] = (2.0, 2.0, 2.5), *,
                    margin_mm: float = 50.0, above_brain_mm: float = 25.0,
                    below_lung_apex_mm: float = 80.0) -> tuple[sitk.Image, dict[int, str]]:
    """Label map of the 21 organs of one head-and-neck scan, values as HEADNECK_LABEL.

    The masks (about 1 x 1 x 2.5 mm, 512 x 512 x ~150) are painted into one
    map (inner organs win where masks overlap), cropped to the organs plus
    margin_mm in-plane, from above_brain_mm over the brain down to
    below_lung_apex_mm under the lung apices (a typical head-and-neck planning
    range; scan 0522c0727 also covers the abdomen), and resampled to
    spacing_mm (x, y, z). Returns (uint8 image in LPS, {value: name} with
    0: background).
    """
    reference = _read_headneck_mask(scan_dir, HEADNECK_ORGANS[0])
    painted = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint8)
    for organ in _HEADNECK_PAINT_ORDER:
        mask = sitk.GetArrayFromImage(_read_headneck_mask(scan_dir, organ)) > 0
        painted[mask] = HEADNECK_LABEL[organ]
    labels = sitk.GetImageFromArray(painted)
    labels.CopyInformation(reference)

    spacing_zyx = np.array(reference.GetSpacing())[::-1]
    occupied = np.argwhere(painted > 0)
    lower = occupied.min(axis=0)
    upper = occupied.max(axis=0) + 1
    brain_z = np.argwhere((painted == HEADNECK_LABEL["Brain"]).any(axis=(1, 2)))[:, 0]
    if brain_z.size:
        upper[0] = brain_z.max() + 1 + int(np.ceil(above_brain_mm / spacing_zyx[0]))
    lung = np.isin(painted, (HEADNECK_LABEL["Lung-Lt"], HEADNECK_LABEL["Lung-Rt"]))
    lung_z = np.argwhere(lung.any(axis=(1, 2)))[:, 0]
    if lung_z.size:
        lower[0] = max(lower[0], lung_z.max() - int(np.ceil(below_lung_apex_mm / spacing_zyx[0])))
    margin = np.ceil(margin_mm / spacing_zyx).astype(int)
    lower[1:] -= margin[1:]
    upper[1:] += margin[1:]
    lower = np.maximum(lower, 0)
    upper = np.minimum(upper, painted.shape)
    cropped = labels[int(lower[2]):int(upper[2]), int(lower[1]):int(upper[1]),
                     int(lower[0]):int(upper[0])]
    names = {0: "background", **{value: name for name, value in HEADNECK_LABEL.items()}}
    return resample_labels(cropped, spacing_mm), names


def _ellipse(shape: Sequence[int], center: Sequence[float],
             semi_axes: Sequence[float]) -> np.ndarray:
    """Boolean 2D ellipse (rows, cols); center and semi_axes in voxel units (row, col)."""
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (((rows - center[0]) / semi_axes[0]) ** 2
            + ((cols - center[1]) / semi_axes[1]) ** 2) <= 1.0


def _fill_convex_hull(mask2d: np.ndarray) -> np.ndarray:
    """Filled 2D convex hull of a boolean slice (empty stays empty)."""
    points = np.argwhere(mask2d)
    if len(points) < 4 or np.linalg.matrix_rank(points - points[0]) < 2:
        return mask2d.copy()
    # Inside the hull = on the inner side of every facet (normal . p + offset <= 0).
    facets = spatial.ConvexHull(points).equations
    grid = np.indices(mask2d.shape).reshape(2, -1).T
    inside = (grid @ facets[:, :2].T + facets[:, 2] <= 1e-6).all(axis=1)
    return inside.reshape(mask2d.shape) | mask2d


def headneck_tissues(labels: sitk.Image) -> sitk.Image:
    """Tissue map: head-and-neck organ labels plus generated skull, spine, airway and body.

    labels: organ label map from ``headneck_labels`` (LPS, identity direction,
    values 1..21). Organ voxels keep their values; generated tissues
    (HeadNeckTissue IDs) only fill unlabelled voxels, geometrically:

    * CSF: 0-2 mm outside brain and brainstem; skull: 2-9 mm outside them,
      open at the foramen magnum around the spinal canal;
    * petrous bone: 9 mm ball around each cochlea;
    * vertebrae on every slice with spinal canal: a 4 mm cortical ring around
      the canal, a cancellous body (18 x 16 mm ellipse, cortical rim) in front
      of it, a spinous process behind, and a 5 mm disc every 20 mm;
    * airway: 7 mm radius tube 14 mm in front of the vertebral bodies, from
      the bottom of the volume up to the middle of the mandible;
    * body outline: per-slice convex hull of everything (with a neck-sized
      ellipse around the spinal canal) and, over the midface, of each sagittal
      slice; smoothed and dilated 8 mm. 2-6 mm under the skin is fat, so is a
      6 mm layer around the globes; the rest of the body is soft tissue.
    """
    if not np.allclose(labels.GetDirection(), np.eye(3).ravel()):
        raise ValueError("head-and-neck labels must be axis-aligned LPS "
                         "(use sitk.DICOMOrient(labels, 'LPS'))")
    organs = sitk.GetArrayFromImage(labels)
    tissues = organs.astype(np.uint8)
    sz, sy, sx = np.array(labels.GetSpacing())[::-1]
    spacing_zyx = (sz, sy, sx)

    def paint(mask: np.ndarray, tissue: HeadNeckTissue) -> None:
        tissues[mask & (tissues == 0)] = tissue

    def distance_outside(mask: np.ndarray) -> np.ndarray:
        if not mask.any():
            return np.full(mask.shape, np.inf)
        return ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)

    canal = np.isin(organs, (HEADNECK_LABEL["Spinal-Canal"], HEADNECK_LABEL["Spinal-Cord"]))
    intracranial = np.isin(organs, (HEADNECK_LABEL["Brain"], HEADNECK_LABEL["Brainstem"]))
    from_brain = distance_outside(intracranial)
    foramen = distance_outside(canal) <= 6.0
    paint((from_brain > 0) & (from_brain <= 2.0), HeadNeckTissue.CSF)
    paint((from_brain > 2.0) & (from_brain <= 9.0) & ~foramen, HeadNeckTissue.SKULL)

    for cochlea in ("Cochlea-Lt", "Cochlea-Rt"):
        paint(distance_outside(organs == HEADNECK_LABEL[cochlea]) <= 9.0,
              HeadNeckTissue.PETROUS_BONE)

    mandible_z = np.argwhere(organs == HEADNECK_LABEL["Mandible"])[:, 0]
    airway_top = mandible_z.mean() if mandible_z.size else -1
    canal_top = np.argwhere(canal.any(axis=(1, 2)))[:, 0].max() if canal.any() else 0
    neck = np.zeros_like(canal)
    for z in np.argwhere(canal.any(axis=(1, 2)))[:, 0]:
        cy, cx = np.argwhere(canal[z]).mean(axis=0)
        radius = np.sqrt(canal[z].sum() * sy * sx / np.pi)  # mm
        ring = ndimage.distance_transform_edt(~canal[z], sampling=(sy, sx)) <= 4.0
        body_y = cy - (radius + 3.0 + 8.0) / sy  # anterior is -y
        body = _ellipse(ring.shape, (body_y, cx), (8.0 / sy, 9.0 / sx))
        spinous = _ellipse(ring.shape, (cy + (radius + 13.0) / sy, cx), (9.0 / sy, 2.5 / sx))
        slab = tissues[z]  # a view: painting it paints the volume
        cortex = (ring | spinous | (body & ~ndimage.binary_erosion(body))) & ~canal[z]
        is_disc = ((canal_top - z) * sz) % 20.0 < 5.0
        slab[body & ~cortex & (slab == 0)] = (HeadNeckTissue.DISC if is_disc
                                              else HeadNeckTissue.VERTEBRAL_BODY)
        slab[cortex & (slab == 0)] = HeadNeckTissue.VERTEBRAL_CORTEX
        if z < airway_top:
            airway = _ellipse(ring.shape, (body_y - (8.0 + 14.0) / sy, cx), (7.0 / sy, 7.0 / sx))
            slab[airway & (slab == 0)] = HeadNeckTissue.AIRWAY
        # A neck about 120 mm wide reaching 40 mm behind and 70 mm in front of the canal.
        neck[z] = _ellipse(ring.shape, (cy - 15.0 / sy, cx), (55.0 / sy, 60.0 / sx))

    hull = np.stack([_fill_convex_hull(s) for s in (tissues > 0) | neck])
    # No mask covers the midface (maxilla, nose): between the lowest mandible
    # and the highest orbit slice, also fill each sagittal slice's hull.
    orbits = np.isin(organs, (HEADNECK_LABEL["Orbit-Lt"], HEADNECK_LABEL["Orbit-Rt"]))
    if mandible_z.size and orbits.any():
        face = slice(int(mandible_z.min()), int(np.argwhere(orbits)[:, 0].max()) + 1)
        for x in range(hull.shape[2]):
            hull[face, :, x] |= _fill_convex_hull(hull[face, :, x])
    hull = ndimage.gaussian_filter(hull.astype(np.float32), (4.0 / sz, 2.0 / sy, 2.0 / sx)) >= 0.5
    body = distance_outside(hull) <= 8.0
    depth = ndimage.distance_transform_edt(body, sampling=spacing_zyx)
    paint(body & (((depth > 2.0) & (depth <= 6.0)) | (distance_outside(orbits) <= 6.0)),
          HeadNeckTissue.FAT)
    paint(body, HeadNeckTissue.SOFT_TISSUE)

    out = sitk.GetImageFromArray(tissues)
    out.CopyInformation(labels)
    return out


def headneck_scan_tissues(scan_dir: Path,
                          spacing_mm: Sequence[float] = (2.0, 2.0, 2.5)) -> sitk.Image:
    """Tissue map of one head-and-neck scan, cropped to the body plus 10 mm.

    ``headneck_labels`` then ``headneck_tissues``; uint8, LPS, spacing_mm (x, y, z).
    """
    return crop_to_foreground(headneck_tissues(headneck_labels(scan_dir, spacing_mm)[0]),
                              margin_mm=10.0)


def scans_by_patient(scans: Iterable[str]) -> dict[str, list[str]]:
    """Patient -> its scans (sorted). Scans named like 0522c0727a / 0522c0727b (a trailing letter
    after the patient number) are scans of one patient."""
    by_patient: dict[str, list[str]] = {}
    for scan in sorted(scans):
        by_patient.setdefault(re.sub(r"(?<=\d)[a-z]$", "", scan), []).append(scan)
    return by_patient


def headneck_patient_folds(scans: Iterable[str], folds: int, seed: int) -> list[list[str]]:
    """Scan names dealt into `folds` folds by patient, reproducibly: a patient's scans share a fold,
    and the folds differ in size by at most one patient's scans (each patient, in a seeded order,
    goes to the fold with the fewest scans so far). Returns the folds' sorted scan lists."""
    by_patient = scans_by_patient(scans)
    if not 2 <= folds <= len(by_patient):
        raise ValueError(f"{folds} folds need from 2 to {len(by_patient)} patients' worth of folds")
    patients = sorted(by_patient)
    dealt: list[list[str]] = [[] for _ in range(folds)]
    for index in np.random.default_rng(seed).permutation(len(patients)):
        smallest = min(range(folds), key=lambda k: (len(dealt[k]), k))
        dealt[smallest] += by_patient[patients[index]]
    return [sorted(fold) for fold in dealt]


def headneck_patient_split(scans: Iterable[str], seed: int,
                           test_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """Split scan names into (train, test) by patient, reproducibly.

    Scans named like 0522c0727a / 0522c0727b (a trailing letter after the
    patient number) belong to one patient and always land on the same side.
    At least one patient goes to each side when there are two or more.
    """
    by_patient = scans_by_patient(scans)
    patients = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = int(round(test_fraction * len(patients)))
    if len(patients) >= 2:
        n_test = min(max(n_test, 1), len(patients) - 1)
    test_patients = {patients[i] for i in order[:n_test]}
    train = [s for p in patients if p not in test_patients for s in by_patient[p]]
    test = [s for p in patients if p in test_patients for s in by_patient[p]]
    return train, test


# --------------------------------------------------------------------------
# One synthetic case
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSettings:
    """Acquisition and anatomy variation of one synthetic case."""

    phase: str
    noise_hu: float
    psf_fwhm_mm: float
    max_deform_mm: float
    fov_min_fraction: tuple[float, float, float]


def draw_case_settings(rng: np.random.Generator, phases: Sequence[str],
                       noise_range_hu: tuple[float, float] = (10.0, 40.0),
                       psf_range_mm: tuple[float, float] = (1.0, 1.5), max_deform_mm: float = 10.0,
                       fov_min_fraction: tuple[float, float, float] = (0.8, 0.8, 0.85),
                       ) -> CaseSettings:
    """Draw a contrast phase (uniform over phases), a noise std and a PSF width (uniform)."""
    return CaseSettings(phase=str(phases[int(rng.integers(len(phases)))]),
                        noise_hu=float(rng.uniform(*noise_range_hu)),
                        psf_fwhm_mm=float(rng.uniform(*psf_range_mm)),
                        max_deform_mm=max_deform_mm, fov_min_fraction=tuple(fov_min_fraction))


def make_case(tissues: sitk.Image, tissue_hu: Mapping[int, float],
              enhancement_by_phase: Mapping[str, Mapping[int, float]],
              target_mapping: Mapping[int, int], settings: CaseSettings,
              rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic case: deform the tissue map, crop the field of view, synthesise CT.

    Returns (image float32 HU, target labels uint8) on the same grid; the labels
    are target_mapping applied to the deformed, cropped tissue map.
    """
    if settings.max_deform_mm > 0:
        tissues = elastic_deform(tissues, rng, settings.max_deform_mm)
    tissues = crop_fov(tissues, rng, settings.fov_min_fraction)
    image = synthesize_ct(tissues, tissue_hu, rng,
                          enhancement_hu=enhancement_by_phase[settings.phase],
                          psf_fwhm_mm=settings.psf_fwhm_mm, noise_hu=settings.noise_hu)
    return image, relabel(tissues, target_mapping)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

_ICRP_DESCRIPTION = ("Synthetic abdominal CT from the ICRP Publication 110 adult male phantom "
                     "(HU from composition; elastic, phase, noise and field-of-view variation)")
_HEADNECK_DESCRIPTION = ("Synthetic head-and-neck CT from the organ masks of Nikolov et al. 2021 "
                         "(google-deepmind/tcia-ct-scan-dataset, CC BY 4.0), generated skull, "
                         "spine and body")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("icrp", "headneck"), required=True)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, outside the repository "
                             "(default ~/.cache/isseg-benchmarks/synthetic-<dataset>-seed<S>)")
    parser.add_argument("--cases", type=int, default=None,
                        help="number of cases (default: 8 for icrp, one per selected scan "
                             "for headneck; more cycles through the scans)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder holding icrp110/ and headneck_contours/")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="voxel size in mm (default 4 4 4 for icrp, 2 2 2.5 for headneck)")
    parser.add_argument("--phases", nargs="+", default=None,
                        help="contrast phases to draw from (icrp: native arterial portal_venous; "
                             "headneck: native venous; default all)")
    parser.add_argument("--noise-hu", type=float, nargs=2, default=(10.0, 40.0),
                        metavar=("MIN", "MAX"), help="noise std range in HU")
    parser.add_argument("--max-deform-mm", type=float, default=None,
                        help="largest elastic displacement (default 15 icrp, 8 headneck)")
    parser.add_argument("--fov-min-fraction", type=float, nargs=3, default=(0.8, 0.8, 0.85),
                        metavar=("X", "Y", "Z"), help="smallest kept fraction of each axis")
    parser.add_argument("--annotator", choices=("oncologist", "radiographer"),
                        default="oncologist", help="headneck: whose contours to use")
    parser.add_argument("--split", choices=("all", "train", "test"), default="all",
                        help="headneck: which patient-level split to generate")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--split-seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate a synthetic dataset; see --help."""
    args = _parse_args(argv)
    out = (args.out or DEFAULT_CACHE_DIR / f"synthetic-{args.dataset}-seed{args.seed}").expanduser()
    if out.resolve().is_relative_to(REPO_ROOT):
        print(f"error: {out} is inside the repository; generated data belongs in a cache "
              "folder outside it", file=sys.stderr)
        return 2

    if args.dataset == "icrp":
        icrp_dir = args.data_dir / "icrp110"
        spacing = args.spacing or (4.0, 4.0, 4.0)
        abdomen = icrp_abdomen_tissues(icrp_dir, spacing)
        scan_order = ["icrp"]
        load_tissues = {"icrp": abdomen}.__getitem__
        tissue_hu = icrp_tissue_hu(icrp_dir)
        phases_table = ICRP_ENHANCEMENT_HU
        target = {i: value for value, (_, ids) in ICRP_ABDOMEN_LABELS.items() for i in ids}
        names = icrp_abdomen_labels(abdomen)[1]
        n_cases = args.cases or 8
        max_deform = 15.0 if args.max_deform_mm is None else args.max_deform_mm
        description = _ICRP_DESCRIPTION
    else:
        scans_dir = args.data_dir / "headneck_contours" / args.annotator
        all_scans = sorted(p.name for p in scans_dir.iterdir() if p.is_dir())
        train, test = headneck_patient_split(all_scans, args.split_seed, args.test_fraction)
        scan_order = {"all": all_scans, "train": train, "test": test}[args.split]
        spacing = args.spacing or (2.0, 2.0, 2.5)

        def load_tissues(scan: str) -> sitk.Image:
            return headneck_scan_tissues(scans_dir / scan, spacing)

        tissue_hu = HEADNECK_TISSUE_HU
        phases_table = HEADNECK_ENHANCEMENT_HU
        target = {value: value for value in HEADNECK_LABEL.values()}
        names = {0: "background", **{value: name for name, value in HEADNECK_LABEL.items()}}
        n_cases = args.cases or len(scan_order)
        max_deform = 8.0 if args.max_deform_mm is None else args.max_deform_mm
        description = _HEADNECK_DESCRIPTION

    phases = args.phases or list(phases_table)
    unknown = sorted(set(phases) - set(phases_table))
    if unknown:
        print(f"error: unknown phases {unknown}; choose from {list(phases_table)}", file=sys.stderr)
        return 2

    tissues_by_scan: dict[str, sitk.Image] = {}
    training, synthesis = [], {}
    for index in range(n_cases):
        started = time.perf_counter()
        scan = scan_order[index % len(scan_order)]
        if scan not in tissues_by_scan:
            tissues_by_scan[scan] = load_tissues(scan)
        rng = np.random.default_rng([args.seed, index])
        settings = draw_case_settings(rng, phases, tuple(args.noise_hu), max_deform_mm=max_deform,
                                      fov_min_fraction=tuple(args.fov_min_fraction))
        image, labels = make_case(tissues_by_scan[scan], tissue_hu, phases_table, target,
                                  settings, rng)
        case_id = f"headneck_{scan}_{index:03d}" if args.dataset == "headneck" \
            else f"icrp_{index:03d}"
        training.append(write_msd_case(out, case_id, image, labels))
        synthesis[case_id] = {"source": scan, "seed": [args.seed, index], **asdict(settings)}
        print(f"{case_id}: {settings.phase}, noise {settings.noise_hu:.0f} HU, "
              f"size {image.GetSize()}, {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(write_msd_dataset_json(out, f"synthetic-{args.dataset}", description, names, training,
                                 synthesis=synthesis))
    return 0


if __name__ == "__main__":
    sys.exit(main())
