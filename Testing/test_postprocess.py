"""From averaged probabilities to the final labelmap (isseg.postprocess)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from isseg.postprocess import keep_largest_component, labels_on_grid, probabilities_to_labels

LABELS = [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}, {"value": 3, "name": "aorta"}]


def probabilities_of(*voxels) -> np.ndarray:
    """(C, 1, 1, n) probabilities from per-voxel class probability lists."""
    return np.array(voxels, dtype=np.float32).T[:, None, None, :]


def test_without_thresholds_the_most_probable_class_wins():
    probabilities = probabilities_of([0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.4, 0.0], [0.2, 0.2, 0.45, 0.15],
                                     [0.2, 0.2, 0.25, 0.35])
    labels = probabilities_to_labels(probabilities, LABELS)
    assert labels.dtype == np.uint8
    assert labels.ravel().tolist() == [0, 1, 2, 3]


def test_threshold_grows_and_shrinks_its_organ():
    labels = [{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen", "threshold": 0.25},
              {"value": 3, "name": "aorta", "threshold": 0.7}]
    probabilities = probabilities_of(
        [0.2, 0.5, 0.3, 0.0],    # spleen reaches its 0.25 threshold: it wins although liver is more probable
        [0.3, 0.1, 0.0, 0.6],    # aorta is the argmax but below its 0.7 threshold: background
        [0.0, 0.0, 0.25, 0.75],  # both thresholds reached: the more probable of the two (aorta)
        [0.1, 0.8, 0.1, 0.0],    # no threshold reached: the argmax (liver) stays
        [0.05, 0.0, 0.2, 0.75],  # aorta above threshold, spleen below: aorta
    )
    assert probabilities_to_labels(probabilities, labels).ravel().tolist() == [2, 0, 3, 1, 3]


def blobs() -> np.ndarray:
    labelmap = np.zeros((10, 10, 10), dtype=np.uint8)
    labelmap[1:5, 1:5, 1:5] = 1   # 64 voxels
    labelmap[7:9, 7:9, 7:9] = 1   # 8 voxels, separate
    labelmap[5, 5, 5] = 1         # touches the big blob only at a corner: 26-connected to it
    labelmap[1:3, 7:9, 1:3] = 2
    labelmap[7:9, 1:3, 7:9] = 2
    return labelmap


def test_keep_largest_component_only_for_single_component_organs():
    labels = [{"value": 1, "name": "liver", "single_component": True}, {"value": 2, "name": "bowel"}]
    labelmap = blobs()
    result = keep_largest_component(labelmap, labels)

    assert np.count_nonzero(result == 1) == 65, "big liver blob plus its corner-connected voxel expected"
    assert result[5, 5, 5] == 1
    assert not result[7:9, 7:9, 7:9].any(), "the small separate liver piece must become background"
    np.testing.assert_array_equal(result == 2, labelmap == 2, err_msg="a multi-piece organ must keep every piece")
    assert np.count_nonzero(labelmap == 1) == 73, "the input must not be changed in place"


def test_keep_largest_component_is_what_monai_keeps_with_full_connectivity():
    pytest.importorskip("skimage")  # MONAI's transform needs it; the engine does not
    from monai.transforms import KeepLargestConnectedComponent

    labels = [{"value": 1, "name": "liver", "single_component": True}, {"value": 2, "name": "bowel"},
              {"value": 3, "name": "spleen", "single_component": True}]
    monai_keep = KeepLargestConnectedComponent(applied_labels=[1, 3], is_onehot=False, independent=True, connectivity=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        # ~50 pieces per label with 26 neighbours, ~100 with 6: a connectivity mismatch would show
        labelmap = np.where(rng.random((12, 12, 12)) < 0.2, rng.integers(1, 4, (12, 12, 12)), 0).astype(np.uint8)
        expected = np.asarray(monai_keep(labelmap[None].copy()))[0]
        np.testing.assert_array_equal(keep_largest_component(labelmap, labels), expected)
    np.testing.assert_array_equal(keep_largest_component(blobs(), labels), np.asarray(monai_keep(blobs()[None]))[0])


def test_labels_on_grid_applies_largest_component_on_the_target_grid():
    labels = [{"value": 1, "name": "liver", "single_component": True}, {"value": 2, "name": "bowel"}]
    labelmap = blobs()
    probabilities = np.stack([(labelmap == v).astype(np.float32) for v in (0, 1, 2)])
    grid = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin((-9.0, 3.0, 1.5))

    kept = sitk.GetArrayFromImage(labels_on_grid(probabilities, grid, grid, labels, largest_component=True))
    every_piece = sitk.GetArrayFromImage(labels_on_grid(probabilities, grid, grid, labels, largest_component=False))

    np.testing.assert_array_equal(every_piece, labelmap)
    np.testing.assert_array_equal(kept, keep_largest_component(labelmap, labels))
