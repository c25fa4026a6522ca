"""The `isseg` command: refine (the worker), train, package, demo, evaluate, devices, phantom.

    isseg refine --input CT --model PACKAGE --output DIR     inference-specific segmentation of one CT
    isseg train  --dataset MSD_FOLDER --output PACKAGE       build a model package from labelled cases
    isseg package --network NET --atlas CASES --output PKG   a package from an nnU-Net model or MONAI bundle
    isseg demo   --output DIR                                the method on a built-in phantom, with a report
    isseg evaluate --cases MSD_FOLDER --model PACKAGE ...    per-case, per-organ comparison of methods
    isseg devices                                            which device a run would use
    isseg phantom --output DIR                               the demo's generated CT and its true organs

Progress goes to stdout as JSON lines (the worker protocol, docs/worker-protocol.md) or, in a
terminal, as a progress bar. Exit codes are listed in `isseg refine --help`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback

_signals_while_importing: list[int] = []


def _remember_signal(signal_number, frame):
    _signals_while_importing.append(signal_number)


# The commands import torch (seconds): in the worker (`python -m isseg.cli`) a SIGTERM/SIGINT meanwhile
# is remembered and ends the command in main() with a `cancelled` event, instead of killing the worker
# without a word. Importing this module elsewhere leaves the handlers alone.
if __name__ == "__main__":
    for _signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal_number, _remember_signal)

from . import __version__, validation  # noqa: E402
from .commands import COMMANDS  # noqa: E402
from .commands.options import events_for  # noqa: E402
from .errors import Cancelled, IssegError  # noqa: E402
from .protocol import EVENT_CANCELLED, EVENT_ERROR, EXIT_CANCELLED, EXIT_INTERNAL  # noqa: E402

log = logging.getLogger("isseg")


def build_parser() -> argparse.ArgumentParser:
    parser = validation.WorkerArgumentParser(prog="isseg", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"isseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def _cancel_before_start(signal_number, frame):
    raise Cancelled()


def main(argv=None) -> int:
    # Until a run installs its own (cooperative) handlers, SIGTERM/SIGINT end the command at once, with an event.
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, _cancel_before_start)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    args = None
    try:
        if _signals_while_importing:
            raise Cancelled()
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except Cancelled:
        events_for(args).emit(
            EVENT_CANCELLED, partial=True, message="Cancelled before the run started; no result was written.")
        return EXIT_CANCELLED
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
