"""`isseg devices`: the device a run would use, as one JSON line."""

from __future__ import annotations

from ..device import device_summary
from ..protocol import EXIT_DONE
from ..events import EventWriter
from ..protocol import EVENT_DEVICES


def register(commands) -> None:
    parser = commands.add_parser("devices", help="print the device a run would use, as one JSON line")
    parser.set_defaults(handler=run)


def run(args) -> int:
    EventWriter(mode="json").emit(EVENT_DEVICES, **device_summary())
    return EXIT_DONE
