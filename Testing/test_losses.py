"""The adaptive region-specific Tversky loss (isseg.losses) against a hand computation in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isseg.losses import AdaptiveRegionTverskyLoss, segmentation_loss

SMOOTH = 1e-5


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def hand_computed_loss(logits: np.ndarray, target: np.ndarray, regions: int, include_background: bool) -> float:
    """Loop over batch, class and sub-region: TP/FP/FN, adaptive alpha/beta, Tversky term; then the mean."""
    probabilities = softmax(logits.astype(np.float64))
    batch, classes = probabilities.shape[:2]
    size = probabilities.shape[2:]
    step = [s // regions for s in size]
    terms = []
    for b in range(batch):
        for c in range(0 if include_background else 1, classes):
            p = probabilities[b, c]
            g = (target[b, 0] == c).astype(np.float64)
            for rz in range(regions):
                for ry in range(regions):
                    for rx in range(regions):
                        window = (slice(rz * step[0], (rz + 1) * step[0]), slice(ry * step[1], (ry + 1) * step[1]),
                                  slice(rx * step[2], (rx + 1) * step[2]))
                        tp = np.sum(p[window] * g[window])
                        fp = np.sum(p[window] * (1 - g[window]))
                        fn = np.sum((1 - p[window]) * g[window])
                        alpha = 0.3 + 0.4 * (fp + SMOOTH) / (fp + fn + SMOOTH)
                        beta = 0.3 + 0.4 * (fn + SMOOTH) / (fp + fn + SMOOTH)
                        terms.append(1 - (tp + SMOOTH) / (tp + alpha * fp + beta * fn + SMOOTH))
    expected_terms = batch * (classes - (0 if include_background else 1)) * regions ** 3
    assert len(terms) == expected_terms
    return float(np.mean(terms))


def example(seed: int = 0, shape=(2, 3, 8, 8, 8)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=shape).astype(np.float32)
    # Blocky targets so that some regions are pure background, some mixed, some pure foreground.
    target = np.zeros((shape[0], 1, *shape[2:]), dtype=np.int64)
    target[:, :, 1:6, 2:8, 0:5] = 1
    target[:, :, 4:8, 0:3, 3:8] = 2
    target[-1, 0, rng.random(shape[2:]) < 0.2] = 2
    return logits, target


@pytest.mark.parametrize("include_background", [True, False])
def test_region_tversky_matches_hand_computation(include_background):
    logits, target = example()
    loss = AdaptiveRegionTverskyLoss(regions=2, include_background=include_background)(
        torch.from_numpy(logits), torch.from_numpy(target))
    expected = hand_computed_loss(logits, target, regions=2, include_background=include_background)
    assert loss.item() == pytest.approx(expected, rel=1e-5), f"loss {loss.item()} != hand-computed {expected}"


def test_excluding_background_changes_the_loss():
    logits, target = example(seed=1)
    with_background = AdaptiveRegionTverskyLoss(regions=2, include_background=True)(
        torch.from_numpy(logits), torch.from_numpy(target))
    without = AdaptiveRegionTverskyLoss(regions=2, include_background=False)(
        torch.from_numpy(logits), torch.from_numpy(target))
    assert abs(with_background.item() - without.item()) > 1e-4


def test_gradient_flows_with_alpha_beta_as_constant_weights():
    logits_np, target_np = example(seed=2)
    logits = torch.from_numpy(logits_np.astype(np.float64)).requires_grad_(True)
    target = torch.from_numpy(target_np)
    AdaptiveRegionTverskyLoss(regions=2)(logits, target).backward()
    gradient = logits.grad
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0, "no gradient reaches the logits"

    # The same loss written out by hand with alpha and beta fixed numbers (not differentiated).
    reference_logits = torch.from_numpy(logits_np.astype(np.float64)).requires_grad_(True)
    probabilities = torch.softmax(reference_logits, dim=1)
    one_hot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).double()
    terms = []
    for rz in range(2):
        for ry in range(2):
            for rx in range(2):
                window = (slice(None), slice(None), slice(4 * rz, 4 * rz + 4), slice(4 * ry, 4 * ry + 4),
                          slice(4 * rx, 4 * rx + 4))
                p, g = probabilities[window], one_hot[window]
                tp = (p * g).sum((2, 3, 4))
                fp = (p * (1 - g)).sum((2, 3, 4))
                fn = ((1 - p) * g).sum((2, 3, 4))
                alpha = (0.3 + 0.4 * (fp + SMOOTH) / (fp + fn + SMOOTH)).detach()
                beta = (0.3 + 0.4 * (fn + SMOOTH) / (fp + fn + SMOOTH)).detach()
                terms.append(1 - (tp + SMOOTH) / (tp + alpha * fp + beta * fn + SMOOTH))
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(gradient, reference_logits.grad, rtol=1e-4, atol=1e-9)


def test_perfect_prediction_costs_nothing_and_wrong_prediction_costs_most():
    _, target = example(seed=3)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(target[:, 0]), 3).movedim(-1, 1).float()
    loss = AdaptiveRegionTverskyLoss(regions=2)
    assert loss(one_hot * 40.0, torch.from_numpy(target)).item() < 1e-4
    wrong = torch.roll(one_hot, shifts=1, dims=1) * 40.0
    assert loss(wrong, torch.from_numpy(target)).item() > 0.9


def test_sizes_not_divisible_by_the_regions_work():
    logits, target = example(shape=(1, 3, 9, 7, 10))
    loss = AdaptiveRegionTverskyLoss(regions=4)(torch.from_numpy(logits), torch.from_numpy(target))
    assert torch.isfinite(loss) and 0 <= loss.item() <= 1


def test_segmentation_loss_by_name():
    logits, target = example()
    logits, target = torch.from_numpy(logits), torch.from_numpy(target)
    region = segmentation_loss("region_tversky")(logits, target)
    cross_entropy = torch.nn.functional.cross_entropy(logits, target[:, 0])
    expected = AdaptiveRegionTverskyLoss()(logits, target) + cross_entropy
    torch.testing.assert_close(region, expected)
    assert torch.isfinite(segmentation_loss("dicece")(logits, target))
    with pytest.raises(ValueError, match="Unknown loss 'focal'"):
        segmentation_loss("focal")
