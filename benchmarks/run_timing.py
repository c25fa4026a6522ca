"""What the speed benchmarks measure around one `isseg refine` run, in one place: the time of plain
inference (the network's own prediction of the case, network loaded) and the peak memory per stage.

Seconds per stage are the run's own (report.json "seconds", isseg.timing.StageTimer); StageMonitor
adds the peak resident memory of this process (sampled every 20 ms) and, on CUDA, the peak allocated
GPU memory, per stage, from the run's `stage` events. Used by benchmark_refine.py,
benchmark_nnunet_refine.py and real_anatomy.py.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from isseg import model_package
from isseg.events import EventWriter
from isseg.networks import predict_probabilities


def resident_bytes(pid: int | str = "self") -> int:
    """Resident memory (bytes) of this process or of process `pid`."""
    with open(f"/proc/{pid}/statm", encoding="utf-8") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StageMonitor(EventWriter):
    """An EventWriter that records peak memory (bytes) per stage instead of printing events; pass it
    as the run's events."""

    def __init__(self, device: torch.device):
        super().__init__(stream=sys.stderr, mode="json")
        self.device = device
        self.stage = "initial"
        self.peak_rss: dict[str, int] = {}
        self.peak_gpu: dict[str, int] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            stage = self.stage
            self.peak_rss[stage] = max(self.peak_rss.get(stage, 0), resident_bytes())

    def _close_stage(self) -> None:
        if self.device.type == "cuda":
            self.peak_gpu[self.stage] = max(self.peak_gpu.get(self.stage, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def emit(self, event: str, **fields) -> None:
        if event == "stage" and fields.get("stage") != self.stage:
            self._close_stage()
            self.stage = fields["stage"]
        elif event in ("done", "cancelled"):
            self._close_stage()
            self._stop.set()


def plain_inference_seconds(package_path: Path, image: sitk.Image, device: torch.device, repeats: int = 1) -> float:
    """Median seconds of one plain inference of `image` (the network kind's preparation onto the model
    grid and its own prediction, network loaded once), over `repeats` calls after one warm-up call."""
    package = model_package.load(package_path, check_atlas=False)
    kind, network = package.network_kind, package.build_network().to(device)
    times = []
    for _ in range(repeats + 1):
        start = time.monotonic()
        predict_probabilities(kind, network, kind.prepare(image).tensor, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.monotonic() - start)
    del network
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return float(np.median(times[1:]))  # the first call includes one-off warm-up
