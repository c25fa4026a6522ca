"""Options shared by several commands: the refinement options (`refine`, `demo`, `evaluate`), the
`--progress` option and the resolution of `--model` and `--device`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import protocol, validation
from ..alignment import AlignmentSettings
from ..demo_model import demo_package_path
from ..events import EventWriter
from ..refinement import RefineSettings


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=("auto", "json", "bar"), default="auto",
                        help="JSON lines (for programs) or a progress bar; auto picks the bar in a terminal")


def events_for(args: argparse.Namespace) -> EventWriter:
    """The event writer the `--progress` option asks for (JSON lines where the command has none)."""
    return EventWriter(mode=getattr(args, "progress", "json"))


def add_device_and_seed_options(group) -> None:
    group.add_argument("--device", choices=protocol.DEVICES, default=protocol.DEFAULT_DEVICE,
                       help="where to compute; auto uses a CUDA GPU when there is one (default %(default)s)")
    group.add_argument("--seed", type=validation.non_negative_int, default=0, help="random seed; the same seed repeats a run (default 0)")


def add_refine_options(parser: argparse.ArgumentParser) -> None:
    """Options of the refinement algorithm, shared by `refine`, `demo` and `evaluate`."""
    defaults = RefineSettings()
    group = parser.add_argument_group("inference-specific learning")
    group.add_argument("--steps", type=validation.positive_int, default=defaults.steps,
                       help="fine-tuning steps in all (default %(default)s); more is slower and usually a little better")
    group.add_argument("--rounds", type=int, default=defaults.rounds, choices=(1, 2, 3),
                       help="alignment rounds; each re-aligns the atlas to the latest average mask (default %(default)s)")
    group.add_argument("--update-every", type=validation.positive_int, default=defaults.update_every,
                       help="steps between moving-average updates, each published as a snapshot (default %(default)s)")
    group.add_argument("--momentum", type=validation.momentum, default=defaults.momentum,
                       help="moving-average factor m in P = m P + (1 - m) P_t (default %(default)s)")
    group.add_argument("--no-moving-average", action="store_true",
                       help="keep only the latest prediction instead of the moving average (for comparison)")
    group.add_argument(protocol.OPTION_STOP_WHEN_CONVERGED, type=validation.fraction, metavar="FRACTION",
                       default=defaults.stop_when_converged,
                       help="stop early, at the first moving-average update that changes the label of less than this "
                            "fraction of the mask's voxels (0 never stops early; default %(default)s)")
    group.add_argument("--learning-rate", type=validation.positive_float, default=defaults.learning_rate,
                       help="fine-tuning learning rate (default %(default)s)")
    group.add_argument("--loss", choices=protocol.LOSS_NAMES, default=defaults.loss,
                       help="fine-tuning loss: Dice + cross-entropy, or adaptive region-specific Tversky + "
                            "cross-entropy (default %(default)s)")
    group.add_argument("--align-mode", choices=protocol.ALIGN_MODES, default=defaults.alignment.mode,
                       help="what drives the atlas alignment: the current mask (robust to contrast), image "
                            "similarity, or both (default %(default)s)")
    group.add_argument("--align-iterations", type=validation.non_negative_int, default=defaults.alignment.iterations,
                       help="alignment iterations per pyramid level in the first round (default %(default)s)")
    group.add_argument("--no-intensity-matching", action="store_true",
                       help="train on the atlas intensities as they are, without matching each organ's "
                            "intensities to this case")
    group.add_argument("--no-largest-component", action="store_true",
                       help="keep every piece of each organ instead of the largest one")
    add_device_and_seed_options(group)


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    """Options of `refine` for starting from the user's edits and for the uncertainty map."""
    group = parser.add_argument_group("refining from edits, uncertainty")
    group.add_argument(protocol.OPTION_INITIAL_MASK, metavar="LABELMAP",
                       help="start from this mask (e.g. the result after your corrections) instead of the network's: "
                            "a labelmap with the model's label values on the grid of --input")
    group.add_argument(protocol.OPTION_EDITED_REGION, metavar="LABELMAP",
                       help=f"voxels you changed (1) and the others (0), on the grid of --input; needs "
                            f"{protocol.OPTION_INITIAL_MASK}. The network also learns from this case there, and the "
                            "result keeps your labels there unchanged")
    group.add_argument("--uncertainty", choices=protocol.UNCERTAINTY_MEASURES, default=protocol.DEFAULT_UNCERTAINTY,
                       help="what uncertainty.nrrd shows: the entropy of the averaged probabilities, or how many of "
                            "the last predictions disagree with the result (default %(default)s)")


def edit_options_from(args: argparse.Namespace) -> dict:
    """The keyword arguments of pipeline.Run that the options of `add_edit_options` ask for; exits with a
    usage message (exit code 2) for an edited region without its mask."""
    if args.edited_region and not args.initial_mask:
        usage_error(f"{protocol.OPTION_EDITED_REGION} needs {protocol.OPTION_INITIAL_MASK} (the edited mask it belongs to)")
    return {"initial_mask": args.initial_mask, "edited_region": args.edited_region,
            "uncertainty_measure": args.uncertainty}


def usage_error(message: str) -> None:
    """Stop as argparse does for a wrong argument: the message on stderr and exit code 2 (EXIT_USAGE)."""
    sys.stderr.write(f"isseg: error: {message}\n")
    raise SystemExit(protocol.EXIT_USAGE)


def refine_settings_from(args: argparse.Namespace) -> RefineSettings:
    """The RefineSettings the options of `add_refine_options` ask for (their argparse types refuse
    out-of-range values: exit 2 with an `error` event)."""
    return RefineSettings(steps=args.steps, rounds=args.rounds, update_every=args.update_every,
                          momentum=args.momentum, moving_average=not args.no_moving_average,
                          learning_rate=args.learning_rate, loss=args.loss,
                          stop_when_converged=args.stop_when_converged,
                          match_intensity=not args.no_intensity_matching,
                          alignment=AlignmentSettings(mode=args.align_mode,
                                                      iterations=args.align_iterations))


def resolve_model(name_or_path: str) -> Path:
    """The package path a `--model` option names: the built-in demo package for `demo`, else the path."""
    return demo_package_path() if str(name_or_path) == protocol.DEMO_MODEL else Path(name_or_path)
