"""Where each atlas case starts on the target grid, before the alignment optimises its transform.

An atlas case (a (z, y, x) labelmap at the model spacing, of any extent) is put on the target grid by
an integer shift (z, y, x voxels): atlas voxel i lands on target voxel i + shift.

The shift is the one that maximises the mean Dice, over the labels present in the current mask,
between the shifted atlas labels and that mask, where only the atlas voxels that land inside the
target grid count. Every shift is scored at once, as FFT cross-correlations of copies pooled to at
most SEARCH_VOXELS per axis (search_factor), so the result is within a pooled voxel of the best
shift; the alignment's affine takes up the rest. This finds the level of a short scan: on a CT of a few slices
the centroid of the mask is the middle of those slices, and putting the centroid of a whole atlas
body's organs there puts the wrong organs in the field of view (the aorta of the real 20-slice CT
beside the project was missed that way). Without a present label the centroids of the volumes meet.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Per axis, the pooled grid of the search: FFTs of at most (2 x 48)^3 per label keep it to about a second
# per atlas case of 20 labels on 2 CPU cores at clinical sizes (256 x 256 x 192), where a full-resolution
# search would take minutes; pooling by 6 there leaves 3 voxels for the affine to take up.
SEARCH_VOXELS = 48
LABELS_PER_FFT = 8  # labels correlated at once: bounds the spectra's memory with 100+ labels
# Among equally good shifts the one closest to the centroid placement wins (Dice per voxel of distance).
TIE_BREAK_PER_VOXEL = 1e-6


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds label values 0 .. num_classes - 1."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int16)


def place_on_grid(array: np.ndarray, out: np.ndarray, shift: np.ndarray) -> None:
    """Copy `array` into `out` (already filled with the background) so that voxel i lands on voxel
    i + shift (integers, z y x); voxels not covered keep their value."""
    source, target = [], []
    for size_in, size_out, offset in zip(array.shape, out.shape, shift):
        start_out = max(0, offset)
        start_in = max(0, -offset)
        length = min(size_in - start_in, size_out - start_out)
        if length <= 0:
            return
        source.append(slice(start_in, start_in + length))
        target.append(slice(start_out, start_out + length))
    out[tuple(target)] = array[tuple(source)]


def foreground_centroid(mask: np.ndarray) -> np.ndarray:
    """Centre (z, y, x voxels) of the non-zero voxels, or of the volume if there are none."""
    points = np.argwhere(mask)
    return points.mean(axis=0) if len(points) else (np.array(mask.shape) - 1) / 2


def centroid_shifts(atlas_labels: list[np.ndarray], target_mask: np.ndarray) -> np.ndarray:
    """(N, 3) integer shifts that put each atlas case's organ centroid on the target mask's."""
    target_centre = foreground_centroid(target_mask)
    return np.stack([np.round(target_centre - foreground_centroid(label > 0)).astype(int) for label in atlas_labels])


def _pooled(labels: np.ndarray, values: list[int], factor: int) -> np.ndarray:
    """(len(values), z', y', x') fraction of each pooled voxel (factor^3 voxels, fewer at the far faces)
    covered by each label of (z, y, x) `labels`: one pass over the voxels, however many labels."""
    pooled_shape = [-(-n // factor) for n in labels.shape]
    # int32 indices: a clinical grid's voxel-sized index arrays are then 50 MB each, not 100
    channel_of = np.full(int(max(labels.max(initial=0), max(values))) + 1, -1, dtype=np.int32)
    channel_of[values] = np.arange(len(values), dtype=np.int32)
    cell_of = [np.arange(n, dtype=np.int32) // factor for n in labels.shape]
    cells = (cell_of[0][:, None, None] * pooled_shape[1] + cell_of[1][None, :, None]) * pooled_shape[2] \
        + cell_of[2][None, None, :]
    channels = channel_of[labels]
    counted = channels >= 0
    cell_count = int(np.prod(pooled_shape))
    covered = np.bincount(channels[counted] * cell_count + cells[counted], minlength=len(values) * cell_count)
    voxels_per_cell = np.bincount(cells.ravel(), minlength=cell_count)
    return (covered.reshape(len(values), -1) / voxels_per_cell).astype(np.float32).reshape(len(values), *pooled_shape)


def _spectrum(volumes: torch.Tensor, size: list[int]) -> torch.Tensor:
    return torch.fft.rfftn(volumes, s=size, dim=(-3, -2, -1))


def _circular_shifts(atlas_extent: int, target_extent: int) -> np.ndarray:
    """The shift at each index of a correlation of that many voxels: -(atlas_extent - 1) .. target_extent - 1,
    shift k at index k mod (atlas_extent + target_extent - 1)."""
    index = np.arange(atlas_extent + target_extent - 1)
    return np.where(index <= target_extent - 1, index, index - (atlas_extent + target_extent - 1))


def _inside_volumes(atlas: np.ndarray, target_shape) -> np.ndarray:
    """(K, *size) volume of each pooled atlas label (K, z, y, x) that lands inside a target grid of
    `target_shape`, for every circular shift: the grid is a box, so three 1-D box sums of cumulative sums
    (numpy: torch's index_select along the last axis is a hundred times slower on the CPU)."""
    inside = atlas
    for axis, target_extent in enumerate(target_shape, start=1):
        extent = atlas.shape[axis]
        cumulative = np.concatenate([np.zeros_like(np.take(inside, [0], axis=axis)), inside.cumsum(axis)], axis=axis)
        shifts = _circular_shifts(extent, target_extent)
        # atlas voxels i with 0 <= i + shift < target_extent, within 0 .. extent - 1
        low, high = np.clip(-shifts, 0, extent), np.clip(target_extent - shifts, 0, extent)
        inside = np.take(cumulative, high, axis=axis) - np.take(cumulative, low, axis=axis)
    return inside


def _overlap_dice(atlas: torch.Tensor, target_spectra: torch.Tensor, target_volumes: torch.Tensor,
                  inside: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Dice (K, *size) of pooled atlas labels (K, ...) against the target's, for every circular shift:
    2 overlap / (target volume + `inside`, the atlas volume that lands inside the target grid)."""
    overlap = torch.fft.irfftn(torch.conj(_spectrum(atlas, size)) * target_spectra, s=size, dim=(-3, -2, -1))
    denominator = target_volumes.view(-1, 1, 1, 1) + inside
    return torch.where(denominator > 1e-3, 2 * overlap / denominator.clamp(min=1e-3), torch.zeros_like(overlap))


def _best_shift(score: torch.Tensor, atlas_shape, target_shape, centroid_shift: np.ndarray) -> np.ndarray:
    """The shift (pooled voxels) of the highest score (*size, circular indices), ties going to the one
    nearest `centroid_shift`."""
    shifts = [_circular_shifts(a, t) for a, t in zip(atlas_shape, target_shape)]
    squared = [torch.from_numpy((s - c) ** 2.0) for s, c in zip(shifts, centroid_shift)]
    distance = (squared[0][:, None, None] + squared[1][None, :, None] + squared[2][None, None, :]).sqrt()
    index = np.unravel_index(int((score - TIE_BREAK_PER_VOXEL * distance).argmax()), score.shape)
    return np.array([int(s[i]) for s, i in zip(shifts, index)])


def search_factor(shapes) -> int:
    """The pooling factor of the search over grids of `shapes` (z, y, x): the result is exact to within it."""
    return max(1, math.ceil(max(max(shape) for shape in shapes) / SEARCH_VOXELS))


def overlap_shifts(atlas_labels: list[np.ndarray], target_labels: np.ndarray, present: list[int],
                   device: torch.device = torch.device("cpu")) -> np.ndarray:
    """(N, 3) integer shifts (z, y, x voxels) that maximise each atlas case's mean Dice, over the label
    values `present`, against `target_labels` (z, y, x) within the target grid; the centroid shifts when
    no label is present. The FFTs run on `device`."""
    centroids = centroid_shifts(atlas_labels, target_labels > 0)
    if not present:
        return centroids
    factor = search_factor([target_labels.shape, *(label.shape for label in atlas_labels)])
    target = torch.from_numpy(_pooled(target_labels, present, factor)).to(device)
    target_volumes = target.flatten(1).sum(1)
    spectra = {}  # per FFT size: the target's label spectra (atlas cases of one size share them)
    shifts = []
    for label, centroid in zip(atlas_labels, centroids):
        pooled = _pooled(label, present, factor)
        atlas = torch.from_numpy(pooled).to(device)
        inside = torch.from_numpy(_inside_volumes(pooled, target.shape[1:])).to(device)
        size = [a + t - 1 for a, t in zip(atlas.shape[1:], target.shape[1:])]
        if tuple(size) not in spectra:
            spectra[tuple(size)] = _spectrum(target, size)
        score = torch.zeros(size, device=device)
        for first in range(0, len(present), LABELS_PER_FFT):
            part = slice(first, first + LABELS_PER_FFT)
            score += _overlap_dice(atlas[part], spectra[tuple(size)][part], target_volumes[part], inside[part],
                                   size).sum(0)
        best = _best_shift(score.cpu() / len(present), atlas.shape[1:], target.shape[1:], centroid / factor)
        shifts.append(best * factor)
    return np.stack(shifts)


def initial_placement(atlas_images: list[np.ndarray], atlas_labels: list[np.ndarray], target_shape,
                      shifts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Put atlas cases (each (z, y, x), any size, already at the model spacing) on a target grid of
    `target_shape`, case n shifted by shifts[n]. Returns images (N, 1, z, y, x) float32 and labels
    (N, 1, z, y, x) in the smallest integer type for their values (label_dtype), each written straight
    into its result: at clinical sizes a second copy of the atlas is gigabytes."""
    count = len(atlas_images)
    images = torch.zeros(count, 1, *target_shape, dtype=torch.float32)
    num_classes = max(int(label.max(initial=0)) for label in atlas_labels) + 1
    labels = torch.from_numpy(np.zeros((count, 1, *target_shape), dtype=label_dtype(num_classes)))
    for case, (image, label, shift) in enumerate(zip(atlas_images, atlas_labels, shifts)):
        place_on_grid(image, images[case, 0].numpy(), shift)
        place_on_grid(label, labels[case, 0].numpy(), shift)
    return images, labels
