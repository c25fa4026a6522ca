"""Procedural abdominal CT phantoms with known organ labels, for tests and the built-in demo.

A phantom is an axial-ish slab of an abdomen: body outline, subcutaneous fat, a muscle wall,
a vertebral column with spinal canal, bowel with gas pockets, and six organs (liver, spleen,
kidneys, aorta, gallbladder) of random size, position and shape. Anatomy is drawn as implicit
shapes in millimetres, evaluated at coordinates moved by a smooth random displacement field, so
labels and image deform together. Intensities are Hounsfield units for a chosen contrast phase,
with texture, scanner blur and noise.

Everything is driven by one seed: the same `PhantomSpec` gives the same voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .datasets import write_msd_case, write_msd_dataset_json
from .io import write_image_atomic
from .terminology import describe_label

ORGAN_NAMES = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "gallbladder")
LABELS: list[dict] = [describe_label(value, name) for value, name in enumerate(ORGAN_NAMES, start=1)]

# Mean HU per tissue and contrast phase (typical adult values: native / late arterial / portal venous).
PHASE_HU: dict[str, dict[str, float]] = {
    "native": {"liver": 58, "spleen": 48, "kidney": 32, "aorta": 42, "gallbladder": 8,
               "muscle": 50, "fat": -100, "bowel": 25, "bone": 420, "cortical_bone": 800, "canal": 15},
    "arterial": {"liver": 75, "spleen": 115, "kidney": 175, "aorta": 280, "gallbladder": 10,
                 "muscle": 58, "fat": -100, "bowel": 35, "bone": 430, "cortical_bone": 800, "canal": 15},
    "portal": {"liver": 110, "spleen": 120, "kidney": 155, "aorta": 160, "gallbladder": 12,
               "muscle": 60, "fat": -100, "bowel": 40, "bone": 430, "cortical_bone": 800, "canal": 15},
}
AIR_HU = -1000.0
GAS_HU = -850.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. Sizes are voxels (x, y, z), spacing and distances mm, intensities HU."""

    seed: int = 0
    size: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    phase: str = "portal"
    noise_hu: float = 15.0
    contrast_jitter_hu: float = 8.0
    anatomy_jitter: float = 1.0
    deformation_mm: float = 6.0
    fov_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_mm: float = 2.0
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)


@dataclass
class Phantom:
    """A generated case: `image` in HU (float32) and `labels` (uint8, values of LABELS) on one grid."""

    image: sitk.Image
    labels: sitk.Image
    spec: PhantomSpec


def training_spec(seed: int, **changes) -> PhantomSpec:
    """The distribution the demo model is trained on: portal venous phase, moderate noise, typical anatomy."""
    return replace(PhantomSpec(seed=seed, phase="portal", noise_hu=15.0, anatomy_jitter=1.0), **changes)


def shifted_spec(seed: int, **changes) -> PhantomSpec:
    """A case unlike the training data: late arterial phase, more noise, larger anatomical variation,
    shifted field of view (the shift that inference-specific learning addresses)."""
    rng = np.random.default_rng(seed + 7919)
    fov_shift = tuple(float(v) for v in rng.uniform(-16, 16, size=3))
    return replace(
        PhantomSpec(seed=seed, phase="arterial", noise_hu=28.0, anatomy_jitter=1.6,
                    deformation_mm=9.0, fov_shift_mm=fov_shift),
        **changes,
    )


def generate(spec: PhantomSpec) -> Phantom:
    """Generate the phantom described by `spec`."""
    rng = np.random.default_rng(spec.seed)
    hu = _phase_values(spec, rng)
    points = _deformed_coordinates(spec, rng)
    tissue, labels = _draw_anatomy(points, spec, rng)
    image = _intensities(tissue, labels, hu, spec, rng)
    image_itk = sitk.GetImageFromArray(image.astype(np.float32))
    image_itk.SetSpacing(spec.spacing)
    image_itk.SetDirection(spec.direction)
    # Centre the volume on the physical origin so the phantom sits where a scanner puts a patient.
    centre_index = [(s - 1) / 2 for s in spec.size]
    offset = np.array(image_itk.TransformContinuousIndexToPhysicalPoint(centre_index))
    image_itk.SetOrigin(tuple(-offset))
    labels_itk = sitk.GetImageFromArray(labels)
    labels_itk.CopyInformation(image_itk)
    return Phantom(image=image_itk, labels=labels_itk, spec=spec)


