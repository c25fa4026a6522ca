"""Short scans in training (isseg.short_scans) and `isseg train --short-scans`: a cut patch is exactly what
MONAI's sliding window feeds the network for a CT thinner than the patch, one seed gives one cut, and the
labels are cut with the image."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from engine_support import train_tiny_model
from isseg import model_package
from isseg.protocol import EXIT_DONE
from isseg.short_scans import MIN_SLICES, ShortScanCutter

PATCH = (24, 16, 16)


def _patches(count: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches whose every voxel is above 0 (so the padding is the only 0) and labels that vary along z."""
    generator = torch.Generator().manual_seed(0)
    images = 0.1 + torch.rand((count, 1, *PATCH), generator=generator)
    labels = (torch.arange(PATCH[0]) % 3 + 1).view(1, 1, -1, 1, 1).expand(count, 1, *PATCH).clone()
    return images, labels


def _slab_rows(image: torch.Tensor) -> torch.Tensor:
    """The z indices of a (1, z, y, x) patch that hold image content (not padding)."""
    return torch.nonzero((image[0] != 0).any(dim=(1, 2)))[:, 0]


def test_one_seed_gives_one_cut_and_another_seed_another():
    images, labels = _patches()
    cutter = ShortScanCutter(1.0, PATCH)
    first, again, other = (cutter(images, labels, np.random.default_rng(seed)) for seed in (3, 3, 4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == images.shape and first[0].dtype == images.dtype and first[1].dtype == labels.dtype


def test_a_cut_patch_is_a_contiguous_slab_of_the_patch_with_its_labels_and_nothing_outside():
    images, labels = _patches()
    cut_images, cut_labels = ShortScanCutter(1.0, PATCH)(images, labels, np.random.default_rng(0))
    depths = []
    for image, label, cut_image, cut_label in zip(images, labels, cut_images, cut_labels):
        rows = _slab_rows(cut_image)
        depth, first = len(rows), int(rows[0])
        assert torch.equal(rows, torch.arange(first, first + depth))  # one slab
        assert MIN_SLICES <= depth <= PATCH[0]
        outside = torch.ones(PATCH[0], dtype=torch.bool)
        outside[rows] = False
        assert (cut_label[:, outside] == 0).all()  # no label where the image is padding
        slab = cut_image[:, rows]
        source = [z for z in range(PATCH[0] - depth + 1) if torch.equal(image[:, z:z + depth], slab)]
        assert len(source) == 1 and torch.equal(cut_label[:, rows], label[:, source[0]:source[0] + depth])
        depths.append(depth)
    assert len(set(depths)) > 1  # the depth is drawn per patch


def test_the_cut_is_the_sliding_window_padding_of_a_ct_that_thin():
    images, labels = _patches(3)
    cut_images, _ = ShortScanCutter(1.0, PATCH)(images, labels, np.random.default_rng(1))
    for cut_image in cut_images:
        short_ct = cut_image[None, :, _slab_rows(cut_image)]  # (1, 1, depth, y, x): the thin CT
        seen = []
        sliding_window_inference(short_ct, roi_size=PATCH, sw_batch_size=1,
                                 predictor=lambda patch: seen.append(patch.clone()) or patch)
        assert len(seen) == 1 and torch.equal(seen[0][0], cut_image)


def test_a_probability_of_zero_leaves_every_patch_and_a_half_cuts_some():
    images, labels = _patches(40)
    kept_images, kept_labels = ShortScanCutter(0.0, PATCH)(images, labels, np.random.default_rng(0))
    assert torch.equal(kept_images, images) and torch.equal(kept_labels, labels)
    cut_images, _ = ShortScanCutter(0.5, PATCH)(images, labels, np.random.default_rng(0))
    cut = sum(not torch.equal(a, b) for a, b in zip(cut_images, images))
    assert 10 <= cut <= 30


def test_isseg_train_with_short_scans_cuts_patches_and_records_it(tmp_path, monkeypatch):
    calls = []
    cut = ShortScanCutter.__call__

    def counted(self, images, labels, rng):
        calls.append(self.probability)
        return cut(self, images, labels, rng)

    monkeypatch.setattr(ShortScanCutter, "__call__", counted)
    assert train_tiny_model(tmp_path, "--short-scans", "0.5") == EXIT_DONE
    assert calls == [0.5, 0.5]  # every step's batch goes through the cutter
    config = model_package.load(tmp_path / "package").config
    assert config["training"]["settings"]["short_scan_probability"] == 0.5
