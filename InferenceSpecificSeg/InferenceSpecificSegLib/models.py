"""The model list of the panel: the built-in demo model and the packages the user installed.

A model package is a folder (or a .zip of one) with model.json, safetensors weights and an atlas
(see DESIGN.md, "Model package"). Checks here only read model.json and look for the files it names,
without torch, so that the panel can refuse a wrong folder at once; the worker validates fully
(checksums, weights against the network) when it loads the package.
"""

import json
import logging
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from isseg import archive  # standard library only, like isseg.protocol
from isseg.protocol import EVENT_DONE, EVENT_ERROR, EVENT_PROGRESS, EXIT_BAD_MODEL, EXIT_DONE

from .i18n import tr as _

DEMO_MODEL = "demo"
MODEL_FILE = "model.json"
DEFAULT_WEIGHTS_FILE = "model.safetensors"
DEFAULT_ATLAS_MANIFEST = "atlas/manifest.json"
REQUIRED_ENTRIES = ("name", "network", "input", "patch_size", "labels")


class ModelPackageError(Exception):
    """A folder or .zip is not a usable model package; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One item of the model list: `location` is what the worker's --model gets ("demo" or a package
    folder), `title` what the list shows."""

    location: str
    title: str


def demoModel() -> ModelEntry:
    return ModelEntry(DEMO_MODEL, _("Demo (built-in, synthetic abdomen: liver, spleen, kidneys, aorta, gallbladder)"))


def installedModelsDirectory(settingsDirectory: Union[str, Path]) -> Path:
    """Where installed packages live: <Slicer settings folder>/InferenceSpecificSeg/models."""
    return Path(settingsDirectory) / "InferenceSpecificSeg" / "models"


