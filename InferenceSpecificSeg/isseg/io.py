"""Reading, writing and resampling CT volumes and labelmaps with SimpleITK.

Images stay `SimpleITK.Image` objects so that origin, spacing (mm) and direction travel
with the voxels. Arrays taken from them are (z, y, x), as SimpleITK gives them.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .dicom_series import read_series
from .errors import BadInputError, DiskError

# A write that fails with less free space than this on the disk failed for want of space.
LOW_SPACE_BYTES = 64 * 2**20


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D scalar image from a NIfTI/NRRD/MHA file or a folder holding one DICOM series.

    Raises BadInputError with a message saying what to do when the path cannot be read
    or does not hold a 3D scalar image.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"Input '{path}' does not exist. Check the path and try again.")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise BadInputError(
            f"Could not read '{path}' as an image ({last_line(error)}). "
            "Give a NIfTI (.nii/.nii.gz), NRRD, MHA file or a folder with one DICOM series."
        ) from None
    return check_ct_volume(image, str(path))


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in `folder`; a series with a missing slice is refused (dicom_series)."""
    return read_series(folder)[0]


def last_line(error: Exception) -> str:
    """The last non-empty line of an error's message, or the error's type name when it is empty.
    SimpleITK's messages start with the C++ source location and end with what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_ct_volume(image: sitk.Image, name: str = "input") -> sitk.Image:
    """Return `image` as float32 if it is a non-empty 3D scalar CT volume, else raise BadInputError."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInputError(
            f"'{name}' has {image.GetNumberOfComponentsPerPixel()} components per voxel (color or vector image). "
            "Select a grayscale CT volume."
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        size = image.GetSize()
    if image.GetDimension() != 3:
        raise BadInputError(
            f"'{name}' is a {image.GetDimension()}D image of size {size}; a 3D CT volume is needed. "
            "For a time series, select one time point."
        )
    if min(size) < 2:
        raise BadInputError(
            f"'{name}' has size {size}: it is a single slice, not a volume. Load the whole CT series."
        )
    array = sitk.GetArrayViewFromImage(image)
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    if finite.size == 0:
        raise BadInputError(f"'{name}' holds no numbers (every voxel is NaN or infinite). Export the image again.")
    low, high = float(finite.min()), float(finite.max())
    if high == low:
        raise BadInputError(
            f"'{name}' is empty (every voxel is {low:g}). Select the CT volume that holds the patient."
        )
    # A CT in HU has air (about -1000) around or inside the patient, or padding below it; MR and
    # other images start at 0 and would give a confident but meaningless segmentation.
    if high - low < 50 or low > -300 or high < -200 or high - low > 20000:
        raise BadInputError(
            f"'{name}' has values from {low:g} to {high:g}, which do not look like CT Hounsfield units "
            "(air about -1000, soft tissue 0 to 100). Select a CT volume in HU; if it is a CT, check "
            "that the rescale slope and intercept were applied when it was loaded."
        )
    return sitk.Cast(image, sitk.sitkFloat32)


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write `image` to `path` so that a reader never sees a half-written file.

    The image is written to a temporary file in the same folder, read back and renamed over `path`.
    Raises DiskError when the folder is not writable or the disk is full (no temporary file is left).
    """
    path = Path(path)
    suffix = "".join(path.suffixes) or ".nrrd"
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
        os.close(handle)
        sitk.WriteImage(image, temporary, compress)
        if not _reads_back_as(temporary, image):
            raise OSError(errno.EIO, "the file written is incomplete")
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if "temporary" in locals() and os.path.exists(temporary):
            os.remove(temporary)
        raise write_error(path, error) from None
    return path


def _reads_back_as(path: str, image: sitk.Image) -> bool:
    """True when the file at `path` holds `image`'s voxels. ITK's writers can leave a file cut short on a
    full disk without an error (NrrdIO ignores a failed final flush), so a written file is read back."""
    try:
        written = sitk.ReadImage(path)
    except RuntimeError:
        return False
    return written.GetSize() == image.GetSize() and np.array_equal(sitk.GetArrayViewFromImage(written),
                                                                   sitk.GetArrayViewFromImage(image))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file through a temporary file and a rename (same guarantees as write_image_atomic)."""
    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except OSError as error:
        if "temporary" in locals() and os.path.exists(temporary):
            os.remove(temporary)  # e.g. the disk is full: leave no temporary file behind
        raise write_error(path, error) from None
    return path


