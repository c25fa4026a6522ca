"""`isseg refine`: inference-specific segmentation of one CT volume (the worker the Slicer module runs)."""

from __future__ import annotations

import argparse

from ..device import resolve_device
from ..pipeline import CancelToken, refine_with_fallback
from ..protocol import (EXIT_BAD_INPUT, EXIT_BAD_MODEL, EXIT_CANCELLED, EXIT_DISK, EXIT_DONE, EXIT_INTERNAL,
                        EXIT_OUT_OF_MEMORY, EXIT_USAGE)
from .. import validation
from .options import (add_edit_options, add_progress_option, add_refine_options, edit_options_from, events_for,
                      refine_settings_from, resolve_model)

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_DONE}  done
  {EXIT_INTERNAL}  internal error (please report it, with the log printed on stderr)
  {EXIT_USAGE}  wrong command-line arguments
  {EXIT_BAD_INPUT}  bad input image (unreadable, not 3D, empty, not CT)
  {EXIT_BAD_MODEL}  bad model package (missing, corrupt, labels or weights inconsistent)
  {EXIT_OUT_OF_MEMORY}  out of memory, also after falling back to lighter settings and the CPU
  {EXIT_CANCELLED}  cancelled by SIGTERM/SIGINT or a 'cancel' file; the partial result is written
  {EXIT_DISK}  output folder not writable, disk full, in use by another run, or holding an earlier run (see --overwrite)
"""


def register(commands) -> None:
    parser = commands.add_parser(
        "refine", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
        help="inference-specific segmentation of one CT volume",
        description="Segment one CT with a model package, then improve the result for this very case: the "
                    "package's training cases are aligned to the CT, the network is fine-tuned on them, and the "
                    "mask is the moving average of its predictions. Snapshots of the mask appear in the output "
                    "folder while it works; labelmap.nrrd is the result, report.json says how it went.")
    parser.add_argument("--input", required=True, type=validation.user_path,
                        help="CT volume (.nii, .nii.gz, .nrrd, .mha) or a folder with one DICOM series")
    parser.add_argument("--model", required=True, type=validation.model_reference,
                        help="model package folder or .zip, or 'demo' for the built-in demo model")
    parser.add_argument("--output", required=True, type=validation.user_path,
                        help="output folder (created if needed; one run at a time: it is locked while a run writes)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the results of an earlier run in the output folder first (without it such a "
                             f"folder is refused, exit {EXIT_DISK})")
    parser.add_argument("--allow-slice-gaps", action="store_true",
                        help="read a DICOM series with missing slices, interpolating them (without it such a series "
                             "is refused, naming the missing position)")
    add_progress_option(parser)
    add_refine_options(parser)
    add_edit_options(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    events = events_for(args)
    settings = refine_settings_from(args)
    edit_options = edit_options_from(args)
    cancel = CancelToken(args.output)
    cancel.install_signal_handlers()
    result = refine_with_fallback(args.input, resolve_model(args.model), args.output, settings, events,
                                  resolve_device(args.device), args.seed, not args.no_largest_component, cancel,
                                  overwrite=args.overwrite, allow_slice_gaps=args.allow_slice_gaps, **edit_options)
    return EXIT_CANCELLED if result.partial else EXIT_DONE
