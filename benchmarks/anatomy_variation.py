"""Patient-to-patient anatomy from one label map: organs resized and moved within population ranges.

The elastic variants of `synthetic_ct.make_case` bend one body; they do not change how big an organ is
or where it sits relative to its neighbours, which is what differs most between patients. Here each
organ of a tissue map is scaled about its centre and displaced, and the tissue around it follows: one
smooth displacement field blends the organs' own similarity transforms (weight 1 inside the moved
organ, falling off over `falloff_mm` outside it), and the map is resampled through it with nearest
neighbour, so every voxel keeps a valid tissue ID and image and labels stay consistent when the CT is
synthesised from the result.

Ranges (ABDOMEN_ORGAN_VARIATION): the standard deviation of each organ's volume, as a fraction of the
mean, and of its position. They were chosen to be of the size that studies of adult organ volumes report.
The values come from memory of that literature and were not checked against the papers here.
Liver volume about 20 % (Heinemann et al., Forensic Sci Int 1999: liver weight of 1.4 to 1.8 kg
in adults). Spleen about 30 % (Prassopoulos et al., Eur Radiol 1997: CT volume 107 to 314 ml about a mean of 215).
Kidneys about 20 % (Emamian et al., AJR 1993: length 11 +- 1 cm). Stomach, pancreas and gallbladder
vary with filling and age, at 25 to 35 %. Organ positions vary by about a vertebral body craniocaudally
(kidneys and spleen with respiration and habitus), less in-plane. Draws are clipped at 2 SD.

Training bodies (TRAINING_ORGAN_VARIATION) are drawn wider than the population, the SynthSeg idea: a
patient must be one more variant, not an outlier. Volumes are drawn log-uniformly in a range that reaches
splenomegaly (the real 20-slice CT beside the project holds a spleen twice as wide as the ICRP man's) and
small, contracted organs; positions with 1.5 times the population SD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

import synthetic_ct as sct


@dataclass(frozen=True)
class OrganVariation:
    """Spread of one organ: SD of its volume as a fraction of the mean; SD of its position (x, y, z mm, LPS
    axes of the map). With `volume_factor_range` the volume factor is drawn log-uniformly in that range
    instead (training bodies), and `volume_cv` only describes the population."""

    volume_cv: float
    position_sd_mm: tuple[float, float, float]
    volume_factor_range: tuple[float, float] | None = None


#: Abdomen label name (synthetic_ct.ICRP_ABDOMEN_LABELS) -> its variation (module docstring). The
#: adrenals and the aorta are not resized: they move with the tissue around them.
ABDOMEN_ORGAN_VARIATION: dict[str, OrganVariation] = {
    "liver": OrganVariation(0.20, (5.0, 5.0, 12.0)),
    "spleen": OrganVariation(0.30, (6.0, 6.0, 12.0)),
    "kidney_left": OrganVariation(0.20, (4.0, 4.0, 12.0)),
    "kidney_right": OrganVariation(0.20, (4.0, 4.0, 12.0)),
    "stomach": OrganVariation(0.35, (6.0, 6.0, 10.0)),
    "pancreas": OrganVariation(0.25, (4.0, 4.0, 6.0)),
    "gallbladder": OrganVariation(0.30, (5.0, 5.0, 8.0)),
}
CLIP_SD = 2.0
TRAINING_POSITION_SD_FACTOR = 1.5
#: Name -> (smallest, largest) volume factor of the training bodies (module docstring).
TRAINING_VOLUME_FACTOR_RANGE: dict[str, tuple[float, float]] = {
    "liver": (0.6, 1.8), "spleen": (0.5, 3.5), "kidney_left": (0.6, 1.6), "kidney_right": (0.6, 1.6),
    "stomach": (0.4, 2.5), "pancreas": (0.5, 1.8), "gallbladder": (0.3, 2.5)}
TRAINING_ORGAN_VARIATION: dict[str, OrganVariation] = {
    name: OrganVariation(spread.volume_cv, tuple(TRAINING_POSITION_SD_FACTOR * v for v in spread.position_sd_mm),
                         TRAINING_VOLUME_FACTOR_RANGE[name])
    for name, spread in ABDOMEN_ORGAN_VARIATION.items()}


@dataclass(frozen=True)
class OrganChange:
    """One organ's drawn change: linear scale factor (volume factor ** (1/3)) and shift (x, y, z mm)."""

    scale: float
    shift_mm: tuple[float, float, float]


def draw_organ_changes(rng: np.random.Generator, variation: Mapping[str, OrganVariation] = ABDOMEN_ORGAN_VARIATION,
                       ) -> dict[str, OrganChange]:
    """Per organ a volume factor 1 + cv z (or log-uniform in its volume_factor_range) and a shift sd z
    (z standard normal, clipped at CLIP_SD)."""
    changes = {}
    for name, spread in variation.items():
        if spread.volume_factor_range is None:
            volume_factor = 1.0 + spread.volume_cv * float(np.clip(rng.standard_normal(), -CLIP_SD, CLIP_SD))
        else:
            volume_factor = float(np.exp(rng.uniform(*np.log(spread.volume_factor_range))))
        shift = np.clip(rng.standard_normal(3), -CLIP_SD, CLIP_SD) * np.array(spread.position_sd_mm)
        changes[name] = OrganChange(volume_factor ** (1.0 / 3.0), tuple(float(v) for v in shift))
    return changes


