"""The `isseg` command: refine (the worker), train, package, demo, evaluate, devices.

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
import logging
import sys
import traceback

from . import __version__
from .commands import COMMANDS
from .commands.options import events_for
from .errors import IssegError
from .protocol import EVENT_ERROR, EXIT_INTERNAL

log = logging.getLogger("isseg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isseg", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"isseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except IssegError as error:
        events_for(args).emit(EVENT_ERROR, kind=error.kind, message=str(error))
        log.error(str(error))
        return error.exit_code
    except Exception as error:  # a bug: say so plainly, keep the traceback for the report
        traceback.print_exc(file=sys.stderr)
        events_for(args).emit(EVENT_ERROR, kind="internal",
                              message=f"Internal error: {type(error).__name__}: {error}. "
                                      "Please report it with the log (stderr).")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
