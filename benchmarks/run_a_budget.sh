#!/usr/bin/env bash
# Every method at the README's run-A budget on real CoNSeP, one after the other, then their Test scores.
#
#   bash benchmarks/run_a_budget.sh [NAME ...]      # all runs, or the named ones (e.g. hovernet_fast_w25)
#
# Run A's recipe for every method: random init, one training phase, width 1/4 (dense convolutions:
# cardinality 1), global batch 8 of random crops (256², 270² for the 270-in models), 1000 steps
# (20 epochs x 50), Adam 2e-3 with coupled L2 1e-4, x0.1 at epochs 14 and 18, run A's augmentation (dihedral
# views and the 'paper' HED jitter, no colour jitter, no blur), validation on CoNSeP Test after epoch 1 and at
# the end (best F1d). What stays each method's own: architecture, targets, losses, post-processing (and
# HistoNeXt's type-aware sampling, CoNIC's dropout). A checkpoint every epoch; the script can be stopped at
# any point (SIGTERM saves the current step) and run again: finished runs are skipped, the others resume.
# Each run: train, `eval --split=test`, `eval --robustness=paper`. Ensembles (maps averaged, post-processed once):
# the CoNIC framework's two encoders (SE-ResNeXt-50 + 101, the paper's pair), and before it, as soon as CoNIC-50
# exists, CoNIC-50 + HoVer-Net fast (two encoders, two compatible HoVer-family methods; no extra training).
# Needs `.data/CoNSeP` (python ../shared/data/consep/assemble_consep.py --out .data/CoNSeP). Logs: W/*.log.
# Run A itself (workdirs/consep_w25) is the first run, and the end prints the side-by-side table
# (`python -m dualunet_jax.compare`).
# CPU time on a 2-core EPYC (train step alone, batch 8, benchmarks/train_step_throughput.py): DualU-Net 3.2 s
# (run A: 0.9 h), HistoNeXt-Tiny 6.4 s (1.8 h), HoVer-Net fast 14.9 s (4.1 h), CoNIC SE-ResNeXt-50 31.1 s (8.6 h;
# 32.2 s with its 32 groups, so run A's dense 3x3s cost nothing extra here).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATA=--config.dataset.manual_dir=.data/CoNSeP
RECIPE=(--config.model.width_multiplier=0.25 --config.model.cardinality=1
  --config.train.freeze_encoder_epochs=0 --config.train.phase1_batch_size=0
  --config.train.batch_size=8 --config.train.base_batch_size=8 --config.train.learning_rate=2e-3
  --config.train.weight_decay=1e-4 --config.train.epochs=20 --config.train.steps_per_epoch=50
  --config.train.lr_milestones='(14,18)' --config.train.lr_gamma=0.1 --config.train.eval_every_epochs=0
  --config.train.best_metric=f1_d --config.train.best_mode=max --config.train.early_stopping_patience=0
  --config.train.checkpoint_every_epochs=1
  --config.augment.preset=dualunet --config.augment.stain_preset=paper --config.augment.rot90=True
  --config.augment.color_jitter=0.0 --config.augment.blur_sigma=0.0 --config.augment.elastic_alpha=0.0
  --config.postprocess.workers=1)

wanted() {  # wanted NAME [SELECTED ...]: no selection means every step
  local name=$1; shift
  [ $# -eq 0 ] && return 0
  for selected; do [ "$selected" = "$name" ] && return 0; done
  return 1
}

run_one() {  # run_one NAME CONFIG [EXTRA FLAGS...]: train (or resume), then the two evaluations
  local name=$1 config=$2; shift 2
  local W=workdirs/$name
  mkdir -p "$W"
  if [ ! -d "$W/checkpoints/1000" ]; then
    echo "== $name: training (resumes if $W holds checkpoints)"
    "$PY" -m dualunet_jax.train --config="$config" --workdir="$W" $DATA "${RECIPE[@]}" "$@" \
      >> "$W/train.log" 2>&1 || { echo "   stopped (status $?): see $W/train.log; run again to resume"; exit 1; }
  fi
  if [ ! -f "$W/eval/test.json" ]; then
    echo "== $name: eval on CoNSeP Test"
    "$PY" -m dualunet_jax.eval --config="$config" --workdir="$W" --split=test $DATA \
      --config.postprocess.workers=1 > "$W/eval.log" 2>&1 || { echo "   eval failed: see $W/eval.log"; exit 1; }
  fi
  if [ ! -f "$W/eval/test_robustness.json" ]; then
    echo "== $name: the paper's robustness protocol (5 perturbed copies of Test)"
    "$PY" -m dualunet_jax.eval --config="$config" --workdir="$W" --split=test --robustness=paper $DATA \
      --config.postprocess.workers=1 > "$W/robustness.log" 2>&1 || { echo "   failed: see $W/robustness.log"; exit 1; }
  fi
  echo "== $name: done ($W/eval/test.json, test_robustness.json)"
}

ensemble() {  # ensemble NAME OUT_DIR FIRST OTHER: averaged maps of two finished runs on CoNSeP Test
  local name=$1 out=$2 first=$3 other=$4
  if [ -d "$first/checkpoints/1000" ] && [ -d "$other/checkpoints/1000" ] && [ ! -f "$out/test_ensemble.json" ]; then
    echo "== $name: $first + $other on CoNSeP Test"
    mkdir -p "$out"
    "$PY" -m dualunet_jax.eval --config=configs/conic.py:consep --workdir="$first" --ensemble="$other" \
      --output="$out" --split=test $DATA --config.postprocess.workers=1 > "$out/ensemble.log" 2>&1 \
      || { echo "   failed: see $out/ensemble.log"; exit 1; }
  fi
}

C50=workdirs/conic_seresnext50_w25
C101=workdirs/conic_seresnext101_w25
HOVER=workdirs/hovernet_fast_w25
# Run A itself: the recipe reproduces its config (README's command), so its finished training and Test eval are
# kept and only the paper's robustness protocol is added (the F1d-variance comparison; paper: 49 % lower).
wanted consep_w25 "$@" && run_one consep_w25 configs/consep.py
wanted hovernet_fast_w25 "$@" && run_one hovernet_fast_w25 configs/hovernet_consep.py:fast
wanted histonext_tiny_w25 "$@" && run_one histonext_tiny_w25 configs/histonext_consep.py
wanted conic_seresnext50_w25 "$@" && run_one conic_seresnext50_w25 configs/conic.py:consep
wanted conic_x_hovernet "$@" && ensemble conic_x_hovernet $C50/eval_x_hovernet $C50 $HOVER
wanted conic_seresnext101_w25 "$@" && run_one conic_seresnext101_w25 configs/conic.py:consep \
  --config.model.encoder=seresnext101_32x4d
wanted conic_ensemble "$@" && ensemble conic_ensemble $C50/eval $C50 $C101

# The table: every finished run beside run A (runs not evaluated yet are left out).
ROWS=()
for W in workdirs/consep_w25 $HOVER workdirs/histonext_tiny_w25 $C50 $C101; do
  [ -f $W/eval/test.json ] && ROWS+=("$W")
done
[ -f $C50/eval_x_hovernet/test_ensemble.json ] && ROWS+=("conic50+hovernet=$C50/eval_x_hovernet/test_ensemble.json")
[ -f $C50/eval/test_ensemble.json ] && ROWS+=("conic50+conic101=$C50/eval/test_ensemble.json")
[ ${#ROWS[@]} -gt 0 ] && "$PY" -m dualunet_jax.compare "${ROWS[@]}" --markdown
