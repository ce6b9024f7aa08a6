#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (e.g. v5e-16: 4 hosts). Every host runs the same command; the mesh spans all
# chips and jax.distributed.initialize() discovers the slice by itself.
#
#   launch/tpu_vm.sh TPU_NAME ZONE gs://bucket/workdirs/pannuke --config.dataset.manual_dir=/mnt/pannuke
#
# The workdir must be reachable from every host (a gs:// path works with Orbax; TFDS data_dir likewise).
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; shift 3
REPO=https://example.invalid/your-fork/dualunet-jax.git  # replace with your clone URL
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  test -d dualunet-jax || git clone $REPO dualunet-jax
  cd dualunet-jax && pip install -q -e . 'jax[tpu]'
  python -m dualunet_jax.train --distributed --config=configs/pannuke.py --workdir=$WORKDIR \
    --config.train.batch_size=64 $*
"
