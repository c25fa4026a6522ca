"""The "monai" network kind: a MONAI network trained by `isseg train`, on isseg's own model grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from ..inference import predict_logits
from ..postprocess import resample_probabilities
from ..preprocess import image_tensor, normalize, to_model_grid, zyx
from . import NetworkKind, PreparedCase


class MonaiNetwork(NetworkKind):
    """model.json: network {"name": MONAI class, "args": {...}}, input {spacing (x, y, z mm), orientation,
    intensity {a_min, a_max} HU}, patch_size (x, y, z)."""

    @property
    def window(self) -> tuple[float, float]:
        intensity = self.config["input"]["intensity"]
        return float(intensity["a_min"]), float(intensity["a_max"])

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        return zyx(self.config["patch_size"])

    def build(self) -> torch.nn.Module:
        from ..model_package import build_network

        return build_network(self.network_config)

    def prepare(self, image: sitk.Image) -> PreparedCase:
        model_image = to_model_grid(image, self.config["input"]["spacing"],
                                    self.config["input"].get("orientation", "LPS"))
        return PreparedCase(model_image, image_tensor(model_image, self.window))

    def normalize(self, hu: np.ndarray) -> np.ndarray:
        return np.asarray(normalize(hu, self.window), dtype=np.float32)

    def predict_logits(self, network, tensor, device) -> torch.Tensor:
        return predict_logits(network, tensor, self.patch_zyx, device)

    def probabilities_on_input(self, probabilities, prepared, input_image) -> np.ndarray:
        return resample_probabilities(probabilities, prepared.model_image, input_image)
