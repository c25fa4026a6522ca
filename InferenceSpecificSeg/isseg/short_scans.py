"""Short scans in training: a patch as the sliding window shows a CT of only a few slices.

A CT of 20 slices at 2 mm (40 mm, 13 voxels at 3 mm) is thinner than the network's patch (40 voxels
deep at 3 mm); MONAI's sliding_window_inference pads it with 0, the bottom of the intensity window,
equally above and below. A model that saw only long fields of view misreads that patch: the real-anatomy
model found no spleen or aorta on the 20-slice real CT beside the project (BENCHMARKS.md section 7).
So, with a probability per patch, the patch is cut to a random axial slab and padded back to its depth
exactly as the sliding window pads (MONAI RandSpatialCropd + SpatialPadd, constant 0, symmetric), the
labels with it: outside the slab the image is 0 and the label background.

Input: patches (B, 1, z, y, x) float, normalized (0 = the window's bottom); labels (B, 1, z, y, x) class
indices; a numpy Generator that decides everything (same draws, same output). Output: new tensors of the
same shapes and dtypes; a patch that is not cut is returned unchanged, and a cut patch keeps its voxels
inside the slab (shifted along z to the middle).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, RandSpatialCropd, SpatialPadd
from monai.utils import convert_to_tensor

#: The thinnest slab, in voxels along z: thinner than this, a "CT" is a few images, not a volume.
MIN_SLICES = 4


class ShortScanCutter:
    """Callable (patches, labels, rng) -> (patches, labels) that cuts each patch to a short scan with
    `probability`, its depth uniform in MIN_SLICES..the patch depth (voxels)."""

    def __init__(self, probability: float, patch_zyx: tuple[int, int, int]):
        self.probability = probability
        depth = int(patch_zyx[0])
        keys = ["image", "label"]
        self.cut = Compose([
            RandSpatialCropd(keys=keys, roi_size=(min(MIN_SLICES, depth), -1, -1), max_roi_size=(depth, -1, -1),
                             random_center=True, random_size=True),
            SpatialPadd(keys=keys, spatial_size=tuple(patch_zyx), mode="constant"),
        ])

    def __call__(self, patches: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cut_patches, cut_labels = [], []
        for patch, label in zip(patches, labels):
            if rng.random() < self.probability:
                self.cut.set_random_state(seed=int(rng.integers(2**31)))
                short = self.cut({"image": patch, "label": label})
                patch = convert_to_tensor(short["image"], dtype=patch.dtype, track_meta=False)
                label = convert_to_tensor(short["label"], dtype=label.dtype, track_meta=False)
            cut_patches.append(patch)
            cut_labels.append(label)
        return torch.stack(cut_patches), torch.stack(cut_labels)
