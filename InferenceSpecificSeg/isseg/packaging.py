"""`isseg package`: a model package from a network the user already runs plus the user's own labelled cases.

network: an nnU-Net v2 trained-model folder, a MONAI bundle folder, or an isseg package; its weights
are read once, here, and stored as safetensors. atlas: a folder of labelled CT cases (MSD layout, or
pairs `<case>_image.<ext>` / `<case>_label.<ext>`), each resampled onto the network's own model grid
(images linearly, labels per label with soft resampling, so thin structures survive).

Labels: atlas labels are mapped to the network's labels by name (or value, or an explicit mapping).
An atlas label that maps to nothing, or two atlas labels mapping to one network label, is refused;
network labels the atlas does not contain are reported and kept out of fine-tuning: they join the
background class (model.json `output_classes`), since the atlas cannot teach them. An isseg package
given as the network keeps its per-label probability thresholds.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import model_package, protocol
from .datasets import DATASET_FILE, read_msd_dataset
from .errors import BadInputError, BadModelError
from .io import read_image
from .label_resampling import resample_labels_onto
from .networks import NetworkKind, kind_for
from .terminology import describe_label

ATLAS_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha")
NNUNET_CITATION = ("Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring "
                   "method for deep learning-based biomedical image segmentation. Nat Methods 18, 203-211 (2021).")


@dataclass
class SourceNetwork:
    """A network read for packaging: model.json `network` entry, weights, labels {channel: name},
    what model.json should say about it (name, description, license, citation, input, patch_size), and
    the probability thresholds tuned for some of its labels {channel: threshold} (an isseg package's)."""

    network: dict
    weights: dict
    labels: dict[int, str]
    about: dict = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)


