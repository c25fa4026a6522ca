"""Refining from the user's edits: `isseg refine --initial-mask LABELMAP --edited-region LABELMAP`.

The edited mask (label values of the model, on the input grid) replaces the network's initial mask:
it is the moving average the run starts from, so the first alignment round aligns the atlas to it.
The edited region (1 where the user changed a voxel, 0 elsewhere, on the input grid) is trusted:
the fine-tuning also trains on the case itself on the slices the user reviewed (`reviewed_slices`,
`CaseTraining`), the average is pulled back to the user's labels in the region after every update
(`trust`), and every published labelmap keeps the user's voxels there unchanged (`UserEdits.keep_edits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.losses import DiceLoss
from monai.transforms import RandWeightedCrop, SpatialPad
from monai.utils import convert_to_tensor

from .errors import BadInputError
from .io import labelmap_like, resample_to
from .protocol import EDITED_VALUE, OPTION_EDITED_REGION, OPTION_INITIAL_MASK

# Geometry of a user labelmap may differ from the input's by rounding in the file header, no more.
GEOMETRY_TOLERANCE = 1e-3


def _read_labelmap(path, option: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else "unreadable"
        raise BadInputError(f"Could not read {option} '{path}' ({reason}). Give a labelmap file "
                            "(.nrrd, .nii, .nii.gz, .mha) on the grid of --input.") from None


def check_same_grid(labelmap: sitk.Image, input_image: sitk.Image, option: str, path) -> None:
    """Raise BadInputError unless `labelmap` is a 3D scalar image on the grid of `input_image`
    (size, spacing, origin and direction)."""
    if labelmap.GetNumberOfComponentsPerPixel() != 1 or labelmap.GetDimension() != 3:
        raise BadInputError(f"{option} '{path}' is not a 3D labelmap (one value per voxel). Export the "
                            "segmentation as a labelmap volume on the grid of --input.")
    problems = []
    if labelmap.GetSize() != input_image.GetSize():
        problems.append(f"size {labelmap.GetSize()} instead of {input_image.GetSize()}")
    for name, own, wanted in (("spacing", labelmap.GetSpacing(), input_image.GetSpacing()),
                              ("origin", labelmap.GetOrigin(), input_image.GetOrigin()),
                              ("direction", labelmap.GetDirection(), input_image.GetDirection())):
        if not np.allclose(own, wanted, atol=GEOMETRY_TOLERANCE, rtol=0):
            problems.append(f"{name} {tuple(round(v, 4) for v in own)} instead of {tuple(round(v, 4) for v in wanted)}")
    if problems:
        raise BadInputError(f"{option} '{path}' is not on the grid of --input ({'; '.join(problems)}). Export it "
                            "with the input CT as the reference geometry.")


def read_user_labelmap(path, input_image: sitk.Image, option: str, allowed_values) -> np.ndarray:
    """The (z, y, x) int64 voxels of a user labelmap, checked to be on the input grid and to hold only
    `allowed_values`; BadInputError (exit code 3) otherwise."""
    labelmap = _read_labelmap(path, option)
    check_same_grid(labelmap, input_image, option, path)
    values = sitk.GetArrayFromImage(labelmap)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.mod(values, 1) == 0):
            raise BadInputError(f"{option} '{path}' holds fractional values; a labelmap holds whole label values.")
    values = values.astype(np.int64)
    unknown = sorted(set(np.unique(values).tolist()) - set(allowed_values))
    if unknown:
        raise BadInputError(f"{option} '{path}' holds the values {unknown[:10]}, which are not allowed there "
                            f"(allowed: {sorted(allowed_values)}). Use the model's label values.")
    return values


@dataclass
class UserEdits:
    """The user's mask and the voxels they changed, both (z, y, x) on the input grid."""

    labels: np.ndarray  # uint8 label values of the model
    region: np.ndarray  # bool, True where the user changed the voxel (trusted)

    @classmethod
    def read(cls, initial_mask, edited_region, input_image: sitk.Image, label_values) -> "UserEdits":
        """Read --initial-mask (values 0 and `label_values`) and --edited-region (0 and EDITED_VALUE;
        None: nothing is trusted beyond the start of the run)."""
        labels = read_user_labelmap(initial_mask, input_image, OPTION_INITIAL_MASK, {0, *label_values})
        if edited_region is None:
            region = np.zeros(labels.shape, dtype=bool)
        else:
            region = read_user_labelmap(edited_region, input_image, OPTION_EDITED_REGION, {0, EDITED_VALUE}) > 0
        return cls(labels.astype(np.uint8), region)

    def probabilities(self, input_image: sitk.Image, model_image: sitk.Image, num_classes: int) -> torch.Tensor:
        """(1, C, z, y, x) float32 on the model grid: each label's indicator resampled linearly, so a
        model voxel that straddles a boundary gets the shares of the labels it covers."""
        channels = [_fraction_on_model_grid(self.labels == value, input_image, model_image, fill=float(value == 0))
                    for value in range(num_classes)]
        stacked = np.stack(channels)
        stacked /= np.clip(stacked.sum(axis=0, keepdims=True), 1e-6, None)
        return torch.as_tensor(stacked, dtype=torch.float32)[None]

    def trusted_weight(self, input_image: sitk.Image, model_image: sitk.Image) -> torch.Tensor:
        """(1, 1, z, y, x) share of each model voxel that the user edited (0 to 1)."""
        weight = _fraction_on_model_grid(self.region, input_image, model_image, fill=0.0)
        return torch.as_tensor(weight, dtype=torch.float32)[None, None]

    def keep_edits(self, labelmap: sitk.Image) -> sitk.Image:
        """`labelmap` (on the input grid) with the user's labels wherever the user edited."""
        if not self.region.any():
            return labelmap
        voxels = sitk.GetArrayFromImage(labelmap)
        voxels[self.region] = self.labels[self.region]
        return labelmap_like(voxels, labelmap)