def _centre_mm(mask: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """(z, y, x) mm of the centroid of a non-empty mask, from the first voxel's centre."""
    return np.argwhere(mask).mean(axis=0) * spacing_zyx


def _moved_mask(mask: np.ndarray, source_voxels: np.ndarray) -> np.ndarray:
    """Where the organ lies after its move: the voxels whose own pull-back (z, y, x, 3 source positions in
    voxels) lands inside `mask`."""
    return ndimage.map_coordinates(mask.astype(np.float32), np.moveaxis(source_voxels, -1, 0), order=1,
                                   mode="constant") >= 0.5


def _organ_weight(moved: np.ndarray, spacing_zyx: np.ndarray, plateau_mm: float, falloff_mm: float) -> np.ndarray:
    """(z, y, x) weight of an organ's own map: 1 inside the moved organ and up to `plateau_mm` from it
    (as far as its own map moves anything, so that no voxel beside the organ samples the organ), then a
    Gaussian falloff of SD `falloff_mm`."""
    distance = ndimage.distance_transform_edt(~moved, sampling=spacing_zyx)
    beyond = np.maximum(distance - plateau_mm, 0.0)
    return np.exp(-0.5 * (beyond / falloff_mm) ** 2).astype(np.float32)


def organ_displacement(ids: np.ndarray, spacing_zyx: np.ndarray, organs: Mapping[str, tuple[int, ...]],
                       changes: Mapping[str, OrganChange], falloff_mm: float) -> np.ndarray:
    """Pull-back displacement (z, y, x, 3) in mm along (z, y, x) of the map's axes: the output voxel y
    samples the input at y + u(y). Each organ's own map y -> c + (y - c - t) / s (scaled by s about its
    centre c and shifted by t) is blended by its weight. Where an organ's weight is 1 (the moved organ
    and its plateau) only such maps count (a neighbour's falloff would otherwise dilute its change);
    elsewhere overlapping weights are normalised to sum to at most 1."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(ids.shape, spacing_zyx)], indexing="ij"), -1)
    own_maps, weights = [], []
    for name, change in changes.items():
        mask = np.isin(ids, organs[name])
        if not mask.any():
            continue
        centre = _centre_mm(mask, spacing_zyx)
        shift_zyx = np.array(change.shift_mm[::-1])
        own = (centre + (grid - centre - shift_zyx) / change.scale - grid).astype(np.float32)
        moved = _moved_mask(mask, (grid + own) / spacing_zyx)
        plateau = float(np.linalg.norm(own[moved], axis=-1).max()) if moved.any() else 0.0
        own_maps.append(own)
        weights.append(_organ_weight(moved, spacing_zyx, plateau, falloff_mm))
    if not weights:
        return np.zeros(ids.shape + (3,), np.float32)
    weights = np.stack(weights)
    cores = weights >= 1.0
    weights = np.where(cores.any(axis=0), cores.astype(np.float32), weights)
    displacement = np.einsum("k...,k...c->...c", weights, np.stack(own_maps))
    return displacement / np.maximum(weights.sum(axis=0), 1.0)[..., None]


def vary_anatomy(tissues: sitk.Image, organs: Mapping[str, tuple[int, ...]], changes: Mapping[str, OrganChange],
                 falloff_mm: float = 20.0) -> tuple[sitk.Image, float]:
    """The tissue map with each organ of `organs` (name -> tissue IDs) changed as `changes` says, the
    tissue around following; returns it and the fraction of voxels where the field folds (Jacobian
    determinant <= 0; nearest-neighbour resampling keeps the map valid there too)."""
    ids = sitk.GetArrayFromImage(tissues)
    spacing_zyx = np.array(tissues.GetSpacing()[::-1])
    u_zyx = organ_displacement(ids, spacing_zyx, organs, changes, falloff_mm)
    direction = np.array(tissues.GetDirection()).reshape(3, 3)
    u_physical = u_zyx[..., ::-1] @ direction.T  # image axes (x, y, z) -> physical LPS
    field = sitk.GetImageFromArray(u_physical.astype(np.float64), isVector=True)
    field.CopyInformation(tissues)
    jacobian = sitk.GetArrayViewFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    folded = float((jacobian <= 0).mean())
    return sct.warp(tissues, sitk.DisplacementFieldTransform(field), is_label=True), folded


def measured_changes(before: sitk.Image, after: sitk.Image, organs: Mapping[str, tuple[int, ...]],
                     changes: Mapping[str, OrganChange]) -> dict[str, dict]:
    """Per organ of `changes`: the drawn volume factor and shift (x, y, z mm) beside what the varied map
    `after` shows against `before` (they differ where a neighbour's move pulls on the organ)."""
    old_ids, new_ids = sitk.GetArrayFromImage(before), sitk.GetArrayFromImage(after)
    spacing_zyx = np.array(before.GetSpacing()[::-1])
    record = {}
    for name, change in changes.items():
        old, new = np.isin(old_ids, organs[name]), np.isin(new_ids, organs[name])
        moved = _centre_mm(new, spacing_zyx) - _centre_mm(old, spacing_zyx) if old.any() and new.any() else [np.nan] * 3
        record[name] = {"volume_factor_drawn": round(change.scale ** 3, 3),
                        "volume_factor": round(float(new.sum() / max(old.sum(), 1)), 3),
                        "shift_mm_drawn": [round(v, 1) for v in change.shift_mm],
                        "shift_mm": [round(float(v), 1) for v in moved[::-1]]}
    return record


def icrp_abdomen_organs() -> dict[str, tuple[int, ...]]:
    """Abdomen label name -> its ICRP tissue IDs (synthetic_ct.ICRP_ABDOMEN_LABELS)."""
    return {name: ids for name, ids in sct.ICRP_ABDOMEN_LABELS.values()}
