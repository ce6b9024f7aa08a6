"""Test-wide setup: 4 simulated CPU devices (sharding tests) and the real data beside the project."""

import os
import pathlib

# Must happen before jax is imported anywhere: every test process sees 4 CPU devices, so sharded code paths
# are exercised on a CPU-only machine. Single-device code simply uses the default (first) device.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
def consep_official(shared_data, tmp_path_factory) -> pathlib.Path:
  """The real CoNSeP in its official layout (`Train/`, `Test/`), assembled once per test session (~1 min)."""
  import subprocess
  import sys
  script = shared_data / 'consep' / 'assemble_consep.py'
  if not script.is_file():
    pytest.skip(f'{script} is absent')
  out = tmp_path_factory.mktemp('consep') / 'CoNSeP'
  subprocess.run([sys.executable, str(script), '--out', str(out)], check=True, capture_output=True)
  return out
