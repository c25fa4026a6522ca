"""Checks of a model package before a run uses it (DESIGN.md, "Model package"; docs/worker-protocol.md,
"Limits"). Every refusal is a BadModelError (exit 4) that names the file, the entry and what to fix.

- model.json: labels (value 1..N, a name each, colors in 0..1), input spacing (mm), orientation code,
  intensity window (HU), patch size (voxels), network name and arguments;
- paths (weights, atlas manifest, atlas files) stay inside the package folder, links resolved;
- the network never reaches the network: `pretrained` (given, or a constructor default) and any
  URL-valued argument are refused;
- the network's parameter count and the activations of one training batch of patches (measured on
  torch's `meta` device, which allocates nothing) must fit in the memory this machine has.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import torch

from .errors import BadModelError
from .networks.base import KIND_MONAI
from .validation import available_memory_bytes, format_bytes

MIN_PATCH_VOXELS, MAX_PATCH_VOXELS = 8, 1024  # per axis
ORIENTATION_AXES = ("LR", "PA", "IS")
# Adam fine-tuning keeps weights, gradients and two moment estimates, besides the untouched original.
BYTES_PER_PARAMETER = 5 * 4
# Training keeps every activation for the backward pass and a gradient of the same size.
ACTIVATION_COPIES = 2
DOWNLOAD_ARGUMENT = re.compile(r"pretrain|url|download", re.IGNORECASE)
URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^www\.", re.IGNORECASE)


def check_config(config: dict, config_path: Path) -> None:
    """Every model.json entry a run reads, with the types and ranges it needs. Packages of other network
    kinds (nnU-Net, MONAI bundle) record input and patch size for display only: their own plans or
    transforms rule, and their kind checks them when it is built."""
    _check_labels(config["labels"], config_path)
    network = config["network"]
    if isinstance(network, dict) and network.get("kind", KIND_MONAI) != KIND_MONAI:
        return
    entry = config["input"]
    spacing = entry.get("spacing") if isinstance(entry, dict) else None
    if not (_numbers(spacing, 3) and all(0 < s for s in spacing)):
        raise BadModelError(f"{config_path}: input.spacing must be three positive numbers (mm, x y z), got {spacing!r}.")
    orientation = entry.get("orientation", "LPS")
    if not (isinstance(orientation, str) and len(orientation) == 3
            and sorted(_axis_of(letter) for letter in orientation.upper()) == [0, 1, 2]):
        raise BadModelError(f"{config_path}: input.orientation must be a 3-letter code such as 'LPS' or 'RAS', "
                            f"got {orientation!r}.")
    window = entry.get("intensity")
    if not (isinstance(window, dict) and _numbers([window.get("a_min"), window.get("a_max")], 2)
            and window["a_min"] < window["a_max"]):
        raise BadModelError(f"{config_path}: input.intensity must give the HU window as a_min < a_max, got {window!r}. "
                            "Add it as the network was trained, e.g. {\"a_min\": -200, \"a_max\": 300}.")
    patch = config["patch_size"]
    if not (isinstance(patch, list) and len(patch) == 3 and all(type(p) is int for p in patch)
            and all(MIN_PATCH_VOXELS <= p <= MAX_PATCH_VOXELS for p in patch)):
        raise BadModelError(f"{config_path}: patch_size must be three whole numbers of voxels from {MIN_PATCH_VOXELS} "
                            f"to {MAX_PATCH_VOXELS} (x y z), got {patch!r}.")
    if not (isinstance(network, dict) and isinstance(network.get("name"), str)
            and isinstance(network.get("args", {}), dict)):
        raise BadModelError(f"{config_path}: network must be {{\"name\": a MONAI network, \"args\": {{...}}}}.")


def _axis_of(letter: str) -> int:
    return next((axis for axis, letters in enumerate(ORIENTATION_AXES) if letter in letters), -1)


def _numbers(values, count: int) -> bool:
    return (isinstance(values, list) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def _check_labels(labels, config_path: Path) -> None:
    if not isinstance(labels, list) or not all(isinstance(label, dict) for label in labels):
        raise BadModelError(f"{config_path}: labels must be a list of objects.")
    values = [label.get("value") for label in labels]
    if not labels or not all(type(v) is int for v in values) or sorted(values) != list(range(1, len(labels) + 1)):
        raise BadModelError(f"{config_path}: label values must be 1..N without gaps (got {values}). Fix the labels list.")
    for label in labels:
        if not (isinstance(label.get("name"), str) and label["name"].strip()):
            raise BadModelError(f"{config_path}: label {label['value']} has no name. Give every label a name.")
        color = label.get("color", [0.5, 0.5, 0.5])
        if not (_numbers(color, 3) and all(0 <= c <= 1 for c in color)):
            raise BadModelError(f"{config_path}: label '{label['name']}' has the color {color!r}; "
                                "give three numbers from 0 to 1 (r, g, b).")


def confined_path(root: Path, relative, what: str, config_path: Path, base: Path | None = None) -> Path:
    """`base / relative` (base: `root` unless given) when that stays inside the package folder `root`
    (links resolved), else BadModelError."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or Path(relative).drive:
        raise BadModelError(f"{config_path}: the {what} path {relative!r} must be a path relative to the package folder.")
    path = (base or root) / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise BadModelError(f"{config_path}: the {what} path {relative!r} leads outside the package folder "
                            f"'{root}'. A package may only use its own files.")
    return path


