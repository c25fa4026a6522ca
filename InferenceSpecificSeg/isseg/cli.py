"""The `isseg` command: refine (the worker), train, demo, evaluate, devices.

    isseg refine --input CT --model PACKAGE --output DIR     inference-specific segmentation of one CT
    isseg train  --dataset MSD_FOLDER --output PACKAGE       build a model package from labelled cases
    isseg package --network NET --atlas CASES --output PKG   a package from an nnU-Net model or MONAI bundle
    isseg demo   --output DIR                                the method on a built-in phantom, with a report
    isseg evaluate --cases MSD_FOLDER --model PACKAGE ...    per-case, per-organ comparison of methods
    isseg devices                                            which device a run would use

Progress goes to stdout as JSON lines (the worker protocol, docs/worker-protocol.md) or, in a
terminal, as a progress bar. Exit codes are listed in `isseg refine --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from . import __version__
from .errors import (EXIT_BAD_INPUT, EXIT_BAD_MODEL, EXIT_CANCELLED, EXIT_DISK, EXIT_DONE, EXIT_INTERNAL,
                     EXIT_OUT_OF_MEMORY, IssegError, OutOfMemoryError)
from .events import EventWriter

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_DONE}  done
  {EXIT_INTERNAL}  internal error (please report it, with the log printed on stderr)
  2  wrong command-line arguments
  {EXIT_BAD_INPUT}  bad input image (unreadable, not 3D, empty, not CT)
  {EXIT_BAD_MODEL}  bad model package (missing, corrupt, labels or weights inconsistent)
  {EXIT_OUT_OF_MEMORY}  out of memory, also after falling back to lighter settings and the CPU
  {EXIT_CANCELLED}  cancelled by SIGTERM/SIGINT or a 'cancel' file; the partial result is written
  {EXIT_DISK}  output folder not writable or disk full
"""

log = logging.getLogger("isseg")


def add_refine_options(parser: argparse.ArgumentParser) -> None:
    """Options of the refinement algorithm, shared by `refine`, `demo` and `evaluate`."""
    from .alignment import ALIGN_MODES
    from .losses import LOSS_NAMES
    from .refinement import RefineSettings

    defaults = RefineSettings()
    group = parser.add_argument_group("inference-specific learning")
    group.add_argument("--steps", type=int, default=defaults.steps,
                       help="fine-tuning steps in all (default %(default)s); more is slower and usually a little better")
    group.add_argument("--rounds", type=int, default=defaults.rounds, choices=(1, 2, 3),
                       help="alignment rounds; each re-aligns the atlas to the latest average mask (default %(default)s)")
    group.add_argument("--update-every", type=int, default=defaults.update_every,
                       help="steps between moving-average updates, each published as a snapshot (default %(default)s)")
    group.add_argument("--momentum", type=float, default=defaults.momentum,
                       help="moving-average factor m in P = m P + (1 - m) P_t (default %(default)s)")
    group.add_argument("--no-moving-average", action="store_true",
                       help="keep only the latest prediction instead of the moving average (for comparison)")
    group.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                       help="fine-tuning learning rate (default %(default)s)")
    group.add_argument("--loss", choices=LOSS_NAMES, default=defaults.loss,
                       help="fine-tuning loss: Dice + cross-entropy, or adaptive region-specific Tversky + "
                            "cross-entropy (default %(default)s)")
    group.add_argument("--align-mode", choices=ALIGN_MODES, default=defaults.alignment.mode,
                       help="what drives the atlas alignment: the current mask (robust to contrast), image "
                            "similarity, or both (default %(default)s)")
    group.add_argument("--align-iterations", type=int, default=defaults.alignment.iterations,
                       help="alignment iterations per pyramid level in the first round (default %(default)s)")
    group.add_argument("--no-intensity-matching", action="store_true",
                       help="train on the atlas intensities as they are, without matching each organ's "
                            "intensities to this case")
    group.add_argument("--no-largest-component", action="store_true",
                       help="keep every piece of each organ instead of the largest one")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to compute; auto uses a CUDA GPU when there is one (default %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="random seed; the same seed repeats a run (default 0)")


