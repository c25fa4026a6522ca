"""scripts/train_realct_model.py, the recipe of the real-anatomy model, on a stand-in ICRP body built here
(Testing/icrp_support.py; the real phantom in ../shared/data is not needed): seeded cases, a package whose
model card says what it was trained on, for what, how long a step took and how to rebuild it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from icrp_support import write_fake_icrp
from isseg import model_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_realct_model as recipe  # noqa: E402

#: Coarse, small cases (no phantom: its 48 x 48 x 32 voxels would make the validation the slowest part) and a
#: patch that covers a whole case; the atlas phantoms are added by the reatlas test only.
SMALL = ["--spacing", "8", "8", "8", "--patch", "16", "16", "24", "--icrp-cases", "3", "--phantom-cases", "0",
         "--atlas-cases", "1", "--no-atlas-phantoms"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_fake_icrp(folder / "icrp110")
    return folder


def test_the_cases_follow_the_seed_and_hold_the_model_labels(data_dir, tmp_path):
    def cases(folder, seed):
        records = recipe.write_dataset(folder, data_dir, (8.0, 8.0, 8.0), icrp_cases=1, phantom_cases=1, seed=seed)
        assert list(records) == ["icrp_000", "phantom_5000"]
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / sub / f"{case}.nii.gz")))
                for case in records for sub in ("imagesTr", "labelsTr")]

    first, again, other = cases(tmp_path / "a", 0), cases(tmp_path / "b", 0), cases(tmp_path / "c", 1)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[2], other[2])
    for labels in first[1::2]:
        assert set(np.unique(labels)) <= {0, *recipe.LABELS} and (labels == 1).any()  # liver present


def test_organ_variation_resizes_the_organs_of_each_training_body_as_its_record_says(data_dir, tmp_path):
    def liver_and_record(folder, organ_variation):
        records = recipe.write_dataset(folder, data_dir, (8.0, 8.0, 8.0), icrp_cases=1, phantom_cases=0, seed=0,
                                       organ_variation=organ_variation)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "icrp_000.nii.gz")))
        return (labels == 1).sum(), records["icrp_000"]

    plain_liver, plain = liver_and_record(tmp_path / "plain", False)
    varied_liver, varied = liver_and_record(tmp_path / "varied", True)
    assert "organ_volume_factors" not in plain
    factors = varied["organ_volume_factors"]
    assert set(factors) == set(recipe.av.TRAINING_VOLUME_FACTOR_RANGE)
    assert varied_liver != plain_liver and abs(factors["liver"] - 1) > 0.05
    assert varied_liver / plain_liver == pytest.approx(factors["liver"], rel=0.35)  # then deformed and cut
    assert varied == liver_and_record(tmp_path / "again", True)[1]


def test_the_defaults_are_the_recipe_whose_accuracy_the_card_reports():
    assert recipe.recipe_of(recipe.parse_args([])) == recipe.MEASURED_ACCURACY["recipe"]


def test_a_short_run_writes_a_package_with_its_model_card(data_dir, tmp_path):
    output = tmp_path / "package"
    recipe.main(["--data-dir", str(data_dir), "--output", str(output), "--steps", "2", "--device", "cpu", *SMALL])
    package = model_package.load(output)
    assert [label["name"] for label in package.labels] == list(recipe.LABELS.values())
    assert [case.case_id for case in package.atlas_cases] == ["icrp_atlas_00"]
    card = package.config["model_card"]
    assert "not for patients" in card["intended_use"] and "ICRP Publication 110" in card["training_data"]
    assert card["measured_accuracy"]["this_recipe"] == "not measured"  # a 2-step model is not the measured one
    assert card["recipe"]["seconds_per_step"] > 0 and card["recipe"]["steps"] == 2
    assert recipe.parse_args(card["recipe"]["rebuild_command"].split()[3:]).__dict__ | {"data_dir": None} == \
        recipe.parse_args(["--steps", "2", *SMALL]).__dict__ | {"data_dir": None}
    assert package.config["license"].startswith("Not for redistribution")
    assert set(card["cases"]) == {"icrp_000", "icrp_001", "icrp_002"}


def test_rethreshold_chooses_the_thresholds_again_on_the_builds_own_validation_cases(data_dir, tmp_path):
    """A build's validation cases are regenerated from its card's seeds: the Dice at 0.5 is the build's own,
    and the thresholds follow today's rule (choose_thresholds), whatever the package held before."""
    output = tmp_path / "package"
    recipe.main(["--data-dir", str(data_dir), "--output", str(output), "--steps", "2", "--device", "cpu",
                 *SMALL, "--icrp-cases", "5"])
    config = (output / "model.json")
    built = json.loads(config.read_text(encoding="utf-8"))
    assert built["training"]["validation_cases"], "5 cases leave one for validation"
    stale = dict(built, labels=[dict(label, threshold=0.95) for label in built["labels"]])
    config.write_text(json.dumps(stale), encoding="utf-8")

    recipe.main(["--rethreshold", str(output), "--data-dir", str(data_dir), "--device", "cpu"])

    again = json.loads(config.read_text(encoding="utf-8"))
    assert [c["dice_at_0.5"] for c in again["thresholds_on_validation"]] == pytest.approx(
        [c["dice_at_0.5"] for c in built["thresholds_on_validation"]], nan_ok=True)
    assert [label.get("threshold") for label in again["labels"]] == \
        [c["threshold"] for c in again["thresholds_on_validation"]]


