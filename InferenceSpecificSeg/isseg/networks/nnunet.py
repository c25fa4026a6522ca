"""The "nnunet_v2" network kind: an nnU-Net v2 network (e.g. TotalSegmentator's) with its own preprocessing.

Everything nnU-Net defines is done by nnunetv2 itself, from the plans stored in model.json: the
network is built by `get_network_from_plans` (dynamic_network_architectures), the case is
preprocessed by the plans' preprocessor (transpose, crop to non-zero, CT normalization from the
foreground intensity properties, resampling to the configuration's spacing), predicted by
`nnUNetPredictor`'s sliding window (its step size, Gaussian weighting and test-time mirroring) and
mapped back by `convert_predicted_logits_to_segmentation_with_correct_shape`. The initial segmentation
is therefore the one nnU-Net's own predictor gives.

Deep supervision: the network is built without it (enable_deep_supervision=False, as nnU-Net does for
inference); the weights are the same, so fine-tuning puts its loss on the full-resolution head.

Only JSON and safetensors are read at run time; checkpoints (.pth) are read once, at packaging time, by
`read_trained_model` with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import BadModelError
from .base import KIND_NNUNET, NetworkKind, PreparedCase, require_extra

EXTRA = "nnunet"
ARCHITECTURE_PREFIX = "dynamic_network_architectures.architectures."
# Classes plans may name for the network's building blocks (torch.nn only: nothing else is imported).
BUILDING_BLOCK_PREFIX = "torch.nn."
# How nnU-Net's readers order the voxel axes: SimpleITKIO (z, y, x), the Nibabel readers (x, y, z); the
# orientation each kind of reader sees (SimpleITK codes: the direction each axis increases towards).
READERS = {"SimpleITKIO": ("zyx", "LPS"), "NibabelIO": ("xyz", "RAS"), "NibabelIOWithReorient": ("xyz", "RAS")}


def _nnunet(module: str):
    return require_extra(module, EXTRA, "an nnU-Net v2 network")


@contextlib.contextmanager
def _quiet():
    """nnunetv2 prints to stdout; stdout is the worker protocol's, so its messages go to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class NnUNetNetwork(NetworkKind):
    """model.json network: {"kind": "nnunet_v2", "plans", "dataset_json", "configuration", "trainer",
    "fold", "mirroring_axes", "tile_step_size", "use_gaussian", "use_mirroring", "orientation"}."""

    def __init__(self, config: dict):
        super().__init__(config)
        plans_handler = _nnunet("nnunetv2.utilities.plans_handling.plans_handler")
        entry = self.network_config
        self.plans_manager = plans_handler.PlansManager(entry["plans"])
        self.configuration = self.plans_manager.get_configuration(entry["configuration"])
        self.label_manager = self.plans_manager.get_label_manager(entry["dataset_json"])
        check_supported(self.plans_manager, self.configuration, self.label_manager, entry["dataset_json"])
        self.axes, _ = READERS[self.plans_manager.plans["image_reader_writer"]]
        self._predictor = None

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.configuration.patch_size)

    def build(self) -> torch.nn.Module:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        with _quiet():
            return get_network_from_plans(
                self.configuration.network_arch_class_name, self.configuration.network_arch_init_kwargs,
                self.configuration.network_arch_init_kwargs_req_import, 1, self.label_manager.num_segmentation_heads,
                allow_init=False, deep_supervision=False)

    def oriented(self, image: sitk.Image) -> sitk.Image:
        """The CT with its axes in the package's orientation (a permutation/flip, no interpolation)."""
        return sitk.DICOMOrient(image, self.network_config["orientation"])

    def nnunet_array(self, image: sitk.Image) -> tuple[np.ndarray, list[float]]:
        """(1, ...) float32 array and spacing (mm) in the axis order of the plans' image reader."""
        array = sitk.GetArrayFromImage(image).astype(np.float32)[None]
        spacing = list(image.GetSpacing())[::-1]
        if self.axes == "xyz":
            array, spacing = array.transpose(0, 3, 2, 1), spacing[::-1]
        return array, spacing

    def prepare(self, image: sitk.Image) -> PreparedCase:
        oriented = self.oriented(image)
        array, spacing = self.nnunet_array(oriented)
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        with _quiet():
            data, _, properties = preprocessor.run_case_npy(array, None, {"spacing": spacing}, self.plans_manager,
                                                            self.configuration, self.network_config["dataset_json"])
        model_image = sitk.GetImageFromArray(data[0])
        self._set_model_geometry(model_image, oriented, properties)
        return PreparedCase(model_image, torch.from_numpy(np.ascontiguousarray(data))[None], properties)

    def _set_model_geometry(self, model_image: sitk.Image, oriented: sitk.Image, properties: dict) -> None:
        """Origin, spacing and direction of the preprocessed array: axis m of the array is axis
        transpose_forward[m] of the reader's array, cropped to the bounding box and resampled with
        nnU-Net's corner-aligned resampling (scale = cropped length / new length)."""
        transpose = self.plans_manager.transpose_forward
        size = model_image.GetSize()[::-1]
        direction = np.array(oriented.GetDirection()).reshape(3, 3)
        spacing, columns, start_index = [0.0] * 3, [None] * 3, [0.0] * 3
        for m in range(3):
            reader_axis = transpose[m]
            sitk_axis = 2 - reader_axis if self.axes == "zyx" else reader_axis
            low, high = properties["bbox_used_for_cropping"][m]
            scale = (high - low) / size[m]
            spacing[2 - m] = oriented.GetSpacing()[sitk_axis] * scale
            columns[2 - m] = direction[:, sitk_axis]
            start_index[sitk_axis] = low - 0.5 + 0.5 * scale
        model_image.SetSpacing(spacing)
        model_image.SetDirection(tuple(np.stack(columns, axis=1).ravel()))
        model_image.SetOrigin(oriented.TransformContinuousIndexToPhysicalPoint(start_index))

    def normalize(self, hu: np.ndarray) -> np.ndarray:
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        data = hu.astype(np.float32)[None]
        with _quiet():
            data = preprocessor._normalize(data, np.zeros_like(data, dtype=np.int8), self.configuration,
                                           self.plans_manager.foreground_intensity_properties_per_channel)
        return data[0]

    def predictor(self, device: torch.device):
        """nnU-Net's own predictor with the package's sliding-window and mirroring settings."""
        if self._predictor is None or self._predictor.device != device:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            entry = self.network_config
            with _quiet():
                self._predictor = nnUNetPredictor(
                    tile_step_size=entry["tile_step_size"], use_gaussian=entry["use_gaussian"],
                    use_mirroring=entry["use_mirroring"], perform_everything_on_device=device.type == "cuda",
                    device=device, allow_tqdm=False)
            mirroring = entry["mirroring_axes"]
            self._predictor.manual_initialization(
                None, self.plans_manager, self.configuration, None, entry["dataset_json"], entry["trainer"],
                tuple(mirroring) if mirroring is not None else None)
        return self._predictor

    def predict_logits(self, network, tensor, device) -> torch.Tensor:
        predictor = self.predictor(device)
        predictor.network = network
        with _quiet():
            logits = predictor.predict_sliding_window_return_logits(tensor[0])
        return logits.float().cpu()[None].clone()

    def probabilities_on_input(self, probabilities, prepared, input_image) -> np.ndarray:
        """nnU-Net's own export: resample to the cropped input shape (its probability resampling), softmax,
        undo the crop and the transpose. It is given log-probabilities, whose softmax is the probabilities
        themselves; and since resampling is linear and softmax ignores a constant added to every channel,
        this equals nnU-Net's own export of the logits exactly."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        log_probabilities = torch.log(torch.as_tensor(probabilities, dtype=torch.float32).clamp_min(1e-12))
        with _quiet():
            _, on_input = convert_predicted_logits_to_segmentation_with_correct_shape(
                log_probabilities, self.plans_manager, self.configuration, self.label_manager, prepared.context,
                return_probabilities=True, num_threads_torch=torch.get_num_threads())
        if self.axes == "xyz":
            on_input = on_input.transpose(0, 3, 2, 1)
        return self._from_oriented(np.asarray(on_input, dtype=np.float32), input_image)

    def _from_oriented(self, probabilities: np.ndarray, input_image: sitk.Image) -> np.ndarray:
        """Undo the reorientation of `oriented`: per channel, back onto the input's voxel order."""
        reference = self.oriented(input_image)
        if reference.GetDirection() == input_image.GetDirection():
            return probabilities
        channels = []
        for channel in probabilities:
            image = sitk.GetImageFromArray(channel)
            image.CopyInformation(reference)
            channels.append(sitk.GetArrayFromImage(sitk.DICOMOrient(image, _orientation_code(input_image))))
        return np.stack(channels)


