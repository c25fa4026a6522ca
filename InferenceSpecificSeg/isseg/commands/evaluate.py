"""`isseg evaluate`: inference-specific learning against its baselines, per case and organ (isseg.evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluate
from ..device import resolve_device
from ..protocol import EXIT_DONE
from ..evaluate import VARIANTS, Evaluation, evaluate_dataset
from .options import add_progress_option, add_refine_options, events_for, refine_settings_from, resolve_model


def register(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="compare inference-specific learning with its baselines on labelled cases",
        description=evaluate.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, help="folder with dataset.json and the images and labels it lists")
    parser.add_argument("--model", required=True, help="model package folder or .zip, or 'demo'")
    parser.add_argument("--output", required=True, help="output folder (created if needed)")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help=f"inference-specific learning variants to run: {', '.join(VARIANTS)} (default: all). "
                             "Each sets the alignment mode, moving average and loss itself, so --align-mode, "
                             "--no-moving-average and --loss do not apply here")
    earlier = parser.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true",
                         help="finish an earlier evaluation in --output (same options): complete cases are read "
                              "back, the others run again")
    earlier.add_argument("--overwrite", action="store_true",
                         help="start over in an --output that holds an earlier evaluation")
    add_progress_option(parser)
    add_refine_options(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    evaluation = Evaluation(model=resolve_model(args.model),
                            variants=tuple(VARIANTS[name] for name in dict.fromkeys(args.variants)),
                            base=refine_settings_from(args), device=resolve_device(args.device), seed=args.seed,
                            largest_component=not args.no_largest_component)
    evaluate_dataset(Path(args.cases), evaluation, Path(args.output), events_for(args), resume=args.resume,
                     overwrite=args.overwrite)
    return EXIT_DONE