def _fraction_on_model_grid(indicator: np.ndarray, input_image: sitk.Image, model_image: sitk.Image,
                            fill: float) -> np.ndarray:
    """(z, y, x) float32: a boolean map on the input grid resampled linearly onto the model grid;
    `fill` outside the input."""
    image = sitk.GetImageFromArray(indicator.astype(np.float32))
    image.CopyInformation(input_image)
    return sitk.GetArrayFromImage(resample_to(image, model_image, is_label=False, default_value=fill))


def trust(average: torch.Tensor, user_probabilities: torch.Tensor, weight: torch.Tensor) -> None:
    """Pull the averaged probabilities (1, C, z, y, x) back to the user's where they edited, in place:
    P = (1 - w) P + w P_user with w the edited share of each voxel."""
    average.mul_(1 - weight).add_(weight * user_probabilities)


def reviewed_slices(labels: np.ndarray, region: np.ndarray) -> dict[int, np.ndarray]:
    """Label value -> (z, y, x) bool on the input grid: the axial slices (array axis 0) on which the user
    gave that label to an edited voxel. A user who corrects an organ on a slice has reviewed that organ on
    the whole slice: its voxels there are the organ, the rest of the slice is not. labels (z, y, x) label
    values, region (z, y, x) bool (the edited voxels)."""
    reviewed = {}
    for value in np.unique(labels[region]).tolist():
        if value != 0:
            mask = np.zeros(labels.shape, dtype=bool)
            mask[(region & (labels == value)).any(axis=(1, 2))] = True
            reviewed[int(value)] = mask
    return reviewed


def reviewed_loss(logits: torch.Tensor, values: list[int], targets: torch.Tensor, reviewed: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice of each reviewed label's probability, over its reviewed voxels.

    logits (B, C, z, y, x); targets and reviewed (B, K, z, y, x) 0/1, channel k for class index values[k]:
    1 where the user's mask has that label, and 1 where that label was reviewed."""
    log_p = logits.float().log_softmax(1)[:, values]
    p = log_p.exp()
    # log(1 - p) by log1p, clamped: where the network is sure of the label, 1 - p underflows to 0.
    log_not = torch.log1p(-p.clamp(max=1 - 1e-6))
    cross_entropy = -(targets * log_p + (1 - targets) * log_not)
    cross_entropy = (cross_entropy * reviewed).sum() / reviewed.sum().clamp(min=1)
    dice = DiceLoss(batch=True)(p * reviewed, targets * reviewed)
    return cross_entropy + dice


class CaseTraining:
    """Fine-tuning steps on the case itself, on the slices the user reviewed (`reviewed_slices`).

    image (1, 1, z, y, x) normalized; targets and reviewed (K, z, y, x) 0/1 for the class indices `values`
    (see `reviewed_loss`), all on the model grid. Each step trains on `batch_size` patches centred on
    voxels of a reviewed label on its reviewed slices, with `reviewed_loss`. Whole slices, not only the
    edited voxels: those are mostly one label, and trained on alone they teach the network to call
    everything that label (BENCHMARKS.md section 9).
    """

    def __init__(self, image: torch.Tensor, values: list[int], targets: np.ndarray, reviewed: np.ndarray,
                 patch_zyx, seed: int, batch_size: int = 1):
        positives = (targets * reviewed).sum(axis=0, keepdims=True)
        stacked = torch.cat([image[0], torch.as_tensor(np.concatenate([targets, reviewed, positives]),
                                                       dtype=torch.float32)])
        self.volume = SpatialPad(spatial_size=patch_zyx, mode="constant")(stacked)
        self.values = values
        self.cropper = RandWeightedCrop(spatial_size=patch_zyx, num_samples=batch_size)
        self.cropper.set_random_state(seed)

    @classmethod
    def from_edits(cls, edits: UserEdits, input_image: sitk.Image, model_image: sitk.Image, image: torch.Tensor,
                   patch_zyx, seed: int) -> "CaseTraining | None":
        """The case training of a run, or None when the user gave no organ label to a voxel of the model grid."""
        reviewed = {value: _fraction_on_model_grid(mask, input_image, model_image, fill=0.0) >= 0.5
                    for value, mask in reviewed_slices(edits.labels, edits.region).items()}
        targets = {value: _fraction_on_model_grid(edits.labels == value, input_image, model_image, fill=0.0) >= 0.5
                   for value in reviewed}
        values = [value for value in reviewed if (targets[value] & reviewed[value]).any()]
        if not values:
            return None
        return cls(image, values, np.stack([targets[v] for v in values]), np.stack([reviewed[v] for v in values]),
                   patch_zyx, seed)

    def step(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """One optimiser step on fresh patches of the case."""
        count = len(self.values)
        # Plain tensors: a MetaTensor (what MONAI's crops return) slows every network operation.
        patches = torch.stack([convert_to_tensor(p, track_meta=False)
                               for p in self.cropper(self.volume, weight_map=self.volume[-1:])]).to(device)
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network(patches[:, :1])
        loss = reviewed_loss(logits, self.values, patches[:, 1:1 + count], patches[:, 1 + count:1 + 2 * count])
        loss.backward()
        optimizer.step()
