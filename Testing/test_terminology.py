"""Label names to model.json label entries (isseg.terminology.describe_label)."""

from __future__ import annotations

import numpy as np
import pytest

from isseg.postprocess import keep_largest_component
from isseg.terminology import LEFT, RIGHT, describe_label


def code_of(entry: dict) -> str:
    return entry["terminology"]["type"]["code"]


def test_a_known_organ_gets_its_code_color_and_one_piece():
    entry = describe_label(1, "Liver")
    assert entry["value"] == 1 and entry["name"] == "Liver"
    assert code_of(entry) == "10200004" and entry["single_component"] is True
    assert len(entry["color"]) == 3 and "modifier" not in entry["terminology"]


@pytest.mark.parametrize("name", ["kidney_left", "Kidney-R", "left lung", "lung_rt", "Parotid_L", "eye right"])
def test_one_side_of_a_paired_organ_is_one_piece(name):
    entry = describe_label(3, name)
    assert entry["single_component"] is True
    assert entry["terminology"]["modifier"] in (LEFT, RIGHT)


@pytest.mark.parametrize("name, code", [("kidney", "64033007"), ("kidneys", "64033007"), ("Lung", "39607008"),
                                        ("lungs", "39607008"), ("parotid", "45289007"), ("eyes", "81745001"),
                                        ("optic nerve", "18234004"), ("adrenal_glands", "23451007")])
def test_both_sides_under_one_label_are_two_pieces(name, code):
    # keeping the largest component of such a label would delete one kidney or lung
    entry = describe_label(2, name)
    assert code_of(entry) == code
    assert entry["single_component"] is False


@pytest.mark.parametrize("name", ["eye", "Eyeball_L", "globe"])
def test_the_eye_is_coded_as_the_eye_not_the_orbit(name):
    entry = describe_label(4, name)
    assert entry["terminology"]["type"] == {"scheme": "SCT", "code": "81745001", "meaning": "Eye"}


def test_orbit_keeps_its_own_code():
    assert code_of(describe_label(5, "orbit_left")) == "363654007"


def test_an_unknown_name_has_no_code_and_is_not_forced_to_one_piece():
    entry = describe_label(7, "tumour bed")
    assert entry["terminology"]["type"] == {"scheme": "", "code": "", "meaning": "tumour bed"}
    assert entry["single_component"] is False


def test_keeping_the_largest_component_keeps_both_kidneys_of_one_label():
    labelmap = np.zeros((6, 6, 12), np.uint8)
    labelmap[1:5, 1:5, 1:4] = 1   # right kidney
    labelmap[1:5, 1:5, 8:10] = 1  # left kidney, smaller
    labelmap[1:4, 1:4, 5] = 2     # a liver piece, and a smaller stray one
    labelmap[5, 5, 11] = 2
    kept = keep_largest_component(labelmap, [describe_label(1, "kidneys"), describe_label(2, "liver")])
    np.testing.assert_array_equal(kept == 1, labelmap == 1)
    assert kept[5, 5, 11] == 0 and np.count_nonzero(kept == 2) == 9
