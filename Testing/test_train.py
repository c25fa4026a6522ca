"""`isseg train`: from an MSD-layout folder of small phantoms to a model package that loads back,
resuming from its checkpoint, and clear messages for broken datasets."""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import replace

import pytest
import SimpleITK as sitk
import torch

from isseg import cli, model_package, model_training, phantom
from isseg.errors import BadInputError
from isseg.protocol import EXIT_BAD_INPUT, EXIT_BAD_MODEL
from isseg.events import EventWriter
from isseg.model_training import TrainSettings, train_package

# Small phantoms at a coarse spacing and a tiny UNet keep a training run to seconds on a CPU.
PHANTOM_SIZE, PHANTOM_SPACING = (48, 48, 32), (8.0, 8.0, 8.0)


def tiny_settings(**changes) -> TrainSettings:
    settings = TrainSettings(spacing=PHANTOM_SPACING, patch_size=(32, 32, 16), channels=(4, 8, 16), steps=30,
                             evaluate_every=10, learning_rate=3e-3)
    return replace(settings, **changes)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An MSD folder of 4 small training phantoms: 3 for training (and the atlas), 1 for validation."""
    specs = [phantom.training_spec(seed, size=PHANTOM_SIZE, spacing=PHANTOM_SPACING) for seed in range(4)]
    return phantom.write_msd_dataset(tmp_path_factory.mktemp("dataset"), specs)


def json_events(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_training_lowers_the_loss_and_writes_a_package_that_loads_back(dataset, tmp_path, monkeypatch):
    saved = {}
    save = model_package.save

    def save_and_keep_weights(root, config, network, atlas_cases=None):
        saved.update({k: v.clone() for k, v in network.state_dict().items()})
        return save(root, config, network, atlas_cases)

    monkeypatch.setattr(model_package, "save", save_and_keep_weights)
    output = train_package(dataset, tmp_path / "package", tiny_settings(), EventWriter(io.StringIO(), mode="json"), "cpu")

    package = model_package.load(output)
    curves = package.config["training"]["curves"]
    assert curves["step"] == [10, 20, 30]
    assert len(curves["seconds_per_step"]) == 3 and min(curves["seconds_per_step"]) > 0
    assert curves["train_loss"][-1] < 0.8 * curves["train_loss"][0]
    loaded = package.build_network().state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert [(label["value"], label["name"]) for label in package.labels] == \
           [(label["value"], label["name"]) for label in phantom.LABELS]
    assert all("terminology" in label and len(label["color"]) == 3 for label in package.labels)
    training = package.config["training"]
    assert sorted(case.case_id for case in package.atlas_cases) == sorted(training["train_cases"])
    assert len(training["train_cases"]) == 3 and len(training["validation_cases"]) == 1
    atlas_image, atlas_labels = package.atlas_cases[0].read()
    assert atlas_image.GetSpacing() == PHANTOM_SPACING and atlas_labels.GetSize() == atlas_image.GetSize()
    assert not (output / "checkpoint.pt").exists()


def test_a_stopped_run_resumes_from_its_checkpoint(dataset, tmp_path, monkeypatch):
    steps_taken = []
    train_step = model_training.train_step

    def counting_step(*args, **kwargs):
        steps_taken.append(1)
        if stop_after is not None and len(steps_taken) > stop_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        return train_step(*args, **kwargs)

    monkeypatch.setattr(model_training, "train_step", counting_step)
    settings, output = tiny_settings(steps=20), tmp_path / "package"
    stop_after = 12  # past the checkpoint at step 10
    with pytest.raises(KeyboardInterrupt):
        train_package(dataset, output, settings, EventWriter(io.StringIO(), mode="json"), "cpu")
    checkpoint = torch.load(output / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 10
    first_curves = json.loads(checkpoint["curves"])

    steps_taken.clear()
    stop_after = None
    events = io.StringIO()
    train_package(dataset, output, settings, EventWriter(events, mode="json"), "cpu")
    assert {"event": "stage", "stage": "resume", "step": 10} in json_events(events)
    assert len(steps_taken) == 10  # steps 11..20 only
    curves = model_package.load(output).config["training"]["curves"]
    assert curves["step"] == [10, 20]
    assert curves["train_loss"][0] == first_curves["train_loss"][0]


def _remove_a_label_file(folder):
    path = folder / "labelsTr" / "phantom_001.nii.gz"
    path.unlink()
    return path


def _write_an_unknown_label_value(folder):
    path = folder / "labelsTr" / "phantom_002.nii.gz"
    labels = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(labels)
    array[0, 0, 0] = 9
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(labels)
    sitk.WriteImage(changed, str(path))
    return path


def _shrink_a_label_map(folder):
    path = folder / "labelsTr" / "phantom_003.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(path))[:, :, :-2], str(path))
    return path


@pytest.mark.parametrize("break_dataset", [_remove_a_label_file, _write_an_unknown_label_value, _shrink_a_label_map],
                         ids=["missing label file", "label value not in dataset.json", "label/image size mismatch"])
def test_a_broken_dataset_gets_a_message_naming_the_file(dataset, tmp_path, capsys, break_dataset):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    culprit = break_dataset(broken)

    with pytest.raises(BadInputError, match=re.escape(str(culprit))):
        train_package(broken, tmp_path / "package", tiny_settings(), EventWriter(io.StringIO(), mode="json"), "cpu")

    exit_code = cli.main(["train", "--dataset", str(broken), "--output", str(tmp_path / "cli-package"),
                          "--progress", "json", "--steps", "1"])
    assert exit_code == EXIT_BAD_INPUT
    errors = [event for event in map(json.loads, capsys.readouterr().out.splitlines()) if event["event"] == "error"]
    assert errors and errors[0]["kind"] == "bad_input" and str(culprit) in errors[0]["message"]
    assert not (tmp_path / "cli-package" / "model.safetensors").exists()


def test_thresholds_only_chooses_a_packages_thresholds_again_without_training(dataset, tmp_path, capsys):
    """`isseg train --thresholds-only` on a built package: the thresholds follow today's rule on the validation
    case the package names, model.json says so, and the weights are the same bytes. A dataset without that
    case is refused (exit 3) and model.json is left as it was."""
    output = train_package(dataset, tmp_path / "package", tiny_settings(steps=10),
                           EventWriter(io.StringIO(), mode="json"), "cpu")
    model_file, weights = output / "model.json", (output / "model.safetensors").read_bytes()
    built = json.loads(model_file.read_text(encoding="utf-8"))
    stale = dict(built, labels=[dict(label, threshold=0.95) for label in built["labels"]],
                 thresholds_on_validation=[])
    model_file.write_text(json.dumps(stale), encoding="utf-8")

    assert cli.main(["train", "--dataset", str(dataset), "--output", str(output), "--thresholds-only",
                     "--device", "cpu", "--progress", "json"]) == 0

    again = json.loads(model_file.read_text(encoding="utf-8"))
    assert again["thresholds_on_validation"] == built["thresholds_on_validation"]
    assert [label.get("threshold") for label in again["labels"]] == [label.get("threshold") for label in built["labels"]]
    assert (output / "model.safetensors").read_bytes() == weights
    done = [event for event in json_events_of(capsys) if event["event"] == "done"]
    assert done and set(done[0]["thresholds"]) == {str(label["value"]) for label in built["labels"]}

    other = phantom.write_msd_dataset(tmp_path / "other", [phantom.training_spec(9, size=PHANTOM_SIZE,
                                                                                spacing=PHANTOM_SPACING)])
    before = model_file.read_bytes()
    assert cli.main(["train", "--dataset", str(other), "--output", str(output), "--thresholds-only",
                     "--progress", "json"]) == EXIT_BAD_INPUT
    errors = [event for event in json_events_of(capsys) if event["event"] == "error"]
    assert errors and "lacks the validation cases" in errors[0]["message"]
    assert model_file.read_bytes() == before
    assert cli.main(["train", "--dataset", str(dataset), "--output", str(tmp_path / "nothing"), "--thresholds-only",
                     "--progress", "json"]) == EXIT_BAD_MODEL
    assert "no package built by `isseg train`" in json_events_of(capsys)[-1]["message"]


def json_events_of(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
