"""Reading one DICOM series with its slice spacing checked.

A series with a missing slice is read by ITK as if its slices were evenly spaced, which stretches the
anatomy silently (e.g. 4.13 mm instead of 4 mm for one missing slice in 32). Here the Image Position
(Patient) of every slice is projected on the slice normal; slice distances that differ from the
typical (median) one by more than SPACING_TOLERANCE are a gap. A gap is refused, naming the missing
position, unless the caller allows gaps: then the missing slices are interpolated linearly between
their neighbours onto an evenly spaced grid, and their positions are returned so the user can be told.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import BadInputError

SPACING_TOLERANCE = 0.1  # fraction of the typical slice distance
POSITION_TAG, ORIENTATION_TAG = "0020|0032", "0020|0037"


def series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in `folder`, ordered along the slice normal by GDCM."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise BadInputError(f"No DICOM series found in folder '{folder}'. Point to the folder that holds the slices.")
    if len(series_ids) > 1:
        raise BadInputError(
            f"Folder '{folder}' holds {len(series_ids)} DICOM series; put the CT series in a folder of its own.")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))


def slice_positions(files: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(n, 3) Image Position (Patient) of each file (mm) and the unit slice normal, or None when a
    file lacks the position or orientation tags (the spacing cannot be checked then)."""
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey(POSITION_TAG) and reader.HasMetaDataKey(ORIENTATION_TAG)):
            return None
        positions.append([float(v) for v in reader.GetMetaData(POSITION_TAG).split("\\")])
        if normal is None:
            cosines = np.array([float(v) for v in reader.GetMetaData(ORIENTATION_TAG).split("\\")])
            normal = np.cross(cosines[:3], cosines[3:])
    return np.array(positions), normal / np.linalg.norm(normal)


def read_series(folder: Path, allow_gaps: bool = False) -> tuple[sitk.Image, list[tuple[float, float, float]]]:
    """The series in `folder` as one image (HU) and the positions (mm, x y z) of slices that were
    missing and interpolated (empty unless `allow_gaps`). Raises BadInputError for a gap otherwise,
    for duplicated slices, and for files that cannot be read."""
    files = series_files(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise BadInputError(f"Could not read the DICOM series in '{folder}' ({str(error).strip().splitlines()[-1]}). "
                            "Export the series again.") from None
    geometry = slice_positions(files) if len(files) > 2 else None
    if geometry is None:
        return image, []
    positions, normal = geometry
    along = positions @ normal
    if along[-1] < along[0]:  # files ordered against the normal: measure along the file order
        along, normal = -along, -normal
    distances = np.diff(along)
    typical = float(np.median(distances))
    if np.any(distances <= SPACING_TOLERANCE * abs(typical)):
        first = int(np.argmax(distances <= SPACING_TOLERANCE * abs(typical)))
        raise BadInputError(f"The DICOM series in '{folder}' holds two slices at the same position "
                            f"({_mm(positions[first])}: '{Path(files[first]).name}' and '{Path(files[first + 1]).name}'). "
                            "Export the series again without duplicates.")
    missing = [positions[k] + normal * typical * step
               for k in np.flatnonzero(np.abs(distances - typical) > SPACING_TOLERANCE * typical)
               for step in range(1, max(2, int(round(distances[k] / typical))))]
    if not missing:
        return image, []
    if not allow_gaps:
        raise BadInputError(
            f"The DICOM series in '{folder}' has a gap: no slice at {_mm(missing[0])}"
            f"{f' and {len(missing) - 1} more positions' if len(missing) > 1 else ''} (slices are {typical:g} mm apart "
            "elsewhere). Reading it anyway would distort the anatomy. Export the complete series, or pass "
            "--allow-slice-gaps to fill the missing slices by interpolation.")
    return _evenly_spaced(image, along - along[0], typical), [tuple(float(v) for v in p) for p in missing]


def _evenly_spaced(image: sitk.Image, offsets: np.ndarray, spacing: float) -> sitk.Image:
    """The slices of `image` (at `offsets` mm along the normal from the first) interpolated linearly onto
    slices `spacing` mm apart; origin and direction kept."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (slice, y, x)
    targets = np.arange(int(round(offsets[-1] / spacing)) + 1) * spacing
    upper = np.clip(np.searchsorted(offsets, targets, side="right"), 1, len(offsets) - 1)
    weight = ((targets - offsets[upper - 1]) / (offsets[upper] - offsets[upper - 1])).clip(0, 1)[:, None, None]
    result = sitk.GetImageFromArray((1 - weight) * array[upper - 1] + weight * array[upper])
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    result.SetSpacing((*image.GetSpacing()[:2], spacing))
    return result


def _mm(point) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ") mm"
