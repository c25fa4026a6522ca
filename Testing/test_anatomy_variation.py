"""Tests of patient-to-patient anatomy variation (benchmarks/anatomy_variation.py) on a small map built here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import anatomy_variation as av  # noqa: E402

BODY, BIG, SMALL = 1, 5, 7
ORGANS = {"big": (BIG,), "small": (SMALL,)}
SPACING = 3.0


def tissue_map() -> sitk.Image:
    """A body (ID 1) holding a large ball (ID 5) and a small one (ID 7) apart from it; (z, y, x) 40 x 48 x 56."""
    z, y, x = np.mgrid[:40, :48, :56].astype(float)
    ids = np.zeros((40, 48, 56), np.uint8)
    ids[4:36, 4:44, 4:52] = BODY
    ids[(z - 20) ** 2 + (y - 24) ** 2 + (x - 18) ** 2 <= 8 ** 2] = BIG
    ids[(z - 20) ** 2 + (y - 24) ** 2 + (x - 40) ** 2 <= 5 ** 2] = SMALL
    image = sitk.GetImageFromArray(ids)
    image.SetSpacing((SPACING,) * 3)
    image.SetOrigin((-80.0, 20.0, 5.0))
    return image


def centroid_mm(ids: np.ndarray, value: int) -> np.ndarray:
    """(x, y, z) mm of the voxels of `value`."""
    return np.argwhere(ids == value).mean(axis=0)[::-1] * SPACING


def test_organs_are_resized_and_moved_as_drawn_and_the_map_stays_valid():
    tissues = tissue_map()
    changes = {"big": av.OrganChange(scale=1.25 ** (1 / 3), shift_mm=(-6.0, 0.0, -6.0)),
               "small": av.OrganChange(scale=0.7 ** (1 / 3), shift_mm=(0.0, 0.0, 0.0))}
    varied, folded = av.vary_anatomy(tissues, ORGANS, changes, falloff_mm=12.0)
    before, after = sitk.GetArrayFromImage(tissues), sitk.GetArrayFromImage(varied)
    assert set(np.unique(after)) <= set(np.unique(before))
    assert folded < 0.01
    assert varied.GetSpacing() == tissues.GetSpacing() and varied.GetOrigin() == tissues.GetOrigin()
    assert 1.15 < (after == BIG).sum() / (before == BIG).sum() < 1.35
    # The big organ's falloff reaches the small one and dilutes its change a little.
    assert 0.6 < (after == SMALL).sum() / (before == SMALL).sum() < 0.9
    np.testing.assert_allclose(centroid_mm(after, BIG) - centroid_mm(before, BIG), [-6.0, 0.0, -6.0], atol=1.5)
    np.testing.assert_allclose(centroid_mm(after, SMALL), centroid_mm(before, SMALL), atol=1.5)


def test_an_organ_alone_is_resized_as_drawn():
    tissues = tissue_map()
    varied, _ = av.vary_anatomy(tissues, ORGANS, {"small": av.OrganChange(0.7 ** (1 / 3), (0.0, 0.0, 0.0))})
    before, after = sitk.GetArrayFromImage(tissues), sitk.GetArrayFromImage(varied)
    assert 0.6 < (after == SMALL).sum() / (before == SMALL).sum() < 0.75  # 0.7 asked, a ball of radius 5 voxels
    assert abs((after == BIG).sum() / (before == BIG).sum() - 1) < 0.03  # only the falloff's tail reaches it


def test_no_change_leaves_the_map_as_it_is():
    tissues = tissue_map()
    unchanged = {name: av.OrganChange(1.0, (0.0, 0.0, 0.0)) for name in ORGANS}
    varied, folded = av.vary_anatomy(tissues, ORGANS, unchanged)
    assert np.array_equal(sitk.GetArrayFromImage(varied), sitk.GetArrayFromImage(tissues)) and folded < 1e-4


def test_draws_are_seeded_and_clipped_within_the_population_ranges():
    first = av.draw_organ_changes(np.random.default_rng(3))
    assert first == av.draw_organ_changes(np.random.default_rng(3))
    assert first != av.draw_organ_changes(np.random.default_rng(4))
    draws = [av.draw_organ_changes(np.random.default_rng(seed)) for seed in range(200)]
    for name, spread in av.ABDOMEN_ORGAN_VARIATION.items():
        volumes = np.array([d[name].scale ** 3 for d in draws])
        shifts = np.array([d[name].shift_mm for d in draws])
        assert volumes.min() >= 1 - av.CLIP_SD * spread.volume_cv - 1e-9
        assert volumes.max() <= 1 + av.CLIP_SD * spread.volume_cv + 1e-9
        assert abs(volumes.std() / spread.volume_cv - 1) < 0.25
        assert np.all(np.abs(shifts) <= av.CLIP_SD * np.array(spread.position_sd_mm) + 1e-9)


def test_the_record_gives_what_was_drawn_beside_what_the_map_shows():
    tissues = tissue_map()
    changes = {"big": av.OrganChange(1.25 ** (1 / 3), (-6.0, 0.0, -6.0))}
    varied, _ = av.vary_anatomy(tissues, ORGANS, changes, falloff_mm=12.0)
    record = av.measured_changes(tissues, varied, ORGANS, changes)["big"]
    assert record["volume_factor_drawn"] == 1.25 and record["shift_mm_drawn"] == [-6.0, 0.0, -6.0]
    assert abs(record["volume_factor"] - 1.25) < 0.1
    np.testing.assert_allclose(record["shift_mm"], [-6.0, 0.0, -6.0], atol=1.5)


def test_the_population_draws_are_those_the_committed_results_were_made_with():
    # BENCHMARKS.md section 12 and the realct anatomy table were drawn with seeded population draws: the
    # training ranges must not change them.
    spleen = av.draw_organ_changes(np.random.default_rng(3))["spleen"]
    assert round(spleen.scale ** 3, 6) == 0.864205
    np.testing.assert_allclose(spleen.shift_mm, [-1.2936, -12.0, -2.7832], atol=1e-4)


def test_training_draws_are_seeded_log_uniform_and_wider_than_the_population():
    first = av.draw_organ_changes(np.random.default_rng(3), av.TRAINING_ORGAN_VARIATION)
    assert first == av.draw_organ_changes(np.random.default_rng(3), av.TRAINING_ORGAN_VARIATION)
    draws = [av.draw_organ_changes(np.random.default_rng(seed), av.TRAINING_ORGAN_VARIATION) for seed in range(400)]
    for name, (low, high) in av.TRAINING_VOLUME_FACTOR_RANGE.items():
        volumes = np.array([d[name].scale ** 3 for d in draws])
        assert low - 1e-9 <= volumes.min() and volumes.max() <= high + 1e-9
        # log-uniform: as many draws below the geometric middle of the range as above it
        assert 0.4 < (volumes < np.sqrt(low * high)).mean() < 0.6
        population = av.ABDOMEN_ORGAN_VARIATION[name]
        assert volumes.max() > 1 + av.CLIP_SD * population.volume_cv  # beyond what the test bodies reach
    spleens = np.array([d["spleen"].scale ** 3 for d in draws])
    assert (spleens > 2.0).mean() > 0.2  # twice the ICRP spleen, as the real 20-slice CT's, is common
