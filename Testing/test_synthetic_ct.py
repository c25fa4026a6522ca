"""Tests of the benchmark CT synthesiser (benchmarks/synthetic_ct.py).

Only small label maps built here are used: the reference data in ../shared
is not needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synthetic_ct as sct  # noqa: E402
from icrp_support import fake_icrp_ids  # noqa: E402

SPACING = (2.0, 2.0, 2.5)
WATER = {1: 11.19, 8: 88.81}
AIR = {6: 0.0124, 7: 75.5268, 8: 23.1781, 18: 1.2827}
ADIPOSE = {1: 11.4, 6: 58.8, 7: 0.8, 8: 28.7, 11: 0.1, 16: 0.1, 17: 0.1}
CORTICAL_BONE = {1: 3.6, 6: 15.9, 7: 4.2, 8: 44.8, 11: 0.3, 12: 0.2, 15: 9.4, 16: 0.3, 20: 21.3}


def _image(array: np.ndarray, spacing=SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 20.0, 5.0))
    return image


def _ball(shape, center, radius_mm, spacing_zyx):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing_zyx)) <= radius_mm ** 2


@pytest.fixture
def tissue_map() -> sitk.Image:
    """(z, y, x) = (24, 40, 48) map: body (4) in air (0) with organs 1, 2, 3 inside."""
    shape = (24, 40, 48)
    spacing_zyx = SPACING[::-1]
    ids = np.zeros(shape, dtype=np.uint8)
    ids[_ball(shape, (12, 20, 24), 40.0, spacing_zyx)] = 4
    ids[_ball(shape, (12, 20, 14), 12.0, spacing_zyx)] = 1
    ids[_ball(shape, (12, 20, 34), 10.0, spacing_zyx)] = 2
    ids[_ball(shape, (12, 28, 24), 9.0, spacing_zyx)] = 3
    return _image(ids)


TISSUE_HU = {0: -1000.0, 1: 60.0, 2: 45.0, 3: 700.0, 4: -100.0}


def test_hounsfield_from_composition_water_air_and_order():
    assert sct.hounsfield_from_composition(1.0, WATER) == pytest.approx(0.0, abs=1.0)
    assert sct.hounsfield_from_composition(0.0012, AIR) == pytest.approx(-1000.0, abs=2.0)
    fat = sct.hounsfield_from_composition(0.95, ADIPOSE)
    bone = sct.hounsfield_from_composition(1.92, CORTICAL_BONE)
    assert -120.0 < fat < -50.0
    assert 1000.0 < bone < 2000.0


def test_icrp_tables_are_parsed_with_crlf_and_headers(tmp_path):
    (tmp_path / "AM_organs.dat").write_bytes(
        b"Organs and tissues\t\t\r\n\r\nOrgan Organ   Tissue Density\r\nID   number\r\n"
        b"10    Blood vessels, trunk      28    1.060\r\n"
        b"95    Liver                     30    1.050\r\n"
        b"116   Residual tissue, head     49    0.950\r\n")
    (tmp_path / "AM_media.dat").write_bytes(
        b"      1     6     7     8    11    12    15    16    17    19    20    26    53\r\n"
        b"   H   C   N   O  Na  Mg   P   S  Cl   K  Ca  Fe   I\r\n"
        b"No.                        (% by mass)\t\r\n"
        b"27    Skin       10.0 19.9 4.2 65.0 0.2 0.0 0.1 0.2 0.3 0.1 0.0 0.0 0.0\r\n"
        b"28    Blood      10.2 11.0 3.3 74.5 0.1 0.0 0.1 0.2 0.3 0.2 0.0 0.1 0.0\r\n"
        b"30    Liver      10.2 13.0 3.1 72.5 0.2 0.0 0.2 0.3 0.2 0.3 0.0 0.0 0.0\r\n"
        b"49    Adipose    11.4 58.8 0.8 28.7 0.1 0.0 0.0 0.1 0.1 0.0 0.0 0.0 0.0\t\t\r\n")
    organs = sct.read_icrp_organs(tmp_path / "AM_organs.dat")
    assert organs[95] == sct.IcrpOrgan("Liver", 30, 1.05)
    assert organs[116].name == "Residual tissue, head"
    hu = sct.icrp_tissue_hu(tmp_path)
    assert hu[0] == sct.AIR_HU
    assert 30.0 < hu[95] < 60.0  # liver, native
    assert -100.0 < hu[116] < -50.0  # adipose
    assert hu[sct.ICRP_AORTA_ID] == hu[10]
    assert hu[sct.ICRP_END_SKIN[0]] > hu[95]  # skin is denser (1.09 g/cm3)


def test_icrp_loader_checks_axes_and_finds_the_aorta(tmp_path):
    np.savez(tmp_path / "AM_organ_ids.npz", ids=fake_icrp_ids())
    phantom = sct.load_icrp_phantom(tmp_path)
    assert phantom.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert phantom.GetSpacing() == pytest.approx(sct.ICRP_SPACING_MM)
    ids = sitk.GetArrayFromImage(phantom)
    aorta = np.argwhere(ids == sct.ICRP_AORTA_ID)
    assert len(aorta) > 0 and aorta[:, 2].min() >= 16  # the left-sided vessel only
    labels, names = sct.icrp_abdomen_labels(phantom)
    assert names[10] == "aorta" and names[3] == "kidney_left"
    assert (sitk.GetArrayFromImage(labels)[ids == 89] == 3).all()

    np.savez(tmp_path / "AM_organ_ids.npz", ids=fake_icrp_ids(mirror_x=True))
    with pytest.raises(ValueError, match="axes"):
        sct.load_icrp_phantom(tmp_path)


def test_synthesis_is_deterministic_for_a_seed(tissue_map):
    def make(seed):
        return sitk.GetArrayFromImage(sct.synthesize_ct(
            tissue_map, TISSUE_HU, np.random.default_rng(seed), noise_hu=20.0))

    np.testing.assert_array_equal(make(3), make(3))
    assert not np.array_equal(make(3), make(4))


def test_make_case_is_deterministic_and_seed_dependent(tissue_map):
    settings = sct.CaseSettings("a", 15.0, 1.2, 5.0, (0.8, 0.8, 0.8))
    phases = {"a": {1: 50.0}}

    def make(seed):
        image, labels = sct.make_case(tissue_map, TISSUE_HU, phases, {1: 1, 2: 2},
                                      settings, np.random.default_rng(seed))
        return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)

    first, again, other = make(7), make(7), make(8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("enhancement", [None, {1: 100.0, 3: -50.0}])
def test_mean_hounsfield_per_tissue_matches_table(tissue_map, enhancement):
    image = sitk.GetArrayFromImage(sct.synthesize_ct(
        tissue_map, TISSUE_HU, np.random.default_rng(0), enhancement_hu=enhancement,
        noise_hu=30.0, texture_hu=6.0))
    ids = sitk.GetArrayFromImage(tissue_map)
    for tissue, hu in TISSUE_HU.items():
        # Interior voxels, away from the partial-volume rim left by the blur.
        interior = ndimage.binary_erosion(ids == tissue)
        expected = hu + (enhancement or {}).get(tissue, 0.0)
        if tissue == 0:
            expected = max(expected, sct.CT_MIN_HU + 25.0)  # noise is clipped at -1024
        # Texture (6 HU) and blur leakage (a few HU), plus 4 standard errors of noise.
        tolerance = 10.0 + 4.0 * 30.0 / np.sqrt(interior.sum())
        assert image[interior].mean() == pytest.approx(expected, abs=tolerance), tissue
    assert 20.0 < image[ndimage.binary_erosion(ids == 4)].std() < 45.0


def test_noise_level_is_the_requested_std(tissue_map):
    flat = sitk.GetArrayFromImage(tissue_map) * 0 + 4
    image = sct.synthesize_ct(_image(flat.astype(np.uint8)), TISSUE_HU, np.random.default_rng(1),
                              noise_hu=25.0, texture_hu=0.0)
    assert sitk.GetArrayFromImage(image).std() == pytest.approx(25.0, rel=0.05)


def test_labels_are_unchanged_by_intensity_steps(tissue_map):
    before = sitk.GetArrayFromImage(tissue_map).copy()
    sct.synthesize_ct(tissue_map, TISSUE_HU, np.random.default_rng(0), enhancement_hu={1: 50.0})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(tissue_map), before)

    settings = sct.CaseSettings("a", 30.0, 1.5, 0.0, (1.0, 1.0, 1.0))
    image, labels = sct.make_case(tissue_map, TISSUE_HU, {"a": {}}, {1: 1, 2: 2, 3: 3}, settings,
                                  np.random.default_rng(0))
    expected = np.where(np.isin(before, (1, 2, 3)), before, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    assert image.GetSize() == labels.GetSize() == tissue_map.GetSize()
    assert image.GetOrigin() == labels.GetOrigin()


def test_missing_tissue_value_is_an_error(tissue_map):
    with pytest.raises(ValueError, match="tissue IDs"):
        sct.synthesize_ct(tissue_map, {0: -1000.0}, np.random.default_rng(0))


def test_random_displacement_never_exceeds_max(tissue_map):
    transform = sct.random_elastic_transform(tissue_map, np.random.default_rng(5), max_mm=7.0,
                                             control_spacing_mm=20.0)
    rng = np.random.default_rng(0)
    low = np.array(tissue_map.GetOrigin())
    high = low + np.array(tissue_map.GetSize()) * np.array(tissue_map.GetSpacing())
    points = rng.uniform(low, high, size=(2000, 3))
    moved = np.array([transform.TransformPoint(tuple(p)) for p in points])
    lengths = np.linalg.norm(moved - points, axis=1)
    assert lengths.max() <= 7.0 + 1e-6
    assert lengths.max() > 2.0


def test_elastic_deformation_keeps_labels_and_bounds_boundary_motion(tissue_map):
    max_mm = 6.0
    deformed = sct.elastic_deform(tissue_map, np.random.default_rng(2), max_mm,
                                  control_spacing_mm=20.0)
    before = sitk.GetArrayFromImage(tissue_map)
    after = sitk.GetArrayFromImage(deformed)
    assert set(np.unique(after)) == set(np.unique(before))
    assert (after != before).sum() > 50
    spacing_zyx = SPACING[::-1]
    # Nearest-neighbour sampling adds at most half a voxel diagonal.
    tolerance = max_mm + 0.5 * float(np.linalg.norm(spacing_zyx)) + 1e-6
    for label in np.unique(before):
        distance = ndimage.distance_transform_edt(before != label, sampling=spacing_zyx)
        assert distance[after == label].max() <= tolerance, label


def test_crop_fov_keeps_physical_positions(tissue_map):
    cropped = sct.crop_fov(tissue_map, np.random.default_rng(0), (0.6, 0.7, 0.8))
    for n, m, low in zip(tissue_map.GetSize(), cropped.GetSize(), (0.6, 0.7, 0.8)):
        assert round(low * n) - 1 <= m <= n
    index = (3, 4, 5)
    point = cropped.TransformIndexToPhysicalPoint(index)
    assert cropped[index] == tissue_map[tissue_map.TransformPhysicalPointToIndex(point)]


def test_headneck_patient_split_keeps_patients_together():
    scans = ["0522c0014", "0522c0017", "0522c0727a", "0522c0727b", "0522c0057",
             "TCGA-CV-5977", "TCGA-CV-5978", "0522c0161"]
    for seed in range(20):
        train, test = sct.headneck_patient_split(scans, seed, test_fraction=0.3)
        assert sorted(train + test) == sorted(scans)
        assert not set(train) & set(test)
        assert train and test
        assert ("0522c0727a" in test) == ("0522c0727b" in test)
    assert sct.headneck_patient_split(scans, 3) == sct.headneck_patient_split(scans, 3)


def test_headneck_tissues_add_skull_spine_and_body_without_touching_organs():
    shape = (72, 80, 80)  # (z, y, x), 2 x 2 x 2.5 mm
    spacing_zyx = SPACING[::-1]
    labels = np.zeros(shape, dtype=np.uint8)
    label = sct.HEADNECK_LABEL
    labels[_ball(shape, (46, 40, 40), 30.0, spacing_zyx)] = label["Brain"]
    labels[:36, 50:54, 38:42] = label["Spinal-Canal"]
    labels[:36, 51:53, 39:41] = label["Spinal-Cord"]
    labels[_ball(shape, (38, 24, 30), 6.0, spacing_zyx)] = label["Orbit-Rt"]
    labels[_ball(shape, (38, 24, 50), 6.0, spacing_zyx)] = label["Orbit-Lt"]
    labels[18:26, 20:26, 28:52] = label["Mandible"]
    organs = _image(labels)
    tissues = sitk.GetArrayFromImage(sct.headneck_tissues(organs))

    np.testing.assert_array_equal(np.where(labels > 0, tissues, 0), labels)
    kinds = set(np.unique(tissues)) - set(np.unique(labels))
    assert {sct.HeadNeckTissue.SKULL, sct.HeadNeckTissue.VERTEBRAL_CORTEX,
            sct.HeadNeckTissue.SOFT_TISSUE, sct.HeadNeckTissue.FAT} <= kinds
    from_brain = ndimage.distance_transform_edt(labels != label["Brain"], sampling=spacing_zyx)
    skull = tissues == sct.HeadNeckTissue.SKULL
    assert from_brain[skull].min() > 2.0 and from_brain[skull].max() <= 9.0
    # The body encloses every organ with a margin, and air surrounds the body.
    body = tissues > 0
    assert ndimage.binary_erosion(body, iterations=2, border_value=1)[labels > 0].all()
    assert not body[:, 0, :].any() and not body[:, :, 0].any()
    vertebra = np.isin(tissues, (sct.HeadNeckTissue.VERTEBRAL_BODY,
                                 sct.HeadNeckTissue.VERTEBRAL_CORTEX))
    assert np.argwhere(vertebra)[:, 0].max() < 36  # only along the spinal canal


def test_write_msd_dataset(tmp_path, tissue_map):
    image = sct.synthesize_ct(tissue_map, TISSUE_HU, np.random.default_rng(0))
    labels = sct.relabel(tissue_map, {1: 1, 2: 2})
    entry = sct.write_msd_case(tmp_path / "set", "case_000", image, labels)
    path = sct.write_msd_dataset_json(tmp_path / "set", "demo", "test set",
                                      {0: "background", 1: "a", 2: "b"}, [entry],
                                      synthesis={"case_000": {"phase": "native"}})
    dataset = json.loads(path.read_text(encoding="utf-8"))
    assert dataset["labels"] == {"0": "background", "1": "a", "2": "b"}
    assert dataset["training"] == [{"image": "./imagesTr/case_000.nii.gz",
                                    "label": "./labelsTr/case_000.nii.gz"}]
    assert dataset["synthesis"]["case_000"]["phase"] == "native"
    stored = sitk.ReadImage(str(path.parent / "imagesTr" / "case_000.nii.gz"))
    assert stored.GetPixelID() == sitk.sitkInt16
    assert stored.GetSpacing() == pytest.approx(SPACING)
    stored_labels = sitk.ReadImage(str(path.parent / "labelsTr" / "case_000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored_labels),
                                  sitk.GetArrayFromImage(labels))


def test_cli_refuses_to_write_inside_the_repository(capsys):
    assert sct.main(["--dataset", "icrp", "--out", str(sct.REPO_ROOT / "cache")]) == 2
    assert "inside the repository" in capsys.readouterr().err