def _phase_values(spec: PhantomSpec, rng: np.random.Generator) -> dict[str, float]:
    values = dict(PHASE_HU[spec.phase])
    for tissue in values:
        if tissue not in ("fat", "bone", "cortical_bone"):
            values[tissue] += rng.normal(0, spec.contrast_jitter_hu)
    return values


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, control_points: int = 5) -> np.ndarray:
    """A smooth random field in [-1, 1]-ish of `shape`, from cubic interpolation of a coarse grid."""
    coarse = rng.uniform(-1, 1, size=(control_points,) * 3)
    zoom = [s / control_points for s in shape]
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]


def _deformed_coordinates(spec: PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    """(3, z, y, x) physical coordinates in mm (x: patient left, y: posterior, z: superior) relative
    to the body centre, moved by a smooth random displacement of up to `deformation_mm`."""
    shape = spec.size[::-1]
    axes = [
        (np.arange(n) - (n - 1) / 2) * s - shift
        for n, s, shift in zip(spec.size, spec.spacing, spec.fov_shift_mm)
    ]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    points = np.stack([x, y, z]).astype(np.float32)
    for axis in range(3):
        points[axis] += spec.deformation_mm * _smooth_field(shape, rng)
    return points


def _ellipsoid(points: np.ndarray, centre, radii) -> np.ndarray:
    x, y, z = points
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 <= 1


def _draw_anatomy(points: np.ndarray, spec: PhantomSpec, rng: np.random.Generator):
    """Returns tissue names per voxel (dict name -> bool mask) and the organ labelmap (uint8, z, y, x)."""
    jitter = spec.anatomy_jitter
    x, y, z = points

    def vary(value: float, relative: float) -> float:
        return value * (1 + rng.normal(0, relative * jitter))

    def shift(value: float, mm: float) -> float:
        return value + rng.normal(0, mm * jitter)

    body_rx, body_ry = vary(150, 0.06), vary(110, 0.06)
    fat_mm = max(6.0, vary(18, 0.25))
    body = (x / body_rx) ** 2 + (y / body_ry) ** 2 <= 1
    inner = (x / (body_rx - fat_mm)) ** 2 + (y / (body_ry - fat_mm)) ** 2 <= 1
    cavity = (x / (body_rx - fat_mm - 10)) ** 2 + (y / (body_ry - fat_mm - 10)) ** 2 <= 1

    spine_y = body_ry - fat_mm - 45
    vertebra = ((x / 20) ** 2 + ((y - spine_y) / 17) ** 2 <= 1)
    disc = np.cos(2 * np.pi * z / 32.0) > 0.85
    canal = (x / 8) ** 2 + ((y - spine_y - 26) / 8) ** 2 <= 1
    lamina = ((x / 26) ** 2 + ((y - spine_y - 26) / 16) ** 2 <= 1) & ~canal
    psoas = (((np.abs(x) - 45) / 20) ** 2 + ((y - spine_y + 5) / 18) ** 2 <= 1) & (z < 40)

    labels = np.zeros(x.shape, dtype=np.uint8)
    liver = _ellipsoid(points, (shift(-60, 8), shift(-5, 8), shift(55, 10)), (vary(78, 0.1), vary(68, 0.1), vary(80, 0.1)))
    liver &= ~(((x - shift(-20, 5)) / 35) ** 2 + ((y + 70) / 30) ** 2 <= 1)
    spleen = _ellipsoid(points, (shift(82, 6), shift(35, 6), shift(65, 8)), (vary(26, 0.15), vary(42, 0.15), vary(48, 0.15)))
    kidney_z = shift(-10, 8)
    kidney_left = _ellipsoid(points, (shift(62, 5), spine_y + shift(0, 4), kidney_z + shift(8, 4)), (vary(26, 0.1), vary(24, 0.1), vary(52, 0.1)))
    kidney_right = _ellipsoid(points, (shift(-62, 5), spine_y + shift(0, 4), kidney_z), (vary(26, 0.1), vary(24, 0.1), vary(52, 0.1)))
    aorta_centre = (shift(14, 3), spine_y - 32)
    aorta_radius = vary(11, 0.1)
    aorta = ((x - aorta_centre[0]) ** 2 + (y - aorta_centre[1]) ** 2 <= aorta_radius ** 2) & (z < 130)
    gallbladder = _ellipsoid(points, (shift(-42, 5), shift(-50, 5), shift(5, 6)), (vary(20, 0.15), vary(18, 0.15), vary(35, 0.15)))

    for value, mask in ((1, liver), (2, spleen), (3, kidney_left), (4, kidney_right), (6, gallbladder), (5, aorta)):
        labels[mask & cavity] = value

    gas = np.zeros_like(body)
    for _ in range(int(rng.integers(4, 9))):
        centre = (rng.uniform(-90, 90), rng.uniform(-80, 10), rng.uniform(-120, 40))
        gas |= _ellipsoid(points, centre, rng.uniform(8, 20, size=3))
    tissue = {
        "body": body, "muscle": inner & ~cavity | psoas, "cavity": cavity,
        "bone": vertebra | lamina, "disc": vertebra & disc, "canal": canal,
        "gas": gas & cavity & ~(vertebra | lamina | psoas),
    }
    return tissue, labels


def _intensities(tissue, labels, hu, spec: PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    shape = labels.shape
    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[tissue["body"]] = hu["fat"]
    image[tissue["muscle"] & tissue["body"]] = hu["muscle"]
    bowel = tissue["cavity"] & (_smooth_field(shape, rng, 9) > -0.2)
    image[bowel] = hu["bowel"]
    image[tissue["gas"]] = GAS_HU
    image[tissue["bone"]] = hu["bone"]
    image[tissue["disc"]] = 90.0
    image[tissue["canal"]] = hu["canal"]
    organ_hu = {1: "liver", 2: "spleen", 3: "kidney", 4: "kidney", 5: "aorta", 6: "gallbladder"}
    for value, name in organ_hu.items():
        image[labels == value] = hu[name]
    # Low-frequency texture inside soft tissue, then the scanner's blur and quantum noise.
    soft = (image > -300) & (image < 300)
    image[soft] += 8.0 * _smooth_field(shape, rng, 12)[soft]
    sigma_voxels = [spec.blur_mm / s for s in spec.spacing[::-1]]
    image = ndimage.gaussian_filter(image, sigma_voxels)
    noise = rng.normal(0, 1, size=shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, 0.5)
    noise *= spec.noise_hu / max(noise.std(), 1e-6)
    return image + noise


def write_case(case: Phantom, folder: Path) -> tuple[Path, Path]:
    """Write `case` into `folder` as ct.nrrd (int16 HU) and truth.nrrd (its labels, uint8); returns both paths."""
    ct_path = write_image_atomic(sitk.Cast(case.image, sitk.sitkInt16), Path(folder) / "ct.nrrd")
    return ct_path, write_image_atomic(case.labels, Path(folder) / "truth.nrrd")


def write_msd_dataset(folder, specs: Sequence[PhantomSpec], name: str = "phantoms") -> Path:
    """Generate one phantom per spec into a Medical Segmentation Decathlon folder (isseg.datasets):
    imagesTr/ and labelsTr/ (`phantom_<seed>.nii.gz`, image in HU as int16) and dataset.json listing
    them as "training" cases, with LABELS as the label names. Returns the folder."""
    training = []
    for spec in specs:
        case = generate(spec)
        training.append(write_msd_case(folder, f"phantom_{spec.seed:03d}", case.image, case.labels))
    names = {0: "background", **{label["value"]: label["name"] for label in LABELS}}
    write_msd_dataset_json(folder, name, "phantoms of isseg.phantom", names, training)
    return Path(folder)
