"""Names, colors and standard codes (SNOMED CT, as used by DICOM and 3D Slicer) of known structures.

`describe_label(value, name)` turns a label name from a dataset into the label entry of model.json:
value, name, color (r, g, b in 0..1), terminology and whether the label is known to be one piece.
Names are matched case-insensitively, with '-', ' ' and '_' treated alike and the laterality
taken from a 'left'/'right'/'lt'/'rt'/'l'/'r' word. A paired organ (kidney, lung, eye, ...) is one
piece only with a side: a label 'kidneys' or 'lung' holds both, and keeping its largest
component would delete one of them.
"""

from __future__ import annotations

import colorsys
import re

ANATOMICAL_STRUCTURE = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
LEFT = {"scheme": "SCT", "code": "7771000", "meaning": "Left"}
RIGHT = {"scheme": "SCT", "code": "24028007", "meaning": "Right"}

# name -> (SCT code, meaning, color, paired: left and right, one piece each)
KNOWN_STRUCTURES: dict[str, tuple[str, str, tuple[float, float, float], bool]] = {
    "liver": ("10200004", "Liver", (0.86, 0.55, 0.42), False),
    "spleen": ("78961009", "Spleen", (0.62, 0.35, 0.71), False),
    "kidney": ("64033007", "Kidney", (0.73, 0.44, 0.25), True),
    "aorta": ("15825003", "Aorta", (0.88, 0.2, 0.2), False),
    "gallbladder": ("28231008", "Gallbladder", (0.55, 0.76, 0.29), False),
    "pancreas": ("15776009", "Pancreas", (0.98, 0.84, 0.5), False),
    "stomach": ("69695003", "Stomach", (0.85, 0.72, 0.62), False),
    "adrenal": ("23451007", "Adrenal gland", (0.96, 0.62, 0.3), True),
    "esophagus": ("32849002", "Esophagus", (0.83, 0.67, 0.58), False),
    "brain": ("12738006", "Brain", (0.98, 0.82, 0.72), False),
    "brainstem": ("15926001", "Brainstem", (0.94, 0.71, 0.55), False),
    "spinal_cord": ("2748008", "Spinal cord", (0.96, 0.9, 0.55), False),
    "spinal_canal": ("61496007", "Spinal canal", (0.55, 0.75, 0.95), False),
    "mandible": ("91609006", "Mandible", (0.99, 0.95, 0.85), False),
    "parotid": ("45289007", "Parotid gland", (0.35, 0.75, 0.7), True),
    "submandibular": ("54019009", "Submandibular gland", (0.4, 0.6, 0.85), True),
    "lens": ("78076003", "Lens", (0.9, 0.9, 0.3), True),
    "optic_nerve": ("18234004", "Optic nerve", (0.95, 0.95, 0.2), True),
    "orbit": ("363654007", "Orbit", (0.6, 0.8, 0.9), True),
    "eye": ("81745001", "Eye", (0.85, 0.85, 0.95), True),
    "cochlea": ("80169004", "Cochlea", (0.95, 0.5, 0.6), True),
    "lacrimal": ("13561001", "Lacrimal gland", (0.6, 0.9, 0.6), True),
    "lung": ("39607008", "Lung", (0.77, 0.72, 0.67), True),
}

_SIDE_WORDS = {"left": LEFT, "lt": LEFT, "l": LEFT, "right": RIGHT, "rt": RIGHT, "r": RIGHT}
_ALIASES = {"gall_bladder": "gallbladder", "adrenal_gland": "adrenal", "kidneys": "kidney", "cord": "spinal_cord",
            "spinalcord": "spinal_cord", "opticnerve": "optic_nerve", "submandibular_gland": "submandibular",
            "parotid_gland": "parotid", "lacrimal_gland": "lacrimal", "eyes": "eye", "eyeball": "eye",
            "globe": "eye", "lungs": "lung", "adrenal_glands": "adrenal", "parotids": "parotid",
            "submandibular_glands": "submandibular", "lenses": "lens", "optic_nerves": "optic_nerve",
            "orbits": "orbit", "cochleae": "cochlea", "lacrimal_glands": "lacrimal"}


def _split_side(name: str) -> tuple[str, dict | None]:
    words = [w for w in re.split(r"[\s_\-]+", name.strip().lower()) if w]
    side = None
    kept = []
    for word in words:
        if word in _SIDE_WORDS and side is None and len(words) > 1:
            side = _SIDE_WORDS[word]
        else:
            kept.append(word)
    return "_".join(kept), side


def fallback_color(value: int) -> list[float]:
    """A distinct, saturated color for label `value` (golden-angle hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((value * 0.618034) % 1.0, 0.65, 0.9)
    return [round(r, 3), round(g, 3), round(b, 3)]


def describe_label(value: int, name: str) -> dict:
    """The model.json label entry for label `value` called `name`."""
    base, side = _split_side(name)
    base = _ALIASES.get(base, base)
    entry = {"value": value, "name": name}
    known = KNOWN_STRUCTURES.get(base)
    if known is None:
        entry.update(color=fallback_color(value), single_component=False,
                     terminology={"category": ANATOMICAL_STRUCTURE,
                                  "type": {"scheme": "", "code": "", "meaning": name}})
        return entry
    code, meaning, color, paired = known
    if side is RIGHT:  # a slightly different shade tells left and right apart in the views
        color = tuple(min(1.0, c * 1.1 + 0.05) for c in color)
    terminology = {"category": ANATOMICAL_STRUCTURE, "type": {"scheme": "SCT", "code": code, "meaning": meaning}}
    if side is not None:
        terminology["modifier"] = side
    entry.update(color=[round(c, 3) for c in color], single_component=not paired or side is not None,
                 terminology=terminology)
    return entry
