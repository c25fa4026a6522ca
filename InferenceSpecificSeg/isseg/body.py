"""The body's bounding box on the model grid, so that re-predictions during refinement skip the air.

Input: the network input (1, 1, z, y, x) of a CT, normalized by the network's own preprocessing; every
kind clips the CT's lower values (window or percentiles), so the air around the body sits at the
volume's minimum. The box covers every voxel above it, plus a margin, and is never smaller than the
network's patch (so the sliding window sees what it saw on the whole volume). Outside the box a
prediction is background.
"""

from __future__ import annotations

from typing import Callable

import torch

# A voxel is body when it is above the minimum by this share of the volume's range (noise in the air
# is clipped away by the window: this only guards against rounding).
BODY_LEVEL = 0.01
MARGIN_VOXELS = 8


def body_box(image: torch.Tensor, patch_zyx, margin: int = MARGIN_VOXELS) -> tuple[slice, slice, slice]:
    """(z, y, x) slices of the box around the body of `image` (1, 1, z, y, x), grown by `margin`
    voxels and to at least the patch size where the volume allows; the whole volume without a body."""
    volume = image[0, 0]
    low, high = float(volume.min()), float(volume.max())
    body = volume > low + BODY_LEVEL * (high - low)
    if not body.any():
        return tuple(slice(0, size) for size in volume.shape)
    box = []
    for axis, (size, patch) in enumerate(zip(volume.shape, patch_zyx)):
        others = tuple(a for a in range(3) if a != axis)
        occupied = torch.nonzero(body.any(dim=others))[:, 0]
        start, stop = max(0, int(occupied[0]) - margin), min(size, int(occupied[-1]) + 1 + margin)
        need = min(patch, size)
        if stop - start < need:
            start = min(max(0, (start + stop) // 2 - need // 2), size - need)
            stop = start + need
        box.append(slice(start, stop))
    return tuple(box)


def predict_in_box(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                   box: tuple[slice, slice, slice]) -> torch.Tensor:
    """Probabilities (1, C, z, y, x) of `image` (1, 1, z, y, x): `predict` (a (1, 1, ...) crop ->
    (1, C, ...) probabilities) on the box, background (class 0 = 1) elsewhere."""
    inside = predict(image[(slice(None), slice(None)) + tuple(box)])
    probabilities = inside.new_zeros((1, inside.shape[1], *image.shape[2:]))
    probabilities[:, 0] = 1.0
    probabilities[(slice(None), slice(None)) + tuple(box)] = inside
    return probabilities
