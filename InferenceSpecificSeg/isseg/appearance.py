"""Appearance randomisation of training patches: real CT should look like one more variant.

The SynthSeg idea (Billot et al., Med Image Anal 2023) for CT: the anatomy (labels) stays as it is,
while the appearance of every training patch is drawn anew, so that a model trained on a few
bodies with synthetic intensities meets a real scanner's image as one more variant. Per patch:

1. contrast phase: each labelled organ is shifted by the enhancement of a random phase (native,
   late arterial, portal venous, delayed) relative to the mean over phases, so a training set of
   any one phase shows every phase;
2. per-label random intensity: one more random HU offset per organ, N(0, label_hu_std) truncated at
   3 standard deviations;
3. scanner: MONAI's bias field, Gibbs ringing, blur and lower resolution (RandSimulateLowResolution,
   all axes), thick slices (RandThickSlices: averaged over 1 to 2.5 voxels along z and interpolated
   back, as a CT reconstructed with thick slices and resampled to the model grid looks), gamma, noise;
4. clip to the intensity window, as the network's input normalisation does.

Inputs: patches, normalized images (B, 1, z, y, x) float in [0, 1] (the model's window `a_min..a_max`
HU mapped to 0..1, as isseg.preprocess.image_tensor makes them); labels (B, 1, z, y, x) int class
indices, only read. Output: patches of the same shape and dtype, in [0, 1], i.e. every voxel within
`a_min..a_max` HU; before the scanner steps an organ moves by at most the largest phase offset plus
3 label_hu_std HU. Labels are never changed: the anatomy stays, only the appearance is drawn. One seed
drawn from the caller's generator fixes every random choice of a call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.utils import convert_to_tensor
from monai.transforms import (Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth,
                              RandGibbsNoise, RandomizableTransform, RandSimulateLowResolution)

#: Contrast enhancement in HU above the native value per organ and phase, at 120 kVp with a standard
#: iodine dose; magnitudes after Bae KT, "Intravenous contrast medium administration and scan timing
#: at CT", Radiology 256:32-61 (2010). Organs not listed do not enhance (bile, urine in the bladder).
PHASE_ENHANCEMENT_HU: dict[str, dict[str, float]] = {
    "native": {},
    "arterial": {"aorta": 250.0, "inferior_vena_cava": 40.0, "portal_vein": 80.0, "kidney": 150.0, "spleen": 70.0,
                 "pancreas": 70.0, "liver": 15.0, "stomach": 40.0, "adrenal": 40.0, "heart": 200.0},
    "portal": {"aorta": 150.0, "inferior_vena_cava": 130.0, "portal_vein": 160.0, "kidney": 130.0, "spleen": 70.0,
               "pancreas": 50.0, "liver": 55.0, "stomach": 40.0, "adrenal": 40.0, "heart": 130.0},
    "delayed": {"aorta": 80.0, "inferior_vena_cava": 80.0, "portal_vein": 80.0, "kidney": 90.0, "spleen": 40.0,
                "pancreas": 30.0, "liver": 40.0, "stomach": 25.0, "adrenal": 25.0, "heart": 80.0},
}


def enhancement_key(label_name: str) -> str:
    """The PHASE_ENHANCEMENT_HU entry of a label name: sides and numbering dropped
    ("kidney_left" -> "kidney", "adrenal_right" -> "adrenal")."""
    name = label_name.lower()
    for side in ("_left", "_right", "_lt", "_rt"):
        name = name.removesuffix(side)
    return name


def phase_offsets_hu(label_names: dict[int, str], phase: str) -> dict[int, float]:
    """HU offset per label value: the enhancement in `phase` minus the mean enhancement over all
    phases, so the offsets move an image of unknown phase towards `phase` by about the right amount."""
    offsets = {}
    for value, name in label_names.items():
        key = enhancement_key(name)
        per_phase = [table.get(key, 0.0) for table in PHASE_ENHANCEMENT_HU.values()]
        offsets[value] = PHASE_ENHANCEMENT_HU[phase].get(key, 0.0) - float(np.mean(per_phase))
    return offsets


def random_tissue_values(values_hu: dict[int, float], rng: np.random.Generator, std_hu: float,
                         fixed: tuple[int, ...] = (0,)) -> dict[int, float]:
    """Per-tissue random intensities for synthesising a CT from a tissue map: every tissue's HU plus
    an independent N(0, std_hu) draw, except the tissues in `fixed` (air outside the body)."""
    return {tissue: value if tissue in fixed else value + float(rng.normal(0.0, std_hu))
            for tissue, value in values_hu.items()}


class RandThickSlices(RandomizableTransform):
    """With probability `prob`, an image (C, z, y, x) as a scanner with thicker slices shows it: each
    slice averaged over a thickness drawn uniformly in `thickness_voxels` (voxels along z; 'area'
    resampling) and interpolated linearly back to the original grid. y and x are left as they are;
    MONAI's RandSimulateLowResolution lowers every axis at once."""

    def __init__(self, prob: float, thickness_voxels: tuple[float, float]):
        RandomizableTransform.__init__(self, prob)
        self.thickness_voxels = thickness_voxels
        self.thickness = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.thickness = float(self.R.uniform(*self.thickness_voxels))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        image = convert_to_tensor(img, dtype=torch.float32, track_meta=False)[None]
        depth = image.shape[2]
        slices = max(1, int(round(depth / self.thickness)))
        thick = torch.nn.functional.interpolate(image, size=(slices, *image.shape[3:]), mode="area")
        return torch.nn.functional.interpolate(thick, size=image.shape[2:], mode="trilinear", align_corners=False)[0]


