"""The GUI-free, MRML-free parts of the Slicer module: protocol parsing, progress text, run settings,
the model list and package checks, the dependency check."""

import json
import os
import zipfile

import pytest
from packaging.requirements import Requirement

import slicer_test_support  # noqa: F401  (puts the module folder on sys.path)
from InferenceSpecificSegLib import dependencies
from InferenceSpecificSegLib.models import (DEMO_MODEL, ModelPackageError, availableModels, describePackage,
                                            installModelPackage, installedModelsDirectory)
from InferenceSpecificSegLib.protocol import ProtocolError, RunProgress, parseEventLine, readSegmentsFile
from InferenceSpecificSegLib.settings import AlignmentMode, Device, Loss, RunSettings


@pytest.mark.parametrize("line, expected", [
    ('{"event": "snapshot", "index": 3, "path": "/x/snapshot_0003.nrrd", "step": 60, "new_field": 1}\n',
     {"event": "snapshot", "index": 3, "path": "/x/snapshot_0003.nrrd", "step": 60, "new_field": 1}),
    (b'{"event": "stage", "stage": "align", "round": 2}\n', {"event": "stage", "stage": "align", "round": 2}),
    ('{"event": "progr', None),  # cut off
    ("Downloading weights... 50%\n", None),  # library noise
    ("[1, 2, 3]\n", None),
    ('{"stage": "align"}\n', None),  # no event name
    ('{"event": 7}\n', None),
    (b"\xff\xfe garbage\n", None),
])
def test_event_lines(line, expected):
    assert parseEventLine(line) == expected


def test_segments_file(tmp_path):
    path = tmp_path / "segments.json"
    path.write_text(json.dumps({"segments": [
        {"value": 1, "name": "liver", "color": [0.8, 0.5, 0.4], "terminology": {"type": {"code": "10200004"}}},
        {"value": 3, "name": "aorta", "color": [1, 0, 0]}]}))
    segments = readSegmentsFile(path)
    assert [(s.value, s.name, s.color) for s in segments] == [(1, "liver", (0.8, 0.5, 0.4)), (3, "aorta", (1.0, 0.0, 0.0))]
    assert segments[0].terminology == {"type": {"code": "10200004"}} and segments[1].terminology == {}
    for broken in ('{"segments": [{"value": 0, "name": "x", "color": [1, 0, 0]}]}',
                   '{"segments": [{"value": 1, "color": [1, 0, 0]}]}',
                   '{"segments": [{"value": 1, "name": "x", "color": [1, 0]}]}',
                   '{"segments": [{"value": true, "name": "x", "color": [1, 0, 0]}]}',
                   '{"labels": []}', "not json"):
        path.write_text(broken)
        with pytest.raises(ProtocolError):
            readSegmentsFile(path)
    with pytest.raises(ProtocolError, match="missing.json"):
        readSegmentsFile(tmp_path / "missing.json")


def test_progress_text():
    progress = RunProgress()
    assert progress.describe() == "Starting the worker..." and progress.percent == 0
    progress.apply({"event": "stage", "stage": "align", "round": 2})
    assert progress.describe() == "Aligning training cases (round 2)"
    progress.apply({"event": "progress", "stage": "refine", "step": 45, "total": 100, "loss": 0.3, "eta_s": 150})
    assert progress.percent == 45
    assert progress.describe() == "Refining: 45%, about 3 min left"
    progress.apply({"event": "progress", "stage": "refine", "step": 99, "total": 100, "eta_s": 20})
    assert progress.describe() == "Refining: 99%, less than a minute left"
    progress.apply({"event": "progress", "stage": "refine", "step": 1, "total": 100, "eta_s": 2 * 3600})
    assert progress.describe().endswith("about 2.0 h left")
    progress.apply({"event": "progress", "stage": "refine", "step": 5, "total": 0, "eta_s": None})
    assert progress.describe() == "Refining" and progress.percent == 0
    progress.apply({"event": "snapshot", "index": 1, "path": "x", "step": 5})  # not a progress event
    assert progress.stage == "refine"
    progress.apply({"event": "warning", "message": "Out of GPU memory: starting again with the CPU."})
    assert progress.describe() == "Refining (Out of GPU memory: starting again with the CPU.)"


