"""Train the built-in demo model on procedural phantoms and write it to InferenceSpecificSeg/isseg/demo_model/.

    python scripts/train_demo_model.py [--steps 1500] [--device auto]

Seeded: the phantoms, the split and the training all follow from --seed. The training phantoms
follow `isseg.phantom.training_spec` (portal venous phase, typical anatomy); the demo case and the
benchmarks use `shifted_spec`, a distribution the model has not seen. Only model.json and the
weights are kept: the atlas is regenerated from the recorded seeds (isseg.demo_model).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from isseg import phantom
from isseg.events import EventWriter
from isseg.model_training import TrainSettings, train_package

TARGET = Path(__file__).resolve().parents[1] / "InferenceSpecificSeg" / "isseg" / "demo_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10, help="phantoms: the validation split takes 20%%, the rest become the atlas")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    seeds = list(range(1000, 1000 + args.cases))
    with tempfile.TemporaryDirectory() as work:
        dataset, package = Path(work) / "dataset", Path(work) / "package"
        phantom.write_msd_dataset(dataset, [phantom.training_spec(seed) for seed in seeds])
        settings = TrainSettings(steps=args.steps, seed=args.seed)
        train_package(dataset, package, settings, EventWriter(mode="bar"), args.device, name="Abdominal phantom demo",
                      description="Small UNet trained on procedural abdominal CT phantoms (portal venous phase). "
                                  "For trying InferenceSpecificSeg only: not for clinical use.")
        config = json.loads((package / "model.json").read_text(encoding="utf-8"))
        train_ids = config["training"]["train_cases"]
        config["demo_atlas"] = {"generator": "isseg.phantom.training_spec", "seeds": [int(i.split("_")[1]) for i in train_ids]}
        config.pop("atlas", None)
        config["license"] = "Apache-2.0"
        TARGET.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / "model.safetensors", TARGET / "model.safetensors")
        (TARGET / "model.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    print(f"\nDemo model written to {TARGET}")


if __name__ == "__main__":
    main()
