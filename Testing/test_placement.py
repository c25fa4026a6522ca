"""Where the atlas cases start on the target grid (isseg.placement): the shift of best label overlap.

A phantom's own labels, cut or moved by a known amount, are the target: the search must find that
amount, to within the factor by which it pools the grids (placement.search_factor), also where matching
the organs' centroids is far off (a short scan).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from isseg import phantom, placement

ORGANS = [label["value"] for label in phantom.LABELS]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """A phantom's labels (40, 64, 64): liver from slice 16 up, kidneys 8 to 26, aorta throughout."""
    case = phantom.generate(phantom.training_spec(21, size=(64, 64, 40), spacing=(6.0, 6.0, 6.0)))
    return sitk.GetArrayFromImage(case.labels)


def present_in(target: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(target) if v > 0]


def assert_found(shift, expected, shapes) -> None:
    tolerance = placement.search_factor(shapes) // 2 + 1
    assert np.all(np.abs(np.asarray(shift) - expected) < tolerance), f"found {shift}, moved by {expected}"


def moved(labels: np.ndarray, shift) -> np.ndarray:
    target = np.zeros_like(labels)
    placement.place_on_grid(labels, target, np.asarray(shift))
    return target


def test_a_short_scan_is_placed_at_its_level_not_at_the_centroid(labels):
    """8 slices below the liver (kidneys, aorta): the atlas must land with those slices, shift -6 in z;
    matching the centroids puts the atlas body's organ centre (slice 26) in the slab instead."""
    slab = labels[6:14]
    assert_found(placement.overlap_shifts([labels], slab, present_in(slab))[0], [-6, 0, 0], [labels.shape])
    assert abs(placement.centroid_shifts([labels], slab > 0)[0][0] - (-6)) > 10, "the defect this search mends"


@pytest.mark.parametrize("shift", [(3, -5, 4), (-2, 7, 0)])
def test_a_moved_case_is_found_at_its_shift(labels, shift):
    target = moved(labels, shift)
    assert_found(placement.overlap_shifts([labels], target, present_in(target))[0], shift, [labels.shape])


def test_each_atlas_case_gets_its_own_shift(labels):
    target = moved(labels, (2, 1, -3))
    atlas = [labels, moved(labels, (0, 4, 0))]
    shifts = placement.overlap_shifts(atlas, target, present_in(target))
    assert_found(shifts[0], [2, 1, -3], [labels.shape])
    assert_found(shifts[1], [2, -3, -3], [labels.shape])


def test_a_clinical_grid_is_searched_pooled_within_the_pooling_factor(labels):
    """A 256-voxel axis is searched pooled by 6 (SEARCH_VOXELS); the alignment's affine takes up the rest."""
    large = np.kron(labels, np.ones((4, 4, 4), dtype=labels.dtype))  # (160, 256, 256)
    assert placement.search_factor([large.shape]) == 6
    target = moved(large, (-23, 14, 9))
    assert_found(placement.overlap_shifts([large], target, present_in(target))[0], [-23, 14, 9], [large.shape])


def test_only_the_present_labels_count(labels):
    """A label the mask does not hold (e.g. an organ outside the field of view) pulls nothing: with the
    aorta alone present, a target holding the aorta where it is and the liver elsewhere is matched on
    the aorta."""
    target = np.where(labels == 5, 5, 0).astype(labels.dtype)
    target[(moved(labels, (0, 10, 10)) == 1) & (target == 0)] = 1
    assert_found(placement.overlap_shifts([labels], target, [5])[0], [0, 0, 0], [labels.shape])


def test_without_a_present_label_the_centroids_meet(labels):
    empty = np.zeros((10, 64, 64), dtype=labels.dtype)
    np.testing.assert_array_equal(placement.overlap_shifts([labels], empty, []),
                                  placement.centroid_shifts([labels], empty > 0))


def test_initial_placement_writes_each_case_at_its_shift():
    label = np.zeros((10, 12, 14), dtype=np.int64)
    label[2:4, 3:6, 4:8] = 2
    image = (label > 0).astype(np.float32)
    target_mask = np.zeros((12, 12, 16), dtype=bool)
    target_mask[6:8, 5:8, 7:11] = True

    images, placed = placement.initial_placement([image], [label], target_mask.shape, np.array([[4, 2, 3]]))

    assert images.shape == placed.shape == (1, 1, 12, 12, 16)
    np.testing.assert_array_equal(placed[0, 0].numpy() > 0, target_mask)
    np.testing.assert_array_equal(images[0, 0].numpy() > 0, target_mask)
    np.testing.assert_array_equal(placement.centroid_shifts([label], target_mask), [[4, 2, 3]])
