"""Checks of the input CT against what the run needs, before any work starts.

In: the image as read (HU, SimpleITK) and the model package's spacing, orientation and classes.
- Non-finite voxels (NaN, inf): up to MAX_NON_FINITE_FRACTION of the volume they are replaced by air,
  with a `warning` event that says how many; more, and the image is refused as damaged (exit 3).
  (Left in, a single NaN voxel spreads through the network's normalisation and blanks the whole result.)
- Field of view: on the model's grid the image must span MIN_GRID_VOXELS voxels along every axis.
- Memory: the model grid's class probabilities must fit in the available main memory (exit 4: the
  package's spacing is too fine for this CT on this machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicom_series import read_series
from .errors import BadInputError, BadModelError
from .events import EventWriter
from .io import check_ct_volume, model_grid_geometry, read_image
from .validation import (AIR_HU, GRID_BYTES_PER_CLASS_VOXEL, MAX_NON_FINITE_FRACTION, MIN_GRID_VOXELS,
                         available_memory_bytes, format_bytes)


def read_input(path: Path, events: EventWriter, allow_slice_gaps: bool = False) -> sitk.Image:
    """The input CT (float32, HU) with every voxel finite; warnings for what was repaired."""
    if path.is_dir():
        image, filled = read_series(path, allow_slice_gaps)
        if filled:
            events.emit("warning", message=f"The DICOM series has {len(filled)} missing slices (first at "
                                           f"{tuple(round(v, 1) for v in filled[0])} mm); they were interpolated.")
        image = check_ct_volume(image, str(path))
    else:
        image = read_image(path)
    return replace_non_finite(image, events, str(path))


def replace_non_finite(image: sitk.Image, events: EventWriter, name: str) -> sitk.Image:
    """`image` with NaN/inf voxels set to air (AIR_HU) and a `warning` event, or BadInputError when more
    than MAX_NON_FINITE_FRACTION of the voxels are not finite."""
    array = sitk.GetArrayFromImage(image)
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count == 0:
        return image
    if count > MAX_NON_FINITE_FRACTION * array.size:
        raise BadInputError(f"'{name}' has {count} voxels that are not numbers (NaN or infinite), "
                            f"{100 * count / array.size:.1f}% of the volume: the image is damaged. Export it again.")
    array[bad] = AIR_HU
    repaired = sitk.GetImageFromArray(array)
    repaired.CopyInformation(image)
    events.emit("warning", message=f"'{name}' has {count} voxels that are not numbers (NaN or infinite); "
                                   f"they were treated as air ({AIR_HU:g} HU).")
    return repaired


def check_model_grid(image: sitk.Image, spacing_mm, orientation: str, num_classes: int) -> tuple[int, int, int]:
    """Size (x, y, z voxels) of `image` on the model's grid; BadInputError when the field of view is too
    small for the model, BadModelError when the grid's probabilities cannot fit in memory."""
    size = tuple(int(n) for n in model_grid_geometry(image, spacing_mm, orientation)[0])
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    if min(size) < MIN_GRID_VOXELS:
        raise BadInputError(
            f"The image covers only {' x '.join(f'{e:.1f}' for e in extent)} mm; at the model's spacing of "
            f"{' x '.join(f'{s:g}' for s in spacing_mm)} mm that is {' x '.join(map(str, size))} voxels, and the model "
            f"needs at least {MIN_GRID_VOXELS} along every axis. Check the image spacing (a wrong spacing, e.g. 0.1 mm "
            "instead of 1 mm, shrinks the patient) or select a larger field of view.")
    needed = int(np.prod(size, dtype=np.float64)) * num_classes * GRID_BYTES_PER_CLASS_VOXEL
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise BadModelError(
            f"At the model's spacing of {' x '.join(f'{s:g}' for s in spacing_mm)} mm this CT becomes "
            f"{' x '.join(map(str, size))} voxels, whose class probabilities alone need {format_bytes(needed)}; "
            f"{format_bytes(available)} of memory are available. The package's input.spacing is too fine for this "
            "CT: use a package with a coarser spacing, or crop the CT to the region of interest.")
    return size
