"""Model packages: load, validate and save (see DESIGN.md, "Model package").

A package is a folder (or a .zip of one) with
- `model.json`: metadata, network (MONAI class name and arguments), input spacing (mm, x y z),
  orientation code, intensity window (HU), patch size (voxels, x y z), labels, training record;
- the weights in safetensors format (loading never executes code from the file);
- `atlas/manifest.json` and the atlas cases (image and label per case, on the model's spacing),
  each file with its SHA-256 checksum.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import archive, package_checks
from .errors import BadModelError, DiskError
from .networks import KIND_MONAI, NetworkKind, OutputClasses, kind_for
from .protocol import ATLAS_MANIFEST, MODEL_FILE, WEIGHTS_FILE

FORMAT_VERSION = 1


@dataclass
class AtlasCase:
    """One training case of the package: CT image (HU) and labelmap on the model's spacing."""

    case_id: str
    image_path: Path
    label_path: Path

    def read(self) -> tuple[sitk.Image, sitk.Image]:
        try:
            return (sitk.ReadImage(str(self.image_path), sitk.sitkFloat32),
                    sitk.ReadImage(str(self.label_path), sitk.sitkUInt8))
        except RuntimeError as error:
            raise BadModelError(f"Atlas case '{self.case_id}' cannot be read ({str(error).strip().splitlines()[-1]}). "
                                "The package is damaged: copy it again or rebuild it.") from None


@dataclass
class ModelPackage:
    """A loaded, validated model package. `config` is the parsed model.json."""

    root: Path
    config: dict
    atlas_cases: list[AtlasCase] = field(default_factory=list)
    _kind: NetworkKind | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[dict]:
        """Foreground labels: value, name, color (r, g, b in 0..1), terminology, optional threshold."""
        return self.config["labels"]

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background plus one per label."""
        return len(self.labels) + 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.config["input"]["spacing"])

    @property
    def orientation(self) -> str:
        return self.config["input"].get("orientation", "LPS")

    @property
    def network_kind(self) -> NetworkKind:
        """How this package's network is built, fed and read (isseg.networks)."""
        if self._kind is None:
            self._kind = kind_for(self.config)
        return self._kind

    def build_network(self) -> torch.nn.Module:
        """The package's network with its weights loaded, in eval mode on the CPU. When model.json groups
        the network's output channels into the package's classes (`output_classes`), the network is
        wrapped so that it outputs one logit per package class."""
        network = self.network_kind.build()
        weights_path = self.root / self.config.get("weights", WEIGHTS_FILE)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise BadModelError(
                f"The weights file '{weights_path}' is corrupt or not in safetensors format ({error}). "
                "Download or copy the model package again."
            ) from None
        load_weights(network, state, f"The weights in '{weights_path}'")
        groups = self.config["network"].get("output_classes")
        if groups is not None:
            network = OutputClasses(network, groups)
        return network.eval()


def load_weights(network: torch.nn.Module, state: dict, what: str) -> None:
    """Load `state` into `network`; BadModelError (naming `what`) when tensors are missing, extra or of
    another shape, i.e. the weights were trained for another network."""
    missing, unexpected = _state_mismatch(network, state)
    if missing or unexpected:
        raise BadModelError(
            f"{what} do not fit the network its description gives ({len(missing)} missing or differently shaped "
            f"and {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[:3]}). They were trained for "
            "another network (other plans or arguments): use the weights and the description that belong together.")
    network.load_state_dict(state, strict=False)  # shared tensors arrive through their first name