def check_offline(name: str, network_class: type, args: dict) -> None:
    """Refuse arguments that would make the network download weights: a true `pretrained` (or any
    download-like argument, whether given or a constructor default) and any URL-valued argument."""
    for key, value in _flatten(args):
        if isinstance(value, str) and URL.match(value.strip()):
            raise BadModelError(f"model.json: the network argument '{key}' is the address {value!r}. The worker never "
                                "downloads anything: package the weights as safetensors instead.")
    try:
        defaults = {key: parameter.default for key, parameter in inspect.signature(network_class).parameters.items()
                    if parameter.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        defaults = {}
    for key, value in {**defaults, **args}.items():
        if DOWNLOAD_ARGUMENT.search(key) and value not in (False, None, "", 0):
            given = "gives" if key in args else "leaves at its default"
            raise BadModelError(f"model.json {given} the network argument {key}={value!r}, which makes MONAI's {name} "
                                f"download weights. Set \"{key}\": false; the package's own weights are loaded instead.")


def _flatten(value, key: str = "args"):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{key}.{k}" if key != "args" else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{key}[{i}]")
    else:
        yield key, value


def check_footprint(build, patch_zyx, batch_size: int, in_channels: int, config_path: Path) -> None:
    """Build the network with `build()` on the meta device, count its parameters and the activations of
    one training batch of patches (1 x in_channels x patch) and refuse what does not fit in memory."""
    activations = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            activations[0] += output.numel()

    with torch.device("meta"):
        network = build()
        parameters = sum(p.numel() for p in network.parameters())
        hooks = [m.register_forward_hook(count) for m in network.modules() if not list(m.children())]
        try:
            network(torch.empty(batch_size, in_channels, *patch_zyx))
        except (RuntimeError, ValueError, IndexError) as error:
            raise BadModelError(f"{config_path}: the network does not accept patches of {list(patch_zyx[::-1])} voxels "
                                f"(x y z): {error}. Fix patch_size (e.g. a multiple of the network's total stride).") from None
        finally:
            for hook in hooks:
                hook.remove()
    needed = parameters * BYTES_PER_PARAMETER + activations[0] * 4 * ACTIVATION_COPIES
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise BadModelError(
            f"{config_path}: fine-tuning this network ({parameters:,} parameters) on patches of "
            f"{list(patch_zyx[::-1])} voxels needs at least {format_bytes(needed)} of memory; this machine has "
            f"{format_bytes(available)} available. Use a package with a smaller network or patch_size.")