def _orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def check_supported(plans_manager, configuration, label_manager, dataset_json: dict) -> None:
    """Refuse what isseg cannot reproduce faithfully, or what would import code the plans name."""
    name = configuration.network_arch_class_name
    if not name.startswith(ARCHITECTURE_PREFIX):
        raise BadModelError(f"The plans name the network class '{name}', which is not one of "
                            f"dynamic_network_architectures ({ARCHITECTURE_PREFIX}...); isseg builds only those.")
    for key in configuration.network_arch_init_kwargs_req_import:
        value = configuration.network_arch_init_kwargs[key]
        if value is not None and not str(value).startswith(BUILDING_BLOCK_PREFIX):
            raise BadModelError(f"The plans give '{key}': '{value}', which is not a torch.nn class; isseg will "
                                "not import it.")
    reader = plans_manager.plans.get("image_reader_writer")
    if reader not in READERS:
        raise BadModelError(f"The plans read images with '{reader}'; isseg reproduces {', '.join(READERS)}.")
    if len(dataset_json.get("channel_names", {})) != 1:
        raise BadModelError("This nnU-Net model takes several input channels; isseg refines single-CT models.")
    if configuration.previous_stage_name is not None:
        raise BadModelError("This nnU-Net configuration is a cascade stage (it needs the previous stage's "
                            "segmentation); choose 3d_fullres, 3d_lowres or 2d with --configuration.")
    if label_manager.has_regions:
        raise BadModelError("This nnU-Net model predicts overlapping regions (sigmoid outputs); isseg refines "
                            "models with one label per voxel (softmax).")
    if len(configuration.patch_size) != 3:
        raise BadModelError("This is a 2D nnU-Net configuration; choose a 3D one (3d_fullres) with --configuration.")