def _aliases(state: dict) -> dict[str, str]:
    """{name: first name of the same tensor} for a state dict in which some tensors appear under several
    names (nnU-Net's networks reach their encoder also as decoder.encoder and their convs as all_modules)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, tensor in state.items():
        identity = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in first:
            aliases[key] = first[identity]
        else:
            first.setdefault(identity, key)
    return aliases


def _state_mismatch(network: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = network.state_dict()
    aliases = _aliases(expected)
    missing = [k for k in expected if k not in aliases
               and (k not in state or tuple(state[k].shape) != tuple(expected[k].shape))]
    unexpected = [k for k in state if k not in expected]
    return missing, unexpected


def _unique_tensors(state: dict) -> dict:
    """The state without the second and later names of a shared tensor (safetensors stores each once)."""
    aliases = _aliases(state)
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}


sha256 = archive.sha256_file


def load(path: str | Path, *, check_atlas: bool = True) -> ModelPackage:
    """Load and validate a model package folder or .zip (the command layer turns the name `demo` into
    the path of the built-in demo package).

    Raises BadModelError, naming the file at fault and what to do, when anything is missing,
    corrupt or inconsistent. Weights are checked against the network when it is built.
    """
    root = Path(path)
    if not root.exists():
        raise BadModelError(f"Model package '{root}' does not exist. Pick a package folder or .zip, or use 'demo'.")
    if root.is_file():
        root = _extract_zip(root)
    config_path = root / MODEL_FILE
    if not config_path.is_file():
        raise BadModelError(f"'{root}' is not a model package: it has no {MODEL_FILE}. Pick the package folder itself.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadModelError(f"{config_path} is not valid JSON ({error}). The package is damaged: copy it again.") from None
    if not isinstance(config, dict):
        raise BadModelError(f"{config_path} does not hold a JSON object. The package is damaged: copy it again.")
    _validate_config(config, config_path)
    weights_path = package_checks.confined_path(root, config.get("weights", WEIGHTS_FILE), "weights", config_path)
    if not weights_path.is_file():
        raise BadModelError(f"The weights file '{weights_path}' is missing. Copy the complete package folder.")
    package = ModelPackage(root=root, config=config)
    if check_atlas:
        package.atlas_cases = _load_atlas(root, config)
    return package


def _validate_config(config: dict, config_path: Path) -> None:
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BadModelError(
            f"{config_path} has format_version {version!r}; this version of InferenceSpecificSeg reads "
            f"format {FORMAT_VERSION}. Update the extension or rebuild the package."
        )
    for key in ("name", "network", "input", "patch_size", "labels"):
        if key not in config:
            raise BadModelError(f"{config_path} lacks the required entry '{key}'. Rebuild the package with `isseg train`.")
    package_checks.check_config(config, config_path)
    labels = config["labels"]
    if "output_classes" in config["network"] or config["network"].get("kind", KIND_MONAI) != KIND_MONAI:
        _validate_output_classes(config, config_path)
        return
    out_channels = config["network"].get("args", {}).get("out_channels")
    if out_channels != len(labels) + 1:
        raise BadModelError(
            f"{config_path}: the network has {out_channels} output channels but {len(labels)} labels are listed "
            f"(expected {len(labels) + 1} = background + labels). The labels do not belong to these weights."
        )


def _validate_output_classes(config: dict, config_path: Path) -> None:
    """`output_classes`, when given, lists the network channels of background and of each label."""
    groups = config["network"].get("output_classes")
    if groups is None:
        return
    channels = [channel for group in groups for channel in group]
    if len(groups) != len(config["labels"]) + 1 or len(channels) != len(set(channels)) or 0 not in groups[0]:
        raise BadModelError(
            f"{config_path}: 'output_classes' must list the network channels of the background (with channel 0) "
            f"and of each of the {len(config['labels'])} labels, each channel once. Rebuild the package with "
            "`isseg package`.")


def _load_atlas(root: Path, config: dict) -> list[AtlasCase]:
    manifest_path = package_checks.confined_path(root, config.get("atlas", ATLAS_MANIFEST), "atlas manifest",
                                                 root / MODEL_FILE)
    if not manifest_path.is_file():
        raise BadModelError(
            f"The atlas manifest '{manifest_path}' is missing: inference-specific learning needs the training "
            "cases. Copy the complete package, including its atlas folder."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadModelError(f"The atlas manifest '{manifest_path}' is not valid JSON ({error}). "
                            "The package is damaged: copy it again.") from None
    label_values = {0} | {label["value"] for label in config["labels"]}
    entries = manifest.get("cases", []) if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise BadModelError(f"The atlas manifest '{manifest_path}' has no list of cases. Rebuild the package.")
    cases = [_atlas_case(root, manifest_path, entry, label_values) for entry in entries]
    if not cases:
        raise BadModelError(f"The atlas manifest '{manifest_path}' lists no cases. Rebuild the package with atlas cases.")
    return cases


def _atlas_case(root: Path, manifest_path: Path, entry, label_values: set[int]) -> AtlasCase:
    """One manifest entry, checked: keys present, files inside the package and matching their checksums,
    the image's header readable and the labels (read in full) only values that model.json lists."""
    try:
        case_id, checksums = str(entry["id"]), entry["sha256"]
        paths = {role: package_checks.confined_path(root, entry[role], f"atlas {role}", manifest_path,
                                                    base=manifest_path.parent) for role in ("image", "label")}
    except (KeyError, TypeError):
        raise BadModelError(f"The atlas manifest '{manifest_path}' has an entry without id, image, label or sha256: "
                            f"{str(entry)[:200]}. Rebuild the package.") from None
    for role, file_path in paths.items():
        if not file_path.is_file():
            raise BadModelError(f"Atlas file '{file_path}' is missing. Copy the complete package.")
        if not isinstance(checksums, dict) or sha256(file_path) != checksums.get(role):
            raise BadModelError(
                f"Atlas file '{file_path}' does not match its checksum in {manifest_path}: it was changed or "
                "damaged. Copy the package again."
            )
    case = AtlasCase(case_id, paths["image"], paths["label"])
    image, labels = case.read()
    if image.GetDimension() != 3 or image.GetSize() != labels.GetSize():
        raise BadModelError(f"Atlas case '{case_id}': the image ({image.GetSize()}) and the labels ({labels.GetSize()}) "
                            "must be 3D volumes of the same size. Rebuild the package.")
    extra = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))} - label_values
    if extra:
        raise BadModelError(
            f"Atlas case '{case_id}' has label values {sorted(extra)} that model.json does not list: "
            "the atlas and the model disagree. Rebuild the package."
        )
    return case