def test_run_settings_become_worker_arguments():
    assert RunSettings().commandLineArguments() == [
        "--steps", "80", "--device", "auto", "--align-mode", "mask", "--momentum", "0.8", "--loss", "dicece"]
    settings = RunSettings(steps=20, device=Device.CPU, alignment=AlignmentMode.BOTH, momentum=0.95,
                           loss=Loss.REGION_TVERSKY)
    assert settings.commandLineArguments() == [
        "--steps", "20", "--device", "cpu", "--align-mode", "both", "--momentum", "0.95", "--loss", "region_tversky"]
    for enumeration in (Device, AlignmentMode, Loss):
        assert all(enumeration.label(member) for member in enumeration)


def test_dependencies_are_checked_by_version_without_importing_them(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "monai", raising=False)
    assert dependencies.missingPackages() == []  # this environment has everything, in the tested versions
    assert "monai" not in sys.modules  # found, not imported
    # torch only through the PyTorch extension; SimpleITK, numpy and scipy ship with Slicer: never pip-installed
    assert dependencies.pipRequirements(["torch", "monai", "scipy", "SimpleITK", "numpy"]) == ["monai>=1.3,<1.7"]
    monkeypatch.setitem(dependencies.REQUIREMENTS, "monai", "monai>=99")
    monkeypatch.setitem(dependencies.REQUIREMENTS, "no_such_package_xyz", "no_such_package_xyz>=1")
    unmet = dependencies.unmetRequirements()
    assert unmet["no_such_package_xyz"] == "not installed" and unmet["monai"].startswith("version ")


def test_dependency_pins_agree_with_pyproject():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {Requirement(text).name: str(Requirement(text).specifier) for text in pyproject["project"]["dependencies"]}
    for name, requirement in dependencies.REQUIREMENTS.items():
        assert str(Requirement(requirement).specifier) == pins[name], name


def writePackage(folder, name="Abdomen CT", version="1.2", **changes):
    """A model package folder as the engine writes it (model.json, weights, atlas manifest and cases)."""
    (folder / "atlas").mkdir(parents=True)
    config = {"format_version": 1, "name": name, "version": version, "network": {"name": "UNet", "args": {}},
              "input": {"spacing": [2, 2, 2]}, "patch_size": [64, 64, 64], "weights": "model.safetensors",
              "atlas": "atlas/manifest.json", "labels": [{"value": 1, "name": "liver", "color": [1, 0, 0]}]}
    config.update(changes)
    (folder / "model.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "atlas" / "manifest.json").write_text(json.dumps({"cases": [
        {"id": "case0", "image": "case0_image.nrrd", "label": "case0_label.nrrd"}]}))
    for file in ("case0_image.nrrd", "case0_label.nrrd"):
        (folder / "atlas" / file).write_bytes(b"nrrd")
    return folder


def test_valid_package_is_described(tmp_path):
    entry = describePackage(writePackage(tmp_path / "package"))
    assert entry.location == str(tmp_path / "package") and entry.title == "Abdomen CT 1.2"


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "model.json").unlink(), "has no model.json"),
    (lambda folder: (folder / "model.json").write_text("{broken"), "not readable JSON"),
    (lambda folder: (folder / "model.json").write_text("[]"), "JSON object"),
    (lambda folder: (folder / "model.json").write_text('{"name": "x", "labels": []}'), "lacks the entries network, input, patch_size"),
    (lambda folder: (folder / "model.safetensors").unlink(), "weights file .* is missing"),
    (lambda folder: (folder / "atlas" / "manifest.json").unlink(), "atlas manifest file .* is missing"),
    (lambda folder: (folder / "atlas" / "case0_label.nrrd").unlink(), "atlas file .*case0_label.nrrd' is missing"),
    (lambda folder: (folder / "atlas" / "manifest.json").write_text('{"cases": []}'), "lists no training cases"),
])
def test_damaged_package_is_refused_with_a_clear_message(tmp_path, damage, message):
    folder = writePackage(tmp_path / "package")
    damage(folder)
    with pytest.raises(ModelPackageError, match=message):
        describePackage(folder)


