"""InferenceSpecificSeg engine: inference-specific learning for CT segmentation (no Slicer, no Qt)."""

__version__ = "0.1.0"