# --- packaging time: read a trained-model folder once -------------------------------------------------


def numpy_globals() -> list:
    """numpy's scalar and dtype reconstructors, which nnU-Net checkpoints hold in their training log;
    allowed for torch.load(weights_only=True) (they build numbers, never run code)."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed np.core
    scalar = core.multiarray.scalar
    dtypes = [type(np.dtype(kind)) for kind in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [scalar, np.dtype, *dtypes]


def read_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True) of an nnU-Net checkpoint; a pickle that would run code is refused."""
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise BadModelError(
            f"'{path}' cannot be read as plain weights ({str(error).splitlines()[-1][:300]}). It is damaged, or "
            "it holds objects whose unpickling would run code, which isseg refuses. Use the checkpoint that "
            "nnU-Net wrote (checkpoint_final.pth) from a source you trust."
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise BadModelError(f"'{path}' is not an nnU-Net v2 checkpoint (it has no 'network_weights').")
    return checkpoint


def find_trained_model_folder(path: Path, configuration: str | None) -> Path:
    """The folder with plans.json and dataset.json: `path` itself, or its one trainer folder
    (TRAINER__PLANS__CONFIGURATION) of the asked configuration."""
    if (path / "plans.json").is_file() and (path / "dataset.json").is_file():
        return path
    candidates = sorted(p for p in path.glob("*__*__*") if (p / "plans.json").is_file())
    if configuration:
        candidates = [p for p in candidates if p.name.split("__")[-1] == configuration]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise BadModelError(f"'{path}' is not an nnU-Net v2 trained-model folder (plans.json, dataset.json, "
                        f"fold_N/checkpoint_final.pth); trainer folders found: {found}. Give the folder itself, "
                        "or --configuration to choose one.")


def read_trained_model(path: Path, fold: str | None, configuration: str | None,
                       orientation: str | None = None) -> tuple[dict, dict, dict]:
    """(model.json network entry, network weights, network labels {value: name}) of an nnU-Net v2
    trained-model folder. `orientation` (a SimpleITK code such as "RAS") is how the images the network
    was trained on were oriented when nnU-Net read them; by default the orientation the plans' reader
    gives an image stored in the usual way (LPS for SimpleITKIO, RAS for the nibabel readers).
    TotalSegmentator reorients every CT to RAS before nnU-Net: give "RAS" for its models."""
    import json

    folder = find_trained_model_folder(path, configuration)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    fold = fold if fold is not None else _only_fold(folder)
    checkpoint_path = folder / f"fold_{fold}" / "checkpoint_final.pth"
    if not checkpoint_path.is_file():
        raise BadModelError(f"'{checkpoint_path}' is missing: choose a fold that was trained with --fold.")
    checkpoint = read_checkpoint(checkpoint_path)
    trained = checkpoint.get("init_args", {}).get("configuration")
    configuration = configuration or trained or folder.name.split("__")[-1]
    if trained and trained != configuration:
        raise BadModelError(f"'{checkpoint_path}' was trained for configuration '{trained}', not '{configuration}'.")
    orientation = check_orientation(orientation or READERS.get(plans.get("image_reader_writer"), ("zyx", "LPS"))[1])
    mirroring = checkpoint.get("inference_allowed_mirroring_axes")
    entry = {"kind": KIND_NNUNET, "plans": plans, "dataset_json": dataset_json, "configuration": configuration,
             "trainer": checkpoint.get("trainer_name", folder.name.split("__")[0]), "fold": str(fold),
             "mirroring_axes": list(mirroring) if mirroring is not None else None, "tile_step_size": 0.5,
             "use_gaussian": True, "use_mirroring": True, "orientation": orientation}
    labels = {int(v): name for name, v in dataset_json["labels"].items() if isinstance(v, int) and v > 0
              and name != "ignore"}
    return entry, checkpoint["network_weights"], labels


def check_orientation(code: str) -> str:
    """`code` if it is a 3-letter orientation code (one of L/R, P/A, S/I per axis), else BadModelError."""
    code = code.upper()
    if len(code) != 3 or sorted(code.translate(str.maketrans("RAI", "LPS"))) != ["L", "P", "S"]:
        raise BadModelError(f"'{code}' is not an orientation code: give 3 letters, one of L/R, P/A and S/I each "
                            "(e.g. RAS or LPS).")
    return code


def _only_fold(folder: Path) -> str:
    folds = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / "checkpoint_final.pth").is_file())
    if len(folds) != 1:
        raise BadModelError(f"'{folder}' has the trained folds {folds or 'none'}; choose one with --fold.")
    return folds[0]


def model_summary(entry: dict) -> dict:
    """model.json `input` and `patch_size` of an nnU-Net package, x y z (for display; the plans rule)."""
    kind = NnUNetNetwork({"network": entry})
    transpose = kind.plans_manager.transpose_forward
    spacing_reader = [0.0] * 3
    for m, axis in enumerate(transpose):
        spacing_reader[axis] = float(kind.configuration.spacing[m])
    spacing_xyz = spacing_reader[::-1] if kind.axes == "zyx" else spacing_reader
    return {"input": {"spacing": spacing_xyz, "orientation": entry["orientation"],
                      "normalization": kind.configuration.normalization_schemes[0],
                      "intensity_properties": kind.plans_manager.foreground_intensity_properties_per_channel["0"]},
            "patch_size": [int(p) for p in kind.patch_zyx[::-1]]}