def describePackage(folder: Union[str, Path]) -> ModelEntry:
    """Check that `folder` holds a model package (model.json with the required entries and labels, the
    weights file and the atlas files it names) and return its list entry. Raises ModelPackageError."""
    folder = Path(folder)
    configPath = folder / MODEL_FILE
    if not configPath.is_file():
        raise ModelPackageError(_("'{folder}' is not a model package: it has no {file}. Pick the package folder itself "
                                  "(the one that contains {file}) or its .zip file.").format(folder=folder, file=MODEL_FILE))
    try:
        config = json.loads(configPath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelPackageError(_("{file} is not readable JSON ({error}). The package is damaged: copy it again.").format(
            file=configPath, error=error)) from None
    if not isinstance(config, dict):
        raise ModelPackageError(_("{file} does not hold a JSON object. The package is damaged: copy it again.").format(file=configPath))
    missing = [entry for entry in REQUIRED_ENTRIES if entry not in config]
    if missing:
        raise ModelPackageError(_("{file} lacks the entries {entries}. Rebuild the package with `isseg train`.").format(
            file=configPath, entries=", ".join(missing)))
    labels = config["labels"]
    if not (isinstance(labels, list) and labels
            and all(isinstance(label, dict) and isinstance(label.get("value"), int) and label.get("name") for label in labels)):
        raise ModelPackageError(_("{file} has no valid label list (each label needs a value and a name).").format(file=configPath))
    _requireFile(folder / config.get("weights", DEFAULT_WEIGHTS_FILE), _("weights"))
    _requireAtlas(folder / config.get("atlas", DEFAULT_ATLAS_MANIFEST))
    title = " ".join(str(part) for part in (config["name"], config.get("version", "")) if part)
    return ModelEntry(str(folder), title)


# How the panel names each network kind of model.json (isseg.networks: "monai" when no kind is given).
NETWORK_KINDS = {"monai": "MONAI network (isseg train)", "nnunet_v2": "nnU-Net v2", "monai_bundle": "MONAI bundle"}


@dataclass(frozen=True)
class PackageDetails:
    """What the panel shows about a package: the kind of network, its labels, the atlas size and where
    the atlas came from, the licence and the citation, and the network's structures the atlas lacks."""

    networkKind: str
    labels: tuple
    atlasCases: int
    atlasSource: str
    license: str
    citation: str
    unmappedNetworkLabels: tuple

    def text(self) -> str:
        """A few lines for the panel."""
        lines = [_("Network: {kind}").format(kind=self.networkKind),
                 _("Labels: {labels}").format(labels=", ".join(self.labels)),
                 _("Atlas: {count} labelled cases").format(count=self.atlasCases)
                 + (f" ({self.atlasSource})" if self.atlasSource else "")]
        if self.unmappedNetworkLabels:
            lines.append(_("Not refined (the atlas lacks them): {labels}").format(labels=", ".join(self.unmappedNetworkLabels)))
        lines.append(_("Licence: {license}").format(license=self.license or _("not stated")))
        if self.citation:
            lines.append(_("Cite: {citation}").format(citation=self.citation))
        return "\n".join(lines)


def packageDetails(folder: Union[str, Path]) -> PackageDetails:
    """The details of a valid package folder (see describePackage), from model.json and the atlas manifest."""
    folder = Path(folder)
    describePackage(folder)
    config = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    kind = config["network"].get("kind", "monai") if isinstance(config["network"], dict) else "monai"
    manifest = json.loads((folder / config.get("atlas", DEFAULT_ATLAS_MANIFEST)).read_text(encoding="utf-8"))
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    return PackageDetails(
        networkKind=NETWORK_KINDS.get(kind, kind), labels=tuple(str(label["name"]) for label in config["labels"]),
        atlasCases=len(manifest["cases"]), atlasSource=str(training.get("atlas_source", "")),
        license=str(config.get("license", "")), citation=str(config.get("citation", "")),
        unmappedNetworkLabels=tuple(str(name) for name in training.get("unmapped_network_labels", [])))


def modelDetailsText(location: str) -> str:
    """The panel's description of a model-list entry: the package details, or for the demo model what it is."""
    if location == DEMO_MODEL:
        return _("Network: MONAI network (isseg train), trained on generated phantoms; atlas: 8 phantom cases.")
    try:
        return packageDetails(location).text()
    except (ModelPackageError, OSError, ValueError, KeyError, TypeError) as error:
        return _("This package cannot be described: {error}").format(error=error)


def _requireFile(path: Path, role: str) -> None:
    if not path.is_file():
        raise ModelPackageError(_("The {role} file '{path}' is missing. Copy the complete package.").format(role=role, path=path))


def _requireAtlas(manifestPath: Path) -> None:
    _requireFile(manifestPath, _("atlas manifest"))
    try:
        cases = json.loads(manifestPath.read_text(encoding="utf-8"))["cases"]
        files = [manifestPath.parent / case[role] for case in cases for role in ("image", "label")]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelPackageError(_("The atlas manifest '{path}' is damaged ({error}). Copy the package again.").format(
            path=manifestPath, error=error)) from None
    if not cases:
        raise ModelPackageError(_("The atlas manifest '{path}' lists no training cases; inference-specific learning "
                                  "needs them. Rebuild the package with its atlas.").format(path=manifestPath))
    for path in files:
        _requireFile(path, _("atlas"))


def availableModels(modelsDirectory: Union[str, Path]) -> list:
    """The demo model, then every valid package installed in `modelsDirectory`, sorted by title.
    A folder that is not a valid package is skipped (and logged)."""
    installed = []
    directory = Path(modelsDirectory)
    for folder in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            installed.append(describePackage(folder))
        except ModelPackageError as error:
            logging.warning("Skipping installed model package %s: %s", folder, error)
    return [demoModel()] + sorted(installed, key=lambda entry: entry.title.lower())


def installModelPackage(source: Union[str, Path], modelsDirectory: Union[str, Path], progress=None) -> ModelEntry:
    """Validate the package folder or .zip `source` and copy it into `modelsDirectory`, replacing an
    installed package of the same name. Returns the installed entry; raises ModelPackageError and then
    leaves `modelsDirectory` as it was. `progress(bytesCopied, bytesInAll)`, when given, follows the copy
    (file by file). The panel runs this in a process of its own (see `main`): an atlas can be gigabytes."""
    source, modelsDirectory = Path(source), Path(modelsDirectory)
    modelsDirectory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=modelsDirectory))
    try:
        if source.is_dir():
            _copyFolder(source, staging / "package", progress)
        elif zipfile.is_zipfile(source):
            _extractZip(source, staging / "package", progress)
        else:
            raise ModelPackageError(_("'{source}' is neither a folder nor a .zip file. Pick the model package folder "
                                      "or its .zip.").format(source=source))
        packageRoot = archive.shallowest_folder_with(staging / "package", MODEL_FILE)
        describePackage(packageRoot)
        config = json.loads((packageRoot / MODEL_FILE).read_text(encoding="utf-8"))
        target = modelsDirectory / _folderName(str(config["name"]))
        if target.exists():
            shutil.rmtree(target)
        packageRoot.rename(target)
        return describePackage(target)
    except OSError as error:
        raise ModelPackageError(_("Could not copy the package into '{folder}': {error}").format(
            folder=modelsDirectory, error=error)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copyFolder(source: Path, target: Path, progress) -> None:
    total = sum(path.stat().st_size for path in source.rglob("*") if path.is_file())
    copied = 0

    def copyFile(sourceFile, targetFile):
        nonlocal copied
        shutil.copy2(sourceFile, targetFile)
        copied += Path(sourceFile).stat().st_size
        if progress is not None:
            progress(copied, total)

    shutil.copytree(source, target, copy_function=copyFile)


def _extractZip(zipPath: Path, target: Path, progress) -> None:
    """Unpack with the engine's safe extraction (isseg.archive: paths confined, no links, size and zip-bomb
    limits, CRC checked); `target` is in the staging folder, which installModelPackage removes in any case."""
    try:
        archive.extract(zipPath, target, progress)
    except archive.ArchiveError as error:
        raise ModelPackageError(_("Not installed: {error}").format(error=error)) from None


def _folderName(modelName: str) -> str:
    """A file-system-safe folder name for a package called `modelName`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", modelName).strip("._") or "model"


def main(arguments: list) -> int:
    """`python -m InferenceSpecificSegLib.models install SOURCE MODELS_FOLDER`: installModelPackage in a process of
    its own, so that copying a large package never freezes Slicer (the panel runs it as a worker.WorkerTask).
    Worker-protocol events on stdout: `progress` (stage "install", step and total in bytes, at most one per
    percent), then `done` (location, title) or `error` (kind "bad_model", message; exit code 4)."""
    _command, source, modelsDirectory = arguments
    shown = -1

    def emit(**event):
        print(json.dumps(event), flush=True)

    def report(copied, total):
        nonlocal shown
        percent = 100 * copied // max(total, 1)
        if percent != shown:
            shown = percent
            emit(event=EVENT_PROGRESS, stage="install", step=copied, total=total)

    try:
        entry = installModelPackage(source, modelsDirectory, report)
    except ModelPackageError as error:
        emit(event=EVENT_ERROR, kind="bad_model", message=str(error))
        return EXIT_BAD_MODEL
    emit(event=EVENT_DONE, location=entry.location, title=entry.title)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