def test_atlas_bodies_vary_their_organs_within_the_population_ranges_as_recorded(data_dir):
    def liver_voxels(cases):
        return [int((sitk.GetArrayFromImage(labels) == 1).sum()) for _, _, labels in cases]

    plain, plain_records = recipe.atlas_cases(data_dir, (8.0, 8.0, 8.0), 2, seed=0, organ_variation=None)
    varied, records = recipe.atlas_cases(data_dir, (8.0, 8.0, 8.0), 2, seed=0)
    assert all("organ_volume_factors" not in record for record in plain_records.values())
    for record in records.values():
        factors = record["organ_volume_factors"]
        assert set(factors) == set(recipe.av.ABDOMEN_ORGAN_VARIATION)
        for name, factor in factors.items():
            spread = recipe.av.CLIP_SD * recipe.av.ABDOMEN_ORGAN_VARIATION[name].volume_cv
            assert 1 - spread - 0.01 <= factor <= 1 + spread + 0.01, (name, factor)
    assert liver_voxels(varied) != liver_voxels(plain)
    again, _ = recipe.atlas_cases(data_dir, (8.0, 8.0, 8.0), 2, seed=0)
    assert all(np.array_equal(sitk.GetArrayFromImage(a[1]), sitk.GetArrayFromImage(b[1])) for a, b in zip(again, varied))


def test_reatlas_writes_the_atlas_again_and_keeps_the_weights(data_dir, tmp_path):
    output = tmp_path / "package"
    recipe.main(["--data-dir", str(data_dir), "--output", str(output), "--steps", "2", "--device", "cpu", *SMALL,
                 "--no-atlas-organ-variation"])
    weights = (output / "model.safetensors").read_bytes()
    before = model_package.load(output).config["model_card"]
    assert before["recipe"]["atlas_organ_variation"] is False and "organ_volume_factors" not in \
        before["atlas_cases"]["icrp_atlas_00"]

    recipe.main(["--reatlas", str(output), "--data-dir", str(data_dir), "--atlas-cases", "2"])

    package = model_package.load(output)
    card = package.config["model_card"]
    assert (output / "model.safetensors").read_bytes() == weights
    demo_seeds = recipe.demo_model.shipped_config()["demo_atlas"]["seeds"]
    phantom_ids = [f"phantom_{seed:03d}" for seed in demo_seeds]
    assert [case.case_id for case in package.atlas_cases] == ["icrp_atlas_00", "icrp_atlas_01", *phantom_ids]
    assert card["recipe"]["atlas_organ_variation"] is True and card["recipe"]["atlas_cases"] == 2
    assert card["recipe"]["atlas_phantoms"] is True and "phantoms" in card["atlas"]
    assert [card["atlas_cases"][case_id]["seed"] for case_id in phantom_ids] == demo_seeds
    assert "organ_volume_factors" in card["atlas_cases"]["icrp_atlas_01"] and "population" in card["atlas"]
    assert package.config["version"] == recipe.VERSION and not (output / "atlas.new").exists()
    rebuilt = recipe.parse_args(card["recipe"]["rebuild_command"].split()[3:])
    assert rebuilt.atlas_organ_variation and rebuilt.atlas_phantoms and rebuilt.atlas_cases == 2 and rebuilt.steps == 2
    assert_demo_atlas_on_the_model_grid(package, spacing_mm=8.0)
    with pytest.raises(SystemExit, match="atlas would be empty"):
        recipe.main(["--reatlas", str(output), "--data-dir", str(data_dir), "--atlas-cases", "0", "--no-atlas-phantoms"])
    assert model_package.load(output).config == package.config and len(model_package.load(output).atlas_cases) == 10


def assert_demo_atlas_on_the_model_grid(package, spacing_mm: float) -> None:
    """The atlas phantoms are the demo model's (4 mm) on the package's grid, each organ's volume kept."""
    cases = {case.case_id: case for case in package.atlas_cases}
    for case_id, _, labels in recipe.demo_model.demo_atlas_cases(recipe.demo_model.shipped_config())[:2]:
        written = sitk.ReadImage(str(cases[case_id].label_path))
        assert written.GetSpacing() == (spacing_mm,) * 3
        ours, theirs = sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(labels)
        assert set(np.unique(ours)) == set(np.unique(theirs)) <= {0, *recipe.LABELS}
        for value in (1, 2):  # liver and spleen, mm^3
            assert (ours == value).sum() * spacing_mm ** 3 == pytest.approx((theirs == value).sum() * 4.0 ** 3, rel=0.1)


def test_reatlas_refuses_a_folder_the_recipe_did_not_build_and_changes_nothing(demo_package, tmp_path):
    import shutil

    folder = tmp_path / "demo"
    shutil.copytree(demo_package, folder)
    before = sorted((path.name, path.stat().st_size) for path in folder.rglob("*"))
    with pytest.raises(SystemExit, match="not a package built by scripts/train_realct_model.py"):
        recipe.main(["--reatlas", str(folder)])
    assert sorted((path.name, path.stat().st_size) for path in folder.rglob("*")) == before
