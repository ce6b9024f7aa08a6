#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_suite.py needs on a GPU box WITHOUT registry access into .whl/
# (git-ignored), for CPython 3.12 on manylinux x86_64. Run it on a machine with internet, in the repo root:
#
#   launch/gpu_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#
# The list is what the project needs (pyproject.toml) minus what such a box already has (jax with CUDA, flax,
# optax, orbax, numpy, scipy, scikit-image, absl-py, etils, protobuf, pyarrow, psutil, requests, tqdm, pillow,
# wrapt, attrs, six, pyyaml, packaging, cloudpickle, typing-extensions), plus the dependencies of those
# packages that the box lacks. Versions are the ones this project is tested with. --no-deps: every wheel is
# named, so nothing unexpected travels. tifffile is carried although such boxes usually have one: the suite
# writes its pyramidal TIFF from pre-compressed tiles, which needs tifffile >= 2025.6.1.
set -euo pipefail
DEST=${1:-.whl}
PYV=${2:-3.12}
PY=${PYTHON:-python3}
WHEELS=(
  # data pipeline and datasets (training / eval read TFDS array_record files through grain)
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  array_record==0.8.6 grain==0.2.18 portpicker==1.6.0 dm-tree==0.1.10 simple-parsing==0.1.9
  docstring_parser==0.18.0 immutabledict==4.3.1 termcolor==3.3.0 toml==0.10.2
  # configs and metric logs
  ml_collections==1.1.0 tensorboardX==2.6.5
  # whole-slide reading (the pyramidal TIFF of step 3 goes through OpenSlide, as real slides do)
  openslide-python==1.4.7 openslide-bin==4.0.1.2
  tifffile==2026.3.3
)
SDIST_ONLY=(promise==2.3)  # a tensorflow-datasets dependency
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
# Published as a source archive only (pure Python): build the wheel here.
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SDIST_ONLY[@]}"
ls -la "$DEST"
du -sh "$DEST"
