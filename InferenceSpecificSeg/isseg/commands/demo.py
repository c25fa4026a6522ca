"""`isseg demo`: inference-specific learning on a built-in phantom, with a report (isseg.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import demo, protocol
from ..device import resolve_device
from ..protocol import EXIT_CANCELLED, EXIT_DONE
from .options import add_progress_option, add_refine_options, events_for, refine_settings_from, resolve_model


def register(commands) -> None:
    parser = commands.add_parser(
        "demo", help="try the method on a built-in phantom and get a report (about 2 minutes on a CPU)",
        description=demo.__doc__.split("\n\n")[1], epilog=demo.__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="isseg-demo", help="output folder (default %(default)s)")
    add_progress_option(parser)
    add_refine_options(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    report = demo.run_demo(Path(args.output), resolve_model(protocol.DEMO_MODEL), refine_settings_from(args),
                           events_for(args), resolve_device(args.device), args.seed, not args.no_largest_component)
    return EXIT_CANCELLED if report["partial"] else EXIT_DONE
