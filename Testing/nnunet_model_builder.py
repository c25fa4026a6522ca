"""Build a small nnU-Net v2 trained-model folder with nnU-Net's own code (run as a script: nnU-Net's
planner uses worker processes, so it needs a __main__ guard and its own environment).

    python nnunet_model_builder.py WORK_FOLDER [--features 4 8 16 32] [--size X Y Z] [--spacing MM]

WORK_FOLDER/raw/Dataset001_Phantom: two isseg phantoms in nnU-Net's raw layout; nnU-Net extracts the
fingerprint, plans (ExperimentPlanner) and preprocesses 3d_fullres; the plans' features per stage may be
shrunk (--features) so that tests run fast; an nnUNetTrainer is initialized (its own network, He
initialisation, deep supervision) and writes its checkpoint and plans as training does:
WORK_FOLDER/results/Dataset001_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres/{plans.json,
dataset.json, fold_all/checkpoint_final.pth}. Prints that folder as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import SimpleITK as sitk

DATASET = "Dataset001_Phantom"


def write_raw_dataset(raw: Path, size, spacing: float) -> None:
    from isseg import phantom

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    for seed in (0, 1):
        case = phantom.generate(phantom.training_spec(seed, size=tuple(size), spacing=(spacing,) * 3))
        sitk.WriteImage(sitk.Cast(case.image, sitk.sitkInt16), str(folder / "imagesTr" / f"phantom_{seed}_0000.nii.gz"))
        sitk.WriteImage(case.labels, str(folder / "labelsTr" / f"phantom_{seed}.nii.gz"))
    labels = {"background": 0, **{label["name"]: label["value"] for label in phantom.LABELS}}
    description = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz",
                   "licence": "CC0 (generated phantoms)"}
    (folder / "dataset.json").write_text(json.dumps(description, indent=4), encoding="utf-8")


def plan_and_preprocess(preprocessed: Path, features) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    extract_fingerprints([1], num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiments([1])
    plans_path = preprocessed / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text(encoding="utf-8"))
    if features:
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [int(f) for f in features][: arch["n_stages"]]
        arch["features_per_stage"] += [arch["features_per_stage"][-1]] * (arch["n_stages"] - len(arch["features_per_stage"]))
        plans_path.write_text(json.dumps(plans, indent=4), encoding="utf-8")
    preprocess([1], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
    return plans


def save_initialized_trainer(preprocessed: Path, plans: dict) -> Path:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dataset_json = json.loads((preprocessed / DATASET / "dataset.json").read_text(encoding="utf-8"))
    trainer = nnUNetTrainer(dict(plans, continue_training=False), "3d_fullres", "all", dataset_json,
                            device=torch.device("cpu"))
    # Seeded He initialisation: unseeded, a session's random network sometimes finds no organ before or
    # after a short refine, and the tests that compare the two then failed by chance.
    torch.manual_seed(0)
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the mirroring axes it saves
    base = Path(trainer.output_folder_base)
    # What nnUNetTrainer.on_train_start writes next to the folds.
    (base / "plans.json").write_text(json.dumps(plans, indent=4), encoding="utf-8")
    shutil.copy(preprocessed / DATASET / "dataset.json", base / "dataset.json")
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    return base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--features", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--size", type=int, nargs=3, default=[48, 48, 32])
    parser.add_argument("--spacing", type=float, default=8.0)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                      nnUNet_results=str(work / "results"))
    write_raw_dataset(work / "raw", args.size, args.spacing)
    plans = plan_and_preprocess(work / "preprocessed", args.features)
    folder = save_initialized_trainer(work / "preprocessed", plans)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