def read_network(path: Path, fold: str | None = None, configuration: str | None = None,
                 orientation: str | None = None) -> SourceNetwork:
    """Read the network at `path`: an isseg package (model.json), a MONAI bundle (configs/), else an
    nnU-Net v2 trained-model folder (`fold`, `configuration`, `orientation`: see
    networks.nnunet.read_trained_model). Raises BadModelError saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise BadModelError(f"'{path}' is not a folder. Give an nnU-Net v2 trained-model folder, a MONAI "
                            "bundle folder or an isseg package folder.")
    if (path / protocol.MODEL_FILE).is_file():
        return _read_isseg_package(path)
    if (path / "configs").is_dir():
        from .networks import bundle

        entry, weights, labels, about = bundle.read_bundle(path)
        return SourceNetwork(entry, weights, labels, dict(about, **bundle.model_summary(entry)))
    from .networks import nnunet

    entry, weights, labels = nnunet.read_trained_model(path, fold, configuration, orientation)
    about = {"name": entry["plans"].get("dataset_name", path.name), "citation": NNUNET_CITATION,
             "description": f"nnU-Net v2 {entry['configuration']}, fold {entry['fold']}, trainer {entry['trainer']}",
             **{key: entry["dataset_json"][key] for key in ("license", "licence", "reference") if key in entry["dataset_json"]},
             **nnunet.model_summary(entry)}
    return SourceNetwork(entry, weights, labels, about)


def _read_isseg_package(path: Path) -> SourceNetwork:
    package = model_package.load(path, check_atlas=False)
    try:
        weights = load_file(str(path / package.config.get("weights", model_package.WEIGHTS_FILE)))
    except (SafetensorError, OSError) as error:
        raise BadModelError(f"The weights of the package '{path}' cannot be read ({error}).") from None
    network = dict(package.config["network"])
    groups = network.pop("output_classes", None)
    labels = {label["value"]: label["name"] for label in package.labels}
    thresholds = {label["value"]: label["threshold"] for label in package.labels if label.get("threshold") is not None}
    if groups is not None:  # the package's classes become the channels; keep the network's grouping
        network["class_channels"] = groups
    about = {key: package.config[key] for key in ("name", "description", "license", "citation", "input", "patch_size")
             if key in package.config}
    return SourceNetwork(network, weights, labels, about, thresholds)


def read_atlas_folder(folder: Path) -> tuple[list[tuple[str, Path, Path]], dict[int, str] | None]:
    """The (case id, image, labelmap) files and the label names (None if the folder names none) of an
    atlas folder: MSD layout (dataset.json, imagesTr/, labelsTr/) or pairs <case>_image / <case>_label."""
    folder = Path(folder)
    if (folder / DATASET_FILE).is_file():
        return read_msd_dataset(folder)
    cases = []
    for image_path in sorted(folder.iterdir()):
        suffix = next((s for s in ATLAS_SUFFIXES if image_path.name.endswith("_image" + s)), None)
        if suffix:
            case_id = image_path.name[: -len("_image" + suffix)]
            label_path = folder / f"{case_id}_label{suffix}"
            if not label_path.is_file():
                raise BadInputError(f"Atlas image '{image_path}' has no labelmap '{label_path.name}' next to it.")
            cases.append((case_id, image_path, label_path))
    if not cases:
        raise BadInputError(f"'{folder}' holds no atlas cases: give an MSD-layout folder (dataset.json, imagesTr/, "
                            "labelsTr/) or pairs of files <case>_image.nii.gz and <case>_label.nii.gz.")
    names_path = folder / "labels.json"
    names = {int(k): v for k, v in json.loads(names_path.read_text(encoding="utf-8")).items()} \
        if names_path.is_file() else None
    return cases, names


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _parse_mapping(spec: str) -> dict[str, str]:
    """'--labels' as a JSON file {"atlas": "network"} or 'atlas=network,...' (values or names)."""
    path = Path(spec)
    if path.is_file():
        return {str(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise BadInputError(f"--labels '{spec}' must be 'ATLAS=NETWORK,...' (label values or names) or a JSON file.")
    return {a.strip(): n.strip() for a, n in pairs}


def _resolve(token: str, names: dict[int, str] | None) -> int | None:
    if token.isdigit():
        return int(token)
    by_name = {_normalized(name): value for value, name in (names or {}).items()}
    return by_name.get(_normalized(token))


def map_labels(network_labels: dict[int, str], atlas_names: dict[int, str] | None, atlas_values: set[int],
               spec: str | None = None) -> tuple[dict[int, int], list[int]]:
    """{atlas value: network value} for every non-zero atlas value, and the network values left unmapped.

    By name when the atlas names its labels, else by value; `spec` entries (values or names) add to or
    override that. Raises BadInputError when an
    atlas label maps to nothing or two atlas labels would merge into one network label."""
    if atlas_names:
        by_name = {_normalized(name): value for value, name in network_labels.items()}
        mapping = {value: by_name[_normalized(name)] for value, name in atlas_names.items()
                   if value and _normalized(name) in by_name}
    else:
        mapping = {value: value for value in atlas_values if value in network_labels}
    for atlas_token, network_token in (_parse_mapping(spec) if spec else {}).items():
        atlas_value = _resolve(atlas_token, atlas_names)
        network_value = _resolve(network_token, network_labels)
        if atlas_value is None or network_value not in network_labels:
            raise BadInputError(f"--labels: '{atlas_token}={network_token}' names an atlas or network label that "
                                f"does not exist (network labels: {_listing(network_labels)}).")
        mapping[atlas_value] = network_value
    _check_mapping(mapping, network_labels, atlas_names, atlas_values)
    return mapping, sorted(set(network_labels) - set(mapping.values()))


def _listing(labels: dict[int, str]) -> str:
    shown = ", ".join(f"{v}={n}" for v, n in sorted(labels.items())[:40])
    return shown + (", ..." if len(labels) > 40 else "")


def _check_mapping(mapping, network_labels, atlas_names, atlas_values) -> None:
    unmapped = sorted(v for v in atlas_values if v and v not in mapping)
    if unmapped:
        described = ", ".join(f"{v} ({(atlas_names or {}).get(v, 'unnamed')})" for v in unmapped)
        raise BadInputError(
            f"Atlas labels {described} match no label of the network (network labels: {_listing(network_labels)}). "
            "Map them with --labels ATLAS=NETWORK,... (values or names), or remove them from the atlas.")
    targets = list(mapping.values())
    merged = sorted({t for t in targets if targets.count(t) > 1})
    if merged:
        raise BadInputError(f"Several atlas labels map to the network labels {merged}: that would merge them. "
                            "Give a one-to-one --labels mapping.")


def package_labels(network_labels: dict[int, str], mapping: dict[int, int], unmapped: list[int],
                   thresholds: dict[int, float] | None = None):
    """(model.json labels, output_classes, {atlas value: package value}) for a label mapping: package
    values 1..K follow the network's order; class 0 groups the background and the unmapped labels.
    A network label's threshold ({network value: probability}) stays with it."""
    mapped = sorted(set(mapping.values()))
    value_of = {network_value: k for k, network_value in enumerate(mapped, start=1)}
    thresholds = thresholds or {}
    labels = [dict(describe_label(value_of[v], network_labels[v]), network_value=v,
                   **({"threshold": thresholds[v]} if v in thresholds else {})) for v in mapped]
    groups = [[0, *unmapped]] + [[v] for v in mapped]
    return labels, groups, {a: value_of[n] for a, n in mapping.items()}


