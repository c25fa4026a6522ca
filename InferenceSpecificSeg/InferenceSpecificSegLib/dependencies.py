"""The Python packages the worker needs in Slicer's Python, checked by installed version without importing them.

Versions are read with importlib.metadata and compared with `packaging` specifiers (the ranges in
pyproject.toml; Testing/test_slicer_library.py checks that they agree), so torch is never loaded into the
Slicer process by the check. torch is installed only through the PyTorch extension (it picks the build that
matches the GPU driver); SimpleITK, numpy and scipy ship with Slicer and are never pip-installed (Slicer's
SimpleITK has its own IO); the rest is pip-installed.
"""

import importlib.metadata
from typing import Optional

from packaging.requirements import Requirement

TORCH = "torch"
TORCH_VERSION_REQUIREMENT = ">=2.1,<2.15"
SHIPPED_WITH_SLICER = ("SimpleITK", "numpy", "scipy")

# distribution name -> requirement, as in pyproject.toml
REQUIREMENTS = {
    TORCH: "torch" + TORCH_VERSION_REQUIREMENT,
    "monai": "monai>=1.3,<1.7",
    "safetensors": "safetensors>=0.4,<0.9",
    "SimpleITK": "SimpleITK>=2.3,<2.6",
    "numpy": "numpy>=1.24,<2.6",
    "scipy": "scipy>=1.10,<1.19",
}


def installedVersion(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmetRequirements() -> dict:
    """{name: what is wrong ("not installed" or "version X installed")} for each requirement not met, torch first."""
    unmet = {}
    for name, requirement in REQUIREMENTS.items():
        version = installedVersion(name)
        if version is None:
            unmet[name] = "not installed"
        elif not Requirement(requirement).specifier.contains(version, prereleases=True):
            unmet[name] = f"version {version} installed"
    return unmet


def missingPackages() -> list:
    """Names of the requirements that are not met (missing or outside the tested version range)."""
    return list(unmetRequirements())


def pipRequirements(unmet: list) -> list:
    """pip requirement strings for the unmet packages that may be pip-installed (not torch, not what Slicer ships)."""
    return [REQUIREMENTS[name] for name in unmet if name != TORCH and name not in SHIPPED_WITH_SLICER]
