"""Figure of synthetic CT cases: benchmarks/figures/synthetic_cases.png.

Three variants of the ICRP 110 abdomen (one per contrast phase, each with its
own elastic deformation, noise and field of view) and three head-and-neck
scans, each as an axial slice, a coronal slice and the axial slice with the
target labels outlined. Reads the reference data from ../shared/data (or
--data-dir); every case is seeded, so the figure is reproducible:

    python benchmarks/plot_synthetic_cases.py
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib
import PIL.Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

import synthetic_ct as sct  # noqa: E402

#: Head-and-neck scans shown, each with the organs whose largest axial section is shown.
HEADNECK_SCANS = (
    ("0522c0014", ("Orbit-Lt", "Orbit-Rt")),
    ("0522c0457", ("Parotid-Lt", "Parotid-Rt")),
    ("TCGA-CV-5978", ("Submandibular-Lt", "Submandibular-Rt")),
)
# Soft-tissue window, level 40 HU, width 400 HU.
WINDOW_HU = (-160.0, 240.0)


def _icrp_cases(data_dir: Path, seed: int):
    """(title, image, labels, axial z, coronal y) for one ICRP case per contrast phase."""
    icrp_dir = data_dir / "icrp110"
    tissues = sct.icrp_abdomen_tissues(icrp_dir)
    tissue_hu = sct.icrp_tissue_hu(icrp_dir)
    target = {i: v for v, (_, ids) in sct.ICRP_ABDOMEN_LABELS.items() for i in ids}
    kidneys_pancreas = (3, 4, 5)
    for index, phase in enumerate(sct.ICRP_ENHANCEMENT_HU):
        rng = np.random.default_rng([seed, index])
        settings = sct.draw_case_settings(rng, [phase], max_deform_mm=15.0)
        image, labels = sct.make_case(tissues, tissue_hu, sct.ICRP_ENHANCEMENT_HU, target,
                                      settings, rng)
        organs = np.isin(sitk.GetArrayFromImage(labels), kidneys_pancreas)
        axial_z = int(np.argmax(organs.sum(axis=(1, 2))))
        coronal_y = int(np.argwhere(organs)[:, 1].mean())
        title = f"ICRP abdomen, {phase.replace('_', '-')}, noise {settings.noise_hu:.0f} HU"
        yield title, image, labels, axial_z, coronal_y


def _headneck_cases(data_dir: Path, seed: int):
    """(title, image, labels, axial z, coronal y) for a few head-and-neck scans."""
    target = {v: v for v in sct.HEADNECK_LABEL.values()}
    phases = list(sct.HEADNECK_ENHANCEMENT_HU)
    for index, (scan, axial_organs) in enumerate(HEADNECK_SCANS):
        tissues = sct.headneck_scan_tissues(data_dir / "headneck_contours" / "oncologist" / scan)
        rng = np.random.default_rng([seed, 100 + index])
        settings = sct.draw_case_settings(rng, [phases[index % len(phases)]], max_deform_mm=8.0)
        image, labels = sct.make_case(tissues, sct.HEADNECK_TISSUE_HU,
                                      sct.HEADNECK_ENHANCEMENT_HU, target, settings, rng)
        array = sitk.GetArrayFromImage(labels)
        shown = np.isin(array, [sct.HEADNECK_LABEL[organ] for organ in axial_organs])
        canal = array == sct.HEADNECK_LABEL["Spinal-Canal"]
        axial_z = int(np.argmax(shown.sum(axis=(1, 2))))
        coronal_y = int(np.argwhere(canal)[:, 1].mean())
        title = f"head and neck {scan}, {settings.phase}, noise {settings.noise_hu:.0f} HU"
        yield title, image, labels, axial_z, coronal_y


def _extent(image: sitk.Image, axes: tuple[int, int]) -> list[float]:
    """imshow extent (left, right, bottom, top) in mm for two SimpleITK axes (columns, rows)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    width = size[axes[0]] * spacing[axes[0]]
    height = size[axes[1]] * spacing[axes[1]]
    return [0.0, width, 0.0, height]


def _row_height(image: sitk.Image) -> float:
    """Height/width ratio of the taller of the axial and coronal views."""
    size_mm = np.array(image.GetSize()) * np.array(image.GetSpacing())
    return max(size_mm[1] / size_mm[0], size_mm[2] / size_mm[0])


def plot(data_dir: Path, out: Path, seed: int) -> None:
    """Render the figure to out (PNG, 256-colour palette to keep it small)."""
    cases = list(_icrp_cases(data_dir, seed)) + list(_headneck_cases(data_dir, seed))
    column_inches = 3.3
    heights = [column_inches * _row_height(case[1]) + 0.4 for case in cases]
    fig, axes = plt.subplots(len(cases), 3, figsize=(3 * column_inches, sum(heights) + 0.4),
                             gridspec_kw={"height_ratios": heights})
    colors = plt.get_cmap("tab20")
    for row, (title, image, labels, axial_z, coronal_y) in zip(axes, cases):
        hu = sitk.GetArrayFromImage(image)
        lab = sitk.GetArrayFromImage(labels)
        axial_extent = _extent(image, (0, 1))
        # Axial rows run anterior (top) to posterior; columns patient right to left.
        axial_extent[2], axial_extent[3] = axial_extent[3], axial_extent[2]
        for ax in (row[0], row[2]):
            ax.imshow(hu[axial_z], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1],
                      extent=axial_extent, origin="upper", interpolation="bilinear")
        for value in np.unique(lab[axial_z]):
            if value:
                row[2].contour(lab[axial_z] == value, levels=[0.5], colors=[colors(value % 20)],
                               linewidths=0.7, extent=axial_extent, origin="upper")
        # Coronal: head at the top, patient's right on the viewer's left.
        row[1].imshow(hu[:, coronal_y, :], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1],
                      extent=_extent(image, (0, 2)), origin="lower", interpolation="bilinear")
        row[0].set_title(f"{title}\naxial", fontsize=8, loc="left")
        row[1].set_title("coronal", fontsize=8)
        row[2].set_title("axial, target labels", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle("Synthetic CT from real label maps (window L40/W400; A up, patient R on left)",
                 fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.985))
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    PIL.Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=sct.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "figures" / "synthetic_cases.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    plot(args.data_dir, args.out, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
