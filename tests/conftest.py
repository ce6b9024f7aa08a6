"""Test-wide setup: 4 simulated CPU devices (sharding tests) and the real data beside the project."""

import os
import pathlib

from child_env import GROUPED_CONV, TEST_XLA_FLAGS  # tests/ is on sys.path (pytest's rootdir-relative import)

# Must happen before jax is imported anywhere: every test process sees 4 CPU devices, so sharded code paths
# are exercised on a CPU-only machine (single-device code simply uses the default, first, device), and
# compiles at LLVM optimisation level 0 (child_env.py says why).
os.environ.setdefault('XLA_FLAGS', TEST_XLA_FLAGS)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
for _name, _value in GROUPED_CONV.items():  # XLA's grouped kernels in tests (child_env.py says why)
  os.environ.setdefault(_name, _value)
# Tests compile the same tiny models many times (one jit per run); a persistent cache shared by the test
# workers turns repeats into cache hits.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(pathlib.Path(__file__).resolve().parents[1] / '.data' /
                                                       'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """`../shared/data` (real CoNSeP crops and fixtures); tests that need it skip where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real data folder {SHARED_DATA} is absent (it lives beside the project, never inside it)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def fixtures_dir(shared_data) -> pathlib.Path:
  path = shared_data / 'fixtures'
  if not (path / 'imgs').is_dir():
    pytest.skip(f'{path} has no imgs/ folder')
  return path


@pytest.fixture(scope='session')
def consep_official(shared_data) -> pathlib.Path:
  """The real CoNSeP in its official layout (`Train/`, `Test/`), assembled once into `.data/CoNSeP`
  (git-ignored) and reused by later runs. One test worker builds it under a file lock while the others wait
  (each building its own copy cost CI's two cores ~70 s of CPU twice), on all cores with the GPU suite's
  assembler (the crops' own script does the pixel work), in a temporary folder renamed into place: no one
  sees a half-written copy."""
  import fcntl
  import shutil
  import sys
  import tempfile
  out = REPO / '.data' / 'CoNSeP'
  last_file = out / 'Test' / 'Labels' / 'test_14.mat'
  if last_file.is_file():
    return out
  script = shared_data / 'consep' / 'assemble_consep.py'
  if not script.is_file():
    pytest.skip(f'{script} is absent')
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import _suite_data
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.parent / '.consep.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if last_file.is_file():  # built by the worker that held the lock
      return out
    if out.exists():
      raise RuntimeError(f'{out} exists without {last_file.relative_to(out)} (a partial copy?): remove it, the '
                         f'tests rebuild it from {script}')
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix='.consep-'))
    try:
      _suite_data.assemble_consep(script.parent, tmp)
      tmp.rename(out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return out
