"""`isseg package`: a model package from a network the user already runs (an nnU-Net v2 trained-model
folder such as TotalSegmentator's, a MONAI bundle, or an isseg package) and the user's own labelled cases."""

from __future__ import annotations

from pathlib import Path

from .. import packaging
from ..protocol import EVENT_DONE, EVENT_PROGRESS, EVENT_STAGE, EVENT_WARNING, EXIT_DONE
from .options import add_progress_option, events_for


def register(commands) -> None:
    parser = commands.add_parser(
        "package", help="a model package from an nnU-Net v2 model, a MONAI bundle or a package, with your cases as atlas",
        description=packaging.__doc__.split("\n\n", 1)[1])
    parser.add_argument("--network", required=True, type=Path,
                        help="nnU-Net v2 trained-model folder (plans.json, dataset.json, fold_N/), its dataset folder "
                             "holding one trainer folder, a MONAI bundle folder (configs/, models/) or an isseg package")
    parser.add_argument("--atlas", required=True, type=Path,
                        help="labelled CT cases: MSD layout (dataset.json, imagesTr/, labelsTr/) or pairs "
                             "<case>_image.nii.gz / <case>_label.nii.gz (names in an optional labels.json)")
    parser.add_argument("--output", required=True, type=Path, help="package folder to write")
    parser.add_argument("--labels", help="atlas-to-network label mapping, 'ATLAS=NETWORK,...' (values or names) or a "
                                         "JSON file; by default labels are matched by name, else by value")
    parser.add_argument("--fold", help="nnU-Net fold to use (0-4 or 'all'; needed when several are trained)")
    parser.add_argument("--configuration", help="nnU-Net configuration (e.g. 3d_fullres) when the folder has several")
    parser.add_argument("--orientation", help="nnU-Net: orientation (e.g. RAS) of the images the network was trained "
                                              "on as nnU-Net read them; default from the plans' reader (LPS for "
                                              "SimpleITKIO); TotalSegmentator's models need RAS")
    parser.add_argument("--name", help="model name shown to users (default: the network's)")
    parser.add_argument("--license", help="licence of the network's weights, recorded in the package")
    parser.add_argument("--citation", help="how to cite the network, recorded in the package")
    add_progress_option(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    events = events_for(args)
    events.emit(EVENT_STAGE, stage="read_network")
    source = packaging.read_network(args.network, args.fold, args.configuration, args.orientation)
    events.emit(EVENT_STAGE, stage="atlas")
    summary = packaging.build_package(
        source, args.atlas, args.output, mapping_spec=args.labels, name=args.name, license=args.license,
        citation=args.citation,
        on_case=lambda index, total, case_id: events.emit(EVENT_PROGRESS, stage="atlas", step=index + 1, total=total,
                                                          loss=None, eta_s=None, case=case_id))
    if summary["unmapped_network_labels"]:
        events.emit(EVENT_WARNING, message=f"The atlas has no labels for {', '.join(summary['unmapped_network_labels'])}: "
                                       "they are not refined and count as background in this package.")
    events.emit(EVENT_DONE, package=str(args.output), **summary)
    return EXIT_DONE
