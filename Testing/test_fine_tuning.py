"""Fine-tuning's building blocks: patch sampling from class indices computed once (deterministic for a
seed, centres inside the requested classes), MONAI intensity augmentation (labels untouched, the
documented ranges), predictions limited to the body's box, the moving average's mask change and early
stopping of `refine` when the average has converged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from monai.networks.nets import UNet

from isseg import body
from isseg.device import network_to
from isseg.alignment import AlignmentSettings
from isseg.optimisation import PatchSampler, PatchSettings
from isseg.refinement import MovingAverage, RefineObserver, RefineSettings, label_change, refine

PATCH = (8, 8, 8)


def labelled_volumes(cases: int = 3, shape=(20, 24, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, ...) in [0, 1] and labels (N, 1, ...) uint8 with a large organ 1, a small organ 3
    (no 2) and background."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((cases, 1, *shape), generator=generator)
    labels = torch.zeros((cases, 1, *shape), dtype=torch.uint8)
    labels[:, :, 2:14, 3:20, 4:22] = 1
    labels[:, :, 15:18, 18:21, 20:23] = 3
    return images, labels


def sampler(seed: int, settings: PatchSettings = PatchSettings(), volumes=None) -> PatchSampler:
    images, labels = volumes or labelled_volumes()
    return PatchSampler(images, labels, PATCH, settings, np.random.default_rng(seed), torch.device("cpu"))


def test_the_same_seed_gives_the_same_patches_and_another_seed_others():
    first, again, other = sampler(5), sampler(5), sampler(6)
    for _ in range(3):
        (images_a, labels_a), (images_b, labels_b), (images_c, _) = first.sample(), again.sample(), other.sample()
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
        assert not torch.equal(images_a, images_c)
    assert images_a.shape == (2, 1, *PATCH) and labels_a.dtype == torch.int64


def test_patches_are_plain_tensors_not_monai_meta_tensors():
    # MONAI's intensity transforms return MetaTensors; fed to the network, every layer's operation goes
    # through MetaTensor.__torch_function__ and fine-tuning ran about 20 % slower (BENCHMARKS.md, issue 13).
    images, labels = sampler(5).sample()
    assert type(images) is torch.Tensor and type(labels) is torch.Tensor


def test_foreground_centres_lie_in_the_classes_and_small_organs_are_seen_as_often():
    patches = sampler(0, PatchSettings(foreground_fraction=1.0))
    labels = patches.labels
    seen = {1: 0, 3: 0}
    for _ in range(400):
        case = int(patches.rng.integers(len(labels)))
        value = int(labels[(case, 0, *patches.centre(case))])
        assert value in seen, f"centre on label {value}, not a labelled class"
        seen[value] += 1
    assert 150 < seen[3] < 250, f"classes drawn first, then a voxel: {seen}"


def test_background_centres_cover_the_whole_volume():
    patches = sampler(0, PatchSettings(foreground_fraction=0.0))
    centres = np.array([patches.centre(0) for _ in range(300)])
    assert (centres.min(0) <= 2).all() and (centres.max(0) >= np.array(patches.shape) - 3).all()


def test_intensity_steps_leave_labels_alone_and_stay_within_their_ranges():
    settings = PatchSettings(intensity_scale=0.1, intensity_shift=0.05, noise_std=0.0)
    patches = sampler(3, settings, labelled_volumes(cases=1))
    for _ in range(20):
        state = patches.rng.bit_generator.state
        images, labels = patches.sample(1)
        patches.rng.bit_generator.state = state  # the same centres again, without augmentation
        centre = patches.centre(0)
        starts = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, PATCH, patches.shape)]
        window = (0, slice(None)) + tuple(slice(a, a + p) for a, p in zip(starts, PATCH))
        patches.rng.integers(1)  # keep the stream as sample() left it
        raw, raw_labels = patches.images[window], patches.labels[window]
        assert torch.equal(labels[0], raw_labels.long()), "intensity augmentation must not touch the labels"
        scale, shift = np.polyfit(raw.flatten().numpy(), images[0].flatten().numpy(), 1)
        assert 0.9 - 1e-4 <= scale <= 1.1 + 1e-4 and -0.05 - 1e-4 <= shift <= 0.05 + 1e-4, (scale, shift)


def test_noise_has_the_set_standard_deviation():
    settings = PatchSettings(intensity_scale=0.0, intensity_shift=0.0, noise_std=0.02)
    images, labels = labelled_volumes(cases=1)
    patches = sampler(4, settings, (torch.zeros_like(images), labels))
    noisy, _ = patches.sample(4)
    assert abs(float(noisy.std()) - 0.02) < 0.002 and abs(float(noisy.mean())) < 0.002


def test_volumes_smaller_than_the_patch_are_padded_with_background():
    images, labels = labelled_volumes(cases=1, shape=(6, 24, 28))
    patches = sampler(0, PatchSettings(noise_std=0.0), (images, labels))
    assert patches.shape == (8, 24, 28) and int(patches.labels[0, 0, 0].max()) == 0
    image_patches, label_patches = patches.sample()
    assert image_patches.shape == (2, 1, *PATCH) and label_patches.shape == (2, 1, *PATCH)


def test_body_box_holds_the_body_with_its_margin_and_at_least_a_patch():
    image = torch.zeros(1, 1, 40, 50, 60)
    image[0, 0, 10:30, 20:24, 5:45] = 0.5
    box = body.body_box(image, patch_zyx=(16, 16, 16), margin=2)
    assert box[0] == slice(8, 32) and box[2] == slice(3, 47)
    assert box[1].stop - box[1].start == 16 and box[1].start <= 18 and box[1].stop >= 26
    assert body.body_box(torch.zeros(1, 1, 10, 10, 10), (4, 4, 4)) == (slice(0, 10),) * 3
    at_edge = torch.zeros(1, 1, 20, 20, 20)
    at_edge[0, 0, 0:3, 18:20, :] = 1
    assert body.body_box(at_edge, (8, 8, 8), margin=1)[:2] == (slice(0, 8), slice(12, 20))


def test_predictions_in_the_box_are_background_outside():
    image = torch.zeros(1, 1, 12, 12, 12)
    box = (slice(2, 10), slice(0, 12), slice(4, 8))
    seen = []

    def predict(crop):
        seen.append(crop.shape)
        return torch.full((1, 3, *crop.shape[2:]), 1 / 3)

    probabilities = body.predict_in_box(predict, image, box)
    assert seen == [(1, 1, 8, 12, 4)] and probabilities.shape == (1, 3, 12, 12, 12)
    assert torch.all(probabilities[:, :, 2:10, :, 4:8] == 1 / 3)
    assert torch.all(probabilities[0, 0, :2] == 1) and torch.all(probabilities[0, 1:, :2] == 0)


def one_hot(labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 0)[None].float()


def mask(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities[0].argmax(0)


def test_mask_change_counts_relabelled_voxels_of_the_mask():
    before = torch.zeros(4, 5, 5, dtype=torch.long)
    before[0] = 1  # 25 labelled voxels
    after = before.clone()
    after[0, 0, :5] = 2  # 5 relabelled
    after[1, 0, 0] = 1  # 1 added: 26 in the union, 6 changed
    assert label_change(mask(one_hot(before)), mask(one_hot(after))) == pytest.approx(6 / 26)
    assert label_change(mask(one_hot(before)), mask(one_hot(before))) == 0.0
    assert label_change(mask(one_hot(torch.zeros_like(before))), mask(one_hot(torch.zeros_like(before)))) == 0.0


def test_moving_average_converges_when_an_update_changes_little():
    labels = torch.zeros(4, 5, 5, dtype=torch.long)
    labels[:2] = 1
    average = MovingAverage(one_hot(torch.zeros_like(labels)), momentum=0.4)
    average.update(one_hot(labels))
    assert average.changes == [1.0] and not average.converged(0.01)
    average.update(one_hot(labels))
    assert average.changes[-1] == 0.0 and average.converged(0.01) and not average.converged(0.0)


class Recorder(RefineObserver):
    def __init__(self):
        self.updates, self.stopped = [], None

    def updated(self, step, probabilities, updates, change):
        self.updates.append((step, change))

    def converged(self, step):
        self.stopped = step


def refine_tiny(stop_when_converged: float, network: torch.nn.Module | None = None) -> tuple[Recorder, object]:
    """refine() with `network` (default a 1x1x1 convolution) on 16^3 volumes and a constant prediction (so the average
    stops changing after the first update): 2 rounds of 6 steps, an update every 3 steps."""
    shape = (16, 16, 16)
    images, labels = labelled_volumes(cases=2, shape=shape)
    labels[labels == 3] = 2
    target = torch.zeros(1, 1, *shape)
    constant = one_hot(labels[0, 0].long())
    settings = RefineSettings(steps=12, rounds=2, update_every=3, stop_when_converged=stop_when_converged,
                              match_intensity=False, alignment=AlignmentSettings(iterations=1, warm_iterations=1))
    recorder = Recorder()
    result = refine(network or torch.nn.Conv3d(1, 3, 1), target, constant, [i[0].numpy() for i in images],
                    [label[0].numpy().astype(np.int64) for label in labels], PATCH, settings, torch.device("cpu"),
                    lambda network: constant, np.random.default_rng(0), recorder)
    return recorder, result


def test_refine_stops_at_the_first_converged_update_and_says_so():
    recorder, result = refine_tiny(stop_when_converged=0.01)
    assert recorder.updates == [(3, 0.0)] and recorder.stopped == 3 and result.converged_at == 3
    recorder, result = refine_tiny(stop_when_converged=0.0)
    assert [step for step, _ in recorder.updates] == [3, 6, 9, 12]
    assert recorder.stopped is None and result.converged_at is None


def test_refine_releases_each_prediction_before_the_next():
    # At clinical sizes a prediction is a GiB (21 classes x 256 x 256 x 192): the previous one must be gone
    # when the next is made, or the refine stage holds two.
    import gc
    import weakref

    shape = (16, 16, 16)
    images, labels = labelled_volumes(cases=2, shape=shape)
    target = torch.zeros(1, 1, *shape)
    initial = one_hot(labels[0, 0].long())
    previous, alive_at_next_call = [], []

    def predict(network):
        gc.collect()
        alive_at_next_call.extend(ref() is not None for ref in previous)
        prediction = initial.clone()
        previous[:] = [weakref.ref(prediction)]
        return prediction

    settings = RefineSettings(steps=6, rounds=1, update_every=2, stop_when_converged=0.0, match_intensity=False,
                              alignment=AlignmentSettings(iterations=1, warm_iterations=1))
    refine(torch.nn.Conv3d(1, initial.shape[1], 1), target, initial, [i[0].numpy() for i in images],
           [label[0].numpy().astype(np.int64) for label in labels], PATCH, settings, torch.device("cpu"),
           predict, np.random.default_rng(0))
    assert alive_at_next_call == [False, False]


def test_the_cpu_fine_tunes_in_channels_last_order_with_the_same_outputs():
    # oneDNN's 3D convolutions are about 20 % faster in channels-last order on the CPU (BENCHMARKS.md section 8).
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), norm="INSTANCE")
    _, result = refine_tiny(stop_when_converged=0.0, network=network)
    weights = [m.weight for m in result.network.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
                           for w in weights)
    patch = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = network(patch)
        moved = network_to(copy.deepcopy(network), torch.device("cpu"))
        torch.testing.assert_close(moved(patch), expected, atol=1e-5, rtol=1e-4)