@dataclass(frozen=True)
class AppearanceSettings:
    """How widely appearance varies (recorded with the training settings). HU, or probabilities."""

    label_hu_std: float = 25.0
    phases: tuple[str, ...] = ("native", "arterial", "portal", "delayed")
    bias_field_probability: float = 0.3
    bias_field_coefficients: tuple[float, float] = (0.0, 0.15)
    gibbs_probability: float = 0.15
    gibbs_alpha: tuple[float, float] = (0.0, 0.4)
    blur_probability: float = 0.3
    blur_sigma_voxels: tuple[float, float] = (0.25, 1.0)
    low_resolution_probability: float = 0.25
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    thick_slice_probability: float = 0.3
    thick_slice_voxels: tuple[float, float] = (1.0, 2.5)
    gamma_probability: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_probability: float = 0.6
    noise_hu: float = 30.0


class AppearanceRandomizer:
    """Callable (patches, labels, rng) -> patches that randomises appearance as the module docstring says.

    label_names: {label value: name} of the model's labels (background 0 excluded or ignored);
    window: the (a_min, a_max) HU of the model's input normalisation."""

    def __init__(self, label_names: dict[int, str], window: tuple[float, float],
                 settings: AppearanceSettings = AppearanceSettings()):
        self.label_names = {value: name for value, name in label_names.items() if value != 0}
        self.hu_per_unit = float(window[1] - window[0])
        self.settings = settings
        sigma = settings.blur_sigma_voxels
        self.scanner = Compose([
            RandBiasField(prob=settings.bias_field_probability, coeff_range=settings.bias_field_coefficients),
            RandGibbsNoise(prob=settings.gibbs_probability, alpha=settings.gibbs_alpha),
            RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=settings.blur_probability),
            RandSimulateLowResolution(prob=settings.low_resolution_probability, zoom_range=settings.low_resolution_zoom),
            RandThickSlices(prob=settings.thick_slice_probability, thickness_voxels=settings.thick_slice_voxels),
            RandAdjustContrast(prob=settings.gamma_probability, gamma=settings.gamma),
            RandGaussianNoise(prob=settings.noise_probability, std=settings.noise_hu / self.hu_per_unit),
        ])

    def label_offsets(self, labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Per-voxel offset (normalized units) for one patch's labels (1, z, y, x): a random contrast
        phase plus an independent random HU shift per label (truncated normal, at most 3 label_hu_std)."""
        phase = self.settings.phases[int(rng.integers(len(self.settings.phases)))]
        offsets_hu = phase_offsets_hu(self.label_names, phase)
        table = torch.zeros(max(self.label_names, default=0) + 1)
        std = self.settings.label_hu_std
        for value, offset in offsets_hu.items():
            table[value] = (offset + np.clip(rng.normal(0.0, std), -3.0 * std, 3.0 * std)) / self.hu_per_unit
        return table.to(labels.device)[labels.long().clamp(0, len(table) - 1)]

    def __call__(self, patches: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        result = []
        for patch, label in zip(patches, labels):
            shifted = patch + self.label_offsets(label, rng).to(patch.dtype)
            self.scanner.set_random_state(seed=int(rng.integers(2**31)))
            scanned = convert_to_tensor(self.scanner(shifted.clamp(0.0, 1.0)), dtype=patch.dtype, track_meta=False)
            result.append(scanned.clamp(0.0, 1.0))
        return torch.stack(result)
