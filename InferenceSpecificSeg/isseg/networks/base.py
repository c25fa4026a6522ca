"""What every network kind shares: the NetworkKind interface, the prepared case, the kind names, the
optional extras and the probabilities of a case (see isseg.networks)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import BadModelError
from ..io import resample_to
from ..preprocess import AIR_HU

KIND_MONAI = "monai"
KIND_NNUNET = "nnunet_v2"
KIND_BUNDLE = "monai_bundle"
KINDS = (KIND_MONAI, KIND_NNUNET, KIND_BUNDLE)


@dataclass
class PreparedCase:
    """A CT on the model grid: `model_image` carries the grid (and the normalized voxels), `tensor` is the
    network input (1, 1, z, y, x) float32, `context` whatever the kind needs to map results back."""

    model_image: sitk.Image
    tensor: torch.Tensor
    context: Any = None


class NetworkKind(ABC):
    """What the pipeline asks of a network kind (see the module docstring)."""

    def __init__(self, config: dict):
        """config: the whole parsed model.json."""
        self.config = config
        self.network_config = config["network"]

    @property
    @abstractmethod
    def patch_zyx(self) -> tuple[int, int, int]:
        """Training and inference patch (z, y, x voxels of the model grid)."""

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """The network without weights (the package loads them), outputs logits (B, C_net, z, y, x)."""

    @abstractmethod
    def prepare(self, image: sitk.Image) -> PreparedCase:
        """The CT (HU, any grid) as the network's own preprocessing gives it."""

    @abstractmethod
    def normalize(self, hu: np.ndarray) -> np.ndarray:
        """Atlas intensities: a (z, y, x) HU array on the model grid, normalized like `prepare` does."""

    @abstractmethod
    def predict_logits(self, network: torch.nn.Module, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The network's own whole-volume prediction: logits (1, C_net, z, y, x) float32 on the CPU."""

    def atlas_image(self, image: sitk.Image, prepared: PreparedCase) -> sitk.Image:
        """An atlas case's CT (HU, any grid) on the model grid of `prepared` (its own `prepare`), in HU:
        linear interpolation, as nnU-Net's and MONAI's spacing transforms resample without smoothing."""
        return resample_to(image, prepared.model_image, is_label=False, default_value=AIR_HU)

    @abstractmethod
    def probabilities_on_input(self, probabilities: np.ndarray, prepared: PreparedCase,
                               input_image: sitk.Image) -> np.ndarray:
        """Class probabilities (C, z, y, x) on the model grid -> (C, z', y', x') on the input grid."""


# The optional extras of pyproject.toml and the packages each installs (Testing checks they agree).
EXTRAS = {"nnunet": ("nnunetv2", "dynamic-network-architectures"), "bundle": ("pyyaml", "nibabel")}


def require_extra(module: str, extra: str, network: str):
    """Import `module` or raise BadModelError naming the pip extra (and its packages) that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        packages = " ".join(EXTRAS[extra])
        raise BadModelError(
            f"This model holds {network}, which needs the optional extra '{extra}' ({error}). Install it with "
            f"pip install \"inference-specific-seg[{extra}]\" in the source folder, or pip install {packages} "
            f"(in Slicer's Python console: slicer.util.pip_install(\"{packages}\"))."
        ) from None


class OutputClasses(torch.nn.Module):
    """A network whose output channels are grouped into the package's classes.

    groups[k] lists the network channels of package class k (class 0, the background, also holds the
    network's structures that the atlas does not label). Logits of class k are the logsumexp of its
    channels, so their softmax is the sum of the network's own softmax probabilities over the group:
    fine-tuning and prediction see exactly the classes the atlas can teach.
    """

    def __init__(self, network: torch.nn.Module, groups: list[list[int]]):
        super().__init__()
        self.network = network
        self.groups = [list(group) for group in groups]

    def group(self, scores: torch.Tensor, combine) -> torch.Tensor:
        """(B, C_net, ...) -> (B, K, ...) with `combine(channels, dim=1)` over each group."""
        return torch.stack([combine(scores[:, group], dim=1) for group in self.groups], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(self.network(x), torch.logsumexp)


def softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes (dim 1) of `logits` (B, C, ...), written over them and returned: at
    clinical sizes (21 classes x 256 x 256 x 192 float32) a second volume is another GiB."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def predict_probabilities(kind: NetworkKind, network: torch.nn.Module, tensor: torch.Tensor,
                          device: torch.device) -> torch.Tensor:
    """Softmax probabilities (1, K, z, y, x) float32 on the CPU of the package's classes, from the kind's
    own whole-volume prediction; the network's training/eval mode is left as it was."""
    was_training = network.training
    inner = network.network if isinstance(network, OutputClasses) else network
    probabilities = softmax_in_place(kind.predict_logits(inner, tensor, device).float())
    network.train(was_training)
    if isinstance(network, OutputClasses):
        probabilities = network.group(probabilities, torch.sum)
    return probabilities
