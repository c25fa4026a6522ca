"""Whole-volume prediction with MONAI sliding-window inference."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference


@torch.no_grad()
def predict_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    patch_zyx: tuple[int, int, int],
    device: torch.device,
    *,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Logits of a normalized image: image (1, 1, z, y, x) float32, any device -> (1, C, z, y, x)
    float32 on the CPU. Patches of `patch_zyx` voxels are blended with Gaussian weights; the network is
    left in eval mode."""
    network.eval()
    use_autocast = device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_autocast):
        logits = sliding_window_inference(
            image.to(device), roi_size=patch_zyx, sw_batch_size=sw_batch_size, predictor=network,
            overlap=overlap, mode="gaussian", device=device,
        )
    return logits.float().cpu()


def predict_probabilities(network: torch.nn.Module, image: torch.Tensor, patch_zyx: tuple[int, int, int],
                          device: torch.device, **options) -> torch.Tensor:
    """Softmax class probabilities (1, C, z, y, x) float32 on the CPU, C = background + labels, of
    `predict_logits`; the network's training/eval mode is left as it was."""
    was_training = network.training
    probabilities = torch.softmax(predict_logits(network, image, patch_zyx, device, **options), dim=1)
    network.train(was_training)
    return probabilities
