"""The "monai_bundle" network kind: a MONAI bundle's network with the preprocessing of its inference config.

A bundle's configs may hold Python expressions ("$...") and references ("@..."); none is ever evaluated.
At packaging time `read_bundle` takes from configs/inference.(json|yaml) only literal entries: the
network (`network_def`: a class of monai.networks.nets and its arguments), the preprocessing transforms
(from a whitelist of monai.transforms dictionary transforms), the sliding-window inferer and the output
activation; labels from metadata.json's channel_def; weights from models/model.pt, read with
torch.load(weights_only=True). Anything else (TorchScript models, expressions, unknown transforms) is
refused with a message saying so. At run time the same MONAI transforms, network and inferer are built
from model.json, so the initial segmentation is the bundle's own.

Voxel layout: MONAI arrays are (channel, x, y, z) in its RAS world; the model grid's SimpleITK image is
built so that its (z, y, x) array is exactly that (x, y, z) tensor, i.e. its axes are the reverse.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import BadModelError
from ..postprocess import resample_probabilities
from .base import KIND_BUNDLE, NetworkKind, PreparedCase, require_extra
from .monai_net import build_monai_network

EXTRA = "bundle"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# Done by isseg's own reader (image in HU, channel first).
READING = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst"}
GEOMETRY = {"Orientationd", "Spacingd"}
INTENSITY = {"ScaleIntensityRanged", "NormalizeIntensityd", "ScaleIntensityd", "ThresholdIntensityd"}
TYPING = {"EnsureTyped", "CastToTyped", "ToTensord"}
INFERER_ARGS = {"roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval"}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _is_literal(value) -> bool:
    """True for JSON values without bundle expressions, references or macros ($, @, %)."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, dict):
        return all(_is_literal(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_literal(v) for v in value)
    return True


def _component(entry, what: str, allowed=None) -> dict:
    """{"name", "args"} of a config component {"_target_": NAME, ...} with literal arguments only."""
    if not isinstance(entry, dict) or "_target_" not in entry:
        raise BadModelError(f"The bundle's {what} is not a plain component (it is {str(entry)[:120]!r}); isseg "
                            "reads only literal {\"_target_\": ..., arguments} entries and never evaluates expressions.")
    name = str(entry["_target_"]).rsplit(".", 1)[-1]
    args = {k: v for k, v in entry.items() if not k.startswith("_")}
    if allowed is not None and name not in allowed:
        raise BadModelError(f"The bundle's {what} uses '{name}', which isseg does not reproduce (it reproduces "
                            f"{', '.join(sorted(allowed))}). Ask for this bundle to be supported.")
    if not _is_literal(args):
        raise BadModelError(f"The bundle's {what} '{name}' has arguments that are expressions or references "
                            f"({args}); isseg never evaluates them. Replace them with literal values.")
    return {"name": name, "args": args}


def read_config(folder: Path) -> tuple[dict, dict]:
    """(inference config, metadata) of a bundle folder, parsed as data (nothing evaluated)."""
    from monai.bundle import ConfigParser as parser
    config_path = next((folder / "configs" / n for n in CONFIG_NAMES if (folder / "configs" / n).is_file()), None)
    metadata_path = folder / "configs" / "metadata.json"
    if config_path is None or not metadata_path.is_file():
        raise BadModelError(f"'{folder}' is not a MONAI bundle with an inference config: it needs "
                            "configs/inference.json (or .yaml) and configs/metadata.json.")
    if config_path.suffix != ".json":
        require_extra("yaml", EXTRA, "a MONAI bundle with a YAML config")
    return parser.load_config_file(str(config_path)), parser.load_config_file(str(metadata_path))


def read_weights(folder: Path) -> dict:
    """models/model.pt as plain tensors (torch.load weights_only=True); TorchScript is refused."""
    path = folder / "models" / "model.pt"
    if not path.is_file():
        scripted = " (only models/model.ts, TorchScript, which would run code: isseg refuses it)" \
            if (folder / "models" / "model.ts").is_file() else ""
        raise BadModelError(f"The bundle has no weights file models/model.pt{scripted}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise BadModelError(f"'{path}' cannot be read as plain weights ({str(error).splitlines()[-1][:300]}): it is "
                            "damaged or would run code when unpickled, which isseg refuses.") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # a checkpoint saved as {"model": state_dict}
    return state


def _activation(config: dict) -> str:
    transforms = config.get("postprocessing", {}).get("transforms", []) if isinstance(config.get("postprocessing"), dict) else []
    for transform in transforms:
        if isinstance(transform, dict) and str(transform.get("_target_", "")).endswith("Activationsd"):
            if transform.get("sigmoid"):
                raise BadModelError("The bundle's outputs are sigmoid (overlapping structures); isseg refines "
                                    "networks with one label per voxel (softmax).")
    return "softmax"


def read_bundle(folder: Path) -> tuple[dict, dict, dict[int, str], dict]:
    """(model.json network entry, weights, labels {channel: name}, about) of a MONAI bundle folder."""
    config, metadata = read_config(folder)
    transforms = config.get("preprocessing", {}).get("transforms") if isinstance(config.get("preprocessing"), dict) else None
    if not isinstance(transforms, list):
        raise BadModelError("The bundle's inference config has no literal 'preprocessing' Compose of transforms.")
    preprocessing = [_component(t, "preprocessing", READING | GEOMETRY | INTENSITY | TYPING) for t in transforms]
    inferer = _component(config.get("inferer"), "inferer", {"SlidingWindowInferer"})["args"]
    entry = {"kind": KIND_BUNDLE, "network": _component(config.get("network_def"), "network_def"),
             "preprocessing": [t for t in preprocessing if t["name"] not in READING],
             "inferer": {k: v for k, v in inferer.items() if k in INFERER_ARGS}, "activation": _activation(config)}
    channels = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
    labels = {int(k): v for k, v in channels.items() if int(k) > 0}
    if not labels:
        raise BadModelError("The bundle's metadata.json names no output channels (network_data_format.outputs."
                            "pred.channel_def); isseg needs the label names to map the atlas.")
    license_path = next((folder / n for n in ("LICENSE", "docs/LICENSE", "LICENSE.txt") if (folder / n).is_file()), None)
    references = metadata.get("references", [])
    about = {"name": metadata.get("name", folder.name), "version": str(metadata.get("version", "1")),
             "description": metadata.get("description", ""),
             "license": license_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[0]
             if license_path else metadata.get("copyright", ""),
             "citation": " ".join(references) if isinstance(references, list) else str(references)}
    return entry, read_weights(folder), labels, about


def model_summary(entry: dict) -> dict:
    """model.json `input` and `patch_size` of a bundle package (for display; the transforms rule)."""
    spacing = next((t["args"].get("pixdim") for t in entry["preprocessing"] if t["name"] == "Spacingd"), None)
    orientation = next((t["args"].get("axcodes") for t in entry["preprocessing"] if t["name"] == "Orientationd"), None)
    return {"input": {"spacing": spacing, "orientation": orientation, "axes": "MONAI (x, y, z) of RAS",
                      "preprocessing": [t["name"] for t in entry["preprocessing"]]},
            "patch_size": list(entry["inferer"]["roi_size"])}


class BundleNetwork(NetworkKind):
    """model.json network: {"kind": "monai_bundle", "network": {"name", "args"}, "preprocessing":
    [{"name", "args"}, ...], "inferer": {SlidingWindowInferer arguments}, "activation": "softmax"}."""

    def __init__(self, config: dict):
        super().__init__(config)
        import monai.transforms

        self.transforms = monai.transforms
        self.key = "image"

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.network_config["inferer"]["roi_size"])

    def build(self) -> torch.nn.Module:
        return build_monai_network(self.network_config["network"])

    def _compose(self, names: set[str]):
        steps = [getattr(self.transforms, t["name"])(**t["args"]) for t in self.network_config["preprocessing"]
                 if t["name"] in names]
        return self.transforms.Compose(steps)

    def prepare(self, image: sitk.Image) -> PreparedCase:
        from monai.data import MetaTensor

        array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)[None]
        data = {self.key: MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=ras_affine(image))}
        data = self._compose(GEOMETRY | INTENSITY | TYPING)(data)
        output = data[self.key]
        tensor = torch.as_tensor(np.asarray(output.detach().cpu()), dtype=torch.float32)[None]
        model_image = sitk.GetImageFromArray(tensor[0, 0].numpy())
        set_geometry_from_ras(model_image, np.asarray(output.affine, dtype=float))
        return PreparedCase(model_image, tensor)

    def normalize(self, hu: np.ndarray) -> np.ndarray:
        data = self._compose(INTENSITY | TYPING)({self.key: torch.as_tensor(hu, dtype=torch.float32)[None]})
        return np.asarray(data[self.key][0], dtype=np.float32)

    @torch.no_grad()
    def predict_logits(self, network, tensor, device) -> torch.Tensor:
        from monai.inferers import SlidingWindowInferer

        network.eval()
        inferer = SlidingWindowInferer(**self.network_config["inferer"])
        return torch.as_tensor(inferer(tensor.to(device), network)).float().cpu()

    def probabilities_on_input(self, probabilities, prepared, input_image) -> np.ndarray:
        return resample_probabilities(probabilities, prepared.model_image, input_image)


def ras_affine(image: sitk.Image) -> np.ndarray:
    """MONAI's 4x4 affine (RAS world, voxel axes x, y, z) of a SimpleITK image (LPS world)."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return LPS_FROM_RAS @ affine


def set_geometry_from_ras(image: sitk.Image, affine: np.ndarray) -> None:
    """Give `image`, whose (z, y, x) array is a MONAI (x, y, z) array, that array's geometry: SimpleITK
    axis k is MONAI axis 2 - k."""
    lps = LPS_FROM_RAS @ affine
    columns = [lps[:3, 2 - k] for k in range(3)]
    spacing = [float(np.linalg.norm(c)) for c in columns]
    image.SetSpacing(spacing)
    image.SetDirection(tuple(np.stack([c / s for c, s in zip(columns, spacing)], axis=1).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
