"""The options of one refinement run and how they become worker command-line arguments.

The enumerations are also the types of the module's parameter node; their `label` gives the text shown
in the panel's combo boxes (Slicer's parameter node wrapper calls `label(member)`).
"""

import enum
from dataclasses import dataclass

from isseg import protocol  # the torch-free contract shared with the worker

from .i18n import tr as _


class Device(enum.Enum):
    """Where the worker runs the network."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    @staticmethod
    def label(member: "Device") -> str:
        return {
            Device.AUTO: _("Automatic (GPU when there is one)"),
            Device.CPU: _("CPU"),
            Device.CUDA: _("CUDA GPU"),
        }[member]


class AlignmentMode(enum.Enum):
    """What drives the deformable alignment of the training cases to the inference CT."""

    MASK = "mask"
    INTENSITY = "intensity"
    BOTH = "both"

    @staticmethod
    def label(member: "AlignmentMode") -> str:
        return {
            AlignmentMode.MASK: _("Organ masks (recommended)"),
            AlignmentMode.INTENSITY: _("Image intensities"),
            AlignmentMode.BOTH: _("Masks and intensities"),
        }[member]


class Loss(enum.Enum):
    """Fine-tuning loss."""

    DICECE = "dicece"
    REGION_TVERSKY = "region_tversky"

    @staticmethod
    def label(member: "Loss") -> str:
        return {
            Loss.DICECE: _("Dice + cross-entropy"),
            Loss.REGION_TVERSKY: _("Adaptive region-specific Tversky"),
        }[member]


@dataclass(frozen=True)
class RunSettings:
    """Options of one run: fine-tuning steps, device, alignment mode, moving-average factor m
    (P = m P + (1 - m) P_t) and loss."""

    steps: int = protocol.DEFAULT_STEPS
    device: Device = Device.AUTO
    alignment: AlignmentMode = AlignmentMode.MASK
    momentum: float = protocol.DEFAULT_MOMENTUM
    loss: Loss = Loss.DICECE

    def commandLineArguments(self) -> list:
        """The options as arguments of `isseg.cli refine` (see docs/worker-protocol.md)."""
        return [
            "--steps", str(self.steps),
            "--device", self.device.value,
            "--align-mode", self.alignment.value,
            "--momentum", f"{self.momentum:g}",
            "--loss", self.loss.value,
        ]
