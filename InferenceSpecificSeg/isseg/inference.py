"""Whole-volume prediction with MONAI sliding-window inference."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference


@torch.no_grad()
def predict_probabilities(
    network: torch.nn.Module,
    image: torch.Tensor,
    patch_zyx: tuple[int, int, int],
    device: torch.device,
    *,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Softmax class probabilities of a normalized image.

    image: (1, 1, z, y, x) float32, any device. Returns (1, C, z, y, x) float32 on the CPU;
    C = background + labels. Patches of `patch_zyx` voxels are blended with Gaussian weights.
    """
    was_training = network.training
    network.eval()
    use_autocast = device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_autocast):
        logits = sliding_window_inference(
            image.to(device), roi_size=patch_zyx, sw_batch_size=sw_batch_size, predictor=network,
            overlap=overlap, mode="gaussian", device=device,
        )
    network.train(was_training)
    return torch.softmax(logits.float(), dim=1).cpu()
