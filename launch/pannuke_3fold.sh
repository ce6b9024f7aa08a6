#!/usr/bin/env bash
# The PanNuke 3-fold protocol of the paper: train on one fold, validate on the next, test on the third, for the
# three rotations; then one table of mean ± std over the folds.
#
#   launch/pannuke_3fold.sh /data/pannuke [workdirs/pannuke] [extra --config.* overrides...]
#
# /data/pannuke holds the unzipped official folds ("Fold 1/images/fold1/images.npy", ...).
set -euo pipefail
MANUAL_DIR=${1:?usage: $0 PANNUKE_DIR [WORKDIR_ROOT] [--config.overrides...]}
ROOT=${2:-workdirs/pannuke}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PYTHON:-python}
for rotation in "1 2 3" "2 3 1" "3 1 2"; do
  set -- $rotation "$@"
  train=$1 val=$2 test=$3; shift 3
  W="$ROOT/train${train}_val${val}"
  $PY -m dualunet_jax.train --config=configs/pannuke.py --workdir="$W" \
    --config.dataset.manual_dir="$MANUAL_DIR" --config.dataset.train_split="fold$train" \
    --config.dataset.val_split="fold$val" --config.dataset.test_split="fold$test" "$@"
  $PY -m dualunet_jax.eval --config=configs/pannuke.py --workdir="$W" --split="fold$test" \
    --config.dataset.manual_dir="$MANUAL_DIR" "$@"
done
$PY launch/aggregate_folds.py "$ROOT"/train*_val*/eval/fold*.json | tee "$ROOT/summary.txt"
