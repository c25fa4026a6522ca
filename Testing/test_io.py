"""Reading, writing and resampling (isseg.io, isseg.preprocess, isseg.postprocess.labels_on_grid).

Geometry (size, origin, spacing, direction) must survive every supported format, including oblique
directions and anisotropic spacing, and the trip to the model grid and back must land exactly on
the input grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from engine_support import oblique_direction, small_ct, write_dicom_series
from isseg import io, phantom, postprocess, preprocess
from isseg.errors import BadInputError, DiskError

MODEL_SPACING = (4.0, 4.0, 4.0)


def assert_same_geometry(actual: sitk.Image, expected: sitk.Image, tolerance: float = 1e-5) -> None:
    assert actual.GetSize() == expected.GetSize(), f"size {actual.GetSize()} != {expected.GetSize()}"
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), atol=tolerance, err_msg="spacing")
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), atol=tolerance, err_msg="origin")
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), atol=tolerance, err_msg="direction")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_file_round_trip_keeps_geometry_and_values(tmp_path, suffix, oblique):
    original = small_ct(direction=oblique_direction() if oblique else None)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(original, str(path))

    read_back = io.read_image(path)

    assert read_back.GetPixelID() == sitk.sitkFloat32
    assert_same_geometry(read_back, original)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_back), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_dicom_series_round_trip_keeps_geometry_and_hu(tmp_path, oblique):
    original = small_ct(direction=oblique_direction() if oblique else None)
    write_dicom_series(original, tmp_path / "series")

    read_back = io.read_image(tmp_path / "series")

    # DICOM stores positions as decimal strings (16 characters), hence the looser tolerance.
    assert_same_geometry(read_back, original, tolerance=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_back), sitk.GetArrayFromImage(original),
                                  err_msg="HU values changed: rescale slope/intercept not applied on reading")


def test_folder_with_two_dicom_series_is_refused(tmp_path):
    write_dicom_series(small_ct(seed=1), tmp_path, series_uid="1.2.826.0.1.3680043.2.1125.7.1")
    write_dicom_series(small_ct(seed=2, origin=(0.0, 0.0, 0.0)), tmp_path / "x", series_uid="1.2.826.0.1.3680043.2.1125.7.2")
    for file in (tmp_path / "x").iterdir():
        file.rename(tmp_path / f"second_{file.name}")
    with pytest.raises(BadInputError, match="2 DICOM series"):
        io.read_image(tmp_path)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(BadInputError, match="No DICOM series"):
        io.read_image(tmp_path)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        io.read_image(tmp_path / "nothing.nrrd")


def test_write_image_atomic_leaves_only_the_target(tmp_path):
    image = small_ct()
    path = io.write_image_atomic(image, tmp_path / "labels.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nrrd"]
    assert_same_geometry(sitk.ReadImage(str(path)), image)


def test_write_image_atomic_into_unwritable_place_is_a_disk_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(DiskError, match="Could not write"):
        io.write_image_atomic(small_ct(), blocker / "labels.nrrd")


DIRECTIONS = {
    "axial_LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "axial_RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "oblique": oblique_direction(),
}


@pytest.mark.parametrize("direction_name", list(DIRECTIONS))
def test_model_grid_and_back_lands_exactly_on_the_input_grid(direction_name):
    # An anisotropic input grid (not the model's 4 mm) in three orientations.
    spec = phantom.PhantomSpec(seed=3, size=(60, 48, 20), spacing=(5.0, 5.5, 8.0), deformation_mm=3.0,
                               direction=DIRECTIONS[direction_name])
    case = phantom.generate(spec)
    values = [0] + [label["value"] for label in phantom.LABELS]

    grid = io.model_grid(case.image, MODEL_SPACING, "LPS")
    model_image = preprocess.to_model_grid(case.image, MODEL_SPACING, "LPS")
    assert_same_geometry(model_image, grid, tolerance=0)
    np.testing.assert_allclose(grid.GetSpacing(), MODEL_SPACING)
    np.testing.assert_allclose(grid.GetDirection(), np.eye(3).ravel(), err_msg="model grid not axis-aligned LPS")
    # The model grid covers the whole input: every corner of the input lies inside it.
    for corner in io._physical_corners(case.image):
        index = np.array(grid.TransformPhysicalPointToContinuousIndex(tuple(corner)))
        assert np.all(index >= -0.5 - 1e-6) and np.all(index <= np.array(grid.GetSize()) - 0.5 + 1e-6), \
            f"input corner {corner} outside the model grid"

    model_labels = sitk.GetArrayFromImage(io.resample_to(case.labels, grid, is_label=True))
    probabilities = np.stack([(model_labels == v).astype(np.float32) for v in values])
    back = postprocess.labels_on_grid(probabilities, grid, case.image, phantom.LABELS, largest_component=False)

    assert back.GetSize() == case.image.GetSize()
    assert back.GetOrigin() == case.image.GetOrigin()
    assert back.GetSpacing() == case.image.GetSpacing()
    assert back.GetDirection() == case.image.GetDirection()
    assert back.GetPixelID() == sitk.sitkUInt8

    # Away from label boundaries (farther than a model voxel diagonal) every label survives the trip.
    truth = sitk.GetArrayFromImage(case.labels)
    result = sitk.GetArrayFromImage(back)
    spacing_zyx = case.image.GetSpacing()[::-1]
    interior = np.zeros(truth.shape, dtype=bool)
    for value in values:
        inside = truth == value
        if inside.any():
            interior |= inside & (ndimage.distance_transform_edt(inside, sampling=spacing_zyx) > 7.0)
    organs_checked = set(np.unique(truth[interior])) - {0}
    assert len(organs_checked) >= 4, f"too few organ interiors to check: {organs_checked}"
    wrong = np.count_nonzero(result[interior] != truth[interior])
    assert wrong == 0, f"{wrong} of {interior.sum()} interior voxels changed label on the way to the model grid and back"


def test_to_model_grid_fills_outside_with_air():
    image = small_ct(size_xyz=(12, 12, 6), spacing=(3.0, 3.0, 9.0), direction=oblique_direction(30, 0))
    model_image = preprocess.to_model_grid(image, MODEL_SPACING, "LPS")
    array = sitk.GetArrayFromImage(model_image)
    # The corners of the axis-aligned grid lie outside the rotated input: they must be air, not 0 HU.
    assert array[0, 0, 0] == preprocess.AIR_HU
    assert array.max() > 300, "the bright structure inside got lost in resampling"


def _noise_ct(spacing, size_xyz=(48, 48, 24), seed=0) -> sitk.Image:
    """Soft tissue of 40 HU with white noise of SD 20 HU, as an int16 CT."""
    array = np.random.default_rng(seed).normal(40.0, 20.0, size_xyz[::-1])
    image = sitk.GetImageFromArray(np.round(array).astype(np.int16))
    image.SetSpacing(spacing)
    return image


def _interior(array: np.ndarray, margin: int = 2) -> np.ndarray:
    return array[margin:-margin, margin:-margin, margin:-margin]


def test_a_finer_ct_is_averaged_over_the_model_voxel_not_point_sampled():
    # 1 mm to 3 mm: the model grid points fall on input voxel centres, so point sampling would keep the
    # input's noise (SD 20 HU) while a CT reconstructed at 3 mm averages it away.
    image = _noise_ct((1.0, 1.0, 1.0))
    model = sitk.GetArrayFromImage(preprocess.to_model_grid(image, (3.0, 3.0, 3.0), "LPS")).astype(float)
    inside = _interior(model)
    assert inside.std() < 0.5 * 20.0, f"noise SD {inside.std():.1f} HU on the model grid: not averaged"
    assert abs(inside.mean() - 40.0) < 1.0, "averaging must keep the mean HU"


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (5.0, 5.0, 5.0)])
def test_a_ct_at_or_coarser_than_the_model_spacing_is_only_resampled(spacing):
    image = _noise_ct(spacing, size_xyz=(16, 16, 8))
    model = preprocess.to_model_grid(image, (3.0, 3.0, 3.0), "LPS")
    plain = io.resample_to(image, io.model_grid(image, (3.0, 3.0, 3.0), "LPS"), is_label=False,
                           default_value=preprocess.AIR_HU)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(model), sitk.GetArrayFromImage(plain))


def test_only_the_axes_finer_than_the_model_are_smoothed():
    # Fine in-plane, coarse slices: the slices must not be blurred into each other.
    array = np.full((8, 48, 48), 40.0)
    array[4:] = 400.0
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((1.0, 1.0, 3.0))
    model = sitk.GetArrayFromImage(preprocess.to_model_grid(image, (3.0, 3.0, 3.0), "LPS"))
    np.testing.assert_allclose(model[:4, 4:-4, 4:-4], 40.0, atol=0.5)
    np.testing.assert_allclose(model[4:, 4:-4, 4:-4], 400.0, atol=0.5)
