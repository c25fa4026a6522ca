"""Labelled cases in the Medical Segmentation Decathlon (MSD) layout: reading, checking and writing.

    FOLDER/dataset.json   {"labels": {"0": "background", "1": "liver", ...},
                           "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}
    FOLDER/imagesTr/*.nii.gz (CT in HU), FOLDER/labelsTr/*.nii.gz (labelmaps on the grid of their image)

Used by `isseg train` (training cases), `isseg evaluate` (cases with their truth) and the generators
of phantom and synthetic data sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import BadInputError
from .io import last_line, read_image

DATASET_FILE = "dataset.json"


def read_msd_dataset(folder: Path) -> tuple[list[tuple[str, Path, Path]], dict[int, str]]:
    """The (case id, image path, label path) list and the label names (value -> name) of an MSD folder.

    Raises BadInputError naming the file at fault."""
    folder = Path(folder)
    description = folder / DATASET_FILE
    if not description.is_file():
        raise BadInputError(f"'{description}' is missing: a dataset folder needs dataset.json, imagesTr/ and labelsTr/.")
    try:
        dataset = json.loads(description.read_text(encoding="utf-8"))
        names = {int(k): v for k, v in dataset["labels"].items()}
        entries = dataset["training"]
    except (json.JSONDecodeError, KeyError, ValueError, AttributeError) as error:
        raise BadInputError(f"'{description}' must be JSON with 'labels' ({{\"0\": \"background\", ...}}) and "
                            f"'training' entries ({error}).") from None
    cases = []
    for entry in entries:
        image_path, label_path = folder / entry["image"], folder / entry["label"]
        for path in (image_path, label_path):
            if not path.is_file():
                raise BadInputError(f"'{path}', listed in {description}, is missing. Add it or remove its entry.")
        case_id = Path(entry["image"]).name.split(".")[0]
        cases.append((case_id, image_path, label_path))
    if not cases:
        raise BadInputError(f"'{description}' lists no training cases.")
    return cases, names


def read_labelled_case(image_path: Path, label_path: Path, names: Mapping[int, str]) -> tuple[sitk.Image, sitk.Image]:
    """The CT (float32, HU) and its labelmap, checked: readable, on the same grid (the labelmap takes the
    image's geometry, so that rounding differences in the headers do not matter) and holding only the
    label values that `names` lists. Raises BadInputError naming the file at fault."""
    image = read_image(image_path)
    try:
        labels = sitk.ReadImage(str(label_path))
    except RuntimeError as error:
        raise BadInputError(f"Could not read the label map '{label_path}' ({last_line(error)}).") from None
    if labels.GetSize() != image.GetSize():
        raise BadInputError(f"'{label_path}' has size {labels.GetSize()} but its image '{image_path}' has "
                            f"{image.GetSize()}: a label map must be on the grid of its image.")
    unknown = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) - set(names)
    if unknown:
        raise BadInputError(f"'{label_path}' holds label values {sorted(unknown)} that dataset.json does not name. "
                            "Add them to 'labels' or fix the label map.")
    labels.CopyInformation(image)
    return image, labels


def write_msd_case(folder: Path, case_id: str, image: sitk.Image, labels: sitk.Image) -> dict:
    """Write one case as folder/imagesTr/<case_id>.nii.gz (int16 HU, rounded) and
    folder/labelsTr/<case_id>.nii.gz (uint8); returns its "training" entry for dataset.json."""
    folder = Path(folder)
    entry = {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
    for path in entry.values():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(sitk.Round(image), sitk.sitkInt16), str(folder / entry["image"]), useCompression=True)
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), str(folder / entry["label"]), useCompression=True)
    return entry


def write_msd_dataset_json(folder: Path, name: str, description: str, label_names: Mapping[int, str],
                           training: Sequence[dict], **extra) -> Path:
    """Write folder/dataset.json for cases written by `write_msd_case`; `extra` entries (e.g. how the
    cases were generated) are stored next to the MSD ones, which readers ignore. Returns its path."""
    dataset = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(value): label for value, label in sorted(label_names.items())},
        "numTraining": len(training),
        "numTest": 0,
        "training": list(training),
        "test": [],
        **extra,
    }
    path = Path(folder) / DATASET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return path
