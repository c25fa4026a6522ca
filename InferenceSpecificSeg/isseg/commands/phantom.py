"""`isseg phantom`: the demo's generated abdominal CT and its true organs, as files, for trying the demo model
where it works (the Slicer panel's "Load demo phantom" runs it).

Writes into --output: ct.nrrd (int16 HU), truth.nrrd (uint8 labels) and segments.json (the demo model's
label values, names, colors and terminology, in the worker protocol's format), then a `done` event with
the three absolute paths. The case is the one `isseg demo --seed N` refines (isseg.phantom.shifted_spec).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import demo_model, phantom, validation
from ..errors import DiskError
from ..io import write_text_atomic
from ..pipeline import segments_record
from ..protocol import EVENT_DONE, EVENT_STAGE, EXIT_DONE, SEGMENTS_FILE
from .options import add_progress_option, events_for


def register(commands) -> None:
    parser = commands.add_parser("phantom", help="write the demo's generated abdominal CT and its true organs",
                                 description=__doc__.split("\n\n")[1])
    parser.add_argument("--output", required=True, help="folder for ct.nrrd, truth.nrrd and segments.json")
    parser.add_argument("--seed", type=validation.non_negative_int, default=0,
                        help="which phantom; the same seed as `isseg demo --seed` gives the same case (default 0)")
    add_progress_option(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    events, output = events_for(args), Path(args.output).resolve()
    events.emit(EVENT_STAGE, stage="generate", seed=args.seed)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiskError(f"Cannot create the output folder '{output}' ({error.strerror}). Choose another --output.") from None
    ct_path, truth_path = phantom.write_case(phantom.generate(phantom.shifted_spec(args.seed)), output)
    labels = demo_model.shipped_config()["labels"]
    segments_path = write_text_atomic(json.dumps(segments_record(labels), indent=1), output / SEGMENTS_FILE)
    events.emit(EVENT_DONE, ct=str(ct_path), truth=str(truth_path), segments=str(segments_path))
    return EXIT_DONE
