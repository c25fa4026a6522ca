"""The Python packages the worker needs in Slicer's Python, checked without importing them.

Checking uses importlib.util.find_spec, so torch is never loaded into the Slicer process. torch is
installed through the PyTorch extension (which picks the build matching the GPU driver) when it is there;
the other packages with pip, with version ranges the engine is tested with (pyproject.toml).
"""

import importlib
import importlib.util

TORCH = "torch"
TORCH_VERSION_REQUIREMENT = ">=2.1,<2.15"

# import name -> pip requirement
PIP_REQUIREMENTS = {
    "monai": "monai>=1.3,<1.7",
    "SimpleITK": "SimpleITK>=2.3,<2.6",
    "safetensors": "safetensors>=0.4,<0.9",
    "scipy": "scipy>=1.10,<1.19",
}


def missingPackages() -> list:
    """Import names of the required packages that are not installed (torch first)."""
    importlib.invalidate_caches()  # see packages installed since the last check
    return [name for name in (TORCH, *PIP_REQUIREMENTS) if importlib.util.find_spec(name) is None]


def pipRequirements(missing: list) -> list:
    """pip requirement strings for the missing packages other than torch."""
    return [PIP_REQUIREMENTS[name] for name in missing if name in PIP_REQUIREMENTS]
