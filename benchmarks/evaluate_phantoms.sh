#!/usr/bin/env bash
# Inference-specific learning against its baselines on shifted phantoms (the phantom table of BENCHMARKS.md).
#
#   benchmarks/evaluate_phantoms.sh [--work DIR] [--cases N] [--device auto|cpu|cuda] [--model PACKAGE]
#                                   [isseg evaluate options...]
#
# Generates N phantoms (default 12) with isseg.phantom.shifted_spec, seeds 2000, 2001, ... (late
# arterial phase, more noise and anatomical variation, shifted field of view: unlike the demo model's
# portal-venous training phantoms, seeds 1000-1009), as an MSD folder DIR/cases, then runs
# `isseg evaluate` with the built-in demo model (or the package of --model, e.g. the real-anatomy model of
# scripts/train_realct_model.py) and every variant into DIR/evaluation
# (summary.md, metrics.csv, dice_boxplot.png, settings.json). DIR defaults to
# /tmp/isseg-phantom-benchmark, outside the repository. Other options go to `isseg evaluate`
# (e.g. --steps 80 --seed 1). Every case and the refinement are seeded: a rerun repeats the numbers.
# A second run into the same DIR needs --resume (finish an interrupted one: finished cases are read
# back) or --overwrite (start over).
#
# Time: about 6 minutes per case on a 2-core CPU (4 variants of about 80 s, plus the registration
# baseline), so about 75 minutes for 12 cases; a few minutes in all on a GPU (--device cuda).
set -euo pipefail

work=/tmp/isseg-phantom-benchmark
cases=12
device=auto
model=demo
while [[ $# -gt 0 ]]; do
    case "$1" in
        --work) work=$2; shift 2 ;;
        --cases) cases=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        *) break ;;
    esac
done

rm -rf "$work/cases"
python - "$work/cases" "$cases" <<'EOF'
import sys

from isseg import phantom

folder, count = sys.argv[1], int(sys.argv[2])
phantom.write_msd_dataset(folder, [phantom.shifted_spec(seed) for seed in range(2000, 2000 + count)],
                          name="shifted phantoms")
EOF

python -m isseg.cli evaluate --cases "$work/cases" --model "$model" --output "$work/evaluation" \
    --device "$device" "$@"
echo "Results: $work/evaluation/summary.md"
