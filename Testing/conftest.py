"""Shared fixtures of the engine tests.

Every test session gets its own empty ISSEG_CACHE (unpacked packages, the generated demo atlas),
so a run never depends on what an earlier run or the developer's ~/.cache left behind. Worker
subprocesses inherit it through the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isseg_cache(tmp_path_factory) -> Path:
    """A fresh cache folder for the whole session, exported as ISSEG_CACHE."""
    cache = tmp_path_factory.mktemp("isseg-cache")
    previous = os.environ.get("ISSEG_CACHE")
    os.environ["ISSEG_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("ISSEG_CACHE", None)
    else:
        os.environ["ISSEG_CACHE"] = previous


@pytest.fixture(scope="session")
def demo_package(isseg_cache) -> Path:
    """The complete built-in demo package (its atlas generated into the session cache once)."""
    from isseg.demo_model import demo_package_path

    return demo_package_path()



@pytest.fixture(scope="session")
def labelled_atlas(tmp_path_factory) -> Path:
    """A user's own labelled cases for `isseg package`: two small phantoms in the MSD layout, at a
    spacing no model here uses (so packaging resamples them)."""
    from isseg import phantom

    specs = [phantom.training_spec(seed, size=(40, 40, 28), spacing=(9.5, 9.5, 9.0)) for seed in (10, 11)]
    return phantom.write_msd_dataset(tmp_path_factory.mktemp("atlas"), specs)