def refine_settings_from(args: argparse.Namespace):
    from .refinement import RefineSettings

    settings = RefineSettings(steps=args.steps, rounds=args.rounds, update_every=args.update_every,
                              momentum=args.momentum, moving_average=not args.no_moving_average,
                              learning_rate=args.learning_rate, loss=args.loss,
                              match_intensity=not args.no_intensity_matching)
    settings.alignment.mode = args.align_mode
    settings.alignment.iterations = args.align_iterations
    if not 0 <= settings.momentum < 1:
        raise SystemExit("--momentum must be at least 0 and below 1")
    if settings.steps < 1 or settings.update_every < 1:
        raise SystemExit("--steps and --update-every must be positive")
    return settings


def run_refine_with_fallback(args, settings, events: EventWriter, output_dir):
    """Run the pipeline; on GPU out-of-memory retry with lighter settings, then on the CPU.

    Each retry starts over (snapshot numbering continues), after a `warning` event that says why.
    """
    import torch

    from .pipeline import Run, resolve_device

    device = resolve_device(args.device)
    attempts = [(device, None)]
    if device.type == "cuda":
        attempts += [(device, "lighter settings"), (torch.device("cpu"), "the CPU")]
    snapshots_published = 0
    for attempt_device, fallback in attempts:
        if fallback:
            settings.alignment.batch_size = 1
            settings.step.batch_size = 1
            events.emit("warning", message=f"Out of GPU memory: starting again with {fallback}.")
        run = Run(args.input, args.model, output_dir, settings, events, attempt_device, args.seed,
                  largest_component=not args.no_largest_component)
        run.snapshot_index = snapshots_published
        run.cancel.install_signal_handlers()
        try:
            return run.execute()
        except torch.cuda.OutOfMemoryError:
            snapshots_published = run.snapshot_index
            del run
            torch.cuda.empty_cache()
        except MemoryError:
            break
    raise OutOfMemoryError(
        "Out of memory, also with the lightest settings. Close other programs, crop the CT to the region of "
        "interest, or use a machine with more memory."
    )


def command_refine(args) -> int:
    events = EventWriter(mode=args.progress)
    settings = refine_settings_from(args)
    result = run_refine_with_fallback(args, settings, events, args.output)
    return EXIT_CANCELLED if result["partial"] else EXIT_DONE


def command_devices(args) -> int:
    import torch

    events = EventWriter(mode="json")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        events.emit("devices", cuda=True, name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1))
    else:
        events.emit("devices", cuda=False, name="CPU", memory_gib=None)
    return EXIT_DONE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isseg", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"isseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    refine = commands.add_parser(
        "refine", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
        help="inference-specific segmentation of one CT volume",
        description="Segment one CT with a model package, then improve the result for this very case: the "
                    "package's training cases are aligned to the CT, the network is fine-tuned on them, and the "
                    "mask is the moving average of its predictions. Snapshots of the mask appear in the output "
                    "folder while it works; labelmap.nrrd is the result, report.json says how it went.")
    refine.add_argument("--input", required=True, help="CT volume (.nii, .nii.gz, .nrrd, .mha) or a folder with one DICOM series")
    refine.add_argument("--model", required=True, help="model package folder or .zip, or 'demo' for the built-in demo model")
    refine.add_argument("--output", required=True, help="output folder (created if needed)")
    refine.add_argument("--progress", choices=("auto", "json", "bar"), default="auto",
                        help="JSON lines (for programs) or a progress bar; auto picks the bar in a terminal")
    add_refine_options(refine)
    refine.set_defaults(handler=command_refine)

    devices = commands.add_parser("devices", help="print the device a run would use, as one JSON line")
    devices.set_defaults(handler=command_devices)

    for register in _subcommand_registrars():
        register(commands)
    return parser


def _subcommand_registrars():
    from . import demo, evaluate, package_command, train

    return (train.register, package_command.register, demo.register, evaluate.register)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except IssegError as error:
        EventWriter(mode=getattr(args, "progress", "json")).emit("error", kind=error.kind, message=str(error))
        log.error(str(error))
        return error.exit_code
    except Exception as error:  # a bug: say so plainly, keep the traceback for the report
        traceback.print_exc(file=sys.stderr)
        EventWriter(mode=getattr(args, "progress", "json")).emit(
            "error", kind="internal",
            message=f"Internal error: {type(error).__name__}: {error}. Please report it with the log (stderr).")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
