#!/usr/bin/env bash
# The GPU measurement suite (benchmarks/gpu_suite.py) on a GPU box, registry or not. In the repo root:
#
#   launch/gpu_suite.sh [--budget_s=540] [--steps=forward,predict] [--step_budgets=forward=200] [...]
#   launch/gpu_suite.sh --dry_run --out_dir=/tmp/s      # tiny sizes, any CPU
#
# 1. installs the wheels carried in $GPU_SUITE_WHEELS (default .whl/, made by launch/gpu_wheels.sh) into
#    /tmp/site without network access and puts it on PYTHONPATH; skipped when that folder holds no wheels;
# 2. checks that everything the suite imports is importable, and says which package is missing if not;
# 3. runs the suite with the total budget (default 540 s), killing it 30 s after that at the latest; the
#    suite rewrites its outputs after every measurement, so even then the JSON holds what was measured.
# Writes $OUT/gpu_suite.json and $OUT/gpu_suite.md when $OUT is set (else --out_dir, default
# workdirs/gpu_suite), and the full log beside them (gpu_suite.log); prints the markdown table last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_SUITE_WHEELS-.whl}
SITE=${GPU_SUITE_SITE:-/tmp/site}

if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "gpu_suite.sh: installing the wheels in $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A rerun in the same machine compiles nothing twice; preallocate more than jax's default 75 % so the
# largest-batch search sees most of the device.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

"$PY" - <<'PYEOF' || exit 3
import importlib, sys
missing = []
for name in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'numpy', 'scipy', 'skimage', 'PIL', 'tifffile', 'absl',
             'ml_collections', 'grain', 'array_record', 'tensorflow_datasets', 'tqdm', 'tensorboardX',
             'dualunet_jax.trainer', 'dualunet_jax.inference.engine'):
  try:
    importlib.import_module(name)
  except Exception as e:  # noqa: BLE001
    missing.append(f'{name} ({type(e).__name__}: {e})')
try:
  import openslide  # noqa: F401  optional: without it, slides are read through tifffile
except Exception as e:  # noqa: BLE001
  print(f'gpu_suite.sh: openslide not importable ({e}); the slide is read through tifffile', file=sys.stderr)
if missing:
  sys.exit('gpu_suite.sh: cannot import ' + '; '.join(missing) + '\n(carry the wheels: launch/gpu_wheels.sh)')
import jax
print(f'gpu_suite.sh: jax {jax.__version__}, devices {jax.devices()}', file=sys.stderr)
PYEOF

OUT_DIR=${OUT:-}
ARGS=("$@")
BUDGET=540
for a in "$@"; do
  case "$a" in
    --budget_s=*) BUDGET=${a#--budget_s=} ;;
    --out_dir=*) OUT_DIR=${a#--out_dir=} ;;
  esac
done
OUT_DIR=${OUT_DIR:-workdirs/gpu_suite}
mkdir -p "$OUT_DIR"
HARD_LIMIT=$("$PY" -c "print(int(float('$BUDGET')) + 30)")
timeout -s INT -k 10 "$HARD_LIMIT" "$PY" benchmarks/gpu_suite.py --out_dir="$OUT_DIR" "${ARGS[@]}" \
  > "$OUT_DIR/gpu_suite.log" 2>&1
rc=$?
grep '^\[gpu_suite\]' "$OUT_DIR/gpu_suite.log" || true
[ $rc -ne 0 ] && { echo "gpu_suite.sh: the suite exited with $rc; the end of $OUT_DIR/gpu_suite.log:"; tail -n 30 "$OUT_DIR/gpu_suite.log"; }
[ -f "$OUT_DIR/gpu_suite.md" ] && cat "$OUT_DIR/gpu_suite.md"
exit $rc
