"""Where a run computes, and what it does when that device runs out of memory.

`resolve_device` turns the `--device` option into a torch device; `memory_fallback_attempts` and
`with_memory_fallback` implement the documented fall-back on GPU out-of-memory: the same device with
lighter settings, then the CPU (DESIGN.md, "Bad input gets a clear message and loses nothing");
`network_to` puts a network on its device in the memory order that device computes fastest in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .errors import BadInputError, OutOfMemoryError
from .protocol import DEFAULT_DEVICE

T = TypeVar("T")

OUT_OF_MEMORY_MESSAGE = ("Out of memory, also with the lightest settings. Close other programs, crop the CT to the "
                         "region of interest, or use a machine with more memory.")


def resolve_device(name: str = DEFAULT_DEVICE) -> torch.device:
    """`auto` picks CUDA when a GPU is usable, else the CPU; `cuda` without a usable GPU is bad input.

    ISSEG_CUDA_MEMORY_FRACTION (0 to 1) caps the share of GPU memory this process may take, e.g. to
    leave room for Slicer's rendering on the same GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for, but no CUDA GPU is usable here. Use --device auto or cpu.")
    device = torch.device(name)
    if device.type == "cuda" and os.environ.get("ISSEG_CUDA_MEMORY_FRACTION"):
        torch.cuda.set_per_process_memory_fraction(float(os.environ["ISSEG_CUDA_MEMORY_FRACTION"]))
    return device


def network_to(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`network` moved to `device` for training and prediction. On the CPU its 3D convolution weights go
    into channels-last order, in which oneDNN runs a train step of the demo UNet about 20 % faster
    (BENCHMARKS.md section 8); the results are the same up to float rounding. Returns `network`."""
    network = network.to(device)
    return network.to(memory_format=torch.channels_last_3d) if device.type == "cpu" else network


def device_summary() -> dict:
    """What `isseg devices` prints: whether CUDA is usable, the device name and its memory (GiB)."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return {"cuda": True, "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1)}
    return {"cuda": False, "name": "CPU", "memory_gib": None}


@dataclass(frozen=True)
class Attempt:
    """One try of a computation: on `device`, with lighter settings or not; `fallback` says, for the
    warning shown before a retry, what changed ("" for the first try)."""

    device: torch.device
    lighter: bool = False
    fallback: str = ""


def memory_fallback_attempts(device: torch.device) -> list[Attempt]:
    """The tries on GPU out-of-memory: as asked, with lighter settings, then on the CPU. On the CPU
    there is one try: running out of host memory is not retried."""
    attempts = [Attempt(device)]
    if device.type == "cuda":
        attempts += [Attempt(device, True, "lighter settings"), Attempt(torch.device("cpu"), True, "the CPU")]
    return attempts


def with_memory_fallback(compute: Callable[[Attempt], T], attempts: list[Attempt],
                         warn: Callable[[str], None]) -> T:
    """`compute(attempt)` for each attempt in turn until one does not run out of GPU memory; `warn` gets
    the message before each retry. Raises OutOfMemoryError when every attempt ran out of memory or the
    host did (MemoryError)."""
    for attempt in attempts:
        if attempt.fallback:
            warn(f"Out of GPU memory: starting again with {attempt.fallback}.")
        try:
            return compute(attempt)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except MemoryError:
            break
    raise OutOfMemoryError(OUT_OF_MEMORY_MESSAGE)
