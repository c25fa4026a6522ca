"""Refining from the user's edits: `isseg refine --initial-mask LABELMAP --edited-region LABELMAP`.

The edited mask (label values of the model, on the input grid) replaces the network's initial mask:
it is the moving average the run starts from, so the first alignment round aligns the atlas to it.
The edited region (1 where the user changed a voxel, 0 elsewhere, on the input grid) is trusted:
the fine-tuning also trains on the case itself there with the user's labels (`CaseTraining`), the
average is pulled back to the user's labels there after every update (`UserEdits.trust`), and every
published labelmap keeps the user's voxels there unchanged (`UserEdits.keep_edits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
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


class CaseTraining:
    """Fine-tuning steps on the case itself, inside the edited region, with the user's labels.

    image (1, 1, z, y, x) normalized, labels (z, y, x) int64 and trusted (z, y, x) bool, all on the
    model grid. Each step trains on `batch_size` patches centred on trusted voxels; the loss (masked
    Dice + cross-entropy) counts the trusted voxels only.
    """

    def __init__(self, image: torch.Tensor, labels: np.ndarray, trusted: np.ndarray, patch_zyx, seed: int,
                 batch_size: int = 1):
        stacked = torch.cat([image[0], torch.as_tensor(labels, dtype=torch.float32)[None],
                             torch.as_tensor(trusted, dtype=torch.float32)[None]])
        self.volume = SpatialPad(spatial_size=patch_zyx, mode="constant")(stacked)
        self.cropper = RandWeightedCrop(spatial_size=patch_zyx, num_samples=batch_size)
        self.cropper.set_random_state(seed)
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    @classmethod
    def from_edits(cls, edits: UserEdits, input_image: sitk.Image, model_image: sitk.Image, image: torch.Tensor,
                   patch_zyx, seed: int) -> "CaseTraining | None":
        """The case training of a run, or None when the user edited no voxel of the model grid."""
        trusted = _fraction_on_model_grid(edits.region, input_image, model_image, fill=0.0) >= 0.5
        if not trusted.any():
            return None
        labels = sitk.GetArrayFromImage(resample_to(labelmap_like(edits.labels, input_image), model_image, is_label=True))
        return cls(image, labels.astype(np.int64), trusted, patch_zyx, seed)

    def step(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """One optimiser step on fresh patches."""
        # Plain tensors: a MetaTensor (what MONAI's crops return) slows every network operation.
        patches = torch.stack([convert_to_tensor(p, track_meta=False)
                               for p in self.cropper(self.volume, weight_map=self.volume[2:3])])
        image, labels, mask = patches[:, :1].to(device), patches[:, 1:2].round().long().to(device), patches[:, 2:3].to(device)
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network(image)
        logits = logits.float()
        cross_entropy = (F.cross_entropy(logits, labels[:, 0], reduction="none") * mask[:, 0]).sum() / mask.sum().clamp(min=1)
        loss = cross_entropy + self.dice(logits, labels, mask=mask)
        loss.backward()
        optimizer.step()
