"""The built-in demo model: a small UNet trained on the project's phantoms (scripts/train_demo_model.py).

Only model.json and the weights are shipped (isseg/demo_model/). Its atlas, the phantom cases it was
trained on, is regenerated from their seeds on first use into the cache folder, so the package on
disk is complete and checksummed like any other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from . import model_package, phantom
from .protocol import ATLAS_MANIFEST, MODEL_FILE, WEIGHTS_FILE

SHIPPED = Path(__file__).parent / "demo_model"


def shipped_config() -> dict:
    """The demo model's model.json as shipped (labels, network, `demo_atlas` seeds)."""
    return json.loads((SHIPPED / MODEL_FILE).read_text(encoding="utf-8"))


def demo_atlas_cases(config: dict) -> list[tuple]:
    """(case id, image, labels) of the demo atlas, regenerated from the seeds recorded in model.json."""
    cases = []
    for seed in config["demo_atlas"]["seeds"]:
        case = phantom.generate(phantom.training_spec(seed))
        cases.append((f"phantom_{seed:03d}", case.image, case.labels))
    return cases


def demo_package_path() -> Path:
    """Folder of the complete demo package in the cache, created on first use."""
    config = shipped_config()
    target = model_package.cache_dir() / f"demo-model-{config['version']}-{model_package.sha256(SHIPPED / WEIGHTS_FILE)[:12]}"
    if (target / ATLAS_MANIFEST).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        model_package.copy_without_atlas(SHIPPED, staging)
        model_package.write_atlas(staging / "atlas", demo_atlas_cases(config))
        if not target.exists():
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
