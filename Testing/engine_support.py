"""Helpers shared by the engine tests: small CT volumes, oblique directions, the worker as a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk


def oblique_direction(about_z_deg: float = 20.0, about_x_deg: float = 10.0) -> tuple[float, ...]:
    """A proper rotation (row-major 3x3) tilted about z, then about x: an oblique scan."""
    a, b = math.radians(about_z_deg), math.radians(about_x_deg)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (about_x @ about_z).ravel())


def small_ct(size_xyz=(20, 16, 10), spacing=(0.8, 1.1, 2.5), direction=None, origin=(-31.5, 12.25, 104.0),
             seed: int = 0) -> sitk.Image:
    """A float32 CT-like volume in HU: air around a noisy soft-tissue block with a bright 'bone' inside."""
    rng = np.random.default_rng(seed)
    array = np.full(size_xyz[::-1], -1000.0, dtype=np.float32)
    z, y, x = (np.array(size_xyz[::-1]) // 4)
    array[z:-z, y:-y, x:-x] = 40.0
    array[z + 1:z + 2, y + 1:y + 3, x + 1:x + 3] = 700.0
    array += rng.normal(0, 10, array.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.round(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def write_dicom_series(image: sitk.Image, folder, series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1") -> None:
    """Write a 3D CT image (HU) as one DICOM file per slice with the tags that carry its geometry:
    Image Position (Patient) per slice, Image Orientation (Patient), Slice Thickness, Pixel Spacing
    (from the image spacing), rescale slope/intercept and one Series Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = hu[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0008": "DERIVED\\SECONDARY",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",  # SOP Instance UID
            "0020|000d": f"{series_uid}.0",  # Study Instance UID
            "0020|000e": series_uid,  # Series Instance UID
            "0020|0011": "1",
            "0020|0013": str(k + 1),  # Instance Number
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),  # Image Position (Patient)
            "0020|0037": orientation,  # Image Orientation (Patient)
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",  # Slice Thickness
            "0028|1052": "-1024",  # Rescale Intercept: stored values are HU + 1024
            "0028|1053": "1",  # Rescale Slope
            "0028|1054": "HU",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(slice_image)


def parse_events(stdout: str) -> list[dict]:
    """The protocol events (JSON lines) in a worker's stdout."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def worker_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "isseg.cli", *arguments]


def run_worker(*arguments: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run `python -m isseg.cli <arguments>` to the end; returns the finished process and its events."""
    result = subprocess.run(worker_command(*arguments), capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ), encoding="utf-8")
    return result, parse_events(result.stdout)


class LiveWorker:
    """A worker started with Popen whose events are read as they come (stderr goes to a file, so a
    full pipe never blocks it). `events()` yields each event; the process is killed after `timeout` s."""

    def __init__(self, *arguments: str, stderr_path, timeout: float = 600):
        import threading

        self.stderr_file = open(stderr_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(worker_command(*arguments), stdout=subprocess.PIPE, stderr=self.stderr_file,
                                        text=True, env=dict(os.environ), encoding="utf-8")
        self.stderr_path = stderr_path
        self.watchdog = threading.Timer(timeout, self.process.kill)
        self.watchdog.start()
        self.received: list[dict] = []

    def events(self):
        for line in self.process.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                self.received.append(event)
                yield event

    def finish(self) -> int:
        """Read the remaining events, wait for the exit; returns the exit code."""
        for _ in self.events():
            pass
        code = self.process.wait()
        self.watchdog.cancel()
        self.stderr_file.close()
        return code

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8") as stream:
            return stream.read()[-3000:]


def train_tiny_model(folder, *options: str) -> int:
    """`isseg train` on three coarse phantoms (48 x 48 x 32 voxels of 8 mm) for two steps, no validation, into
    folder/package, with `options` added; the exit code. Seconds on a CPU: for tests of what training does."""
    from isseg import cli, phantom

    specs = [phantom.training_spec(seed, size=(48, 48, 32), spacing=(8.0, 8.0, 8.0)) for seed in range(3)]
    dataset = phantom.write_msd_dataset(folder / "dataset", specs)
    return cli.main(["train", "--dataset", str(dataset), "--output", str(folder / "package"), *options,
                     "--spacing", "8", "8", "8", "--patch", "32", "32", "16", "--channels", "4", "8", "16",
                     "--steps", "2", "--evaluate-every", "2", "--validation-fraction", "0", "--device", "cpu",
                     "--progress", "json"])
