"""`real_anatomy.py prepare`: the bundle of inputs, made where ../shared/data is (CPU work).

Writes into BUNDLE: headneck_tissues/<scan>.nii.gz (tissue maps at BUNDLE_HEADNECK_SPACING), the
human inter-observer rows of the test scans (headneck_interobserver.csv, also summarised into the
results folder), icrp110/, real_ct/ (DICOM, TotalSegmentator labels and class names), and
manifest.json (seed, patient split, sources) last: a bundle without it is incomplete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

import synthetic_ct as sct
from real_anatomy_jobs import outside_repository_or_ignored, process_pool, say
from real_anatomy_plans import BUNDLE_HEADNECK_SPACING
from real_anatomy_reports import interobserver_rows, write_csv, write_interobserver_results

SOURCES = {"headneck": "Nikolov et al. 2021, google-deepmind/tcia-ct-scan-dataset (CC BY 4.0)",
           "icrp": "ICRP Publication 110 adult male phantom",
           "real_ct": "wasserth/TotalSegmentator test files (Apache-2.0); labels are TotalSegmentator predictions"}


def _headneck_tissue_job(job: tuple[str, str, str, tuple]) -> str:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    scans_dir, scan, out_path, spacing = job
    tissues = sct.headneck_scan_tissues(Path(scans_dir) / scan, spacing)
    sitk.WriteImage(tissues, out_path, useCompression=True)
    return scan


def _interobserver_job(job: tuple[str, str, str]) -> list[dict]:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    first_dir, second_dir, scan = job
    first, second, voxel_ml = {}, {}, None
    for organ in sct.HEADNECK_ORGANS:
        a = sct._read_headneck_mask(Path(first_dir) / scan, organ)
        b = sct._read_headneck_mask(Path(second_dir) / scan, organ)
        same_grid = (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
                     and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
                     and np.allclose(a.GetDirection(), b.GetDirection()))
        if not same_grid:
            raise ValueError(f"{scan} {organ}: the two annotators' masks are not on one grid")
        first[organ] = sitk.GetArrayFromImage(a)
        second[organ] = sitk.GetArrayFromImage(b)
        voxel_ml = float(np.prod(a.GetSpacing())) / 1000.0
    return interobserver_rows(scan, first, second, voxel_ml)


def reusable_bundle(bundle: Path, seed: int, force: bool) -> bool:
    """True when `bundle` is complete (its manifest) and was made with `seed`, and not `force`."""
    manifest_path = bundle / "manifest.json"
    if force or not manifest_path.exists():
        return False
    return json.loads(manifest_path.read_text(encoding="utf-8")).get("seed") == seed


def headneck_tissues_and_agreement(scans_dir: Path, second_dir: Path, scans: list[str], test_scans: list[str],
                                   tissue_dir: Path, jobs: int, force: bool) -> list[dict]:
    """Tissue maps of every scan (those missing, or all with `force`) and, at the same time in the same
    process pool, the inter-observer rows of the test scans."""
    tissue_dir.mkdir(exist_ok=True)
    tissue_jobs = [(str(scans_dir), scan, str(tissue_dir / f"{scan}.nii.gz"), BUNDLE_HEADNECK_SPACING)
                   for scan in scans if force or not (tissue_dir / f"{scan}.nii.gz").exists()]
    agreement_jobs = [(str(scans_dir), str(second_dir), scan) for scan in test_scans]
    with process_pool(jobs) as pool:
        pending_rows = pool.map_async(_interobserver_job, agreement_jobs)
        for scan in pool.imap_unordered(_headneck_tissue_job, tissue_jobs):
            say(f"  tissue map {scan}")
        return [row for part in pending_rows.get() for row in part]


def copy_sources(data_dir: Path, bundle: Path) -> None:
    """The ICRP phantom files and the real CT (DICOM, TotalSegmentator labels and class names)."""
    shutil.copytree(data_dir / "icrp110", bundle / "icrp110", dirs_exist_ok=True)
    real, source = bundle / "real_ct", data_dir / "real_ct" / "totalseg_dicom_abdomen"
    real.mkdir(exist_ok=True)
    shutil.copytree(source / "dicom", real / "dicom", dirs_exist_ok=True)
    shutil.copy2(source / "labels_totalsegmentator.nii.gz", real)
    shutil.copy2(data_dir / "real_ct" / "totalsegmentator_total_classes.json", real)


def prepare(args) -> Path:
    """Write the bundle (module docstring); an existing complete bundle of the same seed is reused."""
    data_dir, bundle = args.data_dir.expanduser().resolve(), args.bundle.expanduser().resolve()
    if not outside_repository_or_ignored(bundle):
        raise SystemExit(f"error: --bundle {bundle} is inside the repository and not git-ignored; "
                         "use a folder outside it, or an ignored one such as runs/")
    if reusable_bundle(bundle, args.seed, args.force):
        say(f"bundle {bundle} exists (seed {args.seed}); reusing it (--force to rebuild)")
        return bundle
    started = time.monotonic()
    bundle.mkdir(parents=True, exist_ok=True)
    say(f"prepare: data {data_dir} -> bundle {bundle}")
    scans_dir = data_dir / "headneck_contours" / "oncologist"
    scans = sorted(p.name for p in scans_dir.iterdir() if p.is_dir())
    train_scans, test_scans = sct.headneck_patient_split(scans, seed=args.seed)
    say(f"head and neck: {len(scans)} scans, split by patient (seed {args.seed}): "
        f"{len(train_scans)} training scans, {len(test_scans)} test scans {test_scans}")
    rows = headneck_tissues_and_agreement(scans_dir, data_dir / "headneck_contours" / "radiographer", scans,
                                          test_scans, bundle / "headneck_tissues", args.jobs, args.force)
    write_csv(rows, bundle / "headneck_interobserver.csv")
    write_interobserver_results(rows, args.results.expanduser(), test_scans)
    copy_sources(data_dir, bundle)
    manifest = {"seed": args.seed, "headneck_tissue_spacing": list(BUNDLE_HEADNECK_SPACING),
                "headneck_train_scans": train_scans, "headneck_test_scans": test_scans, "sources": SOURCES,
                "data_dir": str(data_dir)}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    say(f"prepare done in {time.monotonic() - started:.0f} s: bundle {bundle} ({size / 2**20:.1f} MiB)")
    return bundle
