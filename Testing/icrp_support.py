"""Tiny stand-ins for the ICRP 110 phantom files (AM_organ_ids.npz, AM_organs.dat, AM_media.dat), so that
code reading ../shared/data/icrp110 is tested without it: a 20 x 20 x 30 voxel body with the organs the
loader checks and those the real-anatomy model learns, and organ and media tables in the files' layout."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synthetic_ct as sct  # noqa: E402

#: Organ ID -> (name, tissue number, density g/cm3) of the stand-in body.
ORGANS = {10: ("Blood vessels, trunk", 28, 1.060), 52: ("Lumbar spine, spongiosa", 31, 1.180),
          61: ("Brain", 30, 1.040), 70: ("Gall bladder wall", 30, 1.030), 72: ("Stomach wall", 30, 1.040),
          73: ("Stomach contents", 30, 1.040), 89: ("Kidney, left, cortex", 30, 1.050),
          92: ("Kidney, right, cortex", 30, 1.050), 95: ("Liver", 30, 1.050), 113: ("Pancreas", 30, 1.040),
          117: ("Residual tissue, trunk", 49, 0.950), 127: ("Spleen", 30, 1.040),
          137: ("Urinary bladder wall", 30, 1.040)}
#: Tissue number -> mass percent of H C N O Na Mg P S Cl K Ca Fe I.
MEDIA = {27: "10.0 19.9 4.2 65.0 0.2 0.0 0.1 0.2 0.3 0.1 0.0 0.0 0.0",
         28: "10.2 11.0 3.3 74.5 0.1 0.0 0.1 0.2 0.3 0.2 0.0 0.1 0.0",
         30: "10.2 13.0 3.1 72.5 0.2 0.0 0.2 0.3 0.2 0.3 0.0 0.0 0.0",
         31: "8.5 40.4 2.8 36.7 0.1 0.1 3.4 0.2 0.2 0.1 7.4 0.1 0.0",
         49: "11.4 58.8 0.8 28.7 0.1 0.0 0.0 0.1 0.1 0.0 0.0 0.0 0.0"}


def fake_icrp_ids(mirror_x: bool = False) -> np.ndarray:
    """A tiny (z, y, x) = (20, 20, 30) body with the organs the loader checks."""
    ids = np.zeros((20, 20, 30), dtype=np.uint8)
    ids[:, 2:18, 3:27] = 117  # residual tissue, trunk
    ids[:, 13:17, 13:17] = 52  # lumbar spine, posterior (high y)
    ids[8:14, 6:11, 5:12] = sct.ICRP_LIVER_ID  # patient's right (low x)
    ids[8:14, 6:11, 20:25] = sct.ICRP_SPLEEN_ID
    ids[8:12, 12:15, 8:11] = 92  # right kidney
    ids[8:12, 12:15, 20:23] = 89  # left kidney
    ids[4:16, 9:12, 16:19] = sct.ICRP_VESSELS_TRUNK_ID  # aorta: left of and in front of the spine
    ids[4:16, 9:11, 11:13] = sct.ICRP_VESSELS_TRUNK_ID  # vena cava: right
    ids[18:20, 5:15, 10:20] = sct.ICRP_BRAIN_ID
    ids[0:2, 5:10, 12:18] = 137  # bladder
    return ids[:, :, ::-1].copy() if mirror_x else ids


def write_fake_icrp(folder: Path) -> Path:
    """The three ICRP files in `folder` (created): fake_icrp_ids plus stomach, pancreas and gallbladder."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = fake_icrp_ids()
    ids[10:14, 3:6, 14:22] = 72  # stomach wall, anterior
    ids[11:13, 4:6, 15:21] = 73  # stomach contents
    ids[9:11, 11:13, 13:16] = 113  # pancreas, in front of the spine
    ids[10:12, 9:11, 6:8] = 70  # gallbladder, under the liver
    np.savez(folder / "AM_organ_ids.npz", ids=ids)
    organ_rows = [f"{i}    {name}    {tissue}    {density:.3f}" for i, (name, tissue, density) in ORGANS.items()]
    (folder / "AM_organs.dat").write_text("Organs\n\nID name tissue density\n" + "\n".join(organ_rows) + "\n")
    media_rows = [f"{number}    Tissue{number}    {percents}" for number, percents in MEDIA.items()]
    (folder / "AM_media.dat").write_text("      1     6     7     8    11    12    15    16    17    19    20    26    53\n"
                                         "   H   C   N   O  Na  Mg   P   S  Cl   K  Ca  Fe   I\n"
                                         "No.   (% by mass)\n" + "\n".join(media_rows) + "\n")
    return folder
