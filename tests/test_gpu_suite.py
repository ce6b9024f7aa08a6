"""The GPU measurement suite (benchmarks/gpu_suite.py, launch/gpu_suite.sh) in its --dry_run mode on the CPU,
and its pure helpers: the peak table, the largest-batch prediction, the slide mosaic and its oracle."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import _suite_data  # noqa: E402
import gpu_suite  # noqa: E402


def _env() -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''  # one CPU device, as on a one-GPU box (conftest simulates 4 for the sharding tests)
  env['GPU_SUITE_WHEELS'] = ''  # never install wheels here
  env['PYTHON'] = sys.executable
  env.pop('OUT', None)
  return env


def _check_schema(result: dict) -> None:
  assert result['schema_version'] == gpu_suite.SCHEMA_VERSION
  for key, kind in (('dry_run', bool), ('started_utc', str), ('complete', bool), ('machine', dict),
                    ('peak_bf16', dict), ('budget', dict), ('steps', dict)):
    assert isinstance(result[key], kind), key
  for key in ('description', 'platform', 'device_kind', 'device_count', 'host_cores', 'jax', 'flax'):
    assert key in result['machine'], key
  assert set(result['peak_bf16']) == {'tflops', 'source', 'measured_matmul_tflops'}
  assert isinstance(result['budget']['total_s'], float) and isinstance(result['budget']['used_s'], float)
  for name, step in result['steps'].items():
    assert name in gpu_suite.STEPS
    assert step['status'] in gpu_suite.STATUSES, (name, step)
    assert step['status'] != 'failed', (name, step.get('reason'), step.get('traceback'))
    if step['status'] != 'measured':
      assert isinstance(step['reason'], str) and step['reason'], (name, step)
    for unit in step['units']:
      assert unit['status'] in ('measured', 'partial', 'skipped', 'oom'), unit
      if unit['status'] != 'measured':
        assert unit['reason'], unit


@pytest.mark.slow  # about 75 s on CI's two cores: every step compiles a few (tiny) programs
@pytest.mark.skipif(os.environ.get('DUALUNET_SLOW_TESTS') != '1',
                    reason='the whole suite end to end (~75 s on 2 CPU cores, over CI\'s budget); run it with '
                    'DUALUNET_SLOW_TESTS=1 before spending device time')
def test_dry_run_through_the_wrapper_measures_every_step(tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run(['bash', 'launch/gpu_suite.sh', '--dry_run', f'--out_dir={out}', '--budget_s=600',
                         f'--scratch={tmp_path / "scratch"}'], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=900)
  log = (out / 'gpu_suite.log').read_text() if (out / 'gpu_suite.log').is_file() else ''
  assert proc.returncode == 0, proc.stdout + proc.stderr + log[-3000:]
  result = json.loads((out / 'gpu_suite.json').read_text())
  _check_schema(result)
  assert result['dry_run'] and result['complete']
  assert result['budget']['used_s'] <= result['budget']['total_s']
  assert list(result['steps']) == list(gpu_suite.STEPS)
  assert {n: s['status'] for n, s in result['steps'].items()} == {n: 'measured' for n in gpu_suite.STEPS}

  forward = result['steps']['forward']['units']
  assert {(u['size'], u['batch'], u['dtype']) for u in forward} == {
      (32, 1, 'bfloat16'), (32, 1, 'float32'), (32, 2, 'bfloat16'), (32, 2, 'float32'), (64, 1, 'bfloat16'),
      (64, 1, 'float32')}
  for u in forward:
    assert u['tiles_per_s'] > 0 and u['gflops_per_tile'] > 0 and u['achieved_tflops'] > 0
    assert u['pct_peak_bf16'] is None  # a CPU has no datasheet peak
    assert u['pct_measured_matmul'] > 0
  assert all(u['bf16_over_f32'] > 0 for u in forward if u['dtype'] == 'bfloat16')

  train_step = result['steps']['train_step']['units']
  assert [(u['kind'], u['batch']) for u in train_step] == [('reference', 2), ('largest_probe', 4), ('largest', 8)]
  assert all(u['images_per_s'] > 0 for u in train_step)

  tiles, wsi = result['steps']['predict']['units']
  assert tiles['workload'] == 'consep_test_tiles' and tiles['tiles'] == 2 and tiles['nuclei'] > 0
  assert 0.0 <= tiles['device_wait_fraction'] <= 1.0
  assert tiles['s_per_mm2'] == pytest.approx(tiles['wall_s'] / tiles['area_mm2'])
  assert wsi['workload'] == 'wsi' and wsi['levels'] >= 3 and wsi['tiles'] > 1 and wsi['nuclei'] > 0

  train, test_eval = result['steps']['train']['units']
  assert train['steps_done'] == train['steps_total'] == 3 and train['resumed_from_step'] == 0
  assert set(test_eval['metrics']) >= {'f1_d', 'f1_c_mean', 'dice', 'bpq'}
  md = (out / 'gpu_suite.md').read_text()
  for name in gpu_suite.STEPS:
    assert f'## {name}: measured' in md
  assert '| model | size | batch | dtype |' in md and md in proc.stdout


def test_tight_budget_skips_with_reasons_and_keeps_to_it(tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, 'benchmarks/gpu_suite.py', '--dry_run', f'--out_dir={out}',
                         '--budget_s=40', '--steps=device_ceiling,forward,train', '--step_budgets=forward=1,train=5',
                         f'--scratch={tmp_path / "scratch"}'], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads((out / 'gpu_suite.json').read_text())
  _check_schema(result)
  assert result['budget']['used_s'] <= 40
  steps = result['steps']
  assert steps['device_ceiling']['status'] == 'measured'
  assert steps['forward']['status'] == 'skipped' and 'step budget' in steps['forward']['reason']
  assert all(u['status'] == 'skipped' and 'estimated' in u['reason'] for u in steps['forward']['units'])
  assert steps['train']['status'] == 'skipped' and 'estimated' in steps['train']['reason']
  assert 'train_step' not in steps and 'predict' not in steps


def test_bad_step_name_is_a_clear_error():
  with pytest.raises(SystemExit):
    gpu_suite.parse_args(['--steps=forward,bogus'])


def test_peak_table_names_its_source():
  tflops, source = gpu_suite.peak_bf16('NVIDIA H200')
  assert tflops == pytest.approx(989.4) and 'datasheet' in source
  assert gpu_suite.peak_bf16('NVIDIA H100 PCIe')[0] == pytest.approx(756.0)
  assert gpu_suite.peak_bf16('NVIDIA H100 80GB HBM3')[0] == pytest.approx(989.4)
  assert gpu_suite.peak_bf16('cpu') == (None, gpu_suite.peak_bf16('cpu')[1])


def test_largest_batch_is_solved_from_two_memory_points():
  gib = 2 ** 30
  # 10 GiB fixed + 1 GiB per image; 100 GiB device -> 0.92 * 100 - 10 = 82 images, rounded down to 8s: 80.
  points = [(8, 18 * gib), (16, 26 * gib)]
  batch, how = gpu_suite.predict_largest_batch(points, 100 * gib, 8, 4096)
  assert batch == 80 and 'memory analysis' in how
  assert gpu_suite.predict_largest_batch(points, 100 * gib, 8, 64)[0] == 64  # the cap
  assert gpu_suite.predict_largest_batch(points, None, 8, 64)[0] == 64  # CPU: no limit known
  assert gpu_suite.predict_largest_batch(points, 5 * gib, 8, 64)[0] == 8  # never below one step


def test_mosaic_tiff_is_a_pyramid_and_the_oracle_crosses_blocks(tmp_path):
  from dualunet_jax.inference import slide as slide_lib
  rng = np.random.default_rng(0)
  blocks = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
  layout = _suite_data.mosaic_layout(2, 3, len(blocks))
  info = _suite_data.write_mosaic_tiff(tmp_path / 'm.tif', blocks, layout, mpp=0.25, min_side=64)
  assert (info['height'], info['width'], info['levels']) == (256, 384, 4)
  src = slide_lib.open_source(tmp_path / 'm.tif')
  assert src.is_slide and src.mpp == pytest.approx(0.25)
  assert src.level_downsamples[:2] == pytest.approx((1.0, 2.0))
  np.testing.assert_array_equal(src.read(0, 128, 128, 128, 128), blocks[layout[1, 1]])

  maps = [(np.full((64, 64, 4), i, np.float16), np.full((64, 64), float(i), np.float32)) for i in range(3)]
  oracle = _suite_data.MosaicOracle(maps, {'m': layout})
  probs, dens = oracle.window('m', -8, 56, 80, 16)  # above the grid, then rows 0 and 1, across cols 0 and 1
  assert probs.shape == (80, 16, 4) and dens.shape == (80, 16)
  np.testing.assert_array_equal(dens[:8], 0)
  assert (probs[:8, :, 0] == 1).all()  # outside: background
  assert dens[8, 0] == layout[0, 0] and dens[8, 15] == layout[0, 1] and dens[79, 15] == layout[1, 1]
  assert math.isclose(float(probs[8, 0, 2]), layout[0, 0])


@pytest.mark.parametrize('script', ['gpu_suite.sh', 'gpu_wheels.sh'])
def test_launch_scripts_parse(script):
  subprocess.run(['bash', '-n', str(REPO / 'launch' / script)], check=True)
