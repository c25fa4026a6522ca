"""Segmentation losses for training and fine-tuning.

`segmentation_loss(name)` gives the loss named in the settings: `dicece` (MONAI DiceCELoss) or
`region_tversky` (the adaptive region-specific Tversky loss below, plus cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from .protocol import LOSS_NAMES


class AdaptiveRegionTverskyLoss(torch.nn.Module):
    """Adaptive region-specific Tversky loss (Chen et al., IEEE TPAMI 2023).

    The patch is split into `regions` sub-regions per axis (8 x 8 x 8 by default). In each
    sub-region r and class c, with soft counts TP, FP, FN and s = `smooth`:
        alpha = 0.3 + 0.4 (FP + s) / (FP + FN + s),  beta = 0.3 + 0.4 (FN + s) / (FP + FN + s)
        loss_rc = 1 - (TP + s) / (TP + alpha FP + beta FN + s)
    and the loss is the mean over regions, classes and batch. alpha and beta weigh the errors
    that dominate each region more; they are treated as constants in the gradient, as weights.

    Input: logits (B, C, z, y, x); target: class indices (B, 1, z, y, x). Sizes need not be
    divisible by `regions`: adaptive pooling then makes regions of nearly equal size.
    """

    def __init__(self, regions: int = 8, smooth: float = 1e-5, include_background: bool = True):
        super().__init__()
        self.regions = regions
        self.smooth = smooth
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits.float(), dim=1)
        one_hot = F.one_hot(target[:, 0].long(), probabilities.shape[1]).movedim(-1, 1).float()
        if not self.include_background:
            probabilities, one_hot = probabilities[:, 1:], one_hot[:, 1:]
        grid = [min(self.regions, s) for s in probabilities.shape[2:]]
        voxels_per_region = float(torch.tensor(probabilities.shape[2:]).prod()) / float(torch.tensor(grid).prod())

        def region_sum(x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool3d(x, grid) * voxels_per_region

        tp = region_sum(probabilities * one_hot)
        fp = region_sum(probabilities * (1 - one_hot))
        fn = region_sum((1 - probabilities) * one_hot)
        s = self.smooth
        with torch.no_grad():
            alpha = 0.3 + 0.4 * (fp + s) / (fp + fn + s)
            beta = 0.3 + 0.4 * (fn + s) / (fp + fn + s)
        return (1 - (tp + s) / (tp + alpha * fp + beta * fn + s)).mean()


class _RegionTverskyCE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.region = AdaptiveRegionTverskyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.region(logits, target) + F.cross_entropy(logits.float(), target[:, 0].long())


def segmentation_loss(name: str) -> torch.nn.Module:
    """Loss on (logits (B, C, z, y, x), class indices (B, 1, z, y, x)) by settings name."""
    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "region_tversky":
        return _RegionTverskyCE()
    raise ValueError(f"Unknown loss '{name}'; choose one of {', '.join(LOSS_NAMES)}.")
