"""What the worker and the Slicer logic share: the worker protocol's constants (docs/worker-protocol.md).

This module is imported by both sides, so it imports nothing but the standard library: the Slicer
module reads it without loading torch. Every value here is part of the contract; change it only
together with docs/worker-protocol.md.
"""

import json
from pathlib import Path

WORKER_MODULE = "isseg.cli"

# Exit codes of every `isseg` command.
EXIT_DONE = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_BAD_MODEL = 4
EXIT_OUT_OF_MEMORY = 5
EXIT_CANCELLED = 6
EXIT_DISK = 7

# Events, one JSON object per stdout line; readers ignore events and fields they do not know.
EVENT_STAGE = "stage"
EVENT_PROGRESS = "progress"
EVENT_SNAPSHOT = "snapshot"
EVENT_WARNING = "warning"
EVENT_DONE = "done"
EVENT_CANCELLED = "cancelled"
EVENT_ERROR = "error"
EVENT_DEVICES = "devices"
EVENT_ORGAN_CHANGES = "organ_changes"  # before done/cancelled: per organ, initial against refined (changes.py)

STAGE_INITIAL = "initial"
STAGE_ALIGN = "align"
STAGE_REFINE = "refine"
STAGE_FINALIZE = "finalize"

# Files of a run's output folder.
CANCEL_FILE = "cancel"
SEGMENTS_FILE = "segments.json"
SETTINGS_FILE = "settings.json"
REPORT_FILE = "report.json"
LABELMAP_FILE = "labelmap.nrrd"
PROBABILITIES_FILE = "probabilities.nrrd"
SNAPSHOT_PATTERN = "snapshot_{index:04d}.nrrd"
UNCERTAINTY_FILE = "uncertainty.nrrd"
LOCK_FILE = ".isseg-run.lock"  # held by the run that owns the folder (advisory lock)
# Every file a run writes into its output folder, and the temporary names they are written under
# (".<stem>.XXXX"): what `--overwrite` removes and what makes a folder "hold an earlier run".
# A new result file must be added here.
RESULT_FILES = (REPORT_FILE, LABELMAP_FILE, PROBABILITIES_FILE, SEGMENTS_FILE, SETTINGS_FILE, UNCERTAINTY_FILE)
RUN_FILE_PATTERNS = (*RESULT_FILES, *(f".{name.split('.')[0]}.*" for name in RESULT_FILES),
                     "snapshot_[0-9]*.nrrd", ".snapshot_[0-9]*")



def result_is_complete(folder) -> bool:
    """The completeness rule (docs/worker-protocol.md): a run's result in `folder` is complete only when
    its report.json, written last, exists and says `"partial": false`."""
    try:
        report = json.loads((Path(folder) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("partial") is False


# Files of a model package.
DEMO_MODEL = "demo"
MODEL_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
ATLAS_MANIFEST = "atlas/manifest.json"

# Option values of `isseg refine` and their defaults.
DEVICES = ("auto", "cpu", "cuda")
ALIGN_MODES = ("mask", "intensity", "both")
LOSS_NAMES = ("dicece", "region_tversky")
DEFAULT_DEVICE = "auto"
# 80 steps at twice the learning rate (refinement.RefineSettings) give the Dice of 160 on the 10 shifted
# phantoms (0.835 against 0.836, Wilcoxon p = 0.49; BENCHMARKS.md section 8) in half the fine-tuning time.
DEFAULT_STEPS = 80
DEFAULT_ROUNDS = 2
DEFAULT_UPDATE_EVERY = 10
DEFAULT_MOMENTUM = 0.8
DEFAULT_ALIGN_MODE = "mask"
DEFAULT_LOSS = "dicece"
# Early stopping: the run ends at the first moving-average update that changes the labels of less than
# this fraction of the mask's voxels (0: never; refinement.label_change).
OPTION_STOP_WHEN_CONVERGED = "--stop-when-converged"
# Measured on the 10 shifted phantoms (BENCHMARKS.md section 8): stopping at the first update that relabels
# under 1 % of the mask costs at most 0.002 Dice; larger thresholds stop inside round 2 while it still gains.
DEFAULT_STOP_WHEN_CONVERGED = 0.01

# Refining from the user's edits (`isseg refine --initial-mask LABELMAP --edited-region LABELMAP`, both on
# the input grid): the edited mask holds label values of the model, the region 1 where the user changed
# a voxel (trusted and kept) and 0 elsewhere.
OPTION_INITIAL_MASK = "--initial-mask"
OPTION_EDITED_REGION = "--edited-region"
EDITED_VALUE = 1

# The uncertainty map (uncertainty.nrrd, float32 in [0, 1] on the input grid) and its per-organ summary.
UNCERTAINTY_MEASURES = ("entropy", "disagreement")
DEFAULT_UNCERTAINTY = "entropy"  # higher error-detection AUC on phantoms (BENCHMARKS.md, section "Refine from edits")
UNCERTAIN_LEVEL = 0.25  # a voxel at or above this is counted as uncertain in the per-organ share
