"""`isseg train`: build a model package from labelled cases in the Medical Segmentation Decathlon layout."""

from __future__ import annotations

from pathlib import Path

from .. import model_training, protocol
from ..protocol import EXIT_DONE
from ..model_training import TrainSettings, train_package
from .options import add_progress_option, events_for


def register(commands) -> None:
    defaults = TrainSettings()
    parser = commands.add_parser("train", help="build a model package from labelled cases (MSD layout)",
                                 description=model_training.__doc__.split("\n\n", 2)[2])
    parser.add_argument("--dataset", required=True, help="folder with dataset.json, imagesTr/ and labelsTr/")
    parser.add_argument("--output", required=True, help="package folder to write (an unfinished one is resumed)")
    parser.add_argument("--name", help="model name shown to users")
    parser.add_argument("--spacing", type=float, nargs=3, default=defaults.spacing, metavar=("X", "Y", "Z"),
                        help="model voxel spacing in mm (default %(default)s)")
    parser.add_argument("--window", type=float, nargs=2, default=defaults.intensity_window, metavar=("LOW", "HIGH"),
                        help="HU window mapped to [0, 1] (default %(default)s)")
    parser.add_argument("--patch", type=int, nargs=3, default=defaults.patch_size, metavar=("X", "Y", "Z"),
                        help="patch size in voxels (default %(default)s)")
    parser.add_argument("--channels", type=int, nargs="+", default=defaults.channels, help="UNet channels per level")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--loss", choices=protocol.LOSS_NAMES, default=defaults.loss)
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--evaluate-every", type=int, default=defaults.evaluate_every)
    parser.add_argument("--randomize-appearance", action="store_true",
                        help="draw each patch's appearance anew: contrast phase and random intensity per label, "
                             "bias field, Gibbs ringing, blur, lower resolution, thick slices, gamma, noise "
                             "(isseg.appearance)")
    parser.add_argument("--short-scans", type=float, default=defaults.short_scan_probability, metavar="PROBABILITY",
                        help="cut this share of the patches to a random axial slab padded as the sliding window pads "
                             "a CT thinner than the patch (isseg.short_scans; default %(default)s)")
    parser.add_argument("--device", choices=protocol.DEVICES, default=protocol.DEFAULT_DEVICE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds-only", action="store_true",
                        help="do not train: choose the per-label thresholds of the package in --output again, on the "
                             "validation cases of --dataset it was built with (a package from an older version)")
    add_progress_option(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    if args.thresholds_only:
        events = events_for(args)
        choices = model_training.rechoose_thresholds(Path(args.dataset), Path(args.output), events, args.device)
        events.emit("done", package=str(args.output), thresholds={c["value"]: c["threshold"] for c in choices})
        return EXIT_DONE
    settings = TrainSettings(spacing=tuple(args.spacing), intensity_window=tuple(args.window), patch_size=tuple(args.patch),
                             channels=tuple(args.channels), steps=args.steps, learning_rate=args.learning_rate,
                             loss=args.loss, validation_fraction=args.validation_fraction,
                             evaluate_every=args.evaluate_every, seed=args.seed,
                             randomize_appearance=args.randomize_appearance, short_scan_probability=args.short_scans)
    train_package(Path(args.dataset), Path(args.output), settings, events_for(args), args.device, args.name)
    return EXIT_DONE
