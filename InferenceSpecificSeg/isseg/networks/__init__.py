"""Network kinds of a model package: how each kind of network is built, fed and read.

A package's model.json `network` entry names its kind:
- "monai" (no "kind" entry: packages written by `isseg train`): a MONAI network, the model grid of
  isseg.preprocess (spacing, orientation, intensity window) and MONAI sliding-window inference;
- "nnunet_v2": an nnU-Net v2 network with its plans (isseg.networks.nnunet);
- "monai_bundle": a MONAI bundle network with its inference preprocessing (isseg.networks.bundle).

Every kind gives the pipeline the same five things (NetworkKind): the network with its weights, the
case on the model grid, normalisation of atlas images, probabilities of the case, and the way back to
the user's grid, so that the initial segmentation is exactly the network's own predictor's.
"""

from __future__ import annotations

from ..errors import BadModelError
from .base import (EXTRAS, KIND_BUNDLE, KIND_MONAI, KIND_NNUNET, KINDS, NetworkKind, OutputClasses,  # noqa: F401
                   PreparedCase, predict_probabilities, require_extra)


def kind_for(config: dict) -> NetworkKind:
    """The NetworkKind of a parsed model.json; BadModelError for an unknown kind."""
    kind = config["network"].get("kind", KIND_MONAI)
    if kind == KIND_MONAI:
        from .monai_net import MonaiNetwork  # the kinds load their libraries on use

        return MonaiNetwork(config)
    if kind == KIND_NNUNET:
        from .nnunet import NnUNetNetwork

        return NnUNetNetwork(config)
    if kind == KIND_BUNDLE:
        from .bundle import BundleNetwork

        return BundleNetwork(config)
    raise BadModelError(f"model.json names the network kind '{kind}', which this version does not know "
                        f"(known: {', '.join(KINDS)}). Update InferenceSpecificSeg or rebuild the package.")