def write_error(path: Path, error: Exception) -> DiskError:
    """The DiskError for a failed write of `path`; it says when the disk is full: ENOSPC/EDQUOT, or less than
    LOW_SPACE_BYTES free after the failure (ITK's writers report a failed flush without the errno)."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else last_line(error)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if full or (free is not None and free < LOW_SPACE_BYTES):
        space = "" if free is None else f", {free / 2**20:.1f} MiB free"
        return DiskError(f"Could not write '{path}': no space left on its disk ({reason}{space}). Free disk space or "
                         "choose an output folder on another disk.")
    return DiskError(f"Could not write '{path}' ({reason}). Free disk space or choose another output folder.")


def reorient(image: sitk.Image, orientation: str) -> sitk.Image:
    """Permute/flip axes so the direction is closest to the 3-letter code (e.g. 'LPS', 'RAS'); no interpolation."""
    return sitk.DICOMOrient(image, orientation)


def model_grid(image: sitk.Image, spacing_mm: Sequence[float], orientation: str) -> sitk.Image:
    """An empty image on the model's grid covering `image`: axis-aligned to `orientation`, `spacing_mm` (x, y, z)."""
    size, origin, target_direction = model_grid_geometry(image, spacing_mm, orientation)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing_mm))
    grid.SetDirection(tuple(target_direction.ravel()))
    grid.SetOrigin(tuple(origin))
    return grid


def model_grid_geometry(image: sitk.Image, spacing_mm: Sequence[float], orientation: str):
    """(size (x, y, z voxels), origin (mm), 3x3 direction) of model_grid, computed without allocating it."""
    oriented = reorient(image, orientation)
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    # Snap the near-axis-aligned direction to the exact axes of the orientation code: the model
    # was trained on axis-aligned volumes, so oblique inputs are resampled onto such a grid.
    target_direction = np.zeros((3, 3))
    for column in range(3):
        row = int(np.argmax(np.abs(direction[:, column])))
        target_direction[row, column] = np.sign(direction[row, column])
    corners = _physical_corners(image)
    index_coords = corners @ target_direction  # coordinates along the target axes, mm
    low, high = index_coords.min(axis=0), index_coords.max(axis=0)
    spacing = np.asarray(spacing_mm, dtype=float)
    size = np.maximum(np.ceil((high - low) / spacing).astype(int), 1)
    origin = target_direction @ (low + spacing / 2)
    return size, origin, target_direction


def _physical_corners(image: sitk.Image) -> np.ndarray:
    """(8, 3) physical coordinates (mm) of the outer voxel-edge corners of `image`."""
    size = np.array(image.GetSize())
    corners = []
    for i in (-0.5, size[0] - 0.5):
        for j in (-0.5, size[1] - 0.5):
            for k in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((i, j, k)))
    return np.array(corners)


def resample_to(image: sitk.Image, reference: sitk.Image, *, is_label: bool, default_value: float = 0.0) -> sitk.Image:
    """Resample `image` onto the grid of `reference` (size, origin, spacing, direction).

    Labels use nearest neighbour, intensities and probabilities linear interpolation.
    Voxels outside `image` get `default_value` (e.g. -1024 HU for CT, 0 for labels).
    """
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default_value, image.GetPixelID())


def labelmap_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 labelmap image from a (z, y, x) array, with the geometry of `reference`."""
    labels = sitk.GetImageFromArray(array.astype(np.uint8))
    labels.CopyInformation(reference)
    return labels