def test_invalid_labels_are_refused(tmp_path):
    folder = writePackage(tmp_path / "package", labels=[{"value": "1", "name": "liver"}])
    with pytest.raises(ModelPackageError, match="label list"):
        describePackage(folder)


def test_install_from_folder_and_zip_and_list(tmp_path):
    modelsDirectory = installedModelsDirectory(tmp_path / "settings")
    assert modelsDirectory == tmp_path / "settings" / "InferenceSpecificSeg" / "models"
    assert [entry.location for entry in availableModels(modelsDirectory)] == [DEMO_MODEL]

    installed = installModelPackage(writePackage(tmp_path / "source", name="Pelvis/CT v2"), modelsDirectory)
    assert installed.location == str(modelsDirectory / "Pelvis_CT_v2")
    zipPath = tmp_path / "abdomen.zip"
    with zipfile.ZipFile(zipPath, "w") as archive:  # a zip of the package folder: model.json one level down
        for path in writePackage(tmp_path / "zipped" / "Abdomen").rglob("*"):
            archive.write(path, path.relative_to(tmp_path / "zipped"))
    installModelPackage(zipPath, modelsDirectory)
    (modelsDirectory / "not-a-package").mkdir()
    entries = availableModels(modelsDirectory)
    assert [entry.title for entry in entries][1:] == ["Abdomen CT 1.2", "Pelvis/CT v2 1.2"]
    assert entries[0].location == DEMO_MODEL
    assert sorted(path.name for path in modelsDirectory.iterdir()) == ["Abdomen_CT", "Pelvis_CT_v2", "not-a-package"]

    reinstalled = installModelPackage(writePackage(tmp_path / "newer", name="Abdomen CT", version="2.0"), modelsDirectory)
    assert reinstalled.title == "Abdomen CT 2.0"
    assert [entry.title for entry in availableModels(modelsDirectory)][1:] == ["Abdomen CT 2.0", "Pelvis/CT v2 1.2"]


def test_refused_install_leaves_the_models_folder_as_it_was(tmp_path):
    modelsDirectory = tmp_path / "models"
    broken = writePackage(tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelPackageError, match="weights"):
        installModelPackage(broken, modelsDirectory)
    unsafeZip = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafeZip, "w") as archive:
        archive.writestr("../escape.txt", "x")
    with pytest.raises(ModelPackageError, match="unsafe path"):
        installModelPackage(unsafeZip, modelsDirectory)
    linkZip = tmp_path / "link.zip"  # the engine's checks (isseg.archive) run in the panel too
    with zipfile.ZipFile(linkZip, "w") as archive:
        link = zipfile.ZipInfo("model.json")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ModelPackageError, match="link"):
        installModelPackage(linkZip, modelsDirectory)
    notAPackage = tmp_path / "notes.txt"
    notAPackage.write_text("hello")
    with pytest.raises(ModelPackageError, match="neither a folder nor a .zip"):
        installModelPackage(notAPackage, modelsDirectory)
    assert list(modelsDirectory.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_install_as_a_process_reports_progress_and_the_installed_entry(tmp_path):
    import subprocess
    import sys

    from slicer_test_support import MODULE_DIRECTORY

    source = writePackage(tmp_path / "source", name="Pelvis CT")
    (source / "atlas" / "case0_image.nrrd").write_bytes(b"\0" * 1_000_000)
    modelsDirectory = installedModelsDirectory(tmp_path / "settings")
    result = subprocess.run([sys.executable, "-m", "InferenceSpecificSegLib.models", "install", str(source), str(modelsDirectory)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(MODULE_DIRECTORY)})
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [event for event in events if event["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"] > 1_000_000
    assert [event["step"] for event in progress] == sorted(event["step"] for event in progress)
    assert events[-1] == {"event": "done", "location": str(modelsDirectory / "Pelvis_CT"), "title": "Pelvis CT 1.2"}