def atlas_case(kind: NetworkKind, case_id: str, image_path: Path, label_path: Path, lookup: dict[int, int]):
    """(case id, image HU, labelmap) on the network's model grid for this case; labels relabelled to the
    package's values through `lookup` and resampled per label (thin structures kept)."""
    image = read_image(image_path)
    labels = sitk.ReadImage(str(label_path))
    if labels.GetSize() != image.GetSize():
        raise BadInputError(f"'{label_path}' has size {labels.GetSize()} but its image '{image_path}' has "
                            f"{image.GetSize()}: a labelmap must be on the grid of its image.")
    labels.CopyInformation(image)
    values = sitk.GetArrayFromImage(labels).astype(np.int64)
    table = np.zeros(max(int(values.max()), max(lookup, default=0)) + 1, dtype=np.uint8)
    for atlas_value, package_value in lookup.items():
        table[atlas_value] = package_value
    relabelled = sitk.GetImageFromArray(table[values])
    relabelled.CopyInformation(image)
    return case_on_model_grid(kind, case_id, image, relabelled)


def case_on_model_grid(kind: NetworkKind, case_id: str, image: sitk.Image, labels: sitk.Image):
    """(case id, image HU, labelmap) of a labelled CT (labels in the package's values, on the image's grid)
    put on the network's model grid: the image as the network prepares a CT, the labels per label."""
    prepared = kind.prepare(image)
    return case_id, kind.atlas_image(image, prepared), resample_labels_onto(labels, prepared.model_image)


def _network_entry(source: SourceNetwork, groups: list[list[int]]) -> dict:
    """model.json `network`: the source's entry with `output_classes` in network channels (an isseg
    package as source already groups its channels: the new groups are unions of those)."""
    network = dict(source.network)
    class_channels = network.pop("class_channels", None)
    if class_channels is not None:
        groups = [sorted(channel for c in group for channel in class_channels[c]) for group in groups]
    network["output_classes"] = groups
    return network


def _write_new_folder(output: Path, write) -> None:
    """Run `write(staging)` on a hidden sibling folder, then rename it to `output`; nothing is left on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        write(staging)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_package(source: SourceNetwork, atlas_folder: Path, output: Path, *, mapping_spec: str | None = None,
                  name: str | None = None, license: str | None = None, citation: str | None = None,
                  on_case=lambda index, total, case_id: None) -> dict:
    """Write the package to `output`, a folder that must not exist yet (it appears complete or not at all);
    returns a summary (labels, unmapped network labels, atlas size)."""
    output = Path(output)
    if output.exists():
        raise BadInputError(f"'{output}' already exists; isseg package writes a new folder and never replaces one. "
                            "Choose another --output or remove that folder first.")
    cases, atlas_names = read_atlas_folder(atlas_folder)
    atlas_values = set()
    for _, _, label_path in cases:
        atlas_values |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))).tolist())
    mapping, unmapped = map_labels(source.labels, atlas_names, atlas_values, mapping_spec)
    labels, groups, lookup = package_labels(source.labels, mapping, unmapped, source.thresholds)
    about = source.about
    config = {
        "name": name or about.get("name", "model"), "version": about.get("version", "1"),
        "description": about.get("description", ""),
        "license": license or about.get("license") or about.get("licence") or "unknown (ask the network's authors)",
        "citation": citation or about.get("citation") or about.get("reference", ""),
        "network": _network_entry(source, groups), "input": about["input"], "patch_size": about["patch_size"],
        "labels": labels,
        "training": {"how": "isseg package: a pretrained network with the user's own labelled cases as atlas",
                     "atlas_source": str(Path(atlas_folder).resolve()), "atlas_cases": len(cases),
                     "label_mapping": {str(a): source.labels[n] for a, n in sorted(mapping.items())},
                     "unmapped_network_labels": [source.labels[v] for v in unmapped]},
    }
    kind = kind_for(config)
    model_package.load_weights(kind.build(), source.weights, "the network's checkpoint")
    atlas = []
    for index, (case_id, image_path, label_path) in enumerate(cases):
        on_case(index, len(cases), case_id)
        atlas.append(atlas_case(kind, case_id, image_path, label_path, lookup))
    _write_new_folder(output, lambda staging: model_package.save(staging, config, source.weights, atlas))
    return {"labels": [label["name"] for label in labels], "unmapped_network_labels": config["training"]["unmapped_network_labels"],
            "atlas_cases": len(cases), "network_kind": config["network"].get("kind", "monai")}
