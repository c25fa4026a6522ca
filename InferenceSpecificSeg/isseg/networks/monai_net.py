"""The "monai" network kind: a MONAI network trained by `isseg train`, on isseg's own model grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.networks import nets

from ..package_checks import check_offline
from ..errors import BadModelError
from ..inference import predict_logits
from ..postprocess import resample_probabilities
from ..preprocess import image_tensor, normalize, to_model_grid, zyx
from .base import NetworkKind, PreparedCase


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
        return build_monai_network(self.network_config)

    def prepare(self, image: sitk.Image) -> PreparedCase:
        model_image = to_model_grid(image, self.config["input"]["spacing"],
                                    self.config["input"].get("orientation", "LPS"))
        return PreparedCase(model_image, image_tensor(model_image, self.window))

    def normalize(self, hu: np.ndarray) -> np.ndarray:
        return np.asarray(normalize(hu, self.window), dtype=np.float32)

    def atlas_image(self, image: sitk.Image, prepared: PreparedCase) -> sitk.Image:
        # This kind's model image is the CT in HU as the network sees it (smoothed where finer than the grid).
        return prepared.model_image

    def predict_logits(self, network, tensor, device) -> torch.Tensor:
        return predict_logits(network, tensor, self.patch_zyx, device)

    def probabilities_on_input(self, probabilities, prepared, input_image) -> np.ndarray:
        return resample_probabilities(probabilities, prepared.model_image, input_image)


def build_monai_network(network_config: dict) -> torch.nn.Module:
    """Instantiate `monai.networks.nets.<name>(**args)` from {"name": ..., "args": {...}}."""
    name = network_config.get("name", "")
    network_class = getattr(nets, name, None)
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise BadModelError(
            f"model.json names the network '{name}', which is not a MONAI network (monai.networks.nets). "
            "Use e.g. 'UNet' or 'DynUNet'."
        )
    check_offline(name, network_class, network_config.get("args", {}))
    try:
        return network_class(**network_config.get("args", {}))
    except (TypeError, ValueError, AssertionError) as error:
        raise BadModelError(f"model.json gives arguments that MONAI's {name} does not accept: {error}.") from None