def _extract_zip(zip_path: Path) -> Path:
    """The root of a zipped package, unpacked (once, verified on every use) into the cache."""
    if not zipfile.is_zipfile(zip_path):
        raise BadModelError(f"'{zip_path}' is neither a package folder nor a .zip file. Pick the package folder or its .zip.")
    try:
        entry = archive.unpack_cached(zip_path, cache_dir() / "packages")
    except archive.ArchiveSpaceError as error:
        raise DiskError(str(error)) from None
    except archive.ArchiveError as error:
        raise BadModelError(f"{error} Use a package made by `isseg train` or `isseg package`.") from None
    return archive.shallowest_folder_with(entry, MODEL_FILE)


def cache_dir() -> Path:
    """Where unpacked packages and the generated demo atlas live ($ISSEG_CACHE or ~/.cache/isseg);
    created private to the user (mode 0700, whatever the umask)."""
    folder = Path(os.path.expanduser(os.environ.get("ISSEG_CACHE", Path.home() / ".cache" / "isseg")))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def write_atlas(atlas_dir: Path, cases: list[tuple[str, sitk.Image, sitk.Image]]) -> Path:
    """Write atlas cases (id, image in HU, labelmap) as NRRD files plus a manifest with checksums."""
    atlas_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for case_id, image, labels in cases:
        image_name, label_name = f"{case_id}_image.nrrd", f"{case_id}_label.nrrd"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(atlas_dir / image_name), True)
        sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), str(atlas_dir / label_name), True)
        values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))]
        entries.append({
            "id": case_id, "image": image_name, "label": label_name, "label_values": values,
            "sha256": {"image": sha256(atlas_dir / image_name), "label": sha256(atlas_dir / label_name)},
        })
    manifest = atlas_dir / "manifest.json"
    manifest.write_text(json.dumps({"cases": entries}, indent=1), encoding="utf-8")
    return manifest


def save(root: Path, config: dict, network: torch.nn.Module | dict, atlas_cases=None) -> Path:
    """Write a package folder: model.json, safetensors weights (of a network or a state dict) and
    (optionally) the atlas cases."""
    root.mkdir(parents=True, exist_ok=True)
    config = dict(config, format_version=FORMAT_VERSION, weights=WEIGHTS_FILE)
    state = _unique_tensors(network if isinstance(network, dict) else network.state_dict())
    save_file(state, str(root / WEIGHTS_FILE))
    if atlas_cases is not None:
        write_atlas(root / "atlas", atlas_cases)
        config["atlas"] = ATLAS_MANIFEST
    (root / MODEL_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return root


def copy_without_atlas(source: Path, target: Path) -> None:
    """Copy model.json and weights of a package (used to place the built-in model in the cache)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, WEIGHTS_FILE):
        shutil.copy2(source / name, target / name)
